//! pnm-firmware: what the PNM device computes, independent of how commands
//! reach it. Pure and deterministic: no I/O, no clocks, no threads.

pub mod limits;

pub use limits::{Dtype, FirmwareLimits, LIMITS};
