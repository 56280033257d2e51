//! The main job: an LLM KV cache in a cxl-pnm device, decoded with
//! near-memory Top-K.
//!
//! Starts an embedded device (or attaches to a running one), stores a KV
//! cache shaped like a real model's, then runs decode steps: each step
//! appends a token and, for every (layer, KV head), sends the GQA group's
//! queries to the device, which scores every key next to its DRAM and
//! returns only the Top-K tokens' K and V rows. The host then computes the
//! attention output from those rows and reports how close it is to full
//! attention and how many bytes crossed the link.

mod tiered_job;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use pnm_device::RunningDevice;
use pnm_host::{
    Device, DeviceSet, Dtype, KvShape, PageSelection, Query, Rows, Sequence, SetTopkRequest,
    ShardedSequence, TopK, TopkRequest,
};
use pnm_protocol::layout::parse_size;
use pnm_tools::accuracy::{ErrorTally, value_scale};
use pnm_tools::synthetic::{Rng, Stream};
use pnm_tools::tensorfile::{self, Tensor};
use serde::Serialize;

/// cxl-pnm demo: LLM decode with near-memory Top-K attention on an emulated CXL-PNM device.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Attach to a running pnm-device at this region path instead of
    /// starting an embedded one. Give it again for each device of a set.
    #[arg(long)]
    device: Vec<PathBuf>,
    /// Embedded devices to shard the KV cache across (pages round robin;
    /// each Top-K fans out to all of them and is merged exactly).
    #[arg(long, default_value_t = 1, conflicts_with = "device")]
    devices: usize,
    /// Real KV instead of the synthetic cache: a safetensors file with `k`
    /// and `v` shaped [layers, kv_heads, tokens, head_dim] and optionally
    /// `q` shaped [layers, kv_heads, group, head_dim].
    #[arg(long)]
    kv: Option<PathBuf>,
    /// Layers (synthetic cache).
    #[arg(long, default_value_t = 4)]
    layers: u16,
    /// KV heads per layer (Llama-3-8B: 8).
    #[arg(long, default_value_t = 8)]
    kv_heads: u16,
    /// Head dimension (Llama-3-8B: 128).
    #[arg(long, default_value_t = 128)]
    head_dim: u16,
    /// Context length in tokens.
    #[arg(long, default_value_t = 32768)]
    tokens: u64,
    /// Key/value element type.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
    /// Query heads per KV head (Llama-3-8B: 32 / 8 = 4).
    #[arg(long, default_value_t = 4)]
    group: u32,
    /// Tokens selected per (layer, KV head) each step.
    #[arg(short, long, default_value_t = 1024)]
    k: u32,
    /// Query-aware page selection: score at most this many tokens per
    /// (layer, KV head), keeping the first and the last two pages (default:
    /// every token, the exact Top-K).
    #[arg(long)]
    budget: Option<u32>,
    /// KV tiering: keep the newest W tokens (and --sinks) in host memory,
    /// evict the rest to the device(s); each step attends exactly over the
    /// host tokens plus the devices' Top-K rows under one softmax.
    #[arg(long, value_name = "W")]
    hot_window: Option<u64>,
    /// With --hot-window: leading tokens kept in host memory for good
    /// (attention sinks).
    #[arg(long, default_value_t = 4, requires = "hot_window")]
    sinks: u64,
    /// Decode steps; each appends one token first.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Seed of the synthetic cache and the queries: the same seed, the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Size of the embedded device's region (default: what the cache needs).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Keep the sequence on an attached device instead of freeing it.
    #[arg(long)]
    keep: bool,
    /// Print one JSON report instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F16,
    Bf16,
    F32,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::Bf16,
            DtypeArg::F32 => Dtype::F32,
        }
    }
}

fn encode(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        Dtype::F16 => out.extend(values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes())),
        Dtype::Bf16 => {
            out.extend(values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()))
        }
    }
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    Tensor { dtype, shape: vec![bytes.len() / dtype.size()], data: bytes.to_vec() }.to_f32()
}

/// One (layer, KV head) stream: its stored rows and, for synthetic caches,
/// its hidden structure.
struct KvStream {
    keys: Vec<u8>,
    values: Vec<u8>,
    structure: Option<Stream>,
    /// Queries from the KV file, if it had them.
    queries: Option<Vec<f32>>,
}

struct Cache {
    shape: KvShape,
    tokens: u64,
    streams: Vec<KvStream>,
    source: String,
}

fn synthetic_cache(args: &Args, rng: &mut Rng) -> Cache {
    let dtype = Dtype::from(args.dtype);
    let shape =
        KvShape { dtype, layers: args.layers, heads: args.kv_heads, head_dim: args.head_dim };
    let (d, t) = (usize::from(args.head_dim), args.tokens as usize);
    let bar = progress(u64::from(args.layers) * u64::from(args.kv_heads), "generating", args.json);
    let streams = (0..usize::from(args.layers) * usize::from(args.kv_heads))
        .map(|_| {
            let (mut keys, mut values) =
                (Vec::with_capacity(t * d * 2), Vec::with_capacity(t * d * 2));
            let structure = Stream::generate(rng, t, d, |key, value| {
                encode(dtype, key, &mut keys);
                encode(dtype, value, &mut values);
            });
            bar.inc(1);
            KvStream { keys, values, structure: Some(structure), queries: None }
        })
        .collect();
    bar.finish_and_clear();
    Cache { shape, tokens: args.tokens, streams, source: "synthetic".into() }
}

fn file_cache(path: &std::path::Path) -> anyhow::Result<Cache> {
    let mut tensors = tensorfile::read_safetensors(path)?;
    let mut take = |name: &str| {
        tensors.remove(name).with_context(|| format!("{} has no tensor '{name}'", path.display()))
    };
    let (k, v) = (take("k")?, take("v")?);
    let q = take("q").ok();
    let [layers, heads, tokens, d] = k.shape[..] else {
        bail!("k has shape {:?}; expected 4 dimensions", k.shape)
    };
    if v.shape != k.shape || v.dtype != k.dtype {
        bail!("v ({:?}) does not match k ({:?})", v.shape, k.shape);
    }
    let shape = KvShape {
        dtype: k.dtype,
        layers: layers.try_into()?,
        heads: heads.try_into()?,
        head_dim: d.try_into()?,
    };
    let row = shape.row_bytes() as usize;
    let q = match q {
        Some(q) if q.shape.len() == 4 && q.shape[..2] == [layers, heads] && q.shape[3] == d => {
            Some(q)
        }
        Some(q) => bail!("q has shape {:?}; expected [{layers}, {heads}, group, {d}]", q.shape),
        None => None,
    };
    let streams = (0..layers * heads)
        .map(|s| {
            let at = s * tokens * row..(s + 1) * tokens * row;
            let queries = q.as_ref().map(|q| {
                let g = q.shape[2];
                q.to_f32()[s * g * d..(s + 1) * g * d].to_vec()
            });
            KvStream {
                keys: k.data[at.clone()].to_vec(),
                values: v.data[at].to_vec(),
                structure: None,
                queries,
            }
        })
        .collect();
    Ok(Cache { shape, tokens: tokens as u64, streams, source: path.display().to_string() })
}

fn progress(total: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {percent:>3}% {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Softmax attention output of one query over the given rows.
fn attend(q: &[f32], keys: &[f32], values: &[f32], d: usize) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<f64> = keys
        .chunks_exact(d)
        .map(|k| q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale)
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0f64; d];
    for (w, v) in weights.iter().zip(values.chunks_exact(d)) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w / total * f64::from(x);
        }
    }
    out
}

/// Exact Top-K by the device's documented order (max over the group).
fn exact_topk(queries: &[f32], keys: &[f32], d: usize, k: usize) -> Vec<u32> {
    let mut scored: Vec<(f64, u32)> = keys
        .chunks_exact(d)
        .enumerate()
        .map(|(t, key)| {
            let best = queries
                .chunks_exact(d)
                .map(|q| q.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>())
                .fold(f64::NEG_INFINITY, f64::max);
            (best, t as u32)
        })
        .collect();
    let k = k.min(scored.len());
    scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored[..k].iter().map(|s| s.1).collect()
}

/// The next token's K and V for every stream (appended to the streams'
/// copies too), laid out for an append: `[layers][heads][1][head_dim]`.
fn next_token(
    streams: &mut [KvStream],
    rng: &mut Rng,
    shape: KvShape,
    t: usize,
) -> (Vec<u8>, Vec<u8>) {
    let (d, row) = (usize::from(shape.head_dim), shape.row_bytes() as usize);
    let (mut new_k, mut new_v) = (Vec::new(), Vec::new());
    let mut row_f = vec![0f32; d];
    for s in streams {
        match &s.structure {
            Some(structure) => structure.key(rng, t, t, false, &mut row_f),
            None => row_f.copy_from_slice(&decode(shape.dtype, &s.keys[s.keys.len() - row..])),
        }
        let at = new_k.len();
        encode(shape.dtype, &row_f, &mut new_k);
        s.keys.extend_from_slice(&new_k[at..]);
        row_f.iter_mut().for_each(|v| *v = rng.normal());
        let at = new_v.len();
        encode(shape.dtype, &row_f, &mut new_v);
        s.values.extend_from_slice(&new_v[at..]);
    }
    (new_k, new_v)
}

/// A decode step's GQA group of queries for one stream.
fn step_queries(s: &KvStream, rng: &mut Rng, shape: KvShape, group: u32) -> Vec<f32> {
    let (d, row) = (usize::from(shape.head_dim), shape.row_bytes() as usize);
    match (&s.structure, &s.queries) {
        (Some(structure), _) => {
            let mut q = vec![0f32; d * group as usize];
            q.chunks_exact_mut(d).for_each(|g| structure.query(rng, g));
            q
        }
        (None, Some(q)) => q.iter().map(|&x| x + 0.01 * rng.normal()).collect(),
        // No queries in the file: the newest key, slightly perturbed, per group member.
        (None, None) => {
            let last = decode(shape.dtype, &s.keys[s.keys.len() - row..]);
            (0..group)
                .flat_map(|_| last.iter().map(|&x| x + 0.1 * rng.normal()).collect::<Vec<_>>())
                .collect()
        }
    }
}

/// Mean of the steps' relative errors that exist (a step has none when
/// every full output was too small to divide by).
fn mean_rel<T>(steps: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let some: Vec<f64> = steps.iter().filter_map(f).collect();
    (!some.is_empty()).then(|| some.iter().sum::<f64>() / some.len() as f64)
}

/// A relative error for text: `n/a` where none could be measured.
fn rel_text(rel: Option<f64>) -> String {
    rel.map_or_else(|| "n/a".into(), |r| format!("{r:.4}"))
}

#[derive(Debug, Default, Serialize)]
struct StepReport {
    step: u32,
    context_tokens: u64,
    keys_read_fraction: f64,
    recall: f64,
    /// ||o_topk - o_full|| / rms ||v|| (pnm_tools::accuracy): meaningful
    /// also where the full output is near zero.
    attention_error: f64,
    /// ||o_topk - o_full|| / ||o_full|| over the queries whose full output
    /// is not near zero (None: none was).
    attention_rel_error: Option<f64>,
    link_bytes: u64,
    full_kv_bytes: u64,
    /// The step's Top-Ks as the host saw them: one batch on one device.
    step_ms: f64,
    /// Each command's device time, summed (commands overlap in a batch).
    device_ms: f64,
    /// The compute units' busy time over the step (Unit Busy registers):
    /// the kernels' own work, every share of a split Top-K counted.
    unit_busy_ms: f64,
    /// `unit_busy_ms` over the compute units: the least time the step's
    /// kernels could take on them; `step_ms` against it is the command
    /// path's and scheduling's cost.
    kernel_share_ms: f64,
    /// What the device's timing profile says its hardware would take for
    /// the step's commands, one after another.
    modelled_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    source: String,
    shape: KvShape,
    context_tokens: u64,
    group: u32,
    k: u32,
    device: String,
    devices: usize,
    load_seconds: f64,
    load_gb_per_s: f64,
    steps: Vec<StepReport>,
    mean_keys_read_fraction: f64,
    mean_recall: f64,
    mean_attention_error: f64,
    mean_attention_rel_error: Option<f64>,
    link_bytes_per_step: f64,
    full_kv_bytes_per_step: f64,
    link_reduction: f64,
    mean_step_ms: f64,
    mean_kernel_share_ms: f64,
    /// Step time over the kernels' share of the compute units.
    step_x_kernel_share: f64,
    mean_modelled_ms: f64,
}

/// Where the cache lives: one device, or a set sharding it across several.
enum Store {
    One { device: Box<Device>, seq: Sequence },
    Set { set: DeviceSet, seq: ShardedSequence },
}

impl Store {
    fn new(mut devices: Vec<Device>, shape: KvShape) -> anyhow::Result<Self> {
        Ok(if devices.len() == 1 {
            let device = Box::new(devices.pop().expect("one device"));
            let seq = device.kv_create(shape)?;
            Self::One { device, seq }
        } else {
            let set = DeviceSet::new(devices)?;
            let seq = set.kv_create(shape)?;
            Self::Set { set, seq }
        })
    }

    fn shape(&self) -> KvShape {
        match self {
            Self::One { seq, .. } => seq.shape,
            Self::Set { seq, .. } => seq.shape,
        }
    }

    fn tokens(&self) -> u64 {
        match self {
            Self::One { seq, .. } => seq.tokens,
            Self::Set { seq, .. } => seq.tokens,
        }
    }

    fn append(
        &mut self,
        keys: &[u8],
        values: &[u8],
        tokens: u64,
        progress: &mut dyn FnMut(u64),
    ) -> pnm_host::Result<()> {
        match self {
            Self::One { device, seq } => {
                *seq = device.kv_append(seq, keys, values, tokens, progress)?
            }
            Self::Set { set, seq } => {
                *seq = set.kv_append(seq, keys, values, tokens)?;
                progress(tokens);
            }
        }
        Ok(())
    }

    /// A decode step's Top-K of every (layer, KV head), `queries[i]` for
    /// stream i (layer-major): on one device every command in flight at
    /// once (one batch; the device runs them side by side on its compute
    /// units), on a set one fan-out after another. Each answer with its
    /// rows and its link bytes.
    fn topk_gather_step(
        &self,
        queries: &[Query],
        k: u32,
        selection: Option<PageSelection>,
    ) -> anyhow::Result<Vec<(TopK, Rows, u64)>> {
        let heads = usize::from(self.shape().heads);
        let stream = |i: usize| ((i / heads) as u16, (i % heads) as u16);
        match self {
            Self::One { device, seq } => {
                let requests: Vec<TopkRequest<'_>> = queries
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        let (layer, head) = stream(i);
                        TopkRequest { selection, ..TopkRequest::new(seq, layer, head, q, k) }
                    })
                    .collect();
                const COMMAND: u64 = 64 + 32; // a submission and a completion entry
                let row = seq.shape.row_bytes();
                device
                    .topk_gather_batch(&requests)?
                    .into_iter()
                    .zip(queries)
                    .map(|(answer, q)| {
                        let (top, rows) = answer?;
                        let n = top.indices.len() as u64;
                        Ok((top, rows, COMMAND + q.data.len() as u64 + 8 * n + 2 * n * row))
                    })
                    .collect()
            }
            Self::Set { .. } => queries
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let (layer, head) = stream(i);
                    let mut rows = Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
                    let (top, link) = self.topk_gather(layer, head, q, k, selection, &mut rows)?;
                    Ok((top, rows, link))
                })
                .collect(),
        }
    }

    fn devices(&self) -> Vec<&Device> {
        match self {
            Self::One { device, .. } => vec![device],
            Self::Set { set, .. } => set.devices().iter().collect(),
        }
    }

    /// The devices' compute units (Identify PNM, asked once).
    fn compute_units(&self) -> pnm_host::Result<u32> {
        self.devices().iter().map(|d| d.identify_pnm().map(|p| p.compute_units)).sum()
    }

    /// Nanoseconds the devices' compute units have spent running commands
    /// so far (their Unit Busy registers, read, summed).
    fn unit_busy_ns(&self) -> u64 {
        self.devices().iter().map(|d| d.status().unit_busy_ns).sum()
    }

    /// Top-K of one (layer, KV head) and its rows into `rows`, and the bytes
    /// that crossed the links for it (descriptors, completions, queries,
    /// results, rows). A set's answer counts the whole fan-out and merge in
    /// its times.
    fn topk_gather(
        &self,
        layer: u16,
        head: u16,
        query: &Query,
        k: u32,
        selection: Option<PageSelection>,
        rows: &mut Rows,
    ) -> anyhow::Result<(TopK, u64)> {
        const COMMAND: u64 = 64 + 32; // a submission and a completion entry
        let row = self.shape().row_bytes();
        match self {
            Self::One { device, seq } => {
                let request =
                    TopkRequest { selection, ..TopkRequest::new(seq, layer, head, query, k) };
                let top = device.topk_gather_into(&request, rows)?;
                let n = top.indices.len() as u64;
                Ok((top, COMMAND + query.data.len() as u64 + 8 * n + 2 * n * row))
            }
            Self::Set { set, seq } => {
                if selection.is_some() {
                    bail!("--budget (page selection) picks pages per device: use one device");
                }
                let (top, gathered) =
                    set.topk_gather(&SetTopkRequest::new(seq, layer, head, query, k))?;
                *rows = gathered;
                // Every device: the query in, its shard's k best (index and
                // score) out; then a GATHER of the selected rows from each
                // device holding some.
                let mut bytes: u64 = seq
                    .shards
                    .iter()
                    .filter(|s| s.tokens > 0)
                    .map(|s| COMMAND + query.data.len() as u64 + 8 * u64::from(k).min(s.tokens))
                    .sum();
                let mut holders = vec![false; seq.shards.len()];
                for &t in &top.top.indices {
                    holders[seq.striping.locate(u64::from(t)).0] = true;
                }
                let n = top.top.indices.len() as u64;
                bytes += holders.iter().filter(|&&h| h).count() as u64 * COMMAND;
                bytes += 4 * n + 2 * n * row;
                Ok((top.top, bytes))
            }
        }
    }

    fn free(&self) -> pnm_host::Result<()> {
        match self {
            Self::One { device, seq } => device.kv_free(seq.id),
            Self::Set { set, seq } => set.kv_free(seq),
        }
    }
}

/// Refuses a synthetic cache this machine cannot hold, before generating it:
/// K and V in host memory, and (embedded) the device region beside them.
fn check_memory(args: &Args) -> anyhow::Result<()> {
    let shape = KvShape {
        dtype: args.dtype.into(),
        layers: args.layers,
        heads: args.kv_heads,
        head_dim: args.head_dim,
    };
    let tokens = args.tokens + u64::from(args.steps);
    let host = shape.bytes(tokens) * 2;
    let region = if !args.device.is_empty() {
        0
    } else {
        args.size.unwrap_or_else(|| ((host as f64 * 1.1) as u64 + (192 << 20)).next_power_of_two())
    };
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
    });
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if let Some(available) = available
        && host + region > available
    {
        bail!(
            "the synthetic cache needs {:.1} GiB of K and V in host memory{}; this machine has \
             {:.1} GiB available: lower --tokens, --layers, --kv-heads or --head-dim",
            gib(host),
            if region > 0 {
                format!(" plus a {:.1} GiB embedded device region", gib(region))
            } else {
                String::new()
            },
            gib(available)
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    pnm_logging::init("warn");
    pnm_host::default_sigpipe();
    let args = Args::parse();
    if args.group == 0 || args.k == 0 || args.tokens == 0 || args.steps == 0 {
        bail!("--group, -k, --tokens and --steps must be at least 1");
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.budget.is_some() && args.hot_window.is_some() {
        bail!(
            "--budget (page selection) and --hot-window do not combine: tiering uses exact Top-K"
        );
    }
    if args.budget.is_some() && (args.devices > 1 || args.device.len() > 1) {
        bail!("--budget (page selection) picks pages per device: it needs a single device");
    }
    if args.kv.is_none() {
        if u64::from(args.k) > args.tokens {
            bail!(
                "-k {} is more than the {} tokens of the context: every token would be selected",
                args.k,
                args.tokens
            );
        }
        check_memory(&args)?;
    }
    let mut rng = Rng::new(args.seed);
    let cache = match &args.kv {
        Some(path) => file_cache(path)?,
        None => synthetic_cache(&args, &mut rng),
    };
    let shape = cache.shape;
    let d = usize::from(shape.head_dim);
    let row = shape.row_bytes();

    // The devices: embedded (memfds in this process) or attached.
    let total_tokens = cache.tokens + u64::from(args.steps);
    let attached = !args.device.is_empty();
    let count = if attached { args.device.len() } else { args.devices };
    let embedded = if attached {
        Vec::new()
    } else {
        let needed =
            (shape.bytes(total_tokens) * 2) as f64 * 1.1 / count as f64 + (192u64 << 20) as f64;
        let size = args.size.unwrap_or_else(|| (needed as u64).next_power_of_two());
        (0..count)
            .map(|_| RunningDevice::embedded(size, None).context("starting an embedded device"))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let devices = if attached {
        args.device.iter().map(Device::open).collect::<Result<Vec<_>, _>>()?
    } else {
        embedded
            .iter()
            .map(|d| {
                let options = pnm_host::DeviceOptions {
                    socket: d.socket().map(Into::into),
                    ..Default::default()
                };
                Device::open_with(&d.region().path, &options)
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let device_name = match (attached, count) {
        (true, _) => {
            args.device.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        }
        (false, 1) => "the embedded device".into(),
        (false, n) => format!("{n} embedded devices"),
    };
    if !args.json {
        for (i, device) in devices.iter().enumerate() {
            let (identify, health) = (device.identify()?, device.health_info()?);
            let pnm = device.identify_pnm()?;
            let name =
                if attached { device.path().display().to_string() } else { "embedded".into() };
            println!(
                "cxl-pnm device {i} ({name}): firmware {}, ABI {}, {} MiB device DRAM, \
                 {} compute units; health {}, media status {}, {} dirty shutdowns",
                identify.fw_revision,
                pnm.abi_version,
                pnm.dram_size >> 20,
                pnm.compute_units,
                if health.maintenance_needed || health.performance_degraded {
                    "attention"
                } else {
                    "normal"
                },
                health.media_status,
                health.dirty_shutdown_count,
            );
        }
    }
    if let Some(window) = args.hot_window {
        return tiered_job::run(&args, cache, devices, rng, device_name, window);
    }
    let mut store = Store::new(devices, shape)?;

    // Load: rows go straight into device DRAM frames.
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for s in &cache.streams {
        keys.extend_from_slice(&s.keys);
        values.extend_from_slice(&s.values);
    }
    let bar = progress(cache.tokens, "loading KV", args.json);
    let start = Instant::now();
    let loaded = store.append(&keys, &values, cache.tokens, &mut |done| bar.set_position(done));
    let load_seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    drop((keys, values));
    if let Err(e) = loaded {
        let _ = store.free();
        return Err(e).context("loading the KV cache into the device");
    }
    let mut streams = cache.streams;
    let load_bytes = shape.bytes(cache.tokens) * 2;

    let mut steps = Vec::new();
    let selection = args.budget.map(|budget_tokens| PageSelection {
        budget_tokens,
        sink_pages: 1,
        recent_pages: 2,
    });
    let units = store.compute_units()?;
    for step in 0..args.steps {
        // Decode appends the new token's K and V to every stream first.
        let (new_k, new_v) = next_token(&mut streams, &mut rng, shape, store.tokens() as usize);
        store.append(&new_k, &new_v, 1, &mut |_| {})?;

        let mut report = StepReport { step, context_tokens: store.tokens(), ..Default::default() };
        let mut recall_sum = 0.0;
        let mut errors = ErrorTally::default();
        // Every (layer, KV head) of the step at once: the queries first,
        // then one batch, timed with the units' busy time over it.
        let step_queries: Vec<Vec<f32>> =
            streams.iter().map(|s| step_queries(s, &mut rng, shape, args.group)).collect();
        let wire: Vec<Query> = step_queries.iter().map(|q| Query::f32(q, d)).collect();
        let busy_before = store.unit_busy_ns();
        let start = Instant::now();
        let answers = store.topk_gather_step(&wire, args.k, selection)?;
        report.step_ms = start.elapsed().as_secs_f64() * 1e3;
        let busy = store.unit_busy_ns().saturating_sub(busy_before);
        report.unit_busy_ms = busy as f64 / 1e6;
        report.kernel_share_ms = report.unit_busy_ms / f64::from(units.max(1));
        for (s, (queries, (top, rows, link_bytes))) in
            streams.iter().zip(step_queries.iter().zip(answers))
        {
            report.keys_read_fraction +=
                top.tokens_scored as f64 / top.tokens as f64 / streams.len() as f64;
            report.device_ms += top.device_ns as f64 / 1e6;
            report.modelled_ms += top.model_ns as f64 / 1e6;
            report.link_bytes += link_bytes;
            report.full_kv_bytes += 2 * store.tokens() * row;

            // Host side: what full attention would give, from all rows.
            let all_keys = decode(shape.dtype, &s.keys);
            let all_values = decode(shape.dtype, &s.values);
            let exact = exact_topk(queries, &all_keys, d, args.k as usize);
            let got: std::collections::HashSet<u32> = top.indices.iter().copied().collect();
            recall_sum +=
                exact.iter().filter(|i| got.contains(i)).count() as f64 / exact.len() as f64;
            let (sel_k, sel_v) =
                (decode(shape.dtype, &rows.keys), decode(shape.dtype, &rows.values));
            let scale = value_scale(&all_values, d);
            for q in queries.chunks_exact(d) {
                let full = attend(q, &all_keys, &all_values, d);
                errors.add(&full, &attend(q, &sel_k, &sel_v, d), scale);
            }
        }
        report.recall = recall_sum / streams.len() as f64;
        report.attention_error = errors.output_error();
        report.attention_rel_error = errors.rel_error();
        if !args.json {
            println!(
                "step {:>3}  ctx {:>7}  keys read {:>5.1}%  recall {:.4}  attn err {:.4} (rel {})  link {:>7.2} MiB vs {:>8.1} MiB full KV  {:>7.1} ms Top-K+gather (kernels' share of the units {:.1} ms, modelled {:.2} ms)",
                step,
                report.context_tokens,
                report.keys_read_fraction * 100.0,
                report.recall,
                report.attention_error,
                rel_text(report.attention_rel_error),
                report.link_bytes as f64 / (1 << 20) as f64,
                report.full_kv_bytes as f64 / (1 << 20) as f64,
                report.step_ms,
                report.kernel_share_ms,
                report.modelled_ms,
            );
        }
        steps.push(report);
    }

    let n = steps.len().max(1) as f64;
    let mean = |f: &dyn Fn(&StepReport) -> f64| steps.iter().map(f).sum::<f64>() / n;
    let report = Report {
        source: cache.source,
        shape,
        context_tokens: store.tokens(),
        devices: count,
        group: args.group,
        k: args.k,
        device: device_name,
        load_seconds,
        load_gb_per_s: load_bytes as f64 / load_seconds / 1e9,
        mean_keys_read_fraction: mean(&|s| s.keys_read_fraction),
        mean_recall: mean(&|s| s.recall),
        mean_attention_error: mean(&|s| s.attention_error),
        mean_attention_rel_error: mean_rel(&steps, |s| s.attention_rel_error),
        link_bytes_per_step: mean(&|s| s.link_bytes as f64),
        full_kv_bytes_per_step: mean(&|s| s.full_kv_bytes as f64),
        link_reduction: mean(&|s| s.full_kv_bytes as f64) / mean(&|s| s.link_bytes as f64).max(1.0),
        mean_step_ms: mean(&|s| s.step_ms),
        mean_kernel_share_ms: mean(&|s| s.kernel_share_ms),
        step_x_kernel_share: mean(&|s| s.step_ms) / mean(&|s| s.kernel_share_ms).max(1e-9),
        mean_modelled_ms: mean(&|s| s.modelled_ms),
        steps,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!();
        println!(
            "{} KV: {} layers x {} KV heads x {} dims, {}, {} tokens; GQA group {}, k = {} on {}",
            report.source,
            shape.layers,
            shape.heads,
            shape.head_dim,
            shape.dtype.name(),
            report.context_tokens,
            report.group,
            report.k,
            report.device
        );
        println!(
            "loaded {:.1} MiB of K+V in {:.2} s ({:.2} GB/s, rows stored straight into device DRAM; \
             a fresh region's first-touch page faults included)",
            load_bytes as f64 / (1 << 20) as f64,
            report.load_seconds,
            report.load_gb_per_s
        );
        println!(
            "keys the device scored      {:.1}%{}",
            report.mean_keys_read_fraction * 100.0,
            if args.budget.is_some() {
                " (page selection within --budget)"
            } else {
                " (exact Top-K)"
            }
        );
        println!("recall vs exact Top-K       {:.4}", report.mean_recall);
        println!(
            "attention output error      {:.4} of a value row's norm, relative {} \
             (vs full attention over every token)",
            report.mean_attention_error,
            rel_text(report.mean_attention_rel_error)
        );
        println!(
            "bytes over the link / step  {:.2} MiB vs {:.1} MiB to move the whole KV ({:.1}x less)",
            report.link_bytes_per_step / (1 << 20) as f64,
            report.full_kv_bytes_per_step / (1 << 20) as f64,
            report.link_reduction
        );
        println!(
            "time per decode step        {:.1} ms: its {} Top-K+gather as the host saw them{} \
             (the one-token append and the exact reference check between steps, full \
             attention over every token, are not counted)",
            report.mean_step_ms,
            streams.len(),
            if count == 1 { ", all in flight at once" } else { ", one fan-out after another" }
        );
        println!(
            "kernels' share of the units {:.1} ms per step: the compute units' busy time over \
             the step / their number; the step takes {:.2}x that",
            report.mean_kernel_share_ms, report.step_x_kernel_share
        );
        println!(
            "modelled hardware time      {:.3} ms per step (the device's timing profile; `pnmctl model` for what-ifs)",
            report.mean_modelled_ms
        );
    }
    if attached && !args.keep {
        store.free()?;
    }
    Ok(())
}
