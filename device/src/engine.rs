//! The device's control engine: register semantics, mailbox service,
//! heartbeat and reset, on a dedicated thread.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use pnm_protocol::commands::{OWNER_GUEST, Owner};
use pnm_protocol::notify::{self, socket_path};
use pnm_protocol::regs::{self, mailbox, memdev_status, pnm};
use pnm_protocol::{Opcode, ReturnCode, SharedMemory};

use pnm_firmware::kv::KvStore;

use crate::dma::DmaAllocator;
use crate::executor::{DramView, Executor};
use crate::idle::{Idle, IdleStep, SystemClock};
use crate::mailbox::{HealthCounters, KvGeometry, MailboxState, TimestampClock};
use crate::notify::{NotifyServer, Peers};
use crate::queues::QueueTable;
use crate::refusal::{Reason, Refusal};
use crate::region::{FunctionRegisters, Region, RegionConfig, RegionError, RegionLoss};
use crate::units::ComputeUnits;
use crate::vfio_user::{FunctionBacking, VfioUserServer};
use pnm_firmware::timing::HardwareProfile;

/// How often the heartbeat register advances.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(10);
/// Longest block on the wake eventfd: bounds the heartbeat's jitter and the
/// latency seen by a host that rings doorbells without the wake vector
/// (a mailbox-only client); an idle device wakes about 100 times a second,
/// once per heartbeat, a small share of a core (docs/PERFORMANCE.md).
const LONGEST_SLEEP: Duration = Duration::from_millis(10);
/// How often the engine looks for queues and buffers whose owner died.
const RECLAIM_PERIOD: Duration = Duration::from_secs(1);
/// A Mailbox Lock seen held by the same word for this long has its holder
/// checked for life (a command holds it for microseconds).
const LOCK_CHECK_AFTER: Duration = Duration::from_millis(20);
/// The device's compute units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitConfig {
    /// Threads (default: the machine's cores).
    pub count: Option<u32>,
    /// Pin each unit to its own CPU when the process may use enough CPUs.
    pub pin: bool,
}

impl Default for UnitConfig {
    fn default() -> Self {
        Self { count: None, pin: true }
    }
}

/// Device settings beyond the region.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub region: RegionConfig,
    pub units: UnitConfig,
    /// Notification socket (default: the region path + ".sock").
    pub socket: Option<PathBuf>,
    /// The timing model's hardware (default: the built-in cxl-pnm profile).
    pub profile: Option<HardwareProfile>,
    /// Serve the fault injection commands (PROTOCOL.md §5.11).
    pub allow_injection: bool,
    /// Also serve the device as a PCI function over vfio-user on this
    /// socket (PROTOCOL.md §6.5).
    pub vfio_user: Option<PathBuf>,
}

/// Where a device listens for clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listen<'a> {
    /// The notification socket (None: hosts can only poll).
    pub socket: Option<&'a Path>,
    /// The vfio-user socket for QEMU's `vfio-user-pci` (None: no PCI function).
    pub vfio_user: Option<&'a Path>,
}

/// PCI vendor and device id of the vfio-user function. The vendor is the
/// CXL consortium's (the id its DVSECs carry); no PCI-SIG device id was
/// assigned to this emulator, and Linux's cxl_pci binds by class code.
pub const PCI_VENDOR_ID: u16 = pnm_protocol::pci::CXL_VENDOR_ID;
pub const PCI_DEVICE_ID: u16 = 0x0D93;

/// The identity the device's PCI function presents for `region`.
fn function_identity(region: &Region) -> pnm_protocol::pci::FunctionIdentity {
    let layout = &region.layout;
    pnm_protocol::pci::FunctionIdentity {
        vendor_id: PCI_VENDOR_ID,
        device_id: PCI_DEVICE_ID,
        // The same serial number for the same region file, whichever device
        // serves it; another for another region.
        serial: region.file_identity() ^ 0x504E_4D00_0000_0000,
        region_size: layout.size,
        memory_size: layout.dram_size,
        vectors: pnm_protocol::notify::VECTORS,
    }
}

/// The timing profile a device models unless told otherwise.
pub fn default_profile() -> HardwareProfile {
    HardwareProfile::named("cxl-pnm").expect("cxl-pnm is built in")
}

/// A device serving a region on its own thread until stopped.
#[derive(Debug)]
pub struct RunningDevice {
    stop: Arc<AtomicBool>,
    engine: Option<JoinHandle<()>>,
    notify: Option<NotifyServer>,
    vfio_user: Option<VfioUserServer>,
    wake: Arc<EventFd>,
    region: Arc<Region>,
    fault: Arc<Mutex<Option<RegionLoss>>>,
}

impl RunningDevice {
    /// Why the device stopped serving on its own (its region was truncated
    /// under it), if it did; it then serves nothing and should be stopped.
    pub fn fault(&self) -> Option<RegionLoss> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens (or creates) the region and starts serving it.
    pub fn start(config: &DeviceConfig) -> Result<Self, RegionError> {
        let region = Region::open(&config.region)?;
        let socket = config.socket.clone().unwrap_or_else(|| socket_path(&config.region.path));
        let profile = config.profile.clone().unwrap_or_else(default_profile);
        let listen = Listen { socket: Some(&socket), vfio_user: config.vfio_user.as_deref() };
        Self::serve(region, config.units, listen, profile, config.allow_injection)
    }

    /// Serves an already opened region with the compute units `units` asks
    /// for, listening where `listen` says, serving fault injection commands
    /// if `allow_injection`.
    pub fn serve(
        region: Region,
        units: UnitConfig,
        listen: Listen<'_>,
        profile: HardwareProfile,
        allow_injection: bool,
    ) -> Result<Self, RegionError> {
        // One unit per core: the engine sleeps while units compute, so a
        // long Top-K gets every core, split into one share per unit.
        let compute_units = units
            .count
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let region = Arc::new(region);
        let regs = region.regs();
        let layout = region.layout;
        // The store first: a damaged one stops the start before anything
        // in the region says a device ran.
        let (kv, report) = KvStore::open(DramView::new(regs, &layout))
            .map_err(|reason| RegionError::KvStore { path: region.path.clone(), reason })?;
        let p = regs::PNM_OFFSET;
        let mut dirty_count = regs.load_u32(p + pnm::DIRTY_SHUTDOWN_COUNT, Acquire);
        if region.dirty_shutdown {
            dirty_count = dirty_count.wrapping_add(1);
            tracing::warn!(dirty_count, "previous device did not shut down cleanly");
            regs.store_u32(p + pnm::DIRTY_SHUTDOWN_COUNT, dirty_count, Relaxed);
        }
        regs.store_u32(p + pnm::COMPUTE_UNITS, compute_units, Relaxed);
        regs.store_u32(p + pnm::HEARTBEAT_PERIOD_US, HEARTBEAT_PERIOD.as_micros() as u32, Relaxed);
        regs.store_u32(p + pnm::MAX_QUEUE_PAIRS, pnm_protocol::queue::MAX_QUEUE_PAIRS, Relaxed);
        regs.store_u32(p + pnm::DEVICE_PID, std::process::id(), Relaxed);
        regs.store_u32(p + pnm::SHUTDOWN_STATE, pnm::SHUTDOWN_RUNNING, Relaxed);
        for dropped in &report.dropped {
            tracing::warn!(%dropped, "KV store: inconsistent sequence dropped");
        }
        if let Some(e) = &report.poison_table {
            tracing::error!(error = %e, "KV store: the saved poison list was lost; started empty");
        }
        if report.rolled_back > 0 {
            tracing::warn!(
                sequences = report.rolled_back,
                "KV store: appends left unfinished by the last device rolled back"
            );
        }
        tracing::info!(
            formatted = report.formatted,
            sequences = report.sequences,
            free_frames = kv.free_frames(),
            "KV store opened"
        );
        let kv_layout = kv.layout();
        tracing::info!(profile = %profile.name, "timing model");
        let executor = Executor::new(regs, layout, kv, profile);
        let peers = Peers::default();
        let mut state = MailboxState {
            layout,
            compute_units,
            heartbeat_period_us: HEARTBEAT_PERIOD.as_micros() as u32,
            kv: KvGeometry {
                frames_offset: kv_layout.frames_offset,
                frame_count: kv_layout.frame_count,
            },
            clock: TimestampClock::default(),
            health: HealthCounters {
                dirty_shutdown_count: dirty_count,
                corrected_volatile_errors: report.dropped.len() as u32,
                media_errors: 0,
            },
            queues: QueueTable::new(regs, layout, peers.clone())
                .with_faults(executor.faults.clone()),
            dma: DmaAllocator::new(&layout),
            events: Default::default(),
            event_policy: Default::default(),
            allow_injection,
            store: executor.kv.clone(),
            scan: None,
            scan_results: None,
            started_background: false,
            logged_lines: Default::default(),
            faults: executor.faults.clone(),
            units_dead_logged: 0,
            thermal: Default::default(),
        };
        if allow_injection {
            tracing::warn!("fault injection is on: any host may inject faults");
        }
        if region.dirty_shutdown {
            state.log_dirty_shutdown();
        }
        regs.store_u32(
            regs::DEVICE_STATUS_OFFSET + regs::DEVICE_STATUS_EVENT_STATUS,
            state.events.status(),
            Release,
        );
        let io_err = |error: std::io::Error| RegionError::Map { path: region.path.clone(), error };
        let vectors: Vec<Arc<EventFd>> = (0..notify::VECTORS)
            .map(|_| {
                EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map(Arc::new)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(e.into()))?;
        let wake = vectors[usize::from(notify::WAKE_VECTOR)].clone();
        let notify = match listen.socket {
            Some(path) => {
                let shm = region.reopen_fd().map_err(io_err)?;
                let server =
                    NotifyServer::start(path, peers.clone(), vectors.clone(), shm, regs)
                        .map_err(|error| RegionError::Socket { path: path.to_path_buf(), error })?;
                tracing::info!(socket = %path.display(), "notification socket listening");
                Some(server)
            }
            None => None,
        };
        let (vfio_user, function) = match listen.vfio_user {
            Some(path) => {
                let socket_err =
                    |error: std::io::Error| RegionError::Socket { path: path.to_path_buf(), error };
                let registers = Arc::new(FunctionRegisters::create().map_err(socket_err)?);
                let backing = FunctionBacking {
                    peers: peers.clone(),
                    region_fd: region.reopen_fd().map_err(io_err)?,
                    region: regs,
                    registers: registers.clone(),
                    identity: function_identity(&region),
                };
                let server = VfioUserServer::start(path, backing).map_err(socket_err)?;
                tracing::info!(socket = %path.display(), "vfio-user socket listening");
                (Some(server), Some(registers))
            }
            None => (None, None),
        };

        // The compute units run (each on its CPU) before the device says so.
        let units = ComputeUnits::start(compute_units, units.pin, &executor, wake.clone());

        // Everything above is published by this Release store: a host that
        // sees Mailbox Ready sees a complete register block, running compute
        // units and, if there is one, a listening notification socket.
        regs.store_u64(regs::MEMDEV_STATUS_OFFSET, memdev_status::READY, Release);
        tracing::info!(
            path = %region.path.display(),
            size = region.layout.size,
            dram = region.layout.dram_size,
            kept_contents = region.kept_contents,
            compute_units,
            "device ready"
        );

        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(Mutex::new(None));
        let engine = {
            let stop = stop.clone();
            let now = Instant::now();
            let mut engine = Engine {
                regs,
                state,
                executor,
                units,
                peers,
                function,
                background_block: regs,
                wake: wake.clone(),
                last_beat: now,
                busy_seen: 0,
                last_reclaim: now,
                lock_seen: None,
                region: region.clone(),
                fault: fault.clone(),
                faulted: false,
            };
            std::thread::Builder::new()
                .name("pnm-engine".into())
                .spawn(move || engine.run(&stop))
                .expect("spawn engine thread")
        };
        Ok(Self { stop, engine: Some(engine), notify, vfio_user, wake, region, fault })
    }

    /// A device embedded in this process: a memfd region of `size` bytes and
    /// a notification socket in the temporary directory, so hosts in this
    /// process wake the engine the way other processes do.
    pub fn embedded(size: u64, compute_units: Option<u32>) -> Result<Self, RegionError> {
        use std::sync::atomic::AtomicU32;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let region = Region::embedded(size, None)?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let socket =
            std::env::temp_dir().join(format!("cxl-pnm-embedded-{}-{n}.sock", std::process::id()));
        let units = UnitConfig { count: compute_units, ..UnitConfig::default() };
        let listen = Listen { socket: Some(&socket), vfio_user: None };
        Self::serve(region, units, listen, default_profile(), false)
    }

    /// The notification socket, if the device serves one.
    pub fn socket(&self) -> Option<&Path> {
        self.notify.as_ref().map(|n| n.path.as_path())
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Stops serving: the mailbox goes not-ready and the region records a
    /// clean shutdown. Idempotent.
    pub fn stop(&mut self) {
        let Some(engine) = self.engine.take() else { return };
        self.stop.store(true, Ordering::Release);
        // Wake a sleeping engine so it sees the stop at once.
        let _ = self.wake.write(1);
        self.notify = None;
        self.vfio_user = None;
        if engine.join().is_err() {
            tracing::error!("engine thread panicked");
        }
        let regs = self.region.regs();
        regs.store_u64(regs::MEMDEV_STATUS_OFFSET, 0, Release);
        regs.store_u32(regs::PNM_OFFSET + pnm::DEVICE_PID, 0, Relaxed);
        regs.store_u32(regs::PNM_OFFSET + pnm::SHUTDOWN_STATE, pnm::SHUTDOWN_CLEAN, Release);
        if let Err(e) = self.region.flush() {
            tracing::warn!(error = %e, "flushing region");
        }
        tracing::info!(path = %self.region.path.display(), "device stopped");
    }
}

impl Drop for RunningDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Engine {
    regs: SharedMemory,
    state: MailboxState,
    executor: Executor,
    units: ComputeUnits,
    peers: Peers,
    /// The PCI function's own register block, whose mailbox is served
    /// beside the region's (a kernel driver owns it alone).
    function: Option<Arc<FunctionRegisters>>,
    /// The register block whose mailbox started the running background
    /// command: its progress and completion are reported there.
    background_block: SharedMemory,
    wake: Arc<EventFd>,
    last_beat: Instant,
    /// The units' busy nanoseconds at the last beat (thermal model).
    busy_seen: u64,
    last_reclaim: Instant,
    /// The Mailbox Lock word last seen held, and since when.
    lock_seen: Option<(u64, Instant)>,
    region: Arc<Region>,
    /// Why the engine stopped on its own, if it did.
    fault: Arc<Mutex<Option<RegionLoss>>>,
    faulted: bool,
}

/// True if process `pid` no longer runs (in this pid namespace): it does
/// not exist, or it is a zombie its parent has not reaped yet (its memory
/// and file descriptors are gone already). PID 0 names no process.
pub(crate) fn process_gone(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if raw == 0 {
        return true;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Err(nix::errno::Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            // The state follows the parenthesised command name.
            .and_then(|stat| stat.rsplit(") ").next().and_then(|r| r.chars().next()))
            .is_some_and(|state| state == 'Z' || state == 'X'),
    }
}

impl Engine {
    fn run(&mut self, stop: &AtomicBool) {
        let mut idle = Idle::new(SystemClock);
        while !stop.load(Acquire) {
            if self.faulted {
                return;
            }
            if self.executor.faults.engine_hung(Instant::now()) {
                // An injected firmware hang: nothing served, no heartbeat.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            if self.poll_once() {
                idle.work_found();
                continue;
            }
            match idle.next_step(self.units.busy()) {
                IdleStep::Spin => std::hint::spin_loop(),
                IdleStep::Yield => std::thread::yield_now(),
                IdleStep::SleepWhileUnitsRun => {
                    // Compute units are running commands: give them this
                    // CPU. They post their completions themselves and wake
                    // the engine as the last one finishes; a host's doorbell
                    // meanwhile rings the wake vector as for any sleep.
                    self.sleep(stop);
                    idle.woke_after_units(self.units.busy());
                }
                IdleStep::Sleep => {
                    self.sleep(stop);
                    idle.slept();
                }
            }
        }
    }

    /// Blocks on the wake eventfd until a host rings it, a coalescing timer
    /// is due, or the sleep bound passes.
    ///
    /// No lost wake-up: the engine publishes Device Sleeping, then (after a
    /// SeqCst fence) looks at every doorbell once more; a host stores its
    /// doorbell, then (after a SeqCst fence) reads Device Sleeping. Whatever
    /// the interleaving, at least one side sees the other's store.
    fn sleep(&mut self, stop: &AtomicBool) {
        let sleeping = regs::PNM_OFFSET + pnm::DEVICE_SLEEPING;
        self.regs.store_u32(sleeping, 1, std::sync::atomic::Ordering::SeqCst);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if !self.poll_once() && !stop.load(Acquire) {
            let now = Instant::now();
            let mut bound = LONGEST_SLEEP;
            if let Some(due) = self.state.queues.next_deadline() {
                bound = bound.min(due.saturating_duration_since(now));
            }
            let timeout =
                PollTimeout::try_from(bound.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
            if let Err(e) = poll(&mut fds, timeout)
                && e != nix::errno::Errno::EINTR
            {
                tracing::warn!(error = %e, "waiting on the wake eventfd");
            }
            // Drain the counter (EAGAIN when nobody rang).
            let _ = self.wake.read();
        }
        self.regs.store_u32(sleeping, 0, Release);
    }

    /// One pass over every register the device watches. True if it did work.
    fn poll_once(&mut self) -> bool {
        let mut worked = false;
        let now = Instant::now();
        if now.duration_since(self.last_beat) >= HEARTBEAT_PERIOD {
            if !self.executor.faults.heartbeat_stopped(now) {
                self.regs.fetch_add_u64(regs::PNM_OFFSET + pnm::HEARTBEAT, 1);
            }
            self.advance_thermal(now);
            self.last_beat = now;
            self.watch_mailbox_lock(now);
            if let Some(why) = self.region.lost() {
                tracing::error!("{why}; the device stops serving");
                *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                self.faulted = true;
                return true;
            }
        }
        if self.regs.load_u32(regs::PNM_OFFSET + pnm::RESET_CONTROL, Acquire) & pnm::RESET_REQUEST
            != 0
        {
            self.reset();
            worked = true;
        }
        let control = self.regs.load_u32(regs::MAILBOX_OFFSET + mailbox::CONTROL, Acquire);
        if control & mailbox::CONTROL_DOORBELL != 0 {
            self.serve_mailbox(self.regs, "region", control);
            worked = true;
        }
        if let Some(block) = self.function.as_ref().map(|f| f.view()) {
            let control = block.load_u32(regs::MAILBOX_OFFSET + mailbox::CONTROL, Acquire);
            if control & mailbox::CONTROL_DOORBELL != 0 {
                self.serve_mailbox(block, "function", control);
                worked = true;
            }
        }
        worked |= self.state.queues.poll(&mut self.executor, &self.units);
        self.state.queues.flush_interrupts(now);
        worked |= self.step_background(now);
        let reports =
            std::mem::take(&mut *self.executor.media.lock().unwrap_or_else(|e| e.into_inner()));
        for report in &reports {
            self.state.record_media(report, now);
        }
        if !reports.is_empty() {
            self.publish_event_status();
        }
        let mut departed = false;
        if now.duration_since(self.last_reclaim) >= RECLAIM_PERIOD {
            self.peers.expire_holds();
        }
        for peer in self.peers.take_departed() {
            departed = true;
            let n = self.state.queues.reclaim_peer(peer);
            let buffers = self
                .state
                .dma
                .reclaim(|owner| matches!(owner, Owner::Guest { peer: p, .. } if p == peer));
            if n + buffers > 0 {
                tracing::warn!(
                    peer,
                    queues = n,
                    buffers,
                    "notification peer left; its queue pairs and its guest's buffers deleted"
                );
            }
            self.peers.released(peer);
        }
        // A peer's connection closes when its process dies: look for dead
        // owners now rather than at the next period, so what a killed host
        // held (polled queues, buffers, KV reservations) is freed at once.
        if departed || now.duration_since(self.last_reclaim) >= RECLAIM_PERIOD {
            self.last_reclaim = now;
            let peers = &self.peers;
            let gone = |owner: Owner| match owner {
                Owner::Process(pid) => process_gone(pid),
                Owner::Guest { peer, .. } => !peers.present(peer),
            };
            let queues = self.state.queues.reclaim(gone);
            let buffers = self.state.dma.reclaim(gone);
            if queues + buffers > 0 {
                tracing::warn!(queues, buffers, "reclaimed resources of exited hosts");
            }
        }
        self.roll_back_gone_writers();
        self.state.log_unit_deaths(now);
        worked
    }

    /// Advances the thermal model by the time since the last beat, at the
    /// units' utilization over it.
    fn advance_thermal(&mut self, now: Instant) {
        let busy = self.units.busy_ns();
        let dt = now.duration_since(self.last_beat).as_secs_f64();
        let units = self.units.alive().max(1) as f64;
        let utilization = busy.saturating_sub(self.busy_seen) as f64 / 1e9 / (dt * units).max(1e-9);
        self.busy_seen = busy;
        self.state.thermal.advance(dt, utilization);
    }

    /// Advances the background command (Scan Media): its progress in the
    /// Background Command Status register; at the end, Mailbox Status
    /// [0] clears and, if the host enabled it, the background completion
    /// interrupt rings every peer's vector named in Mailbox Capabilities.
    fn step_background(&mut self, now: Instant) -> bool {
        let Some((percent, done)) = self.state.step_scan(now) else {
            return false;
        };
        let mb = regs::MAILBOX_OFFSET;
        let opcode = Opcode::SCAN_MEDIA.0;
        let block = self.background_block;
        block.store_u64(
            mb + mailbox::BACKGROUND_STATUS,
            mailbox::encode_background_status(opcode, percent, 0),
            Release,
        );
        if done {
            let status = block.load_u64(mb + mailbox::STATUS, Acquire);
            block.store_u64(mb + mailbox::STATUS, status & !mailbox::STATUS_BACKGROUND, Release);
            self.publish_event_status();
            let control = block.load_u32(mb + mailbox::CONTROL, Acquire);
            if control & mailbox::CONTROL_BACKGROUND_IRQ != 0 {
                self.peers.ring_all(mailbox::BACKGROUND_IRQ_VECTOR);
            }
        }
        true
    }

    /// Rolls back the KV reservations of queues deleted since the last
    /// pass (by their host, by owner death, peer departure or reset): an
    /// append whose writer is gone leaves no rows behind, and the next
    /// writer's commit cannot cover them.
    fn roll_back_gone_writers(&mut self) {
        let gone = self.state.queues.take_gone();
        if gone.is_empty() {
            return;
        }
        let mut kv = self.executor.kv.write().unwrap_or_else(|e| e.into_inner());
        for writer in gone {
            match kv.abandon(writer) {
                Ok(rolled) => {
                    for (seq, tokens) in rolled {
                        tracing::warn!(seq, tokens, "append abandoned by its queue; rolled back");
                    }
                }
                Err(e) => tracing::error!(error = %e, "rolling back an abandoned append"),
            }
        }
    }

    /// Takes the Mailbox Lock back from a holder that died or overstayed
    /// its lease, so a crashed host cannot shut every other one out of the
    /// mailbox. Runs once per heartbeat.
    fn watch_mailbox_lock(&mut self, now: Instant) {
        let at = regs::PNM_OFFSET + pnm::MAILBOX_LOCK;
        let value = self.regs.load_u64(at, Acquire);
        let since = match self.lock_seen {
            _ if value == 0 => {
                self.lock_seen = None;
                return;
            }
            Some((seen, since)) if seen == value => since,
            _ => {
                self.lock_seen = Some((value, now));
                return;
            }
        };
        let held = now.duration_since(since);
        let holder = pnm::mailbox_lock_holder(value);
        let lease = Duration::from_millis(pnm::MAILBOX_LOCK_LEASE_MS.into());
        // A guest's process cannot be looked up here: its lock ends by the
        // lease alone.
        let checkable = holder & OWNER_GUEST == 0;
        let why = if held >= LOCK_CHECK_AFTER && checkable && (holder == 0 || process_gone(holder))
        {
            "its holder exited"
        } else if held >= lease {
            "its holder overstayed the lease"
        } else {
            return;
        };
        // Exactly this word: a holder that released it meanwhile keeps its release.
        if self.regs.compare_exchange_u64(at, value, 0).is_ok() {
            let breaks_at = regs::PNM_OFFSET + pnm::MAILBOX_LOCK_BREAKS;
            let breaks = self.regs.load_u32(breaks_at, Relaxed).wrapping_add(1);
            self.regs.store_u32(breaks_at, breaks, Relaxed);
            tracing::warn!(
                holder,
                held_ms = held.as_millis() as u64,
                "Mailbox Lock taken back: {why}"
            );
        }
        self.lock_seen = None;
    }

    /// Event Status, in every register block that has one.
    fn publish_event_status(&self) {
        let status = self.state.events.status();
        let at = regs::DEVICE_STATUS_OFFSET + regs::DEVICE_STATUS_EVENT_STATUS;
        self.regs.store_u32(at, status, Release);
        if let Some(function) = &self.function {
            function.view().store_u32(at, status, Release);
        }
    }

    /// Runs the command a host (or a kernel driver, in a function's
    /// `block`) put in the mailbox of `block` and clears its doorbell.
    fn serve_mailbox(&mut self, block: SharedMemory, source: &'static str, control: u32) {
        let mb = regs::MAILBOX_OFFSET;
        let command = block.load_u64(mb + mailbox::COMMAND, Acquire);
        let (opcode, input_len) = mailbox::decode_command(command);
        let opcode = Opcode(opcode);
        let span = tracing::debug_span!("mailbox", source, %opcode, input_len).entered();
        let result = if u64::from(input_len) > regs::MAILBOX_PAYLOAD_SIZE {
            Err(Refusal::new(ReturnCode::INVALID_PAYLOAD_LENGTH, Reason::PayloadTooLong(input_len)))
        } else {
            let mut input = vec![0u8; input_len as usize];
            block
                .read_bytes(mb + mailbox::PAYLOAD, &mut input)
                .expect("payload area is inside the register block");
            self.state.execute(opcode, &input, Instant::now())
        };
        let background = std::mem::take(&mut self.state.started_background);
        let (code, output_len) = match result {
            Ok(_) if background => {
                self.background_block = block;
                block.store_u64(
                    mb + mailbox::BACKGROUND_STATUS,
                    mailbox::encode_background_status(opcode.0, 0, 0),
                    Relaxed,
                );
                (ReturnCode::BACKGROUND_COMMAND_STARTED, 0)
            }
            Ok(output) => {
                debug_assert!(output.len() as u64 <= regs::MAILBOX_PAYLOAD_SIZE);
                block
                    .write_bytes(mb + mailbox::PAYLOAD, &output)
                    .expect("payload area is inside the register block");
                (ReturnCode::SUCCESS, output.len() as u32)
            }
            Err(refusal) => {
                tracing::info!(%opcode, code = %refusal.code, reason = %refusal.reason, "mailbox command refused");
                (refusal.code, 0)
            }
        };
        tracing::debug!(parent: &span, %code, output_len, "done");
        drop(span);
        block.store_u64(
            mb + mailbox::COMMAND,
            mailbox::encode_command(opcode.0, output_len),
            Relaxed,
        );
        // Background Operation: a command running in the background that
        // this mailbox started.
        let running = self.state.scan.is_some() && self.background_block == block;
        let running = if running { mailbox::STATUS_BACKGROUND } else { 0 };
        block.store_u64(mb + mailbox::STATUS, mailbox::encode_status(code.0, 0) | running, Relaxed);
        self.publish_event_status();
        // Release: the payload, Command, Status and Event Status writes
        // above are visible to a host that observes the doorbell clear.
        block.store_u32(mb + mailbox::CONTROL, control & !mailbox::CONTROL_DOORBELL, Release);
    }

    /// A device reset: mailbox back to idle, queues deleted, DMA buffers
    /// released, volatile state cleared; device DRAM and the KV store are
    /// kept (this is not a sanitize).
    fn reset(&mut self) {
        tracing::info!("device reset requested");
        let mb = regs::MAILBOX_OFFSET;
        self.regs.store_u64(regs::MEMDEV_STATUS_OFFSET, 0, Release);
        self.regs.store_u64(mb + mailbox::COMMAND, 0, Relaxed);
        self.regs.store_u64(mb + mailbox::STATUS, 0, Relaxed);
        self.regs.store_u64(mb + mailbox::BACKGROUND_STATUS, 0, Relaxed);
        self.regs.store_u32(mb + mailbox::CONTROL, 0, Relaxed);
        self.state.clock = TimestampClock::default();
        self.state.scan = None;
        self.state.queues.clear();
        self.state.dma.clear();
        let p = regs::PNM_OFFSET;
        let count = self.regs.load_u32(p + pnm::RESET_COUNT, Relaxed).wrapping_add(1);
        self.regs.store_u32(p + pnm::RESET_COUNT, count, Relaxed);
        self.regs.store_u64(regs::MEMDEV_STATUS_OFFSET, memdev_status::READY, Release);
        // Clearing the request last tells the host the reset is complete.
        self.regs.store_u32(p + pnm::RESET_CONTROL, 0, Release);
    }
}
