//! Opening a device: mapping its region, walking the capabilities array,
//! and refusing anything that is not a ready cxl-pnm device.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use pnm_protocol::regs::{
    self, CAP_HEADER_SIZE, CapArrayHeader, CapHeader, REGISTER_BLOCK_SIZE, cap_id, mailbox,
    memdev_status, pnm,
};
use pnm_protocol::{RegionLayout, SharedMemory};
use zerocopy::FromBytes;

use crate::backoff::Backoff;
use crate::commands::{CelEntry, EventRecords, HealthInfo, Identify, PnmInfo, SupportedLog};
use crate::error::{Error, Result};
use crate::mailbox::{DEFAULT_TIMEOUT, MailboxClient};
use crate::queue::{InterruptConfig, QueueOptions};
use crate::session::{Session, SessionGuard};
use crate::sys::Mapping;
use crate::transport::{Interrupts, RegionFile, Transport, Wake};
use pnm_protocol::events::{EventLog, EventRecord, InterruptMode};

/// How to open a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Bound on each mailbox command.
    pub mailbox_timeout: Duration,
    /// Bound on each queue command.
    pub command_timeout: Duration,
    /// Wait this long for the device to become ready (None: fail at once).
    pub wait_ready: Option<Duration>,
    /// The device's notification socket. None: the region path + ".sock"
    /// if it exists (and polling only if it does not).
    pub socket: Option<PathBuf>,
    /// Wait for completions on interrupts instead of polling (needs the
    /// notification socket).
    pub interrupts: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            mailbox_timeout: DEFAULT_TIMEOUT,
            command_timeout: Device::command_timeout_default(),
            wait_ready: None,
            socket: None,
            interrupts: false,
        }
    }
}

/// How a region file's transport is set up from the device options: the
/// notification socket given, or the one beside the region if it exists.
fn region_file_options(
    path: &Path,
    options: &DeviceOptions,
) -> crate::transport::RegionFileOptions {
    let beside = pnm_protocol::notify::socket_path(path);
    crate::transport::RegionFileOptions {
        socket: options.socket.clone().or_else(|| beside.exists().then_some(beside)),
        socket_required: options.socket.is_some() || options.interrupts,
        connect_timeout: options.mailbox_timeout,
    }
}

/// Where the capabilities the driver uses were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityMap {
    pub device_status: u64,
    pub mailbox: u64,
    pub mailbox_length: u64,
    pub memdev_status: u64,
    pub pnm: u64,
}

/// Live status read from the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceStatus {
    pub memdev_status: u64,
    pub fatal: bool,
    pub fw_halt: bool,
    pub media_ready: bool,
    pub mailbox_ready: bool,
    pub heartbeat: u64,
    pub heartbeat_period_us: u32,
    pub device_pid: u32,
    pub reset_count: u32,
    pub dirty_shutdown_count: u32,
    /// The Mailbox Lock word (0: free; else holder PID in [31:0]).
    pub mailbox_lock: u64,
    /// Locks the device took back from dead or overstaying holders.
    pub mailbox_lock_breaks: u32,
    /// Nanoseconds the compute units spent running commands since the
    /// device started, summed over the units (ABI 3.4; 0 from older ones).
    pub unit_busy_ns: u64,
}

/// An open cxl-pnm device.
///
/// Each handle has its own queue pair and DMA buffers, created on first
/// use; [`Device::handle`] makes another handle on the same device (the
/// mapping, mailbox and notification peer are shared), so threads can each
/// drive a queue of their own without contending.
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    regs: SharedMemory,
    caps: CapabilityMap,
    layout: RegionLayout,
    abi_version: u32,
    mailbox: Arc<Mutex<MailboxClient>>,
    session: Mutex<Option<Session>>,
    command_timeout: Duration,
    queue_options: QueueOptions,
    /// Times an operation was recovered (its queue pair replaced, and run
    /// again or reported unconfirmed).
    recoveries: std::sync::atomic::AtomicU64,
    // Last: the region stays mapped until every copy of `regs` is gone.
    transport: Arc<dyn Transport>,
}

impl Device {
    /// Opens the device whose region is at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &DeviceOptions::default())
    }

    /// Opens a device: `path` is its region file, or `vfio:BDF` for a PCI
    /// device bound to vfio-pci (a guest's view of the device through
    /// QEMU's ivshmem-doorbell, for example `vfio:0000:00:03.0`).
    pub fn open_with(path: impl AsRef<Path>, options: &DeviceOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let transport: Arc<dyn Transport> =
            match path.to_str().and_then(|p| p.strip_prefix("vfio:")) {
                #[cfg(feature = "vfio")]
                Some(bdf) => Arc::new(crate::vfio::VfioTransport::open(bdf)?),
                #[cfg(not(feature = "vfio"))]
                Some(_) => {
                    return Err(Error::Invalid(
                        "this driver was built without the `vfio` feature".into(),
                    ));
                }
                None => Arc::new(RegionFile::open(&path, &region_file_options(&path, options))?),
            };
        Self::with_transport(path, transport, options)
    }

    /// Opens the device behind a transport of the caller's (another bus, a
    /// test double); `path` only names it in errors and status. Everything
    /// above the transport is the same as for [`Device::open_with`].
    pub fn with_transport(
        path: impl AsRef<Path>,
        transport: Arc<dyn Transport>,
        options: &DeviceOptions,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let regs = transport.region();
        let len = regs.len();
        let not_a_device = |reason: String| Error::NotADevice { path: path.clone(), reason };
        if len < REGISTER_BLOCK_SIZE {
            return Err(not_a_device(format!(
                "{len} bytes is smaller than the {REGISTER_BLOCK_SIZE}-byte register block"
            )));
        }
        let caps = discover(regs).map_err(not_a_device)?;
        let p = caps.pnm;
        let abi_version = regs.load_u32(p + pnm::ABI_VERSION, Acquire);
        let (major, minor) = ((abi_version >> 16) as u16, abi_version as u16);
        if major != regs::ABI_VERSION_MAJOR {
            return Err(Error::AbiMismatch {
                path,
                found_major: major,
                found_minor: minor,
                expected_major: regs::ABI_VERSION_MAJOR,
            });
        }
        let layout = RegionLayout {
            size: regs.load_u64(p + pnm::REGION_SIZE, Acquire),
            dma_window_offset: regs.load_u64(p + pnm::DMA_WINDOW_OFFSET, Acquire),
            dma_window_size: regs.load_u64(p + pnm::DMA_WINDOW_SIZE, Acquire),
            dram_offset: regs.load_u64(p + pnm::DRAM_OFFSET, Acquire),
            dram_size: regs.load_u64(p + pnm::DRAM_SIZE, Acquire),
        };
        layout.validate(len).map_err(|e| not_a_device(format!("bad region layout: {e}")))?;

        let payload_log2 = regs.load_u32(caps.mailbox + mailbox::CAPABILITIES, Acquire)
            & mailbox::CAP_PAYLOAD_SIZE_MASK;
        if !(8..=20).contains(&payload_log2)
            || mailbox::PAYLOAD + (1 << payload_log2) > caps.mailbox_length
        {
            return Err(not_a_device(format!(
                "mailbox payload size 2^{payload_log2} does not fit its {}-byte capability",
                caps.mailbox_length
            )));
        }
        let wake = Wake::new(transport.clone(), caps.pnm + pnm::DEVICE_SLEEPING);
        let mut client = MailboxClient::new(
            regs,
            caps.mailbox,
            1 << payload_log2,
            p + pnm::MAILBOX_LOCK,
            p + pnm::HEARTBEAT,
            wake,
        );
        client.timeout = options.mailbox_timeout;

        let device = Self {
            path,
            regs,
            caps,
            layout,
            abi_version,
            mailbox: Arc::new(Mutex::new(client)),
            session: Mutex::new(None),
            command_timeout: options.command_timeout,
            queue_options: QueueOptions {
                interrupts: options.interrupts.then(InterruptConfig::default),
                ..Default::default()
            },
            recoveries: Default::default(),
            transport,
        };
        device.wait_ready(options.wait_ready.unwrap_or(Duration::ZERO))?;
        Ok(device)
    }

    /// Returns once the device reports media and mailbox ready, or a
    /// `NotReady` error after `bound`.
    pub fn wait_ready(&self, bound: Duration) -> Result<()> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let status = self.regs.load_u64(self.caps.memdev_status, Acquire);
            let reason = if status & memdev_status::FATAL != 0 {
                Some("fatal error")
            } else if status & memdev_status::FW_HALT != 0 {
                Some("firmware halted")
            } else if memdev_status::media_status(status) != memdev_status::MEDIA_READY {
                Some("media not ready")
            } else if status & memdev_status::MAILBOX_READY == 0 {
                Some("mailbox not ready")
            } else {
                None
            };
            match reason {
                None => return Ok(()),
                Some(reason) if start.elapsed() >= bound => {
                    return Err(Error::NotReady { path: self.path.clone(), status, reason });
                }
                Some(_) => backoff.wait(),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    pub fn capabilities(&self) -> CapabilityMap {
        self.caps
    }

    pub fn abi_version(&self) -> u32 {
        self.abi_version
    }

    /// Runs a raw mailbox command (for tools and tests; the typed methods
    /// validate what comes back).
    pub fn mailbox_raw(&self, opcode: pnm_protocol::Opcode, input: &[u8]) -> Result<Vec<u8>> {
        self.mailbox_client().execute(opcode, input)
    }

    pub(crate) fn mailbox_client(&self) -> MutexGuard<'_, MailboxClient> {
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Identify Memory Device (4000h).
    pub fn identify(&self) -> Result<Identify> {
        self.mailbox_client().identify()
    }

    /// Get Health Info (4200h).
    pub fn health_info(&self) -> Result<HealthInfo> {
        self.mailbox_client().health_info()
    }

    /// The device's timestamp in ns since the Unix epoch (0: never set).
    pub fn get_timestamp(&self) -> Result<u64> {
        self.mailbox_client().get_timestamp()
    }

    pub fn set_timestamp(&self, timestamp_ns: u64) -> Result<()> {
        self.mailbox_client().set_timestamp(timestamp_ns)
    }

    pub fn supported_logs(&self) -> Result<Vec<SupportedLog>> {
        self.mailbox_client().supported_logs()
    }

    /// Reads a whole log, in payload-sized pieces.
    pub fn get_log(&self, id: [u8; 16], size: u32) -> Result<Vec<u8>> {
        self.mailbox_client().get_log(id, size)
    }

    /// The Command Effects Log: every command the device supports.
    pub fn command_effects_log(&self) -> Result<Vec<CelEntry>> {
        self.mailbox_client().command_effects_log()
    }

    /// Get Event Records (0100h): the oldest records of `log` that fit one
    /// mailbox payload (`more` says if there are others).
    pub fn get_event_records(&self, log: EventLog) -> Result<EventRecords> {
        self.mailbox_client().get_event_records(log)
    }

    /// Clear Event Records (0101h) by the handles a Get returned.
    pub fn clear_event_records(&self, log: EventLog, handles: &[u16]) -> Result<()> {
        self.mailbox_client().clear_event_records(log, handles)
    }

    /// Clear Event Records (0101h) with Clear All Events.
    pub fn clear_all_event_records(&self, log: EventLog) -> Result<()> {
        self.mailbox_client().clear_all_event_records(log)
    }

    /// Get Event Interrupt Policy (0102h).
    pub fn get_event_interrupt_policy(&self) -> Result<[InterruptMode; 4]> {
        self.mailbox_client().get_event_interrupt_policy()
    }

    /// Set Event Interrupt Policy (0103h): per log, none or MSI/MSI-X on a
    /// vector every host (and a guest, as its MSI-X vector) is rung on.
    pub fn set_event_interrupt_policy(&self, modes: [InterruptMode; 4]) -> Result<()> {
        self.mailbox_client().set_event_interrupt_policy(modes)
    }

    /// Inject Event Record (C005h; a device started with --allow-injection).
    pub fn inject_event(&self, log: EventLog, record: &EventRecord) -> Result<Option<u16>> {
        self.mailbox_client().inject_event(log, record)
    }

    /// Get Poison List (4300h) over `lines` 64-byte lines from DPA `dpa`.
    pub fn get_poison_list(&self, dpa: u64, lines: u64) -> Result<crate::PoisonList> {
        self.mailbox_client().get_poison_list(dpa, lines)
    }

    /// Every poisoned range of device DRAM (asking again from after the
    /// last record while the device says there are more).
    pub fn poison_list(&self) -> Result<crate::PoisonList> {
        let end = self.layout().dram_size / pnm_protocol::media::LINE;
        let mut list = self.get_poison_list(0, end)?;
        while list.more {
            let Some(last) = list.records.last() else { break };
            let from = last.dpa / pnm_protocol::media::LINE + u64::from(last.lines);
            if from >= end {
                break;
            }
            let next = self.get_poison_list(from * pnm_protocol::media::LINE, end - from)?;
            list.records.extend(next.records);
            list.more = next.more;
        }
        Ok(list)
    }

    /// Inject Poison (4301h; a device started with --allow-injection).
    pub fn inject_poison(&self, dpa: u64) -> Result<()> {
        self.mailbox_client().inject_poison(dpa)
    }

    /// Clear Poison (4302h): `data` replaces the line at `dpa`, which
    /// reads again.
    pub fn clear_poison(&self, dpa: u64, data: &[u8; 64]) -> Result<()> {
        self.mailbox_client().clear_poison(dpa, data)
    }

    /// Inject Media Fault (C006h; --allow-injection): poisons, or silently
    /// corrupts, `lines` lines from `dpa`.
    pub fn inject_media_fault(&self, dpa: u64, lines: u64, fault: crate::MediaFault) -> Result<()> {
        self.mailbox_client().inject_media_fault(dpa, lines, fault)
    }

    /// Scan Media over `lines` lines from `dpa`, waiting up to `bound` for
    /// it (a background command: other commands run meanwhile), then its
    /// results. What it finds bad is also on the poison list afterwards,
    /// and (with `log_events`) in the failure event log.
    pub fn scan_media(
        &self,
        dpa: u64,
        lines: u64,
        log_events: bool,
        bound: Duration,
    ) -> Result<crate::ScanResults> {
        self.mailbox_client().start_scan_media(dpa, lines, log_events)?;
        let op = pnm_protocol::Opcode::SCAN_MEDIA;
        // From the registers, holding no lock: other commands (this
        // process's too) run while the scan does.
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let code = loop {
            let bg = self.regs.load_u64(self.caps.mailbox + mailbox::BACKGROUND_STATUS, Acquire);
            let status = self.regs.load_u64(self.caps.mailbox + mailbox::STATUS, Acquire);
            let (opcode, percent, code) = mailbox::decode_background_status(bg);
            if opcode == op.0 && percent == 100 && status & mailbox::STATUS_BACKGROUND == 0 {
                break pnm_protocol::ReturnCode(code);
            }
            let waited = start.elapsed();
            if waited >= bound {
                return Err(Error::Timeout { opcode: op, waited, heartbeat_stopped: false });
            }
            backoff.wait();
        };
        if !code.is_success() {
            return Err(Error::Command { opcode: op, code });
        }
        self.mailbox_client().get_scan_media_results()
    }

    /// Inject Device Fault (C007h; --allow-injection). See
    /// [`pnm_protocol::faults::DeviceFault`] for what each does with
    /// `count`, `micros` and `target`.
    pub fn inject_device_fault(
        &self,
        fault: pnm_protocol::faults::DeviceFault,
        count: u32,
        micros: u32,
        target: u32,
    ) -> Result<()> {
        self.mailbox_client().inject_device_fault(fault, count, micros, target)
    }

    /// Mailbox Control [2]: when a background command (Scan Media)
    /// finishes, the device rings the vector Mailbox Capabilities names
    /// (7) of every host. Set under the Mailbox Lock.
    pub fn set_background_interrupt(&self, enabled: bool) -> Result<()> {
        let at = self.caps.mailbox + mailbox::CONTROL;
        self.mailbox_client().with_lock(|| {
            let control = self.regs.load_u32(at, Acquire) & !mailbox::CONTROL_DOORBELL;
            let control = if enabled {
                control | mailbox::CONTROL_BACKGROUND_IRQ
            } else {
                control & !mailbox::CONTROL_BACKGROUND_IRQ
            };
            self.regs.store_u32(at, control, Release);
        })
    }

    /// Get Scan Media Capabilities (4303h): the device's estimate in ms.
    pub fn scan_media_estimate(&self, dpa: u64, lines: u64) -> Result<u32> {
        self.mailbox_client().scan_media_estimate(dpa, lines)
    }

    /// The Event Status register: bit n set while event log n holds records.
    pub fn event_status(&self) -> u32 {
        self.regs.load_u32(self.caps.device_status + regs::DEVICE_STATUS_EVENT_STATUS, Acquire)
    }

    /// Identify PNM (C000h): the layout, compute units and firmware limits.
    pub fn identify_pnm(&self) -> Result<PnmInfo> {
        self.mailbox_client().identify_pnm(self.layout)
    }

    /// This handle's queue session, made on first use, locked for one
    /// command.
    pub(crate) fn session(&self) -> Result<SessionGuard<'_>> {
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let status = self.status();
        let identity = (status.device_pid, status.reset_count);
        if slot.as_ref().is_some_and(|s| s.identity != identity) {
            // The device restarted or was reset: its queues and buffers
            // are gone with it. Make new ones, transparently.
            let old = slot.take().expect("checked");
            tracing::warn!(
                old_pid = old.identity.0,
                pid = identity.0,
                resets = identity.1,
                "the device restarted or was reset; re-creating this handle's queue pair"
            );
            drop(old);
        }
        if slot.is_none() {
            let wake = Wake::new(self.transport.clone(), self.caps.pnm + pnm::DEVICE_SLEEPING);
            *slot = Some(Session::open(
                &mut self.mailbox_client(),
                self.layout,
                self.caps.pnm,
                wake,
                self.queue_options,
                identity,
            )?);
        }
        Ok(SessionGuard {
            slot,
            mailbox: &self.mailbox,
            region: self.regs,
            command_timeout: self.command_timeout,
        })
    }

    /// Runs an operation that is safe to repeat (it changes nothing on the
    /// device) and, if it timed out, recovers once: this handle's queue
    /// pair is replaced (the device drops the old one's late or lost
    /// completions), the device is given until the command timeout to be
    /// back if it restarted, and the operation runs again from scratch.
    pub(crate) fn recovering<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(e @ (Error::QueueTimeout { .. } | Error::Timeout { .. })) => {
                tracing::warn!(error = %e, "recovering: replacing the queue pair and retrying once");
                self.recoveries.fetch_add(1, Relaxed);
                self.replace_queue();
                if !self.is_alive(Duration::from_millis(50)) {
                    let _ = self.wait_ready(self.command_timeout);
                }
                op()
            }
            other => other,
        }
    }

    /// Runs an operation that changes device state (KV_CREATE, KV_FREE):
    /// never repeated; if it timed out, the queue pair is replaced (so its
    /// late completion cannot be taken for another command's) and the
    /// error says the effect is unknown.
    pub(crate) fn unrepeatable<T>(&self, op: impl FnOnce() -> Result<T>) -> Result<T> {
        match op() {
            Err(Error::QueueTimeout { command, waited, .. }) => {
                self.recoveries.fetch_add(1, Relaxed);
                self.replace_queue();
                Err(Error::Unconfirmed { command, waited })
            }
            other => other,
        }
    }

    /// How many times this handle recovered from a command that timed out.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Relaxed)
    }

    /// Drops this handle's queue pair (deleting it on the device if it is
    /// the same device, bounded): for a queue whose state is unknown.
    pub(crate) fn replace_queue(&self) {
        let mut guard = SessionGuard {
            slot: self.session.lock().unwrap_or_else(|e| e.into_inner()),
            mailbox: &self.mailbox,
            region: self.regs,
            command_timeout: self.command_timeout,
        };
        let status = self.status();
        if guard
            .slot
            .as_ref()
            .is_some_and(|s| s.identity != (status.device_pid, status.reset_count))
        {
            // A new device: nothing of the old session is left to delete.
            drop(guard.slot.take());
            return;
        }
        guard.discard_queue();
    }

    /// Completions on this handle's queue that arrived without their
    /// interrupt (0 before its first command).
    pub fn missed_interrupts(&self) -> u64 {
        let slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map_or(0, |s| s.queue.missed_interrupts())
    }

    /// Whether this handle's waits block on interrupts: asked for, and not
    /// given up after missed ones (see [`Device::missed_interrupts`]).
    pub fn waits_on_interrupts(&self) -> bool {
        let slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(s) => s.queue.waits_on_interrupts(),
            None => self.queue_options.interrupts.is_some(),
        }
    }

    /// Creates this handle's queue pair and buffers and hands them over
    /// (for the async API, which drives them itself).
    #[cfg(feature = "async")]
    pub(crate) fn take_queue(&self) -> Result<(crate::queue::QueuePair, crate::dma::DmaPool)> {
        let session = self.session()?.slot.take().expect("opened by session()");
        Ok((session.queue, session.pool))
    }

    /// The whole region (for the data path's buffers and device DRAM).
    pub(crate) fn region(&self) -> SharedMemory {
        self.regs
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The vectors this host's interrupts arrive on, if the transport
    /// delivers interrupts.
    pub fn interrupts(&self) -> Option<&dyn Interrupts> {
        self.transport.interrupts()
    }

    /// Another handle on the same device, with a queue pair of its own set
    /// up as `options` says.
    pub fn handle(&self, options: QueueOptions) -> Result<Device> {
        if options.interrupts.is_some() && self.interrupts().is_none() {
            return Err(Error::Invalid("interrupts need the device's notification socket".into()));
        }
        if !options.entries.is_power_of_two() || options.entries < 2 {
            return Err(Error::Invalid(format!(
                "{} queue entries is not a power of two >= 2",
                options.entries
            )));
        }
        Ok(Device {
            path: self.path.clone(),
            regs: self.regs,
            caps: self.caps,
            layout: self.layout,
            abi_version: self.abi_version,
            mailbox: self.mailbox.clone(),
            session: Mutex::new(None),
            command_timeout: self.command_timeout,
            queue_options: options,
            recoveries: Default::default(),
            transport: self.transport.clone(),
        })
    }

    /// Bytes the mailbox carries each way per command.
    pub fn mailbox_payload_size(&self) -> u64 {
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner()).payload_size()
    }

    /// Live register status.
    pub fn status(&self) -> DeviceStatus {
        read_status(self.regs, &self.caps)
    }

    /// What state the device serving `path` is in, from its registers and
    /// its process, without needing it ready (as `open` does): running,
    /// hung, stopped cleanly, or dead. Watches the heartbeat for up to
    /// `bound` (a few heartbeat periods are enough). `path` is a region
    /// file or `vfio:BDF`; through VFIO (a guest) the device's process
    /// cannot be looked at, so a device whose heartbeat stands still and
    /// that did not stop in order counts as dead, never as hung.
    pub fn probe(path: impl AsRef<Path>, bound: Duration) -> Result<Liveness> {
        let path = path.as_ref().to_path_buf();
        #[cfg(feature = "vfio")]
        if let Some(bdf) = path.to_str().and_then(|p| p.strip_prefix("vfio:")) {
            let transport = crate::vfio::VfioTransport::open(bdf)?;
            return probe_registers(&path, transport.region(), bound, false);
        }
        let open_err = |error| Error::Open { path: path.clone(), error };
        let file = OpenOptions::new().read(true).open(&path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len < REGISTER_BLOCK_SIZE {
            return Err(Error::NotADevice {
                path,
                reason: format!(
                    "{len} bytes is smaller than the {REGISTER_BLOCK_SIZE}-byte register block"
                ),
            });
        }
        // Only the register block: nothing else is read.
        let map = MmapOptions::new()
            .len(REGISTER_BLOCK_SIZE as usize)
            .map_raw_read_only(&file)
            .map_err(open_err)?;
        let mapping = Mapping::new(map);
        probe_registers(&path, mapping.view(), bound, true)
    }
}

/// [`Device::probe`] on a mapped register block; `process_visible`: the
/// device's PID is one of this host's.
fn probe_registers(
    path: &Path,
    regs: SharedMemory,
    bound: Duration,
    process_visible: bool,
) -> Result<Liveness> {
    let caps =
        discover(regs).map_err(|reason| Error::NotADevice { path: path.to_path_buf(), reason })?;
    let first = read_status(regs, &caps);
    let start = Instant::now();
    let mut beating = false;
    while !beating && start.elapsed() < bound {
        std::thread::sleep(Duration::from_millis(2));
        beating = regs.load_u64(caps.pnm + pnm::HEARTBEAT, Acquire) != first.heartbeat;
    }
    let status = read_status(regs, &caps);
    let shutdown = regs.load_u32(caps.pnm + pnm::SHUTDOWN_STATE, Acquire);
    let pid = status.device_pid;
    let state = if beating {
        DeviceState::Running
    } else if pid != 0 && process_visible && process_runs(pid) {
        DeviceState::Hung
    } else if pid == 0 && shutdown == pnm::SHUTDOWN_CLEAN {
        DeviceState::Stopped
    } else {
        DeviceState::Dead
    };
    Ok(Liveness { state, status })
}

/// A device's state as [`Device::probe`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum DeviceState {
    /// The heartbeat advances: a device process serves the region.
    Running,
    /// Its process exists but the heartbeat stands still (stopped by a
    /// signal or a debugger, or stuck).
    Hung,
    /// Stopped in order (SIGINT/SIGTERM): nobody serves the region.
    Stopped,
    /// Gone without an orderly stop (killed, crashed): nobody serves the
    /// region, and the next device counts a dirty shutdown.
    Dead,
}

impl DeviceState {
    /// The exit code `pnmctl status` gives this state.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Running => 0,
            Self::Stopped => 2,
            Self::Dead => 3,
            Self::Hung => 4,
        }
    }
}

/// [`Device::probe`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Liveness {
    pub state: DeviceState,
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub status: DeviceStatus,
}

/// True if process `pid` exists and is not a zombie (in this PID namespace).
fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        // The state follows the parenthesised command name.
        .and_then(|stat| stat.rsplit(") ").next().and_then(|r| r.chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn read_status(regs: SharedMemory, caps: &CapabilityMap) -> DeviceStatus {
    let p = caps.pnm;
    let memdev = regs.load_u64(caps.memdev_status, Acquire);
    DeviceStatus {
        memdev_status: memdev,
        fatal: memdev & memdev_status::FATAL != 0,
        fw_halt: memdev & memdev_status::FW_HALT != 0,
        media_ready: memdev_status::media_status(memdev) == memdev_status::MEDIA_READY,
        mailbox_ready: memdev & memdev_status::MAILBOX_READY != 0,
        heartbeat: regs.load_u64(p + pnm::HEARTBEAT, Acquire),
        heartbeat_period_us: regs.load_u32(p + pnm::HEARTBEAT_PERIOD_US, Relaxed),
        device_pid: regs.load_u32(p + pnm::DEVICE_PID, Relaxed),
        reset_count: regs.load_u32(p + pnm::RESET_COUNT, Relaxed),
        dirty_shutdown_count: regs.load_u32(p + pnm::DIRTY_SHUTDOWN_COUNT, Relaxed),
        mailbox_lock: regs.load_u64(p + pnm::MAILBOX_LOCK, Acquire),
        mailbox_lock_breaks: regs.load_u32(p + pnm::MAILBOX_LOCK_BREAKS, Relaxed),
        unit_busy_ns: regs.load_u64(p + pnm::UNIT_BUSY_NS, Acquire),
    }
}

impl Device {
    /// True if the heartbeat advances within `bound`.
    pub fn is_alive(&self, bound: Duration) -> bool {
        let at = self.caps.pnm + pnm::HEARTBEAT;
        let before = self.regs.load_u64(at, Acquire);
        let start = Instant::now();
        while start.elapsed() < bound {
            if self.regs.load_u64(at, Acquire) != before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Requests a device reset (mailbox back to idle, volatile state
    /// cleared, device DRAM kept) and waits up to `bound` for it.
    pub fn reset(&self, bound: Duration) -> Result<()> {
        let mut mailbox = self.mailbox.lock().unwrap_or_else(|e| e.into_inner());
        let at = self.caps.pnm + pnm::RESET_CONTROL;
        let start = Instant::now();
        // Under the Mailbox Lock: a reset must not cut into another host's command.
        mailbox.with_lock(|| {
            self.regs.store_u32(at, pnm::RESET_REQUEST, Release);
            let mut backoff = Backoff::new();
            while self.regs.load_u32(at, Acquire) & pnm::RESET_REQUEST != 0 {
                if start.elapsed() >= bound {
                    return Err(Error::ResetTimeout(bound));
                }
                backoff.wait();
            }
            Ok(())
        })??;
        self.wait_ready(bound.saturating_sub(start.elapsed()))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Give the queue pair and DMA buffers back; if this fails (or the
        // process dies first) the device reclaims them by owner pid.
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(session) = session {
            let mut mailbox = self.mailbox_client();
            mailbox.timeout = mailbox.timeout.min(Duration::from_millis(500));
            session.shutdown(&mut mailbox);
        }
    }
}

/// Walks the Device Capabilities Array, checking every header against the
/// register block's bounds, and finds the capabilities the driver needs.
fn discover(regs: SharedMemory) -> Result<CapabilityMap, String> {
    let read_header = |at: u64| -> [u8; 16] {
        // The spec allows at most 64-bit reads of these 128-bit registers.
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&regs.load_u64(at, Acquire).to_le_bytes());
        raw[8..].copy_from_slice(&regs.load_u64(at + 8, Acquire).to_le_bytes());
        raw
    };
    let array = CapArrayHeader::read_from_bytes(&read_header(regs::CAP_ARRAY_OFFSET))
        .expect("16 bytes make a header");
    if array.id.get() != regs::CAP_ARRAY_ID || array.version != regs::CAP_ARRAY_VERSION {
        return Err(format!(
            "no Device Capabilities Array (id {:#06x}, version {})",
            array.id.get(),
            array.version
        ));
    }
    if array.kind & 0xF != regs::CAP_ARRAY_TYPE_MEMORY_DEVICE {
        return Err(format!("device type {} is not a memory device", array.kind & 0xF));
    }
    let count = array.count.get();
    if count == 0 || count > regs::MAX_CAPABILITIES {
        return Err(format!("implausible capability count {count}"));
    }
    let (mut device_status, mut mb, mut memdev, mut pnm_cap) = (None, None, None, None);
    for i in 0..u64::from(count) {
        let header = CapHeader::read_from_bytes(&read_header(
            regs::CAP_ARRAY_OFFSET + CAP_HEADER_SIZE * (i + 1),
        ))
        .expect("16 bytes make a header");
        let (id, offset, length) =
            (header.id.get(), u64::from(header.offset.get()), u64::from(header.length.get()));
        if offset % 8 != 0 || length == 0 || offset + length > REGISTER_BLOCK_SIZE {
            return Err(format!(
                "capability {id:#06x} at {offset:#x}+{length:#x} lies outside the register block"
            ));
        }
        match id {
            cap_id::DEVICE_STATUS => device_status = Some(offset),
            cap_id::PRIMARY_MAILBOX if length >= mailbox::PAYLOAD + 256 => {
                mb = Some((offset, length))
            }
            cap_id::MEMORY_DEVICE_STATUS if length >= 8 => memdev = Some(offset),
            cap_id::PNM
                if length > pnm::DOORBELL_OFFSET
                    && regs.load_u64(offset + pnm::MAGIC, Acquire) == pnm::MAGIC_VALUE =>
            {
                pnm_cap = Some(offset)
            }
            _ => tracing::debug!(id, offset, length, "skipping capability"),
        }
    }
    let missing = |what: &str| format!("no {what} capability");
    let (mailbox, mailbox_length) = mb.ok_or_else(|| missing("Primary Mailbox"))?;
    Ok(CapabilityMap {
        device_status: device_status.ok_or_else(|| missing("Device Status"))?,
        mailbox,
        mailbox_length,
        memdev_status: memdev.ok_or_else(|| missing("Memory Device Status"))?,
        pnm: pnm_cap.ok_or_else(|| missing("vendor PNM"))?,
    })
}
