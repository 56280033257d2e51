//! Mailbox command handlers: input bytes in, output bytes or a refusal out.
//!
//! Pure apart from the clock, so every command and every bad input can be
//! tested without a region.

use std::time::Instant;

use pnm_firmware::LIMITS;
use pnm_firmware::kv::{KvStore, LineFault};
use pnm_protocol::commands::{
    self, AllocateDmaInput, CAPACITY_UNIT, CEL_UUID, CelEntry, CreateQueuePairInput,
    CreateQueuePairOutput, DeleteQueuePairInput, DmaBufferAddr, GetLogInput, GetTimestampOutput,
    HealthInfoOutput, IdentifyOutput, IdentifyPnmOutput, Owner, SetTimestampInput,
    SupportedLogEntry, SupportedLogsHeader,
};
use pnm_protocol::media::{self, LINE, PoisonSource};
use pnm_protocol::queue::{KV_FRAME_SIZE, MAX_QUEUE_ENTRIES, MAX_QUEUE_PAIRS};
use pnm_protocol::regs::{ABI_VERSION, MAILBOX_PAYLOAD_SIZE};
use pnm_protocol::{Opcode, RegionLayout, ReturnCode};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use pnm_firmware::events::EventLogs;
use pnm_protocol::events::{
    self, ClearRequest, EventInterruptPolicy, EventLog, InjectEventInput, InjectEventOutput,
    InterruptMode,
};

use crate::dma::DmaAllocator;
use crate::executor::{DramView, SharedStore};
use crate::queues::QueueTable;
use crate::refusal::{Reason, Refusal};

/// The device's Timestamp: unset until the host sets it, then advancing
/// with the device's monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct TimestampClock {
    set: Option<(u64, Instant)>,
}

impl TimestampClock {
    pub fn get(&self, now: Instant) -> u64 {
        self.set.map_or(0, |(value, at)| {
            value.saturating_add(now.saturating_duration_since(at).as_nanos() as u64)
        })
    }

    pub fn set(&mut self, value: u64, now: Instant) {
        self.set = Some((value, now));
    }
}

/// Counters that Get Health Info reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct HealthCounters {
    pub dirty_shutdown_count: u32,
    pub corrected_volatile_errors: u32,
    /// Bad lines commands have read since the device started.
    pub media_errors: u32,
}

/// Most bad lines the device remembers having logged (a record each);
/// beyond them it logs no more reads of bad lines.
const LOGGED_LINES_MAX: usize = 1 << 16;

/// Where the KV store's frames are, for Identify PNM.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvGeometry {
    pub frames_offset: u64,
    pub frame_count: u32,
}

/// What the mailbox needs to know about the device, and the resources its
/// vendor commands manage.
#[derive(Debug)]
pub struct MailboxState {
    pub layout: RegionLayout,
    pub compute_units: u32,
    pub heartbeat_period_us: u32,
    pub kv: KvGeometry,
    pub clock: TimestampClock,
    pub health: HealthCounters,
    pub queues: QueueTable,
    pub dma: DmaAllocator,
    pub events: EventLogs,
    /// Event Interrupt Policy, per log.
    pub event_policy: [InterruptMode; 4],
    /// Fault injection commands are served (`--allow-injection`).
    pub allow_injection: bool,
    /// The KV store: its DRAM, integrity checks and poison list.
    pub store: SharedStore,
    /// The background command running (Scan Media), if any.
    pub scan: Option<ScanJob>,
    /// The last Scan Media's results not yet read.
    pub scan_results: Option<ScanResults>,
    /// Set by a command that went to the background; the engine answers
    /// Background Command Started and clears it.
    pub started_background: bool,
    /// Bad lines a read has been logged for (until Clear Poison).
    pub logged_lines: std::collections::HashSet<u64>,
    /// Injected faults (Inject Device Fault).
    pub faults: std::sync::Arc<crate::faults::Faults>,
    /// Compute unit deaths already logged.
    pub units_dead_logged: u32,
    /// The device's temperature, from its units' load.
    pub thermal: pnm_firmware::timing::Thermal,
}

/// A Scan Media in progress: the lines left and what it found.
#[derive(Debug, Clone)]
pub struct ScanJob {
    pub lines: std::ops::Range<u64>,
    pub next: u64,
    pub log_events: bool,
    pub found: Vec<pnm_firmware::kv::BadLine>,
}

impl ScanJob {
    pub fn percent(&self) -> u8 {
        let total = (self.lines.end - self.lines.start).max(1);
        ((self.next - self.lines.start) * 100 / total) as u8
    }
}

/// What the last scan found, handed out by Get Scan Media Results.
#[derive(Debug, Clone, Default)]
pub struct ScanResults {
    pub records: std::collections::VecDeque<media::MediaErrorRecord>,
    pub overflow: bool,
}

/// Most records a scan's results hold; more set the overflow flag.
pub const SCAN_RESULTS_MAX: usize = 4096;

/// Lines a scan checks per engine pass (1 MiB of DRAM, well under a
/// millisecond), so the engine keeps serving while it runs.
const SCAN_LINES_PER_STEP: u64 = 16384;

/// Scan throughput Get Scan Media Capabilities estimates with (bytes per
/// millisecond): a scan checks 1 MiB per engine pass, about 1 GB/s when
/// the engine also serves commands (docs/PERFORMANCE.md, "Integrity").
const SCAN_BYTES_PER_MS: u64 = 1 << 20;

/// A General Media record for an uncorrectable error on line `line`.
fn general_media(line: u64, transaction: u8) -> events::EventRecord {
    let mut record = events::EventRecord::new_zeroed();
    record.header.uuid = events::uuid::GENERAL_MEDIA;
    record.header.set_flags(events::flags::PERMANENT);
    let data = events::GeneralMedia {
        // [0]: volatile media.
        physical_address: ((line * LINE) | 1).into(),
        descriptor: events::descriptor::UNCORRECTABLE,
        memory_event_type: events::memory_event::MEDIA_ECC_ERROR,
        transaction_type: transaction,
        ..FromZeros::new_zeroed()
    };
    record.data.copy_from_slice(data.as_bytes());
    record
}

/// Reads a command's fixed-size input.
fn read_input<T: FromBytes + KnownLayout + Immutable>(
    command: Opcode,
    input: &[u8],
) -> Result<T, Refusal> {
    T::read_from_bytes(input).map_err(|_| {
        Refusal::new(
            ReturnCode::INVALID_PAYLOAD_LENGTH,
            Reason::InputLength {
                command,
                expected: commands::InputLen::Exact(size_of::<T>()),
                got: input.len(),
            },
        )
    })
}

/// The Command Effects Log: every supported opcode with its effects.
/// Fault injection commands are listed only when they are served.
pub fn command_effects_log(allow_injection: bool) -> Vec<u8> {
    Opcode::ALL
        .iter()
        .filter(|&op| allow_injection || !Opcode::INJECTION.contains(op))
        .flat_map(|&op| {
            let entry =
                CelEntry { opcode: op.0.into(), effect: commands::command_effect(op).into() };
            entry.as_bytes().to_vec()
        })
        .collect()
}

impl MailboxState {
    /// Logs that the device found its region left by a device that did not
    /// stop in order: a Memory Module record (Health Status Change, with
    /// the health that includes the new Dirty Shutdown Count) in the
    /// warning log.
    pub fn log_dirty_shutdown(&mut self) {
        let mut record = events::EventRecord::new_zeroed();
        record.header.uuid = events::uuid::MEMORY_MODULE;
        let data = events::MemoryModule {
            device_event_type: events::device_event::HEALTH_STATUS_CHANGE,
            health: self.health_info(),
            reserved: [0; 0x3D],
        };
        record.data.copy_from_slice(data.as_bytes());
        self.log_event(EventLog::Warning, record, Instant::now());
    }

    /// Takes in what a command found bad: lines whose check failed go on
    /// the poison list (source Internal; the list's overflow mark if it is
    /// full), and each bad line gets a General Media record (failure log,
    /// uncorrectable, host read) the first time a command reads it after it
    /// went bad, so reads that keep hitting one line do not flood the log.
    pub fn record_media(&mut self, report: &crate::executor::MediaReport, now: Instant) {
        let timestamp = self.clock.get(now);
        let corrupt: Vec<u64> =
            report.lines.iter().filter(|b| b.fault == LineFault::Corrupt).map(|b| b.line).collect();
        if !corrupt.is_empty() {
            let mut store = self.write_store();
            for &line in &corrupt {
                match store.add_poison(line..line + 1, PoisonSource::Internal) {
                    Ok(Ok(())) => {}
                    Ok(Err(_full)) => {
                        if let Err(e) = store.mark_poison_overflow(timestamp) {
                            tracing::error!(error = %e, "saving the poison list");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "saving the poison list"),
                }
            }
        }
        self.health.media_errors =
            self.health.media_errors.saturating_add(report.lines.len() as u32);
        tracing::warn!(
            opcode = %report.opcode,
            lines = report.lines.len(),
            corrupt = corrupt.len(),
            first_dpa = report.lines.first().map_or(0, |b| b.line * LINE),
            "command read bad media"
        );
        for bad in &report.lines {
            if self.logged_lines.len() < LOGGED_LINES_MAX && self.logged_lines.insert(bad.line) {
                let record = general_media(bad.line, events::transaction::HOST_READ);
                self.log_event(EventLog::Failure, record, now);
            }
        }
    }

    /// Adds a record to a log; if the log was empty and its policy asks
    /// for MSI/MSI-X, rings that vector of every host. Returns the handle
    /// (None: the log was full).
    pub fn log_event(
        &mut self,
        log: EventLog,
        record: events::EventRecord,
        now: Instant,
    ) -> Option<u16> {
        let was_empty = self.events.len(log) == 0;
        let handle = self.events.insert(log, record, self.clock.get(now));
        if was_empty
            && handle.is_some()
            && let InterruptMode::Msi(vector) = self.event_policy[log.index()]
        {
            self.queues.peers().ring_all(u16::from(vector));
        }
        handle
    }

    /// Set Event Interrupt Policy: each log's byte must be none or MSI/MSI-X
    /// on one of the 8 vectors (no firmware interrupts here); a Dynamic
    /// Capacity byte must be 0 (no such log).
    fn set_event_policy(&mut self, input: &[u8]) -> Result<(), Refusal> {
        let mut policy = [InterruptMode::None; 4];
        for (i, &setting) in input.iter().enumerate() {
            let log = EventLog::from_wire(i as u8).map_or("dynamic capacity", EventLog::name);
            let bad = |why| Refusal::invalid(Reason::EventInterruptPolicy { log, setting, why });
            match (i, InterruptMode::decode(setting)) {
                (4, _) if setting != 0 => return Err(bad("this device keeps no such log")),
                (4, _) => {}
                (_, None) => return Err(bad("reserved bits or mode")),
                (_, Some(InterruptMode::Firmware(_))) => {
                    return Err(bad("firmware interrupts are not supported"));
                }
                (_, Some(InterruptMode::Msi(v)))
                    if u16::from(v) >= pnm_protocol::notify::VECTORS =>
                {
                    return Err(bad("vector beyond the 8 each peer has"));
                }
                (_, Some(mode)) => policy[i] = mode,
            }
        }
        self.event_policy = policy;
        Ok(())
    }

    /// Executes one mailbox command.
    pub fn execute(
        &mut self,
        opcode: Opcode,
        input: &[u8],
        now: Instant,
    ) -> Result<Vec<u8>, Refusal> {
        let expected = opcode
            .input_len()
            .ok_or(Refusal::new(ReturnCode::UNSUPPORTED, Reason::UnsupportedCommand(opcode)))?;
        if !expected.accepts(input.len()) {
            return Err(Refusal::new(
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                Reason::InputLength { command: opcode, expected, got: input.len() },
            ));
        }

        match opcode {
            Opcode::GET_EVENT_RECORDS => {
                let log = EventLog::from_wire(input[0])
                    .ok_or(Refusal::invalid(Reason::UnknownEventLog(input[0])))?;
                let room = (MAILBOX_PAYLOAD_SIZE as usize - events::GET_OUTPUT_HEADER_LEN)
                    / events::RECORD_LEN;
                Ok(self.events.get(log, room).encode())
            }
            Opcode::CLEAR_EVENT_RECORDS => {
                // A length that disagrees with the handle count is a payload
                // length error (as QEMU answers it); other bad input, Invalid Input.
                let request = ClearRequest::decode(input).map_err(|e| match e {
                    events::ClearInputError::HandleBytes { .. } => {
                        Refusal::new(ReturnCode::INVALID_PAYLOAD_LENGTH, e.into())
                    }
                    _ => Refusal::invalid(e.into()),
                })?;
                self.events
                    .clear(&request)
                    .map_err(|e| Refusal::new(ReturnCode::INVALID_HANDLE, e.into()))?;
                Ok(Vec::new())
            }
            Opcode::GET_EVENT_INTERRUPT_POLICY => {
                let settings = self.event_policy.map(InterruptMode::encode);
                Ok(EventInterruptPolicy { settings }.as_bytes().to_vec())
            }
            Opcode::SET_EVENT_INTERRUPT_POLICY => {
                self.set_event_policy(input)?;
                Ok(Vec::new())
            }
            _ if Opcode::INJECTION.contains(&opcode) && !self.allow_injection => {
                Err(Refusal::new(ReturnCode::UNSUPPORTED, Reason::InjectionNotAllowed))
            }
            Opcode::GET_POISON_LIST => self.get_poison_list(read_input(opcode, input)?),
            Opcode::INJECT_POISON => {
                let input = read_input::<media::InjectPoisonInput>(opcode, input)?;
                let dpa = self.frames_range(input.physical_address.get(), 1)?;
                self.write_store()
                    .add_poison(dpa / LINE..dpa / LINE + 1, PoisonSource::Injected)?
                    .map_err(|full| {
                        Refusal::new(ReturnCode::INJECT_POISON_LIMIT_REACHED, full.into())
                    })?;
                Ok(Vec::new())
            }
            Opcode::CLEAR_POISON => {
                let input = read_input::<media::ClearPoisonInput>(opcode, input)?;
                let dpa = self.frames_range(input.physical_address.get(), 1)?;
                let now = self.clock.get(now);
                self.write_store().clear_poison(dpa / LINE, &input.write_data, now)?;
                self.logged_lines.remove(&(dpa / LINE));
                Ok(Vec::new())
            }
            Opcode::INJECT_MEDIA_FAULT => {
                let input = read_input::<media::InjectMediaFaultInput>(opcode, input)?;
                if input.reserved != [0; 6] {
                    return Err(Refusal::invalid(Reason::ReservedNotZero));
                }
                let lines = input.range.length.get();
                let dpa = self.frames_range(input.range.physical_address.get(), lines)?;
                match input.kind {
                    media::fault_kind::POISON => {
                        self.write_store()
                            .add_poison(dpa / LINE..dpa / LINE + lines, PoisonSource::Injected)?
                            .map_err(|full| {
                                Refusal::new(ReturnCode::INJECT_POISON_LIMIT_REACHED, full.into())
                            })?;
                    }
                    media::fault_kind::CORRUPT if input.pattern == 0 => {
                        return Err(Refusal::invalid(Reason::EmptyPattern));
                    }
                    media::fault_kind::CORRUPT => {
                        self.write_store().corrupt(dpa, lines * LINE, input.pattern)?;
                    }
                    other => return Err(Refusal::invalid(Reason::UnknownFaultKind(other))),
                }
                tracing::warn!(dpa, lines, kind = input.kind, "media fault injected");
                Ok(Vec::new())
            }
            Opcode::GET_SCAN_MEDIA_CAPABILITIES => {
                let input = read_input::<media::DpaRange>(opcode, input)?;
                let (_, lines) = self.dram_range(input)?;
                let ms = (lines * LINE).div_ceil(SCAN_BYTES_PER_MS).max(1);
                let out = media::ScanMediaCapabilities {
                    estimated_runtime_ms: (ms.min(u64::from(u32::MAX)) as u32).into(),
                };
                Ok(out.as_bytes().to_vec())
            }
            Opcode::SCAN_MEDIA => {
                let input = read_input::<media::ScanMediaInput>(opcode, input)?;
                if input.flags & !media::SCAN_NO_EVENT_LOG != 0 {
                    return Err(Refusal::invalid(Reason::ReservedNotZero));
                }
                if self.scan.is_some() {
                    return Err(Refusal::new(ReturnCode::BUSY, Reason::BackgroundBusy));
                }
                let (dpa, lines) = self.dram_range(input.range)?;
                let first = dpa / LINE;
                self.scan = Some(ScanJob {
                    lines: first..first + lines,
                    next: first,
                    log_events: input.flags & media::SCAN_NO_EVENT_LOG == 0,
                    found: Vec::new(),
                });
                self.scan_results = None;
                self.started_background = true;
                Ok(Vec::new())
            }
            Opcode::GET_SCAN_MEDIA_RESULTS => {
                if self.scan.is_some() {
                    return Err(Refusal::new(ReturnCode::BUSY, Reason::BackgroundBusy));
                }
                let results = self.scan_results.get_or_insert_default();
                let room = (MAILBOX_PAYLOAD_SIZE as usize - media::LIST_HEADER_LEN) / 16;
                let n = results.records.len().min(room);
                let records: Vec<media::MediaErrorRecord> = results.records.drain(..n).collect();
                let mut flags = 0;
                if !results.records.is_empty() {
                    flags |= media::scan_flags::MORE_RECORDS;
                }
                if results.overflow {
                    flags |= media::scan_flags::OVERFLOW;
                }
                let header = media::ScanMediaResultsHeader {
                    restart_address: 0.into(),
                    restart_length: 0.into(),
                    flags,
                    reserved: 0,
                    count: (records.len() as u16).into(),
                    reserved2: [0; 0xC],
                };
                Ok([header.as_bytes(), records.as_bytes()].concat())
            }
            Opcode::INJECT_DEVICE_FAULT => {
                let input =
                    read_input::<pnm_protocol::faults::InjectDeviceFaultInput>(opcode, input)?;
                self.faults.inject(&input, self.compute_units)?;
                Ok(Vec::new())
            }
            Opcode::INJECT_EVENT => {
                let input = read_input::<InjectEventInput>(opcode, input)?;
                let log = EventLog::from_wire(input.event_log)
                    .ok_or(Refusal::invalid(Reason::UnknownEventLog(input.event_log)))?;
                if input.reserved != [0; 7] {
                    return Err(Refusal::invalid(Reason::ReservedNotZero));
                }
                let handle = self.log_event(log, input.record, now).unwrap_or(0);
                Ok(InjectEventOutput { handle: handle.into(), reserved: [0; 6] }
                    .as_bytes()
                    .to_vec())
            }
            Opcode::GET_TIMESTAMP => {
                let out = GetTimestampOutput { timestamp_ns: self.clock.get(now).into() };
                Ok(out.as_bytes().to_vec())
            }
            Opcode::SET_TIMESTAMP => {
                let input = read_input::<SetTimestampInput>(opcode, input)?;
                self.clock.set(input.timestamp_ns.get(), now);
                Ok(Vec::new())
            }
            Opcode::GET_SUPPORTED_LOGS => {
                let header = SupportedLogsHeader { entries: 1.into(), reserved: [0; 6] };
                let cel = SupportedLogEntry {
                    log_id: CEL_UUID,
                    log_size: (command_effects_log(self.allow_injection).len() as u32).into(),
                };
                Ok([header.as_bytes(), cel.as_bytes()].concat())
            }
            Opcode::GET_LOG => self.get_log(read_input(opcode, input)?),
            Opcode::IDENTIFY_MEMORY_DEVICE => Ok(self.identify().as_bytes().to_vec()),
            Opcode::GET_HEALTH_INFO => Ok(self.health_info().as_bytes().to_vec()),
            Opcode::IDENTIFY_PNM => Ok(self.identify_pnm().as_bytes().to_vec()),
            Opcode::CREATE_QUEUE_PAIR => {
                let input = read_input::<CreateQueuePairInput>(opcode, input)?;
                let queue_id = self.queues.create(&input)?;
                Ok(CreateQueuePairOutput { queue_id: queue_id.into(), reserved: [0; 6] }
                    .as_bytes()
                    .to_vec())
            }
            Opcode::DELETE_QUEUE_PAIR => {
                let input = read_input::<DeleteQueuePairInput>(opcode, input)?;
                self.queues.delete(input.queue_id.get())?;
                Ok(Vec::new())
            }
            Opcode::ALLOCATE_DMA => {
                let input = read_input::<AllocateDmaInput>(opcode, input)?;
                let owner = Owner::decode(input.owner_pid.get(), input.peer_id.get());
                if let Some(Owner::Guest { peer, .. }) = owner
                    && !self.queues.peer_present(peer)
                {
                    return Err(Refusal::invalid(Reason::NoSuchPeer(peer)));
                }
                let addr = self.dma.allocate(input.size.get(), owner)?;
                Ok(DmaBufferAddr { addr: addr.into() }.as_bytes().to_vec())
            }
            Opcode::FREE_DMA => {
                let input = read_input::<DmaBufferAddr>(opcode, input)?;
                if !self.dma.free(input.addr.get()) {
                    return Err(Refusal::invalid(Reason::NoSuchDmaBuffer(input.addr.get())));
                }
                Ok(Vec::new())
            }
            _ => Err(Refusal::new(ReturnCode::UNSUPPORTED, Reason::UnsupportedCommand(opcode))),
        }
    }

    fn write_store(&self) -> std::sync::RwLockWriteGuard<'_, KvStore<DramView>> {
        self.store.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_store(&self) -> std::sync::RwLockReadGuard<'_, KvStore<DramView>> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `lines` lines from `dpa` are aligned and lie in the KV
    /// frames (the media that takes poison: the store's own tables are
    /// device metadata); returns `dpa`.
    fn frames_range(&self, dpa: u64, lines: u64) -> Result<u64, Refusal> {
        if !dpa.is_multiple_of(LINE) {
            return Err(Refusal::invalid(Reason::UnalignedDpa(dpa)));
        }
        let len = lines.saturating_mul(LINE);
        if !self.read_store().in_frames(dpa, len) {
            return Err(Refusal::new(
                ReturnCode::INVALID_PHYSICAL_ADDRESS,
                Reason::DpaOutside { dpa, len, within: "in the KV frames" },
            ));
        }
        Ok(dpa)
    }

    /// Checks a DPA range input: aligned, within device DRAM. Returns
    /// (DPA, lines).
    fn dram_range(&self, input: media::DpaRange) -> Result<(u64, u64), Refusal> {
        let dpa = input.physical_address.get();
        let lines = input.length.get();
        if !dpa.is_multiple_of(LINE) {
            return Err(Refusal::invalid(Reason::UnalignedDpa(dpa)));
        }
        let len = lines.saturating_mul(LINE);
        if dpa.checked_add(len).is_none_or(|end| end > self.layout.dram_size) {
            return Err(Refusal::new(
                ReturnCode::INVALID_PHYSICAL_ADDRESS,
                Reason::DpaOutside { dpa, len, within: "in device DRAM" },
            ));
        }
        Ok((dpa, lines))
    }

    /// Runs one step of the Scan Media in progress. Returns the percentage
    /// done, and whether it finished with this step.
    pub fn step_scan(&mut self, now: Instant) -> Option<(u8, bool)> {
        let job = self.scan.as_mut()?;
        let end = (job.next + SCAN_LINES_PER_STEP).min(job.lines.end);
        let step = job.next..end;
        let found = self.store.read().unwrap_or_else(|e| e.into_inner()).scrub(step);
        let job = self.scan.as_mut().expect("checked above");
        match found {
            Ok(found) => job.found.extend(found),
            Err(e) => tracing::error!(error = %e, "scan media step"),
        }
        job.next = end;
        if end < job.lines.end {
            return Some((job.percent(), false));
        }
        let job = self.scan.take().expect("checked above");
        self.finish_scan(job, now);
        Some((100, true))
    }

    /// A finished scan: what it found goes on the poison list (the lines
    /// whose checks failed, as Internal), into its results and, unless the
    /// host said not to, into the failure log.
    fn finish_scan(&mut self, job: ScanJob, now: Instant) {
        let timestamp = self.clock.get(now);
        let mut results = ScanResults::default();
        {
            let mut store = self.write_store();
            for bad in &job.found {
                let source = match bad.fault {
                    LineFault::Poisoned(source) => source,
                    LineFault::Corrupt => {
                        match store.add_poison(bad.line..bad.line + 1, PoisonSource::Internal) {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => {
                                let _ = store.mark_poison_overflow(timestamp);
                            }
                            Err(e) => tracing::error!(error = %e, "saving the poison list"),
                        }
                        PoisonSource::Internal
                    }
                };
                if results.records.len() < SCAN_RESULTS_MAX {
                    results.records.push_back(media::MediaErrorRecord::new(
                        bad.line * LINE,
                        1,
                        source,
                    ));
                } else {
                    results.overflow = true;
                }
            }
        }
        tracing::info!(
            lines = job.lines.end - job.lines.start,
            found = job.found.len(),
            "scan media done"
        );
        if job.log_events {
            for bad in &job.found {
                let record = general_media(bad.line, events::transaction::HOST_SCAN_MEDIA);
                self.log_event(EventLog::Failure, record, now);
            }
        }
        self.scan_results = Some(results);
    }

    /// Get Poison List: the records within the range, clipped to it.
    fn get_poison_list(&self, input: media::DpaRange) -> Result<Vec<u8>, Refusal> {
        let (dpa, lines) = self.dram_range(input)?;
        let store = self.read_store();
        let list = store.poison();
        let room = (MAILBOX_PAYLOAD_SIZE as usize - media::LIST_HEADER_LEN) / 16;
        let mut records: Vec<media::MediaErrorRecord> = Vec::new();
        let mut more = false;
        for p in list.within(dpa / LINE..dpa / LINE + lines) {
            if records.len() == room {
                more = true;
                break;
            }
            let n = (p.lines.end - p.lines.start) as u32;
            records.push(media::MediaErrorRecord::new(p.lines.start * LINE, n, p.source));
        }
        let mut flags = 0;
        if more {
            flags |= media::poison_flags::MORE_RECORDS;
        }
        if list.overflowed_at().is_some() {
            flags |= media::poison_flags::OVERFLOW;
        }
        if self.scan.is_some() {
            flags |= media::poison_flags::SCAN_MEDIA_IN_PROGRESS;
        }
        let header = media::PoisonListHeader {
            flags,
            reserved: 0,
            overflow_timestamp: list.overflowed_at().unwrap_or(0).into(),
            count: (records.len() as u16).into(),
            reserved2: [0; 0x14],
        };
        Ok([header.as_bytes(), records.as_bytes()].concat())
    }

    fn get_log(&self, input: GetLogInput) -> Result<Vec<u8>, Refusal> {
        if input.log_id != CEL_UUID {
            return Err(Refusal::new(ReturnCode::INVALID_LOG, Reason::UnknownLog));
        }
        let log = command_effects_log(self.allow_injection);
        let offset = input.offset.get() as u64;
        let length = input.length.get() as u64;
        let size = log.len() as u64;
        if length > MAILBOX_PAYLOAD_SIZE || offset + length > size {
            return Err(Refusal::invalid(Reason::LogRange { offset, length, size }));
        }
        Ok(log[offset as usize..(offset + length) as usize].to_vec())
    }

    fn identify(&self) -> IdentifyOutput {
        // Capacity is reported in 256 MiB units, rounded down as a host may
        // only map whole units; Identify PNM gives the exact byte count.
        let capacity = self.layout.dram_size / CAPACITY_UNIT;
        IdentifyOutput {
            fw_revision: commands::to_ascii_field(LIMITS.revision),
            total_capacity: capacity.into(),
            volatile_only_capacity: capacity.into(),
            persistent_only_capacity: 0.into(),
            partition_alignment: 0.into(),
            info_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            warning_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            failure_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            fatal_event_log_size: (pnm_firmware::events::LOG_CAPACITY as u16).into(),
            lsa_size: 0.into(),
            poison_list_max_records: {
                let max = media::POISON_LIST_MAX_RECORDS as u32;
                [max as u8, (max >> 8) as u8, (max >> 16) as u8]
            },
            // Injections count against the list itself, up to its size.
            inject_poison_limit: if self.allow_injection {
                (media::POISON_LIST_MAX_RECORDS as u16).into()
            } else {
                0.into()
            },
            poison_handling_caps: commands::POISON_CAP_PERSISTENT | commands::POISON_CAP_SCAN_MEDIA,
            qos_telemetry_caps: 0,
            dc_event_log_size: 0.into(),
        }
    }

    /// Logs compute units that died since the last call: a Memory Module
    /// record (Health Status Change, performance degraded) in the warning
    /// log per death.
    pub fn log_unit_deaths(&mut self, now: Instant) {
        let dead = self.faults.units_dead();
        while self.units_dead_logged < dead {
            self.units_dead_logged += 1;
            let mut record = events::EventRecord::new_zeroed();
            record.header.uuid = events::uuid::MEMORY_MODULE;
            record.header.set_flags(events::flags::PERFORMANCE_DEGRADED);
            let data = events::MemoryModule {
                device_event_type: events::device_event::HEALTH_STATUS_CHANGE,
                health: self.health_info(),
                reserved: [0; 0x3D],
            };
            record.data.copy_from_slice(data.as_bytes());
            self.log_event(EventLog::Warning, record, now);
        }
    }

    fn health_info(&self) -> HealthInfoOutput {
        // [0] maintenance needed: bad media is listed; [1] performance
        // degraded: a compute unit died or memory runs slow.
        let maintenance = !self.read_store().poison().is_empty();
        let degraded = self.faults.units_dead() > 0 || self.faults.slowdown() > 1.0;
        HealthInfoOutput {
            health_status: u8::from(maintenance) | (u8::from(degraded) << 1),
            media_status: 0,
            additional_status: 0,
            // DRAM does not wear out: there is no life to use up.
            life_used: commands::LIFE_USED_NOT_IMPLEMENTED,
            device_temperature: (self.thermal.celsius() as u16).into(),
            dirty_shutdown_count: self.health.dirty_shutdown_count.into(),
            corrected_volatile_error_count: self.health.corrected_volatile_errors.into(),
            corrected_persistent_error_count: 0.into(),
        }
    }

    fn identify_pnm(&self) -> IdentifyPnmOutput {
        IdentifyPnmOutput {
            abi_version: ABI_VERSION.into(),
            compute_units: self.compute_units.into(),
            region_size: self.layout.size.into(),
            dma_window_offset: self.layout.dma_window_offset.into(),
            dma_window_size: self.layout.dma_window_size.into(),
            dram_offset: self.layout.dram_offset.into(),
            dram_size: self.layout.dram_size.into(),
            supported_dtypes: LIMITS.dtype_mask().into(),
            max_head_dim: LIMITS.max_head_dim.into(),
            max_k: LIMITS.max_k.into(),
            max_group: LIMITS.max_group.into(),
            kv_frame_size: KV_FRAME_SIZE.into(),
            max_queue_pairs: MAX_QUEUE_PAIRS.into(),
            max_queue_entries: MAX_QUEUE_ENTRIES.into(),
            heartbeat_period_us: self.heartbeat_period_us.into(),
            fw_revision: commands::to_ascii_field(LIMITS.revision),
            kv_frames_offset: self.kv.frames_offset.into(),
            kv_frame_count: self.kv.frame_count.into(),
            max_sequences: LIMITS.max_sequences.into(),
        }
    }
}

#[cfg(test)]
mod tests_support {
    pub(super) use super::tests::state as state_with_store;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    pub(super) fn state() -> MailboxState {
        // The mailbox's own state never touches the region; queue commands
        // are tested against a real region in `tests/`.
        let region = crate::Region::embedded(1 << 30, None).unwrap();
        let layout = region.layout;
        let regs = region.regs();
        // Keep the memfd mapped for the test's duration.
        std::mem::forget(region);
        let (store, _) = KvStore::open(DramView::new(regs, &layout)).unwrap();
        MailboxState {
            layout,
            compute_units: 2,
            heartbeat_period_us: 10_000,
            kv: KvGeometry::default(),
            clock: TimestampClock::default(),
            health: HealthCounters { dirty_shutdown_count: 3, ..Default::default() },
            queues: QueueTable::new(regs, layout, crate::notify::Peers::default()),
            dma: DmaAllocator::new(&layout),
            events: EventLogs::default(),
            event_policy: Default::default(),
            allow_injection: false,
            store: std::sync::Arc::new(std::sync::RwLock::new(store)),
            scan: None,
            scan_results: None,
            started_background: false,
            logged_lines: Default::default(),
            faults: Default::default(),
            units_dead_logged: 0,
            thermal: Default::default(),
        }
    }

    #[test]
    fn unknown_opcodes_are_unsupported() {
        let now = Instant::now();
        for op in [0x0000, 0x0001, 0x4306, 0xC0FF, 0xFFFF] {
            assert_eq!(
                state().execute(Opcode(op), &[], now).map_err(|r| r.code),
                Err(ReturnCode::UNSUPPORTED)
            );
        }
    }

    #[test]
    fn wrong_input_lengths_are_refused() {
        let now = Instant::now();
        let mut s = state();
        assert_eq!(
            s.execute(Opcode::IDENTIFY_MEMORY_DEVICE, &[0], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::SET_TIMESTAMP, &[0; 7], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::SET_TIMESTAMP, &[0; 9], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
        assert_eq!(
            s.execute(Opcode::GET_LOG, &[0; 0x17], now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
    }

    #[test]
    fn queue_pairs_take_a_priority_and_refuse_unknown_ones() {
        use pnm_protocol::commands::{QUEUE_PRIORITY_HIGH, QUEUE_PRIORITY_NORMAL};
        let now = Instant::now();
        let mut s = state();
        let window = s.layout.dma_window_offset;
        let input = |at: u64, priority: u8, reserved: u8| CreateQueuePairInput {
            sq_addr: (window + at).into(),
            cq_addr: (window + at + 64 * 16).into(),
            entries: 16.into(),
            irq_vector: pnm_protocol::queue::IRQ_NONE.into(),
            owner_pid: 4242.into(),
            peer_id: 0.into(),
            coalesce_count: 0.into(),
            coalesce_usec: 0.into(),
            priority,
            reserved: [reserved, 0, 0, 0, 0, 0, 0],
        };
        for (i, priority) in [QUEUE_PRIORITY_NORMAL, QUEUE_PRIORITY_HIGH].into_iter().enumerate() {
            let at = 4096 * i as u64;
            assert!(
                s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, priority, 0).as_bytes(), now)
                    .is_ok()
            );
        }
        for (priority, reserved) in [(2, 0), (0xFF, 0), (QUEUE_PRIORITY_HIGH, 1)] {
            assert_eq!(
                s.execute(
                    Opcode::CREATE_QUEUE_PAIR,
                    input(8192, priority, reserved).as_bytes(),
                    now
                )
                .map_err(|r| r.code),
                Err(ReturnCode::INVALID_INPUT)
            );
        }
        // Every queue needs an owner to be reclaimed from.
        let mut ownerless = input(8192, QUEUE_PRIORITY_NORMAL, 0);
        ownerless.owner_pid = 0.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, ownerless.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // One owner gets half the device's queue pairs (2 made above).
        let per_owner = pnm_protocol::queue::MAX_QUEUE_PAIRS_PER_OWNER as u64;
        for i in 2..per_owner {
            let at = 8192 * i;
            assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, 0, 0).as_bytes(), now).is_ok());
        }
        let at = 8192 * per_owner;
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, input(at, 0, 0).as_bytes(), now)
                .map_err(|r| r.code),
            Err(ReturnCode::RESOURCES_EXHAUSTED)
        );
        let mut other = input(at, 0, 0);
        other.owner_pid = 4243.into();
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, other.as_bytes(), now).is_ok());
        // A guest owner names the peer it is; one not connected is refused,
        // for queues and buffers alike.
        let mut guest = input(at + 8192, 0, 0);
        guest.owner_pid = (4242 | pnm_protocol::commands::OWNER_GUEST).into();
        guest.peer_id = 5.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, guest.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        let dma = AllocateDmaInput {
            size: 4096.into(),
            owner_pid: guest.owner_pid,
            peer_id: 5.into(),
            reserved: [0; 2],
        };
        assert_eq!(
            s.execute(Opcode::ALLOCATE_DMA, dma.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // A peer held for its live process since a device restart (a QEMU
        // that did not connect again) is the guest's still: its queues,
        // with interrupts that reach no one, and buffers are accepted. One
        // held for a process that is gone is refused.
        s.queues.peers().hold_for(5, std::process::id());
        assert!(s.execute(Opcode::ALLOCATE_DMA, dma.as_bytes(), now).is_ok());
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, guest.as_bytes(), now).is_ok());
        let mut interrupted = input(at + 2 * 8192, 0, 0);
        interrupted.owner_pid = guest.owner_pid;
        interrupted.peer_id = 5.into();
        interrupted.irq_vector = 0.into();
        assert!(s.execute(Opcode::CREATE_QUEUE_PAIR, interrupted.as_bytes(), now).is_ok());
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = exited.id();
        exited.wait().unwrap();
        s.queues.peers().hold_for(6, gone_pid);
        let mut orphan = input(at + 3 * 8192, 0, 0);
        orphan.owner_pid = guest.owner_pid;
        orphan.peer_id = 6.into();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, orphan.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        // The pre-priority 32-byte input is a length error, not a normal queue.
        let short = &input(8192, 0, 0).as_bytes()[..32].to_vec();
        assert_eq!(
            s.execute(Opcode::CREATE_QUEUE_PAIR, short, now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PAYLOAD_LENGTH)
        );
    }

    #[test]
    fn timestamp_is_zero_until_set_then_advances() {
        let t0 = Instant::now();
        let mut s = state();
        assert_eq!(s.execute(Opcode::GET_TIMESTAMP, &[], t0).unwrap(), 0u64.to_le_bytes());
        s.execute(Opcode::SET_TIMESTAMP, &1_000u64.to_le_bytes(), t0).unwrap();
        let later = t0 + Duration::from_micros(5);
        assert_eq!(s.execute(Opcode::GET_TIMESTAMP, &[], later).unwrap(), 6_000u64.to_le_bytes());
    }

    #[test]
    fn cel_lists_every_opcode() {
        let now = Instant::now();
        let mut s = state();
        // Fault injection is listed only where it is served.
        let injection = Opcode::INJECTION.len();
        assert_eq!(command_effects_log(false).len(), (Opcode::ALL.len() - injection) * 4);
        s.allow_injection = true;
        let logs = s.execute(Opcode::GET_SUPPORTED_LOGS, &[], now).unwrap();
        assert_eq!(logs.len(), 8 + 0x14);
        assert_eq!(&logs[8..24], &CEL_UUID);
        let size = u32::from_le_bytes(logs[24..28].try_into().unwrap());
        assert_eq!(size as usize, Opcode::ALL.len() * 4);
        let mut req = GetLogInput { log_id: CEL_UUID, offset: 0.into(), length: size.into() };
        let cel = s.execute(Opcode::GET_LOG, req.as_bytes(), now).unwrap();
        let opcodes: Vec<u16> = cel.chunks(4).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(opcodes, Opcode::ALL.map(|o| o.0));
        // A partial read at an offset.
        req.offset = 4.into();
        req.length = 4.into();
        assert_eq!(s.execute(Opcode::GET_LOG, req.as_bytes(), now).unwrap(), &cel[4..8]);
        // Reads past the end, and unknown logs.
        req.length = size.into();
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        req.offset = u32::MAX.into();
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        req.log_id[0] ^= 1;
        assert_eq!(
            s.execute(Opcode::GET_LOG, req.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_LOG)
        );
    }

    #[test]
    fn identify_reports_dram_in_capacity_units() {
        let out = state().execute(Opcode::IDENTIFY_MEMORY_DEVICE, &[], Instant::now()).unwrap();
        let id = IdentifyOutput::read_from_bytes(&out).unwrap();
        // 1 GiB region with 130 MiB before DRAM: 894 MiB of DRAM = 3 whole units.
        assert_eq!(id.total_capacity.get(), 3);
        assert_eq!(id.volatile_only_capacity.get(), 3);
        assert_eq!(commands::ascii_field(&id.fw_revision), LIMITS.revision);
        let health = state().execute(Opcode::GET_HEALTH_INFO, &[], Instant::now()).unwrap();
        assert_eq!(
            HealthInfoOutput::read_from_bytes(&health).unwrap().dirty_shutdown_count.get(),
            3
        );
    }
}

#[cfg(test)]
mod poison_tests {
    use super::tests_support::state_with_store;
    use super::*;
    use pnm_firmware::kv::{Dram, SequenceShape, TopkQuery};
    use pnm_protocol::media::{
        ClearPoisonInput, DpaRange, InjectMediaFaultInput, InjectPoisonInput, MediaErrorRecord,
        PoisonListHeader, fault_kind,
    };

    fn list(
        s: &mut MailboxState,
        dpa: u64,
        lines: u64,
    ) -> (PoisonListHeader, Vec<MediaErrorRecord>) {
        let input = DpaRange { physical_address: dpa.into(), length: lines.into() };
        let out = s.execute(Opcode::GET_POISON_LIST, input.as_bytes(), Instant::now()).unwrap();
        let (header, rest) = PoisonListHeader::read_from_prefix(&out).unwrap();
        let records = <[MediaErrorRecord]>::ref_from_bytes(rest).unwrap().to_vec();
        assert_eq!(records.len(), usize::from(header.count.get()));
        (header, records)
    }

    #[test]
    fn poison_is_listed_fails_reads_and_clears_and_injection_is_gated() {
        let now = Instant::now();
        let mut s = state_with_store();
        let shape =
            SequenceShape { dtype: pnm_protocol::Dtype::F32, layers: 1, heads: 1, head_dim: 16 };
        let rows: Vec<u8> = (0..64 * 64).map(|i| (i % 251) as u8).collect();
        let seq = s.write_store().create_with_rows(shape, &rows, &rows, 64).unwrap();
        // The line holding token 5's first key element: f32 keys of 16
        // elements lie in tiles, so it holds dimension 0 of tokens 0..16.
        let key = s.read_store().row_locations(seq, 0, 0, &[5]).unwrap()[0].key / 64 * 64;
        let inject = InjectPoisonInput { physical_address: key.into() };
        let all = s.layout.dram_size / 64;
        // Off unless the device was started with --allow-injection.
        assert_eq!(
            s.execute(Opcode::INJECT_POISON, inject.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::UNSUPPORTED)
        );
        s.allow_injection = true;
        s.execute(Opcode::INJECT_POISON, inject.as_bytes(), now).unwrap();
        // Unaligned, and outside the KV frames (the store's own tables).
        for (dpa, code) in
            [(key + 8, ReturnCode::INVALID_INPUT), (0, ReturnCode::INVALID_PHYSICAL_ADDRESS)]
        {
            let bad = InjectPoisonInput { physical_address: dpa.into() };
            assert_eq!(
                s.execute(Opcode::INJECT_POISON, bad.as_bytes(), now).map_err(|r| r.code),
                Err(code)
            );
        }
        let (header, records) = list(&mut s, 0, all);
        assert_eq!(header.flags, 0);
        assert_eq!(records, [MediaErrorRecord::new(key, 1, PoisonSource::Injected)]);
        // A range that misses it lists nothing; one past DRAM is refused.
        assert!(list(&mut s, key + 64, 10).1.is_empty());
        let past =
            DpaRange { physical_address: 0.into(), length: (s.layout.dram_size / 64 + 1).into() };
        assert_eq!(
            s.execute(Opcode::GET_POISON_LIST, past.as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_PHYSICAL_ADDRESS)
        );
        let q = vec![1.0f32; 16];
        let query =
            TopkQuery { seq, layer: 0, head: 0, queries: &q, how: Default::default(), k: 4 };
        assert!(matches!(
            s.read_store().top_k(query),
            Err(pnm_firmware::kv::KvError::MediaError { first_token: 0, tokens: 16, .. })
        ));
        // Clear Poison with the bytes that were there heals it.
        let mut data = [0u8; 64];
        s.read_store().dram().read(key, &mut data).unwrap();
        let clear = ClearPoisonInput { physical_address: key.into(), write_data: data };
        s.execute(Opcode::CLEAR_POISON, clear.as_bytes(), now).unwrap();
        assert!(list(&mut s, 0, all).1.is_empty());
        assert!(s.read_store().top_k(query).is_ok());
        // Silent corruption: nothing listed, yet the read fails.
        let fault = |kind, pattern| InjectMediaFaultInput {
            range: DpaRange { physical_address: key.into(), length: 2.into() },
            kind,
            pattern,
            reserved: [0; 6],
        };
        assert_eq!(
            s.execute(Opcode::INJECT_MEDIA_FAULT, fault(fault_kind::CORRUPT, 0).as_bytes(), now)
                .map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        s.execute(Opcode::INJECT_MEDIA_FAULT, fault(fault_kind::CORRUPT, 0x80).as_bytes(), now)
            .unwrap();
        assert!(list(&mut s, 0, all).1.is_empty());
        assert!(s.read_store().top_k(query).is_err());
        // A poisoned range is listed as one record.
        s.execute(Opcode::INJECT_MEDIA_FAULT, fault(fault_kind::POISON, 0).as_bytes(), now)
            .unwrap();
        assert_eq!(list(&mut s, 0, all).1, [MediaErrorRecord::new(key, 2, PoisonSource::Injected)]);
        assert_eq!(
            s.execute(Opcode::INJECT_MEDIA_FAULT, fault(9, 0).as_bytes(), now).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
    }
}
