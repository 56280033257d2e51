//! The store's on-DRAM format: the superblock, the sequence descriptors
//! and where each part of the store lies in device DRAM. Everything that
//! must survive a restart is here; fields are little-endian and sizes are
//! asserted at compile time.

use pnm_protocol::queue::KV_FRAME_SIZE;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::KvError;
use crate::integrity::{CHECK_BYTES, LINE_BYTES};
use crate::limits::LIMITS;

pub(super) const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"PNMKVST1");
/// 2: the poison list table and the integrity table. 3: keys of shapes
/// with whole tiles per page stored in tiles (`pnm_protocol::queue::KeyLayout`).
pub(super) const SUPERBLOCK_VERSION: u32 = 3;
pub(super) const SUPERBLOCK_SIZE: u64 = 4096;
/// Bytes reserved for the saved poison list (it takes `media::TABLE_BYTES`).
pub(super) const MEDIA_TABLE_SIZE: u64 = 0x2000;
/// Bytes of one frame's integrity slot: a check per 64-byte line.
pub const INTEGRITY_SLOT: u64 = KV_FRAME_SIZE as u64 / LINE_BYTES * CHECK_BYTES;
pub(super) const DESCRIPTOR_SIZE: u64 = 512;
/// Page-table frames one descriptor can list.
pub const MAX_PT_FRAMES: usize = 120;
/// Page-map entries per page-table frame.
pub const PT_ENTRIES_PER_FRAME: u64 = KV_FRAME_SIZE as u64 / 8;
/// Bytes of one frame's bounds slot: min and max, f32, up to max head_dim.
pub const BOUNDS_SLOT: u64 = 2 * 4 * LIMITS.max_head_dim as u64;
pub(super) const STATE_FREE: u32 = 0;
pub(super) const STATE_LIVE: u32 = 1;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct Superblock {
    pub(super) magic: U64,
    pub(super) version: U32,
    pub(super) frame_size: U32,
    pub(super) frame_count: U32,
    pub(super) max_sequences: U32,
    pub(super) seq_table_offset: U64,
    pub(super) bounds_offset: U64,
    pub(super) frames_offset: U64,
    pub(super) next_seq: U32,
    pub(super) reserved: U32,
    pub(super) media_table_offset: U64,
    pub(super) integrity_offset: U64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct Descriptor {
    pub(super) state: U32,
    pub(super) seq: U32,
    pub(super) dtype: U16,
    pub(super) head_dim: U16,
    pub(super) layers: U16,
    pub(super) heads: U16,
    pub(super) tokens: U64,
    pub(super) pages: U32,
    pub(super) pt_frame_count: U32,
    pub(super) pt_frames: [U32; MAX_PT_FRAMES],
}

/// Offsets in a descriptor of its state word, committed tokens, the
/// (pages, page-table frame count) pair, and the page-table frame list.
pub(super) const DESCRIPTOR_COMMIT_FIELDS: (usize, usize, usize, usize) = (
    std::mem::offset_of!(Descriptor, state),
    std::mem::offset_of!(Descriptor, tokens),
    std::mem::offset_of!(Descriptor, pages),
    std::mem::offset_of!(Descriptor, pt_frames),
);

const _: () = {
    assert!(size_of::<Superblock>() == 0x48);
    assert!(crate::media::TABLE_BYTES <= MEDIA_TABLE_SIZE);
    // The word stores in `write_descriptor`: 8-byte aligned, pages and
    // page-table frame count side by side.
    assert!(std::mem::offset_of!(Descriptor, tokens) == 0x10);
    assert!(std::mem::offset_of!(Descriptor, pages) == 0x18);
    assert!(std::mem::offset_of!(Descriptor, pt_frame_count) == 0x1C);
    assert!(DESCRIPTOR_SIZE.is_multiple_of(8));
    assert!(size_of::<Descriptor>() == DESCRIPTOR_SIZE as usize);
    assert!(std::mem::offset_of!(Descriptor, pt_frames) == 0x20);
};

/// Where the store's parts lie in DRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLayout {
    pub frame_count: u32,
    pub max_sequences: u32,
    pub media_table_offset: u64,
    pub seq_table_offset: u64,
    pub bounds_offset: u64,
    pub integrity_offset: u64,
    pub frames_offset: u64,
}

impl StoreLayout {
    /// The layout for `dram_size` bytes of DRAM.
    pub fn for_dram(dram_size: u64) -> Result<Self, KvError> {
        let frame = u64::from(KV_FRAME_SIZE);
        let max_sequences = LIMITS.max_sequences;
        let media_table_offset = SUPERBLOCK_SIZE;
        let seq_table_offset = media_table_offset + MEDIA_TABLE_SIZE;
        let bounds_offset = seq_table_offset + u64::from(max_sequences) * DESCRIPTOR_SIZE;
        // Frames start frame-aligned after the bounds and integrity tables;
        // solve for the largest count that fits, with one frame of
        // alignment slack.
        let usable =
            dram_size.checked_sub(bounds_offset + frame).ok_or(KvError::TooSmall(dram_size))?;
        let per_frame = frame + BOUNDS_SLOT + INTEGRITY_SLOT;
        let frame_count = (usable / per_frame).min(u64::from(u32::MAX)) as u32;
        let integrity_offset = bounds_offset + u64::from(frame_count) * BOUNDS_SLOT;
        let frames_offset =
            (integrity_offset + u64::from(frame_count) * INTEGRITY_SLOT).next_multiple_of(frame);
        if frame_count < 4 || frames_offset + u64::from(frame_count) * frame > dram_size {
            return Err(KvError::TooSmall(dram_size));
        }
        Ok(Self {
            frame_count,
            max_sequences,
            media_table_offset,
            seq_table_offset,
            bounds_offset,
            integrity_offset,
            frames_offset,
        })
    }

    /// DRAM offset of the integrity check of byte `within` of `frame`.
    pub fn check_offset(&self, frame: u32, within: u64) -> u64 {
        self.integrity_offset
            + u64::from(frame) * INTEGRITY_SLOT
            + within / LINE_BYTES * CHECK_BYTES
    }

    /// The frame holding DRAM offset `dpa` and the offset within it, if
    /// `dpa` is in the frames area.
    pub fn frame_at(&self, dpa: u64) -> Option<(u32, u64)> {
        let frame = u64::from(KV_FRAME_SIZE);
        let rel = dpa.checked_sub(self.frames_offset)?;
        let index = rel / frame;
        (index < u64::from(self.frame_count)).then_some((index as u32, rel % frame))
    }

    pub fn frame_offset(&self, frame: u32) -> u64 {
        self.frames_offset + u64::from(frame) * u64::from(KV_FRAME_SIZE)
    }

    pub(super) fn bounds_slot(&self, frame: u32) -> u64 {
        self.bounds_offset + u64::from(frame) * BOUNDS_SLOT
    }

    pub(super) fn descriptor(&self, slot: u32) -> u64 {
        self.seq_table_offset + u64::from(slot) * DESCRIPTOR_SIZE
    }
}
