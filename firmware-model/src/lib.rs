//! pnm-firmware: what the PNM device computes, independent of how commands
//! reach it. Pure and deterministic: no I/O, no clocks, no threads.
//!
//! - [`limits`]: what the firmware supports.
//! - [`events`]: the four event logs (records, handles, overflow).
//! - [`integrity`]: the per-line checks that catch corrupted DRAM.
//! - [`media`]: the poison list.
//! - [`kv`]: the KV store's layout in device DRAM.
//! - [`kernels`]: scoring, aggregation and Top-K selection.
//! - [`timing`]: how long the modelled hardware would take (profiles in TOML).
//! - [`system`]: the talk's questions for a GPU server with CXL memory:
//!   stream-all, tiered and PNM decode steps, scaling, energy, cost.

pub mod events;
pub mod integrity;
pub mod kernels;
pub mod kv;
pub mod limits;
pub mod media;
pub mod simd;
pub mod system;
pub mod timing;

pub use limits::{Dtype, FirmwareLimits, LIMITS};
