//! The transport: how this host reaches one device. Everything above it
//! (mailbox, DMA buffers, queues, KV, Top-K, the async API) sees only a
//! [`Transport`]: the region mapped into this process, a way to wake a
//! device that went to sleep, and this host's interrupt vectors.
//!
//! [`RegionFile`] maps the device's region file and talks to its
//! ivshmem-shaped notification socket. `vfio::VfioTransport` (a
//! PCI device in a guest: BAR2 mapped as the region, BAR0's Doorbell
//! register as the wake, MSI-X eventfds as the vectors) implements the same
//! trait.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapOptions;
use pnm_protocol::SharedMemory;
use pnm_protocol::commands::Owner;
use pnm_protocol::regs::REGISTER_BLOCK_SIZE;

use crate::error::{Error, Result};
use crate::notify::NotifyClient;
use crate::sys::Mapping;

/// One device as this host reaches it.
pub trait Transport: fmt::Debug + Send + Sync {
    /// The whole region: register block | host DMA window | device DRAM.
    fn region(&self) -> SharedMemory;

    /// Rings the device's wake vector (nothing if the transport has none:
    /// then the device polls).
    fn wake_device(&self);

    /// This host's interrupt vectors, if the transport delivers interrupts.
    fn interrupts(&self) -> Option<&dyn Interrupts>;

    /// The notification peer this host is, if it is a guest: its processes'
    /// PIDs mean nothing to the device's host, so what they own is the
    /// peer's ([`Owner::Guest`]).
    fn guest_peer(&self) -> Option<u16> {
        None
    }
}

/// Who this process is to the device, over `transport`.
pub(crate) fn owner(transport: &dyn Transport) -> Owner {
    let pid = std::process::id();
    match transport.guest_peer() {
        Some(peer) => Owner::Guest { pid, peer },
        None => Owner::Process(pid),
    }
}

/// The vectors a device interrupts this host on.
pub trait Interrupts: fmt::Debug + Send + Sync {
    /// The id the device knows this host's vectors by (Create Queue Pair's
    /// Peer ID).
    fn peer_id(&self) -> u16;

    /// Waits (bounded) until vector `v` is rung; whether it was.
    fn wait_vector(&self, v: u16, timeout: Duration) -> bool;

    /// Vector `v`'s eventfd, for an async reactor.
    fn vector_fd(&self, v: u16) -> BorrowedFd<'_>;
}

impl Interrupts for NotifyClient {
    fn peer_id(&self) -> u16 {
        self.peer_id
    }

    fn wait_vector(&self, v: u16, timeout: Duration) -> bool {
        NotifyClient::wait_vector(self, v, timeout)
    }

    fn vector_fd(&self, v: u16) -> BorrowedFd<'_> {
        self.vector(v).as_fd()
    }
}

/// A device's region file mapped into this process, and its notification
/// socket when there is one.
#[derive(Debug)]
pub struct RegionFile {
    mapping: Mapping,
    notify: Option<NotifyClient>,
}

/// How to reach a region file's device.
#[derive(Debug, Clone)]
pub struct RegionFileOptions {
    /// The device's notification socket, if any.
    pub socket: Option<PathBuf>,
    /// Fail without the socket (interrupts were asked for, or it was named).
    pub socket_required: bool,
    pub connect_timeout: Duration,
}

impl RegionFile {
    /// Maps the region file at `path` (read-write, shared) and connects to
    /// the notification socket.
    pub fn open(path: &Path, options: &RegionFileOptions) -> Result<Self> {
        let open_err = |error| Error::Open { path: path.to_path_buf(), error };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let not_a_device = |reason: String| Error::NotADevice { path: path.to_path_buf(), reason };
        if len < REGISTER_BLOCK_SIZE {
            return Err(not_a_device(format!(
                "{len} bytes is smaller than the {REGISTER_BLOCK_SIZE}-byte register block"
            )));
        }
        let len = usize::try_from(len).map_err(|_| not_a_device("too large to map".into()))?;
        let map = MmapOptions::new().len(len).map_raw(&file).map_err(open_err)?;
        let notify = match &options.socket {
            Some(socket) => match NotifyClient::connect(socket, options.connect_timeout) {
                Ok(client) => Some(client),
                Err(e) if options.socket_required => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "no notifications; polling only");
                    None
                }
            },
            None if options.socket_required => {
                return Err(Error::Invalid(format!(
                    "interrupts need the device's notification socket ({} not found)",
                    pnm_protocol::notify::socket_path(path).display()
                )));
            }
            None => None,
        };
        Ok(Self { mapping: Mapping::new(map), notify })
    }
}

impl Transport for RegionFile {
    fn region(&self) -> SharedMemory {
        self.mapping.view()
    }

    fn wake_device(&self) {
        if let Some(notify) = &self.notify {
            notify.wake_device();
        }
    }

    fn interrupts(&self) -> Option<&dyn Interrupts> {
        self.notify.as_ref().map(|n| n as &dyn Interrupts)
    }
}

/// How long a host that has just woken the device steps off its CPU.
const WAKE_NAP: Duration = Duration::from_micros(1);

/// Wakes the device after a doorbell if it went to sleep.
#[derive(Debug, Clone)]
pub(crate) struct Wake {
    transport: Arc<dyn Transport>,
    /// The Device Sleeping register.
    sleeping: u64,
}

impl Wake {
    pub(crate) fn new(transport: Arc<dyn Transport>, sleeping: u64) -> Self {
        Self { transport, sleeping }
    }

    /// After a doorbell store: wake the device if it went to sleep. The
    /// SeqCst fence pairs with the device's (see the engine's `sleep`).
    /// `polling`: the caller will spin for the answer (not block on an
    /// interrupt), so it first steps off its CPU for a moment.
    pub(crate) fn after_doorbell(&self, polling: bool) {
        std::sync::atomic::fence(SeqCst);
        if self.transport.region().load_u32(self.sleeping, SeqCst) != 0 {
            self.transport.wake_device();
            if polling {
                // On a virtual machine that runs its vCPUs on fewer host
                // CPUs, a waiter spinning at once keeps the engine's vCPU
                // from running (measured: docs/PERFORMANCE.md, "Command path").
                // A waiter that blocks on an interrupt steps off anyway.
                std::thread::sleep(WAKE_NAP);
            }
        }
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }
}
