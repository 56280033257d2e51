//! `pnmctl`: talk to a cxl-pnm device from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod accuracy;
mod command_bench;
mod datapath_bench;
mod drill;
mod kernel_bench;
mod media;
mod model;
mod set;
mod set_bench;

use clap::{Parser, Subcommand};
use pnm_host::{Aggregation, Device, DeviceOptions, Error, KvShape, Query, Sequence};
use pnm_protocol::events::InterruptMode;
use pnm_tools::tensorfile::{self, Tensor};
use serde::Serialize;

/// Control a cxl-pnm device.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The device's region file.
    #[arg(long, default_value = "/dev/shm/cxl-pnm0", help_heading = "Device")]
    device: PathBuf,
    /// Mailbox command timeout in milliseconds.
    #[arg(long, default_value_t = 2000, help_heading = "Device")]
    timeout_ms: u64,
    /// Queue command timeout in milliseconds (Top-K, gather, KV commands).
    #[arg(long, default_value_t = 10_000, help_heading = "Device")]
    command_timeout_ms: u64,
    /// Wait up to this many milliseconds for the device to become ready.
    #[arg(long, default_value_t = 0, help_heading = "Device")]
    wait_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Identify Memory Device (4000h).
    Identify,
    /// Get Health Info (4200h).
    Health,
    /// The event logs: Get Event Records (0100h) from each log, oldest
    /// first; with --clear, Clear Event Records (0101h) of what was shown.
    Events(EventsArgs),
    /// Fault injection, on a device started with --allow-injection.
    Inject {
        #[command(subcommand)]
        action: InjectAction,
    },
    /// The poison list (4300h-4302h): list it (per sequence rows, too) and
    /// clear lines.
    Poison {
        #[command(subcommand)]
        action: media::PoisonAction,
    },
    /// Scan Media (4303h-4305h): check device DRAM for poisoned and
    /// corrupted lines, as a background command; what it finds goes on
    /// the poison list.
    ScanMedia(media::ScanArgs),
    /// Get or set the device timestamp (0300h / 0301h).
    Timestamp {
        #[command(subcommand)]
        action: Option<TimestampAction>,
    },
    /// The Command Effects Log: every command the device supports (0400h / 0401h).
    Logs,
    /// Identify PNM (C000h): region layout, compute units, firmware limits.
    PnmInfo,
    /// The device's state, also on a region nobody serves: running (exit
    /// 0), stopped in order (2), dead, i.e. gone without an orderly stop
    /// (3), or hung (4); then readiness, heartbeat, pid, counters.
    Status,
    /// Reset the device (mailbox and volatile state; device DRAM is kept).
    Reset,
    /// The KV store: load, list and free sequences.
    Kv {
        #[command(subcommand)]
        action: KvAction,
    },
    /// Top-K tokens of one (sequence, layer, KV head) for a query or GQA group.
    Topk(TopkArgs),
    /// What-if answers from the timing model's hardware profiles: KV cache
    /// size, and per decode step the link bytes and modelled time with and
    /// without near-memory Top-K. Needs no device.
    Model(ModelArgs),
    /// The accuracy report: recall of exact Top-K, attention mass captured,
    /// attention output error and keys read, per head and overall, over a
    /// sweep of k and page-selection budgets, on a synthetic cache or yours
    /// (--kv). Runs on an embedded device unless --attach.
    Accuracy(accuracy::AccuracyArgs),
    /// Benchmarks, each reporting this machine's memory read roofline
    /// measured in the same run (JSON): the command path, the kernel, the
    /// data path.
    Bench {
        #[command(subcommand)]
        action: BenchAction,
    },
    /// The K and V rows of chosen tokens, written as .npy files [n, head_dim].
    Gather(GatherArgs),
    /// A device set: KV sharded across several devices (pages round
    /// robin), Top-K fanned out and merged exactly, rows gathered from the
    /// devices holding them.
    Set(set::SetArgs),
    /// A fault-injection drill against a device started with
    /// --allow-injection: load KV, run checked load on several handles,
    /// inject one fault class (or soak: random ones for --minutes), check
    /// the device's records and that nothing was lost; a JSON report.
    Drill(drill::DrillArgs),
}

#[derive(Debug, Subcommand)]
enum BenchAction {
    /// NOP round trips: latency at queue depth 1, throughput at --depth.
    Nop(NopArgs),
    /// TOPK_GATHER through the device: host-observed latency against the
    /// device's own kernel time (the command path's overhead as a ratio).
    Topk(BenchTopkArgs),
    /// Scoring + Top-K kernel over a grid of shapes: in-process (the firmware
    /// model) and through the device, against this machine's memory read
    /// roofline measured in the same run (JSON).
    Kernel(KernelArgs),
    /// The data path end to end on an embedded device and a pnm-device
    /// process: KV load bandwidth against memcpy, Top-K + gather through
    /// the device against the same kernel in-process, the device's idle
    /// CPU and the memory it and the driver use beyond the region (JSON).
    Datapath(datapath_bench::DatapathArgs),
    /// A device set's fan-out (2 pnm-device processes by default) against
    /// one device holding everything, with one and with as many compute
    /// units, alternated in one run; the merge's cost per candidate (JSON).
    Set(set_bench::SetBenchArgs),
}

/// One (sequence, layer, KV head): the rows a Top-K scores or a gather reads.
#[derive(Debug, clap::Args)]
struct StreamArgs {
    /// The sequence (its id, as `kv load` prints it and `kv list` shows).
    #[arg(long)]
    seq: u32,
    /// The layer, from 0.
    #[arg(long)]
    layer: u16,
    /// The KV head within the layer, from 0.
    #[arg(long)]
    head: u16,
}

/// `pnmctl topk`.
#[derive(Debug, clap::Args)]
struct TopkArgs {
    #[command(flatten)]
    stream: StreamArgs,
    /// Query .npy: [head_dim] or [G, head_dim], float16/32/64.
    #[arg(long)]
    query: PathBuf,
    /// How many tokens to select.
    #[arg(short, long)]
    k: u32,
    /// How a GQA group's scores combine.
    #[arg(long, value_enum, default_value = "max")]
    aggregation: AggregationArg,
    /// Query-aware page selection: score at most this many tokens, the
    /// pages whose key bounds promise the most (default: every token,
    /// the exact Top-K).
    #[arg(long)]
    budget: Option<u32>,
    /// With --budget: leading pages always scored (attention sinks).
    #[arg(long, default_value_t = 1, requires = "budget")]
    sink_pages: u8,
    /// With --budget: trailing pages always scored (recent tokens).
    #[arg(long, default_value_t = 2, requires = "budget")]
    recent_pages: u8,
    /// Leave out (and count) tokens whose rows lie on bad media instead of
    /// failing with Media Error.
    #[arg(long)]
    skip_bad_rows: bool,
}

/// `pnmctl model`.
#[derive(Debug, clap::Args)]
struct ModelArgs {
    /// A known model shape (llama-3-8b, llama-3-70b, llama-3-405b, qwen2-7b).
    #[arg(long, default_value = "llama-3-70b")]
    model: String,
    /// Tokens of context per sequence.
    #[arg(long, default_value_t = 131072)]
    context: u64,
    /// Sequences decoded together in one step (the batch; by default one
    /// whose KV cache outgrows the server's HBM at 128K tokens).
    #[arg(long, default_value_t = 32)]
    batch: u64,
    /// KV element type.
    #[arg(long, value_enum, default_value = "f16")]
    dtype: DtypeArg,
    /// Tokens selected per (layer, KV head) by near-memory Top-K.
    #[arg(short, long, default_value_t = 2048)]
    k: u64,
    /// Profiles: built-in names or .toml files (default: every built-in).
    #[arg(long, value_delimiter = ',')]
    profile: Vec<String>,
    /// PNM modules sharing the KV cache in the system model.
    #[arg(long, default_value_t = 8)]
    modules: u32,
    /// The server (GPUs, prices, energies): a TOML file of
    /// firmware-model/profiles/system-h200x8.toml's fields (default: that one).
    #[arg(long)]
    system: Option<String>,
    /// Any shape: layers (overrides --model's).
    #[arg(long)]
    layers: Option<u64>,
    /// Any shape: query heads.
    #[arg(long)]
    q_heads: Option<u64>,
    /// Any shape: KV heads.
    #[arg(long)]
    kv_heads: Option<u64>,
    /// Any shape: head dimension.
    #[arg(long)]
    head_dim: Option<u64>,
    /// Any shape: parameters, in billions.
    #[arg(long)]
    params_b: Option<f64>,
    /// Write charts (SVG and PNG) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// With --plot: figures measured here, beside the model: `pnmctl bench
    /// set` JSON (the fan-out's speed-up, on the throughput chart) and main
    /// job `--json` reports (their step time, on the step-time chart).
    /// Repeat for several files.
    #[arg(long, requires = "plot")]
    measured: Vec<PathBuf>,
}

/// `pnmctl gather`.
#[derive(Debug, clap::Args)]
struct GatherArgs {
    #[command(flatten)]
    stream: StreamArgs,
    /// Token indices, comma separated (e.g. 3,17,42).
    #[arg(long, value_delimiter = ',', required = true)]
    indices: Vec<u32>,
    /// Where to write the K rows (.npy, [n, head_dim], the sequence's dtype).
    #[arg(long)]
    out_keys: PathBuf,
    /// Where to write the V rows (.npy, [n, head_dim], the sequence's dtype).
    #[arg(long)]
    out_values: PathBuf,
}

/// `pnmctl events`.
#[derive(Debug, clap::Args)]
struct EventsArgs {
    /// One log (informational, warning, failure, fatal); all four if not given.
    #[arg(long, value_parser = parse_event_log)]
    log: Option<pnm_host::EventLog>,
    /// Clear the records shown (by handle, so none that arrive meanwhile).
    #[arg(long)]
    clear: bool,
    /// Set a log's interrupt first: LOG=none or LOG=msi:V (vector 0-7);
    /// may be repeated. The other logs keep theirs.
    #[arg(long, value_name = "LOG=MODE", value_parser = parse_event_policy)]
    policy: Vec<(pnm_host::EventLog, InterruptMode)>,
}

fn parse_event_policy(text: &str) -> Result<(pnm_host::EventLog, InterruptMode), String> {
    let (log, mode) = text.split_once('=').ok_or("expected LOG=none or LOG=msi:V")?;
    let mode = match mode.strip_prefix("msi:") {
        Some(v) => match v.parse::<u8>() {
            Ok(v) if v < 8 => InterruptMode::Msi(v),
            _ => return Err(format!("vector '{v}' is not 0-7")),
        },
        None if mode == "none" => InterruptMode::None,
        None => return Err(format!("'{mode}' is not none or msi:V")),
    };
    Ok((parse_event_log(log)?, mode))
}

/// A number in decimal or, with 0x, hex.
fn parse_number(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("'{text}': {e}"))
}

#[derive(Debug, Subcommand)]
enum InjectAction {
    /// Inject Event Record (C005h): add a record to an event log, as if the
    /// device had found what it describes.
    Event(InjectEventArgs),
    /// Inject Media Fault (C006h): poison a DPA range or chosen rows (reads
    /// of them fail until Clear Poison).
    Poison(media::FaultTarget),
    /// Inject Device Fault (C007h): drop doorbells; drop, delay, duplicate
    /// or garble completions; hang the engine or a compute unit; kill a
    /// compute unit; stop the heartbeat; abort the device mid-command; slow
    /// memory down; or clear them all.
    Fault(FaultArgs),
    /// Inject Media Fault (C006h): change bytes of a DPA range or chosen
    /// rows behind the device's back (silent corruption the integrity check
    /// must catch).
    Corrupt {
        #[command(flatten)]
        target: media::FaultTarget,
        /// Each byte is XORed with this (not 0).
        #[arg(long, default_value = "0x01", value_parser = parse_number)]
        pattern: u64,
    },
}

/// What kind of record to inject.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RecordKind {
    GeneralMedia,
    Dram,
    MemoryModule,
}

/// `pnmctl inject event`.
#[derive(Debug, clap::Args)]
struct InjectEventArgs {
    /// The log: informational, warning, failure or fatal.
    #[arg(long, value_parser = parse_event_log)]
    log: pnm_host::EventLog,
    /// The record: a General Media, DRAM or Memory Module event (CXL 3.1 §8.2.9.2.1).
    #[arg(long, value_enum)]
    kind: RecordKind,
    /// Device physical address (general-media, dram), 64-byte aligned;
    /// decimal or 0x-prefixed hex.
    #[arg(long, default_value = "0", value_parser = parse_number)]
    dpa: u64,
    /// Memory Event Descriptor bits: 1 uncorrectable, 2 threshold, 4 poison list overflow.
    #[arg(long, default_value_t = 0)]
    descriptor: u8,
    /// Memory Event Type (0 media ECC error, 1 invalid address, 2 data path
    /// error) or, for memory-module, Device Event Type (0 health status
    /// change ... 5 LSA error).
    #[arg(long, default_value_t = 0)]
    event_type: u8,
    /// Transaction Type (0 unknown, 1 host read, 2 host write, 3 scan media, ...).
    #[arg(long, default_value_t = 0)]
    transaction: u8,
    /// Event Record Flags bits 2-5: 4 permanent, 8 maintenance needed, 16
    /// performance degraded, 32 hardware replacement needed.
    #[arg(long, default_value_t = 0)]
    flags: u32,
}

fn parse_event_log(text: &str) -> Result<pnm_host::EventLog, String> {
    pnm_host::EventLog::ALL
        .into_iter()
        .find(|log| log.name() == text)
        .ok_or_else(|| format!("'{text}' is not informational, warning, failure or fatal"))
}

/// `pnmctl bench nop`.
#[derive(Debug, clap::Args)]
struct NopArgs {
    /// Queue pairs, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Commands in flight per queue for the throughput run (doorbells batched).
    #[arg(long, default_value_t = 32)]
    depth: u16,
    /// Wait on interrupts instead of polling.
    #[arg(long)]
    interrupts: bool,
    /// Interrupt coalescing count (with --interrupts).
    #[arg(long, default_value_t = 1)]
    coalesce: u16,
    /// Round trips timed for the latency figures (per queue).
    #[arg(long, default_value_t = 20000)]
    samples: usize,
    /// Seconds of the throughput run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Run the matrix: polled and interrupt, 1/2/4 queues, depth 1/8/32/128
    /// (one JSON array; --queues, --depth and --interrupts are ignored).
    #[arg(long)]
    sweep: bool,
    /// Through the async API instead: this many tokio tasks sharing one
    /// interrupt-driven queue pair, each submitting NOPs back to back for
    /// --seconds.
    #[arg(long, value_name = "TASKS", conflicts_with = "sweep")]
    async_tasks: Option<u16>,
}

/// `pnmctl bench topk`.
#[derive(Debug, clap::Args)]
struct BenchTopkArgs {
    /// Tokens in the benchmark sequence (f16, one KV head).
    #[arg(long, default_value_t = 32768)]
    tokens: u64,
    /// Elements per key row.
    #[arg(long, default_value_t = 128)]
    head_dim: u16,
    /// Tokens selected (and rows gathered) per command.
    #[arg(short, long, default_value_t = 2048)]
    k: u32,
    /// Queries per command (a GQA group).
    #[arg(long, default_value_t = 1)]
    group: u32,
    /// Timed commands (the median and percentiles are reported).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Wait on interrupts instead of polling.
    #[arg(long)]
    interrupts: bool,
}

/// `pnmctl bench kernel`.
#[derive(Debug, clap::Args)]
struct KernelArgs {
    /// Sequence lengths, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "32768,131072")]
    tokens: Vec<u64>,
    /// Key dtypes, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f16,bf16,f32")]
    dtypes: Vec<DtypeArg>,
    /// GQA group sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    groups: Vec<u32>,
    /// k values, comma separated.
    #[arg(short, long, value_delimiter = ',', default_value = "64,2048")]
    k: Vec<u32>,
    /// Elements per key row.
    #[arg(long, default_value_t = 128)]
    head_dim: u16,
    /// Timed runs per case (the minimum and median are reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Only the in-process kernel: no device needed.
    #[arg(long)]
    no_device: bool,
    /// Also time numpy and faiss-cpu on the same shapes (needs python3).
    #[arg(long)]
    reference: bool,
}

/// Where K and V arrays come from: two .npy files or one safetensors file.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["keys", "safetensors"])))]
struct KvSource {
    /// Keys .npy (float16, float32 or float64), with --values.
    #[arg(long, requires = "values")]
    keys: Option<PathBuf>,
    /// Values .npy, same shape and type as the keys.
    #[arg(long, requires = "keys")]
    values: Option<PathBuf>,
    /// Or: a safetensors file with tensors named `k` and `v` (F16, BF16, F32).
    #[arg(long)]
    safetensors: Option<PathBuf>,
}

/// `pnmctl kv load`.
#[derive(Debug, clap::Args)]
struct LoadArgs {
    #[command(flatten)]
    source: KvSource,
    /// Append to this existing sequence instead of creating one.
    #[arg(long)]
    seq: Option<u32>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F16,
    Bf16,
    F32,
}

impl From<DtypeArg> for pnm_host::Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F16 => Self::F16,
            DtypeArg::Bf16 => Self::Bf16,
            DtypeArg::F32 => Self::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AggregationArg {
    Max,
    Mean,
}

impl From<AggregationArg> for Aggregation {
    fn from(a: AggregationArg) -> Self {
        match a {
            AggregationArg::Max => Aggregation::Max,
            AggregationArg::Mean => Aggregation::Mean,
        }
    }
}

#[derive(Debug, Subcommand)]
enum KvAction {
    /// Load K and V arrays shaped [layers, kv_heads, tokens, head_dim].
    Load(LoadArgs),
    /// List the sequences in device DRAM.
    List,
    /// Free a sequence and its device DRAM.
    Free {
        /// The sequence (its id, as `kv load` prints it and `kv list` shows).
        #[arg(long)]
        seq: u32,
    },
}

#[derive(Debug, Subcommand)]
enum TimestampAction {
    /// Read the timestamp (the default).
    Get,
    /// Set the timestamp: to --ns, or to this machine's clock.
    Set {
        /// Nanoseconds since the Unix epoch.
        #[arg(long)]
        ns: Option<u64>,
    },
}

fn main() -> ExitCode {
    pnm_logging::init("warn");
    pnm_host::default_sigpipe();
    let cli = Cli::parse();
    if let Command::Status = cli.command {
        return status(&cli);
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pnmctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pnmctl status`: the device's state and registers; the exit code tells
/// running (0) from stopped (2), dead (3) and hung (4); 1 is an error (no
/// such file, not a region).
fn status(cli: &Cli) -> ExitCode {
    // Ten heartbeats: a live device beats within one.
    let bound = Duration::from_millis(100);
    match Device::probe(&cli.device, bound) {
        Ok(live) => {
            emit(cli.json, &live, |l| {
                let s = &l.status;
                let state = match l.state {
                    pnm_host::DeviceState::Running => "running",
                    pnm_host::DeviceState::Hung => {
                        "hung (its process exists but the heartbeat stands still)"
                    }
                    pnm_host::DeviceState::Stopped => "stopped (in order; nobody serves it)",
                    pnm_host::DeviceState::Dead => {
                        "dead (gone without an orderly stop; nobody serves it)"
                    }
                };
                format!(
                    "state               {state}\nmedia ready         {}\nmailbox ready       {}\n\
                     fatal / fw halt     {} / {}\nheartbeat           {} (every {} us)\n\
                     device pid          {}\nresets              {}\ndirty shutdowns     {}\n\
                     mailbox lock        {}\nlock breaks         {}\nunits busy          {:.3} s\n",
                    s.media_ready,
                    s.mailbox_ready,
                    s.fatal,
                    s.fw_halt,
                    s.heartbeat,
                    s.heartbeat_period_us,
                    s.device_pid,
                    s.reset_count,
                    s.dirty_shutdown_count,
                    match s.mailbox_lock {
                        0 => "free".to_string(),
                        held => format!("held by pid {}", held as u32),
                    },
                    s.mailbox_lock_breaks,
                    s.unit_busy_ns as f64 / 1e9,
                )
            });
            ExitCode::from(live.state.exit_code())
        }
        Err(e) => {
            eprintln!("pnmctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).expect("plain data serializes"));
    } else {
        print!("{}", text(value));
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {} ({n} B)", UNITS[unit]) }
}

/// Errors of the CLI: the driver's, or the user's files.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Driver(#[from] Error),
    #[error(transparent)]
    Tensor(#[from] tensorfile::TensorError),
    #[error("{0}")]
    Usage(String),
    #[error("{error} ({left})")]
    Left { error: Error, left: String },
}

fn usage(reason: impl Into<String>) -> CliError {
    CliError::Usage(reason.into())
}

/// Checks (layer, head) against a sequence's shape, for a clear message.
fn check_stream(seq: &Sequence, layer: u16, head: u16) -> Result<(), CliError> {
    if layer >= seq.shape.layers || head >= seq.shape.heads {
        return Err(usage(format!(
            "layer {layer} / head {head} out of range: sequence {} has {} layers x {} KV heads",
            seq.id, seq.shape.layers, seq.shape.heads
        )));
    }
    Ok(())
}

fn kv_shape_of(keys: &Tensor, values: &Tensor) -> Result<(KvShape, u64), CliError> {
    let [layers, heads, tokens, head_dim] = keys.shape[..] else {
        return Err(usage(format!(
            "keys have shape {:?}; expected [layers, kv_heads, tokens, head_dim]",
            keys.shape
        )));
    };
    if values.shape != keys.shape || values.dtype != keys.dtype {
        return Err(usage(format!(
            "values ({:?} {}) do not match keys ({:?} {})",
            values.shape,
            values.dtype.name(),
            keys.shape,
            keys.dtype.name()
        )));
    }
    let narrow = |v: usize, what: &str| {
        u16::try_from(v).map_err(|_| usage(format!("{what} {v} is too large")))
    };
    let shape = KvShape {
        dtype: keys.dtype,
        layers: narrow(layers, "layers")?,
        heads: narrow(heads, "kv_heads")?,
        head_dim: narrow(head_dim, "head_dim")?,
    };
    if tokens == 0 || shape.layers == 0 || shape.heads == 0 || shape.head_dim == 0 {
        return Err(usage(format!("empty KV shape {:?}", keys.shape)));
    }
    Ok((shape, tokens as u64))
}

/// Percentile of sorted nanosecond samples, in microseconds.
/// Opens the device named on the command line.
fn open(cli: &Cli) -> Result<Device, Error> {
    Device::open_with(&cli.device, &device_options(cli))
}

/// The device options the command line sets.
fn device_options(cli: &Cli) -> DeviceOptions {
    DeviceOptions {
        mailbox_timeout: Duration::from_millis(cli.timeout_ms),
        command_timeout: Duration::from_millis(cli.command_timeout_ms),
        wait_ready: Some(Duration::from_millis(cli.wait_ms)),
        ..Default::default()
    }
}

fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Model(args) => model_command(cli, args),
        Command::Accuracy(args) => accuracy::run(cli, args),
        Command::Bench { action } => bench(cli, action),
        Command::Status => unreachable!("answered without opening the device"),
        Command::Identify => identify(cli, &open(cli)?),
        Command::Health => health(cli, &open(cli)?),
        Command::Events(args) => events(cli, &open(cli)?, args),
        Command::Inject { action: InjectAction::Event(args) } => {
            inject_event(cli, &open(cli)?, args)
        }
        Command::Inject { action: InjectAction::Poison(target) } => {
            media::inject_media(cli.json, &open(cli)?, target, pnm_host::MediaFault::Poison)
        }
        Command::Inject { action: InjectAction::Corrupt { target, pattern } } => {
            let pattern = u8::try_from(*pattern)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| usage("--pattern takes 1..=255"))?;
            let fault = pnm_host::MediaFault::Corrupt { pattern };
            media::inject_media(cli.json, &open(cli)?, target, fault)
        }
        Command::Poison { action } => media::poison(cli.json, &open(cli)?, action),
        Command::Inject { action: InjectAction::Fault(args) } => {
            inject_fault(cli, &open(cli)?, args)
        }
        Command::ScanMedia(args) => media::scan_media(cli.json, &open(cli)?, args),
        Command::Timestamp { action } => timestamp(cli, &open(cli)?, action.as_ref()),
        Command::Logs => logs(cli, &open(cli)?),
        Command::PnmInfo => pnm_info(cli, &open(cli)?),
        Command::Reset => reset(cli, &open(cli)?),
        Command::Kv { action: KvAction::Load(args) } => kv_load(cli, &open(cli)?, args),
        Command::Kv { action: KvAction::List } => kv_list(cli, &open(cli)?),
        Command::Kv { action: KvAction::Free { seq } } => kv_free(cli, &open(cli)?, *seq),
        Command::Topk(args) => topk(cli, &open(cli)?, args),
        Command::Gather(args) => gather(cli, &open(cli)?, args),
        Command::Drill(args) => drill::drill(&cli.device, args),
        Command::Set(args) => set::run(cli, args),
    }
}

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("plain data serializes"));
}

/// `pnmctl model`: needs no device.
fn model_command(cli: &Cli, args: &ModelArgs) -> Result<(), CliError> {
    let ModelArgs { context, batch, dtype, k, profile, modules, .. } = args;
    if *context == 0 || *batch == 0 || *k == 0 || *modules == 0 {
        return Err(usage("--context, --batch, -k and --modules must be at least 1"));
    }
    let profiles = if profile.is_empty() {
        pnm_firmware::timing::HardwareProfile::built_in()
    } else {
        profile.iter().map(|p| model::load_profile(p)).collect::<Result<_, _>>().map_err(usage)?
    };
    let mut shape = model::model_shape(&args.model).map_err(usage)?;
    let custom = [args.layers, args.q_heads, args.kv_heads, args.head_dim];
    if custom.iter().any(Option::is_some) || args.params_b.is_some() {
        shape.name = "custom";
        shape.layers = args.layers.unwrap_or(shape.layers);
        shape.q_heads = args.q_heads.unwrap_or(shape.q_heads);
        shape.kv_heads = args.kv_heads.unwrap_or(shape.kv_heads);
        shape.head_dim = args.head_dim.unwrap_or(shape.head_dim);
        if let Some(b) = args.params_b {
            if !(b.is_finite() && b > 0.0) {
                return Err(usage("--params-b must be a positive number"));
            }
            shape.params = (b * 1e9) as u64;
        }
        if shape.layers == 0 || shape.q_heads == 0 || shape.kv_heads == 0 || shape.head_dim == 0 {
            return Err(usage("--layers, --q-heads, --kv-heads and --head-dim must be at least 1"));
        }
        if shape.q_heads % shape.kv_heads != 0 {
            return Err(usage("--q-heads must be a multiple of --kv-heads"));
        }
    }
    let elem_bytes = pnm_host::Dtype::from(*dtype).size() as u64;
    let question = pnm_firmware::timing::StepQuestion {
        model: shape.clone(),
        context: *context,
        batch: *batch,
        elem_bytes,
        k: *k,
    };
    let (mut value, mut text) = model::answer(&question, &profiles);
    let system = model::load_system(args.system.as_deref()).map_err(usage)?;
    let pnm = profiles.iter().find(|p| p.has_compute()).cloned().unwrap_or_else(|| {
        pnm_firmware::timing::HardwareProfile::named("cxl-pnm").expect("built in")
    });
    let system_question = pnm_firmware::system::SystemQuestion {
        model: shape,
        context: *context,
        batch: *batch,
        elem_bytes,
        k: *k,
        modules: *modules,
    };
    let (system_value, system_text) = model::system_answer(&system_question, &system, &pnm);
    value["system_model"] = system_value;
    text += &system_text;
    if let Some(dir) = &args.plot {
        let measured = model::load_measured(&args.measured).map_err(usage)?;
        let charts = model::charts(&system_question, &system, &pnm, &measured);
        let (written, note) = pnm_tools::plot::write_all(dir, &charts).map_err(usage)?;
        value["charts"] = serde_json::json!(written);
        text += &format!(
            "\nwrote {}\n",
            written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        if let Some(note) = note {
            text += &format!("note: {note}\n");
        }
    }
    if cli.json {
        print_json(&value);
    } else {
        print!("{text}");
    }
    Ok(())
}

/// `pnmctl bench ...`: every benchmark prints JSON.
fn bench(cli: &Cli, action: &BenchAction) -> Result<(), CliError> {
    match action {
        BenchAction::Kernel(args) => bench_kernel(cli, args),
        BenchAction::Topk(args) => bench_topk(cli, args),
        BenchAction::Nop(args) => bench_nop(cli, args),
        BenchAction::Datapath(args) => {
            print_json(&datapath_bench::run(args).map_err(|e| usage(format!("{e:#}")))?);
            Ok(())
        }
        BenchAction::Set(args) => {
            print_json(&set_bench::run(args).map_err(|e| usage(format!("{e:#}")))?);
            Ok(())
        }
    }
}

fn bench_kernel(cli: &Cli, args: &KernelArgs) -> Result<(), CliError> {
    let KernelArgs { tokens, dtypes, groups, k, head_dim, reps, no_device, reference } = args;
    let grid = kernel_bench::KernelGrid {
        tokens: tokens.clone(),
        dtypes: dtypes.iter().map(|&d| d.into()).collect(),
        groups: groups.clone(),
        ks: k.clone(),
        head_dim: *head_dim,
        reps: *reps,
        reference: *reference,
    };
    let bad = |v: &[u64]| v.is_empty() || v.contains(&0);
    if bad(&grid.tokens)
        || grid.groups.iter().any(|&g| g == 0 || g > 8)
        || bad(&grid.ks.iter().map(|&k| u64::from(k)).collect::<Vec<_>>())
        || grid.dtypes.is_empty()
        || grid.head_dim == 0
        || grid.reps == 0
    {
        return Err(usage("--tokens, -k and --reps must be at least 1, --groups 1..=8"));
    }
    let device = if *no_device { None } else { Some(open(cli)?) };
    print_json(&kernel_bench::run(&grid, device.as_ref())?);
    Ok(())
}

fn bench_topk(cli: &Cli, args: &BenchTopkArgs) -> Result<(), CliError> {
    let BenchTopkArgs { tokens, head_dim, k, group, reps, interrupts } = args;
    let device = open(cli)?;
    let report =
        command_bench::bench_topk(&device, *tokens, *head_dim, *k, *group, *reps, *interrupts)?;
    print_json(&report);
    Ok(())
}

fn bench_nop(cli: &Cli, args: &NopArgs) -> Result<(), CliError> {
    let NopArgs { queues, depth, interrupts, coalesce, samples, seconds, sweep, async_tasks } =
        args;
    if *queues == 0 || *depth == 0 || *samples == 0 || *async_tasks == Some(0) {
        return Err(usage("--queues, --depth, --samples and --async-tasks must be at least 1"));
    }
    let device = open(cli)?;
    if let Some(tasks) = async_tasks {
        print_json(&command_bench::bench_nop_async(&device, *tasks, *seconds)?);
        return Ok(());
    }
    let irq = |on: bool| {
        on.then_some(pnm_host::InterruptConfig {
            vector: 0,
            coalesce_count: *coalesce,
            coalesce_usec: if *coalesce > 1 { 50 } else { 0 },
        })
    };
    if !*sweep {
        let report = command_bench::bench_nop(
            &device,
            *queues,
            *depth,
            irq(*interrupts),
            *samples,
            *seconds,
        )?;
        print_json(&report);
        return Ok(());
    }
    let cases: Vec<(bool, u16, u16)> = [false, true]
        .into_iter()
        .flat_map(|i| {
            [1u16, 2, 4].into_iter().flat_map(move |q| [1u16, 8, 32, 128].map(|d| (i, q, d)))
        })
        .collect();
    let progress = Progress::new("bench nop --sweep", cases.len());
    let mut reports = Vec::new();
    for (n, (interrupts, queues, depth)) in cases.into_iter().enumerate() {
        progress.step(
            n,
            &format!(
                "{} queues, depth {depth}, {}",
                queues,
                if interrupts { "interrupts" } else { "polled" }
            ),
        );
        reports.push(command_bench::bench_nop(
            &device,
            queues,
            depth,
            irq(interrupts),
            *samples,
            *seconds,
        )?);
    }
    progress.done();
    print_json(&reports);
    Ok(())
}

/// Progress of long work on stderr, when stderr is a terminal (scripts
/// reading the JSON on stdout see nothing of it).
struct Progress {
    what: &'static str,
    total: usize,
    on_terminal: bool,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Self {
        use std::io::IsTerminal;
        Self { what, total, on_terminal: std::io::stderr().is_terminal() }
    }

    fn step(&self, done: usize, now: &str) {
        if self.on_terminal {
            eprint!("\r\x1b[K{}: {}/{} {now}", self.what, done + 1, self.total);
        }
    }

    fn done(&self) {
        if self.on_terminal {
            eprintln!("\r\x1b[K{}: {} cases done", self.what, self.total);
        }
    }
}

/// `pnmctl identify`: Identify Memory Device (4000h).
fn identify(cli: &Cli, device: &Device) -> Result<(), CliError> {
    emit(cli.json, &device.identify()?, |id| {
        format!(
            "firmware revision   {}\ntotal capacity      {}\nvolatile only       {}\n\
             persistent only     {}\npartition alignment {}\nLSA size            {}\n\
             poison list max     {}\n(capacities are in the spec's 256 MiB units, rounded \
             down; `pnmctl pnm-info` gives device DRAM to the byte)\n",
            id.fw_revision,
            bytes(id.total_capacity_bytes),
            bytes(id.volatile_only_capacity_bytes),
            bytes(id.persistent_only_capacity_bytes),
            bytes(id.partition_alignment_bytes),
            id.lsa_size,
            id.poison_list_max_records,
        )
    });
    Ok(())
}

/// `pnmctl health`: Get Health Info (4200h).
fn health(cli: &Cli, device: &Device) -> Result<(), CliError> {
    emit(cli.json, &device.health_info()?, |h| {
        let flags: Vec<&str> = [
            (h.maintenance_needed, "maintenance needed"),
            (h.performance_degraded, "performance degraded"),
            (h.hardware_replacement_needed, "hardware replacement needed"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        format!(
            "health              {}\nmedia status        {}\nlife used           {}\n\
             temperature         {}\ndirty shutdowns     {}\ncorrected errors    {} volatile, {} persistent\n",
            if flags.is_empty() { "normal".to_string() } else { flags.join(", ") },
            match h.media_status {
                0 => "normal".to_string(),
                other => format!("{other:#04x}"),
            },
            h.life_used_percent.map_or("not reported".into(), |p| format!("{p}%")),
            h.temperature_celsius.map_or("not reported".into(), |t| format!("{t} C")),
            h.dirty_shutdown_count,
            h.corrected_volatile_error_count,
            h.corrected_persistent_error_count,
        )
    });
    Ok(())
}

/// `pnmctl events`: each log's oldest records (one mailbox payload's
/// worth; with --clear, all of them, clearing each batch before asking for
/// the next), and the Event Status register.
fn events(cli: &Cli, device: &Device, args: &EventsArgs) -> Result<(), CliError> {
    if !args.policy.is_empty() {
        let mut policy = device.get_event_interrupt_policy()?;
        for &(log, mode) in &args.policy {
            policy[log as usize] = mode;
        }
        device.set_event_interrupt_policy(policy)?;
    }
    let logs = args.log.map_or(pnm_host::EventLog::ALL.to_vec(), |l| vec![l]);
    let mut fetched = Vec::new();
    for log in logs {
        let mut got = device.get_event_records(log)?;
        let handles = |records: &[pnm_host::commands::Event]| -> Vec<u16> {
            records.iter().map(|r| r.handle).collect()
        };
        let mut batch = handles(&got.records);
        // Bounded: a log holds 64 records at most, 31 fit a payload.
        for _ in 0..64 {
            if !args.clear || batch.is_empty() {
                break;
            }
            device.clear_event_records(log, &batch)?;
            if !got.more {
                break;
            }
            let next = device.get_event_records(log)?;
            batch = handles(&next.records);
            got.records.extend(next.records);
            got.more = next.more;
        }
        fetched.push(got);
    }
    #[derive(Serialize)]
    struct Report {
        event_status: u32,
        /// Per log, informational first: "none" or "msi:V".
        interrupt_policy: Vec<String>,
        logs: Vec<pnm_host::commands::EventRecords>,
    }
    let policy = device.get_event_interrupt_policy()?.map(|mode| match mode {
        InterruptMode::Msi(v) => format!("msi:{v}"),
        InterruptMode::Firmware(v) => format!("firmware:{v}"),
        InterruptMode::None => "none".into(),
    });
    let report = Report {
        event_status: device.event_status(),
        interrupt_policy: policy.to_vec(),
        logs: fetched,
    };
    emit(cli.json, &report, |r| {
        let mut text = format!(
            "event status        {:#06b}\ninterrupts          {}\n",
            r.event_status,
            r.interrupt_policy.join(" ")
        );
        for log in &r.logs {
            text += &format!(
                "{} log: {} record(s){}{}\n",
                log.log.name(),
                log.records.len(),
                if log.more { ", more waiting" } else { "" },
                log.overflow.map_or(String::new(), |o| format!(", {} lost to overflow", o.count)),
            );
            for e in &log.records {
                text += &format!("  #{} at {} ns: {:?}\n", e.handle, e.timestamp, e.kind);
            }
        }
        text
    });
    Ok(())
}

/// An injection the device refused: Unsupported means it was not started
/// with --allow-injection, which the message then says.
fn injection_error(e: Error) -> CliError {
    if e.return_code() == Some(pnm_protocol::ReturnCode::UNSUPPORTED) {
        usage(format!(
            "{e}: this device does not take injections (start pnm-device with --allow-injection)"
        ))
    } else {
        e.into()
    }
}

/// `pnmctl inject fault`.
#[derive(Debug, clap::Args)]
struct FaultArgs {
    /// The fault.
    #[arg(long, value_parser = parse_device_fault)]
    kind: pnm_protocol::faults::DeviceFault,
    /// Doorbells or completions it applies to (the counting faults).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Delay or hang in milliseconds (fractions allowed; 0 for a hang: for good).
    #[arg(long, default_value_t = 0.0)]
    ms: f64,
    /// Compute unit (hang-unit, kill-unit).
    #[arg(long, default_value_t = 0)]
    unit: u32,
    /// slow-memory: DRAM speed divided by this (2.5: 2.5 times slower).
    #[arg(long, default_value_t = 1.0)]
    slowdown: f64,
}

fn parse_device_fault(text: &str) -> Result<pnm_protocol::faults::DeviceFault, String> {
    use pnm_protocol::faults::DeviceFault;
    DeviceFault::ALL.into_iter().find(|f| f.name() == text).ok_or_else(|| {
        let names: Vec<&str> = DeviceFault::ALL.iter().map(|f| f.name()).collect();
        format!("'{text}' is none of {}", names.join(", "))
    })
}

/// `pnmctl inject fault`: Inject Device Fault (C007h).
fn inject_fault(cli: &Cli, device: &Device, args: &FaultArgs) -> Result<(), CliError> {
    use pnm_protocol::faults::DeviceFault;
    let micros = (args.ms * 1000.0).round();
    if !(0.0..=f64::from(u32::MAX)).contains(&micros) {
        return Err(usage("--ms is out of range"));
    }
    let target = match args.kind {
        DeviceFault::SlowMemory => (args.slowdown * 100.0).round() as u32,
        _ => args.unit,
    };
    device
        .inject_device_fault(args.kind, args.count, micros as u32, target)
        .map_err(injection_error)?;
    #[derive(Serialize)]
    struct Injected {
        fault: &'static str,
        count: u32,
        micros: u32,
        target: u32,
    }
    let out =
        Injected { fault: args.kind.name(), count: args.count, micros: micros as u32, target };
    emit(cli.json, &out, |i| format!("injected {}\n", i.fault));
    Ok(())
}

/// `pnmctl inject event`: Inject Event Record (C005h).
fn inject_event(cli: &Cli, device: &Device, args: &InjectEventArgs) -> Result<(), CliError> {
    use pnm_protocol::events::{self, EventRecord};
    use zerocopy::{FromZeros, IntoBytes};
    if !args.dpa.is_multiple_of(64) {
        return Err(usage(format!("--dpa {:#x} is not 64-byte aligned", args.dpa)));
    }
    if args.flags & !0b11_1100 != 0 {
        return Err(usage("--flags takes bits 2-5 (4, 8, 16, 32)"));
    }
    let mut record = EventRecord::new_zeroed();
    record.header.set_flags(args.flags);
    match args.kind {
        RecordKind::GeneralMedia => {
            record.header.uuid = events::uuid::GENERAL_MEDIA;
            let mut g = events::GeneralMedia::new_zeroed();
            g.physical_address = args.dpa.into();
            g.descriptor = args.descriptor;
            g.memory_event_type = args.event_type;
            g.transaction_type = args.transaction;
            record.data.copy_from_slice(g.as_bytes());
        }
        RecordKind::Dram => {
            record.header.uuid = events::uuid::DRAM;
            let mut d = events::Dram::new_zeroed();
            d.physical_address = args.dpa.into();
            d.descriptor = args.descriptor;
            d.memory_event_type = args.event_type;
            d.transaction_type = args.transaction;
            record.data.copy_from_slice(d.as_bytes());
        }
        RecordKind::MemoryModule => {
            record.header.uuid = events::uuid::MEMORY_MODULE;
            let mut m = events::MemoryModule::new_zeroed();
            m.device_event_type = args.event_type;
            record.data.copy_from_slice(m.as_bytes());
        }
    }
    #[derive(Serialize)]
    struct Injected {
        log: &'static str,
        /// None: the log was full; the record was counted as overflow.
        handle: Option<u16>,
    }
    let handle = device.inject_event(args.log, &record).map_err(injection_error)?;
    emit(cli.json, &Injected { log: args.log.name(), handle }, |i| match i.handle {
        Some(h) => format!("injected into the {} log as record {h}\n", i.log),
        None => format!("the {} log is full: the record was counted as overflow\n", i.log),
    });
    Ok(())
}

/// `pnmctl timestamp`: Get / Set Timestamp (0300h / 0301h).
fn timestamp(cli: &Cli, device: &Device, action: Option<&TimestampAction>) -> Result<(), CliError> {
    #[derive(Serialize)]
    struct Timestamp {
        timestamp_ns: u64,
    }
    if let Some(TimestampAction::Set { ns }) = action {
        let ns = ns.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        device.set_timestamp(ns)?;
    }
    let value = Timestamp { timestamp_ns: device.get_timestamp()? };
    emit(cli.json, &value, |t| {
        if t.timestamp_ns == 0 {
            "timestamp not set\n".into()
        } else {
            let secs = t.timestamp_ns / 1_000_000_000;
            format!(
                "{} ns ({secs}.{:09} s since the Unix epoch)\n",
                t.timestamp_ns,
                t.timestamp_ns % 1_000_000_000
            )
        }
    });
    Ok(())
}

/// `pnmctl logs`: Get Supported Logs and the Command Effects Log.
fn logs(cli: &Cli, device: &Device) -> Result<(), CliError> {
    #[derive(Serialize)]
    struct Logs {
        supported_logs: Vec<pnm_host::commands::SupportedLog>,
        command_effects_log: Vec<pnm_host::commands::CelEntry>,
    }
    let logs = Logs {
        supported_logs: device.supported_logs()?,
        command_effects_log: device.command_effects_log()?,
    };
    emit(cli.json, &logs, |l| {
        let mut out = String::new();
        for log in &l.supported_logs {
            out += &format!(
                "log {} ({} bytes){}\n",
                log.uuid,
                log.size,
                if log.is_command_effects_log { " Command Effects Log" } else { "" }
            );
        }
        out += "opcode  effects  command\n";
        for e in &l.command_effects_log {
            out += &format!(
                "{:04X}h   {:04X}h    {}\n",
                e.opcode,
                e.effects,
                e.name.unwrap_or("(unknown)")
            );
        }
        out
    });
    Ok(())
}

/// `pnmctl pnm-info`: Identify PNM (C000h).
fn pnm_info(cli: &Cli, device: &Device) -> Result<(), CliError> {
    emit(cli.json, &device.identify_pnm()?, |p| {
        format!(
            "ABI version         {}\nfirmware revision   {}\ncompute units       {}\n\
             region              {}\nhost DMA window     {:#x}, {}\ndevice DRAM         {:#x}, {}\n\
             dtypes              {}\nmax head dim        {}\nmax k               {}\n\
             max GQA group       {}\nKV frames           {} x {} KiB\nmax sequences       {}\n\
             queue pairs         {} x {} entries\nheartbeat period    {} us\n",
            p.abi_version,
            p.fw_revision,
            p.compute_units,
            bytes(p.region_size),
            p.dma_window_offset,
            bytes(p.dma_window_size),
            p.dram_offset,
            bytes(p.dram_size),
            p.dtypes.join(", "),
            p.max_head_dim,
            p.max_k,
            p.max_group,
            p.kv_frame_count,
            p.kv_frame_size >> 10,
            p.max_sequences,
            p.max_queue_pairs,
            p.max_queue_entries,
            p.heartbeat_period_us,
        )
    });
    Ok(())
}

/// `pnmctl reset`.
fn reset(cli: &Cli, device: &Device) -> Result<(), CliError> {
    device.reset(Duration::from_millis(cli.timeout_ms))?;
    let status = device.status();
    emit(cli.json, &status, |s| format!("reset complete (resets so far: {})\n", s.reset_count));
    Ok(())
}

/// `pnmctl kv load`.
fn kv_load(cli: &Cli, device: &Device, args: &LoadArgs) -> Result<(), CliError> {
    let (k, v) = read_kv(&args.source)?;
    let seq = &args.seq;
    let (shape, tokens) = kv_shape_of(&k, &v)?;
    let (sequence, created) = match seq {
        Some(id) => {
            let existing = device.kv_sequence(*id)?;
            if existing.shape != shape {
                return Err(usage(format!(
                    "sequence {id} is {}; the arrays are {shape}",
                    existing.shape
                )));
            }
            (existing, false)
        }
        None => (device.kv_create(shape)?, true),
    };
    let loaded = match device.kv_append(&sequence, &k.data, &v.data, tokens, &mut |_| {}) {
        Ok(loaded) => loaded,
        Err(e) => {
            // The append is atomic: the sequence holds none of it.
            let stuck = e.device_unresponsive();
            if created && stuck {
                // The queue timed out: a free on it would wait out
                // another timeout. Say what is left instead.
                return Err(CliError::Left {
                    error: e,
                    left: format!(
                        "sequence {} was created and is left empty; \
                             `pnmctl kv free --seq {}` removes it",
                        sequence.id, sequence.id
                    ),
                });
            }
            if created {
                // Do not leave an empty sequence behind.
                let _ = device.kv_free(sequence.id);
            }
            return Err(e.into());
        }
    };
    emit(cli.json, &loaded, |s| format!("{}\n", s.id));
    Ok(())
}

/// K and V arrays from .npy files or a safetensors file's `k` and `v`.
fn read_kv(source: &KvSource) -> Result<(Tensor, Tensor), CliError> {
    Ok(match (&source.keys, &source.values, &source.safetensors) {
        (Some(k), Some(v), _) => (tensorfile::read_npy(k)?, tensorfile::read_npy(v)?),
        (_, _, Some(path)) => {
            let mut tensors = tensorfile::read_safetensors(path)?;
            let mut take = |name: &str| {
                tensors
                    .remove(name)
                    .ok_or_else(|| usage(format!("{} has no tensor '{name}'", path.display())))
            };
            (take("k")?, take("v")?)
        }
        _ => return Err(usage("give --keys and --values, or --safetensors")),
    })
}

/// A query .npy, [head_dim] or [G, head_dim], for rows of `head_dim`.
fn read_query(path: &std::path::Path, head_dim: u16) -> Result<Query, CliError> {
    let q = tensorfile::read_npy(path)?;
    let d = usize::from(head_dim);
    let group = match q.shape[..] {
        [n] if n == d => 1,
        [g, n] if n == d && g >= 1 => g,
        _ => {
            return Err(usage(format!(
                "query has shape {:?}; expected [{d}] or [G, {d}]",
                q.shape
            )));
        }
    };
    Ok(Query { dtype: q.dtype, group: group as u32, data: q.data })
}

/// `pnmctl kv list`.
fn kv_list(cli: &Cli, device: &Device) -> Result<(), CliError> {
    let list = device.kv_list()?;
    emit(cli.json, &list, |list| {
        let mut out = String::from("seq     dtype  layers  kv_heads  head_dim  tokens\n");
        for s in list {
            out += &format!(
                "{:<7} {:<6} {:<7} {:<9} {:<9} {}\n",
                s.id,
                s.shape.dtype.name(),
                s.shape.layers,
                s.shape.heads,
                s.shape.head_dim,
                s.tokens
            );
        }
        out
    });
    Ok(())
}

/// `pnmctl kv free`.
fn kv_free(cli: &Cli, device: &Device, seq: u32) -> Result<(), CliError> {
    device.kv_free(seq)?;
    emit(cli.json, &serde_json::json!({ "freed": seq }), |_| format!("freed sequence {seq}\n"));
    Ok(())
}

/// `pnmctl topk`.
fn topk(cli: &Cli, device: &Device, args: &TopkArgs) -> Result<(), CliError> {
    let TopkArgs { stream, query, k, aggregation, budget, sink_pages, recent_pages, skip_bad_rows } =
        args;
    let StreamArgs { seq, layer, head } = stream;
    let sequence = device.kv_sequence(*seq)?;
    check_stream(&sequence, *layer, *head)?;
    if *k == 0 {
        return Err(usage("k must be at least 1"));
    }
    let query = read_query(query, sequence.shape.head_dim)?;
    let aggregation = Aggregation::from(*aggregation);
    let request = pnm_host::TopkRequest {
        seq: &sequence,
        layer: *layer,
        head: *head,
        query: &query,
        k: *k,
        aggregation,
        selection: budget.map(|budget_tokens| pnm_host::PageSelection {
            budget_tokens,
            sink_pages: *sink_pages,
            recent_pages: *recent_pages,
        }),
        skip_bad_rows: *skip_bad_rows,
    };
    let top = device.topk_batch(std::slice::from_ref(&request))?.pop().expect("one answer")?;
    print_topk(cli.json, &top, serde_json::json!({}));
    Ok(())
}

/// A Top-K's answer: JSON (`extra`'s fields added) or a table.
fn print_topk(json: bool, top: &pnm_host::TopK, extra: serde_json::Value) {
    if json {
        // JSON has no NaN or infinity: such scores print as null.
        let scores: Vec<Option<f32>> =
            top.scores.iter().map(|&s| s.is_finite().then_some(s)).collect();
        let mut value = serde_json::json!({
            "indices": top.indices,
            "scores": scores,
            "tokens": top.tokens,
            "tokens_scored": top.tokens_scored,
            "skipped": top.skipped,
            "device_ns": top.device_ns,
            "model_ns": top.model_ns,
        });
        if let (Some(value), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
            value.extend(extra);
        }
        println!("{value}");
    } else {
        println!("rank  token     score");
        for (rank, (i, s)) in top.indices.iter().zip(&top.scores).enumerate() {
            println!("{rank:<5} {i:<9} {s}");
        }
    }
}

/// Writes gathered rows as .npy files [n, head_dim] and says so.
fn write_rows(
    json: bool,
    rows: pnm_host::Rows,
    shape: KvShape,
    out_keys: &std::path::Path,
    out_values: &std::path::Path,
) -> Result<(), CliError> {
    let n = rows.keys.len() / shape.row_bytes().max(1) as usize;
    let dims = vec![n, usize::from(shape.head_dim)];
    let dtype = shape.dtype;
    tensorfile::write_npy(out_keys, &Tensor { dtype, shape: dims.clone(), data: rows.keys })?;
    tensorfile::write_npy(out_values, &Tensor { dtype, shape: dims, data: rows.values })?;
    emit(json, &serde_json::json!({ "rows": n }), |_| {
        format!("wrote {n} rows to {} and {}\n", out_keys.display(), out_values.display())
    });
    Ok(())
}

/// `pnmctl gather`.
fn gather(cli: &Cli, device: &Device, args: &GatherArgs) -> Result<(), CliError> {
    let GatherArgs { stream, indices, out_keys, out_values } = args;
    let StreamArgs { seq, layer, head } = stream;
    let sequence = device.kv_sequence(*seq)?;
    check_stream(&sequence, *layer, *head)?;
    if let Some(bad) = indices.iter().find(|&&i| u64::from(i) >= sequence.tokens) {
        return Err(usage(format!(
            "token {bad} out of range: sequence {seq} has {} tokens",
            sequence.tokens
        )));
    }
    let rows = device.gather(&sequence, *layer, *head, indices)?;
    write_rows(cli.json, rows, sequence.shape, out_keys, out_values)
}
