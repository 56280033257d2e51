//! pnm-device: the emulated cxl-pnm device.
//!
//! A device maps the shared region (a file, by default under /dev/shm, or a
//! memfd for an embedded device), gives the CXL registers their semantics and
//! serves the mailbox on a dedicated engine thread.

pub mod dma;
pub mod engine;
pub mod executor;
pub mod faults;
mod idle;
pub mod mailbox;
pub mod notify;
pub mod queues;
pub mod refusal;
pub mod region;
mod sys;
mod units;
pub mod vfio_user;

pub use engine::{DeviceConfig, Listen, RunningDevice, UnitConfig};
pub use region::{Region, RegionConfig, RegionError};
