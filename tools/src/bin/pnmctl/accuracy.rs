//! `pnmctl accuracy`: what Top-K attention costs on a KV cache, swept over
//! k and page-selection budgets (`pnm_tools::accuracy`).

use std::path::PathBuf;

use pnm_device::RunningDevice;
use pnm_host::{Device, KvShape};
use pnm_tools::accuracy::{self, Sweep, Synthetic, Workload};
use pnm_tools::tensorfile;

use crate::{Cli, CliError, DtypeArg, device_options, emit, usage};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SyntheticArg {
    /// Sinks, heavy hitters and recency: peaked attention, as in real models.
    Structured,
    /// N(0,1) keys, values and queries: diffuse attention, outputs near zero.
    Random,
}

/// `pnmctl accuracy`.
#[derive(Debug, clap::Args)]
pub struct AccuracyArgs {
    /// A KV cache of yours: a safetensors file with `k` and `v` [layers,
    /// kv_heads, tokens, head_dim] (F16, BF16, F32) and optionally `q`
    /// [layers, kv_heads, G, head_dim]. Without `q`, queries are the newest
    /// key with noise. Default: a synthetic cache (--synthetic).
    #[arg(long)]
    kv: Option<PathBuf>,
    /// Which synthetic cache, without --kv.
    #[arg(long, value_enum, default_value = "structured")]
    synthetic: SyntheticArg,
    /// Synthetic cache: layers.
    #[arg(long, default_value_t = 2)]
    layers: u16,
    /// Synthetic cache: KV heads per layer.
    #[arg(long, default_value_t = 4)]
    kv_heads: u16,
    /// Synthetic cache: dimensions per head.
    #[arg(long, default_value_t = 128)]
    head_dim: u16,
    /// Synthetic cache: tokens.
    #[arg(long, default_value_t = 32_768)]
    tokens: u64,
    /// Synthetic cache: element type.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
    /// Queries per KV head (GQA group), without `q` in the file.
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Query groups drawn per head (without `q` in the file).
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Values of k to sweep.
    #[arg(short, long, value_delimiter = ',', default_value = "16,64,256,1024,4096")]
    k: Vec<u32>,
    /// Page-selection budgets (tokens) to sweep beside exact Top-K; each
    /// runs every k up to it. `--budget` with no value: exact Top-K only.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "2048,8192")]
    budget: Vec<u32>,
    /// Page selection: first pages always scored.
    #[arg(long, default_value_t = 1)]
    sink_pages: u8,
    /// Page selection: last pages always scored.
    #[arg(long, default_value_t = 1)]
    recent_pages: u8,
    /// Seed of the synthetic cache and queries.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Show every (layer, head) under each configuration.
    #[arg(long)]
    per_head: bool,
    /// Write the charts (SVG, and PNG where a font is found) into DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Run on the device given by --device instead of an embedded one.
    #[arg(long)]
    attach: bool,
}

fn workload(args: &AccuracyArgs) -> Result<Workload, CliError> {
    let Some(path) = &args.kv else {
        let shape = KvShape {
            dtype: args.dtype.into(),
            layers: args.layers,
            heads: args.kv_heads,
            head_dim: args.head_dim,
        };
        let kind = match args.synthetic {
            SyntheticArg::Structured => Synthetic::Structured,
            SyntheticArg::Random => Synthetic::Random,
        };
        return Ok(Workload::synthetic(
            kind,
            shape,
            args.tokens,
            args.group,
            args.samples,
            args.seed,
        ));
    };
    let mut tensors = tensorfile::read_safetensors(path)?;
    let mut take = |name: &str| tensors.remove(name);
    let (Some(k), Some(v)) = (take("k"), take("v")) else {
        return Err(usage(format!("{} needs tensors `k` and `v`", path.display())));
    };
    let [layers, heads, tokens, d] = k.shape[..] else {
        return Err(usage(format!("k has shape {:?}; expected 4 dimensions", k.shape)));
    };
    if v.shape != k.shape || v.dtype != k.dtype {
        return Err(usage(format!("v ({:?}) does not match k ({:?})", v.shape, k.shape)));
    }
    let narrow = |n: usize, what: &str| {
        u16::try_from(n).map_err(|_| usage(format!("{what} {n} is beyond a device's limits")))
    };
    let shape = KvShape {
        dtype: k.dtype,
        layers: narrow(layers, "layers")?,
        heads: narrow(heads, "heads")?,
        head_dim: narrow(d, "head_dim")?,
    };
    let mut w = Workload {
        shape,
        tokens: tokens as u64,
        keys: k.data,
        values: v.data,
        queries: Vec::new(),
        group: 0,
        samples: 0,
        source: path.display().to_string(),
    };
    match take("q") {
        Some(q) if q.shape.len() == 4 && q.shape[..2] == [layers, heads] && q.shape[3] == d => {
            w.group = q.shape[2];
            w.samples = 1;
            w.queries = q.to_f32();
        }
        Some(q) => {
            return Err(usage(format!(
                "q has shape {:?}; expected [{layers}, {heads}, G, {d}]",
                q.shape
            )));
        }
        None => w.queries_from_keys(args.group, args.samples, args.seed),
    }
    Ok(w)
}

pub fn run(cli: &Cli, args: &AccuracyArgs) -> Result<(), CliError> {
    if args.k.is_empty() || args.k.contains(&0) {
        return Err(usage("-k takes values of at least 1"));
    }
    let w = workload(args)?;
    w.check().map_err(usage)?;
    let sweep = Sweep {
        ks: args.k.clone(),
        budgets: args.budget.clone(),
        sink_pages: args.sink_pages,
        recent_pages: args.recent_pages,
    };
    // An embedded device sized for the cache, unless --attach.
    let embedded = if args.attach {
        None
    } else {
        let size = ((w.shape.bytes(w.tokens) * 2) as f64 * 1.1) as u64 + (192 << 20);
        Some(
            RunningDevice::embedded(size.next_power_of_two(), None)
                .map_err(|e| usage(format!("starting an embedded device: {e}")))?,
        )
    };
    let device = match &embedded {
        Some(running) => Device::open_with(
            &running.region().path,
            &pnm_host::DeviceOptions {
                socket: running.socket().map(Into::into),
                ..device_options(cli)
            },
        )?,
        None => Device::open_with(&cli.device, &device_options(cli))?,
    };
    let report = accuracy::run(&device, &w, &sweep, &mut |done, total| {
        tracing::info!(done, total, "accuracy: streams measured");
    })
    .map_err(usage)?;
    drop(device);
    let mut value = serde_json::to_value(&report).expect("plain data serializes");
    let mut text = report.to_text(args.per_head);
    if let Some(dir) = &args.plot {
        let (written, note) = pnm_tools::plot::write_all(dir, &report.charts()).map_err(usage)?;
        value["charts"] = serde_json::json!(written);
        text += &format!(
            "wrote {}\n",
            written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        if let Some(note) = note {
            text += &format!("note: {note}\n");
        }
    }
    emit(cli.json, &value, |_| text);
    Ok(())
}
