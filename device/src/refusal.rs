//! Why the device refused a command: the spec return code the host sees
//! and a typed reason for the log. One type for the mailbox, the queue
//! commands, the host-buffer (DMA window) checks and the resource
//! validators, as openvmm's `NvmeError` carries a status and its source.

use std::fmt;

use pnm_firmware::kv::KvError;
use pnm_protocol::queue::DecodeError;
use pnm_protocol::{OutOfBounds, ReturnCode};

/// A refused command: what the host is told and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: ReturnCode,
    pub reason: Reason,
    /// A queue completion's result fields (Media Error: affected tokens,
    /// first affected token, DPA of the first bad line); 0 otherwise.
    pub results: (u32, u32, u64),
}

impl Refusal {
    pub const fn new(code: ReturnCode, reason: Reason) -> Self {
        Self { code, reason, results: (0, 0, 0) }
    }

    /// Invalid Input (02h).
    pub const fn invalid(reason: Reason) -> Self {
        Self::new(ReturnCode::INVALID_INPUT, reason)
    }

    /// Resources Exhausted (1Dh).
    pub const fn exhausted(reason: Reason) -> Self {
        Self::new(ReturnCode::RESOURCES_EXHAUSTED, reason)
    }
}

/// A host buffer or ring, as a refusal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    Queries,
    Results,
    Indices,
    Rows,
    PageMap,
    SequenceList,
    SubmissionRing,
    CompletionRing,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Queries => "query buffer",
            Self::Results => "result buffer",
            Self::Indices => "index buffer",
            Self::Rows => "row buffer",
            Self::PageMap => "page map buffer",
            Self::SequenceList => "list buffer",
            Self::SubmissionRing => "submission ring",
            Self::CompletionRing => "completion ring",
        })
    }
}

/// A firmware limit a command field is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// TOPK's Count.
    K,
    /// TOPK's Arg0.
    Group,
    /// GATHER's Count.
    GatherRows,
    /// Create Queue Pair's Entries.
    QueueEntries,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::K => "k",
            Self::Group => "GQA group",
            Self::GatherRows => "rows to gather",
            Self::QueueEntries => "queue entries",
        })
    }
}

/// What was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("{limit} {value} is outside {min}..={max}")]
    OutOfLimit { limit: Limit, value: u64, min: u64, max: u64 },
    #[error("{buffer} holds {len} bytes, needs {need}")]
    BufferTooShort { buffer: Buffer, len: u64, need: u64 },
    #[error("{buffer} holds {len} bytes, must hold exactly {need}")]
    BufferLength { buffer: Buffer, len: u64, need: u64 },
    #[error("{buffer} {addr:#x}+{len:#x} is not inside the host DMA window")]
    OutsideDmaWindow { buffer: Buffer, addr: u64, len: u64 },
    #[error("{buffer} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned { buffer: Buffer, addr: u64, align: u64 },
    #[error("the submission and completion rings overlap")]
    RingsOverlap,
    #[error("region access failed: {0}")]
    Memory(OutOfBounds),
    #[error("token index {0} does not fit the 32-bit result")]
    TokenIndexOverflow(u64),
    #[error("mailbox opcode {0} is not supported")]
    UnsupportedCommand(pnm_protocol::Opcode),
    #[error("{command} takes {expected} input bytes, got {got}")]
    InputLength {
        command: pnm_protocol::Opcode,
        expected: pnm_protocol::commands::InputLen,
        got: usize,
    },
    #[error("event log {0} is not one this device keeps (0-3)")]
    UnknownEventLog(u8),
    #[error("event interrupt setting {setting:#04x} for the {log} log: {why}")]
    EventInterruptPolicy { log: &'static str, setting: u8, why: &'static str },
    #[error("fault injection is off: start the device with --allow-injection")]
    InjectionNotAllowed,
    #[error(transparent)]
    ClearInput(#[from] pnm_protocol::events::ClearInputError),
    #[error(transparent)]
    Clear(#[from] pnm_firmware::events::ClearError),
    #[error("the input payload of {0} bytes is larger than the payload area")]
    PayloadTooLong(u32),
    #[error("no log with that identifier")]
    UnknownLog,
    #[error("log bytes {offset}..+{length} are outside the {size}-byte log")]
    LogRange { offset: u64, length: u64, size: u64 },
    #[error("no DMA buffer starts at {0:#x}")]
    NoSuchDmaBuffer(u64),
    #[error("a DMA buffer of 0 bytes")]
    EmptyDmaBuffer,
    #[error(
        "owner {owner} holds {held} bytes of the DMA window; {want} more would pass its share of {share}"
    )]
    DmaShare { owner: u32, held: u64, want: u64, share: u64 },
    #[error("no free {want}-byte range in the host DMA window")]
    DmaWindowFull { want: u64 },
    #[error("owner process id 0 names no process")]
    NoOwner,
    #[error("a guest owner's peer {0} is not connected")]
    NoSuchPeer(u16),
    #[error("the device does not interrupt itself: peer {0} is the device")]
    DevicePeer(u16),
    #[error("peer {peer} has no interrupt vector {vector}")]
    NoSuchVector { peer: u16, vector: u16 },
    #[error("queue priority {0} is not defined")]
    UnknownPriority(u8),
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    #[error("DPA {0:#x} is not 64-byte aligned")]
    UnalignedDpa(u64),
    #[error("DPA range {dpa:#x}+{len:#x} is not {within}")]
    DpaOutside { dpa: u64, len: u64, within: &'static str },
    #[error(transparent)]
    PoisonListFull(#[from] pnm_firmware::media::PoisonListFull),
    #[error("media fault kind {0} is not defined")]
    UnknownFaultKind(u8),
    #[error("a corruption pattern of 0 changes nothing")]
    EmptyPattern,
    #[error("a background command is running")]
    BackgroundBusy,
    #[error("device fault {kind}: its {field} is out of range")]
    FaultField { kind: &'static str, field: &'static str },
    #[error("owner {owner} already holds {max} queue pairs, the most one owner may")]
    OwnerQueueLimit { owner: u32, max: u32 },
    #[error("every queue pair is in use")]
    NoFreeQueue,
    #[error("no queue pair {0}")]
    NoSuchQueue(u16),
}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Self {
        Self::new(e.return_code(), e.into())
    }
}

impl From<KvError> for Refusal {
    fn from(e: KvError) -> Self {
        let code = match &e {
            KvError::NoSuchSequence(_) => ReturnCode::INVALID_HANDLE,
            KvError::OutOfLimit { .. }
            | KvError::UnsupportedDtype(_)
            | KvError::EmptyAppend
            | KvError::TokenCountOverflow { .. }
            | KvError::PagesBeyond { .. }
            | KvError::CommitOutOfRange { .. }
            | KvError::RowBytes { .. }
            | KvError::StreamOutside { .. }
            | KvError::BadPart { .. }
            | KvError::TokenBeyond { .. }
            | KvError::QueryShape { .. }
            | KvError::SequenceTooLong { .. } => ReturnCode::INVALID_INPUT,
            KvError::DramExhausted { .. } | KvError::TooManySequences(_) => {
                ReturnCode::RESOURCES_EXHAUSTED
            }
            KvError::OutOfRange { .. } | KvError::TooSmall(_) | KvError::Damaged { .. } => {
                ReturnCode::INTERNAL_ERROR
            }
            // Another queue's append is between its KV_APPEND and KV_COMMIT.
            KvError::AppendInProgress { .. } => ReturnCode::BUSY,
            KvError::NotTheWriter { .. } => ReturnCode::INVALID_INPUT,
            &KvError::MediaError { first_token, tokens, dpa } => {
                let saturate = |v: u64| v.min(u64::from(u32::MAX)) as u32;
                return Self {
                    results: (saturate(tokens), saturate(first_token), dpa),
                    ..Self::new(ReturnCode::MEDIA_ERROR, e.into())
                };
            }
        };
        Self::new(code, e.into())
    }
}

impl From<OutOfBounds> for Refusal {
    /// The device checked the range before; failing now is its own fault.
    fn from(e: OutOfBounds) -> Self {
        Self::new(ReturnCode::INTERNAL_ERROR, Reason::Memory(e))
    }
}
