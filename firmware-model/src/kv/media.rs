//! The store's media side: sealing committed rows with integrity checks,
//! verifying them on every read, the poison list, and the scrub.
//!
//! A frame's line `l` is checked over the frame's committed bytes only
//! ([`Committed`]: the bytes of committed rows, and in a K frame of key
//! tiles the committed tokens' lanes of the last tile; the rest of the line
//! read as zero), so a writer filling tokens past the committed end never
//! disturbs the checks of tokens already committed. A commit seals the
//! lines its tokens touch before the descriptor makes them visible.

use std::collections::HashMap;
use std::ops::Range;

use pnm_protocol::Dtype;
use pnm_protocol::media::PoisonSource;
use pnm_protocol::queue::KEY_TILE_TOKENS;

use super::{Dram, KvError, KvStore, Sequence, SequenceShape, check_stream};
use crate::integrity::{CHECK_BYTES, LINE_BYTES, lines_of};
use crate::media::{PoisonList, PoisonListFull};

/// What is wrong with a bad line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineFault {
    /// On the poison list.
    Poisoned(PoisonSource),
    /// Its bytes no longer match their integrity check.
    Corrupt,
}

/// One bad line of DRAM (`line` = DPA / 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BadLine {
    pub line: u64,
    pub fault: LineFault,
}

/// What a read found wrong: the bad lines it touched and the tokens whose
/// rows they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaFindings {
    pub lines: Vec<BadLine>,
    /// Token ranges, ascending and disjoint once [`Self::normalize`]d.
    pub tokens: Vec<Range<u64>>,
}

impl MediaFindings {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn clear(&mut self) {
        self.lines.clear();
        self.tokens.clear();
    }

    /// Sorts and merges the token ranges and drops repeated lines.
    pub fn normalize(&mut self) {
        self.tokens.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.tokens.len());
        for r in self.tokens.drain(..) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        self.tokens = merged;
        self.lines.sort_by_key(|b| b.line);
        self.lines.dedup_by_key(|b| b.line);
    }

    pub fn token_count(&self) -> u64 {
        self.tokens.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether `token` is among the affected (after `normalize`).
    pub fn affects(&self, token: u64) -> bool {
        let i = self.tokens.partition_point(|r| r.end <= token);
        self.tokens.get(i).is_some_and(|r| r.start <= token)
    }

    /// The error a command that may not skip bad rows fails with.
    pub fn error(&self) -> Option<KvError> {
        let first = self.lines.iter().map(|b| b.line).min()?;
        Some(KvError::MediaError {
            first_token: self.tokens.first().map_or(0, |r| r.start),
            tokens: self.token_count(),
            dpa: first * LINE_BYTES,
        })
    }

    /// Merges another read's findings in.
    pub fn absorb(&mut self, other: &Self) {
        self.lines.extend_from_slice(&other.lines);
        self.tokens.extend(other.tokens.iter().cloned());
    }
}

/// Which frame of which sequence a DRAM line lies in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineOwner {
    pub seq: u32,
    pub layer: u16,
    pub head: u16,
    /// True for a V frame.
    pub value: bool,
    /// Tokens whose row bytes the line holds (committed ones only; empty
    /// if the line holds none).
    pub tokens: Range<u64>,
}

/// Reusable buffers for checking lines.
#[derive(Debug, Default)]
pub(super) struct CheckScratch {
    computed: Vec<u32>,
    stored: Vec<u8>,
    /// Bytes of a partly committed key tile, uncommitted lanes zeroed.
    masked: Vec<u8>,
}

/// Which bytes of a frame hold committed data: every byte below `whole`,
/// and in a K frame of key tiles, the first `lanes` tokens of the tile at
/// `whole` (a partly committed tile: its other lanes belong to tokens a
/// writer may be filling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Committed {
    whole: u64,
    lanes: u64,
    tile_bytes: u64,
    element_bytes: u64,
}

impl Committed {
    /// The committed bytes of a frame of `shape` (K frame if `key`) whose
    /// page holds `tokens` committed tokens.
    pub(super) fn of(shape: SequenceShape, key: bool, tokens: u64) -> Self {
        let layout = shape.key_layout();
        let row = shape.row_bytes();
        if key && layout.tiled {
            let tiles = tokens / KEY_TILE_TOKENS;
            Self {
                whole: tiles * KEY_TILE_TOKENS * row,
                lanes: tokens % KEY_TILE_TOKENS,
                tile_bytes: KEY_TILE_TOKENS * row,
                element_bytes: layout.element_bytes,
            }
        } else {
            Self { whole: tokens * row, lanes: 0, tile_bytes: 0, element_bytes: 1 }
        }
    }

    /// The end of the last byte that may hold committed data.
    pub(super) fn end(&self) -> u64 {
        if self.lanes > 0 { self.whole + self.tile_bytes } else { self.whole }
    }

    /// Zeroes the bytes of `bytes` (frame bytes from `start`) that hold no
    /// committed data.
    fn mask(&self, start: u64, bytes: &mut [u8]) {
        for (i, b) in bytes.iter_mut().enumerate() {
            let at = start + i as u64;
            if at < self.whole {
                continue;
            }
            let lane = (at - self.whole) / self.element_bytes % KEY_TILE_TOKENS;
            if at >= self.end() || lane >= self.lanes {
                *b = 0;
            }
        }
    }
}

/// Keys a scan read: page-relative tokens `rows` of page `page`, in K
/// frame `frame`, and the weighted word sum of their bytes up to
/// `summed_to` if the scoring kernel took it as it read them
/// ([`crate::simd::Scored`]).
#[derive(Debug, Clone)]
pub(super) struct ScannedKeys {
    pub frame: u32,
    pub page: u64,
    pub rows: Range<u64>,
    pub known_sum: Option<u32>,
    /// The frame byte `known_sum` covers the keys' bytes up to.
    pub summed_to: u64,
}

impl<D: Dram> KvStore<D> {
    /// The poison list.
    pub fn poison(&self) -> &PoisonList {
        &self.poison
    }

    /// Adds `lines` (DPA / 64) to the poison list and saves it.
    pub fn add_poison(
        &mut self,
        lines: Range<u64>,
        source: PoisonSource,
    ) -> Result<Result<(), PoisonListFull>, KvError> {
        let added = self.poison.add(lines, source);
        if added.is_ok() {
            self.save_poison()?;
        }
        Ok(added)
    }

    /// Marks the poison list overflowed (an error found that it cannot
    /// hold) and saves it.
    pub fn mark_poison_overflow(&mut self, now: u64) -> Result<(), KvError> {
        if self.poison.overflowed_at().is_none() {
            self.poison.mark_overflow(now);
            self.save_poison()?;
        }
        Ok(())
    }

    pub(super) fn save_poison(&self) -> Result<(), KvError> {
        let table = crate::media::encode_table(&self.poison);
        self.dram.write(self.layout.media_table_offset, &table)
    }

    pub(super) fn load_poison(&mut self) -> Result<Option<crate::media::TableError>, KvError> {
        let mut table = vec![0u8; crate::media::TABLE_BYTES as usize];
        self.dram.read(self.layout.media_table_offset, &mut table)?;
        match crate::media::decode_table(&table) {
            Ok(list) => {
                self.poison = list.unwrap_or_default();
                Ok(None)
            }
            Err(e) => Ok(Some(e)),
        }
    }

    /// Whether DPA range `[dpa, dpa + len)` lies in the frames area (the
    /// only media that takes poison and corruption; the store's tables
    /// are device metadata).
    pub fn in_frames(&self, dpa: u64, len: u64) -> bool {
        let end = dpa.checked_add(len);
        let frames_end = self.layout.frame_offset(self.layout.frame_count);
        len > 0 && dpa >= self.layout.frames_offset && end.is_some_and(|e| e <= frames_end)
    }

    /// Clear Poison: writes `data` over line `line`, takes it off the poison
    /// list and seals it again. Returns whether it was poisoned.
    pub fn clear_poison(&mut self, line: u64, data: &[u8; 64], now: u64) -> Result<bool, KvError> {
        let dpa = line * LINE_BYTES;
        self.dram.write(dpa, data)?;
        let was = self.poison.clear(line, now);
        self.save_poison()?;
        self.reseal_line(line)?;
        Ok(was)
    }

    /// Silent corruption for fault injection: XORs every byte of
    /// `[dpa, dpa + len)` with `pattern`, leaving checks and poison alone.
    pub fn corrupt(&self, dpa: u64, len: u64, pattern: u8) -> Result<(), KvError> {
        let mut bytes = vec![0u8; len as usize];
        self.dram.read(dpa, &mut bytes)?;
        for b in &mut bytes {
            *b ^= pattern;
        }
        self.dram.write(dpa, &bytes)
    }

    /// Seals line `line` again from its current bytes, if a sequence's
    /// committed rows lie in it.
    fn reseal_line(&mut self, line: u64) -> Result<(), KvError> {
        let Some((frame, within)) = self.layout.frame_at(line * LINE_BYTES) else {
            return Ok(());
        };
        if let Some(committed) = self.frame_owners().get(&frame).map(|o| self.committed(o))
            && within < committed.end()
        {
            let index = within / LINE_BYTES;
            self.seal_lines(frame, index..index + 1, committed, &mut CheckScratch::default())?;
        }
        Ok(())
    }

    /// Writes the checks of the lines holding `frame`'s committed bytes
    /// from byte `from` on.
    pub(super) fn seal(
        &self,
        frame: u32,
        from: u64,
        committed: Committed,
        scratch: &mut CheckScratch,
    ) -> Result<(), KvError> {
        self.seal_lines(frame, lines_of(from, committed.end()), committed, scratch)
    }

    /// Writes the checks of frame lines `lines`.
    fn seal_lines(
        &self,
        frame: u32,
        lines: Range<u64>,
        committed: Committed,
        scratch: &mut CheckScratch,
    ) -> Result<(), KvError> {
        if lines.is_empty() {
            return Ok(());
        }
        self.compute_checks(frame, lines.clone(), committed, scratch)?;
        let bytes: Vec<u8> = scratch.computed.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.dram.write(self.layout.check_offset(frame, lines.start * LINE_BYTES), &bytes)
    }

    /// Checks of frame lines `lines` over the committed bytes, into
    /// `scratch.computed`.
    fn compute_checks(
        &self,
        frame: u32,
        lines: Range<u64>,
        committed: Committed,
        scratch: &mut CheckScratch,
    ) -> Result<(), KvError> {
        let start = lines.start * LINE_BYTES;
        let end = (lines.end * LINE_BYTES).min(committed.end());
        let at = self.layout.frame_offset(frame);
        scratch.computed.clear();
        if end <= start {
            return Ok(());
        }
        let first_line = (at + start) / LINE_BYTES;
        if end <= committed.whole {
            // Byte-granular: F16 rows of an even length (row bytes are even).
            return self.dram.with_rows(at + start, end - start, Dtype::F16, |rows| {
                crate::simd::line_checks(rows, first_line, &mut scratch.computed)
            });
        }
        self.read_masked(frame, start..end, committed, &mut scratch.masked)?;
        let rows = crate::simd::Rows::from_bytes(&scratch.masked, Dtype::F16);
        crate::simd::line_checks(rows, first_line, &mut scratch.computed);
        Ok(())
    }

    /// Frame bytes `bytes`, those holding no committed data zeroed.
    fn read_masked(
        &self,
        frame: u32,
        bytes: Range<u64>,
        committed: Committed,
        out: &mut Vec<u8>,
    ) -> Result<(), KvError> {
        out.clear();
        out.resize((bytes.end - bytes.start) as usize, 0);
        self.dram.read(self.layout.frame_offset(frame) + bytes.start, out)?;
        committed.mask(bytes.start, out);
        Ok(())
    }

    /// Verifies the lines holding bytes `[from, to)` of `frame` (`to` no
    /// further than its committed bytes), appending each bad one to `bad`.
    pub(super) fn verify(
        &self,
        frame: u32,
        range: (u64, u64, Committed),
        scratch: &mut CheckScratch,
        bad: &mut Vec<BadLine>,
    ) -> Result<(), KvError> {
        self.verify_with(frame, range, None, scratch, bad)
    }

    /// [`verify`](Self::verify), given the weighted word sum of exactly the
    /// bytes `[from, to)` if a kernel took it while reading them (then they
    /// are not read again unless the run disagrees). `known_sum` counts
    /// only when `from` and `to` are line boundaries.
    pub(super) fn verify_with(
        &self,
        frame: u32,
        (from, to, committed): (u64, u64, Committed),
        known_sum: Option<u32>,
        scratch: &mut CheckScratch,
        bad: &mut Vec<BadLine>,
    ) -> Result<(), KvError> {
        let known_sum =
            known_sum.filter(|_| from.is_multiple_of(LINE_BYTES) && to.is_multiple_of(LINE_BYTES));
        let lines = lines_of(from, to);
        if lines.is_empty() {
            return Ok(());
        }
        let first_line = self.layout.frame_offset(frame) / LINE_BYTES + lines.start;
        let dpa_lines = first_line..first_line + (lines.end - lines.start);
        if !self.poison.touches(dpa_lines.clone())
            && self.run_is_clean(frame, lines.clone(), committed, known_sum, scratch)?
        {
            return Ok(());
        }
        let poisoned: Vec<_> = self.poison.within(dpa_lines.clone()).collect();
        for p in &poisoned {
            bad.extend(
                p.lines.clone().map(|line| BadLine { line, fault: LineFault::Poisoned(p.source) }),
            );
        }
        self.compute_checks(frame, lines.clone(), committed, scratch)?;
        let n = scratch.computed.len();
        scratch.stored.resize(n * CHECK_BYTES as usize, 0);
        self.dram
            .read(self.layout.check_offset(frame, lines.start * LINE_BYTES), &mut scratch.stored)?;
        for (i, (&computed, stored)) in
            scratch.computed.iter().zip(scratch.stored.chunks_exact(4)).enumerate()
        {
            let line = first_line + i as u64;
            let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
            if computed != stored && !poisoned.iter().any(|p| p.lines.contains(&line)) {
                bad.push(BadLine { line, fault: LineFault::Corrupt });
            }
        }
        Ok(())
    }

    /// Whether frame lines `lines` all match their checks over the
    /// committed bytes, tested at once: their weighted sum and salts against
    /// their stored checks' sum ([`crate::integrity`]).
    fn run_is_clean(
        &self,
        frame: u32,
        lines: Range<u64>,
        committed: Committed,
        known_sum: Option<u32>,
        scratch: &mut CheckScratch,
    ) -> Result<bool, KvError> {
        let start = lines.start * LINE_BYTES;
        let end = (lines.end * LINE_BYTES).min(committed.end()).max(start);
        let at = self.layout.frame_offset(frame);
        let mut sum = 0u32;
        match known_sum {
            Some(known) => sum = known,
            None if end <= committed.whole => {
                self.dram.with_rows(at + start, end - start, Dtype::F16, |rows| {
                    crate::simd::line_sums(rows, &mut sum)
                })?
            }
            None => {
                self.read_masked(frame, start..end, committed, &mut scratch.masked)?;
                let rows = crate::simd::Rows::from_bytes(&scratch.masked, Dtype::F16);
                crate::simd::line_sums(rows, &mut sum);
            }
        }
        let first = (at + start) / LINE_BYTES;
        let sum =
            sum.wrapping_add(crate::integrity::salt_sum(first..first + (lines.end - lines.start)));
        let n = (lines.end - lines.start) as usize;
        scratch.stored.resize(n * CHECK_BYTES as usize, 0);
        self.dram.read(self.layout.check_offset(frame, start), &mut scratch.stored)?;
        let stored = scratch
            .stored
            .chunks_exact(4)
            .fold(0u32, |s, c| s.wrapping_add(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(stored == sum)
    }

    /// Committed bytes of the frame `owner` names.
    fn committed(&self, owner: &FrameOwner) -> Committed {
        let Some(seq) = self.sequences.get(&owner.seq) else {
            return Committed { whole: 0, lanes: 0, tile_bytes: 0, element_bytes: 1 };
        };
        page_committed(seq, owner.page, !owner.value)
    }

    /// Every frame that holds rows, with its place.
    fn frame_owners(&self) -> HashMap<u32, FrameOwner> {
        let mut owners = HashMap::new();
        for (&seq_id, seq) in &self.sequences {
            let streams = seq.shape.streams();
            for (i, e) in seq.map.iter().enumerate() {
                let (page, stream) = (i as u64 / streams, i as u64 % streams);
                let owner = FrameOwner { seq: seq_id, page, stream, value: false };
                owners.insert(e.key_frame.get(), owner);
                owners.insert(e.value_frame.get(), FrameOwner { value: true, ..owner });
            }
        }
        owners
    }

    /// Which sequence's rows line `line` holds, if any.
    pub fn line_owner(&self, line: u64) -> Option<LineOwner> {
        let (frame, within) = self.layout.frame_at(line * LINE_BYTES)?;
        let owner = *self.frame_owners().get(&frame)?;
        let seq = self.sequences.get(&owner.seq)?;
        let heads = u64::from(seq.shape.heads);
        let end = self.committed(&owner).end();
        let bytes = within..(within + LINE_BYTES).min(end.max(within));
        Some(LineOwner {
            seq: owner.seq,
            layer: (owner.stream / heads) as u16,
            head: (owner.stream % heads) as u16,
            value: owner.value,
            tokens: tokens_in(seq, owner.page, !owner.value, bytes),
        })
    }

    /// Scan Media over DPA lines `lines`: every poisoned line, and every
    /// committed line whose bytes no longer match their check. Changes
    /// nothing.
    pub fn scrub(&self, lines: Range<u64>) -> Result<Vec<BadLine>, KvError> {
        let mut bad: Vec<BadLine> = Vec::new();
        for p in self.poison.within(lines.clone()) {
            bad.extend(p.lines.map(|line| BadLine { line, fault: LineFault::Poisoned(p.source) }));
        }
        let mut scratch = CheckScratch::default();
        let per_frame = u64::from(pnm_protocol::queue::KV_FRAME_SIZE) / LINE_BYTES;
        let owners = self.frame_owners();
        let mut sorted: Vec<(&u32, &FrameOwner)> = owners.iter().collect();
        sorted.sort_by_key(|(f, _)| **f);
        for (&frame, owner) in sorted {
            let first = self.layout.frame_offset(frame) / LINE_BYTES;
            let span = first.max(lines.start)..(first + per_frame).min(lines.end);
            if span.is_empty() {
                continue;
            }
            let committed = self.committed(owner);
            let (from, to) = (
                (span.start - first) * LINE_BYTES,
                ((span.end - first) * LINE_BYTES).min(committed.end()),
            );
            if from >= to {
                continue;
            }
            let mut found = Vec::new();
            self.verify(frame, (from, to, committed), &mut scratch, &mut found)?;
            bad.extend(found.into_iter().filter(|b| b.fault == LineFault::Corrupt));
        }
        bad.sort_by_key(|b| b.line);
        bad.dedup_by_key(|b| b.line);
        Ok(bad)
    }

    /// Verifies the K and V rows of `indices` in (seq, layer, head): the
    /// bad lines they touch and the tokens affected go to `findings`.
    pub fn verify_rows(
        &self,
        seq_id: u32,
        layer: u16,
        head: u16,
        indices: &[u32],
        findings: &mut MediaFindings,
    ) -> Result<(), KvError> {
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        let tpp = seq.shape.tokens_per_page();
        let row = seq.shape.row_bytes();
        let keys = seq.shape.key_layout();
        let mut scratch = CheckScratch::default();
        for &i in indices {
            let i = u64::from(i);
            if i >= seq.tokens {
                return Err(KvError::TokenBeyond { index: i, tokens: seq.tokens });
            }
            let page = i / tpp;
            let e = seq.entry(page, layer, head);
            let token = i % tpp;
            let key = page_committed(seq, page, true);
            let key_bytes = keys.bytes_of(token..token + 1);
            let before = findings.lines.len();
            for (frame, (from, to), committed) in [
                (e.key_frame.get(), (key_bytes.start, key_bytes.end.min(key.end())), key),
                (
                    e.value_frame.get(),
                    (token * row, (token + 1) * row),
                    page_committed(seq, page, false),
                ),
            ] {
                self.verify(frame, (from, to, committed), &mut scratch, &mut findings.lines)?;
            }
            if findings.lines.len() > before {
                findings.tokens.push(i..i + 1);
            }
        }
        Ok(())
    }

    /// Verifies key rows a scan read (before their scores count); the
    /// affected tokens among them go to `findings`.
    pub(super) fn verify_keys(
        &self,
        seq: &Sequence,
        keys: ScannedKeys,
        scratch: &mut CheckScratch,
        findings: &mut MediaFindings,
    ) -> Result<(), KvError> {
        let ScannedKeys { frame: key_frame, page, rows, known_sum, summed_to } = keys;
        let committed = page_committed(seq, page, true);
        let span = seq.shape.key_layout().bytes_of(rows);
        let (from, to) = (span.start, span.end.min(committed.end()));
        let before = findings.lines.len();
        // The kernel's sum covers bytes [from, summed_to); the rest (a
        // partly committed key tile, scored apart) is read again here.
        let summed_to = summed_to.clamp(from, to);
        let parts = [(from, summed_to, known_sum), (summed_to, to, None)];
        for (a, b, sum) in parts.into_iter().filter(|(a, b, _)| a < b) {
            self.verify_with(key_frame, (a, b, committed), sum, scratch, &mut findings.lines)?;
        }
        let frame_line = self.layout.frame_offset(key_frame) / LINE_BYTES;
        for bad in &findings.lines[before..] {
            let within = (bad.line - frame_line) * LINE_BYTES;
            let bytes = within.max(from)..(within + LINE_BYTES).min(to);
            let tokens = tokens_in(seq, page, true, bytes);
            if !tokens.is_empty() {
                findings.tokens.push(tokens);
            }
        }
        Ok(())
    }

    /// Seals every K and V line that rows `from..to` of `seq_id` touch
    /// (their commit), before the descriptor publishes them.
    pub(super) fn seal_rows(&self, seq_id: u32, from: u64, to: u64) -> Result<(), KvError> {
        let seq = self.sequence(seq_id)?;
        let tpp = seq.shape.tokens_per_page();
        let row = seq.shape.row_bytes();
        let keys = seq.shape.key_layout();
        let mut scratch = CheckScratch::default();
        let mut page = from / tpp;
        while page * tpp < to {
            let first = from.max(page * tpp) - page * tpp;
            let end = to.min((page + 1) * tpp) - page * tpp;
            let key_start = keys.bytes_of(first..end).start;
            let key = Committed::of(seq.shape, true, end);
            let value = Committed::of(seq.shape, false, end);
            for layer in 0..seq.shape.layers {
                for head in 0..seq.shape.heads {
                    let e = seq.entry(page, layer, head);
                    self.seal(e.key_frame.get(), key_start, key, &mut scratch)?;
                    self.seal(e.value_frame.get(), first * row, value, &mut scratch)?;
                }
            }
            page += 1;
        }
        Ok(())
    }

    /// At load: seals again the line holding each stream's committed end,
    /// if the end is inside a line. A device killed mid-commit may have
    /// sealed that line for more rows than its descriptor published.
    pub(super) fn reseal_committed_ends(&self) -> Result<(), KvError> {
        let mut scratch = CheckScratch::default();
        for seq in self.sequences.values() {
            let tpp = seq.shape.tokens_per_page();
            if seq.tokens == 0 {
                continue;
            }
            let page = (seq.tokens - 1) / tpp;
            let ends = [true, false].map(|key| {
                let committed = page_committed(seq, page, key);
                // The lines past the whole bytes: a partly committed line,
                // or key tile.
                let start = if committed.lanes > 0 {
                    committed.whole
                } else {
                    committed.whole - committed.whole % LINE_BYTES
                };
                (start, committed)
            });
            for layer in 0..seq.shape.layers {
                for head in 0..seq.shape.heads {
                    let e = seq.entry(page, layer, head);
                    let frames = [e.key_frame.get(), e.value_frame.get()];
                    for (frame, (start, committed)) in frames.into_iter().zip(ends) {
                        if start < committed.end() {
                            self.seal(frame, start, committed, &mut scratch)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A frame's place in its sequence.
#[derive(Debug, Clone, Copy)]
struct FrameOwner {
    seq: u32,
    page: u64,
    stream: u64,
    value: bool,
}

/// Committed tokens of page `page` with an element in bytes `bytes` of
/// its K frame (`key`) or V frame.
fn tokens_in(seq: &Sequence, page: u64, key: bool, bytes: Range<u64>) -> Range<u64> {
    if bytes.is_empty() {
        return 0..0;
    }
    let tpp = seq.shape.tokens_per_page();
    let in_page = if key {
        seq.shape.key_layout().tokens_of(bytes)
    } else {
        let row = seq.shape.row_bytes();
        bytes.start / row..(bytes.end - 1) / row + 1
    };
    let first = page * tpp + in_page.start;
    first..(page * tpp + in_page.end).min(seq.tokens.max(first))
}

/// The committed bytes of page `page`'s K frame (`key`) or V frame.
fn page_committed(seq: &Sequence, page: u64, key: bool) -> Committed {
    let tpp = seq.shape.tokens_per_page();
    Committed::of(seq.shape, key, seq.tokens.saturating_sub(page * tpp).min(tpp))
}
