//! `pnmctl`: talk to a cxl-pnm device from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use pnm_host::{Device, DeviceOptions};
use serde::Serialize;

/// Control a cxl-pnm device.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The device's region file.
    #[arg(long, global = true, default_value = "/dev/shm/cxl-pnm0")]
    device: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Mailbox command timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 2000)]
    timeout_ms: u64,
    /// Wait up to this many milliseconds for the device to become ready.
    #[arg(long, global = true, default_value_t = 0)]
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
    /// Get or set the device timestamp (0300h / 0301h).
    Timestamp {
        #[command(subcommand)]
        action: Option<TimestampAction>,
    },
    /// The Command Effects Log: every command the device supports (0400h / 0401h).
    Logs,
    /// Identify PNM (C000h): region layout, compute units, firmware limits.
    PnmInfo,
    /// Live register status: readiness, heartbeat, serving pid, counters.
    Status,
    /// Reset the device (mailbox and volatile state; device DRAM is kept).
    Reset,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
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

fn run(cli: &Cli) -> pnm_host::Result<()> {
    let options = DeviceOptions {
        mailbox_timeout: Duration::from_millis(cli.timeout_ms),
        wait_ready: Some(Duration::from_millis(cli.wait_ms)),
        ..Default::default()
    };
    let device = Device::open_with(&cli.device, &options)?;
    match &cli.command {
        Command::Identify => emit(cli.json, &device.identify()?, |id| {
            format!(
                "firmware revision   {}\ntotal capacity      {}\nvolatile only       {}\n\
                 persistent only     {}\npartition alignment {}\nLSA size            {}\n\
                 poison list max     {}\n",
                id.fw_revision,
                bytes(id.total_capacity_bytes),
                bytes(id.volatile_only_capacity_bytes),
                bytes(id.persistent_only_capacity_bytes),
                bytes(id.partition_alignment_bytes),
                id.lsa_size,
                id.poison_list_max_records,
            )
        }),
        Command::Health => emit(cli.json, &device.health_info()?, |h| {
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
        }),
        Command::Timestamp { action } => {
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
        }
        Command::Logs => {
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
        }
        Command::PnmInfo => emit(cli.json, &device.identify_pnm()?, |p| {
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
        }),
        Command::Status => {
            let status = device.status();
            emit(cli.json, &status, |s| {
                format!(
                    "media ready         {}\nmailbox ready       {}\nfatal / fw halt     {} / {}\n\
                     heartbeat           {} (every {} us)\ndevice pid          {}\nresets              {}\n\
                     dirty shutdowns     {}\n",
                    s.media_ready,
                    s.mailbox_ready,
                    s.fatal,
                    s.fw_halt,
                    s.heartbeat,
                    s.heartbeat_period_us,
                    s.device_pid,
                    s.reset_count,
                    s.dirty_shutdown_count,
                )
            });
        }
        Command::Reset => {
            device.reset(Duration::from_millis(cli.timeout_ms))?;
            let status = device.status();
            emit(cli.json, &status, |s| {
                format!("reset complete (resets so far: {})\n", s.reset_count)
            });
        }
    }
    Ok(())
}
