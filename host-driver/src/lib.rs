//! pnm-host: the cxl-pnm host driver.
//!
//! [`Device::open`] maps a device's region, walks its CXL capabilities array
//! and checks it is a ready cxl-pnm device; typed methods run mailbox
//! commands and validate every byte the device sends back.

#[cfg(feature = "async")]
pub mod async_api;
mod backoff;
pub mod commands;
pub mod device;
pub mod dma;
pub mod error;
pub mod kv;
pub mod mailbox;
pub mod media;
pub mod notify;
pub mod queue;
mod session;
pub mod set;
mod sys;
pub mod tiered;
pub mod transport;
#[cfg(feature = "vfio")]
pub mod vfio;

#[cfg(feature = "async")]
pub use async_api::AsyncQueue;
pub use commands::{MediaError, MediaFault, PoisonList, PoisonSource, ScanResults};
pub use device::{Device, DeviceOptions, DeviceState, DeviceStatus, Liveness};
pub use error::{Error, Result, VfioProblem};
pub use kv::{
    Aggregation, GatheredView, KvShape, PageSelection, Query, Rows, Sequence, TopK, TopkRequest,
};
pub use media::AffectedRows;
pub use pnm_protocol::Dtype;
pub use pnm_protocol::events::EventLog;
pub use queue::{Completion, InterruptConfig, QueueOptions};
pub use set::{DeviceSet, SetTopK, SetTopkRequest, ShardTime, ShardedSequence, Striping};
pub use sys::default_sigpipe;
pub use tiered::{AttendStats, TieredKv, TieredOptions};
pub use transport::{Interrupts, Transport};
