//! The KV store in device DRAM.
//!
//! Device DRAM is laid out as
//!
//! ```text
//! 0x0000           superblock (4 KiB)
//! 0x1000           sequence table: max_sequences descriptors of 512 bytes
//! bounds_offset    per-frame key bounds: frame_count slots of 2 KiB
//! frames_offset    frames of KV_FRAME_SIZE bytes, frame_size aligned
//! ```
//!
//! A sequence has `layers x heads` KV streams of `head_dim` elements of one
//! dtype. Its tokens are grouped in pages of `tokens_per_page` tokens; each
//! (page, layer, head) owns one K frame and one V frame, so a page's keys are
//! contiguous rows. The page table (a list of [`PageMapEntry`], page-major,
//! then layer, then head) lives in page-table frames listed by the sequence's
//! descriptor, so a sequence grows without moving data. The K frame's bounds
//! slot holds the element-wise min and max of the page's committed keys (f32,
//! NaN ignored), for query-aware page selection.
//!
//! Everything that must survive a restart is in DRAM; the frame allocator is
//! rebuilt from the page tables at load, so it cannot disagree with them.
//! Reserved-but-uncommitted tokens roll back at load; their pages stay with
//! the sequence.
//!
//! The parts: [`format`] (what is in DRAM), [`frames`] (the frame allocator),
//! [`topk`] (Top-K, page selection, gather), [`dram`] (the memory trait);
//! this file is the store's lifecycle: open, create, append, commit, free.

use std::collections::BTreeMap;
use std::ops::Range;

use pnm_protocol::Dtype;
use pnm_protocol::queue::{KV_FRAME_SIZE, KeyLayout, PageMapEntry, SequenceInfo, tokens_per_page};
use zerocopy::little_endian::U32;
use zerocopy::{FromZeros, IntoBytes};

use crate::kernels;
use crate::limits::LIMITS;

mod dram;
mod format;
mod frames;
mod media;
mod topk;

pub use dram::{Dram, MemDram};
pub use format::{BOUNDS_SLOT, INTEGRITY_SLOT, MAX_PT_FRAMES, PT_ENTRIES_PER_FRAME, StoreLayout};
use format::{
    DESCRIPTOR_COMMIT_FIELDS, DESCRIPTOR_SIZE, Descriptor, STATE_FREE, STATE_LIVE,
    SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, Superblock,
};
use frames::FrameAllocator;
pub use media::{BadLine, LineFault, LineOwner, MediaFindings};
pub use topk::{
    BadRows, GATHER_PREFETCH_ROWS, PageSelection, RowLocation, Selected, TopkQuery, TopkScratch,
};

/// A firmware limit a request is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    HeadDim,
    Layers,
    KvHeads,
    K,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HeadDim => "head_dim",
            Self::Layers => "layers",
            Self::KvHeads => "kv heads",
            Self::K => "k",
        })
    }
}

/// Why the store refused or failed; every variant carries its values,
/// never a preformatted message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("no sequence {0}")]
    NoSuchSequence(u32),
    #[error("{limit} {value} is outside this firmware's limit {min}..={max}")]
    OutOfLimit { limit: Limit, value: u64, min: u64, max: u64 },
    #[error("dtype {} is not one this firmware stores", .0.name())]
    UnsupportedDtype(Dtype),
    #[error("appending 0 tokens")]
    EmptyAppend,
    #[error("{tokens} more tokens overflow the token count")]
    TokenCountOverflow { tokens: u64 },
    #[error("pages {first}+{count} are beyond the sequence's {pages}")]
    PagesBeyond { first: u64, count: u64, pages: u64 },
    #[error(
        "commit to {tokens} tokens: must be within committed {committed} (folded {folded}) ..= \
         reserved {reserved}"
    )]
    CommitOutOfRange { tokens: u64, committed: u64, folded: u64, reserved: u64 },
    #[error(
        "{tokens} tokens of this shape are {bytes} bytes of K and of V; got {keys} and {values}"
    )]
    RowBytes { tokens: u64, bytes: u64, keys: u64, values: u64 },
    #[error("layer {layer} / head {head} outside the sequence's {layers} layers x {heads} heads")]
    StreamOutside { layer: u16, head: u16, layers: u16, heads: u16 },
    #[error("part {part} of {parts} over {tokens} of {committed} tokens")]
    BadPart { part: u32, parts: u32, tokens: u64, committed: u64 },
    #[error("token {index} beyond the sequence's {tokens} tokens")]
    TokenBeyond { index: u64, tokens: u64 },
    #[error("{elements} query elements are not 1..={max_group} queries of head_dim {head_dim}")]
    QueryShape { elements: usize, max_group: u32, head_dim: u16 },
    #[error("device DRAM exhausted: {needed} frames needed, {free} free")]
    DramExhausted { needed: u64, free: u64 },
    #[error("sequence table full ({0} sequences)")]
    TooManySequences(u32),
    #[error("sequence {seq} would need {entries} page-table entries; the most is {max}")]
    SequenceTooLong { seq: u32, entries: u64, max: u64 },
    #[error("device DRAM access {offset:#x}+{len:#x} out of range")]
    OutOfRange { offset: u64, len: u64 },
    #[error("device DRAM of {0} bytes is too small for a KV store")]
    TooSmall(u64),
    #[error(
        "sequence {seq} has an append in progress by another writer ({reserved} tokens reserved \
         past the {tokens} committed); appends to one sequence are serialized"
    )]
    AppendInProgress { seq: u32, tokens: u64, reserved: u64 },
    #[error("sequence {seq}: a commit may cover only rows this writer reserved")]
    NotTheWriter { seq: u32 },
    #[error(
        "{tokens} tokens from token {first_token} lie on bad media (poisoned or corrupted; \
         first bad line at DPA {dpa:#x})"
    )]
    MediaError { first_token: u64, tokens: u64, dpa: u64 },
    #[error(
        "the KV superblock is damaged or foreign (its {field} does not match a store of \
         {dram_bytes} bytes)"
    )]
    Damaged { field: &'static str, dram_bytes: u64 },
}

/// Who reserved a sequence's uncommitted tokens: the device names each
/// queue pair's commands by one (the pair's id and its creation's
/// generation), so a reservation dies with the queue that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Writer(pub u64);

impl Writer {
    /// The writer of in-process uses of the store (tools, tests).
    pub const LOCAL: Self = Self(0);
}

/// What a KV_COMMIT does with the rows it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Fold the rows into the page bounds and make them valid.
    Publish,
    /// Fold the rows into the page bounds but keep them invisible: a
    /// multi-chunk append publishes all its rows at once, or none.
    Defer,
}

/// The shape of a sequence's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceShape {
    pub dtype: Dtype,
    pub layers: u16,
    pub heads: u16,
    pub head_dim: u16,
}

impl SequenceShape {
    pub fn row_bytes(&self) -> u64 {
        u64::from(self.head_dim) * self.dtype.size() as u64
    }

    pub fn tokens_per_page(&self) -> u64 {
        u64::from(tokens_per_page(u32::from(self.head_dim), self.dtype))
    }

    /// Where keys lie in their K frames: rows, or tiles of 16 tokens.
    pub fn key_layout(&self) -> KeyLayout {
        KeyLayout::new(u32::from(self.head_dim.max(1)), self.dtype)
    }

    fn streams(&self) -> u64 {
        u64::from(self.layers) * u64::from(self.heads)
    }

    fn validate(&self) -> Result<(), KvError> {
        if !LIMITS.dtypes.contains(&self.dtype) {
            return Err(KvError::UnsupportedDtype(self.dtype));
        }
        check_limit(Limit::HeadDim, self.head_dim.into(), LIMITS.max_head_dim)?;
        check_limit(Limit::Layers, self.layers.into(), LIMITS.max_layers)?;
        check_limit(Limit::KvHeads, self.heads.into(), LIMITS.max_heads)
    }
}

#[derive(Debug, Clone)]
struct Sequence {
    slot: u32,
    shape: SequenceShape,
    /// Committed tokens: what Top-K and gather see.
    tokens: u64,
    /// Tokens with frames: committed plus the writer's reservation.
    reserved: u64,
    /// Tokens whose keys are folded into the page bounds (a deferred
    /// commit folds without publishing).
    folded: u64,
    /// Who holds the reservation `tokens..reserved`, if any.
    writer: Option<Writer>,
    pt_frames: Vec<u32>,
    /// The page table, page-major, then layer, then head.
    map: Vec<PageMapEntry>,
}

impl Sequence {
    fn pages(&self) -> u64 {
        self.map.len() as u64 / self.shape.streams()
    }

    fn entry(&self, page: u64, layer: u16, head: u16) -> PageMapEntry {
        let s = &self.shape;
        self.map[(page * s.streams() + u64::from(layer) * u64::from(s.heads) + u64::from(head))
            as usize]
    }
}

/// What loading an existing store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub formatted: bool,
    pub sequences: usize,
    /// Descriptors found inconsistent and dropped, with the reason.
    pub dropped: Vec<DroppedDescriptor>,
    /// Sequences whose uncommitted tail (a dead writer's) was dropped or
    /// whose last page's bounds were rebuilt.
    pub rolled_back: usize,
    /// The saved poison list was damaged and is started empty.
    pub poison_table: Option<crate::media::TableError>,
}

/// A sequence descriptor found inconsistent at load, and dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slot {slot} (sequence {seq}): {reason}")]
pub struct DroppedDescriptor {
    pub slot: u32,
    pub seq: u32,
    pub reason: BadDescriptor,
}

/// What was wrong with a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDescriptor {
    #[error("state {0}")]
    State(u32),
    #[error("duplicate sequence id")]
    DuplicateId,
    #[error("dtype code {0}")]
    Dtype(u16),
    #[error("shape: {0}")]
    Shape(KvError),
    #[error("{tokens} tokens exceed {pages} pages")]
    TokensExceedPages { tokens: u64, pages: u64 },
    #[error("page table does not fit its frames")]
    PageTableTooLarge,
    #[error("frame {0} out of range or shared")]
    Frame(u32),
    #[error("page table unreadable: {0}")]
    PageTable(KvError),
}

/// Result of KV_APPEND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub first_token: u64,
    pub first_page: u64,
    /// Page map of pages [first_page, first_page + map.len() / streams).
    pub map: Vec<PageMapEntry>,
}

/// The KV store: in-memory index over what is in DRAM.
#[derive(Debug)]
pub struct KvStore<D: Dram> {
    dram: D,
    layout: StoreLayout,
    next_seq: u32,
    sequences: BTreeMap<u32, Sequence>,
    frames: FrameAllocator,
    poison: crate::media::PoisonList,
}

impl<D: Dram> KvStore<D> {
    /// Opens the store in `dram`. DRAM that was never formatted (an all-zero
    /// superblock) is formatted; a superblock that is neither zero nor valid
    /// for this DRAM size is [`KvError::Damaged`]: the caller decides whether
    /// to discard the contents, never this function.
    pub fn open(dram: D) -> Result<(Self, LoadReport), KvError> {
        let layout = StoreLayout::for_dram(dram.len())?;
        let valid = Self::check_superblock(&dram)?;
        let mut store = Self {
            dram,
            layout,
            next_seq: 1,
            sequences: BTreeMap::new(),
            frames: FrameAllocator::new(layout.frame_count),
            poison: Default::default(),
        };
        let mut report = LoadReport::default();
        if valid {
            let mut sb = Superblock::new_zeroed();
            store.dram.read(0, sb.as_mut_bytes())?;
            store.next_seq = sb.next_seq.get().max(1);
            store.load_sequences(&mut report)?;
            report.poison_table = store.load_poison()?;
            if report.poison_table.is_some() {
                store.save_poison()?;
            }
            store.reseal_committed_ends()?;
        } else {
            store.format()?;
            report.formatted = true;
        }
        report.sequences = store.sequences.len();
        Ok((store, report))
    }

    /// Reads the superblock without changing anything: true if it is a
    /// valid store's, false if DRAM was never formatted (all zero),
    /// [`KvError::Damaged`] otherwise.
    pub fn check_superblock(dram: &D) -> Result<bool, KvError> {
        let layout = StoreLayout::for_dram(dram.len())?;
        let mut sb = Superblock::new_zeroed();
        dram.read(0, sb.as_mut_bytes())?;
        let mismatch = [
            (sb.magic.get() == SUPERBLOCK_MAGIC, "magic"),
            (sb.version.get() == SUPERBLOCK_VERSION, "version"),
            (sb.frame_size.get() == KV_FRAME_SIZE, "frame size"),
            (sb.frame_count.get() == layout.frame_count, "frame count"),
            (sb.max_sequences.get() == layout.max_sequences, "max sequences"),
            (sb.seq_table_offset.get() == layout.seq_table_offset, "sequence table offset"),
            (sb.bounds_offset.get() == layout.bounds_offset, "bounds offset"),
            (sb.frames_offset.get() == layout.frames_offset, "frames offset"),
            (sb.media_table_offset.get() == layout.media_table_offset, "poison table offset"),
            (sb.integrity_offset.get() == layout.integrity_offset, "integrity offset"),
        ]
        .into_iter()
        .find(|(ok, _)| !ok)
        .map(|(_, field)| field);
        let never_formatted = sb.as_bytes().iter().all(|&b| b == 0);
        match mismatch {
            None => Ok(true),
            Some(_) if never_formatted => Ok(false),
            Some(field) => Err(KvError::Damaged { field, dram_bytes: dram.len() }),
        }
    }

    fn format(&mut self) -> Result<(), KvError> {
        let empty = vec![0u8; (u64::from(self.layout.max_sequences) * DESCRIPTOR_SIZE) as usize];
        self.dram.write(self.layout.seq_table_offset, &empty)?;
        self.dram.write(self.layout.media_table_offset, &[0; format::MEDIA_TABLE_SIZE as usize])?;
        self.write_superblock()
    }

    fn write_superblock(&self) -> Result<(), KvError> {
        let l = self.layout;
        let sb = Superblock {
            magic: SUPERBLOCK_MAGIC.into(),
            version: SUPERBLOCK_VERSION.into(),
            frame_size: KV_FRAME_SIZE.into(),
            frame_count: l.frame_count.into(),
            max_sequences: l.max_sequences.into(),
            seq_table_offset: l.seq_table_offset.into(),
            bounds_offset: l.bounds_offset.into(),
            frames_offset: l.frames_offset.into(),
            next_seq: self.next_seq.into(),
            reserved: 0.into(),
            media_table_offset: l.media_table_offset.into(),
            integrity_offset: l.integrity_offset.into(),
        };
        self.dram.write(0, sb.as_bytes())
    }

    fn load_sequences(&mut self, report: &mut LoadReport) -> Result<(), KvError> {
        for slot in 0..self.layout.max_sequences {
            let mut d = Descriptor::new_zeroed();
            self.dram.read(self.layout.descriptor(slot), d.as_mut_bytes())?;
            if d.state.get() == STATE_FREE {
                continue;
            }
            match self.validate_descriptor(slot, &d) {
                Ok(seq) => {
                    self.claim_all(&seq);
                    self.next_seq = self.next_seq.max(d.seq.get().wrapping_add(1)).max(1);
                    self.sequences.insert(d.seq.get(), seq);
                }
                Err(reason) => {
                    report.dropped.push(DroppedDescriptor { slot, seq: d.seq.get(), reason });
                    self.dram.write(self.layout.descriptor(slot), &STATE_FREE.to_le_bytes())?;
                }
            }
        }
        // A writer that died with the last device left pages past the
        // committed tokens, and perhaps uncommitted keys folded into the
        // last page's bounds (a deferred commit): drop the one, rebuild
        // the other from committed keys.
        let tails: Vec<u32> = self
            .sequences
            .iter()
            .filter(|(_, s)| {
                let tpp = s.shape.tokens_per_page();
                s.pages() > s.tokens.div_ceil(tpp) || s.tokens % tpp != 0
            })
            .map(|(&id, _)| id)
            .collect();
        for id in tails {
            let seq = self.sequences.get_mut(&id).expect("listed above");
            // Unknown: what the dead writer folded.
            seq.folded = seq.tokens + 1;
            self.truncate_to_committed(id)?;
            report.rolled_back += 1;
        }
        Ok(())
    }

    /// Checks a descriptor read from DRAM, returning the sequence it describes.
    fn validate_descriptor(&self, slot: u32, d: &Descriptor) -> Result<Sequence, BadDescriptor> {
        if d.state.get() != STATE_LIVE {
            return Err(BadDescriptor::State(d.state.get()));
        }
        if self.sequences.contains_key(&d.seq.get()) {
            return Err(BadDescriptor::DuplicateId);
        }
        let dtype = Dtype::from_code(u32::from(d.dtype.get()))
            .ok_or(BadDescriptor::Dtype(d.dtype.get()))?;
        let shape = SequenceShape {
            dtype,
            layers: d.layers.get(),
            heads: d.heads.get(),
            head_dim: d.head_dim.get(),
        };
        shape.validate().map_err(BadDescriptor::Shape)?;
        let pages = u64::from(d.pages.get());
        let tokens = d.tokens.get();
        if tokens > pages * shape.tokens_per_page() {
            return Err(BadDescriptor::TokensExceedPages { tokens, pages });
        }
        let entries = pages * shape.streams();
        let pt_count = d.pt_frame_count.get() as usize;
        if pt_count > MAX_PT_FRAMES || entries > pt_count as u64 * PT_ENTRIES_PER_FRAME {
            return Err(BadDescriptor::PageTableTooLarge);
        }
        let pt_frames: Vec<u32> = d.pt_frames[..pt_count].iter().map(|f| f.get()).collect();
        let mut seen = std::collections::HashSet::new();
        let mut check_frame = |f: u32| {
            if f >= self.layout.frame_count || self.frames.is_used(f) || !seen.insert(f) {
                Err(BadDescriptor::Frame(f))
            } else {
                Ok(())
            }
        };
        for &f in &pt_frames {
            check_frame(f)?;
        }
        let mut map = vec![PageMapEntry::default(); entries as usize];
        self.read_page_table(&pt_frames, 0, &mut map).map_err(BadDescriptor::PageTable)?;
        for e in &map {
            check_frame(e.key_frame.get())?;
            check_frame(e.value_frame.get())?;
        }
        Ok(Sequence {
            slot,
            shape,
            tokens,
            reserved: tokens,
            folded: tokens,
            writer: None,
            pt_frames,
            map,
        })
    }

    fn read_page_table(
        &self,
        pt_frames: &[u32],
        first: u64,
        out: &mut [PageMapEntry],
    ) -> Result<(), KvError> {
        for (i, entry) in out.iter_mut().enumerate() {
            let at = self.pt_entry_offset(pt_frames, first + i as u64);
            self.dram.read(at, entry.as_mut_bytes())?;
        }
        Ok(())
    }

    fn pt_entry_offset(&self, pt_frames: &[u32], index: u64) -> u64 {
        let frame = pt_frames[(index / PT_ENTRIES_PER_FRAME) as usize];
        self.layout.frame_offset(frame) + (index % PT_ENTRIES_PER_FRAME) * 8
    }
    /// Marks every frame `seq` holds as used (at load).
    fn claim_all(&mut self, seq: &Sequence) {
        for &f in &seq.pt_frames {
            self.frames.set_used(f, true);
        }
        for e in &seq.map {
            self.frames.set_used(e.key_frame.get(), true);
            self.frames.set_used(e.value_frame.get(), true);
        }
    }

    pub fn layout(&self) -> StoreLayout {
        self.layout
    }

    pub fn free_frames(&self) -> u64 {
        self.frames.free_frames()
    }

    pub fn dram(&self) -> &D {
        &self.dram
    }

    fn sequence(&self, seq: u32) -> Result<&Sequence, KvError> {
        self.sequences.get(&seq).ok_or(KvError::NoSuchSequence(seq))
    }

    /// Writes a sequence's descriptor so that a device killed at any
    /// instruction of it leaves a consistent one: the page-table frame list
    /// first (entries past the count are inert), then pages and page-table
    /// frame count in one 8-byte store, then the committed tokens in one,
    /// and the state word last (a half-made new descriptor stays free).
    fn write_descriptor(&self, seq_id: u32, seq: &Sequence) -> Result<(), KvError> {
        let mut pt_frames = [U32::ZERO; MAX_PT_FRAMES];
        for (dst, &src) in pt_frames.iter_mut().zip(&seq.pt_frames) {
            *dst = src.into();
        }
        let d = Descriptor {
            state: STATE_LIVE.into(),
            seq: seq_id.into(),
            dtype: (seq.shape.dtype.code() as u16).into(),
            head_dim: seq.shape.head_dim.into(),
            layers: seq.shape.layers.into(),
            heads: seq.shape.heads.into(),
            tokens: seq.tokens.into(),
            pages: (seq.pages() as u32).into(),
            pt_frame_count: (seq.pt_frames.len() as u32).into(),
            pt_frames,
        };
        let at = self.layout.descriptor(seq.slot);
        let bytes = d.as_bytes();
        let (state, tokens, sizes, frames) = DESCRIPTOR_COMMIT_FIELDS;
        let used = frames + 4 * seq.pt_frames.len();
        self.dram.write(at + frames as u64, &bytes[frames..used])?;
        // Identity and shape: fixed for a live sequence, so rewriting them
        // changes nothing; a new descriptor is not live until its state is.
        self.dram.write(at + 4, &bytes[4..tokens])?;
        let word = |from: usize| u64::from_le_bytes(bytes[from..from + 8].try_into().expect("8"));
        self.dram.store_u64(at + sizes as u64, word(sizes))?;
        self.dram.store_u64(at + tokens as u64, word(tokens))?;
        self.dram.write(at + state as u64, &bytes[state..state + 4])
    }

    /// Creates an empty sequence, returning its id.
    pub fn create(&mut self, shape: SequenceShape) -> Result<u32, KvError> {
        shape.validate()?;
        let used_slots: std::collections::HashSet<u32> =
            self.sequences.values().map(|s| s.slot).collect();
        let slot = (0..self.layout.max_sequences)
            .find(|s| !used_slots.contains(s))
            .ok_or(KvError::TooManySequences(self.layout.max_sequences))?;
        let id = self.next_seq;
        self.next_seq = self.next_seq.checked_add(1).unwrap_or(1);
        let seq = Sequence {
            slot,
            shape,
            tokens: 0,
            reserved: 0,
            folded: 0,
            writer: None,
            pt_frames: Vec::new(),
            map: Vec::new(),
        };
        self.write_superblock()?;
        self.write_descriptor(id, &seq)?;
        self.sequences.insert(id, seq);
        Ok(id)
    }

    /// Whether `writer` may append to the sequence now: not while another
    /// writer's reservation is open.
    pub fn check_append(&self, seq_id: u32, writer: Writer) -> Result<(), KvError> {
        let seq = self.sequence(seq_id)?;
        if seq.reserved > seq.tokens && seq.writer != Some(writer) {
            return Err(KvError::AppendInProgress {
                seq: seq_id,
                tokens: seq.tokens,
                reserved: seq.reserved,
            });
        }
        Ok(())
    }

    /// Reserves `count` more tokens for the local writer; see [`Self::append_as`].
    pub fn append(&mut self, seq_id: u32, count: u64) -> Result<Appended, KvError> {
        self.append_as(seq_id, count, Writer::LOCAL)
    }

    /// Reserves `count` more tokens for `writer`, allocating pages as
    /// needed. Nothing changes if DRAM cannot hold them, or if another
    /// writer holds a reservation on the sequence (appends to one sequence
    /// are serialized: the other writer commits or is rolled back first).
    pub fn append_as(
        &mut self,
        seq_id: u32,
        count: u64,
        writer: Writer,
    ) -> Result<Appended, KvError> {
        self.check_append(seq_id, writer)?;
        let seq = self.sequence(seq_id)?;
        if count == 0 {
            return Err(KvError::EmptyAppend);
        }
        let shape = seq.shape;
        let tpp = shape.tokens_per_page();
        let first_token = seq.reserved;
        let reserved =
            first_token.checked_add(count).ok_or(KvError::TokenCountOverflow { tokens: count })?;
        let pages_now = seq.pages();
        let pages_needed = reserved.div_ceil(tpp);
        let entries = pages_needed.saturating_mul(shape.streams());
        let max_entries = MAX_PT_FRAMES as u64 * PT_ENTRIES_PER_FRAME;
        if entries > max_entries {
            return Err(KvError::SequenceTooLong { seq: seq_id, entries, max: max_entries });
        }
        let new_data_frames = (pages_needed - pages_now) * shape.streams() * 2;
        let pt_needed = entries.div_ceil(PT_ENTRIES_PER_FRAME);
        let new_pt_frames = pt_needed - seq.pt_frames.len() as u64;
        let needed = new_data_frames + new_pt_frames;
        if needed > self.frames.free_frames() {
            return Err(KvError::DramExhausted { needed, free: self.frames.free_frames() });
        }

        let pt_new = self.frames.allocate(new_pt_frames);
        let data = self.frames.allocate(new_data_frames);
        let mut seq = self.sequences.remove(&seq_id).expect("looked up above");
        seq.pt_frames.extend(pt_new);
        let first_new_entry = seq.map.len() as u64;
        // Entries are page-major, (page, stream); frames are handed out
        // stream-major, so each stream's keys of this append lie in one run
        // of frames when DRAM has one: a Top-K then scans them sequentially
        // rather than alternating K and V frames (faster on 4 KiB pages:
        // docs/PERFORMANCE.md, "Kernel").
        let (new_pages, streams) = (pages_needed - pages_now, shape.streams());
        for page in 0..new_pages {
            for stream in 0..streams {
                let key = data[((2 * stream) * new_pages + page) as usize];
                let value = data[((2 * stream + 1) * new_pages + page) as usize];
                seq.map.push(PageMapEntry { key_frame: key.into(), value_frame: value.into() });
            }
        }
        let result = (|| {
            // Fresh pages start with empty bounds; then their table entries;
            // the descriptor (the commit point) last.
            for e in &seq.map[first_new_entry as usize..] {
                self.reset_bounds(e.key_frame.get())?;
            }
            for (i, e) in seq.map.iter().enumerate().skip(first_new_entry as usize) {
                self.dram.write(self.pt_entry_offset(&seq.pt_frames, i as u64), e.as_bytes())?;
            }
            self.write_descriptor(seq_id, &seq)
        })();
        if let Err(e) = result {
            // Undo in memory: DRAM still holds the old descriptor.
            for f in seq
                .map
                .drain(first_new_entry as usize..)
                .flat_map(|e| [e.key_frame.get(), e.value_frame.get()])
            {
                self.frames.set_used(f, false);
            }
            for f in seq.pt_frames.drain(seq.pt_frames.len() - new_pt_frames as usize..) {
                self.frames.set_used(f, false);
            }
            self.sequences.insert(seq_id, seq);
            return Err(e);
        }
        seq.reserved = reserved;
        seq.writer = Some(writer);
        let first_page = first_token / tpp;
        let map = seq.map[(first_page * shape.streams()) as usize..].to_vec();
        self.sequences.insert(seq_id, seq);
        Ok(Appended { first_token, first_page, map })
    }

    fn reset_bounds(&self, key_frame: u32) -> Result<(), KvError> {
        let mut slot = Vec::with_capacity(BOUNDS_SLOT as usize);
        let half = (BOUNDS_SLOT / 8) as usize;
        slot.extend((0..half).flat_map(|_| f32::INFINITY.to_le_bytes()));
        slot.extend((0..half).flat_map(|_| f32::NEG_INFINITY.to_le_bytes()));
        self.dram.write(self.layout.bounds_slot(key_frame), &slot)
    }

    /// The page map of pages [first, first + count).
    pub fn page_map(
        &self,
        seq_id: u32,
        first: u64,
        count: u64,
    ) -> Result<Vec<PageMapEntry>, KvError> {
        let seq = self.sequence(seq_id)?;
        let end = first
            .checked_add(count)
            .filter(|&e| e <= seq.pages())
            .ok_or_else(|| KvError::PagesBeyond { first, count, pages: seq.pages() })?;
        let streams = seq.shape.streams();
        Ok(seq.map[(first * streams) as usize..(end * streams) as usize].to_vec())
    }

    /// Makes tokens valid up to `tokens` for the local writer; see [`Self::commit_as`].
    pub fn commit(&mut self, seq_id: u32, tokens: u64) -> Result<u64, KvError> {
        self.commit_as(seq_id, tokens, Writer::LOCAL, CommitMode::Publish)
    }

    /// Folds the keys of tokens up to `tokens` into the page bounds and,
    /// when `mode` publishes, makes them valid. Only the writer holding the
    /// reservation may commit into it. Returns the committed token count.
    pub fn commit_as(
        &mut self,
        seq_id: u32,
        tokens: u64,
        writer: Writer,
        mode: CommitMode,
    ) -> Result<u64, KvError> {
        let seq = self.sequence(seq_id)?;
        if tokens < seq.folded.max(seq.tokens) || tokens > seq.reserved {
            return Err(KvError::CommitOutOfRange {
                tokens,
                committed: seq.tokens,
                folded: seq.folded,
                reserved: seq.reserved,
            });
        }
        if seq.reserved > seq.tokens && seq.writer != Some(writer) {
            return Err(KvError::NotTheWriter { seq: seq_id });
        }
        let (from, committed) = (seq.folded.max(seq.tokens), seq.tokens);
        self.fold_bounds(seq_id, from, tokens)?;
        if mode == CommitMode::Publish {
            // Checks first: the descriptor makes the rows visible.
            self.seal_rows(seq_id, committed, tokens)?;
        }
        let mut seq = self.sequences.remove(&seq_id).expect("looked up above");
        seq.folded = tokens;
        if mode == CommitMode::Defer {
            let committed = seq.tokens;
            self.sequences.insert(seq_id, seq);
            return Ok(committed);
        }
        seq.tokens = tokens;
        if seq.tokens == seq.reserved {
            seq.writer = None;
        }
        let written = self.write_descriptor(seq_id, &seq);
        if written.is_err() {
            seq.tokens = self.sequence_tokens_in_dram(seq.slot).unwrap_or(seq.tokens);
        }
        self.sequences.insert(seq_id, seq);
        written.map(|()| tokens)
    }

    /// Folds the keys of tokens `from..tokens` into their pages' bounds.
    fn fold_bounds(&mut self, seq_id: u32, from: u64, tokens: u64) -> Result<(), KvError> {
        let seq = self.sequence(seq_id)?;
        let shape = seq.shape;
        let tpp = shape.tokens_per_page();
        let d = usize::from(shape.head_dim);
        let keys = shape.key_layout();
        let mut block = kernels::RowBlock::default();
        let mut bounds = vec![0u8; 8 * d];
        let mut page = from / tpp;
        while page * tpp < tokens {
            let start = (page * tpp).max(from);
            let end = ((page + 1) * tpp).min(tokens);
            for layer in 0..shape.layers {
                for head in 0..shape.heads {
                    let key_frame = seq.entry(page, layer, head).key_frame.get();
                    let in_page = start - page * tpp..end - page * tpp;
                    // The keys as stored (rows, or the tiles holding them).
                    let span = keys.bytes_of(in_page.clone());
                    let at = self.layout.frame_offset(key_frame) + span.start;
                    let count = ((span.end - span.start) / shape.dtype.size() as u64) as usize;
                    let stored =
                        block.load(shape.dtype, count, |bytes| self.dram.read(at, bytes))?;
                    let slot = self.layout.bounds_slot(key_frame);
                    let (mins, maxs) = bounds.split_at_mut(4 * d);
                    self.dram.read(slot, mins)?;
                    self.dram.read(slot + BOUNDS_SLOT / 2, maxs)?;
                    if keys.tiled {
                        let first = span.start / keys.row_bytes();
                        let lanes =
                            (in_page.start - first) as usize..(in_page.end - first) as usize;
                        fold_tile_bounds(stored, d, lanes, mins, maxs);
                    } else {
                        fold_bounds(stored, d, mins, maxs);
                    }
                    self.dram.write(slot, mins)?;
                    self.dram.write(slot + BOUNDS_SLOT / 2, maxs)?;
                }
            }
            page += 1;
        }
        Ok(())
    }

    /// Gives up `writer`'s reservation on one sequence (its append failed
    /// midway): the sequence keeps exactly its committed tokens. Nothing to
    /// give up is fine; another writer's reservation is refused.
    pub fn abort_append(&mut self, seq_id: u32, writer: Writer) -> Result<u64, KvError> {
        let seq = self.sequence(seq_id)?;
        if seq.reserved == seq.tokens && seq.folded == seq.tokens {
            return Ok(seq.tokens);
        }
        if seq.writer != Some(writer) {
            return Err(KvError::NotTheWriter { seq: seq_id });
        }
        self.truncate_to_committed(seq_id)?;
        Ok(self.sequence(seq_id)?.tokens)
    }

    /// Rolls back every reservation `writer` holds (its queue is gone: the
    /// host died or deleted it mid-append): the sequence keeps exactly its
    /// committed tokens. Returns (sequence, tokens dropped) per rollback.
    pub fn abandon(&mut self, writer: Writer) -> Result<Vec<(u32, u64)>, KvError> {
        let held: Vec<u32> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.writer == Some(writer) && s.reserved > s.tokens)
            .map(|(&id, _)| id)
            .collect();
        let mut rolled = Vec::new();
        for id in held {
            let dropped = self.sequence(id)?.reserved - self.sequence(id)?.tokens;
            self.truncate_to_committed(id)?;
            rolled.push((id, dropped));
        }
        Ok(rolled)
    }

    /// Drops a sequence's uncommitted tail: pages past its committed tokens
    /// go back to the free frames, and bounds that a deferred commit folded
    /// past them are rebuilt from committed keys only.
    fn truncate_to_committed(&mut self, seq_id: u32) -> Result<(), KvError> {
        let mut seq = self.sequences.remove(&seq_id).ok_or(KvError::NoSuchSequence(seq_id))?;
        let shape = seq.shape;
        let tpp = shape.tokens_per_page();
        let keep_pages = seq.tokens.div_ceil(tpp);
        let streams = shape.streams();
        let keep_entries = (keep_pages * streams) as usize;
        let keep_pt = (keep_pages * streams).div_ceil(PT_ENTRIES_PER_FRAME) as usize;
        let boundary = seq.tokens / tpp;
        let rebuild_boundary = seq.folded > seq.tokens && seq.tokens % tpp != 0;
        let dropped: Vec<PageMapEntry> = seq.map.drain(keep_entries.min(seq.map.len())..).collect();
        let dropped_pt: Vec<u32> =
            seq.pt_frames.drain(keep_pt.min(seq.pt_frames.len())..).collect();
        seq.reserved = seq.tokens;
        seq.writer = None;
        // The descriptor, with the shorter page table, is the commit point.
        let written = self.write_descriptor(seq_id, &seq);
        if let Err(e) = written {
            // DRAM still holds the old descriptor: keep its frames.
            seq.map.extend(dropped);
            seq.pt_frames.extend(dropped_pt);
            self.sequences.insert(seq_id, seq);
            return Err(e);
        }
        for f in dropped.iter().flat_map(|e| [e.key_frame.get(), e.value_frame.get()]) {
            self.frames.set_used(f, false);
        }
        for f in dropped_pt {
            self.frames.set_used(f, false);
        }
        let committed = seq.tokens;
        seq.folded = committed;
        self.sequences.insert(seq_id, seq);
        if rebuild_boundary {
            for layer in 0..shape.layers {
                for head in 0..shape.heads {
                    let entry = self.sequence(seq_id)?.entry(boundary, layer, head);
                    self.reset_bounds(entry.key_frame.get())?;
                }
            }
            self.fold_bounds(seq_id, boundary * tpp, committed)?;
        }
        Ok(())
    }

    fn sequence_tokens_in_dram(&self, slot: u32) -> Result<u64, KvError> {
        let mut d = Descriptor::new_zeroed();
        self.dram.read(self.layout.descriptor(slot), d.as_mut_bytes())?;
        Ok(d.tokens.get())
    }

    /// The element-wise (min, max) of page `page`'s committed keys.
    pub fn page_bounds(
        &self,
        seq_id: u32,
        layer: u16,
        head: u16,
        page: u64,
    ) -> Result<(Vec<f32>, Vec<f32>), KvError> {
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        if page >= seq.pages() {
            return Err(KvError::PagesBeyond { first: page, count: 1, pages: seq.pages() });
        }
        let d = usize::from(seq.shape.head_dim);
        let slot = self.layout.bounds_slot(seq.entry(page, layer, head).key_frame.get());
        let mut raw = vec![0u8; 4 * d];
        let mut read = |at: u64| -> Result<Vec<f32>, KvError> {
            self.dram.read(at, &mut raw)?;
            Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        Ok((read(slot)?, read(slot + BOUNDS_SLOT / 2)?))
    }

    /// Frees a sequence and its frames.
    pub fn free(&mut self, seq_id: u32) -> Result<(), KvError> {
        let seq = self.sequence(seq_id)?;
        self.dram.write(self.layout.descriptor(seq.slot), &STATE_FREE.to_le_bytes())?;
        let seq = self.sequences.remove(&seq_id).expect("looked up above");
        for &f in &seq.pt_frames {
            self.frames.set_used(f, false);
        }
        for e in &seq.map {
            self.frames.set_used(e.key_frame.get(), false);
            self.frames.set_used(e.value_frame.get(), false);
        }
        Ok(())
    }

    /// Every live sequence, by id.
    pub fn list(&self) -> Vec<SequenceInfo> {
        self.sequences
            .iter()
            .map(|(&id, s)| SequenceInfo {
                seq: id.into(),
                dtype: (s.shape.dtype.code() as u16).into(),
                head_dim: s.shape.head_dim.into(),
                layers: s.shape.layers.into(),
                heads: s.shape.heads.into(),
                tokens_per_page: (s.shape.tokens_per_page() as u32).into(),
                tokens: s.tokens.into(),
                reserved_tokens: s.reserved.into(),
            })
            .collect()
    }

    pub fn shape(&self, seq_id: u32) -> Result<SequenceShape, KvError> {
        Ok(self.sequence(seq_id)?.shape)
    }

    /// Tokens reserved by appends (committed or not).
    pub fn reserved(&self, seq_id: u32) -> Result<u64, KvError> {
        Ok(self.sequence(seq_id)?.reserved)
    }

    pub fn tokens(&self, seq_id: u32) -> Result<u64, KvError> {
        Ok(self.sequence(seq_id)?.tokens)
    }

    /// Creates a sequence holding `tokens` tokens of `keys` and `values`
    /// (each `[layers, heads, tokens, head_dim]` in the stored dtype), written
    /// straight into its frames and committed: how tools and benchmarks fill
    /// a store without a device.
    pub fn create_with_rows(
        &mut self,
        shape: SequenceShape,
        keys: &[u8],
        values: &[u8],
        tokens: u64,
    ) -> Result<u32, KvError> {
        let stream_bytes = tokens * shape.row_bytes();
        let total = stream_bytes * shape.streams();
        if keys.len() as u64 != total || values.len() as u64 != total {
            return Err(KvError::RowBytes {
                tokens,
                bytes: total,
                keys: keys.len() as u64,
                values: values.len() as u64,
            });
        }
        let id = self.create(shape)?;
        let appended = self.append(id, tokens)?;
        let tpp = shape.tokens_per_page();
        let streams = shape.streams() as usize;
        let mut scratch = Vec::new();
        for (i, entry) in appended.map.iter().enumerate() {
            let (page, stream) = ((i / streams) as u64, (i % streams) as u64);
            let first = page * tpp;
            let rows = first..(first + tpp).min(tokens);
            let at = stream * stream_bytes;
            let (lo, hi) = (
                (at + rows.start * shape.row_bytes()) as usize,
                (at + rows.end * shape.row_bytes()) as usize,
            );
            let key_frame = self.layout.frame_offset(entry.key_frame.get());
            shape.key_layout().write_rows(0, &keys[lo..hi], &mut scratch, |at, bytes| {
                self.dram.write(key_frame + at, bytes)
            })?;
            self.dram.write(self.layout.frame_offset(entry.value_frame.get()), &values[lo..hi])?;
        }
        self.commit(id, tokens)?;
        Ok(id)
    }
}

fn check_stream(seq: &Sequence, layer: u16, head: u16) -> Result<(), KvError> {
    if layer >= seq.shape.layers || head >= seq.shape.heads {
        return Err(KvError::StreamOutside {
            layer,
            head,
            layers: seq.shape.layers,
            heads: seq.shape.heads,
        });
    }
    Ok(())
}

/// Folds f32 key rows into little-endian f32 min/max byte arrays.
fn fold_bounds(keys: &[f32], d: usize, mins: &mut [u8], maxs: &mut [u8]) {
    fold_into(d, mins, maxs, |lo, hi| {
        for key in keys.chunks_exact(d) {
            for i in 0..d {
                // f32::min/max return the other operand for NaN: NaN is ignored.
                lo[i] = lo[i].min(key[i]);
                hi[i] = hi[i].max(key[i]);
            }
        }
    });
}

/// [`fold_bounds`] of keys in tiles (16 tokens, dimension-major): the
/// tokens `lanes` of the tiles `tiles` holds, counted from its first.
fn fold_tile_bounds(
    tiles: &[f32],
    d: usize,
    lanes: Range<usize>,
    mins: &mut [u8],
    maxs: &mut [u8],
) {
    const TILE: usize = pnm_protocol::queue::KEY_TILE_TOKENS as usize;
    fold_into(d, mins, maxs, |lo, hi| {
        // Per dimension and lane, so whole tiles fold 16 lanes at a time
        // (vector min/max); the lanes are folded into the bounds at the end.
        let mut lane_lo = vec![[f32::INFINITY; TILE]; d];
        let mut lane_hi = vec![[f32::NEG_INFINITY; TILE]; d];
        for (t, tile) in tiles.chunks_exact(TILE * d).enumerate() {
            let first = lanes.start.saturating_sub(t * TILE).min(TILE);
            let end = lanes.end.saturating_sub(t * TILE).min(TILE);
            let (dims, _) = tile.as_chunks::<TILE>();
            if (first, end) == (0, TILE) {
                for ((dim, l), h) in dims.iter().zip(&mut lane_lo).zip(&mut lane_hi) {
                    for lane in 0..TILE {
                        // f32::min/max return the other operand for NaN.
                        l[lane] = l[lane].min(dim[lane]);
                        h[lane] = h[lane].max(dim[lane]);
                    }
                }
            } else {
                for ((dim, l), h) in dims.iter().zip(&mut lane_lo).zip(&mut lane_hi) {
                    for lane in first..end {
                        l[lane] = l[lane].min(dim[lane]);
                        h[lane] = h[lane].max(dim[lane]);
                    }
                }
            }
        }
        for (i, (l, h)) in lane_lo.iter().zip(&lane_hi).enumerate() {
            lo[i] = l.iter().fold(lo[i], |m, &v| m.min(v));
            hi[i] = h.iter().fold(hi[i], |m, &v| m.max(v));
        }
    });
}

/// Runs `fold` on the bounds (f32 little-endian in `mins` and `maxs`) as
/// floats and stores them back.
fn fold_into(
    d: usize,
    mins: &mut [u8],
    maxs: &mut [u8],
    fold: impl FnOnce(&mut [f32], &mut [f32]),
) {
    let get = |b: &[u8], i: usize| {
        f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    };
    let mut lo: Vec<f32> = (0..d).map(|i| get(mins, i)).collect();
    let mut hi: Vec<f32> = (0..d).map(|i| get(maxs, i)).collect();
    fold(&mut lo, &mut hi);
    for i in 0..d {
        mins[4 * i..4 * i + 4].copy_from_slice(&lo[i].to_le_bytes());
        maxs[4 * i..4 * i + 4].copy_from_slice(&hi[i].to_le_bytes());
    }
}

/// Refuses `value` outside `1..=max`.
fn check_limit(limit: Limit, value: u32, max: u32) -> Result<(), KvError> {
    if value == 0 || value > max {
        return Err(KvError::OutOfLimit { limit, value: value.into(), min: 1, max: max.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
