//! The main job: start an embedded cxl-pnm device (no setup) or attach to a
//! running one, and drive it through the real host driver.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pnm_device::{Region, RunningDevice};
use pnm_host::Device;
use pnm_protocol::layout::parse_size;

/// cxl-pnm demo: an emulated CXL processing-near-memory device for LLM KV caches.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Attach to a running pnm-device at this region path instead of
    /// starting an embedded one.
    #[arg(long)]
    device: Option<PathBuf>,
    /// Size of the embedded device's region (a power of two).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    size: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    // The embedded device lives in this process on a memfd; the driver
    // reaches it by path exactly as it would a separate pnm-device.
    let embedded = match &args.device {
        Some(_) => None,
        None => {
            let region =
                Region::embedded(args.size, None).context("creating the embedded region")?;
            Some(RunningDevice::serve(region, None)?)
        }
    };
    let path = match (&args.device, &embedded) {
        (Some(path), _) => path.clone(),
        (None, Some(device)) => device.region().path.clone(),
        (None, None) => unreachable!("one of the two is set"),
    };
    let device = Device::open(&path).with_context(|| format!("opening {}", path.display()))?;

    let identify = device.identify()?;
    let health = device.health_info()?;
    let pnm = device.identify_pnm()?;
    if args.json {
        let report = serde_json::json!({ "identify": identify, "health": health, "pnm": pnm });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("cxl-pnm device at {}", path.display());
        println!(
            "  firmware {} | ABI {} | {} compute units",
            identify.fw_revision, pnm.abi_version, pnm.compute_units
        );
        println!(
            "  device DRAM {} MiB (Identify: {} MiB volatile capacity in 256 MiB units)",
            pnm.dram_size >> 20,
            identify.volatile_only_capacity_bytes >> 20
        );
        println!("  host DMA window {} MiB", pnm.dma_window_size >> 20);
        println!(
            "  firmware limits: dtypes {}, head_dim <= {}, k <= {}, GQA group <= {}",
            pnm.dtypes.join("/"),
            pnm.max_head_dim,
            pnm.max_k,
            pnm.max_group
        );
        println!(
            "  health: {} | media status {} | dirty shutdowns {}",
            if health.maintenance_needed || health.performance_degraded {
                "attention"
            } else {
                "normal"
            },
            health.media_status,
            health.dirty_shutdown_count
        );
    }
    Ok(())
}
