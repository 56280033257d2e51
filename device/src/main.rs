//! `pnm-device`: serve a cxl-pnm device on a shared-memory region until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use pnm_device::region::RegionLoss;
use pnm_device::{DeviceConfig, RegionConfig, RunningDevice, UnitConfig};
use pnm_firmware::timing::HardwareProfile;
use pnm_protocol::layout::parse_size;

/// Emulated CXL processing-near-memory device for LLM KV caches.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Region file (created if missing). QEMU ivshmem can map the same file as BAR2.
    #[arg(long, default_value = "/dev/shm/cxl-pnm0")]
    path: PathBuf,
    /// Region size, a power of two (e.g. 1GiB, 256MiB). Default for a new
    /// region: 1GiB; an existing region keeps its size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Host DMA window size of a new region (default: size/8, 1MiB..=256MiB).
    #[arg(long, value_parser = parse_size)]
    dma_window: Option<u64>,
    /// Compute-unit threads, 1-256 (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    compute_units: Option<u32>,
    /// Leave the compute units to the scheduler instead of pinning each to
    /// its own CPU (e.g. when several devices share the machine's CPUs).
    #[arg(long)]
    no_pin: bool,
    /// Start afresh: discard the region's contents (every stored sequence),
    /// also when the file is not a valid region or has another size.
    /// Without it the device keeps what it finds, and refuses to start on
    /// a damaged or foreign file rather than overwrite it.
    #[arg(long)]
    reformat: bool,
    /// Serve the fault injection commands (Inject Event Record, C005h):
    /// for tests and fault scripts; any host that can open the region may
    /// then inject.
    #[arg(long)]
    allow_injection: bool,
    /// Notification socket (ivshmem-server protocol) for eventfd doorbells
    /// and interrupts. Default: the region path + ".sock".
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve the device as a PCI function (a CXL memory device, class
    /// 050210h) over vfio-user on this socket, for QEMU's
    /// `-device vfio-user-pci,socket=...`: Linux's cxl_pci binds it.
    #[arg(long, value_name = "SOCKET")]
    vfio_user: Option<PathBuf>,
    /// Timing model: a built-in profile (cxl-pnm, cxl-expander, host-ddr)
    /// or a .toml file; every completion carries the modelled time.
    #[arg(long, default_value = "cxl-pnm")]
    profile: String,
}

fn main() -> ExitCode {
    pnm_logging::init("info");
    let args = Args::parse();

    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only `wait` below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("pnm-device: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }

    let profile = if args.profile.ends_with(".toml") {
        std::fs::read_to_string(&args.profile)
            .map_err(|e| e.to_string())
            .and_then(|text| HardwareProfile::from_toml(&text).map_err(|e| e.to_string()))
    } else {
        HardwareProfile::named(&args.profile).map_err(|e| e.to_string())
    };
    let profile = match profile {
        Ok(profile) => profile,
        Err(e) => {
            eprintln!("pnm-device: --profile {}: {e}", args.profile);
            return ExitCode::FAILURE;
        }
    };
    let config = DeviceConfig {
        region: RegionConfig {
            path: args.path,
            size: args.size,
            dma_window: args.dma_window,
            reformat: args.reformat,
        },
        units: UnitConfig { count: args.compute_units, pin: !args.no_pin },
        socket: args.socket,
        profile: Some(profile),
        allow_injection: args.allow_injection,
        vfio_user: args.vfio_user,
    };
    let mut device = match RunningDevice::start(&config) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("pnm-device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fault = wait_for_stop(&signals, &device);
    device.stop();
    match fault {
        Some(why) => {
            eprintln!("pnm-device: {why}");
            ExitCode::from(2)
        }
        None => ExitCode::SUCCESS,
    }
}

/// Waits for SIGINT or SIGTERM, or for the device to stop serving on its
/// own (its region truncated under it), whose reason it returns.
fn wait_for_stop(signals: &SigSet, device: &RunningDevice) -> Option<RegionLoss> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let fd = match SignalFd::with_flags(signals, SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "no signalfd; stopping");
            return None;
        }
    };
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u8)) {
            Ok(n) if n > 0 => {
                if let Ok(Some(info)) = fd.read_signal() {
                    tracing::info!(signal = info.ssi_signo, "stopping");
                }
                return None;
            }
            Err(e) if e != nix::errno::Errno::EINTR => {
                tracing::error!(error = %e, "waiting for signals failed; stopping");
                return None;
            }
            _ => {
                if let Some(why) = device.fault() {
                    return Some(why);
                }
            }
        }
    }
}
