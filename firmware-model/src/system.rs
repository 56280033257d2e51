//! The system model: the talk's questions about a GPU server whose KV cache
//! outgrows its HBM, answered per decode step for three ways of serving it
//! and for 1..N PNM modules.
//!
//! Per decode step, for a model, a context, a batch and k:
//! - **stream-all**: the whole KV cache lives in CXL memory and crosses the
//!   GPUs' links every step;
//! - **tiered** (no PNM): HBM holds what fits beside the weights, the rest
//!   lives in CXL memory and is recalled over the links every step;
//! - **pnm**: the KV cache is sharded over M PNM modules (pages round
//!   robin, as `pnm_host::DeviceSet` does); each scores its share of the
//!   keys next to its DRAM and returns its k best per (sequence, layer, KV
//!   head); the host merges them and the k selected K and V rows cross.
//!
//! Every step also reads the weights once from HBM (decode is bound by
//! that read), split over the GPUs. Phases add up without overlap: an
//! upper bound a pipelined system would beat, the same for every profile.
//! Energy counts data movement (DRAM reads and link transfers, pJ/bit) and,
//! separately, the hardware's power over the step; cost is capital spread
//! over the amortization period plus electricity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::timing::{HardwareProfile, ModelShape, ProfileError};

/// The server and its prices and energies. Every number has a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemProfile {
    pub name: String,
    pub description: String,
    pub gpus: u32,
    pub gpu_hbm_gb: f64,
    pub gpu_hbm_gb_per_s: f64,
    /// Each GPU's link to the host and CXL memory, per direction.
    pub gpu_link_gb_per_s: f64,
    pub gpu_power_w: f64,
    pub gpu_price_usd: f64,
    pub module_capacity_gb: f64,
    pub module_power_w: f64,
    pub module_price_usd: f64,
    pub expander_price_usd_per_gb: f64,
    pub expander_power_w: f64,
    pub hbm_pj_per_bit: f64,
    pub pnm_dram_pj_per_bit: f64,
    pub expander_dram_pj_per_bit: f64,
    pub link_pj_per_bit: f64,
    /// Host time to merge one (token, score) candidate of a fan-out, on
    /// one thread.
    pub merge_ns_per_candidate: f64,
    /// Host threads merging fan-outs in parallel (each stream's merge is
    /// independent).
    pub merge_threads: u32,
    pub electricity_usd_per_kwh: f64,
    pub amortization_years: f64,
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

const BUILT_IN_SYSTEM: &str = include_str!("../profiles/system-h200x8.toml");

impl SystemProfile {
    pub fn from_toml(text: &str) -> Result<Self, ProfileError> {
        let p: Self = toml::from_str(text)?;
        let numbers = [
            ("gpu_hbm_gb", p.gpu_hbm_gb),
            ("gpu_hbm_gb_per_s", p.gpu_hbm_gb_per_s),
            ("gpu_link_gb_per_s", p.gpu_link_gb_per_s),
            ("module_capacity_gb", p.module_capacity_gb),
            ("amortization_years", p.amortization_years),
        ];
        for (field, v) in numbers {
            if !(v.is_finite() && v > 0.0) {
                return Err(ProfileError::Invalid {
                    name: p.name,
                    field,
                    rule: "a positive number",
                });
            }
        }
        let rest = [
            p.gpu_power_w,
            p.gpu_price_usd,
            p.module_power_w,
            p.module_price_usd,
            p.expander_price_usd_per_gb,
            p.expander_power_w,
            p.hbm_pj_per_bit,
            p.pnm_dram_pj_per_bit,
            p.expander_dram_pj_per_bit,
            p.link_pj_per_bit,
            p.merge_ns_per_candidate,
            p.electricity_usd_per_kwh,
        ];
        if p.gpus == 0 || p.merge_threads == 0 || rest.iter().any(|v| !(v.is_finite() && *v >= 0.0))
        {
            return Err(ProfileError::Invalid {
                name: p.name,
                field: "gpus, merge_threads and the power, price and energy figures",
                rule: "gpus and merge_threads >= 1, numbers >= 0",
            });
        }
        Ok(p)
    }

    /// The built-in server (the talk's 8-GPU example).
    pub fn built_in() -> Self {
        Self::from_toml(BUILT_IN_SYSTEM).expect("the built-in system profile is valid")
    }

    fn hbm_bytes(&self) -> f64 {
        f64::from(self.gpus) * self.gpu_hbm_gb * 1e9
    }
}

/// One question: a model at a context and batch, k rows per (sequence,
/// layer, KV head), `modules` PNM modules (or expanders for the others).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemQuestion {
    pub model: ModelShape,
    pub context: u64,
    pub batch: u64,
    pub elem_bytes: u64,
    pub k: u64,
    pub modules: u32,
}

/// What bounds a step most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bound {
    /// Reading the weights from HBM.
    Weights,
    /// Reading KV from HBM.
    Hbm,
    /// The GPUs' links (KV recalled or rows gathered).
    GpuLinks,
    /// The PNM modules' DRAM (scoring keys).
    PnmDram,
    /// The PNM modules' own links.
    ModuleLinks,
    /// The host merging the modules' candidates.
    Merge,
}

/// One way of serving the step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Serving {
    pub scheme: &'static str,
    /// Bytes over the GPUs' links per step.
    pub link_bytes: f64,
    pub step_ms: f64,
    /// The step's phases (ms), by what bounds them.
    pub phases_ms: BTreeMap<&'static str, f64>,
    pub bound: Bound,
    pub tokens_per_s: f64,
    /// Data-movement energy per generated token (DRAM reads and link
    /// transfers, weights included), mJ.
    pub movement_mj_per_token: f64,
    /// The hardware's power over the step, per token, mJ.
    pub power_mj_per_token: f64,
    pub tokens_per_usd: f64,
    /// False if the KV cache does not fit the CXL memory given.
    pub fits: bool,
}

/// The answers to one question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemAnswer {
    pub kv_cache_bytes: f64,
    pub weights_bytes: f64,
    pub hbm_bytes: f64,
    /// KV + weights over HBM: the capacity gap.
    pub capacity_gap: f64,
    pub stream_all: Serving,
    pub tiered: Serving,
    pub pnm: Serving,
}

fn ms(seconds: f64) -> f64 {
    seconds * 1e3
}

impl SystemQuestion {
    pub fn kv_cache_bytes(&self) -> f64 {
        let m = &self.model;
        (2 * m.layers * m.kv_heads * m.head_dim * self.elem_bytes * self.batch * self.context)
            as f64
    }

    fn weights_bytes(&self) -> f64 {
        (self.model.params * self.elem_bytes) as f64
    }

    /// Answers for the three schemes on `system` with PNM modules of `pnm`.
    pub fn answer(&self, system: &SystemProfile, pnm: &HardwareProfile) -> SystemAnswer {
        let kv = self.kv_cache_bytes();
        let weights = self.weights_bytes();
        let gpus = f64::from(system.gpus);
        let hbm_bw = gpus * system.gpu_hbm_gb_per_s * 1e9;
        let gpu_links = gpus * system.gpu_link_gb_per_s * 1e9;
        let t_weights = weights / hbm_bw;
        let batch = self.batch as f64;
        let pj = |bytes: f64, pj_per_bit: f64| bytes * 8.0 * pj_per_bit * 1e-12;
        let weights_j = pj(weights, system.hbm_pj_per_bit);
        let modules = f64::from(self.modules);
        let module_bytes = system.module_capacity_gb * 1e9;
        let hourly_capex = |extra_usd: f64| {
            (gpus * system.gpu_price_usd + extra_usd) / (system.amortization_years * 8766.0)
        };
        let serve = |scheme,
                     link_bytes,
                     phases: Vec<(&'static str, Bound, f64)>,
                     movement_j: f64,
                     power_w: f64,
                     capex_usd: f64,
                     fits: bool| {
            let step: f64 = phases.iter().map(|p| p.2).sum();
            let bound = phases
                .iter()
                .max_by(|a, b| a.2.total_cmp(&b.2))
                .map(|p| p.1)
                .expect("at least one phase");
            let tokens_per_s = batch / step;
            let hourly = hourly_capex(capex_usd) + power_w / 1e3 * system.electricity_usd_per_kwh;
            Serving {
                scheme,
                link_bytes,
                step_ms: ms(step),
                phases_ms: phases.iter().map(|p| (p.0, ms(p.2))).collect(),
                bound,
                tokens_per_s,
                movement_mj_per_token: movement_j / batch * 1e3,
                power_mj_per_token: power_w * step / batch * 1e3,
                tokens_per_usd: tokens_per_s * 3600.0 / hourly,
                fits,
            }
        };
        let gpu_power = gpus * system.gpu_power_w;
        // CXL expanders sized to the cache, for the schemes without PNM.
        let expander_usd = kv / 1e9 * system.expander_price_usd_per_gb;
        let expanders = (kv / module_bytes).ceil();
        let expander_power = expanders * system.expander_power_w;

        let stream_all = serve(
            "stream-all",
            kv,
            vec![
                ("weights", Bound::Weights, t_weights),
                ("kv-over-links", Bound::GpuLinks, kv / gpu_links),
            ],
            weights_j + pj(kv, system.expander_dram_pj_per_bit + system.link_pj_per_bit),
            gpu_power + expander_power,
            expander_usd,
            true,
        );

        let resident = kv.min((system.hbm_bytes() - weights).max(0.0));
        let recalled = kv - resident;
        let tiered = serve(
            "tiered",
            recalled,
            vec![
                ("weights", Bound::Weights, t_weights),
                ("kv-in-hbm", Bound::Hbm, resident / hbm_bw),
                ("kv-over-links", Bound::GpuLinks, recalled / gpu_links),
            ],
            weights_j
                + pj(resident, system.hbm_pj_per_bit)
                + pj(recalled, system.expander_dram_pj_per_bit + system.link_pj_per_bit),
            gpu_power + (recalled / module_bytes).ceil() * system.expander_power_w,
            recalled / 1e9 * system.expander_price_usd_per_gb,
            true,
        );

        // PNM: every module scores its share of every stream's keys.
        let m = &self.model;
        let streams = (m.layers * m.kv_heads * self.batch) as f64;
        let group = (m.q_heads / m.kv_heads.max(1)) as f64;
        let (d, eb) = (m.head_dim as f64, self.elem_bytes as f64);
        let k = self.k.min(self.context) as f64;
        let keys_per_module = kv / 2.0 / modules;
        let flops_per_module = 2.0 * streams * (self.context as f64 / modules) * d * group;
        let scan =
            (keys_per_module / (pnm.internal_bandwidth_gb_per_s * 1e9)).max(if pnm.has_compute() {
                flops_per_module / (pnm.compute_gflop_per_s * 1e9)
            } else {
                0.0
            });
        let units = f64::from(pnm.compute_units.max(1));
        let overhead = streams * 2.0 * pnm.command_overhead_ns * 1e-9 / units;
        // Each module: queries in and its k best out per stream, then its
        // share of the k selected rows.
        let candidates = streams * modules * k;
        let rows = streams * k * 2.0 * d * eb;
        let query_in = streams * group * d * 4.0;
        let module_link = (query_in + streams * k * 8.0 + rows / modules)
            / (pnm.link_bandwidth_gb_per_s * 1e9)
            + 2.0 * pnm.link_latency_ns * 1e-9;
        let link_bytes = modules * query_in + candidates * 8.0 + rows;
        let fits = modules * module_bytes >= kv;
        let pnm_serving = serve(
            "pnm",
            link_bytes,
            vec![
                ("weights", Bound::Weights, t_weights),
                ("pnm-scoring", Bound::PnmDram, scan + overhead),
                ("module-links", Bound::ModuleLinks, module_link),
                ("rows-over-gpu-links", Bound::GpuLinks, link_bytes / gpu_links),
                (
                    "merge",
                    Bound::Merge,
                    candidates * system.merge_ns_per_candidate * 1e-9
                        / f64::from(system.merge_threads),
                ),
            ],
            weights_j
                + pj(kv / 2.0 + rows, system.pnm_dram_pj_per_bit)
                + pj(link_bytes, system.link_pj_per_bit),
            gpu_power + modules * system.module_power_w,
            modules * system.module_price_usd,
            fits,
        );
        SystemAnswer {
            kv_cache_bytes: kv,
            weights_bytes: weights,
            hbm_bytes: system.hbm_bytes(),
            capacity_gap: (kv + weights) / system.hbm_bytes(),
            stream_all,
            tiered,
            pnm: pnm_serving,
        }
    }
}

/// One point of a scaling curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScalingPoint {
    pub modules: u32,
    pub batch: u64,
    pub tokens_per_s: f64,
    /// Throughput over `modules` x the first point's per-module throughput.
    pub efficiency: f64,
    pub bound: Bound,
    pub fits: bool,
}

/// Throughput with 1..=`max_modules` PNM modules. `fill` grows the batch
/// with the modules (as many sequences as their capacity holds: adding
/// modules adds capacity, the talk's case); otherwise the batch is fixed
/// and only points where the cache fits count.
pub fn scaling(
    question: &SystemQuestion,
    system: &SystemProfile,
    pnm: &HardwareProfile,
    max_modules: u32,
    fill: bool,
) -> Vec<ScalingPoint> {
    let per_sequence = SystemQuestion { batch: 1, ..question.clone() }.kv_cache_bytes();
    let mut points: Vec<ScalingPoint> = Vec::new();
    for modules in 1..=max_modules {
        let batch = if fill {
            ((f64::from(modules) * system.module_capacity_gb * 1e9 / per_sequence) as u64).max(1)
        } else {
            question.batch
        };
        let q = SystemQuestion { modules, batch, ..question.clone() };
        let a = q.answer(system, pnm);
        let base = points.iter().find(|p| p.fits).map(|p| p.tokens_per_s / f64::from(p.modules));
        points.push(ScalingPoint {
            modules,
            batch,
            tokens_per_s: a.pnm.tokens_per_s,
            efficiency: base
                .map_or(1.0, |per_module| a.pnm.tokens_per_s / (per_module * f64::from(modules))),
            bound: a.pnm.bound,
            fits: a.pnm.fits,
        });
    }
    points
}

/// The talk's example numbers, and the conditions under which they hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TalkCheck {
    pub model: &'static str,
    pub context: u64,
    /// The batch at which the KV cache is the talk's 6.4 TB.
    pub batch_for_6_4_tb: u64,
    pub kv_tb_at_that_batch: f64,
    /// The server's HBM (the talk: 1.1 TB).
    pub hbm_tb: f64,
    /// The GPUs' links, both directions (the talk: 1 TB/s).
    pub links_tb_per_s: f64,
    /// Decode steps per second at which reading that cache once per step
    /// takes the talk's ~12 TB/s.
    pub steps_per_s_for_12_tb_per_s: f64,
}

/// Solves the talk's numbers for `model` at `context` (bf16).
pub fn talk_check(model: &ModelShape, context: u64, system: &SystemProfile) -> TalkCheck {
    let per_sequence = (2 * model.layers * model.kv_heads * model.head_dim * 2 * context) as f64;
    let batch = (6.4e12 / per_sequence).round() as u64;
    let kv = per_sequence * batch as f64;
    TalkCheck {
        model: model.name,
        context,
        batch_for_6_4_tb: batch,
        kv_tb_at_that_batch: kv / 1e12,
        hbm_tb: system.hbm_bytes() / 1e12,
        links_tb_per_s: 2.0 * f64::from(system.gpus) * system.gpu_link_gb_per_s / 1e3,
        steps_per_s_for_12_tb_per_s: 12e12 / kv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timing::MODELS;

    fn question(batch: u64, modules: u32) -> SystemQuestion {
        SystemQuestion {
            model: MODELS[1].clone(),
            context: 131072,
            batch,
            elem_bytes: 2,
            k: 2048,
            modules,
        }
    }

    #[test]
    fn the_built_in_system_cites_every_number() {
        let system = SystemProfile::built_in();
        let value = toml::Value::try_from(&system).unwrap();
        for (field, _) in value.as_table().unwrap() {
            if field != "sources" && field != "name" && field != "description" {
                assert!(system.sources.get(field).is_some_and(|s| !s.is_empty()), "{field}");
            }
        }
        let bad = BUILT_IN_SYSTEM.replace("gpu_hbm_gb = 141.0", "gpu_hbm_gb = 0.0");
        assert!(matches!(SystemProfile::from_toml(&bad), Err(ProfileError::Invalid { .. })));
    }

    #[test]
    fn the_talks_numbers_hold_at_batch_150_of_llama_3_70b_at_128k() {
        let system = SystemProfile::built_in();
        let check = talk_check(&MODELS[1], 131072, &system);
        // 2 x 80 x 8 x 128 x 2 bytes = 327,680 bytes per token; x 128K =
        // 42.9 GB per sequence; 6.4 TB is about 149 sequences.
        assert_eq!(check.batch_for_6_4_tb, 149);
        assert!((check.hbm_tb - 1.128).abs() < 1e-9, "8 x 141 GB");
        assert!((check.links_tb_per_s - 1.008).abs() < 1e-9, "8 x 2 x 63 GB/s");
        assert!((check.steps_per_s_for_12_tb_per_s - 1.87).abs() < 0.01);
    }

    #[test]
    fn step_times_follow_the_arithmetic() {
        let system = SystemProfile::built_in();
        let pnm = HardwareProfile::named("cxl-pnm").unwrap();
        let a = question(16, 2).answer(&system, &pnm);
        let kv = 16.0 * 131072.0 * 327680.0;
        assert_eq!(a.kv_cache_bytes, kv);
        let weights_s = 70.6e9 * 2.0 / (8.0 * 4800e9);
        let links = 8.0 * 63e9;
        assert!((a.stream_all.step_ms - (weights_s + kv / links) * 1e3).abs() < 1e-9);
        // 687 GB: 987 GB of HBM minus 141 GB of weights holds it all.
        assert_eq!(a.tiered.link_bytes, 0.0);
        // PNM: keys (half the cache) over 2 modules at 1.1 TB/s each.
        // plus 2 commands per (sequence, layer, KV head) of 1 us over 8 units.
        let scan = kv / 2.0 / 2.0 / 1100e9 + 16.0 * 640.0 * 2.0 * 1e-6 / 8.0;
        assert!((a.pnm.phases_ms["pnm-scoring"] - scan * 1e3).abs() < 1e-6);
        assert!(a.pnm.fits, "2 x 512 GB hold 687 GB");
        assert!(!question(16, 1).answer(&system, &pnm).pnm.fits);
        assert!(a.pnm.link_bytes < a.stream_all.link_bytes / 50.0);
    }

    #[test]
    fn filled_modules_scale_near_linearly_until_something_else_bounds() {
        let system = SystemProfile::built_in();
        let pnm = HardwareProfile::named("cxl-pnm").unwrap();
        let points = scaling(&question(1, 1), &system, &pnm, 16, true);
        assert_eq!(points.len(), 16);
        // Near-linear at first (the weights read is amortized over a
        // growing batch, each module scans its own DRAM) ...
        assert!(points[1].tokens_per_s > 1.8 * points[0].tokens_per_s);
        assert!(points[3].efficiency > 0.75, "{:?}", points[3]);
        assert_eq!(points[3].bound, Bound::PnmDram);
        // ... until the host's merge of N x k candidates per stream, which
        // grows with modules and batch, bounds the step.
        assert_eq!(points[15].bound, Bound::Merge);
        assert!(points[15].efficiency < 0.5);
    }
}
