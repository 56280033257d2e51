//! Top-K and gather over the store: exact scans of a stream's committed
//! tokens (whole, or one share of a split command), query-aware page
//! selection by per-page key bounds, and the DRAM locations of gathered rows.

use super::media::{CheckScratch, MediaFindings, ScannedKeys};
use super::{Dram, KvError, KvStore, Limit, Sequence, SequenceShape, check_stream};
use crate::integrity::LINE_BYTES;
use crate::kernels::{self, Aggregation, Scored};
use crate::limits::{Dtype, LIMITS};
use pnm_protocol::queue::{KEY_TILE_TOKENS, KV_FRAME_SIZE};

/// Pages a scan scores before it verifies their keys: 32 frames, 2 MiB of
/// keys (their scores, 32 KiB at head_dim 128 in f16, stay in cache).
pub(super) const VERIFY_BATCH_PAGES: usize = 32;

/// What a Top-K asks of one (sequence, layer, KV head).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopkQuery<'a> {
    pub seq: u32,
    pub layer: u16,
    pub head: u16,
    /// G queries of head_dim f32 each (a GQA group), row after row.
    pub queries: &'a [f32],
    /// How a group's G scores of a token combine into its score.
    pub how: Aggregation,
    pub k: u32,
}

/// What a Top-K does when keys it must score lie on bad media (poisoned,
/// or changed behind the device's back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BadRows {
    /// Fail with [`KvError::MediaError`]; no result.
    #[default]
    Fail,
    /// Score the other tokens; the affected ones are left out and reported.
    Skip,
}

/// Buffers a Top-K reuses (the portable kernel's f32 rows, a page's scores,
/// the selection), what it does with bad rows, and what it found.
#[derive(Debug, Default)]
pub struct TopkScratch {
    floats: Vec<f32>,
    /// Scores of the pages scored and not yet verified, page after page.
    scores: Vec<f32>,
    /// Those pages' keys, and where their scores lie in `scores`.
    pending: Vec<(ScannedKeys, std::ops::Range<usize>)>,
    stream: kernels::TopKStream,
    checks: CheckScratch,
    /// Set by the caller before each Top-K.
    pub bad_rows: BadRows,
    /// The last Top-K's bad lines and affected tokens (normalized).
    pub media: MediaFindings,
}

impl TopkScratch {
    /// Ends a Top-K: a media finding fails it unless bad rows are skipped.
    fn conclude(&mut self, top: Vec<Scored>) -> Result<Vec<Scored>, KvError> {
        self.media.normalize();
        match self.media.error() {
            Some(e) if self.bad_rows == BadRows::Fail => Err(e),
            _ => Ok(top),
        }
    }
}

/// Query-aware page selection (the Quest method) for a Top-K: score only
/// the pages whose key bounds promise the most, within a token budget.
///
/// The budget counts tokens, and includes the always-kept windows: the
/// first `sink_pages` pages (attention sinks) and the last `recent_pages`
/// pages are taken first, then the other pages by descending upper bound
/// (`sum_i max(q_i * min_i, q_i * max_i)`, the max over the group's queries,
/// or their mean for mean aggregation) while the whole page still fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSelection {
    pub budget_tokens: u64,
    pub sink_pages: u32,
    pub recent_pages: u32,
}

/// A Top-K and how many tokens it scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    pub top: Vec<Scored>,
    pub tokens_scored: u64,
}

/// Location of one gathered row pair, as DRAM offsets: the value row at
/// `value`; the key's first element at `key`, the next ones every
/// `key_stride` bytes (the element size for rows, a tile's 16 elements for
/// key tiles: [`KvStore::read_key`] assembles the row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLocation {
    pub key: u64,
    pub key_stride: u64,
    pub element_bytes: u64,
    pub value: u64,
}

impl RowLocation {
    /// Whether the key lies as a row (one copy moves it).
    pub fn key_is_row(&self) -> bool {
        self.key_stride == self.element_bytes
    }

    /// Bytes from `key` to the end of the key's last element, for keys of
    /// `row_bytes`.
    pub fn key_span(&self, row_bytes: u64) -> u64 {
        let elements = (row_bytes / self.element_bytes.max(1)).max(1);
        (elements - 1) * self.key_stride + self.element_bytes
    }
}

impl<D: Dram> KvStore<D> {
    /// Exact Top-K of (seq, layer, head) against a group of queries (f32,
    /// `G x head_dim`), over committed tokens.
    pub fn top_k(&self, query: TopkQuery<'_>) -> Result<Vec<Scored>, KvError> {
        self.top_k_with(&mut TopkScratch::default(), query)
    }

    /// [`top_k`](Self::top_k) with caller-owned buffers, so repeated calls
    /// allocate nothing.
    pub fn top_k_with(
        &self,
        scratch: &mut TopkScratch,
        query: TopkQuery<'_>,
    ) -> Result<Vec<Scored>, KvError> {
        let TopkQuery { seq: seq_id, layer, head, queries, k, .. } = query;
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        check_topk(seq.shape, queries, k)?;
        let pages = seq.tokens.div_ceil(seq.shape.tokens_per_page());
        let top = self.scan_pages(scratch, seq, query, seq.tokens, 0..pages)?;
        scratch.conclude(top)
    }

    /// Exact Top-K over part `part` of `parts` of the first `tokens`
    /// committed tokens, split at page boundaries so parts read disjoint
    /// frames. Merging every part's answer ([`kernels::merge_top_k`]) gives
    /// exactly [`top_k`](Self::top_k) over those tokens.
    pub fn top_k_part(
        &self,
        scratch: &mut TopkScratch,
        query: TopkQuery<'_>,
        tokens: u64,
        (part, parts): (u32, u32),
    ) -> Result<Vec<Scored>, KvError> {
        let TopkQuery { seq: seq_id, layer, head, queries, k, .. } = query;
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        check_topk(seq.shape, queries, k)?;
        if tokens > seq.tokens || part >= parts {
            return Err(KvError::BadPart { part, parts, tokens, committed: seq.tokens });
        }
        let pages = tokens.div_ceil(seq.shape.tokens_per_page());
        let (part, parts) = (u64::from(part), u64::from(parts));
        let range = pages * part / parts..pages * (part + 1) / parts;
        let top = self.scan_pages(scratch, seq, query, tokens, range)?;
        scratch.conclude(top)
    }

    /// Scores the first `tokens` tokens of `seq` that lie in `pages`
    /// (ascending) and selects the best `k` of them.
    ///
    /// Pages are verified in batches of [`VERIFY_BATCH_PAGES`] after they
    /// are scored: their stored checks are then read as one run (the check
    /// slots of consecutive frames are consecutive), not 4 KiB between every
    /// two 64 KiB frames of keys. Interleaving the two streams cost a
    /// memory-bound scan about 20% (docs/PERFORMANCE.md, "Verifying in
    /// batches"). Scores reach the selection only once their keys verify,
    /// page by page in order, as before.
    fn scan_pages(
        &self,
        scratch: &mut TopkScratch,
        seq: &Sequence,
        query: TopkQuery<'_>,
        tokens: u64,
        pages: impl Iterator<Item = u64>,
    ) -> Result<Vec<Scored>, KvError> {
        let shape = seq.shape;
        let tpp = shape.tokens_per_page();
        let s = scratch;
        let k = query.k;
        s.stream.reset(k as usize);
        s.media.clear();
        s.scores.clear();
        s.pending.clear();
        let mut pages = pages.peekable();
        while let Some(page) = pages.next() {
            let n = tpp.min(tokens - page * tpp);
            let next = pages.peek().map(|&next| (next, tpp.min(tokens - next * tpp)));
            let deferrable = self.score_page(s, seq, query, page, 0..n, next)?;
            if !deferrable || s.pending.len() >= VERIFY_BATCH_PAGES {
                self.verify_pending(s, seq)?;
            }
        }
        self.verify_pending(s, seq)?;
        Ok(s.stream.finish())
    }

    /// Scores rows `rows` of page `page` into the pending scores (the
    /// kernel takes the keys' integrity sum as it reads them, when it can)
    /// and queues the page for verification. False if it must not wait for
    /// its batch: the kernel did not sum its keys whole, so verifying reads
    /// them again, best at once, while they are in cache. `next` is the page
    /// scanned after this one and its rows, if any: the kernel prefetches
    /// on into its keys.
    fn score_page(
        &self,
        s: &mut TopkScratch,
        seq: &Sequence,
        query: TopkQuery<'_>,
        page: u64,
        rows: std::ops::Range<u64>,
        next: Option<(u64, u64)>,
    ) -> Result<bool, KvError> {
        let TopkQuery { layer, head, queries, how, .. } = query;
        let shape = seq.shape;
        let row = shape.row_bytes();
        let key_frame = seq.entry(page, layer, head).key_frame.get();
        let frame_at = self.layout.frame_offset(key_frame);
        let next_keys = next.map_or((0, 0), |(page, rows)| {
            (self.layout.frame_offset(seq.entry(page, layer, head).key_frame.get()), rows * row)
        });
        let start = s.scores.len();
        let d = usize::from(shape.head_dim);
        let (dtype, tile) = (shape.dtype, KEY_TILE_TOKENS);
        let (known_sum, summed_to) = if shape.key_layout().tiled {
            debug_assert_eq!(rows.start % tile, 0, "scans start at a tile");
            // Whole tiles through the tile kernel; the tokens of a partly
            // committed last tile as rows (its other lanes may be mid-write).
            let whole = rows.start..rows.end / tile * tile;
            let sum = self.dram.with_rows_then(
                frame_at + whole.start * row,
                (whole.end - whole.start) * row,
                next_keys,
                dtype,
                |r| kernels::score_stored_tiles(r, d, queries, how, &mut s.floats, &mut s.scores),
            )?;
            if whole.end < rows.end {
                let lanes = (rows.end - whole.end) as usize;
                self.dram.with_rows(frame_at + whole.end * row, tile * row, dtype, |r| {
                    r.tiles_to_f32_rows(d, &mut s.floats);
                    s.floats.truncate(lanes * d);
                    kernels::score_rows(&s.floats, d, queries, how, &mut s.scores);
                })?;
            }
            (sum, whole.end * row)
        } else {
            let at = frame_at + rows.start * row;
            let len = (rows.end - rows.start) * row;
            let sum = self.dram.with_rows_then(at, len, next_keys, dtype, |r| {
                kernels::score_stored(r, d, queries, how, &mut s.floats, &mut s.scores)
            })?;
            (sum, rows.end * row)
        };
        let deferrable = known_sum.is_some() && summed_to.is_multiple_of(LINE_BYTES);
        let keys = ScannedKeys { frame: key_frame, page, rows, known_sum, summed_to };
        s.pending.push((keys, start..s.scores.len()));
        Ok(deferrable)
    }

    /// Verifies the keys of the pending pages and offers their good
    /// tokens' scores to the selection, page by page in order.
    fn verify_pending(&self, s: &mut TopkScratch, seq: &Sequence) -> Result<(), KvError> {
        let tpp = seq.shape.tokens_per_page();
        let mut pending = std::mem::take(&mut s.pending);
        for (keys, at) in pending.drain(..) {
            let (page, rows) = (keys.page, keys.rows.clone());
            let scores = &s.scores[at];
            let affected = s.media.tokens.len();
            self.verify_keys(seq, keys, &mut s.checks, &mut s.media)?;
            let first = page * tpp + rows.start;
            if s.media.tokens.len() == affected {
                s.stream.push_block(scores, first as u32);
                continue;
            }
            // Only the tokens whose keys are good compete.
            let mut bad: Vec<std::ops::Range<u64>> = s.media.tokens[affected..].to_vec();
            bad.sort_by_key(|r| r.start);
            let end = page * tpp + rows.end;
            let mut from = first;
            for r in bad.iter().chain(std::iter::once(&(end..end))) {
                if r.start > from {
                    let (a, b) = ((from - first) as usize, (r.start - first) as usize);
                    s.stream.push_block(&scores[a..b], from as u32);
                }
                from = from.max(r.end);
            }
        }
        s.pending = pending;
        s.scores.clear();
        Ok(())
    }

    /// Top-K over the pages [`PageSelection`] picks; exact over them. With a
    /// budget of at least the sequence's tokens it is the exact Top-K.
    pub fn top_k_selected(
        &self,
        scratch: &mut TopkScratch,
        query: TopkQuery<'_>,
        selection: PageSelection,
    ) -> Result<Selected, KvError> {
        let TopkQuery { seq: seq_id, layer, head, queries, how, k } = query;
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        let tokens = seq.tokens;
        if selection.budget_tokens >= tokens {
            let top = self.top_k_with(scratch, query)?;
            return Ok(Selected { top, tokens_scored: tokens });
        }
        let shape = seq.shape;
        let d = usize::from(shape.head_dim);
        check_topk(shape, queries, k)?;
        let tpp = shape.tokens_per_page();
        let pages = tokens.div_ceil(tpp);
        let page_tokens = |p: u64| tpp.min(tokens - p * tpp);
        let mut chosen = vec![false; pages as usize];
        let mut used = 0u64;
        let take = |p: u64, chosen: &mut [bool], used: &mut u64| {
            if !chosen[p as usize] && *used + page_tokens(p) <= selection.budget_tokens {
                chosen[p as usize] = true;
                *used += page_tokens(p);
            }
        };
        for p in 0..u64::from(selection.sink_pages).min(pages) {
            take(p, &mut chosen, &mut used);
        }
        for p in pages.saturating_sub(u64::from(selection.recent_pages))..pages {
            take(p, &mut chosen, &mut used);
        }
        // Upper bounds of the rest, best first (ties: lower page).
        let mut bounds: Vec<(f32, u64)> = Vec::new();
        for p in (0..pages).filter(|&p| !chosen[p as usize]) {
            let (mins, maxs) = self.page_bounds(seq_id, layer, head, p)?;
            let per_query = queries.chunks_exact(d).map(|q| {
                q.iter()
                    .zip(mins.iter().zip(&maxs))
                    .map(|(&qi, (&lo, &hi))| (qi * lo).max(qi * hi))
                    .sum::<f32>()
            });
            let bound = match how {
                Aggregation::Max => per_query.fold(f32::NEG_INFINITY, f32::max),
                Aggregation::Mean => per_query.sum::<f32>() / (queries.len() / d) as f32,
            };
            bounds.push((bound, p));
        }
        bounds.sort_by(|a, b| kernels::rank((a.0, a.1 as u32), (b.0, b.1 as u32)));
        for &(_, p) in &bounds {
            take(p, &mut chosen, &mut used);
        }
        let chosen_pages = (0..pages).filter(|&p| chosen[p as usize]);
        let top = self.scan_pages(scratch, seq, query, tokens, chosen_pages)?;
        let top = scratch.conclude(top)?;
        Ok(Selected { top, tokens_scored: used })
    }

    /// Before copying row `i` of a gather: asks for the K and V rows
    /// [`GATHER_PREFETCH_ROWS`] further on. A gather's rows lie scattered
    /// over DRAM, each a cache (and on small pages a TLB) miss; asking for
    /// the next ones while this one is copied overlaps the misses
    /// (docs/PERFORMANCE.md, "Kernel").
    pub fn prefetch_gather(&self, locations: &[RowLocation], i: usize, row_bytes: u64) {
        if let Some(next) = locations.get(i + GATHER_PREFETCH_ROWS) {
            // Keys in tiles are read by `read_keys`, eight interleaved.
            if next.key_is_row() {
                self.dram.prefetch(next.key, row_bytes);
            }
            self.dram.prefetch(next.value, row_bytes);
        }
    }

    /// The key at `at` as a row into `out` (row bytes long), gathered from
    /// its tile if it lies in one.
    pub fn read_key(&self, at: &RowLocation, out: &mut [u8]) -> Result<(), KvError> {
        self.read_keys(std::slice::from_ref(at), out.len(), out)
    }

    /// The keys at `locations` as rows, one after another, into `out`
    /// (`row_bytes` each). Keys in tiles are read eight at a time, their
    /// elements interleaved: each key's 64 lines are misses in different
    /// tiles, and eight streams keep more of them in flight than one
    /// (docs/PERFORMANCE.md, "Key tiles").
    pub fn read_keys(
        &self,
        locations: &[RowLocation],
        row_bytes: usize,
        out: &mut [u8],
    ) -> Result<(), KvError> {
        assert_eq!(out.len(), locations.len() * row_bytes, "a row per location");
        if locations.iter().all(RowLocation::key_is_row) {
            for (at, row) in locations.iter().zip(out.chunks_exact_mut(row_bytes.max(1))) {
                self.dram.read(at.key, row)?;
            }
            return Ok(());
        }
        // One view of every frame; each key's span is checked inside it.
        let frames = self.layout.frames_offset;
        let len = u64::from(self.layout.frame_count) * u64::from(KV_FRAME_SIZE);
        let mut starts = Vec::with_capacity(locations.len());
        for at in locations {
            let span = at.key_span(row_bytes as u64);
            match at.key.checked_sub(frames) {
                Some(start) if start + span <= len => starts.push(start as usize),
                _ => return Err(KvError::OutOfRange { offset: at.key, len: span }),
            }
        }
        let (stride, element) = match locations.first() {
            Some(at) => (at.key_stride as usize, at.element_bytes as usize),
            None => return Ok(()),
        };
        self.dram.with_rows(frames, len, Dtype::F16, |rows| {
            rows.copy_strided_many(&starts, stride, element, out);
        })
    }

    /// DRAM offsets of the K and V rows of `indices` in (seq, layer, head).
    pub fn row_locations(
        &self,
        seq_id: u32,
        layer: u16,
        head: u16,
        indices: &[u32],
    ) -> Result<Vec<RowLocation>, KvError> {
        let seq = self.sequence(seq_id)?;
        check_stream(seq, layer, head)?;
        let tpp = seq.shape.tokens_per_page();
        let row = seq.shape.row_bytes();
        let keys = seq.shape.key_layout();
        let key_stride = keys.element_offset(0, 1);
        indices
            .iter()
            .map(|&i| {
                let i = u64::from(i);
                if i >= seq.tokens {
                    return Err(KvError::TokenBeyond { index: i, tokens: seq.tokens });
                }
                let e = seq.entry(i / tpp, layer, head);
                Ok(RowLocation {
                    key: self.layout.frame_offset(e.key_frame.get())
                        + keys.element_offset(i % tpp, 0),
                    key_stride,
                    element_bytes: keys.element_bytes,
                    value: self.layout.frame_offset(e.value_frame.get()) + (i % tpp) * row,
                })
            })
            .collect()
    }
}

/// How far ahead of the row being copied a gather prefetches (a range of
/// distances measured alike: docs/PERFORMANCE.md, "Kernel").
pub const GATHER_PREFETCH_ROWS: usize = 8;

/// Checks a Top-K's queries (1..=max_group rows of head_dim) and k.
fn check_topk(shape: SequenceShape, queries: &[f32], k: u32) -> Result<(), KvError> {
    let d = usize::from(shape.head_dim);
    if queries.is_empty()
        || !queries.len().is_multiple_of(d)
        || queries.len() / d > LIMITS.max_group as usize
    {
        return Err(KvError::QueryShape {
            elements: queries.len(),
            max_group: LIMITS.max_group,
            head_dim: shape.head_dim,
        });
    }
    if k == 0 || k > LIMITS.max_k {
        return Err(KvError::OutOfLimit {
            limit: Limit::K,
            value: k.into(),
            min: 1,
            max: LIMITS.max_k.into(),
        });
    }
    Ok(())
}
