//! Event records and the event log commands (CXL 3.1 §8.2.9.2): the
//! common record header, the General Media, DRAM and Memory Module
//! records, Get Event Records' output, Clear Event Records' input and the
//! Event Interrupt Policy.
//!
//! Every record is 128 bytes: a 48-byte header, then 80 bytes of data
//! whose meaning the header's UUID names.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::commands::HealthInfoOutput;

/// Bytes in every event record.
pub const RECORD_LEN: usize = 128;
/// Bytes of Get Event Records' output before its records.
pub const GET_OUTPUT_HEADER_LEN: usize = 0x20;

/// The event logs a device keeps (Get Event Records' Event Log byte). The
/// fifth, Dynamic Capacity, belongs to DCD devices, which this is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventLog {
    Informational = 0,
    Warning = 1,
    Failure = 2,
    Fatal = 3,
}

impl EventLog {
    pub const ALL: [Self; 4] = [Self::Informational, Self::Warning, Self::Failure, Self::Fatal];

    /// The log a wire byte names (None: Dynamic Capacity, or reserved).
    pub fn from_wire(byte: u8) -> Option<Self> {
        Self::ALL.get(usize::from(byte)).copied()
    }

    /// Its bit in the Event Status register and its index everywhere else.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Informational => "informational",
            Self::Warning => "warning",
            Self::Failure => "failure",
            Self::Fatal => "fatal",
        }
    }
}

/// The record kinds this device logs, by their UUIDs (as the bytes appear
/// in the record: the UUID's string form, byte for byte).
pub mod uuid {
    /// General Media Event Record: fbcd0a77-c260-417f-85a9-088b1621eba6.
    pub const GENERAL_MEDIA: [u8; 16] = [
        0xfb, 0xcd, 0x0a, 0x77, 0xc2, 0x60, 0x41, 0x7f, 0x85, 0xa9, 0x08, 0x8b, 0x16, 0x21, 0xeb,
        0xa6,
    ];
    /// DRAM Event Record: 601dcbb3-9c06-4eab-b8af-4e9bfb5c9624.
    pub const DRAM: [u8; 16] = [
        0x60, 0x1d, 0xcb, 0xb3, 0x9c, 0x06, 0x4e, 0xab, 0xb8, 0xaf, 0x4e, 0x9b, 0xfb, 0x5c, 0x96,
        0x24,
    ];
    /// Memory Module Event Record: fe927475-dd59-4339-a586-79bab113b774.
    pub const MEMORY_MODULE: [u8; 16] = [
        0xfe, 0x92, 0x74, 0x75, 0xdd, 0x59, 0x43, 0x39, 0xa5, 0x86, 0x79, 0xba, 0xb1, 0x13, 0xb7,
        0x74,
    ];
}

/// Event Record Flags (24 bit, in the header's `flags`).
pub mod flags {
    /// [1:0] severity: the log the record belongs to.
    pub const SEVERITY_MASK: u32 = 0b11;
    pub const PERMANENT: u32 = 1 << 2;
    pub const MAINTENANCE_NEEDED: u32 = 1 << 3;
    pub const PERFORMANCE_DEGRADED: u32 = 1 << 4;
    pub const HARDWARE_REPLACEMENT_NEEDED: u32 = 1 << 5;
}

/// The common event record header (§8.2.9.2.1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RecordHeader {
    pub uuid: [u8; 16],
    /// Always [`RECORD_LEN`].
    pub length: u8,
    /// Event Record Flags, 24 bit little-endian (see [`flags`]).
    pub flags: [u8; 3],
    /// Nonzero; names the record to Clear Event Records.
    pub handle: U16,
    pub related_handle: U16,
    /// The device's Timestamp when the event happened (ns since the epoch).
    pub timestamp: U64,
    pub maintenance_op_class: u8,
    pub maintenance_op_subclass: u8,
    pub ld_id: U16,
    pub head_id: u8,
    pub reserved: [u8; 11],
}

impl RecordHeader {
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes([self.flags[0], self.flags[1], self.flags[2], 0])
    }

    pub fn set_flags(&mut self, value: u32) {
        let b = value.to_le_bytes();
        self.flags = [b[0], b[1], b[2]];
    }
}

/// One event record as it travels: header and data.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct EventRecord {
    pub header: RecordHeader,
    pub data: [u8; RECORD_LEN - size_of::<RecordHeader>()],
}

/// Memory Event Descriptor bits (General Media and DRAM records).
pub mod descriptor {
    pub const UNCORRECTABLE: u8 = 1 << 0;
    pub const THRESHOLD: u8 = 1 << 1;
    pub const POISON_LIST_OVERFLOW: u8 = 1 << 2;
}

/// Memory Event Type (General Media and DRAM records).
pub mod memory_event {
    pub const MEDIA_ECC_ERROR: u8 = 0x00;
    pub const INVALID_ADDRESS: u8 = 0x01;
    pub const DATA_PATH_ERROR: u8 = 0x02;
}

/// Transaction Type (General Media and DRAM records): what the device was
/// doing when it found the error.
pub mod transaction {
    pub const UNKNOWN: u8 = 0x00;
    pub const HOST_READ: u8 = 0x01;
    pub const HOST_WRITE: u8 = 0x02;
    pub const HOST_SCAN_MEDIA: u8 = 0x03;
    pub const HOST_INJECT_POISON: u8 = 0x04;
    pub const INTERNAL_MEDIA_SCRUB: u8 = 0x05;
    pub const INTERNAL_MEDIA_MANAGEMENT: u8 = 0x06;
}

/// General Media Event Record data (§8.2.9.2.1.1), from record offset 30h.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct GeneralMedia {
    /// [63:6] the DPA, 64-byte aligned; [0] volatile.
    pub physical_address: U64,
    pub descriptor: u8,
    pub memory_event_type: u8,
    pub transaction_type: u8,
    /// [0] Channel, [1] Rank, [2] Device, [3] Component Identifier valid.
    pub validity_flags: U16,
    pub channel: u8,
    pub rank: u8,
    pub device: [u8; 3],
    pub component_id: [u8; 16],
    pub reserved: [u8; 0x2E],
}

/// DRAM Event Record data (§8.2.9.2.1.2), from record offset 30h.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Dram {
    pub physical_address: U64,
    pub descriptor: u8,
    pub memory_event_type: u8,
    pub transaction_type: u8,
    /// [0] Channel, [1] Rank, [2] Nibble Mask, [3] Bank Group, [4] Bank,
    /// [5] Row, [6] Column, [7] Correction Mask valid.
    pub validity_flags: U16,
    pub channel: u8,
    pub rank: u8,
    pub nibble_mask: [u8; 3],
    pub bank_group: u8,
    pub bank: u8,
    pub row: [u8; 3],
    pub column: U16,
    pub correction_mask: [u8; 0x20],
    pub reserved: [u8; 0x17],
}

/// Device Event Type (Memory Module records).
pub mod device_event {
    pub const HEALTH_STATUS_CHANGE: u8 = 0x00;
    pub const MEDIA_STATUS_CHANGE: u8 = 0x01;
    pub const LIFE_USED_CHANGE: u8 = 0x02;
    pub const TEMPERATURE_CHANGE: u8 = 0x03;
    pub const DATA_PATH_ERROR: u8 = 0x04;
    pub const LSA_ERROR: u8 = 0x05;
}

/// Memory Module Event Record data (§8.2.9.2.1.3), from record offset 30h:
/// the event and the device's health at that moment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MemoryModule {
    pub device_event_type: u8,
    pub health: HealthInfoOutput,
    pub reserved: [u8; 0x3D],
}

/// Get Event Records (0100h) output, before its records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct GetEventRecordsHeader {
    /// [0] Overflow, [1] More Event Records.
    pub flags: u8,
    pub reserved0: u8,
    /// Records lost since the log overflowed (saturating).
    pub overflow_error_count: U16,
    pub first_overflow_timestamp: U64,
    pub last_overflow_timestamp: U64,
    pub record_count: U16,
    pub reserved1: [u8; 10],
}

/// Get Event Records' flag bits.
pub const GET_FLAG_OVERFLOW: u8 = 1 << 0;
pub const GET_FLAG_MORE_RECORDS: u8 = 1 << 1;

/// Clear Event Records (0101h) input, before its handles (2 bytes each).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ClearEventRecordsHeader {
    pub event_log: u8,
    /// [0] Clear All Events (then Number of Handles must be 0).
    pub flags: u8,
    pub handle_count: u8,
    pub reserved: [u8; 3],
}

/// Clear Event Records' Clear All Events flag.
pub const CLEAR_ALL: u8 = 1 << 0;

/// A decoded Clear Event Records input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClearRequest {
    All(EventLog),
    Handles(EventLog, Vec<u16>),
}

/// Why a Clear Event Records input was refused (Invalid Input on the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClearInputError {
    #[error("{0} bytes is shorter than Clear Event Records' 6-byte header")]
    Short(usize),
    #[error("event log {0} is not one this device keeps (0-3)")]
    UnknownLog(u8),
    #[error("{count} handles need {need} bytes of input, not {got}")]
    HandleBytes { count: u8, need: usize, got: usize },
    #[error("Clear All Events with {0} handles (must be 0)")]
    ClearAllWithHandles(u8),
    #[error("clear flags {0:#04x} set reserved bits")]
    ReservedFlags(u8),
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
}

impl ClearRequest {
    /// Decodes Clear Event Records' input.
    pub fn decode(input: &[u8]) -> Result<Self, ClearInputError> {
        let (header, handles) = ClearEventRecordsHeader::read_from_prefix(input)
            .map_err(|_| ClearInputError::Short(input.len()))?;
        let log = EventLog::from_wire(header.event_log)
            .ok_or(ClearInputError::UnknownLog(header.event_log))?;
        if header.flags & !CLEAR_ALL != 0 {
            return Err(ClearInputError::ReservedFlags(header.flags));
        }
        if header.reserved != [0; 3] {
            return Err(ClearInputError::ReservedNotZero);
        }
        let need = 2 * usize::from(header.handle_count);
        if handles.len() != need {
            return Err(ClearInputError::HandleBytes {
                count: header.handle_count,
                need: size_of::<ClearEventRecordsHeader>() + need,
                got: input.len(),
            });
        }
        if header.flags & CLEAR_ALL != 0 {
            return match header.handle_count {
                0 => Ok(Self::All(log)),
                n => Err(ClearInputError::ClearAllWithHandles(n)),
            };
        }
        let handles = handles.chunks_exact(2).map(|h| u16::from_le_bytes([h[0], h[1]])).collect();
        Ok(Self::Handles(log, handles))
    }

    /// Encodes it (at most 255 handles: more is a caller's bug).
    pub fn encode(&self) -> Vec<u8> {
        let (log, flags, handles): (EventLog, u8, &[u16]) = match self {
            Self::All(log) => (*log, CLEAR_ALL, &[]),
            Self::Handles(log, handles) => (*log, 0, handles),
        };
        let header = ClearEventRecordsHeader {
            event_log: log as u8,
            flags,
            handle_count: u8::try_from(handles.len()).expect("at most 255 handles per clear"),
            reserved: [0; 3],
        };
        let mut out = header.as_bytes().to_vec();
        out.extend(handles.iter().flat_map(|h| h.to_le_bytes()));
        out
    }
}

/// Most handles one Clear Event Records can carry.
pub const MAX_CLEAR_HANDLES: usize = u8::MAX as usize;

/// How a log signals new records (Event Interrupt Policy, one byte per log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterruptMode {
    #[default]
    None,
    /// MSI/MSI-X on the message number in [7:4].
    Msi(u8),
    /// Firmware interrupt (EFN VDM) on the message number in [7:4].
    Firmware(u8),
}

impl InterruptMode {
    /// Decodes one policy byte; None if it sets reserved bits or mode 3.
    pub fn decode(byte: u8) -> Option<Self> {
        if byte & 0b1100 != 0 {
            return None;
        }
        let vector = byte >> 4;
        match byte & 0b11 {
            0 if vector == 0 => Some(Self::None),
            1 => Some(Self::Msi(vector)),
            2 => Some(Self::Firmware(vector)),
            _ => None,
        }
    }

    pub fn encode(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Msi(v) => 1 | (v << 4),
            Self::Firmware(v) => 2 | (v << 4),
        }
    }
}

/// Get/Set Event Interrupt Policy (0102h/0103h): one byte per log,
/// informational first. Set takes these 4 bytes, or 5 with a Dynamic
/// Capacity byte that must be 0 here.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct EventInterruptPolicy {
    pub settings: [u8; 4],
}

/// Inject Event Record (C005h, vendor) input: the log and the record. The
/// device sets the record's length, severity, handle and timestamp.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InjectEventInput {
    pub event_log: u8,
    pub reserved: [u8; 7],
    pub record: EventRecord,
}

/// Inject Event Record output: the record's handle (0: the log was full,
/// the record was counted as overflow).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InjectEventOutput {
    pub handle: U16,
    pub reserved: [u8; 6],
}

const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<InjectEventInput>() == 8 + RECORD_LEN);
    assert!(size_of::<InjectEventOutput>() == 8);
    assert!(size_of::<RecordHeader>() == 0x30);
    assert!(offset_of!(RecordHeader, length) == 0x10);
    assert!(offset_of!(RecordHeader, flags) == 0x11);
    assert!(offset_of!(RecordHeader, handle) == 0x14);
    assert!(offset_of!(RecordHeader, related_handle) == 0x16);
    assert!(offset_of!(RecordHeader, timestamp) == 0x18);
    assert!(offset_of!(RecordHeader, maintenance_op_class) == 0x20);
    assert!(offset_of!(RecordHeader, ld_id) == 0x22);
    assert!(offset_of!(RecordHeader, head_id) == 0x24);
    assert!(size_of::<EventRecord>() == RECORD_LEN);
    assert!(size_of::<GeneralMedia>() == RECORD_LEN - 0x30);
    assert!(offset_of!(GeneralMedia, descriptor) == 0x38 - 0x30);
    assert!(offset_of!(GeneralMedia, validity_flags) == 0x3B - 0x30);
    assert!(offset_of!(GeneralMedia, device) == 0x3F - 0x30);
    assert!(offset_of!(GeneralMedia, component_id) == 0x42 - 0x30);
    assert!(size_of::<Dram>() == RECORD_LEN - 0x30);
    assert!(offset_of!(Dram, nibble_mask) == 0x3F - 0x30);
    assert!(offset_of!(Dram, bank_group) == 0x42 - 0x30);
    assert!(offset_of!(Dram, row) == 0x44 - 0x30);
    assert!(offset_of!(Dram, column) == 0x47 - 0x30);
    assert!(offset_of!(Dram, correction_mask) == 0x49 - 0x30);
    assert!(size_of::<MemoryModule>() == RECORD_LEN - 0x30);
    assert!(offset_of!(MemoryModule, health) == 0x31 - 0x30);
    assert!(size_of::<GetEventRecordsHeader>() == GET_OUTPUT_HEADER_LEN);
    assert!(offset_of!(GetEventRecordsHeader, overflow_error_count) == 0x02);
    assert!(offset_of!(GetEventRecordsHeader, first_overflow_timestamp) == 0x04);
    assert!(offset_of!(GetEventRecordsHeader, last_overflow_timestamp) == 0x0C);
    assert!(offset_of!(GetEventRecordsHeader, record_count) == 0x14);
    assert!(size_of::<ClearEventRecordsHeader>() == 6);
    assert!(size_of::<EventInterruptPolicy>() == 4);
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    #[test]
    fn uuids_read_as_their_string_form() {
        let text = |u: [u8; 16]| {
            let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
            format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        };
        assert_eq!(text(uuid::GENERAL_MEDIA), "fbcd0a77-c260-417f-85a9-088b1621eba6");
        assert_eq!(text(uuid::DRAM), "601dcbb3-9c06-4eab-b8af-4e9bfb5c9624");
        assert_eq!(text(uuid::MEMORY_MODULE), "fe927475-dd59-4339-a586-79bab113b774");
    }

    #[test]
    fn clear_inputs_that_lie_about_their_handles_are_refused() {
        use ClearInputError::*;
        assert_eq!(ClearRequest::decode(&[0, 0, 0]), Err(Short(3)));
        assert_eq!(ClearRequest::decode(&[4, 0, 0, 0, 0, 0]), Err(UnknownLog(4)));
        assert!(matches!(ClearRequest::decode(&[0, 0, 2, 0, 0, 0, 1, 0]), Err(HandleBytes { .. })));
        assert_eq!(ClearRequest::decode(&[0, 1, 1, 0, 0, 0, 1, 0]), Err(ClearAllWithHandles(1)));
        assert_eq!(ClearRequest::decode(&[0, 2, 0, 0, 0, 0]), Err(ReservedFlags(2)));
        assert_eq!(ClearRequest::decode(&[0, 0, 0, 1, 0, 0]), Err(ReservedNotZero));
        assert_eq!(
            ClearRequest::decode(&[3, 1, 0, 0, 0, 0]),
            Ok(ClearRequest::All(EventLog::Fatal))
        );
    }

    #[test]
    fn policy_bytes_with_reserved_bits_or_mode_three_are_refused() {
        assert_eq!(InterruptMode::decode(0x00), Some(InterruptMode::None));
        assert_eq!(InterruptMode::decode(0x31), Some(InterruptMode::Msi(3)));
        assert_eq!(InterruptMode::decode(0xF2), Some(InterruptMode::Firmware(15)));
        assert_eq!(InterruptMode::decode(0x03), None);
        assert_eq!(InterruptMode::decode(0x05), None);
        assert_eq!(InterruptMode::decode(0x10), None, "a vector with no mode");
    }

    proptest! {
        #[test]
        fn clear_requests_round_trip(log in 0u8..4, all: bool, handles in proptest::collection::vec(any::<u16>(), 0..=255)) {
            let log = EventLog::from_wire(log).unwrap();
            let request = if all { ClearRequest::All(log) } else { ClearRequest::Handles(log, handles) };
            prop_assert_eq!(ClearRequest::decode(&request.encode()), Ok(request));
        }

        #[test]
        fn clear_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ClearRequest::decode(&bytes);
        }

        #[test]
        fn policy_bytes_round_trip(byte: u8) {
            if let Some(mode) = InterruptMode::decode(byte) {
                prop_assert_eq!(mode.encode(), byte);
            }
        }

        #[test]
        fn record_flags_round_trip(value in 0u32..(1 << 24)) {
            let mut header = RecordHeader::new_zeroed();
            header.set_flags(value);
            prop_assert_eq!(header.flags(), value);
        }
    }
}
