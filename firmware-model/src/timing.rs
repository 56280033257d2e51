//! The timing model: how long the modelled hardware would take, from a
//! hardware profile (TOML), for one command or for a whole decode step.
//!
//! The model is a roofline per phase, added up without overlap (an upper
//! bound a pipelined device would beat):
//! - device work: `max(bytes read / internal bandwidth, flops / compute)`
//!   plus a fixed per-command overhead;
//! - link: bytes moved / link bandwidth plus one link latency per transfer.
//!
//! Built-in profiles carry the public source of every number (`sources`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A device (or memory tier) as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    pub name: String,
    pub description: String,
    /// What the compute units can read from device DRAM.
    pub internal_bandwidth_gb_per_s: f64,
    /// Multiply-adds count as 2 flops; 0 for memory with no compute.
    pub compute_gflop_per_s: f64,
    /// Commands executed in parallel; 0 for memory with no compute.
    pub compute_units: u32,
    /// Host link, per direction.
    pub link_bandwidth_gb_per_s: f64,
    pub link_latency_ns: f64,
    /// Doorbell, descriptor fetch and completion post, per command.
    pub command_overhead_ns: f64,
    /// Where each number comes from, keyed by field name.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile: {0}")]
    Parse(toml::de::Error),
    #[error("profile {name}: {field} must be {rule}")]
    Invalid { name: String, field: &'static str, rule: &'static str },
    #[error("no built-in profile {0:?} (built in: cxl-pnm, cxl-expander, host-ddr)")]
    Unknown(String),
}

impl From<toml::de::Error> for ProfileError {
    fn from(e: toml::de::Error) -> Self {
        Self::Parse(e)
    }
}

const BUILT_IN: [&str; 3] = [
    include_str!("../profiles/cxl-pnm.toml"),
    include_str!("../profiles/cxl-expander.toml"),
    include_str!("../profiles/host-ddr.toml"),
];

impl HardwareProfile {
    /// Parses and checks a profile.
    pub fn from_toml(text: &str) -> Result<Self, ProfileError> {
        let p: Self = toml::from_str(text)?;
        let invalid = |field, rule| ProfileError::Invalid { name: p.name.clone(), field, rule };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !positive(p.internal_bandwidth_gb_per_s) {
            return Err(invalid("internal_bandwidth_gb_per_s", "a positive number"));
        }
        if !positive(p.link_bandwidth_gb_per_s) {
            return Err(invalid("link_bandwidth_gb_per_s", "a positive number"));
        }
        if !non_negative(p.compute_gflop_per_s) {
            return Err(invalid("compute_gflop_per_s", "a number >= 0"));
        }
        if (p.compute_gflop_per_s > 0.0) != (p.compute_units > 0) {
            return Err(invalid("compute_units", "> 0 exactly when compute_gflop_per_s is"));
        }
        if !non_negative(p.link_latency_ns) || !non_negative(p.command_overhead_ns) {
            return Err(invalid("link_latency_ns/command_overhead_ns", "numbers >= 0"));
        }
        Ok(p)
    }

    /// The profiles that ship with cxl-pnm.
    pub fn built_in() -> Vec<Self> {
        BUILT_IN.iter().map(|t| Self::from_toml(t).expect("built-in profiles are valid")).collect()
    }

    pub fn named(name: &str) -> Result<Self, ProfileError> {
        Self::built_in()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ProfileError::Unknown(name.to_string()))
    }

    /// True if the profile can score keys next to its DRAM.
    pub fn has_compute(&self) -> bool {
        self.compute_units > 0
    }

    /// Device time of a command that reads `dram_bytes` and computes
    /// `flops`, plus its fixed overhead (ns).
    pub fn device_ns(&self, dram_bytes: u64, flops: u64) -> f64 {
        let read = dram_bytes as f64 / self.internal_bandwidth_gb_per_s;
        let compute =
            if self.has_compute() { flops as f64 / self.compute_gflop_per_s } else { 0.0 };
        read.max(compute) + self.command_overhead_ns
    }

    /// Time to move `bytes` over the link in one transfer (ns).
    pub fn link_ns(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            0.0
        } else {
            self.link_latency_ns + bytes as f64 / self.link_bandwidth_gb_per_s
        }
    }
}

/// What one data-path command does, for its modelled time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// No data: NOP and the KV management commands.
    Control,
    /// Scores `tokens` keys of `head_dim` elements of `elem_bytes` against
    /// `group` queries, then returns `gathered` K and V rows and `k` results.
    TopK { tokens: u64, head_dim: u64, elem_bytes: u64, group: u64, k: u64, gathered: u64 },
    /// Returns `rows` K and V rows.
    Gather { rows: u64, head_dim: u64, elem_bytes: u64 },
}

/// Modelled device time of one command (ns): device work plus the link
/// transfers of its input and output.
pub fn command_ns(profile: &HardwareProfile, work: Work) -> f64 {
    match work {
        Work::Control => profile.command_overhead_ns,
        Work::TopK { tokens, head_dim, elem_bytes, group, k, gathered } => {
            let keys = tokens * head_dim * elem_bytes;
            let flops = 2 * tokens * head_dim * group;
            let query_in = group * head_dim * 4;
            let out = k * 8 + gathered * 2 * head_dim * elem_bytes;
            profile.device_ns(keys + gathered * 2 * head_dim * elem_bytes, flops)
                + profile.link_ns(query_in)
                + profile.link_ns(out)
        }
        Work::Gather { rows, head_dim, elem_bytes } => {
            let bytes = rows * 2 * head_dim * elem_bytes;
            profile.device_ns(bytes, 0) + profile.link_ns(bytes)
        }
    }
}

/// A model's attention shape, for what-if questions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub name: &'static str,
    pub layers: u64,
    pub q_heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Parameters (the weights a decode step reads once).
    pub params: u64,
}

/// Public model configurations (their config.json values; parameter
/// counts from the model cards).
pub const MODELS: [ModelShape; 4] = [
    ModelShape {
        name: "llama-3-8b",
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        params: 8_030_000_000,
    },
    ModelShape {
        name: "llama-3-70b",
        layers: 80,
        q_heads: 64,
        kv_heads: 8,
        head_dim: 128,
        params: 70_600_000_000,
    },
    ModelShape {
        name: "llama-3-405b",
        layers: 126,
        q_heads: 128,
        kv_heads: 8,
        head_dim: 128,
        params: 405_900_000_000,
    },
    ModelShape {
        name: "qwen2-7b",
        layers: 28,
        q_heads: 28,
        kv_heads: 4,
        head_dim: 128,
        params: 7_620_000_000,
    },
];

/// One decode step's question: a model, a context, a batch, K.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepQuestion {
    pub model: ModelShape,
    pub context: u64,
    pub batch: u64,
    pub elem_bytes: u64,
    pub k: u64,
}

/// The answer for one profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepAnswer {
    pub profile: String,
    /// 2 x layers x kv_heads x head_dim x bytes x batch x context.
    pub kv_cache_bytes: u64,
    /// Streaming the whole cache to the host: bytes over the link and time.
    pub stream_all_link_bytes: u64,
    pub stream_all_ms: f64,
    /// Near-memory Top-K (only for profiles with compute): bytes over the
    /// link (queries in, K selected K and V rows out) and time.
    pub near_memory_link_bytes: Option<u64>,
    pub near_memory_ms: Option<f64>,
}

impl StepQuestion {
    /// The seed's formula: 2 x layers x kv_heads x head_dim x bytes x batch x context.
    pub fn kv_cache_bytes(&self) -> u64 {
        2 * self.model.layers
            * self.model.kv_heads
            * self.model.head_dim
            * self.elem_bytes
            * self.batch
            * self.context
    }

    /// Per decode step on `profile`.
    pub fn answer(&self, profile: &HardwareProfile) -> StepAnswer {
        let kv = self.kv_cache_bytes();
        let m = &self.model;
        let streams = m.layers * m.kv_heads * self.batch;
        let group = m.q_heads / m.kv_heads.max(1);
        let near = profile.has_compute().then(|| {
            let k = self.k.min(self.context);
            let per_command = Work::TopK {
                tokens: self.context,
                head_dim: m.head_dim,
                elem_bytes: self.elem_bytes,
                group,
                k,
                gathered: k,
            };
            // Commands spread over the compute units; the link carries every
            // command's transfers one after another.
            let device_ns = profile.device_ns(
                self.context * m.head_dim * self.elem_bytes + k * 2 * m.head_dim * self.elem_bytes,
                2 * self.context * m.head_dim * group,
            );
            let waves = streams.div_ceil(u64::from(profile.compute_units));
            let query_in = group * m.head_dim * 4;
            let out = k * 8 + k * 2 * m.head_dim * self.elem_bytes;
            let link_bytes = streams * (query_in + out);
            let link_ns = command_ns(profile, per_command) - device_ns;
            let total = waves as f64 * device_ns + streams as f64 * link_ns;
            (link_bytes, total / 1e6)
        });
        StepAnswer {
            profile: profile.name.clone(),
            kv_cache_bytes: kv,
            stream_all_link_bytes: kv,
            stream_all_ms: profile.link_ns(kv) / 1e6,
            near_memory_link_bytes: near.map(|n| n.0),
            near_memory_ms: near.map(|n| n.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(text: &str) -> HardwareProfile {
        HardwareProfile::from_toml(text).unwrap()
    }

    const SIMPLE: &str = r#"
        name = "simple"
        description = "round numbers"
        internal_bandwidth_gb_per_s = 1000.0
        compute_gflop_per_s = 2000.0
        compute_units = 4
        link_bandwidth_gb_per_s = 50.0
        link_latency_ns = 200.0
        command_overhead_ns = 1000.0
    "#;

    #[test]
    fn built_in_profiles_parse_and_cite_every_number() {
        let all = HardwareProfile::built_in();
        assert_eq!(all.len(), 3);
        for p in &all {
            for field in [
                "internal_bandwidth_gb_per_s",
                "compute_gflop_per_s",
                "compute_units",
                "link_bandwidth_gb_per_s",
                "link_latency_ns",
                "command_overhead_ns",
            ] {
                assert!(p.sources.get(field).is_some_and(|s| !s.is_empty()), "{} {field}", p.name);
            }
        }
        assert_eq!(HardwareProfile::named("cxl-pnm").unwrap().internal_bandwidth_gb_per_s, 1100.0);
        assert!(matches!(HardwareProfile::named("nope"), Err(ProfileError::Unknown(_))));
    }

    #[test]
    fn bad_profiles_are_typed_errors() {
        assert!(matches!(HardwareProfile::from_toml("name = 1"), Err(ProfileError::Parse(_))));
        let zero_bw =
            SIMPLE.replace("= 1000.0\n        compute_gflop", "= 0.0\n        compute_gflop");
        assert!(matches!(HardwareProfile::from_toml(&zero_bw), Err(ProfileError::Invalid { .. })));
        let no_units = SIMPLE.replace("compute_units = 4", "compute_units = 0");
        assert!(matches!(HardwareProfile::from_toml(&no_units), Err(ProfileError::Invalid { .. })));
        let extra = format!("{SIMPLE}\nwarp_drive = 1");
        assert!(matches!(HardwareProfile::from_toml(&extra), Err(ProfileError::Parse(_))));
    }

    #[test]
    fn command_times_follow_the_arithmetic() {
        let p = profile(SIMPLE);
        assert_eq!(command_ns(&p, Work::Control), 1000.0);
        // 1 MB of keys at 1000 GB/s = 1000 ns; 2 * 4096 * 128 * 2 flops =
        // 2_097_152 at 2000 GFLOP/s = 1048.576 ns: compute-bound.
        let w =
            Work::TopK { tokens: 4096, head_dim: 128, elem_bytes: 2, group: 2, k: 0, gathered: 0 };
        let query_link = 200.0 + (2 * 128 * 4) as f64 / 50.0;
        assert!((command_ns(&p, w) - (1048.576 + 1000.0 + query_link)).abs() < 1e-6);
        // A gather of 10 rows of 128 f16: 5120 bytes read and sent.
        let g = Work::Gather { rows: 10, head_dim: 128, elem_bytes: 2 };
        let want = 5120.0 / 1000.0 + 1000.0 + 200.0 + 5120.0 / 50.0;
        assert!((command_ns(&p, g) - want).abs() < 1e-9);
    }

    #[test]
    fn the_seed_formula_for_llama_3_70b_at_128k() {
        let q = StepQuestion {
            model: MODELS[1].clone(),
            context: 131072,
            batch: 1,
            elem_bytes: 2,
            k: 2048,
        };
        // 2 x 80 x 8 x 128 x 2 bytes x 131072 tokens = 40 GiB.
        assert_eq!(q.kv_cache_bytes(), 40 << 30);
        let expander = q.answer(&HardwareProfile::named("cxl-expander").unwrap());
        assert!(expander.near_memory_ms.is_none());
        let expect = (250.0 + (40u64 << 30) as f64 / 26.0) / 1e6;
        assert!((expander.stream_all_ms - expect).abs() < 1e-9);
        let pnm = q.answer(&HardwareProfile::named("cxl-pnm").unwrap());
        // 640 streams x (G=8 queries in + 2048 x (8 + 2 x 256) bytes out).
        assert_eq!(pnm.near_memory_link_bytes, Some(640 * (8 * 128 * 4 + 2048 * (8 + 512))));
        assert!(pnm.near_memory_ms.unwrap() < pnm.stream_all_ms / 10.0);
    }
}

/// The device's temperature, from how busy its compute units are: a
/// first-order thermal model (the die and its heat sink as one mass) that
/// rises from `IDLE_C` toward `IDLE_C + FULL_LOAD_RISE_C` at full load with
/// time constant `TAU_S`. Illustrative constants, not a measured part: the
/// point is a temperature that moves with the load, for Get Health Info and
/// for hosts that watch it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thermal {
    celsius: f64,
}

impl Thermal {
    pub const IDLE_C: f64 = 35.0;
    pub const FULL_LOAD_RISE_C: f64 = 40.0;
    pub const TAU_S: f64 = 5.0;

    pub fn new() -> Self {
        Self { celsius: Self::IDLE_C }
    }

    /// Advances by `dt_s` seconds during which the units were busy
    /// `utilization` (0..=1) of the time.
    pub fn advance(&mut self, dt_s: f64, utilization: f64) {
        let target = Self::IDLE_C + Self::FULL_LOAD_RISE_C * utilization.clamp(0.0, 1.0);
        let keep = (-dt_s.max(0.0) / Self::TAU_S).exp();
        self.celsius = target + (self.celsius - target) * keep;
    }

    /// Whole degrees Celsius, as Get Health Info reports them.
    pub fn celsius(&self) -> i16 {
        self.celsius.round() as i16
    }
}

impl Default for Thermal {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod thermal_tests {
    use super::Thermal;

    #[test]
    fn heats_toward_the_load_and_cools_back() {
        let mut t = Thermal::new();
        assert_eq!(t.celsius(), 35);
        for _ in 0..100 {
            t.advance(1.0, 1.0);
        }
        assert_eq!(t.celsius(), 75);
        t.advance(Thermal::TAU_S, 0.0);
        // One time constant: 1/e of the way left.
        assert_eq!(t.celsius(), (35.0 + 40.0 / std::f64::consts::E).round() as i16);
        t.advance(1.0, 7.0);
        assert!(t.celsius() <= 75, "utilization is clamped");
    }
}
