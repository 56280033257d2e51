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

use pnm_firmware::system::{Serving, SystemProfile, SystemQuestion, scaling, talk_check};

use pnm_tools::plot::{Chart, Series};

/// A system profile named on the command line: the built-in one or a TOML file.
pub fn load_system(spec: Option<&str>) -> Result<SystemProfile, String> {
    match spec {
        None => Ok(SystemProfile::built_in()),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            SystemProfile::from_toml(&text).map_err(|e| format!("{path}: {e}"))
        }
    }
}

fn serving_row(s: &Serving) -> String {
    format!(
        "{:<11} {:>12.3} {:>11.2} {:>20} {:>10.1} {:>13.2} {:>12.2} {:>12.0}{}\n",
        s.scheme,
        s.link_bytes / 1e9,
        s.step_ms,
        format!("{:?}", s.bound).to_lowercase(),
        s.tokens_per_s,
        s.movement_mj_per_token,
        s.power_mj_per_token,
        s.tokens_per_usd,
        if s.fits { "" } else { "  (does not fit the modules)" }
    )
}

/// The system model's answers (server, three schemes, scaling, the talk's
/// and the paper's numbers), as JSON and text.
pub fn system_answer(
    question: &SystemQuestion,
    system: &SystemProfile,
    pnm: &HardwareProfile,
) -> (Value, String) {
    let a = question.answer(system, pnm);
    let fill = scaling(question, system, pnm, 16, true);
    let fixed = scaling(question, system, pnm, 16, false);
    let talk = talk_check(&MODELS[1], 131072, system);
    // The paper's headline setting: Llama-3-405B at 1M tokens, the batch
    // 16 modules hold.
    let paper_question = {
        let per_sequence = SystemQuestion {
            model: MODELS[2].clone(),
            context: 1 << 20,
            batch: 1,
            modules: 16,
            ..question.clone()
        };
        let batch = ((16.0 * system.module_capacity_gb * 1e9 / per_sequence.kv_cache_bytes())
            as u64)
            .max(1);
        SystemQuestion { batch, ..per_sequence }
    };
    let paper = paper_question.answer(system, pnm);
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::INFINITY };
    let energy = |s: &Serving| s.movement_mj_per_token + s.power_mj_per_token;
    let paper_throughput = ratio(paper.pnm.tokens_per_s, paper.tiered.tokens_per_s);
    let paper_energy = ratio(energy(&paper.tiered), energy(&paper.pnm));
    let paper_cost = ratio(paper.pnm.tokens_per_usd, paper.tiered.tokens_per_usd);

    let mut text = format!(
        "\nServer {} ({}): HBM {:.2} TB; KV cache {:.2} TB + weights {:.0} GB = {:.1}x HBM\n",
        system.name,
        system.description,
        a.hbm_bytes / 1e12,
        a.kv_cache_bytes / 1e12,
        a.weights_bytes / 1e9,
        a.capacity_gap
    );
    text += &format!(
        "Per decode step, batch {}, k {}, {} PNM modules ({} each):\n",
        question.batch, question.k, question.modules, pnm.name
    );
    text += &format!(
        "{:<11} {:>12} {:>11} {:>20} {:>10} {:>13} {:>12} {:>12}\n",
        "scheme",
        "link GB",
        "step ms",
        "bound",
        "tokens/s",
        "move mJ/tok",
        "power mJ/tok",
        "tokens/$"
    );
    for s in [&a.stream_all, &a.tiered, &a.pnm] {
        text += &serving_row(s);
    }
    text += &format!(
        "PNM vs stream-all: {:.1}x throughput, {:.0}x fewer link bytes; vs tiered: {:.1}x throughput\n",
        ratio(a.pnm.tokens_per_s, a.stream_all.tokens_per_s),
        ratio(a.stream_all.link_bytes, a.pnm.link_bytes),
        ratio(a.pnm.tokens_per_s, a.tiered.tokens_per_s),
    );
    text += "\nScaling, the batch filling the modules' capacity (the talk's case):\n";
    text += "modules  batch  tokens/s  efficiency  bound\n";
    for p in &fill {
        text += &format!(
            "{:>7} {:>6} {:>9.1} {:>11.2}  {:?}\n",
            p.modules, p.batch, p.tokens_per_s, p.efficiency, p.bound
        );
    }
    text += &format!(
        "\nThe talk's numbers: a {:.1} TB KV cache is {} at {}K context and batch {}; \
         the server's HBM is {:.2} TB (8 x 141 GB) and its GPU links {:.2} TB/s both ways; \
         reading that cache once per step needs 12 TB/s at {:.1} steps/s.\n",
        talk.kv_tb_at_that_batch,
        talk.model,
        talk.context / 1024,
        talk.batch_for_6_4_tb,
        talk.hbm_tb,
        talk.links_tb_per_s,
        talk.steps_per_s_for_12_tb_per_s
    );
    text += &format!(
        "The PNM-KV paper (arXiv 2511.00321) reports up to 21.9x throughput, 60x less energy per token \
         and 7.3x cost efficiency over recalling KV to the GPU. This model, Llama-3-405B at 1M tokens, \
         batch {} on 16 modules: {:.1}x throughput, {:.1}x less energy per token, {:.1}x tokens/$ \
         against tiered. It reads every key each step where the paper selects pages (less DRAM read), \
         and it charges the GPUs' power to both schemes alike.\n",
        paper_question.batch, paper_throughput, paper_energy, paper_cost
    );
    let value = json!({
        "system": system,
        "question": question,
        "answer": a,
        "scaling_filled": fill,
        "scaling_fixed_batch": fixed,
        "talk": talk,
        "paper": {
            "question": paper_question,
            "answer": paper,
            "throughput_vs_tiered": paper_throughput,
            "energy_per_token_vs_tiered": paper_energy,
            "tokens_per_usd_vs_tiered": paper_cost,
            "published": {"throughput": 21.9, "energy_per_token": 60.0, "cost_efficiency": 7.3, "source": "arXiv 2511.00321"},
        },
        "model": "per decode step, phases added without overlap: weights read from HBM over every GPU; stream-all = the whole KV over the GPUs' links; tiered = HBM holds what fits beside the weights, the rest recalled over the links; pnm = every module scores its share of the keys at its internal bandwidth, returns its k best per stream, the host merges them, the k rows cross. Energy: DRAM reads and link transfers at the profile's pJ/bit (movement) and the hardware's power over the step (power).",
    });
    (value, text)
}

/// Figures measured on this machine, for the charts.
#[derive(Debug, Default)]
pub struct Measured {
    /// (devices, speed-up over one device) from `pnmctl bench set`.
    pub speedup: Option<Vec<(f64, f64)>>,
    /// Main-job decode steps: (label, context tokens, step ms).
    pub steps: Vec<(String, f64, f64)>,
}

/// Reads `pnmctl bench set` JSON and main-job `--json` reports.
pub fn load_measured(paths: &[PathBuf]) -> Result<Measured, String> {
    let mut measured = Measured::default();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        if let Some(speedup) = v["set_speedup_vs_one_unit"].as_f64() {
            let devices = v["configs"][2]["config"]
                .as_str()
                .and_then(|c| c.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .ok_or_else(|| format!("{}: no set configuration", path.display()))?;
            measured.speedup = Some(vec![(1.0, 1.0), (devices, speedup)]);
        } else if let (Some(context), Some(step)) =
            (v["context_tokens"].as_f64(), v["mean_step_ms"].as_f64())
        {
            let shape = &v["shape"];
            let mut label = format!(
                "measured here: main job, {} layers x {} KV heads",
                shape["layers"], shape["heads"]
            );
            if let Some(devices) = v["devices"].as_u64().filter(|&n| n > 1) {
                label += &format!(", {devices} devices");
            }
            if let Some(window) = v["options"]["hot_window"].as_u64() {
                label += &format!(", tiered ({window} hot)");
            }
            measured.steps.push((label, context, step));
        } else {
            return Err(format!(
                "{} is neither `pnmctl bench set` output nor a main-job --json report",
                path.display()
            ));
        }
    }
    Ok(measured)
}

/// The charts: step time against context, throughput against modules,
/// link bytes against k, movement energy per token against context.
pub fn charts(
    question: &SystemQuestion,
    system: &SystemProfile,
    pnm: &HardwareProfile,
    measured: &Measured,
) -> Vec<Chart> {
    let contexts: Vec<u64> = (12..=20).map(|p| 1u64 << p).collect();
    let at = |context: u64| SystemQuestion { context, ..question.clone() }.answer(system, pnm);
    let per_context: Vec<_> = contexts.iter().map(|&c| (c as f64, at(c))).collect();
    let scheme_series = |f: &dyn Fn(&Serving) -> f64| -> Vec<Series> {
        ["stream-all", "tiered (no PNM)", "PNM Top-K (where the cache fits the modules)"]
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                name: name.to_string(),
                points: per_context
                    .iter()
                    .map(|(c, a)| (*c, [&a.stream_all, &a.tiered, &a.pnm][i]))
                    .filter(|(_, s)| s.fits)
                    .map(|(c, s)| (c, f(s)))
                    .collect(),
                measured: false,
            })
            .collect()
    };
    let shape = format!(
        "{}, batch {}, k {}, {} PNM modules",
        question.model.name, question.batch, question.k, question.modules
    );
    let fill = scaling(question, system, pnm, 16, true);
    let per_module = fill[0].tokens_per_s;
    let mut scaling_series = vec![
        Series {
            name: "model: PNM modules, batch filling them".into(),
            points: fill.iter().map(|p| (f64::from(p.modules), p.tokens_per_s)).collect(),
            measured: false,
        },
        Series {
            name: "linear from 1 module".into(),
            points: fill
                .iter()
                .map(|p| (f64::from(p.modules), per_module * f64::from(p.modules)))
                .collect(),
            measured: false,
        },
    ];
    if let Some(speedup) = &measured.speedup {
        scaling_series.push(Series {
            name: "measured here: device-set speed-up x the model's 1-module figure".into(),
            points: speedup.iter().map(|&(n, s)| (n, s * per_module)).collect(),
            measured: true,
        });
    }
    let ks: Vec<u64> = (6..=14).map(|p| 1u64 << p).collect();
    let by_k: Vec<_> = ks
        .iter()
        .map(|&k| (k as f64, SystemQuestion { k, ..question.clone() }.answer(system, pnm)))
        .collect();
    let flat = |name: &str, f: &dyn Fn(&pnm_firmware::system::SystemAnswer) -> f64| Series {
        name: name.into(),
        points: by_k.iter().map(|(k, a)| (*k, f(a) / 1e9)).collect(),
        measured: false,
    };
    vec![
        Chart {
            file: "step-time-vs-context",
            title: format!("Decode step time vs context ({shape})"),
            x_label: "context (tokens)".into(),
            y_label: "step time (ms)".into(),
            log_x: true,
            log_y: true,
            legend_lower_right: false,
            series: {
                let mut series = scheme_series(&|s| s.step_ms);
                series.extend(measured.steps.iter().map(|(label, context, ms)| Series {
                    name: format!("{label} (this 2-core machine's emulator)"),
                    points: vec![(*context, *ms)],
                    measured: true,
                }));
                series
            },
        },
        Chart {
            file: "throughput-vs-modules",
            title: format!(
                "Throughput vs PNM modules ({} at {} tokens, k {})",
                question.model.name, question.context, question.k
            ),
            x_label: "PNM modules".into(),
            y_label: "tokens/s".into(),
            log_x: false,
            log_y: false,
            legend_lower_right: false,
            series: scaling_series,
        },
        Chart {
            file: "link-bytes-vs-k",
            title: format!(
                "Bytes over the GPU links per step vs k ({} at {} tokens, batch {})",
                question.model.name, question.context, question.batch
            ),
            x_label: "k (rows per sequence, layer and KV head)".into(),
            y_label: "GB per step".into(),
            log_x: true,
            log_y: true,
            legend_lower_right: true,
            series: vec![
                flat("stream-all", &|a| a.stream_all.link_bytes),
                flat("tiered (no PNM)", &|a| a.tiered.link_bytes.max(1.0)),
                flat("PNM Top-K", &|a| a.pnm.link_bytes),
            ],
        },
        Chart {
            file: "energy-per-token",
            title: format!("Data-movement energy per token vs context ({shape})"),
            x_label: "context (tokens)".into(),
            y_label: "mJ per token (DRAM reads + link transfers)".into(),
            log_x: true,
            log_y: true,
            legend_lower_right: true,
            series: scheme_series(&|s| s.movement_mj_per_token),
        },
    ]
}
