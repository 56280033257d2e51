//! `pnmctl model`: what-if answers from the timing model's hardware
//! profiles: a model's KV cache size at a context, and per decode step the
//! bytes over the link and the modelled time with and without near-memory
//! Top-K.

use std::path::PathBuf;

use pnm_firmware::timing::{HardwareProfile, MODELS, ModelShape, StepQuestion};
use serde_json::{Value, json};

/// A profile named on the command line: a built-in name or a TOML file.
pub fn load_profile(spec: &str) -> Result<HardwareProfile, String> {
    if spec.ends_with(".toml") {
        let path = PathBuf::from(spec);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        HardwareProfile::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    } else {
        HardwareProfile::named(spec).map_err(|e| e.to_string())
    }
}

pub fn model_shape(name: &str) -> Result<ModelShape, String> {
    MODELS.iter().find(|m| m.name == name).cloned().ok_or_else(|| {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        format!("no model {name:?} (known: {})", known.join(", "))
    })
}

/// The answers for every profile, as JSON and as a text table.
pub fn answer(question: &StepQuestion, profiles: &[HardwareProfile]) -> (Value, String) {
    let answers: Vec<_> = profiles.iter().map(|p| question.answer(p)).collect();
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let mut text = format!(
        "{} at {} tokens x batch {} ({} bytes/element): KV cache {:.2} GiB\n",
        question.model.name,
        question.context,
        question.batch,
        question.elem_bytes,
        gib(question.kv_cache_bytes())
    );
    text.push_str(&format!(
        "{:<14} {:>16} {:>14} {:>18} {:>16} {:>9}\n",
        "profile",
        "stream-all GiB",
        "stream-all ms",
        "near-mem link MiB",
        "near-mem ms",
        "speed-up"
    ));
    for a in &answers {
        let (bytes, ms, speedup) = match (a.near_memory_link_bytes, a.near_memory_ms) {
            (Some(b), Some(ms)) => (
                format!("{:.2}", b as f64 / f64::from(1u32 << 20)),
                format!("{ms:.3}"),
                format!("{:.1}x", a.stream_all_ms / ms),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        text.push_str(&format!(
            "{:<14} {:>16.2} {:>14.3} {:>18} {:>16} {:>9}\n",
            a.profile,
            gib(a.stream_all_link_bytes),
            a.stream_all_ms,
            bytes,
            ms,
            speedup
        ));
    }
    let value = json!({
        "question": question,
        "kv_cache_bytes": question.kv_cache_bytes(),
        "answers": answers,
        "profiles": profiles,
        "model": "per decode step, no overlap between phases: near-memory = waves of TOPK_GATHER commands over the compute units (max(keys / internal bandwidth, flops / compute) + overhead each) plus every command's link transfers (G queries in, k indices and k K+V rows out); stream-all = the whole K and V over the link",
    });
    (value, text)
}
