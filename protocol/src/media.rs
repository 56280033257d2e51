//! Media and poison management (CXL 3.1 §8.2.9.9.4): Get Poison List,
//! Inject Poison, Clear Poison, Get Scan Media Capabilities, Scan Media and
//! Get Scan Media Results, and the vendor Inject Media Fault command.
//!
//! Addresses are device physical addresses (DPA: bytes from the start of
//! device DRAM), 64-byte aligned; lengths of ranges are in 64-byte lines.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The unit of poison: one cache line.
pub const LINE: u64 = 64;

/// Bytes of Get Poison List's and Get Scan Media Results' output before
/// their records.
pub const LIST_HEADER_LEN: usize = 0x20;

/// Most records the device's poison list holds (Identify's Poison List
/// Maximum Media Error Records).
pub const POISON_LIST_MAX_RECORDS: usize = 256;

/// Where a poisoned line's error came from (a record's address bits [2:0]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoisonSource {
    Unknown,
    /// Poison received from outside (a host wrote poisoned data).
    External,
    /// Found by the device: its integrity check failed on a read or a scan.
    Internal,
    /// Put there by Inject Poison or Inject Media Fault.
    Injected,
    Vendor,
}

impl PoisonSource {
    pub const fn code(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::External => 1,
            Self::Internal => 2,
            Self::Injected => 3,
            Self::Vendor => 7,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Unknown,
            1 => Self::External,
            2 => Self::Internal,
            3 => Self::Injected,
            7 => Self::Vendor,
            _ => return None,
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::External => "external",
            Self::Internal => "internal",
            Self::Injected => "injected",
            Self::Vendor => "vendor",
        }
    }
}

/// Get Poison List (4300h) and Get Scan Media Capabilities (4303h) input:
/// a DPA range.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DpaRange {
    /// 64-byte aligned.
    pub physical_address: U64,
    /// In 64-byte lines.
    pub length: U64,
}

/// Get Poison List output flags.
pub mod poison_flags {
    pub const MORE_RECORDS: u8 = 1 << 0;
    pub const OVERFLOW: u8 = 1 << 1;
    pub const SCAN_MEDIA_IN_PROGRESS: u8 = 1 << 2;
}

/// Get Poison List output, before its records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PoisonListHeader {
    pub flags: u8,
    pub reserved: u8,
    /// Device Timestamp when the list first overflowed (0 if it has not).
    pub overflow_timestamp: U64,
    pub count: U16,
    pub reserved2: [u8; 0x14],
}

/// One Media Error Record (Get Poison List, Get Scan Media Results).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct MediaErrorRecord {
    /// [63:6] DPA of the first line; [2:0] the source ([`PoisonSource`]).
    pub address: U64,
    /// Lines in the range.
    pub length: U32,
    pub reserved: U32,
}

impl MediaErrorRecord {
    pub fn new(dpa: u64, lines: u32, source: PoisonSource) -> Self {
        Self {
            address: ((dpa & !(LINE - 1)) | u64::from(source.code())).into(),
            length: lines.into(),
            reserved: 0.into(),
        }
    }

    pub fn dpa(&self) -> u64 {
        self.address.get() & !(LINE - 1)
    }

    /// None for a reserved source code.
    pub fn source(&self) -> Option<PoisonSource> {
        PoisonSource::from_code((self.address.get() & 0b111) as u8)
    }
}

/// Inject Poison (4301h) input: one line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InjectPoisonInput {
    pub physical_address: U64,
}

/// Clear Poison (4302h) input: one line and the data that replaces it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ClearPoisonInput {
    pub physical_address: U64,
    pub write_data: [u8; LINE as usize],
}

/// Get Scan Media Capabilities (4303h) output.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ScanMediaCapabilities {
    /// Estimated time for Scan Media over the range, in milliseconds.
    pub estimated_runtime_ms: U32,
}

/// Scan Media (4304h) input.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ScanMediaInput {
    pub range: DpaRange,
    /// [0] No Event Log: do not log a General Media record per error found.
    pub flags: u8,
}

/// Scan Media flag: log nothing for the errors found.
pub const SCAN_NO_EVENT_LOG: u8 = 1 << 0;

/// Get Scan Media Results output flags.
pub mod scan_flags {
    pub const MORE_RECORDS: u8 = 1 << 0;
    pub const OVERFLOW: u8 = 1 << 1;
}

/// Get Scan Media Results (4305h) output, before its records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ScanMediaResultsHeader {
    /// Where a scan cut short would resume, and the lines left from there
    /// (both 0 when the scan finished).
    pub restart_address: U64,
    pub restart_length: U64,
    pub flags: u8,
    pub reserved: u8,
    pub count: U16,
    pub reserved2: [u8; 0xC],
}

/// Inject Media Fault (C006h, vendor) kinds.
pub mod fault_kind {
    /// Add the range to the poison list: reads fail, the bytes are kept.
    pub const POISON: u8 = 0;
    /// Change the bytes (XOR with the pattern) and nothing else: silent
    /// corruption that only the integrity check can find.
    pub const CORRUPT: u8 = 1;
}

/// Inject Media Fault (C006h, vendor) input: a range of whole lines.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InjectMediaFaultInput {
    pub range: DpaRange,
    pub kind: u8,
    /// CORRUPT: the byte every byte of the range is XORed with (not 0).
    pub pattern: u8,
    pub reserved: [u8; 6],
}

const _: () = {
    use core::mem::offset_of;
    assert!(size_of::<DpaRange>() == 0x10);
    assert!(size_of::<PoisonListHeader>() == LIST_HEADER_LEN);
    assert!(offset_of!(PoisonListHeader, overflow_timestamp) == 0x02);
    assert!(offset_of!(PoisonListHeader, count) == 0x0A);
    assert!(size_of::<MediaErrorRecord>() == 0x10);
    assert!(size_of::<InjectPoisonInput>() == 0x08);
    assert!(size_of::<ClearPoisonInput>() == 0x48);
    assert!(size_of::<ScanMediaCapabilities>() == 0x04);
    assert!(size_of::<ScanMediaInput>() == 0x11);
    assert!(size_of::<ScanMediaResultsHeader>() == LIST_HEADER_LEN);
    assert!(offset_of!(ScanMediaResultsHeader, flags) == 0x10);
    assert!(offset_of!(ScanMediaResultsHeader, count) == 0x12);
    assert!(size_of::<InjectMediaFaultInput>() == 0x18);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_the_source_in_the_low_bits() {
        let r = MediaErrorRecord::new(0x1_0040, 3, PoisonSource::Injected);
        assert_eq!(r.address.get(), 0x1_0043);
        assert_eq!(
            (r.dpa(), r.source(), r.length.get()),
            (0x1_0040, Some(PoisonSource::Injected), 3)
        );
        for code in 0..8 {
            assert_eq!(
                PoisonSource::from_code(code).map(PoisonSource::code),
                [0, 1, 2, 3, 7].contains(&code).then_some(code)
            );
        }
    }
}
