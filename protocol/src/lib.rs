//! pnm-protocol: the ABI between a cxl-pnm device and its host driver.
//!
//! - [`regs`]: the CXL device register block (capabilities array, device
//!   status, primary mailbox, memory device status) and the vendor PNM
//!   capability, each offset defined once.
//! - [`commands`]: mailbox opcodes, return codes and payload layouts.
//! - [`events`]: event records and the event log commands' payloads.
//! - [`media`]: the poison list, Scan Media and media fault injection.
//! - [`queue`]: submission/completion rings, command descriptors, KV frames.
//! - [`notify`]: the ivshmem-server-shaped socket protocol for eventfds.
//! - [`pci`]: the device as a PCI Express function: configuration space,
//!   BARs, the CXL DVSECs.
//! - [`vfio_user`]: the vfio-user protocol that serves that function to QEMU.
//! - [`faults`]: Inject Device Fault, the fault injection control plane.
//! - [`layout`]: how the shared region is split between registers, the host
//!   DMA window and device DRAM.
//! - [`shared`]: the only way this workspace touches memory another process
//!   writes: atomics and copies, never references.
//!
//! This crate does no I/O. Every multi-byte field is little-endian, as in
//! the CXL specification.

pub mod commands;
pub mod events;
pub mod faults;
pub mod layout;
pub mod media;
pub mod notify;
pub mod pci;
pub mod queue;
pub mod regs;
pub mod shared;
pub mod vfio_user;

pub use commands::{Opcode, ReturnCode};
pub use layout::RegionLayout;
pub use queue::Dtype;
pub use shared::{OutOfBounds, SharedMemory};
