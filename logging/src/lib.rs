//! pnm-logging: the one logging setup of the cxl-pnm binaries (`pnm-device`,
//! `pnmctl`, the main job). Logs and spans go to stderr, so stdout stays
//! the program's answer (JSON where a script reads it); `RUST_LOG` filters
//! them (`RUST_LOG=pnm_device=debug`, `RUST_LOG=trace`), and without it each
//! binary logs from its own default level up.

use tracing_subscriber::EnvFilter;

/// Installs the subscriber: `RUST_LOG` if set and valid, else
/// `default_level` (`"info"` for a long-running device, `"warn"` for tools
/// whose output is their answer). Call once, first thing in `main`.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// [`init`] for a library loaded into a host program (the Python binding):
/// does nothing if the program installed a subscriber already.
pub fn try_init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
