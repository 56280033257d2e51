//! Typed mailbox commands: each one checks what the device sent back.

use pnm_protocol::commands::{
    self as spec, CAPACITY_UNIT, CEL_UUID, GetLogInput, GetTimestampOutput, HealthInfoOutput,
    IdentifyOutput, IdentifyPnmOutput, SetTimestampInput, SupportedLogEntry, SupportedLogsHeader,
};
use pnm_protocol::events::{
    self, ClearRequest, EventInterruptPolicy, EventLog, EventRecord, GetEventRecordsHeader,
    InjectEventInput, InjectEventOutput, InterruptMode,
};
use pnm_protocol::{Opcode, RegionLayout, ReturnCode};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};
use crate::mailbox::MailboxClient;

pub use pnm_protocol::media::PoisonSource;
use pnm_protocol::media::{
    self, ClearPoisonInput, DpaRange, InjectMediaFaultInput, InjectPoisonInput, MediaErrorRecord,
    PoisonListHeader, ScanMediaCapabilities, ScanMediaInput, ScanMediaResultsHeader,
};

/// One poisoned range: `lines` 64-byte lines from DPA `dpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MediaError {
    pub dpa: u64,
    pub lines: u32,
    #[cfg_attr(feature = "serde", serde(serialize_with = "source_name"))]
    pub source: PoisonSource,
}

/// A poison source as its name, in JSON.
#[cfg(feature = "serde")]
pub(crate) fn source_name<S: serde::Serializer>(
    s: &PoisonSource,
    ser: S,
) -> std::result::Result<S::Ok, S::Error> {
    ser.serialize_str(s.name())
}

/// Get Poison List, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PoisonList {
    pub records: Vec<MediaError>,
    /// More records than one payload: ask again from after the last.
    pub more: bool,
    /// The device lost track of some errors (its list overflowed), at
    /// this device timestamp.
    pub overflow_timestamp: Option<u64>,
    pub scan_media_running: bool,
}

/// Scan Media's results, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ScanResults {
    pub records: Vec<MediaError>,
    pub overflow: bool,
}

/// What Inject Media Fault does to a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaFault {
    /// Reads fail; the bytes are kept.
    Poison,
    /// The bytes change (XOR with the pattern) and nothing else knows.
    Corrupt { pattern: u8 },
}

impl PoisonList {
    /// Checks and decodes Get Poison List's output (public for the fuzz
    /// targets).
    pub fn decode(out: &[u8]) -> Result<Self> {
        let op = Opcode::GET_POISON_LIST;
        let (header, rest) = PoisonListHeader::read_from_prefix(out)
            .map_err(|_| malformed(op, format!("{} bytes, shorter than the header", out.len())))?;
        let records = decode_records(op, rest, usize::from(header.count.get()))?;
        let overflow = header.flags & media::poison_flags::OVERFLOW != 0;
        Ok(PoisonList {
            records,
            more: header.flags & media::poison_flags::MORE_RECORDS != 0,
            overflow_timestamp: overflow.then(|| header.overflow_timestamp.get()),
            scan_media_running: header.flags & media::poison_flags::SCAN_MEDIA_IN_PROGRESS != 0,
        })
    }
}

impl ScanResults {
    /// Checks and decodes one Get Scan Media Results output: its records
    /// and whether the device has more (public for the fuzz targets).
    pub fn decode(out: &[u8]) -> Result<(Self, bool)> {
        let op = Opcode::GET_SCAN_MEDIA_RESULTS;
        let (header, rest) = ScanMediaResultsHeader::read_from_prefix(out)
            .map_err(|_| malformed(op, format!("{} bytes, shorter than the header", out.len())))?;
        let records = decode_records(op, rest, usize::from(header.count.get()))?;
        let overflow = header.flags & media::scan_flags::OVERFLOW != 0;
        Ok((Self { records, overflow }, header.flags & media::scan_flags::MORE_RECORDS != 0))
    }
}

/// Decodes media error records, each checked (source, alignment, length).
fn decode_records(op: Opcode, raw: &[u8], count: usize) -> Result<Vec<MediaError>> {
    let records = <[MediaErrorRecord]>::ref_from_bytes(raw)
        .map_err(|_| malformed(op, format!("{} record bytes are not whole records", raw.len())))?;
    if records.len() != count {
        return Err(malformed(op, format!("count {count} but {} records", records.len())));
    }
    records
        .iter()
        .map(|r| {
            let source = r.source().ok_or_else(|| {
                malformed(op, format!("record source {} is reserved", r.address.get() & 7))
            })?;
            if r.address.get() & 0x38 != 0 || r.length.get() == 0 {
                return Err(malformed(
                    op,
                    format!("record {:#x}+{} lines", r.address.get(), r.length.get()),
                ));
            }
            Ok(MediaError { dpa: r.dpa(), lines: r.length.get(), source })
        })
        .collect()
}

/// Identify Memory Device, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Identify {
    pub fw_revision: String,
    pub total_capacity_bytes: u64,
    pub volatile_only_capacity_bytes: u64,
    pub persistent_only_capacity_bytes: u64,
    pub partition_alignment_bytes: u64,
    pub info_event_log_size: u16,
    pub warning_event_log_size: u16,
    pub failure_event_log_size: u16,
    pub fatal_event_log_size: u16,
    pub lsa_size: u32,
    pub poison_list_max_records: u32,
    pub inject_poison_limit: u16,
    pub poison_handling_caps: u8,
    pub qos_telemetry_caps: u8,
    pub dc_event_log_size: u16,
}

/// Get Health Info, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HealthInfo {
    pub maintenance_needed: bool,
    pub performance_degraded: bool,
    pub hardware_replacement_needed: bool,
    pub media_status: u8,
    pub additional_status: u8,
    /// Percent of life used; None if the device does not track it.
    pub life_used_percent: Option<u8>,
    /// Degrees Celsius; None if the device has no sensor.
    pub temperature_celsius: Option<i16>,
    pub dirty_shutdown_count: u32,
    pub corrected_volatile_error_count: u32,
    pub corrected_persistent_error_count: u32,
}

impl HealthInfo {
    fn from_wire(h: &HealthInfoOutput) -> Self {
        let temperature = h.device_temperature.get();
        Self {
            maintenance_needed: h.health_status & 1 != 0,
            performance_degraded: h.health_status & 2 != 0,
            hardware_replacement_needed: h.health_status & 4 != 0,
            media_status: h.media_status,
            additional_status: h.additional_status,
            life_used_percent: (h.life_used != spec::LIFE_USED_NOT_IMPLEMENTED)
                .then_some(h.life_used),
            temperature_celsius: (temperature != spec::TEMPERATURE_NOT_IMPLEMENTED)
                .then_some(temperature as i16),
            dirty_shutdown_count: h.dirty_shutdown_count.get(),
            corrected_volatile_error_count: h.corrected_volatile_error_count.get(),
            corrected_persistent_error_count: h.corrected_persistent_error_count.get(),
        }
    }
}

/// Get Event Records, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EventRecords {
    #[cfg_attr(feature = "serde", serde(serialize_with = "log_name"))]
    pub log: EventLog,
    pub records: Vec<Event>,
    /// The log holds more than these: clear them and ask again.
    pub more: bool,
    /// Records lost while the log was full.
    pub overflow: Option<EventOverflow>,
}

#[cfg(feature = "serde")]
fn log_name<S: serde::Serializer>(log: &EventLog, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(log.name())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct EventOverflow {
    pub count: u16,
    pub first_timestamp: u64,
    pub last_timestamp: u64,
}

/// One event record: the header's facts and what its UUID says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Event {
    pub handle: u16,
    pub related_handle: u16,
    pub timestamp: u64,
    /// Event Record Flags (24 bit): [1:0] severity, [2] permanent, [3]
    /// maintenance needed, [4] performance degraded, [5] replace hardware.
    pub flags: u32,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "type", rename_all = "snake_case"))]
pub enum EventKind {
    GeneralMedia {
        dpa: u64,
        volatile: bool,
        descriptor: u8,
        memory_event_type: u8,
        transaction_type: u8,
        validity_flags: u16,
    },
    Dram {
        dpa: u64,
        descriptor: u8,
        memory_event_type: u8,
        transaction_type: u8,
        validity_flags: u16,
        bank_group: u8,
        bank: u8,
        row: u32,
        column: u16,
    },
    MemoryModule {
        device_event_type: u8,
        health: HealthInfo,
    },
    /// A record this driver does not decode, by its UUID.
    Other {
        uuid: String,
    },
}

impl EventRecords {
    /// Checks and decodes Get Event Records' output for `log` (the
    /// device's bytes: every field checked; public for the fuzz targets).
    pub fn decode(log: EventLog, out: &[u8]) -> std::result::Result<Self, String> {
        let (header, body) = GetEventRecordsHeader::read_from_prefix(out)
            .map_err(|_| format!("{} bytes is shorter than the 32-byte header", out.len()))?;
        let count = usize::from(header.record_count.get());
        if body.len() != count * events::RECORD_LEN {
            return Err(format!(
                "{count} records need {} bytes after the header, got {}",
                count * events::RECORD_LEN,
                body.len()
            ));
        }
        let mut records = Vec::with_capacity(count);
        for raw in body.chunks_exact(events::RECORD_LEN) {
            let record = EventRecord::read_from_bytes(raw).expect("128-byte chunk");
            let h = &record.header;
            if usize::from(h.length) != events::RECORD_LEN {
                return Err(format!("a record says it is {} bytes, not 128", h.length));
            }
            if h.handle.get() == 0 {
                return Err("a record has handle 0, which names no record".into());
            }
            if h.flags() & events::flags::SEVERITY_MASK != log as u32 {
                return Err(format!(
                    "record {} in the {} log has severity {}",
                    h.handle.get(),
                    log.name(),
                    h.flags() & events::flags::SEVERITY_MASK
                ));
            }
            records.push(Event {
                handle: h.handle.get(),
                related_handle: h.related_handle.get(),
                timestamp: h.timestamp.get(),
                flags: h.flags(),
                kind: EventKind::decode(&record),
            });
        }
        let overflow = (header.flags & events::GET_FLAG_OVERFLOW != 0).then(|| EventOverflow {
            count: header.overflow_error_count.get(),
            first_timestamp: header.first_overflow_timestamp.get(),
            last_timestamp: header.last_overflow_timestamp.get(),
        });
        Ok(Self { log, records, more: header.flags & events::GET_FLAG_MORE_RECORDS != 0, overflow })
    }
}

impl EventKind {
    fn decode(record: &EventRecord) -> Self {
        let u24 = |b: [u8; 3]| u32::from_le_bytes([b[0], b[1], b[2], 0]);
        match record.header.uuid {
            events::uuid::GENERAL_MEDIA => {
                let g = events::GeneralMedia::read_from_bytes(&record.data).expect("80 bytes");
                let address = g.physical_address.get();
                Self::GeneralMedia {
                    dpa: address & !0x3F,
                    volatile: address & 1 != 0,
                    descriptor: g.descriptor,
                    memory_event_type: g.memory_event_type,
                    transaction_type: g.transaction_type,
                    validity_flags: g.validity_flags.get(),
                }
            }
            events::uuid::DRAM => {
                let d = events::Dram::read_from_bytes(&record.data).expect("80 bytes");
                Self::Dram {
                    dpa: d.physical_address.get() & !0x3F,
                    descriptor: d.descriptor,
                    memory_event_type: d.memory_event_type,
                    transaction_type: d.transaction_type,
                    validity_flags: d.validity_flags.get(),
                    bank_group: d.bank_group,
                    bank: d.bank,
                    row: u24(d.row),
                    column: d.column.get(),
                }
            }
            events::uuid::MEMORY_MODULE => {
                let m = events::MemoryModule::read_from_bytes(&record.data).expect("80 bytes");
                Self::MemoryModule {
                    device_event_type: m.device_event_type,
                    health: HealthInfo::from_wire(&m.health),
                }
            }
            other => Self::Other { uuid: format_uuid(&other) },
        }
    }
}

/// One entry of Get Supported Logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SupportedLog {
    pub uuid: String,
    #[cfg_attr(feature = "serde", serde(skip))]
    pub id: [u8; 16],
    pub is_command_effects_log: bool,
    pub size: u32,
}

/// One Command Effects Log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CelEntry {
    pub opcode: u16,
    pub name: Option<&'static str>,
    pub effects: u16,
}

/// Identify PNM, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PnmInfo {
    pub abi_version: String,
    pub fw_revision: String,
    pub compute_units: u32,
    pub region_size: u64,
    pub dma_window_offset: u64,
    pub dma_window_size: u64,
    pub dram_offset: u64,
    pub dram_size: u64,
    pub dtypes: Vec<&'static str>,
    pub max_head_dim: u32,
    pub max_k: u32,
    pub max_group: u32,
    pub kv_frame_size: u32,
    pub kv_frames_offset: u64,
    pub kv_frame_count: u32,
    pub max_sequences: u32,
    pub max_queue_pairs: u32,
    pub max_queue_entries: u32,
    pub heartbeat_period_us: u32,
}

/// Formats a UUID given in the spec's (RFC 4122) byte order.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

fn malformed(opcode: Opcode, reason: impl Into<String>) -> Error {
    Error::MalformedOutput { opcode, reason: reason.into() }
}

/// Decodes a fixed-size output, refusing any other length.
fn decode_fixed<T: FromBytes>(opcode: Opcode, out: &[u8]) -> Result<T> {
    T::read_from_bytes(out)
        .map_err(|_| malformed(opcode, format!("{} bytes, expected {}", out.len(), size_of::<T>())))
}

/// The typed mailbox commands: each runs one (or, for a log, several)
/// commands and validates every byte of the answer. [`Device`](crate::Device)
/// offers each as a method.
impl MailboxClient {
    pub fn identify(&mut self) -> Result<Identify> {
        let op = Opcode::IDENTIFY_MEMORY_DEVICE;
        let id: IdentifyOutput = decode_fixed(op, &self.execute(op, &[])?)?;
        let units = |v: u64| {
            v.checked_mul(CAPACITY_UNIT)
                .ok_or_else(|| malformed(op, format!("capacity {v} overflows")))
        };
        let p = id.poison_list_max_records;
        Ok(Identify {
            fw_revision: spec::ascii_field(&id.fw_revision),
            total_capacity_bytes: units(id.total_capacity.get())?,
            volatile_only_capacity_bytes: units(id.volatile_only_capacity.get())?,
            persistent_only_capacity_bytes: units(id.persistent_only_capacity.get())?,
            partition_alignment_bytes: units(id.partition_alignment.get())?,
            info_event_log_size: id.info_event_log_size.get(),
            warning_event_log_size: id.warning_event_log_size.get(),
            failure_event_log_size: id.failure_event_log_size.get(),
            fatal_event_log_size: id.fatal_event_log_size.get(),
            lsa_size: id.lsa_size.get(),
            poison_list_max_records: u32::from_le_bytes([p[0], p[1], p[2], 0]),
            inject_poison_limit: id.inject_poison_limit.get(),
            poison_handling_caps: id.poison_handling_caps,
            qos_telemetry_caps: id.qos_telemetry_caps,
            dc_event_log_size: id.dc_event_log_size.get(),
        })
    }

    pub fn health_info(&mut self) -> Result<HealthInfo> {
        let op = Opcode::GET_HEALTH_INFO;
        let h: HealthInfoOutput = decode_fixed(op, &self.execute(op, &[])?)?;
        Ok(HealthInfo::from_wire(&h))
    }

    /// Get Event Records (0100h): the oldest records of `log` that fit one
    /// mailbox payload.
    pub fn get_event_records(&mut self, log: EventLog) -> Result<EventRecords> {
        let op = Opcode::GET_EVENT_RECORDS;
        let out = self.execute(op, &[log as u8])?;
        EventRecords::decode(log, &out).map_err(|reason| malformed(op, reason))
    }

    /// Clear Event Records (0101h) by handle (those a Get returned).
    pub fn clear_event_records(&mut self, log: EventLog, handles: &[u16]) -> Result<()> {
        if handles.len() > events::MAX_CLEAR_HANDLES {
            return Err(Error::Invalid(format!(
                "{} handles; one Clear Event Records takes at most {}",
                handles.len(),
                events::MAX_CLEAR_HANDLES
            )));
        }
        self.clear_events(&ClearRequest::Handles(log, handles.to_vec()))
    }

    /// Clear Event Records (0101h) with Clear All Events.
    pub fn clear_all_event_records(&mut self, log: EventLog) -> Result<()> {
        self.clear_events(&ClearRequest::All(log))
    }

    /// Get Event Interrupt Policy (0102h): each log's setting, informational first.
    pub fn get_event_interrupt_policy(&mut self) -> Result<[InterruptMode; 4]> {
        let op = Opcode::GET_EVENT_INTERRUPT_POLICY;
        let p: EventInterruptPolicy = decode_fixed(op, &self.execute(op, &[])?)?;
        let mut modes = [InterruptMode::None; 4];
        for (mode, &byte) in modes.iter_mut().zip(&p.settings) {
            *mode = InterruptMode::decode(byte)
                .ok_or_else(|| malformed(op, format!("setting {byte:#04x} is reserved")))?;
        }
        Ok(modes)
    }

    /// Set Event Interrupt Policy (0103h). With `InterruptMode::Msi(v)`, a
    /// log that gets a record while empty rings vector `v` of every host.
    pub fn set_event_interrupt_policy(&mut self, modes: [InterruptMode; 4]) -> Result<()> {
        let op = Opcode::SET_EVENT_INTERRUPT_POLICY;
        let input = EventInterruptPolicy { settings: modes.map(InterruptMode::encode) };
        let out = self.execute(op, input.as_bytes())?;
        if !out.is_empty() {
            return Err(malformed(op, format!("{} output bytes, expected none", out.len())));
        }
        Ok(())
    }

    /// Inject Event Record (C005h, vendor; a device started with
    /// `--allow-injection`): adds `record` to `log`. The device sets its
    /// length, severity, handle and timestamp. Returns the handle, or None
    /// if the log was full and the record went to overflow.
    pub fn inject_event(&mut self, log: EventLog, record: &EventRecord) -> Result<Option<u16>> {
        let op = Opcode::INJECT_EVENT;
        let input = InjectEventInput { event_log: log as u8, reserved: [0; 7], record: *record };
        let out: InjectEventOutput = decode_fixed(op, &self.execute(op, input.as_bytes())?)?;
        Ok(match out.handle.get() {
            0 => None,
            h => Some(h),
        })
    }

    /// Get Poison List (4300h) over `lines` 64-byte lines from `dpa`.
    pub fn get_poison_list(&mut self, dpa: u64, lines: u64) -> Result<PoisonList> {
        let op = Opcode::GET_POISON_LIST;
        let input = DpaRange { physical_address: dpa.into(), length: lines.into() };
        PoisonList::decode(&self.execute(op, input.as_bytes())?)
    }

    /// Inject Poison (4301h; a device started with --allow-injection).
    pub fn inject_poison(&mut self, dpa: u64) -> Result<()> {
        let op = Opcode::INJECT_POISON;
        let input = InjectPoisonInput { physical_address: dpa.into() };
        self.expect_empty(op, input.as_bytes())
    }

    /// Clear Poison (4302h): writes `data` over the line at `dpa` and takes
    /// it off the poison list.
    pub fn clear_poison(&mut self, dpa: u64, data: &[u8; 64]) -> Result<()> {
        let op = Opcode::CLEAR_POISON;
        let input = ClearPoisonInput { physical_address: dpa.into(), write_data: *data };
        self.expect_empty(op, input.as_bytes())
    }

    /// Inject Media Fault (C006h, vendor; --allow-injection): poisons or
    /// silently corrupts `lines` lines from `dpa`.
    pub fn inject_media_fault(&mut self, dpa: u64, lines: u64, fault: MediaFault) -> Result<()> {
        let op = Opcode::INJECT_MEDIA_FAULT;
        let (kind, pattern) = match fault {
            MediaFault::Poison => (media::fault_kind::POISON, 0),
            MediaFault::Corrupt { pattern } => (media::fault_kind::CORRUPT, pattern),
        };
        let input = InjectMediaFaultInput {
            range: DpaRange { physical_address: dpa.into(), length: lines.into() },
            kind,
            pattern,
            reserved: [0; 6],
        };
        self.expect_empty(op, input.as_bytes())
    }

    /// Inject Device Fault (C007h, vendor; --allow-injection): `count`
    /// doorbells or completions, `micros` of delay or hang (0: for good),
    /// `target` compute unit or slow-memory percentage, as the fault takes.
    pub fn inject_device_fault(
        &mut self,
        fault: pnm_protocol::faults::DeviceFault,
        count: u32,
        micros: u32,
        target: u32,
    ) -> Result<()> {
        let input = pnm_protocol::faults::InjectDeviceFaultInput {
            kind: fault.code(),
            reserved: [0; 3],
            count: count.into(),
            micros: micros.into(),
            target: target.into(),
        };
        self.expect_empty(Opcode::INJECT_DEVICE_FAULT, input.as_bytes())
    }

    /// Get Scan Media Capabilities (4303h): the estimated scan time in ms.
    pub fn scan_media_estimate(&mut self, dpa: u64, lines: u64) -> Result<u32> {
        let op = Opcode::GET_SCAN_MEDIA_CAPABILITIES;
        let input = DpaRange { physical_address: dpa.into(), length: lines.into() };
        let out: ScanMediaCapabilities = decode_fixed(op, &self.execute(op, input.as_bytes())?)?;
        Ok(out.estimated_runtime_ms.get())
    }

    /// Scan Media (4304h): starts the scan in the background.
    pub fn start_scan_media(&mut self, dpa: u64, lines: u64, log_events: bool) -> Result<()> {
        let input = ScanMediaInput {
            range: DpaRange { physical_address: dpa.into(), length: lines.into() },
            flags: if log_events { 0 } else { media::SCAN_NO_EVENT_LOG },
        };
        self.start_background(Opcode::SCAN_MEDIA, input.as_bytes())
    }

    /// Get Scan Media Results (4305h): every record of the last scan (the
    /// device hands each out once), asking again while it says there are more.
    pub fn get_scan_media_results(&mut self) -> Result<ScanResults> {
        let op = Opcode::GET_SCAN_MEDIA_RESULTS;
        let mut results = ScanResults { records: Vec::new(), overflow: false };
        loop {
            let (part, more) = ScanResults::decode(&self.execute(op, &[])?)?;
            results.overflow |= part.overflow;
            let done = !more || part.records.is_empty();
            results.records.extend(part.records);
            if done {
                return Ok(results);
            }
        }
    }

    fn expect_empty(&mut self, op: Opcode, input: &[u8]) -> Result<()> {
        let out = self.execute(op, input)?;
        if !out.is_empty() {
            return Err(malformed(op, format!("{} output bytes, expected none", out.len())));
        }
        Ok(())
    }

    fn clear_events(&mut self, request: &ClearRequest) -> Result<()> {
        let op = Opcode::CLEAR_EVENT_RECORDS;
        let out = self.execute(op, &request.encode())?;
        if !out.is_empty() {
            return Err(malformed(op, format!("{} output bytes, expected none", out.len())));
        }
        Ok(())
    }

    /// The device's timestamp in ns since the Unix epoch (0: never set).
    pub fn get_timestamp(&mut self) -> Result<u64> {
        let op = Opcode::GET_TIMESTAMP;
        let t: GetTimestampOutput = decode_fixed(op, &self.execute(op, &[])?)?;
        Ok(t.timestamp_ns.get())
    }

    pub fn set_timestamp(&mut self, timestamp_ns: u64) -> Result<()> {
        let op = Opcode::SET_TIMESTAMP;
        let input = SetTimestampInput { timestamp_ns: timestamp_ns.into() };
        let out = self.execute(op, input.as_bytes())?;
        if !out.is_empty() {
            return Err(malformed(op, format!("{} output bytes, expected none", out.len())));
        }
        Ok(())
    }

    pub fn supported_logs(&mut self) -> Result<Vec<SupportedLog>> {
        let op = Opcode::GET_SUPPORTED_LOGS;
        let out = self.execute(op, &[])?;
        let (header, rest) = SupportedLogsHeader::read_from_prefix(&out)
            .map_err(|_| malformed(op, "shorter than its header"))?;
        let entries = <[SupportedLogEntry]>::ref_from_bytes(rest)
            .map_err(|_| malformed(op, "entries are not whole"))?;
        if entries.len() != usize::from(header.entries.get()) {
            return Err(malformed(
                op,
                format!(
                    "header counts {} entries, payload holds {}",
                    header.entries.get(),
                    entries.len()
                ),
            ));
        }
        Ok(entries
            .iter()
            .map(|e| SupportedLog {
                uuid: format_uuid(&e.log_id),
                id: e.log_id,
                is_command_effects_log: e.log_id == CEL_UUID,
                size: e.log_size.get(),
            })
            .collect())
    }

    /// Reads a whole log, in payload-sized pieces.
    pub fn get_log(&mut self, id: [u8; 16], size: u32) -> Result<Vec<u8>> {
        let op = Opcode::GET_LOG;
        let chunk = self.payload_size().min(u64::from(u32::MAX)) as u32;
        let mut log = Vec::with_capacity(size as usize);
        while (log.len() as u32) < size {
            let length = chunk.min(size - log.len() as u32);
            let input = GetLogInput {
                log_id: id,
                offset: (log.len() as u32).into(),
                length: length.into(),
            };
            let out = self.execute(op, input.as_bytes())?;
            if out.len() != length as usize {
                return Err(malformed(op, format!("asked {length} bytes, got {}", out.len())));
            }
            log.extend_from_slice(&out);
        }
        Ok(log)
    }

    /// The Command Effects Log: every command the device supports.
    pub fn command_effects_log(&mut self) -> Result<Vec<CelEntry>> {
        let cel = self
            .supported_logs()?
            .into_iter()
            .find(|l| l.is_command_effects_log)
            .ok_or(Error::Command { opcode: Opcode::GET_LOG, code: ReturnCode::INVALID_LOG })?;
        if cel.size % 4 != 0 {
            return Err(malformed(
                Opcode::GET_SUPPORTED_LOGS,
                format!("CEL size {} is not whole entries", cel.size),
            ));
        }
        let raw = self.get_log(cel.id, cel.size)?;
        Ok(raw
            .chunks_exact(4)
            .map(|e| {
                let opcode = u16::from_le_bytes([e[0], e[1]]);
                CelEntry {
                    opcode,
                    name: Opcode(opcode).name(),
                    effects: u16::from_le_bytes([e[2], e[3]]),
                }
            })
            .collect())
    }

    /// Identify PNM, checked against the layout the PNM capability
    /// registers publish.
    pub fn identify_pnm(&mut self, layout: RegionLayout) -> Result<PnmInfo> {
        let op = Opcode::IDENTIFY_PNM;
        let p: IdentifyPnmOutput = decode_fixed(op, &self.execute(op, &[])?)?;
        let answered = (p.region_size.get(), p.dram_offset.get(), p.dram_size.get());
        if answered != (layout.size, layout.dram_offset, layout.dram_size) {
            return Err(malformed(
                op,
                format!("layout {answered:?} disagrees with the PNM capability registers"),
            ));
        }
        let mask = p.supported_dtypes.get();
        let dtypes = pnm_protocol::Dtype::ALL
            .into_iter()
            .filter(|d| mask & d.bit() != 0)
            .map(|d| d.name())
            .collect();
        let frames_end = u64::from(p.kv_frame_count.get())
            .checked_mul(u64::from(p.kv_frame_size.get()))
            .and_then(|len| len.checked_add(p.kv_frames_offset.get()));
        if frames_end.is_none_or(|end| end > layout.dram_size) {
            return Err(malformed(op, "KV frames extend past device DRAM"));
        }
        let abi = p.abi_version.get();
        Ok(PnmInfo {
            abi_version: format!("{}.{}", abi >> 16, abi & 0xFFFF),
            fw_revision: spec::ascii_field(&p.fw_revision),
            compute_units: p.compute_units.get(),
            region_size: p.region_size.get(),
            dma_window_offset: p.dma_window_offset.get(),
            dma_window_size: p.dma_window_size.get(),
            dram_offset: p.dram_offset.get(),
            dram_size: p.dram_size.get(),
            dtypes,
            max_head_dim: p.max_head_dim.get(),
            max_k: p.max_k.get(),
            max_group: p.max_group.get(),
            kv_frame_size: p.kv_frame_size.get(),
            kv_frames_offset: p.kv_frames_offset.get(),
            kv_frame_count: p.kv_frame_count.get(),
            max_sequences: p.max_sequences.get(),
            max_queue_pairs: p.max_queue_pairs.get(),
            max_queue_entries: p.max_queue_entries.get(),
            heartbeat_period_us: p.heartbeat_period_us.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cel_uuid_formats_as_the_spec_writes_it() {
        assert_eq!(format_uuid(&CEL_UUID), "0da9c0b5-bf41-4b78-8f79-96b1623b3f17");
    }
}
