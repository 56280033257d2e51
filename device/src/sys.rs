//! The device crate's one unsafe module: turning a mapping into a
//! [`SharedMemory`] view, and letting the kernels read device DRAM in place.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use memmap2::MmapRaw;
use nix::libc;
use pnm_firmware::simd::Rows;
use pnm_protocol::{Dtype, OutOfBounds, SharedMemory};

/// Calls `score` with `len` bytes of `mem` at `offset` as rows of `dtype`,
/// read where they lie, followed by the `next.1` bytes at `next.0` if there
/// are any and they lie inside the view ([`Rows::followed_by`]).
pub fn with_rows<R>(
    mem: SharedMemory,
    offset: u64,
    len: u64,
    next: (u64, u64),
    dtype: Dtype,
    score: impl FnOnce(Rows<'_>) -> R,
) -> Result<R, OutOfBounds> {
    let ptr = mem.read_ptr(offset, len)?;
    // SAFETY: the range is inside the view (checked by `read_ptr`), and the
    // mapping behind every view outlives the device's objects (see
    // `Mapping::new`), so it stays readable for this call. A host may write
    // the bytes meanwhile; `Rows` reads through raw pointers only, so that
    // can only make scores garbage.
    let rows = unsafe { Rows::from_raw(ptr, len as usize, dtype) };
    // A continuation of no bytes, or outside the view, is none.
    let (next_at, next_len) = next;
    let then = mem.read_ptr(next_at, next_len).ok().filter(|_| next_len > 0);
    Ok(score(match then {
        Some(at) => {
            // SAFETY: as above, a range `read_ptr` checked is inside the view.
            rows.followed_by(unsafe { Rows::from_raw(at, next_len as usize, dtype) })
        }
        None => rows,
    }))
}

/// A shared mapping of the region file and the view through which all of
/// the device's accesses go.
#[derive(Debug)]
pub struct Mapping {
    // Kept alive for as long as `view` (and its copies inside this crate) are used.
    map: MmapRaw,
    view: SharedMemory,
    /// Its SIGBUS guard slot.
    guard: Option<usize>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Before memmap2 unmaps it: the handler must not patch a range
        // that something else may map next.
        if let Some(slot) = self.guard.take() {
            unguard(slot);
        }
    }
}

impl Mapping {
    pub fn new(map: MmapRaw) -> Self {
        // SAFETY: `map` is a live MAP_SHARED mapping of `map.len()` bytes,
        // page-aligned (so 8-aligned), and it is stored next to the view and
        // dropped only with it. The view's copies never leave the device's
        // own objects, which the device joins before dropping the mapping.
        // This crate never forms references into the mapping.
        let view = unsafe { SharedMemory::new(map.as_mut_ptr(), map.len()) };
        let guard = guard(map.as_mut_ptr() as usize, map.len());
        Self { map, view, guard }
    }

    pub fn view(&self) -> SharedMemory {
        self.view
    }

    /// True once the file behind the mapping was found shorter than it (a
    /// SIGBUS was absorbed; the mapping now holds zeros): stop serving.
    pub fn lost(&self) -> bool {
        self.guard.is_some_and(|slot| LOST[slot].load(Ordering::Acquire))
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.map.flush()
    }
}

/// Mappings of region files this process serves, as (start, length): a
/// SIGBUS inside one means its file shrank under the device (any process
/// with write access can truncate it). Fixed slots, lock-free, because the
/// signal handler reads them.
const GUARDED_SLOTS: usize = 64;
static GUARDED: [(AtomicUsize, AtomicUsize); GUARDED_SLOTS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; GUARDED_SLOTS];
/// Per slot: set by the handler when it replaced that shrunken mapping.
static LOST: [AtomicBool; GUARDED_SLOTS] = [const { AtomicBool::new(false) }; GUARDED_SLOTS];

/// Guards `[start, start + len)` (a region mapping) against SIGBUS: a fault
/// in it replaces the whole mapping with zero pages, so the faulting
/// access and every later one complete, and [`Mapping::lost`] turns true.
/// Returns the slot to release with [`unguard`], or None if all are taken.
fn guard(start: usize, len: usize) -> Option<usize> {
    install_sigbus_handler();
    for (i, (s, l)) in GUARDED.iter().enumerate() {
        if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            LOST[i].store(false, Ordering::Release);
            l.store(len, Ordering::Release);
            return Some(i);
        }
    }
    None
}

fn unguard(slot: usize) {
    let (s, l) = &GUARDED[slot];
    l.store(0, Ordering::Release);
    s.store(0, Ordering::Release);
}

fn install_sigbus_handler() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_NODEFER,
            SigSet::empty(),
        );
        // SAFETY: `on_sigbus` is async-signal-safe: it reads atomics, calls
        // mmap (a system call) and stores an atomic. Installed once.
        if let Err(e) = unsafe { sigaction(Signal::SIGBUS, &action) } {
            tracing::warn!(error = %e, "no SIGBUS guard: a truncated region will kill the device");
        }
    });
}

extern "C" fn on_sigbus(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid, aligned siginfo to an SA_SIGINFO
    // handler for the handler's duration.
    let info = unsafe { &*info };
    // SAFETY: for SIGBUS the kernel fills in si_addr, the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    for (slot, (s, l)) in GUARDED.iter().enumerate() {
        let (start, len) = (s.load(Ordering::Acquire), l.load(Ordering::Acquire));
        if start != 0 && (start..start + len).contains(&addr) {
            // SAFETY: replaces exactly a mapping this process made and still
            // holds (its slot is released before it is unmapped) with
            // private zero pages of the same size: every pointer into it
            // stays valid, and reads see zeros instead of faulting again.
            let replaced = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if replaced != libc::MAP_FAILED {
                LOST[slot].store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not a region fault (or it could not be patched): die of it as usual.
    // SAFETY: resetting a disposition to the default is async-signal-safe;
    // returning re-runs the faulting access, which then kills the process.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Takes ownership of file descriptors that arrived as SCM_RIGHTS: the
/// kernel installed each in this process for this message, so nothing else
/// owns them yet.
pub fn adopt_received_fds(raw: &[std::os::fd::RawFd]) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    raw.iter()
        .filter(|&&fd| fd >= 0)
        .map(|&fd| {
            // SAFETY: `fd` was just installed by recvmsg for this message
            // and is owned by no other object; it is adopted exactly once.
            unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
        })
        .collect()
}

/// An eventfd a peer sent, checked to be one: anything else (a file, a
/// socket) is refused rather than written to.
pub fn received_eventfd(fd: std::os::fd::OwnedFd) -> std::io::Result<nix::sys::eventfd::EventFd> {
    use std::os::fd::AsRawFd;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an eventfd: {}", target.display()),
        ));
    }
    // SAFETY: the fd is an eventfd (its /proc link names the eventfd inode
    // type), as from_owned_fd requires; ownership moves into the EventFd.
    Ok(unsafe { nix::sys::eventfd::EventFd::from_owned_fd(fd) })
}
