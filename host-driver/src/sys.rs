//! The host crate's one unsafe module: turning a mapping of the region into
//! a [`SharedMemory`] view.
#![allow(unsafe_code)]

use memmap2::MmapRaw;
use pnm_protocol::SharedMemory;

/// A shared mapping and the view through which all of the driver's accesses go.
#[derive(Debug)]
pub struct Mapping {
    // Kept alive as long as `view` is; `Device` owns both and hands out
    // only methods, never the view, beyond its own lifetime.
    _map: MmapRaw,
    view: SharedMemory,
}

impl Mapping {
    pub fn new(map: MmapRaw) -> Self {
        // SAFETY: `map` is a live MAP_SHARED mapping of `map.len()` bytes,
        // page-aligned (so 8-aligned), owned by this struct and dropped with
        // it; the driver never forms references into it.
        let view = unsafe { SharedMemory::new(map.as_mut_ptr(), map.len()) };
        Self { _map: map, view }
    }

    pub fn view(&self) -> SharedMemory {
        self.view
    }
}

/// Restores the default SIGPIPE action, so a command-line tool whose output
/// is piped into `head` ends quietly, as Unix tools do, instead of failing
/// on the write (Rust ignores SIGPIPE by default).
pub fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_DFL installs no handler code, so none of `signal`'s
    // handler-safety requirements apply; callers do this at start-up.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        tracing::debug!(error = %e, "cannot restore SIGPIPE");
    }
}

/// Takes ownership of a descriptor the kernel just installed for us from an
/// SCM_RIGHTS message.
pub fn own_received_fd(raw: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `raw` came from a control message recvmsg just returned: the
    // kernel installed it in this process's table for this caller alone, and
    // nothing else refers to it, so the OwnedFd is its sole owner.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// The descriptor of an eventfd that vfio-ioctls takes (it has no `AsFd`),
/// borrowed for polling.
#[cfg(feature = "vfio")]
pub fn eventfd_as_fd(fd: &vmm_sys_util::eventfd::EventFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the EventFd owns its descriptor and keeps it open for as long
    // as it lives, which the borrow cannot outlast.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// Registers an owned descriptor with tokio's reactor.
#[cfg(feature = "async")]
pub fn register_async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of `fd`: it stays open, and
    // `as_raw_fd` returns the same descriptor, for the AsyncFd's lifetime.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
