//! The accuracy report: what Top-K attention costs on a KV cache, for a
//! sweep of k and of page-selection budgets, measured through a device.
//!
//! For every (layer, KV head), every query sample and every configuration
//! the device answers the Top-K (exact, or scoring only the pages a budget
//! picks); the host computes full attention in f64 from the same stored
//! rows and compares:
//!
//! - **recall**: the share of the exact Top-K (the group's max score, f64)
//!   the device returned;
//! - **attention mass**: the share of full attention's softmax weight that
//!   falls on the returned tokens (mean over the group's queries): what
//!   Top-K attention keeps, whatever the values are;
//! - **output error**: `||o_topk - o_full|| / rms_t ||v_t||`, the error of
//!   the attention output (softmax over the returned tokens only) in units
//!   of a typical value row. Unlike the relative error it means the same
//!   thing when the output itself is near zero: with random values and
//!   diffuse attention, `o_full` averages many random rows towards 0 and
//!   the relative error explodes (3.42 at recall 1.0 on random KV) although
//!   the answer is as close as on any other cache;
//! - **relative output error** `||o_topk - o_full|| / ||o_full||`, the
//!   usual measure, averaged only where `||o_full|| >= 0.1 rms ||v||`; the
//!   share of queries below that is reported as `ill_conditioned`;
//! - **keys read**: tokens scored over tokens stored (1 for exact Top-K).

use pnm_host::{Device, Dtype, KvShape, PageSelection, Query, TopkRequest};
use serde::Serialize;

use crate::plot::{Chart, Series};
use crate::synthetic::{Rng, Stream};

/// Where `||o_full||` is too small for a relative error, as a share of the
/// value rows' RMS norm.
pub const ILL_CONDITIONED_BELOW: f64 = 0.1;

/// A KV cache and the queries to ask of it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// How the device stores the rows.
    pub shape: KvShape,
    pub tokens: u64,
    /// K and V rows, `[layers][heads][tokens][head_dim]` in `shape.dtype`.
    pub keys: Vec<u8>,
    pub values: Vec<u8>,
    /// Queries, f32 `[layers][heads][samples][group][head_dim]`.
    pub queries: Vec<f32>,
    pub group: usize,
    pub samples: usize,
    /// What the cache is (a file, or which synthetic kind).
    pub source: String,
}

/// Which synthetic cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synthetic {
    /// Sinks, heavy hitters and recent-token locality (`crate::synthetic`),
    /// queries leaning on the same directions: peaked attention, as in
    /// real models.
    Structured,
    /// N(0, 1) keys, values and queries: diffuse attention, outputs near
    /// zero (the case the relative error cannot measure).
    Random,
}

/// The configurations to sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub ks: Vec<u32>,
    /// Page-selection budgets in tokens (each paired with every k up to it);
    /// exact Top-K is always measured.
    pub budgets: Vec<u32>,
    pub sink_pages: u8,
    pub recent_pages: u8,
}

/// What the measures mean, carried in every report.
#[derive(Debug, Clone, Serialize)]
pub struct Measures {
    pub recall: &'static str,
    pub attention_mass: &'static str,
    pub output_error: &'static str,
    pub output_rel_error: &'static str,
    pub keys_read: &'static str,
}

const MEASURES: Measures = Measures {
    recall: "share of the exact Top-K (the group's max score, f64 on the host) the device returned",
    attention_mass: "share of full attention's softmax weight on the returned tokens (mean over the group)",
    output_error: "||o_topk - o_full|| / rms_t ||v_t||: the attention output's error in units of a \
                   typical value row; meaningful where o_full is near zero",
    output_rel_error: "||o_topk - o_full|| / ||o_full||, over queries with ||o_full|| >= 0.1 rms ||v|| \
                       only (the others are counted in ill_conditioned)",
    keys_read: "tokens the device scored / tokens stored",
};

/// One configuration's figures (a head's, or the mean over heads).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    pub recall: f64,
    pub attention_mass: f64,
    pub output_error: f64,
    /// None when every query was ill-conditioned.
    pub output_rel_error: Option<f64>,
    /// Share of queries whose full output is too small for a relative error.
    pub ill_conditioned: f64,
    pub keys_read: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadMetrics {
    pub layer: u16,
    pub head: u16,
    #[serde(flatten)]
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub k: u32,
    /// Page-selection budget (None: exact Top-K over every token).
    pub budget: Option<u32>,
    pub overall: Metrics,
    pub heads: Vec<HeadMetrics>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source: String,
    pub dtype: &'static str,
    pub layers: u16,
    pub kv_heads: u16,
    pub head_dim: u16,
    pub tokens: u64,
    pub group: usize,
    pub samples: usize,
    pub measures: Measures,
    pub configs: Vec<ConfigReport>,
}

impl Workload {
    /// A synthetic cache of `kind`, `samples` query groups per head.
    pub fn synthetic(
        kind: Synthetic,
        shape: KvShape,
        tokens: u64,
        group: usize,
        samples: usize,
        seed: u64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let (d, t) = (usize::from(shape.head_dim), tokens as usize);
        let streams = usize::from(shape.layers) * usize::from(shape.heads);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut queries = Vec::with_capacity(streams * samples * group * d);
        for _ in 0..streams {
            match kind {
                Synthetic::Structured => {
                    let stream = Stream::generate(&mut rng, t, d, |k, v| {
                        encode(shape.dtype, k, &mut keys);
                        encode(shape.dtype, v, &mut values);
                    });
                    let mut q = vec![0f32; d];
                    for _ in 0..samples * group {
                        stream.query(&mut rng, &mut q);
                        queries.extend_from_slice(&q);
                    }
                }
                Synthetic::Random => {
                    let mut row = vec![0f32; d];
                    for out in [&mut keys, &mut values] {
                        for _ in 0..t {
                            row.iter_mut().for_each(|x| *x = rng.normal());
                            encode(shape.dtype, &row, out);
                        }
                    }
                    queries.extend((0..samples * group * d).map(|_| rng.normal()));
                }
            }
        }
        let source = match kind {
            Synthetic::Structured => "synthetic, structured (sinks, heavy hitters, recency)",
            Synthetic::Random => "synthetic, random (N(0,1) keys, values, queries)",
        };
        Self { shape, tokens, keys, values, queries, group, samples, source: source.into() }
    }

    /// Queries for a cache that came without them: per head and sample, the
    /// newest key with N(0, 0.1^2) noise per element, per query of the
    /// group (a decode step's query resembles the newest token's key).
    pub fn queries_from_keys(&mut self, group: usize, samples: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let t = self.tokens as usize;
        let streams = usize::from(self.shape.layers) * usize::from(self.shape.heads);
        let row = self.shape.row_bytes() as usize;
        self.queries.clear();
        self.group = group;
        self.samples = samples;
        // No tokens, or fewer bytes than the shape says: `check` refuses it.
        if t == 0 || self.keys.len() < streams * t * row {
            return;
        }
        for s in 0..streams {
            let at = (s * t + t - 1) * row;
            let newest = decode(self.shape.dtype, &self.keys[at..at + row]);
            for _ in 0..samples * group {
                self.queries.extend(newest.iter().map(|&x| x + 0.1 * rng.normal()));
            }
        }
    }

    /// Checks the arrays agree with the shape.
    pub fn check(&self) -> Result<(), String> {
        let streams = usize::from(self.shape.layers) * usize::from(self.shape.heads);
        let rows = self.shape.bytes(self.tokens) as usize;
        let queries = streams * self.samples * self.group * usize::from(self.shape.head_dim);
        if self.tokens == 0 || self.group == 0 || self.samples == 0 {
            return Err("an accuracy report needs tokens, and at least one query".into());
        }
        if self.keys.len() != rows || self.values.len() != rows {
            return Err(format!(
                "{} tokens of {} need {rows} bytes each of K and V; got {} and {}",
                self.tokens,
                self.shape,
                self.keys.len(),
                self.values.len()
            ));
        }
        if self.queries.len() != queries {
            return Err(format!(
                "{} query elements; expected {queries} ({streams} streams x {} samples x {} queries x {})",
                self.queries.len(),
                self.samples,
                self.group,
                self.shape.head_dim
            ));
        }
        Ok(())
    }
}

/// Appends `row` to `out` in `dtype`, little-endian (bf16 rounded to
/// nearest even, as the tools store it).
pub fn encode(dtype: Dtype, row: &[f32], out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => row.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Dtype::F16 => {
            row.iter().for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()))
        }
        Dtype::Bf16 => {
            row.iter().for_each(|&x| out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()))
        }
    }
}

/// Elements of `dtype` as f32.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Full attention of one query, kept for comparing any subset against it.
struct Reference {
    /// Softmax weights over every token.
    weights: Vec<f64>,
    output: Vec<f64>,
}

fn reference(q: &[f32], keys: &[f32], values: &[f32], d: usize) -> Reference {
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<f64> = keys.chunks_exact(d).map(|k| dot(q, k) * scale).collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter_mut().for_each(|w| *w /= total);
    let mut output = vec![0f64; d];
    for (w, v) in weights.iter().zip(values.chunks_exact(d)) {
        output.iter_mut().zip(v).for_each(|(o, &x)| *o += w * f64::from(x));
    }
    Reference { weights, output }
}

/// The RMS norm of `d`-element value rows: the scale output errors are
/// measured in.
pub fn value_scale(values: &[f32], d: usize) -> f64 {
    let rows = (values.len() / d.max(1)).max(1) as f64;
    (values.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / rows).sqrt().max(f64::MIN_POSITIVE)
}

/// Attention outputs compared with full attention's, both measures at once
/// (the module docs say which is which).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ErrorTally {
    queries: f64,
    vs_value_scale: f64,
    relative: f64,
    well_conditioned: f64,
}

impl ErrorTally {
    /// Adds one query's output `got` against full attention's `full`, with
    /// the value rows' RMS norm `value_scale`.
    pub fn add(&mut self, full: &[f64], got: &[f64], value_scale: f64) {
        let diff: Vec<f64> = got.iter().zip(full).map(|(a, b)| a - b).collect();
        let (err, reference) = (norm(&diff), norm(full));
        self.queries += 1.0;
        self.vs_value_scale += err / value_scale;
        if reference >= ILL_CONDITIONED_BELOW * value_scale {
            self.well_conditioned += 1.0;
            self.relative += err / reference;
        }
    }

    /// Mean `||o - o_full|| / rms ||v||`.
    pub fn output_error(&self) -> f64 {
        self.vs_value_scale / self.queries.max(1.0)
    }

    /// Mean relative error over the well-conditioned queries (None: none was).
    pub fn rel_error(&self) -> Option<f64> {
        (self.well_conditioned > 0.0).then(|| self.relative / self.well_conditioned)
    }

    /// Share of queries whose full output is too small for a relative error.
    pub fn ill_conditioned(&self) -> f64 {
        if self.queries == 0.0 { 0.0 } else { 1.0 - self.well_conditioned / self.queries }
    }

    pub fn merge(&mut self, other: &Self) {
        self.queries += other.queries;
        self.vs_value_scale += other.vs_value_scale;
        self.relative += other.relative;
        self.well_conditioned += other.well_conditioned;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Sums of one head's per-query figures, for means.
#[derive(Debug, Default, Clone)]
struct Totals {
    queries: f64,
    groups: f64,
    recall: f64,
    mass: f64,
    errors: ErrorTally,
    keys_read: f64,
}

impl Totals {
    fn metrics(&self) -> Metrics {
        Metrics {
            recall: self.recall / self.groups,
            attention_mass: self.mass / self.queries,
            output_error: self.errors.output_error(),
            output_rel_error: self.errors.rel_error(),
            ill_conditioned: self.errors.ill_conditioned(),
            keys_read: self.keys_read / self.groups,
        }
    }

    fn add(&mut self, other: &Self) {
        self.queries += other.queries;
        self.groups += other.groups;
        self.recall += other.recall;
        self.mass += other.mass;
        self.errors.merge(&other.errors);
        self.keys_read += other.keys_read;
    }
}

/// Runs the sweep on `device` (the cache is loaded into a sequence of its
/// own and freed afterwards). `progress` is told (streams done, streams).
pub fn run(
    device: &Device,
    workload: &Workload,
    sweep: &Sweep,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, String> {
    workload.check()?;
    let shape = workload.shape;
    let seq = device.kv_create(shape).map_err(|e| e.to_string())?;
    let loaded = device
        .kv_append(&seq, &workload.keys, &workload.values, workload.tokens, &mut |_| {})
        .map_err(|e| e.to_string());
    let result = loaded.and_then(|seq| measure(device, &seq, workload, sweep, progress));
    if let Err(e) = device.kv_free(seq.id) {
        tracing::warn!(error = %e, "could not free the accuracy report's sequence");
    }
    result
}

fn configs(sweep: &Sweep) -> Vec<(u32, Option<u32>)> {
    let mut configs: Vec<(u32, Option<u32>)> = sweep.ks.iter().map(|&k| (k, None)).collect();
    for &budget in &sweep.budgets {
        configs.extend(sweep.ks.iter().filter(|&&k| k <= budget).map(|&k| (k, Some(budget))));
    }
    configs
}

fn measure(
    device: &Device,
    seq: &pnm_host::Sequence,
    w: &Workload,
    sweep: &Sweep,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report, String> {
    let shape = w.shape;
    let (d, t) = (usize::from(shape.head_dim), w.tokens as usize);
    let row = shape.row_bytes() as usize;
    let configs = configs(sweep);
    let streams = usize::from(shape.layers) * usize::from(shape.heads);
    let mut per_head: Vec<Vec<HeadMetrics>> = vec![Vec::new(); configs.len()];
    let mut overall: Vec<Totals> = vec![Totals::default(); configs.len()];
    for s in 0..streams {
        let (layer, head) =
            ((s / usize::from(shape.heads)) as u16, (s % usize::from(shape.heads)) as u16);
        let keys = decode(shape.dtype, &w.keys[s * t * row..(s + 1) * t * row]);
        let values = decode(shape.dtype, &w.values[s * t * row..(s + 1) * t * row]);
        let value_scale = value_scale(&values, d);
        let mut totals = vec![Totals::default(); configs.len()];
        for sample in 0..w.samples {
            let at = ((s * w.samples + sample) * w.group) * d;
            let group_queries = &w.queries[at..at + w.group * d];
            let refs: Vec<Reference> =
                group_queries.chunks_exact(d).map(|q| reference(q, &keys, &values, d)).collect();
            // The exact ranking: the group's max score, best first, ties
            // to the lower index (the device's order).
            let scores: Vec<f64> = keys
                .chunks_exact(d)
                .map(|k| {
                    group_queries
                        .chunks_exact(d)
                        .map(|q| dot(q, k))
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect();
            let mut ranking: Vec<u32> = (0..t as u32).collect();
            ranking.sort_by(|&a, &b| {
                scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b))
            });
            let query = Query::f32(group_queries, d);
            for (c, &(k, budget)) in configs.iter().enumerate() {
                let mut request = TopkRequest::new(seq, layer, head, &query, k);
                if let Some(budget_tokens) = budget {
                    request = request.with_selection(PageSelection {
                        budget_tokens,
                        sink_pages: sweep.sink_pages,
                        recent_pages: sweep.recent_pages,
                    });
                }
                let top = device.topk(&request).map_err(|e| e.to_string())?;
                let exact_k = (k as usize).min(t);
                let mut in_exact = vec![false; t];
                ranking[..exact_k].iter().for_each(|&i| in_exact[i as usize] = true);
                let hits = top.indices.iter().filter(|&&i| in_exact[i as usize]).count();
                let tally = &mut totals[c];
                tally.groups += 1.0;
                tally.recall += hits as f64 / exact_k as f64;
                tally.keys_read += top.tokens_scored as f64 / t as f64;
                for r in &refs {
                    let mass: f64 = top.indices.iter().map(|&i| r.weights[i as usize]).sum();
                    let mut out = vec![0f64; d];
                    for &i in &top.indices {
                        let wgt = r.weights[i as usize] / mass.max(f64::MIN_POSITIVE);
                        let v = &values[i as usize * d..(i as usize + 1) * d];
                        out.iter_mut().zip(v).for_each(|(o, &x)| *o += wgt * f64::from(x));
                    }
                    tally.queries += 1.0;
                    tally.mass += mass;
                    tally.errors.add(&r.output, &out, value_scale);
                }
            }
        }
        for (c, tally) in totals.iter().enumerate() {
            per_head[c].push(HeadMetrics { layer, head, metrics: tally.metrics() });
            overall[c].add(tally);
        }
        progress(s + 1, streams);
    }
    Ok(Report {
        source: w.source.clone(),
        dtype: shape.dtype.name(),
        layers: shape.layers,
        kv_heads: shape.heads,
        head_dim: shape.head_dim,
        tokens: w.tokens,
        group: w.group,
        samples: w.samples,
        measures: MEASURES,
        configs: configs
            .iter()
            .zip(per_head)
            .zip(&overall)
            .map(|((&(k, budget), heads), total)| ConfigReport {
                k,
                budget,
                overall: total.metrics(),
                heads,
            })
            .collect(),
    })
}

impl Report {
    /// The report as a table: one line per configuration (and, with
    /// `per_head`, one per head under it).
    pub fn to_text(&self, per_head: bool) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "accuracy of Top-K attention: {} ({} layers x {} KV heads x {} dims of {}, {} tokens), \
             {} sample(s) of {} queries per head",
            self.source,
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.tokens,
            self.samples,
            self.group
        );
        let _ = writeln!(
            s,
            "{:>6} {:>14} {:>8} {:>8} {:>12} {:>12} {:>9}",
            "k", "selection", "recall", "mass", "out err/|v|", "rel err", "keys read"
        );
        let line = |s: &mut String, label: String, m: &Metrics| {
            let rel = match m.output_rel_error {
                Some(r) if m.ill_conditioned > 0.0 => {
                    format!("{r:.4}*")
                }
                Some(r) => format!("{r:.4}"),
                None => "n/a*".into(),
            };
            let _ = writeln!(
                s,
                "{label} {:>8.4} {:>8.4} {:>12.4} {:>12} {:>9.3}",
                m.recall, m.attention_mass, m.output_error, rel, m.keys_read
            );
        };
        for c in &self.configs {
            let selection = match c.budget {
                None => "exact".to_string(),
                Some(b) => format!("budget {b}"),
            };
            line(&mut s, format!("{:>6} {:>14}", c.k, selection), &c.overall);
            if per_head {
                for h in &c.heads {
                    line(
                        &mut s,
                        format!("{:>6} {:>14}", "", format!("L{} H{}", h.layer, h.head)),
                        &h.metrics,
                    );
                }
            }
        }
        if self.configs.iter().any(|c| c.overall.ill_conditioned > 0.0) {
            let _ = writeln!(
                s,
                "* rel err over the queries whose full output is at least {ILL_CONDITIONED_BELOW} of the \
                 value rows' RMS norm only (ill-conditioned share: {:.0}%); out err/|v| measures all",
                100.0 * self.configs[0].overall.ill_conditioned
            );
        }
        s
    }

    /// Charts of the sweep: recall, attention mass, output error and keys
    /// read against k, one line for exact Top-K and one per budget.
    pub fn charts(&self) -> Vec<Chart> {
        let mut selections: Vec<Option<u32>> = Vec::new();
        for c in &self.configs {
            if !selections.contains(&c.budget) {
                selections.push(c.budget);
            }
        }
        let series = |value: &dyn Fn(&Metrics) -> Option<f64>| -> Vec<Series> {
            selections
                .iter()
                .map(|&budget| Series {
                    name: match budget {
                        None => "exact Top-K".into(),
                        Some(b) => format!("page selection, budget {b}"),
                    },
                    points: self
                        .configs
                        .iter()
                        .filter(|c| c.budget == budget)
                        .filter_map(|c| value(&c.overall).map(|v| (f64::from(c.k), v)))
                        .collect(),
                    measured: false,
                })
                .collect()
        };
        let title = |what: &str| {
            format!(
                "{what} ({} tokens, {} KV heads x {} layers, {})",
                self.tokens, self.kv_heads, self.layers, self.dtype
            )
        };
        let chart = |file,
                     what: &str,
                     y: &str,
                     log_y,
                     lower_right,
                     value: &dyn Fn(&Metrics) -> Option<f64>| Chart {
            file,
            title: title(what),
            x_label: "k (tokens returned per KV head)".into(),
            y_label: y.into(),
            log_x: true,
            log_y,
            legend_lower_right: lower_right,
            series: series(value),
        };
        vec![
            chart("accuracy_recall", "Recall of exact Top-K", "recall", false, true, &|m| {
                Some(m.recall)
            }),
            chart(
                "accuracy_mass",
                "Attention mass captured",
                "share of softmax weight",
                false,
                true,
                &|m| Some(m.attention_mass),
            ),
            chart(
                "accuracy_error",
                "Attention output error",
                "||o_topk - o_full|| / rms ||v||",
                true,
                false,
                &|m| (m.output_error > 0.0).then_some(m.output_error),
            ),
            chart(
                "accuracy_keys_read",
                "Keys read by the device",
                "tokens scored / tokens",
                false,
                false,
                &|m| Some(m.keys_read),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnm_device::RunningDevice;

    fn device() -> (RunningDevice, Device) {
        let running = RunningDevice::embedded(128 << 20, None).unwrap();
        let options = pnm_host::DeviceOptions {
            socket: running.socket().map(Into::into),
            ..Default::default()
        };
        let device = Device::open_with(&running.region().path, &options).unwrap();
        (running, device)
    }

    #[test]
    fn a_near_zero_reference_is_ill_conditioned_not_a_huge_relative_error() {
        let mut tally = ErrorTally::default();
        // Full output 0.01 against value rows of norm 1: the relative error
        // would be 10; the error in value-row units is 0.1.
        tally.add(&[0.01, 0.0], &[0.11, 0.0], 1.0);
        assert_eq!(tally.rel_error(), None);
        assert_eq!(tally.ill_conditioned(), 1.0);
        assert!((tally.output_error() - 0.1).abs() < 1e-12);
        tally.add(&[1.0, 0.0], &[1.0, 0.5], 1.0);
        assert_eq!(tally.rel_error(), Some(0.5));
        assert_eq!(tally.ill_conditioned(), 0.5);
        assert!((tally.output_error() - 0.3).abs() < 1e-12);
    }

    #[test]
    fn k_covering_every_token_is_full_attention_and_smaller_k_costs_mass() {
        let (_running, device) = device();
        let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 64 };
        let w = Workload::synthetic(Synthetic::Structured, shape, 3000, 4, 2, 7);
        let sweep =
            Sweep { ks: vec![8, 3000], budgets: vec![1024], sink_pages: 1, recent_pages: 1 };
        let report = run(&device, &w, &sweep, &mut |_, _| {}).unwrap();
        let config =
            |k, budget| report.configs.iter().find(|c| c.k == k && c.budget == budget).unwrap();
        let all = &config(3000, None).overall;
        assert_eq!(all.recall, 1.0);
        assert!((all.attention_mass - 1.0).abs() < 1e-9 && all.output_error < 1e-9, "{all:?}");
        assert_eq!(all.keys_read, 1.0);
        let few = &config(8, None).overall;
        assert_eq!(few.recall, 1.0);
        assert!(few.attention_mass < all.attention_mass && few.output_error > all.output_error);
        let selected = &config(8, Some(1024)).overall;
        assert!(selected.keys_read < 1.0, "{selected:?}");
        assert_eq!(report.configs[0].heads.len(), 2);
        let charts = report.charts();
        assert_eq!(charts.len(), 4);
        assert_eq!(charts[0].series.len(), 2, "exact and one budget");
    }

    #[test]
    fn random_kv_reports_the_robust_error_where_the_relative_one_is_meaningless() {
        let (_running, device) = device();
        let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 64 };
        let w = Workload::synthetic(Synthetic::Random, shape, 4000, 2, 2, 3);
        let sweep = Sweep { ks: vec![4000, 64], budgets: vec![], sink_pages: 1, recent_pages: 1 };
        let report = run(&device, &w, &sweep, &mut |_, _| {}).unwrap();
        let small = &report.configs[1].overall;
        assert_eq!(small.recall, 1.0);
        assert_eq!(small.ill_conditioned, 1.0, "diffuse attention over random values");
        assert_eq!(small.output_rel_error, None);
        assert!(small.output_error > 0.01 && small.output_error < 1.0, "{small:?}");
    }
}
