//! The data path: submission and completion rings in the host DMA window,
//! command descriptors, completion entries, and the KV frame geometry the
//! host needs to write rows straight into device DRAM.
//!
//! What each command's fields mean is written once, in [`command`]: the
//! host encodes a [`QueueCommand`], the device decodes one.
//!
//! Addresses in descriptors are byte offsets from the start of the region
//! (the device's view of host memory, like a bus address); every buffer must
//! lie wholly inside the host DMA window.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

mod command;
mod keys;
pub use command::{
    CommitMode, DecodeError, Gather, HostBuffer, KvAppend, KvCommit, KvCreate, KvFree, KvList,
    KvMap, PageSelection, QueueCommand, SqeField, Stream, Topk,
};
pub use keys::{KEY_TILE_TOKENS, KeyLayout};

/// Bytes per submission queue entry.
pub const SQE_SIZE: u64 = 64;
/// Bytes per completion queue entry.
pub const CQE_SIZE: u64 = 32;
/// Most entries in one ring (a power of two).
pub const MAX_QUEUE_ENTRIES: u32 = 4096;
/// Fewest entries in one ring.
pub const MIN_QUEUE_ENTRIES: u32 = 2;
/// Most queue pairs a device serves.
pub const MAX_QUEUE_PAIRS: u32 = 64;
/// Most queue pairs one owner process may hold: a greedy host leaves room
/// for others.
pub const MAX_QUEUE_PAIRS_PER_OWNER: u32 = MAX_QUEUE_PAIRS / 2;
/// `irq_vector` value of a polled queue (no interrupts).
pub const IRQ_NONE: u16 = 0xFFFF;
/// Ring buffers are aligned to this many bytes.
pub const RING_ALIGN: u64 = 64;
/// Bytes of device DRAM per KV frame (one page of K rows or of V rows).
pub const KV_FRAME_SIZE: u32 = 64 << 10;

/// Element type of keys, values and queries on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::Bf16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The wire code.
    pub const fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 2,
        }
    }

    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            2 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The bit in Identify PNM's supported-dtypes mask.
    pub const fn bit(self) -> u32 {
        1 << self.code()
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// How a GQA group's scores combine into one per token (TOPK's arg1 [15:8]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// The largest of the group's scores (default): a token is kept if any
    /// query head attends to it strongly.
    #[default]
    Max,
    /// The mean of the group's scores.
    Mean,
}

impl Aggregation {
    pub const fn code(self) -> u8 {
        match self {
            Self::Max => 0,
            Self::Mean => 1,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Max),
            1 => Some(Self::Mean),
            _ => None,
        }
    }
}

/// KV_COMMIT flag: fold the rows' keys into the page bounds now but make
/// them valid only with a later commit without this flag, so an append in
/// many chunks becomes visible all at once (or, if its queue goes away
/// first, not at all).
pub const KV_COMMIT_DEFER: u8 = 1 << 0;
/// KV_COMMIT flag: give up this queue's reservation on the sequence (an
/// append that failed midway); `count` is ignored and the sequence keeps
/// exactly its committed tokens.
pub const KV_COMMIT_ABORT: u8 = 1 << 1;

/// A queue command opcode. An open newtype, as on the wire: a value this
/// crate does not name is still representable, and is refused with
/// Unsupported, never trusted. What each command's fields mean is
/// [`QueueCommand`]'s to say.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(transparent)]
pub struct QueueOpcode(pub u8);

impl QueueOpcode {
    /// Does nothing; completes with Success. For measuring the command path.
    pub const NOP: Self = Self(0x00);
    /// Create a KV sequence ([`KvCreate`]).
    pub const KV_CREATE: Self = Self(0x01);
    /// Reserve tokens at the end of a sequence ([`KvAppend`]).
    pub const KV_APPEND: Self = Self(0x02);
    /// Make reserved tokens valid, or give them up ([`KvCommit`]).
    pub const KV_COMMIT: Self = Self(0x03);
    /// Free a sequence and all its pages ([`KvFree`]).
    pub const KV_FREE: Self = Self(0x04);
    /// List sequences ([`KvList`]).
    pub const KV_LIST: Self = Self(0x05);
    /// Read part of a sequence's page map ([`KvMap`]).
    pub const KV_MAP: Self = Self(0x06);
    /// Score a stream's keys against queries and return the best k ([`Topk`]).
    pub const TOPK: Self = Self(0x10);
    /// Copy the K and V rows of given tokens to the host ([`Gather`]).
    pub const GATHER: Self = Self(0x11);
    /// TOPK, then GATHER of the selected tokens, in one command.
    pub const TOPK_GATHER: Self = Self(0x12);

    /// Every opcode this crate names, in numeric order.
    pub const ALL: [Self; 10] = [
        Self::NOP,
        Self::KV_CREATE,
        Self::KV_APPEND,
        Self::KV_COMMIT,
        Self::KV_FREE,
        Self::KV_LIST,
        Self::KV_MAP,
        Self::TOPK,
        Self::GATHER,
        Self::TOPK_GATHER,
    ];

    /// The command's name, if this crate knows it.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x00 => "NOP",
            0x01 => "KV_CREATE",
            0x02 => "KV_APPEND",
            0x03 => "KV_COMMIT",
            0x04 => "KV_FREE",
            0x05 => "KV_LIST",
            0x06 => "KV_MAP",
            0x10 => "TOPK",
            0x11 => "GATHER",
            0x12 => "TOPK_GATHER",
            _ => return None,
        })
    }

    /// True for the commands that only read the KV store and may take long
    /// (a device runs them on its compute units).
    pub const fn is_compute(self) -> bool {
        matches!(self.0, 0x10..=0x12)
    }
}

impl fmt::Debug for QueueOpcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{:02X}h ({name})", self.0),
            None => write!(f, "{:02X}h", self.0),
        }
    }
}

impl fmt::Display for QueueOpcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A submission queue entry (64 bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct SubmissionEntry {
    pub opcode: QueueOpcode,
    pub flags: u8,
    /// Chosen by the host; unique among the queue's commands in flight.
    pub command_id: U16,
    pub seq: U32,
    pub layer: U16,
    pub head: U16,
    pub count: U32,
    pub arg0: U32,
    pub arg1: U32,
    pub buf0_addr: U64,
    pub buf1_addr: U64,
    /// TOPK/TOPK_GATHER with [`FLAG_PAGE_SELECTION`]: [31:0] token budget,
    /// [39:32] sink pages, [47:40] recent pages (see [`PageSelection`]).
    pub selection: U64,
    pub buf0_len: U32,
    pub buf1_len: U32,
    pub reserved1: U64,
}

/// A completion queue entry (32 bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CompletionEntry {
    pub result0: U32,
    pub result1: U32,
    pub result2: U64,
    /// Nanoseconds this emulator spent executing the command (saturates).
    pub exec_ns: U32,
    /// Nanoseconds the modelled hardware would take, from the device's
    /// timing profile (saturates; 0 if the device models no timing).
    pub model_ns: U32,
    /// The device's SQ head after consuming this command.
    pub sq_head: U16,
    pub sq_id: U16,
    pub command_id: U16,
    /// [0] phase tag; [15:1] return code (CXL numbering).
    pub status: U16,
}

impl CompletionEntry {
    pub fn phase(&self) -> bool {
        self.status.get() & 1 != 0
    }

    pub fn return_code(&self) -> u16 {
        self.status.get() >> 1
    }

    pub fn encode_status(return_code: u16, phase: bool) -> u16 {
        (return_code << 1) | u16::from(phase)
    }
}

/// One entry of KV_LIST's output (32 bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct SequenceInfo {
    pub seq: U32,
    pub dtype: U16,
    pub head_dim: U16,
    pub layers: U16,
    pub heads: U16,
    pub tokens_per_page: U32,
    pub tokens: U64,
    pub reserved_tokens: U64,
}

/// One page map entry: the K frame and V frame of one (page, layer, head).
/// A page map lists, for each page in order, its `layers * heads` entries
/// in (layer, head) order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct PageMapEntry {
    pub key_frame: U32,
    pub value_frame: U32,
}

const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<SubmissionEntry>() == SQE_SIZE as usize);
    assert!(offset_of!(SubmissionEntry, command_id) == 0x02);
    assert!(offset_of!(SubmissionEntry, seq) == 0x04);
    assert!(offset_of!(SubmissionEntry, layer) == 0x08);
    assert!(offset_of!(SubmissionEntry, head) == 0x0A);
    assert!(offset_of!(SubmissionEntry, count) == 0x0C);
    assert!(offset_of!(SubmissionEntry, arg0) == 0x10);
    assert!(offset_of!(SubmissionEntry, arg1) == 0x14);
    assert!(offset_of!(SubmissionEntry, buf0_addr) == 0x18);
    assert!(offset_of!(SubmissionEntry, buf1_addr) == 0x20);
    assert!(offset_of!(SubmissionEntry, buf0_len) == 0x30);
    assert!(offset_of!(SubmissionEntry, buf1_len) == 0x34);
    assert!(size_of::<CompletionEntry>() == CQE_SIZE as usize);
    assert!(offset_of!(CompletionEntry, result2) == 0x08);
    assert!(offset_of!(CompletionEntry, exec_ns) == 0x10);
    assert!(offset_of!(CompletionEntry, model_ns) == 0x14);
    assert!(offset_of!(CompletionEntry, sq_head) == 0x18);
    assert!(offset_of!(CompletionEntry, sq_id) == 0x1A);
    assert!(offset_of!(CompletionEntry, command_id) == 0x1C);
    assert!(offset_of!(CompletionEntry, status) == 0x1E);
    assert!(size_of::<SequenceInfo>() == 32);
    assert!(size_of::<PageMapEntry>() == 8);
    assert!(MAX_QUEUE_ENTRIES.is_power_of_two());
};

/// Where TOPK and TOPK_GATHER put their results in buf1, for k requested
/// results of rows of `row_bytes` (0 for TOPK):
/// `[k x u32 token indices | k x f32 scores | pad to 64 | k K rows | k V rows]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopkLayout {
    pub k: u64,
    pub row_bytes: u64,
}

impl TopkLayout {
    /// Bytes per result entry in each of the index and score arrays.
    const ENTRY: u64 = size_of::<u32>() as u64;
    /// Rows start on a cache line.
    const ROWS_ALIGN: u64 = 64;

    pub const fn indices(&self) -> u64 {
        0
    }
    pub const fn scores(&self) -> u64 {
        Self::ENTRY * self.k
    }
    pub const fn key_rows(&self) -> u64 {
        (2 * Self::ENTRY * self.k).next_multiple_of(Self::ROWS_ALIGN)
    }
    pub const fn value_rows(&self) -> u64 {
        self.key_rows() + self.k * self.row_bytes
    }
    /// Bytes buf1 must hold.
    pub const fn len(&self) -> u64 {
        if self.row_bytes == 0 {
            2 * Self::ENTRY * self.k
        } else {
            self.value_rows() + self.k * self.row_bytes
        }
    }
    pub const fn is_empty(&self) -> bool {
        self.k == 0
    }
}

/// Where GATHER puts rows in buf1: `[n K rows | n V rows]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherLayout {
    pub n: u64,
    pub row_bytes: u64,
}

impl GatherLayout {
    pub const fn key_rows(&self) -> u64 {
        0
    }
    pub const fn value_rows(&self) -> u64 {
        self.n * self.row_bytes
    }
    pub const fn len(&self) -> u64 {
        2 * self.n * self.row_bytes
    }
    pub const fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// The order of TOPK results, which every Top-K answer follows and anything
/// merging answers (a device set) must follow too: `a` before `b` if it has
/// the higher score; equal scores (including -0.0 and 0.0): lower token
/// index first; NaN after every number (including -inf), NaNs by index.
pub fn rank(a: (f32, u32), b: (f32, u32)) -> core::cmp::Ordering {
    use core::cmp::Ordering;
    match (a.0.is_nan(), b.0.is_nan()) {
        (false, false) => b.0.partial_cmp(&a.0).expect("not NaN").then(a.1.cmp(&b.1)),
        (true, true) => a.1.cmp(&b.1),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
    }
}

/// Tokens one KV frame holds for rows of `head_dim` elements of `dtype`.
pub const fn tokens_per_page(head_dim: u32, dtype: Dtype) -> u32 {
    KV_FRAME_SIZE / (head_dim * dtype.size() as u32)
}

/// TOPK flag: score only the pages `selection` picks (query-aware page
/// selection by per-page key bounds) instead of every token.
pub const FLAG_PAGE_SELECTION: u8 = 1 << 0;

/// TOPK flag: leave out (and count) the tokens whose rows lie on bad media
/// instead of failing the command with Media Error.
pub const FLAG_SKIP_BAD_ROWS: u8 = 1 << 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let t = TopkLayout { k: 3, row_bytes: 256 };
        assert_eq!(
            (t.indices(), t.scores(), t.key_rows(), t.value_rows(), t.len()),
            (0, 12, 64, 832, 1600)
        );
        assert_eq!(TopkLayout { k: 3, row_bytes: 0 }.len(), 24);
        assert_eq!(GatherLayout { n: 2, row_bytes: 10 }.len(), 40);
        assert_eq!(tokens_per_page(128, Dtype::F16), 256);
        assert_eq!(tokens_per_page(256, Dtype::F32), 64);
        assert_eq!(tokens_per_page(1, Dtype::F16), 32768);
    }

    #[test]
    fn completion_status_bits() {
        let c = CompletionEntry {
            status: CompletionEntry::encode_status(0x0E, true).into(),
            ..Default::default()
        };
        assert!(c.phase());
        assert_eq!(c.return_code(), 0x0E);
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d.code()), Some(d));
        }
        assert_eq!(Dtype::from_code(3), None);
    }
}
