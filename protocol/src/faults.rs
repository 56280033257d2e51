//! Inject Device Fault (C007h, vendor): the fault injection control plane
//! for everything but media (Inject Media Fault, C006h) and event records
//! (Inject Event Record, C005h). Served only by a device started with
//! `--allow-injection`.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// What to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceFault {
    /// Ignore the next `count` SQ tail doorbells (the entries wait for the
    /// queue's next doorbell).
    DropDoorbells,
    /// Execute the next `count` commands but post no completion.
    DropCompletions,
    /// Post the next `count` completions `micros` late.
    DelayCompletions,
    /// Post the next `count` completions twice.
    DuplicateCompletions,
    /// Post the next `count` completions with a garbled command and queue
    /// id (the command itself never completes).
    CorruptCompletions,
    /// The engine stops (no commands, no mailbox, no heartbeat) for
    /// `micros` (0: until the device is stopped).
    HangEngine,
    /// Compute unit `target` stops for `micros` (0: for good) before its
    /// next job.
    HangUnit,
    /// Compute unit `target` dies after its current job; the others carry on.
    KillUnit,
    /// The heartbeat stops advancing (the device keeps serving) for
    /// `micros` (0: until cleared).
    StopHeartbeat,
    /// The device process aborts as it starts its next queue command.
    Abort,
    /// Device DRAM gets `target` percent slower (100: normal): the timing
    /// model's times and the emulator's own execution both stretch.
    SlowMemory,
    /// Every fault above that is still pending or in force ends.
    ClearAll,
}

impl DeviceFault {
    pub const ALL: [Self; 12] = [
        Self::DropDoorbells,
        Self::DropCompletions,
        Self::DelayCompletions,
        Self::DuplicateCompletions,
        Self::CorruptCompletions,
        Self::HangEngine,
        Self::HangUnit,
        Self::KillUnit,
        Self::StopHeartbeat,
        Self::Abort,
        Self::SlowMemory,
        Self::ClearAll,
    ];

    pub const fn code(self) -> u8 {
        match self {
            Self::DropDoorbells => 0,
            Self::DropCompletions => 1,
            Self::DelayCompletions => 2,
            Self::DuplicateCompletions => 3,
            Self::CorruptCompletions => 4,
            Self::HangEngine => 5,
            Self::HangUnit => 6,
            Self::KillUnit => 7,
            Self::StopHeartbeat => 8,
            Self::Abort => 9,
            Self::SlowMemory => 10,
            Self::ClearAll => 0xFF,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.code() == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::DropDoorbells => "drop-doorbells",
            Self::DropCompletions => "drop-completions",
            Self::DelayCompletions => "delay-completions",
            Self::DuplicateCompletions => "duplicate-completions",
            Self::CorruptCompletions => "corrupt-completions",
            Self::HangEngine => "hang-engine",
            Self::HangUnit => "hang-unit",
            Self::KillUnit => "kill-unit",
            Self::StopHeartbeat => "stop-heartbeat",
            Self::Abort => "abort",
            Self::SlowMemory => "slow-memory",
            Self::ClearAll => "clear",
        }
    }
}

/// Inject Device Fault (C007h) input.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InjectDeviceFaultInput {
    /// [`DeviceFault::code`].
    pub kind: u8,
    pub reserved: [u8; 3],
    /// How many doorbells or completions (the counting faults; at least 1).
    pub count: U32,
    /// How long, in microseconds (delays and hangs; 0 for a hang: for good).
    pub micros: U32,
    /// A compute unit index (unit faults), or a percentage (slow memory).
    pub target: U32,
}

const _: () = assert!(size_of::<InjectDeviceFaultInput>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for f in DeviceFault::ALL {
            assert_eq!(DeviceFault::from_code(f.code()), Some(f));
        }
        assert_eq!(DeviceFault::from_code(0x7F), None);
    }
}
