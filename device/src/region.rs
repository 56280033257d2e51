//! Creating, validating and formatting the shared region file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use memmap2::MmapOptions;
use nix::fcntl::{Flock, FlockArg};
use pnm_protocol::layout::{LayoutError, RegionLayout};
use pnm_protocol::pci;
use pnm_protocol::regs::{self, REGISTER_BLOCK_SIZE, mailbox, memdev_status, pnm};
use pnm_protocol::{SharedMemory, regs::CAP_HEADER_SIZE};
use zerocopy::IntoBytes;

use crate::sys::Mapping;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    // Causes are part of the messages, not `source`s: an error chain
    // printed whole would say them twice.
    #[error("cannot open region {path}: {error}")]
    Open { path: PathBuf, error: std::io::Error },
    #[error("region {path} is already served by another pnm-device (pid {pid})")]
    AlreadyServed { path: PathBuf, pid: u32 },
    #[error("cannot lock region {path}: {error}")]
    Lock { path: PathBuf, error: nix::Error },
    #[error("invalid region layout: {0}")]
    Layout(LayoutError),
    #[error(
        "{path} holds a pnm region of {existing} bytes but --size asks for {requested}; \
         omit --size to keep its contents, or pass --reformat to start afresh"
    )]
    SizeMismatch { path: PathBuf, existing: u64, requested: u64 },
    #[error(
        "{path} holds a pnm region with a {existing}-byte DMA window but {requested} was asked; \
         omit --dma-window to keep its contents, or pass --reformat"
    )]
    WindowMismatch { path: PathBuf, existing: u64, requested: u64 },
    #[error(
        "{path} is not empty and is not a valid pnm region ({reason}); \
         pass --reformat to overwrite it"
    )]
    NotARegion { path: PathBuf, reason: NotARegion },
    #[error(
        "KV store in {path}: {reason}; the device will not discard it on its own: \
         pass --reformat to start afresh (every stored sequence is lost)"
    )]
    KvStore { path: PathBuf, reason: pnm_firmware::kv::KvError },
    #[error(
        "a {} MiB region does not fit where {path} lives: {} MiB free; ask for less with --size",
        size >> 20,
        room >> 20
    )]
    NoRoom { path: PathBuf, size: u64, room: u64 },
    #[error("notification socket {path}: {error}")]
    Socket { path: PathBuf, error: std::io::Error },
    #[error("cannot size or map region {path}: {error}")]
    Map { path: PathBuf, error: std::io::Error },
}

impl From<LayoutError> for RegionError {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}

/// Why a file is not a region this device can serve.
#[derive(Debug, thiserror::Error)]
pub enum NotARegion {
    #[error("{0} bytes is smaller than a register block")]
    TooSmall(u64),
    #[error("its register block cannot be read: {0}")]
    Unreadable(std::io::Error),
    #[error("no PNM magic")]
    NoMagic,
    #[error("ABI version {major}.{minor} (this device speaks {}.x)", regs::ABI_VERSION_MAJOR)]
    Abi { major: u32, minor: u32 },
    #[error("{0}")]
    Layout(LayoutError),
}

impl From<LayoutError> for NotARegion {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}

/// Why a served region can no longer be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionLoss {
    #[error("the region file {} shrank to {size} bytes under the device (it maps {mapped})", path.display())]
    Shrank { path: PathBuf, size: u64, mapped: u64 },
    #[error("an access to region {} faulted (SIGBUS): its file was truncated", path.display())]
    Faulted { path: PathBuf },
}

/// What to serve and how to find or make it.
#[derive(Debug, Clone, Default)]
pub struct RegionConfig {
    pub path: PathBuf,
    /// Size of a new region; an existing one must match if given.
    pub size: Option<u64>,
    /// Host DMA window of a new region (default: see [`RegionLayout::new`]).
    pub dma_window: Option<u64>,
    /// Overwrite a file that is not a valid region, or whose size differs.
    pub reformat: bool,
}

/// Size of a new region when none is given.
pub const DEFAULT_REGION_SIZE: u64 = 1 << 30;

/// An opened, locked and mapped region.
#[derive(Debug)]
pub struct Region {
    pub path: PathBuf,
    pub layout: RegionLayout,
    /// True if the DRAM contents were kept from an earlier device.
    pub kept_contents: bool,
    /// True if the earlier device did not stop cleanly.
    pub dirty_shutdown: bool,
    pub(crate) mapping: Mapping,
    // Held for the device's lifetime: the lock is what keeps a second
    // device off this region, and the kernel drops it if we die.
    lock: Flock<File>,
}

impl Region {
    pub fn regs(&self) -> SharedMemory {
        self.mapping.view()
    }

    /// Opens (or creates) and locks the region described by `config`.
    pub fn open(config: &RegionConfig) -> Result<Self, RegionError> {
        let path = config.path.clone();
        // A bad request is refused before a file is created for it.
        if let Some(size) = config.size {
            RegionLayout::new(size, config.dma_window)?;
        }
        if let Some(advice) = small_page_advice(&path) {
            tracing::warn!("{advice}");
        }
        let open = |create_new: bool| {
            OpenOptions::new().read(true).write(true).create_new(create_new).mode(0o660).open(&path)
        };
        // Whether this start made the file: a start that fails leaves
        // nothing behind then.
        let (file, created) = match open(true) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file =
                    open(false).map_err(|error| RegionError::Open { path: path.clone(), error })?;
                (file, false)
            }
            Err(error) => return Err(RegionError::Open { path, error }),
        };
        restrict_to_owner_and_group(&file, &path)
            .map_err(|error| RegionError::Open { path: path.clone(), error })?;
        Self::from_file(file, config).inspect_err(|_| {
            if created && std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                let _ = std::fs::remove_file(&path);
            }
        })
    }

    /// Locks and maps an already open file (a memfd for an embedded device).
    pub fn from_file(file: File, config: &RegionConfig) -> Result<Self, RegionError> {
        let path = config.path.clone();
        // A bad request is refused before anything is looked at or changed.
        if let Some(size) = config.size {
            RegionLayout::new(size, config.dma_window)?;
        }
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = peek_device_pid(&path).unwrap_or(0);
                return Err(RegionError::AlreadyServed { path, pid });
            }
            Err((_, error)) => return Err(RegionError::Lock { path, error }),
        };
        let map_err = |error| RegionError::Map { path: path.clone(), error };
        let existing_len = lock.metadata().map_err(map_err)?.len();

        // Decide between keeping an existing region and formatting one.
        // --reformat always starts afresh, whatever the file holds.
        let existing = if existing_len == 0 {
            None
        } else {
            match inspect(&lock, existing_len) {
                Ok(layout) => Some(layout),
                Err(reason) if config.reformat => {
                    tracing::warn!(%reason, path = %path.display(), "--reformat: overwriting");
                    None
                }
                Err(reason) => return Err(RegionError::NotARegion { path, reason }),
            }
        };
        let (layout, keep) = match existing {
            Some(layout) if config.reformat => {
                // A valid region keeps its size and window unless told otherwise.
                tracing::warn!(path = %path.display(), "--reformat: discarding every stored sequence");
                let size = config.size.unwrap_or(layout.size);
                let window =
                    config.dma_window.or((size == layout.size).then_some(layout.dma_window_size));
                (RegionLayout::new(size, window)?, false)
            }
            Some(layout) => {
                if let Some(requested) = config.size.filter(|&s| s != layout.size) {
                    return Err(RegionError::SizeMismatch {
                        path,
                        existing: layout.size,
                        requested,
                    });
                }
                if let Some(requested) = config
                    .dma_window
                    .filter(|&w| RegionLayout::new(layout.size, Some(w)) != Ok(layout))
                {
                    return Err(RegionError::WindowMismatch {
                        path,
                        existing: layout.dma_window_size,
                        requested,
                    });
                }
                (layout, true)
            }
            None => (
                RegionLayout::new(config.size.unwrap_or(DEFAULT_REGION_SIZE), config.dma_window)?,
                false,
            ),
        };

        if !keep {
            check_room(&lock, &path, existing_len, layout.size)?;
            discard_contents(&lock, existing_len, layout.size).map_err(map_err)?;
        }
        let map = MmapOptions::new().len(layout.size as usize).map_raw(&*lock).map_err(map_err)?;
        // Huge pages for device DRAM where the kernel allows them (tmpfs
        // needs shmem_enabled = advise or always): fewer TLB misses when
        // scanning keys. Refused or unsupported is fine: 4 KiB pages work.
        if let Err(e) = map.advise_range(
            memmap2::Advice::HugePage,
            layout.dram_offset as usize,
            layout.dram_size as usize,
        ) {
            tracing::debug!(error = %e, "huge pages not available for device DRAM");
        }
        let mapping = Mapping::new(map);
        let view = mapping.view();
        // A damaged KV store stops the start before the device writes
        // anything: only --reformat discards contents.
        if keep {
            let dram = crate::executor::DramView::new(view, &layout);
            if let Err(e) = pnm_firmware::kv::KvStore::check_superblock(&dram) {
                return Err(RegionError::KvStore { path, reason: e });
            }
        }
        let dirty_shutdown = keep
            && view.load_u32(regs::PNM_OFFSET + pnm::SHUTDOWN_STATE, Acquire)
                != pnm::SHUTDOWN_CLEAN;
        write_register_block(view, &layout, !keep);
        Ok(Self { path, layout, kept_contents: keep, dirty_shutdown, mapping, lock })
    }

    /// An anonymous region for a device embedded in the host's process:
    /// a memfd, reachable by path as `/proc/self/fd/N` while it lives. It
    /// is backed by huge pages (hugetlbfs) when the machine has enough of
    /// them reserved (`vm.nr_hugepages`), else by ordinary shared memory.
    pub fn embedded(size: u64, dma_window: Option<u64>) -> Result<Self, RegionError> {
        use nix::sys::memfd::MFdFlags;
        match Self::memfd(size, dma_window, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_HUGETLB) {
            Ok(region) => {
                tracing::info!(size, "embedded region in huge pages (hugetlbfs)");
                Ok(region)
            }
            Err(e) => {
                // No huge pages reserved, or too few: the mmap refuses at
                // once (hugetlbfs reserves at map time), nothing to undo.
                tracing::debug!(error = %e, "no hugetlbfs memfd for the embedded region");
                Self::memfd(size, dma_window, MFdFlags::MFD_CLOEXEC)
            }
        }
    }

    fn memfd(
        size: u64,
        dma_window: Option<u64>,
        flags: nix::sys::memfd::MFdFlags,
    ) -> Result<Self, RegionError> {
        use std::os::fd::AsRawFd;
        let name = "pnm-region";
        let fd = nix::sys::memfd::memfd_create(name, flags)
            .map_err(|e| RegionError::Open { path: name.into(), error: e.into() })?;
        let file = File::from(fd);
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Self::from_file(file, &RegionConfig { path, size: Some(size), dma_window, reformat: false })
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.mapping.flush()
    }

    /// Why the region can no longer be served, if it cannot: its file was
    /// shrunk under the device (a host with write access can truncate it).
    /// Seen either by the file's size or by a SIGBUS the device absorbed.
    pub fn lost(&self) -> Option<RegionLoss> {
        let size = self.lock.metadata().map(|m| m.len()).unwrap_or(self.layout.size);
        let path = self.path.clone();
        if size < self.layout.size {
            Some(RegionLoss::Shrank { path, size, mapped: self.layout.size })
        } else if self.mapping.lost() {
            Some(RegionLoss::Faulted { path })
        } else {
            None
        }
    }

    /// A number that names this region file while it exists, the same for
    /// every device that serves it (its file system's device and inode).
    pub fn file_identity(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.lock.metadata().map_or(0, |m| m.dev().rotate_left(40) ^ m.ino())
    }

    /// The region file opened again (for the notification protocol, which
    /// hands the shared memory to its clients). A new open file
    /// description, not a dup: the device's `flock` belongs to its own
    /// description, and a client holding a dup (QEMU keeps the fd it maps)
    /// would hold the lock after the device died and refuse its restart.
    pub fn reopen_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsRawFd;
        let reopened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", self.lock.as_raw_fd()))?;
        Ok(reopened.into())
    }
}

/// Reads the serving device's pid from a region another process has locked.
fn peek_device_pid(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    let mut buf = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, regs::PNM_OFFSET + pnm::DEVICE_PID)
        .ok()?;
    Some(u32::from_le_bytes(buf))
}

/// Checks whether a file holds a region this ABI can serve, returning its layout.
fn inspect(file: &File, len: u64) -> Result<RegionLayout, NotARegion> {
    use std::os::unix::fs::FileExt;
    if len < REGISTER_BLOCK_SIZE {
        return Err(NotARegion::TooSmall(len));
    }
    let mut page = vec![0u8; 0x100];
    file.read_exact_at(&mut page, regs::PNM_OFFSET).map_err(NotARegion::Unreadable)?;
    let u32_at = |off: u64| u32::from_le_bytes(page[off as usize..][..4].try_into().unwrap());
    let u64_at = |off: u64| u64::from_le_bytes(page[off as usize..][..8].try_into().unwrap());
    if u64_at(pnm::MAGIC) != pnm::MAGIC_VALUE {
        return Err(NotARegion::NoMagic);
    }
    let abi = u32_at(pnm::ABI_VERSION);
    if abi >> 16 != u32::from(regs::ABI_VERSION_MAJOR) {
        return Err(NotARegion::Abi { major: abi >> 16, minor: abi & 0xFFFF });
    }
    let layout = RegionLayout {
        size: u64_at(pnm::REGION_SIZE),
        dma_window_offset: u64_at(pnm::DMA_WINDOW_OFFSET),
        dma_window_size: u64_at(pnm::DMA_WINDOW_SIZE),
        dram_offset: u64_at(pnm::DRAM_OFFSET),
        dram_size: u64_at(pnm::DRAM_SIZE),
    };
    layout.validate(len)?;
    Ok(layout)
}

/// Writes a CXL device register block's capability array, an idle mailbox
/// (announcing the background command interrupt if `background_irq`) and
/// a clear Event Status.
fn write_device_capabilities(
    view: SharedMemory,
    capabilities: &[regs::CapabilityPlacement],
    background_irq: bool,
) {
    let header = regs::cap_array_header(capabilities.len());
    write_block(view, regs::CAP_ARRAY_OFFSET, header.as_bytes());
    for (i, cap) in capabilities.iter().enumerate() {
        let at = regs::CAP_ARRAY_OFFSET + CAP_HEADER_SIZE * (i as u64 + 1);
        write_block(view, at, regs::cap_header(cap).as_bytes());
    }
    view.store_u32(regs::DEVICE_STATUS_OFFSET + regs::DEVICE_STATUS_EVENT_STATUS, 0, Relaxed);

    let mb = regs::MAILBOX_OFFSET;
    let mut caps = regs::MAILBOX_PAYLOAD_SIZE_LOG2;
    if background_irq {
        caps |= mailbox::CAP_BACKGROUND_IRQ
            | u32::from(mailbox::BACKGROUND_IRQ_VECTOR) << mailbox::CAP_IRQ_MESSAGE_SHIFT;
    }
    view.store_u32(mb + mailbox::CAPABILITIES, caps, Relaxed);
    view.store_u32(mb + mailbox::CONTROL, 0, Relaxed);
    view.store_u64(mb + mailbox::COMMAND, 0, Relaxed);
    view.store_u64(mb + mailbox::STATUS, 0, Relaxed);
    view.store_u64(mb + mailbox::BACKGROUND_STATUS, 0, Relaxed);
}

/// A PCI function's own CXL device register block (`pnm_protocol::pci`,
/// BAR4): a sealed memfd of [`pci::FUNCTION_REGS_SIZE`] bytes that the
/// device maps and hands to QEMU to map into the guest. The engine serves
/// its mailbox beside the region's; no host can reach it.
#[derive(Debug)]
pub struct FunctionRegisters {
    file: File,
    mapping: Mapping,
}

impl FunctionRegisters {
    pub fn create() -> std::io::Result<Self> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::MFdFlags;
        let size = pci::FUNCTION_REGS_SIZE;
        let fd = nix::sys::memfd::memfd_create(
            "pnm-function-regs",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        file.set_len(size)?;
        // The client maps it too: sealed, it can neither shrink it under
        // the device (a SIGBUS) nor grow it.
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        let map = memmap2::MmapOptions::new().len(size as usize).map_raw(&file)?;
        let registers = Self { file, mapping: Mapping::new(map) };
        registers.reset();
        Ok(registers)
    }

    /// Back to a freshly started block: capability array, idle mailbox, ready.
    pub fn reset(&self) {
        let view = self.view();
        view.store_u64(regs::MEMDEV_STATUS_OFFSET, 0, Release);
        write_device_capabilities(view, &regs::FUNCTION_CAPABILITIES, false);
        view.store_u64(regs::MEMDEV_STATUS_OFFSET, memdev_status::READY, Release);
    }

    pub fn view(&self) -> SharedMemory {
        self.mapping.view()
    }

    /// A new descriptor of the memfd, for a client to map.
    pub fn fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }
}

/// Writes the register block's read-only contents: the capability array,
/// mailbox capabilities and the PNM capability's layout registers. Run-time
/// registers (status, heartbeat, pid) are the engine's. When `fresh`, the
/// persistent counters start from zero.
fn write_register_block(regs_view: SharedMemory, layout: &RegionLayout, fresh: bool) {
    // Take the device out of service first, so a host that maps us midway
    // sees "not ready" rather than a half-written block.
    regs_view.store_u64(regs::MEMDEV_STATUS_OFFSET, 0, Release);

    write_device_capabilities(regs_view, &regs::CAPABILITIES, true);

    let p = regs::PNM_OFFSET;
    regs_view.store_u64(p + pnm::MAGIC, pnm::MAGIC_VALUE, Relaxed);
    regs_view.store_u32(p + pnm::ABI_VERSION, regs::ABI_VERSION, Relaxed);
    regs_view.store_u64(p + pnm::REGION_SIZE, layout.size, Relaxed);
    regs_view.store_u64(p + pnm::DMA_WINDOW_OFFSET, layout.dma_window_offset, Relaxed);
    regs_view.store_u64(p + pnm::DMA_WINDOW_SIZE, layout.dma_window_size, Relaxed);
    regs_view.store_u64(p + pnm::DRAM_OFFSET, layout.dram_offset, Relaxed);
    regs_view.store_u64(p + pnm::DRAM_SIZE, layout.dram_size, Relaxed);
    regs_view.store_u32(p + pnm::RESET_CONTROL, 0, Relaxed);
    regs_view.store_u32(p + pnm::DOORBELL_STRIDE, pnm::DOORBELL_STRIDE_BYTES, Relaxed);
    regs_view.store_u32(p + pnm::DOORBELL_OFFSET, pnm::DOORBELL_PAGE as u32, Relaxed);
    regs_view.store_u32(p + pnm::IRQ_MASK_OFFSET, pnm::IRQ_MASK_PAGE as u32, Relaxed);
    regs_view.store_u32(p + pnm::DEVICE_SLEEPING, 0, Relaxed);
    // A lock left by a host of an earlier device guards nothing now.
    regs_view.store_u64(p + pnm::MAILBOX_LOCK, 0, Relaxed);
    regs_view.store_u32(p + pnm::MAILBOX_LOCK_LEASE, pnm::MAILBOX_LOCK_LEASE_MS, Relaxed);
    regs_view.store_u32(p + pnm::MAILBOX_LOCK_BREAKS, 0, Relaxed);
    regs_view.store_u64(p + pnm::UNIT_BUSY_NS, 0, Relaxed);
    if fresh {
        regs_view.store_u32(p + pnm::RESET_COUNT, 0, Relaxed);
        regs_view.store_u32(p + pnm::DIRTY_SHUTDOWN_COUNT, 0, Relaxed);
        // A fresh region has no previous device to have shut down dirtily.
        regs_view.store_u32(p + pnm::SHUTDOWN_STATE, pnm::SHUTDOWN_CLEAN, Relaxed);
    }
}

/// The region is the trust boundary (PROTOCOL.md §1.1): whoever can open
/// it can read every host's KV and write every register. A file that lets
/// other users in (created elsewhere, or by a wide umask) loses those bits.
fn restrict_to_owner_and_group(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o007 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "the region was open to other users; access restricted to owner and group"
        );
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o770))?;
    }
    Ok(())
}

/// Refuses a region its file system cannot hold: a tmpfs (or hugetlbfs)
/// smaller than the region would take it, advertise it, and fail later
/// (SIGBUS, or the OOM killer) once hosts fill device DRAM.
fn check_room(file: &File, path: &Path, existing: u64, size: u64) -> Result<(), RegionError> {
    let Ok(fs) = nix::sys::statvfs::fstatvfs(file) else { return Ok(()) };
    if fs.blocks() == 0 {
        return Ok(()); // no size accounting (a memfd's internal mount)
    }
    let free = fs.blocks_available().saturating_mul(fs.fragment_size());
    // The old contents are discarded, so their room counts as free.
    let room = free.saturating_add(existing);
    if size > room {
        return Err(RegionError::NoRoom { path: path.to_path_buf(), size, room });
    }
    Ok(())
}

/// Makes the file `size` bytes of zeros. A file that keeps its size has its
/// pages punched out rather than being truncated: a host that still maps it
/// (waiting for the device to come back) reads zeros instead of dying of
/// SIGBUS on a page past a shrunken end.
fn discard_contents(file: &File, existing: u64, size: u64) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    if existing == size && size > 0 {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(file, punch, 0, size as i64) {
            Ok(()) => return Ok(()),
            // A file system without hole punching: truncate after all.
            Err(e) => tracing::debug!(error = %e, "hole punching refused; truncating"),
        }
    }
    // Truncating to zero first discards old contents without touching
    // every page; the file reads back as zeros.
    file.set_len(0)?;
    file.set_len(size)
}

fn write_block(view: SharedMemory, offset: u64, bytes: &[u8]) {
    // Constant offsets inside the register block: cannot be out of bounds.
    view.write_bytes(offset, bytes).expect("register block write in bounds");
}

/// Why device DRAM at `path` will be in 4 KiB pages, and the fix, if the
/// file is on a tmpfs that gives no huge pages (as /dev/shm does by
/// default): Top-K scans there are slower (docs/PERFORMANCE.md, "Through
/// the device").
pub fn small_page_advice(path: &Path) -> Option<String> {
    let path = path.parent().and_then(|p| p.canonicalize().ok())?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    // The mount holding the file: the longest mount point that prefixes it.
    let (mount_point, fs, options) = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[1].to_string(), f[2].to_string(), f[3].to_string()))
        })
        .filter(|(m, _, _)| path.starts_with(m))
        .max_by_key(|(m, _, _)| m.len())?;
    let huge = options.split(',').find_map(|o| o.strip_prefix("huge=")).unwrap_or("never");
    (fs == "tmpfs" && matches!(huge, "never" | "deny")).then(|| {
        format!(
            "device DRAM on {mount_point} uses 4 KiB pages (tmpfs huge={huge}): Top-K scans run \
             about 1.2-1.4x slower per compute unit; for full speed put the region on a tmpfs \
             with huge pages (e.g. `mount -o remount,huge=within_size {mount_point}`) or on \
             hugetlbfs with `vm.nr_hugepages` reserved"
        )
    })
}

#[cfg(test)]
mod truncation {
    use super::*;

    /// A read of a page past the file's new end raises SIGBUS; the guard
    /// turns it into zeros and a reason to stop, and the process lives.
    #[test]
    fn an_access_past_a_truncated_end_is_absorbed_and_reported() {
        let path = std::env::temp_dir().join(format!("cxl-pnm-trunc-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let config = RegionConfig { path: path.clone(), size: Some(4 << 20), ..Default::default() };
        let region = Region::open(&config).unwrap();
        let regs = region.regs();
        let magic_at = regs::PNM_OFFSET + pnm::MAGIC;
        assert_eq!(regs.load_u64(magic_at, Acquire), pnm::MAGIC_VALUE);
        assert!(region.lost().is_none());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        // This load faults; the guard maps zero pages over the region.
        assert_eq!(regs.load_u64(magic_at, Acquire), 0);
        assert!(region.mapping.lost(), "the fault was seen");
        assert!(matches!(region.lost(), Some(RegionLoss::Shrank { size: 0, .. })));
        drop(region);
        std::fs::remove_file(&path).unwrap();
    }
}
