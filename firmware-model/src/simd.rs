//! The firmware crate's one unsafe module: scoring kernels for x86-64 with
//! AVX2, FMA and F16C, chosen at run time. Every entry point here checks the
//! CPU's features first and returns `false` when it cannot run, so callers
//! fall back to the portable kernel (`kernels::score_rows`), which stays the
//! reference the tests compare against.
#![allow(unsafe_code)]

use std::marker::PhantomData;

use crate::kernels::{Aggregation, aggregate};
use crate::limits::Dtype;

/// Stored rows of one block, in their storage type, read where they lie.
///
/// Device DRAM is shared with hosts that may write it at any time (a
/// misbehaving host can rewrite committed rows), so the kernels never form a
/// Rust reference into it: a `Rows` is a pointer, an element count and a
/// dtype, read with unaligned vector loads. A concurrent write can only make
/// the scores garbage; every element bit pattern is a valid number.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    ptr: *const u8,
    elements: usize,
    dtype: Dtype,
    /// The bytes the caller reads next (see [`Rows::followed_by`]): never
    /// read here, only prefetched; null if none.
    next: *const u8,
    next_len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> Rows<'a> {
    pub fn f32(values: &'a [f32]) -> Self {
        Self {
            ptr: values.as_ptr().cast(),
            elements: values.len(),
            dtype: Dtype::F32,
            next: std::ptr::null(),
            next_len: 0,
            _borrow: PhantomData,
        }
    }

    /// f16 or bf16 rows given as their bit patterns.
    pub fn halves(bits: &'a [u16], dtype: Dtype) -> Self {
        assert_ne!(dtype, Dtype::F32, "half-width rows need a 16-bit dtype");
        Self {
            ptr: bits.as_ptr().cast(),
            elements: bits.len(),
            dtype,
            next: std::ptr::null(),
            next_len: 0,
            _borrow: PhantomData,
        }
    }

    /// Little-endian stored bytes; a trailing partial element is ignored.
    pub fn from_bytes(bytes: &'a [u8], dtype: Dtype) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            elements: bytes.len() / dtype.size(),
            dtype,
            next: std::ptr::null(),
            next_len: 0,
            _borrow: PhantomData,
        }
    }

    /// Rows in memory that Rust does not own, such as a shared mapping.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` bytes for all of `'a`. Other
    /// processes may write those bytes meanwhile.
    pub unsafe fn from_raw(ptr: *const u8, len: usize, dtype: Dtype) -> Self {
        Self {
            ptr,
            elements: len / dtype.size(),
            dtype,
            next: std::ptr::null(),
            next_len: 0,
            _borrow: PhantomData,
        }
    }

    /// These rows, told that `next` is read after them (the next page's
    /// keys of a scan, which lie elsewhere in DRAM): a kernel that
    /// prefetches ahead of what it reads goes on into `next` near the end
    /// of these rows instead of past their end.
    pub fn followed_by(self, next: Rows<'a>) -> Self {
        Self { next: next.ptr, next_len: next.elements * next.dtype.size(), ..self }
    }

    pub fn len(&self) -> usize {
        self.elements
    }

    pub fn is_empty(&self) -> bool {
        self.elements == 0
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Every element as f32 (the portable kernel's input); `out` is refilled.
    pub fn to_f32(&self, out: &mut Vec<f32>) {
        out.clear();
        out.reserve(self.elements);
        for i in 0..self.elements {
            out.push(self.get(i));
        }
    }

    /// Element `i` as f32.
    fn get(&self, i: usize) -> f32 {
        assert!(i < self.elements);
        let at = self.ptr.wrapping_add(i * self.dtype.size());
        match self.dtype {
            Dtype::F32 => {
                // SAFETY: i < elements, so the 4 bytes at `at` are within the
                // readable range the constructor was given.
                f32::from_bits(u32::from_le(unsafe { at.cast::<u32>().read_unaligned() }))
            }
            Dtype::F16 => {
                // SAFETY: as above, 2 bytes.
                half::f16::from_bits(u16::from_le(unsafe { at.cast::<u16>().read_unaligned() }))
                    .to_f32()
            }
            Dtype::Bf16 => {
                // SAFETY: as above, 2 bytes.
                half::bf16::from_bits(u16::from_le(unsafe { at.cast::<u16>().read_unaligned() }))
                    .to_f32()
            }
        }
    }
}

// SAFETY: a `Rows` only reads, through a pointer its constructor vouched for
// over `'a`; sharing or sending that read-only view is as safe as `&[u8]`.
unsafe impl Send for Rows<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for Rows<'_> {}

/// What a vector scoring pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scored {
    /// Nothing: this CPU or shape has no vector kernel (use the portable one).
    No,
    /// Every row scored.
    Yes {
        /// The weighted word sum ([`crate::integrity::weighted_sum`]) of
        /// every byte scored, taken as the kernel read them (rows whose
        /// bytes are whole 64-byte lines, the first at a line start: their
        /// checks' sum less the salts), or None if the kernel did not.
        line_sum: Option<u32>,
    },
}

/// Scores every row of `rows` (`head_dim` elements each) against `queries`
/// (G rows), appending one aggregated score per row to `out`. Returns false
/// (and appends nothing) if this CPU lacks the features or the shape is not
/// one the vector kernel takes (head_dim a multiple of 8, G <= 8).
pub fn score_rows(
    rows: Rows<'_>,
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    out: &mut Vec<f32>,
) -> bool {
    score_rows_summed(rows, head_dim, queries, how, out) != Scored::No
}

/// [`score_rows`], and where the kernel can (AVX-512, rows of whole 64-byte
/// lines), the integrity sum of the bytes it read in the same pass: a scan
/// then verifies its keys without reading them again.
pub fn score_rows_summed(
    rows: Rows<'_>,
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    out: &mut Vec<f32>,
) -> Scored {
    #[cfg(target_arch = "x86_64")]
    {
        let group = queries.len() / head_dim.max(1);
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F, which the kernel is compiled for, was just
            // detected; it checks the shapes it supports itself.
            let fused = unsafe { x86::score_avx512(rows, head_dim, queries, group, how, out) };
            if let Some(sum) = fused {
                return Scored::Yes { line_sum: Some(sum) };
            }
        }
        if group == 1 && queries.len() == head_dim && std::arch::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: AVX-512F, which the kernel is compiled for, was just
            // detected; it checks the head_dim it supports itself.
            if unsafe { x86::score_one_avx512(rows, head_dim, queries, out) } {
                return Scored::Yes { line_sum: None };
            }
        }
        let fits = head_dim.is_multiple_of(8) && head_dim > 0 && (1..=8).contains(&group);
        if fits
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features `score` is compiled for were just detected
            // on this CPU, and the shape conditions it needs were checked.
            unsafe { x86::score(rows, head_dim, queries, group, how, out) };
            return Scored::Yes { line_sum: None };
        }
    }
    let _ = (rows, head_dim, queries, how, out);
    Scored::No
}

/// [`score_rows_summed`] for keys in tiles (`pnm_protocol::queue::KeyLayout`:
/// 16 tokens, dimension-major): `rows` holds whole tiles of `head_dim`,
/// and a score is appended per token, in token order. The AVX-512 kernel
/// takes whole-line tiles (head_dim a multiple of 4); else [`Scored::No`]
/// (de-tile with [`Rows::tiles_to_f32_rows`] and score rows).
pub fn score_tiles_summed(
    rows: Rows<'_>,
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    out: &mut Vec<f32>,
) -> Scored {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let group = queries.len() / head_dim.max(1);
        // SAFETY: AVX-512F, which the kernel is compiled for, was just
        // detected; it checks the shapes it supports itself.
        let fused = unsafe { x86::score_tiles_avx512(rows, head_dim, queries, group, how, out) };
        if let Some(sum) = fused {
            return Scored::Yes { line_sum: Some(sum) };
        }
    }
    let _ = (rows, head_dim, queries, how, out);
    Scored::No
}

impl Rows<'_> {
    /// Copies keys whose elements lie `stride` bytes apart (`element_bytes`
    /// each): key `i` starts at byte `starts[i]` and goes to row `i` of
    /// `out` (rows of equal length: `out.len() / starts.len()` bytes). Eight keys at a time, their
    /// elements interleaved, so eight keys' cache misses are in flight
    /// together.
    ///
    /// # Panics
    /// If a key's last element lies past the rows' bytes, or `out` is not
    /// a whole number of rows.
    pub fn copy_strided_many(
        &self,
        starts: &[usize],
        stride: usize,
        element_bytes: usize,
        out: &mut [u8],
    ) {
        if starts.is_empty() {
            return;
        }
        let row = out.len() / starts.len();
        assert_eq!(row * starts.len(), out.len(), "whole rows");
        let count = row / element_bytes.max(1);
        let bytes = self.elements * self.dtype.size();
        for &start in starts {
            assert!(count == 0 || start + (count - 1) * stride + element_bytes <= bytes);
        }
        match element_bytes {
            2 => self.copy_strided_many_as::<2>(starts, stride, out, row),
            4 => self.copy_strided_many_as::<4>(starts, stride, out, row),
            _ => {
                for (&start, row_out) in starts.iter().zip(out.chunks_exact_mut(row)) {
                    for (i, element) in row_out.chunks_exact_mut(element_bytes).enumerate() {
                        for (b, byte) in element.iter_mut().enumerate() {
                            // SAFETY: within the key's span, checked above.
                            *byte = unsafe { self.ptr.wrapping_add(start + i * stride + b).read() };
                        }
                    }
                }
            }
        }
    }

    /// [`Self::copy_strided_many`] of S-byte elements (spans checked by
    /// the caller).
    fn copy_strided_many_as<const S: usize>(
        &self,
        starts: &[usize],
        stride: usize,
        out: &mut [u8],
        row: usize,
    ) {
        const WAYS: usize = 8;
        let count = row / S;
        for (group, rows_out) in starts.chunks(WAYS).zip(out.chunks_mut(WAYS * row)) {
            for i in 0..count {
                for (k, &start) in group.iter().enumerate() {
                    let at = k * row + i * S;
                    // SAFETY: element i of a key whose span was checked
                    // against the rows' bytes by `copy_strided_many`.
                    let element = unsafe {
                        self.ptr.wrapping_add(start + i * stride).cast::<[u8; S]>().read_unaligned()
                    };
                    rows_out[at..at + S].copy_from_slice(&element);
                }
            }
        }
    }

    /// Tiles of `head_dim` (16 tokens each, dimension-major) as f32 rows,
    /// token after token; `out` is refilled. A trailing partial tile is
    /// ignored.
    pub fn tiles_to_f32_rows(&self, head_dim: usize, out: &mut Vec<f32>) {
        const TILE: usize = pnm_protocol::queue::KEY_TILE_TOKENS as usize;
        out.clear();
        let tile = TILE * head_dim;
        if tile == 0 {
            return;
        }
        let tiles = self.elements / tile;
        out.resize(tiles * tile, 0.0);
        for t in 0..tiles {
            for j in 0..head_dim {
                for lane in 0..TILE {
                    out[(t * TILE + lane) * head_dim + j] = self.get(t * tile + j * TILE + lane);
                }
            }
        }
    }
}

/// Appends the integrity check ([`crate::integrity`]) of every 64-byte line
/// of `rows`' bytes to `out`, the first being DRAM line `first_line`; a
/// trailing partial line is checked as zero-padded. AVX2 where the CPU has
/// it, else the reference [`crate::integrity::line_check`].
pub fn line_checks(rows: Rows<'_>, first_line: u64, out: &mut Vec<u32>) {
    let bytes = rows.elements * rows.dtype.size();
    let whole = bytes / 64;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2, which the function is compiled for, was just
        // detected; it reads only whole lines within `rows`' bytes.
        done = unsafe { x86::line_checks8(rows, whole, first_line, out) };
    }
    for line in done..whole {
        out.push(crate::integrity::line_check(&rows.line(line, 64), first_line + line as u64));
    }
    if !bytes.is_multiple_of(64) {
        let tail = rows.line(whole, bytes - 64 * whole);
        out.push(crate::integrity::line_check(&tail, first_line + whole as u64));
    }
}

/// Adds the weighted word sum ([`crate::integrity::weighted_sum`]) of
/// `rows`' bytes, which start at a line start, to `sum`: their lines'
/// checks summed, less the salts. AVX2 where the CPU has it.
pub fn line_sums(rows: Rows<'_>, sum: &mut u32) {
    let bytes = rows.elements * rows.dtype.size();
    let whole = bytes / 64;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2, which the function is compiled for, was just
        // detected; it reads only whole lines within `rows`' bytes.
        let (lines, s) = unsafe { x86::line_sums(rows, whole) };
        *sum = sum.wrapping_add(s);
        done = lines;
    }
    for line in done..whole {
        *sum = sum.wrapping_add(crate::integrity::weighted_sum(&rows.line(line, 64)));
    }
    if !bytes.is_multiple_of(64) {
        let tail = rows.line(whole, bytes - 64 * whole);
        *sum = sum.wrapping_add(crate::integrity::weighted_sum(&tail));
    }
}

impl Rows<'_> {
    /// `len` bytes of line `line`, copied out.
    fn line(&self, line: usize, len: usize) -> [u8; 64] {
        assert!(len <= 64 && line * 64 + len <= self.elements * self.dtype.size());
        let mut out = [0u8; 64];
        for (i, byte) in out[..len].iter_mut().enumerate() {
            // SAFETY: the byte is inside the readable range (asserted above).
            *byte = unsafe { self.ptr.wrapping_add(line * 64 + i).read() };
        }
        out
    }
}

/// The compute roofline of the scoring kernels on this core: f32 FMA
/// throughput in GFLOP/s, from `iterations` rounds of 16 independent FMA
/// chains in the widest vector set the kernels use here (AVX-512, else
/// AVX2 with FMA). Best of three runs. None where neither exists (the
/// portable kernel has no such bound).
pub fn fma_gflops(iterations: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        type Loop = fn(usize, (f32, f32, f32)) -> f32;
        let (run, lanes): (Loop, f64) = if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F, which the loop is compiled for, was just detected.
            (|n, c| unsafe { x86::fma_chains512(n, c) }, 16.0)
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA, which the loop is compiled for, were just detected.
            (|n, c| unsafe { x86::fma_chains256(n, c) }, 8.0)
        } else {
            return None;
        };
        let best = (0..3)
            .map(|_| {
                let start = std::time::Instant::now();
                let constants = std::hint::black_box((0.999_9, 1e-4, 1.0));
                std::hint::black_box(run(std::hint::black_box(iterations), constants));
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        return Some(iterations as f64 * 16.0 * lanes * 2.0 / best / 1e9);
    }
    #[allow(unreachable_code)]
    {
        let _ = iterations;
        None
    }
}

/// Asks the CPU to start loading `bytes` into its caches (a hint).
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// [`prefetch`] into L2 only (x86-64's T1 hint): a core has many more
/// misses to L2 outstanding than to L1, so a scan can ask for lines further
/// ahead this way without filling L1.
pub fn prefetch_to_l2(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }>(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// A prefetch with `HINT` of every line of `bytes`.
#[cfg(target_arch = "x86_64")]
fn prefetch_lines<const HINT: i32>(bytes: &[u8]) {
    for line in (0..bytes.len()).step_by(64) {
        // SAFETY: the address is inside `bytes`, and a prefetch never faults.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(bytes.as_ptr().wrapping_add(line).cast()) }
    }
}

/// Writes back and drops every cache line of `bytes` from every level of
/// the CPU's caches, so that the next read of them comes from memory
/// (x86-64 CLFLUSHOPT where the CPU has it, else CLFLUSH; elsewhere
/// nothing). Benchmarks time a scan as a decode
/// step finds its keys: last read a whole step before, and long evicted
/// since by every other layer's and head's, however large the last-level
/// cache of the machine they run on.
pub fn evict(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS_CLFLUSHOPT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let optimized = *HAS_CLFLUSHOPT.get_or_init(x86::has_clflushopt);
        for line in (0..bytes.len()).step_by(64) {
            let at = bytes.as_ptr().wrapping_add(line);
            if optimized {
                // SAFETY: the address is inside `bytes`, which is readable;
                // CLFLUSHOPT (detected) changes no memory contents.
                unsafe { x86::clflushopt(at) };
            } else {
                // SAFETY: as above; CLFLUSH is SSE2, part of x86-64.
                unsafe { std::arch::x86_64::_mm_clflush(at) };
            }
        }
        // SAFETY: a fence has no memory operands (SSE2, part of x86-64);
        // it orders the flushes before the reads that follow.
        unsafe { std::arch::x86_64::_mm_mfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// One bit per score that is >= `t` (bit i for `scores[i]`; a NaN never
/// is), for at most 32 scores: the Top-K filter's test, 8 lanes at a time.
pub fn at_least_mask(scores: &[f32], t: f32) -> u32 {
    assert!(scores.len() <= 32, "a mask holds 32 scores");
    #[cfg(target_arch = "x86_64")]
    if scores.len() == 32 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2, which the function is compiled for, was just
        // detected, and it takes exactly the 32 scores checked above.
        return unsafe { x86::at_least_mask32(scores, t) };
    }
    scores.iter().enumerate().fold(0u32, |m, (i, &s)| m | (u32::from(s >= t) << i))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Aggregation, Dtype, Rows, aggregate};

    /// Checks of lines `[0, lines)` of `rows`, eight at a time; returns
    /// how many it did (a multiple of 8), the caller doing the rest.
    #[target_feature(enable = "avx2")]
    pub(super) fn line_checks8(
        rows: Rows<'_>,
        lines: usize,
        first_line: u64,
        out: &mut Vec<u32>,
    ) -> usize {
        assert!(lines * 64 <= rows.elements * rows.dtype.size());
        let w = crate::integrity::WEIGHTS;
        // SAFETY: WEIGHTS holds 16 u32s: two 32-byte loads.
        let w0 = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
        // SAFETY: as above, the second half.
        let w1 = unsafe { _mm256_loadu_si256(w.as_ptr().wrapping_add(8).cast()) };
        let mut line = 0;
        while line + 8 <= lines {
            let mut acc = [_mm256_setzero_si256(); 8];
            for (j, a) in acc.iter_mut().enumerate() {
                let at = rows.ptr.wrapping_add((line + j) * 64);
                // SAFETY: line + j < lines, so its 64 bytes are readable.
                let v0 = unsafe { _mm256_loadu_si256(at.cast()) };
                // SAFETY: as above, the line's second 32 bytes.
                let v1 = unsafe { _mm256_loadu_si256(at.wrapping_add(32).cast()) };
                *a = _mm256_add_epi32(_mm256_mullo_epi32(v0, w0), _mm256_mullo_epi32(v1, w1));
            }
            // Sum each accumulator's 8 lanes: two rounds of pairwise adds
            // leave, per 128-bit half, one partial sum of each of four lines.
            let t0 = _mm256_hadd_epi32(acc[0], acc[1]);
            let t1 = _mm256_hadd_epi32(acc[2], acc[3]);
            let t2 = _mm256_hadd_epi32(acc[4], acc[5]);
            let t3 = _mm256_hadd_epi32(acc[6], acc[7]);
            let u0 = _mm256_hadd_epi32(t0, t1);
            let u1 = _mm256_hadd_epi32(t2, t3);
            let sums = _mm256_add_epi32(
                _mm256_permute2x128_si256::<0x20>(u0, u1),
                _mm256_permute2x128_si256::<0x31>(u0, u1),
            );
            let mut lanes = [0u32; 8];
            // SAFETY: `lanes` is 32 bytes.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
            for (j, sum) in lanes.into_iter().enumerate() {
                let n = first_line + (line + j) as u64;
                out.push(sum.wrapping_add(crate::integrity::line_salt(n)));
            }
            line += 8;
        }
        line
    }

    /// The weighted word sum of lines `[0, lines)` of `rows`; returns the
    /// lines it did (all) and the sum.
    #[target_feature(enable = "avx2")]
    pub(super) fn line_sums(rows: Rows<'_>, lines: usize) -> (usize, u32) {
        assert!(lines * 64 <= rows.elements * rows.dtype.size());
        let w = crate::integrity::WEIGHTS;
        // SAFETY: WEIGHTS holds 16 u32s: two 32-byte loads.
        let w0 = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
        // SAFETY: as above, the second half.
        let w1 = unsafe { _mm256_loadu_si256(w.as_ptr().wrapping_add(8).cast()) };
        // Two accumulators per weight half: independent add chains.
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut line = 0;
        while line + 2 <= lines {
            for (j, pair) in acc.chunks_exact_mut(2).enumerate() {
                let at = rows.ptr.wrapping_add((line + j) * 64);
                // SAFETY: line + j < lines: its 64 bytes are readable.
                let v0 = unsafe { _mm256_loadu_si256(at.cast()) };
                // SAFETY: as above, the line's second 32 bytes.
                let v1 = unsafe { _mm256_loadu_si256(at.wrapping_add(32).cast()) };
                pair[0] = _mm256_add_epi32(pair[0], _mm256_mullo_epi32(v0, w0));
                pair[1] = _mm256_add_epi32(pair[1], _mm256_mullo_epi32(v1, w1));
            }
            line += 2;
        }
        if line < lines {
            let at = rows.ptr.wrapping_add(line * 64);
            // SAFETY: line < lines.
            let v0 = unsafe { _mm256_loadu_si256(at.cast()) };
            // SAFETY: as above.
            let v1 = unsafe { _mm256_loadu_si256(at.wrapping_add(32).cast()) };
            acc[0] = _mm256_add_epi32(acc[0], _mm256_mullo_epi32(v0, w0));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_mullo_epi32(v1, w1));
            line += 1;
        }
        let all =
            _mm256_add_epi32(_mm256_add_epi32(acc[0], acc[1]), _mm256_add_epi32(acc[2], acc[3]));
        let mut lanes = [0u32; 8];
        // SAFETY: `lanes` is 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), all) };
        (line, lanes.iter().fold(0u32, |s, &l| s.wrapping_add(l)))
    }

    /// `scores.len() == 32` (checked by the caller).
    #[target_feature(enable = "avx2")]
    pub(super) fn at_least_mask32(scores: &[f32], t: f32) -> u32 {
        assert_eq!(scores.len(), 32);
        let t = _mm256_set1_ps(t);
        let mut mask = 0u32;
        for j in 0..4 {
            // SAFETY: 8 * j + 8 <= 32 == scores.len().
            let v = unsafe { _mm256_loadu_ps(scores.as_ptr().wrapping_add(8 * j)) };
            // Ordered: a NaN score compares false, as `s >= t` does.
            let ge = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(v, t)) as u32;
            mask |= ge << (8 * j);
        }
        mask
    }

    /// Eight elements of row storage from `at`, as f32 lanes.
    ///
    /// # Safety
    /// `at + 8` must not exceed the rows' length (the hot loop proves it
    /// once per row instead of a bounds check per load).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(rows: Rows<'_>, at: usize) -> __m256 {
        debug_assert!(at + 8 <= rows.elements);
        match rows.dtype {
            Dtype::F32 => {
                // SAFETY: in bounds by the caller's contract; unaligned load
                // through the pointer, no reference formed.
                unsafe { _mm256_loadu_ps(rows.ptr.wrapping_add(at * 4).cast()) }
            }
            Dtype::F16 => {
                // SAFETY: eight 2-byte elements in bounds by the contract.
                let h = unsafe { _mm_loadu_si128(rows.ptr.wrapping_add(at * 2).cast()) };
                _mm256_cvtph_ps(h)
            }
            Dtype::Bf16 => {
                // SAFETY: as for F16.
                let h = unsafe { _mm_loadu_si128(rows.ptr.wrapping_add(at * 2).cast()) };
                // bfloat16 is the top half of an f32.
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }

    /// Eight query elements from `at`.
    ///
    /// # Safety
    /// `at + 8 <= q.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_query(q: &[f32], at: usize) -> __m256 {
        debug_assert!(at + 8 <= q.len());
        // SAFETY: in bounds by the caller's contract.
        unsafe { _mm256_loadu_ps(q.as_ptr().wrapping_add(at)) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
    }

    /// Needs AVX2, FMA and F16C; `head_dim % 8 == 0`, `group` in 1..=8 and
    /// `queries.len() == group * head_dim` (the caller checked all four).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn score(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        group: usize,
        how: Aggregation,
        out: &mut Vec<f32>,
    ) {
        // The loads in the kernels stay in bounds: base + d <= n * d <= len
        // for the rows, g * d + d <= group * d == queries.len() for the
        // queries, and every offset advances in steps of 8 up to d.
        assert!(d.is_multiple_of(8) && queries.len() == group * d && (1..=8).contains(&group));
        out.reserve(rows.len() / d);
        // One instance per group size, so the accumulators stay in registers.
        match group {
            1 => score_one(rows, d, queries, out),
            2 => score_group::<2>(rows, d, queries, how, out),
            3 => score_group::<3>(rows, d, queries, how, out),
            4 => score_group::<4>(rows, d, queries, how, out),
            5 => score_group::<5>(rows, d, queries, how, out),
            6 => score_group::<6>(rows, d, queries, how, out),
            7 => score_group::<7>(rows, d, queries, how, out),
            _ => score_group::<8>(rows, d, queries, how, out),
        }
    }

    /// One query: four independent FMA chains hide the FMA latency.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn score_one(rows: Rows<'_>, d: usize, query: &[f32], out: &mut Vec<f32>) {
        for r in 0..rows.len() / d {
            let base = r * d;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= d {
                for (j, a) in acc.iter_mut().enumerate() {
                    let at = c + 8 * j;
                    // SAFETY: at + 8 <= c + 32 <= d (see `score`).
                    let k = unsafe { load8(rows, base + at) };
                    // SAFETY: as above, within the single query row.
                    let q = unsafe { load_query(query, at) };
                    *a = _mm256_fmadd_ps(k, q, *a);
                }
                c += 32;
            }
            while c < d {
                // SAFETY: c + 8 <= d (see `score`).
                let k = unsafe { load8(rows, base + c) };
                // SAFETY: as above.
                let q = unsafe { load_query(query, c) };
                acc[0] = _mm256_fmadd_ps(k, q, acc[0]);
                c += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            out.push(hsum(sum));
        }
    }

    /// A GQA group of G queries: each key block is loaded once and feeds G
    /// independent chains.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn score_group<const G: usize>(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        how: Aggregation,
        out: &mut Vec<f32>,
    ) {
        let mut per_query = [0f32; G];
        for r in 0..rows.len() / d {
            let base = r * d;
            let mut acc = [_mm256_setzero_ps(); G];
            let mut c = 0;
            while c < d {
                // SAFETY: c + 8 <= d (see `score`).
                let k = unsafe { load8(rows, base + c) };
                for (g, a) in acc.iter_mut().enumerate() {
                    // SAFETY: g < G == group, so g * d + c + 8 <= queries.len().
                    let q = unsafe { load_query(queries, g * d + c) };
                    *a = _mm256_fmadd_ps(k, q, *a);
                }
                c += 8;
            }
            for (p, a) in per_query.iter_mut().zip(&acc) {
                *p = hsum(*a);
            }
            out.push(aggregate(&per_query, how));
        }
    }

    /// Sixteen elements of row storage from `at`, as f32 lanes.
    ///
    /// # Safety
    /// `at + 16` must not exceed the rows' length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(rows: Rows<'_>, at: usize) -> __m512 {
        debug_assert!(at + 16 <= rows.elements);
        match rows.dtype {
            // SAFETY: sixteen 4-byte elements in bounds by the contract.
            Dtype::F32 => unsafe { _mm512_loadu_ps(rows.ptr.wrapping_add(at * 4).cast()) },
            Dtype::F16 => {
                // SAFETY: sixteen 2-byte elements in bounds by the contract.
                let h = unsafe { _mm256_loadu_si256(rows.ptr.wrapping_add(at * 2).cast()) };
                _mm512_cvtph_ps(h)
            }
            Dtype::Bf16 => {
                // SAFETY: as for F16.
                let h = unsafe { _mm256_loadu_si256(rows.ptr.wrapping_add(at * 2).cast()) };
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }

    /// One query on AVX-512: the whole query lives in registers, so a row
    /// costs only its own loads. Returns false for a head_dim it has no
    /// instance for (the AVX2 kernel takes those).
    #[target_feature(enable = "avx512f")]
    pub(super) fn score_one_avx512(
        rows: Rows<'_>,
        d: usize,
        query: &[f32],
        out: &mut Vec<f32>,
    ) -> bool {
        if query.len() != d {
            return false;
        }
        match d {
            64 => score_one_in_registers::<4>(rows, query, out),
            128 => score_one_in_registers::<8>(rows, query, out),
            192 => score_one_in_registers::<12>(rows, query, out),
            256 => score_one_in_registers::<16>(rows, query, out),
            _ => return false,
        }
        true
    }

    /// `query.len() == 16 * C` (checked by the caller's match).
    #[target_feature(enable = "avx512f")]
    fn score_one_in_registers<const C: usize>(rows: Rows<'_>, query: &[f32], out: &mut Vec<f32>) {
        let d = 16 * C;
        assert_eq!(query.len(), d);
        let mut q = [_mm512_setzero_ps(); C];
        for (j, v) in q.iter_mut().enumerate() {
            // SAFETY: 16 * j + 16 <= d == query.len().
            *v = unsafe { _mm512_loadu_ps(query.as_ptr().wrapping_add(16 * j)) };
        }
        out.reserve(rows.len() / d);
        for r in 0..rows.len() / d {
            let base = r * d;
            // Four chains hide the FMA latency.
            let mut acc = [_mm512_setzero_ps(); 4];
            for (j, qj) in q.iter().enumerate() {
                // SAFETY: base + 16 * j + 16 <= (r + 1) * d <= rows.len().
                let k = unsafe { load16(rows, base + 16 * j) };
                acc[j % 4] = _mm512_fmadd_ps(k, *qj, acc[j % 4]);
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            out.push(_mm512_reduce_add_ps(sum));
        }
    }

    /// Storage types as const parameters, so each kernel instance has its
    /// conversion inlined and no branch in the hot loop.
    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    /// The GQA scoring kernel on AVX-512, with the integrity sum fused in.
    /// Rows go in blocks of R (R x G <= 16 accumulators in registers): each
    /// 64-byte line of a key row is loaded once, weighed into the integrity
    /// sum as raw words, converted once, and feeds the G queries' FMAs;
    /// the block's R x G dot products are reduced together, 16 lanes at a
    /// time, by a transposing tree of adds (15 adds for 16 sums instead of a
    /// full horizontal reduction each). Returns the weighted word sum of
    /// every byte read, or None for a shape it does not take (rows not of
    /// whole lines, G outside 1..=8).
    #[target_feature(enable = "avx512f")]
    pub(super) fn score_avx512(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        group: usize,
        how: Aggregation,
        out: &mut Vec<f32>,
    ) -> Option<u32> {
        let per_line = 64 / rows.dtype.size();
        if d == 0
            || !d.is_multiple_of(per_line)
            || queries.len() != group * d
            || !(1..=8).contains(&group)
        {
            return None;
        }
        out.reserve(rows.len() / d);
        let mut sum = WordSums::new();
        macro_rules! run {
            ($t:expr) => {
                match group {
                    1 => blocks::<$t, 1, 16>(rows, d, queries, how, out, &mut sum),
                    2 => blocks::<$t, 2, 8>(rows, d, queries, how, out, &mut sum),
                    3 => blocks::<$t, 3, 5>(rows, d, queries, how, out, &mut sum),
                    4 => blocks::<$t, 4, 4>(rows, d, queries, how, out, &mut sum),
                    5 => blocks::<$t, 5, 3>(rows, d, queries, how, out, &mut sum),
                    6 => blocks::<$t, 6, 2>(rows, d, queries, how, out, &mut sum),
                    7 => blocks::<$t, 7, 2>(rows, d, queries, how, out, &mut sum),
                    _ => blocks::<$t, 8, 2>(rows, d, queries, how, out, &mut sum),
                }
            };
        }
        match rows.dtype {
            Dtype::F32 => run!(F32),
            Dtype::F16 => run!(F16),
            Dtype::Bf16 => run!(BF16),
        }
        Some(sum.weighted())
    }

    /// Per word position of a line (16 u32s), the sum over every line read:
    /// f32 rows' lines as one 512-bit vector, 16-bit rows' as two 256-bit
    /// halves (as they are loaded for conversion).
    #[derive(Clone, Copy)]
    struct WordSums {
        wide: __m512i,
        low: __m256i,
        high: __m256i,
    }

    impl WordSums {
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn new() -> Self {
            Self {
                wide: _mm512_setzero_si512(),
                low: _mm256_setzero_si256(),
                high: _mm256_setzero_si256(),
            }
        }

        /// The weighted word sum of every line added. The weighted sum is
        /// linear: the weights multiply the word sums once here instead of
        /// every line in the loop (mod 2^32 alike).
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn weighted(self) -> u32 {
            let weights = crate::integrity::WEIGHTS;
            // SAFETY: WEIGHTS holds 16 u32s, one 64-byte load.
            let w = unsafe { _mm512_loadu_si512(weights.as_ptr().cast()) };
            let words = _mm512_add_epi32(
                self.wide,
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(self.low), self.high),
            );
            _mm512_reduce_add_epi32(_mm512_mullo_epi32(words, w)) as u32
        }
    }

    /// One 64-byte line of a key row, as loaded: whole for f32 rows, in
    /// two halves for 16-bit ones (each converts to 16 f32 lanes without a
    /// shuffle).
    #[derive(Clone, Copy)]
    struct Line {
        wide: __m512i,
        halves: [__m256i; 2],
    }

    /// Loads the line at `at` and adds its words to `sum`.
    ///
    /// # Safety
    /// The 64 bytes at `at` must be readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_line<const T: u8>(at: *const u8, sum: &mut WordSums) -> Line {
        if T == F32 {
            // SAFETY: 64 readable bytes by the contract.
            let wide = unsafe { _mm512_loadu_si512(at.cast()) };
            sum.wide = _mm512_add_epi32(sum.wide, wide);
            Line { wide, halves: [_mm256_setzero_si256(); 2] }
        } else {
            // SAFETY: the first 32 of the 64 readable bytes.
            let low = unsafe { _mm256_loadu_si256(at.cast()) };
            // SAFETY: the last 32.
            let high = unsafe { _mm256_loadu_si256(at.wrapping_add(32).cast()) };
            sum.low = _mm256_add_epi32(sum.low, low);
            sum.high = _mm256_add_epi32(sum.high, high);
            Line { wide: _mm512_setzero_si512(), halves: [low, high] }
        }
    }

    /// Every row, R at a time, the last few one at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn blocks<const T: u8, const G: usize, const R: usize>(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        how: Aggregation,
        out: &mut Vec<f32>,
        sum: &mut WordSums,
    ) {
        let n = rows.len() / d;
        // A local copy: kept in registers (through the caller's reference
        // every line's add would go through memory, a store-to-load chain).
        let mut words = *sum;
        let mut r = 0;
        while r + R <= n {
            block::<T, G, R>(rows, r, d, queries, how, out, &mut words);
            r += R;
        }
        while r < n {
            block::<T, G, 1>(rows, r, d, queries, how, out, &mut words);
            r += 1;
        }
        *sum = words;
    }

    /// Rows `first..first + R`: scores appended to `out`, their bytes'
    /// weighted words added to `sum`. The caller checked `d` is a multiple
    /// of a line's elements and `queries.len() == G * d`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn block<const T: u8, const G: usize, const R: usize>(
        rows: Rows<'_>,
        first: usize,
        d: usize,
        queries: &[f32],
        how: Aggregation,
        out: &mut Vec<f32>,
        sum: &mut WordSums,
    ) {
        let size = if T == F32 { 4 } else { 2 };
        assert!((first + R) * d <= rows.len() && queries.len() == G * d);
        let q = queries.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        let halves = if T == F32 { 1 } else { 2 };
        if G <= 2 || T == F32 {
            // Few queries: bound by memory. Row by row, line by line, so the
            // loads walk memory in order.
            for (r, acc) in acc.iter_mut().enumerate() {
                let mut c = 0;
                while c < d {
                    let at = ((first + r) * d + c) * size;
                    // SAFETY: c + 64 / size <= d (d is a multiple of a
                    // line's elements), so the line lies within row
                    // first + r, within the rows (asserted above).
                    let line = unsafe { load_line::<T>(rows.ptr.wrapping_add(at), sum) };
                    for h in 0..halves {
                        let k = convert::<T>(line, h);
                        for (g, a) in acc.iter_mut().enumerate() {
                            // SAFETY: g * d + c + 16 * h + 16 <= G * d ==
                            // queries.len(): within query g's row.
                            let qv = unsafe { _mm512_loadu_ps(q.wrapping_add(g * d + c + 16 * h)) };
                            *a = _mm512_fmadd_ps(k, qv, *a);
                        }
                    }
                    c += 64 / size;
                }
            }
        } else {
            // A GQA group: bound by the FMAs. Line by line across the R
            // rows, the group's query slice held in registers, so each
            // query load feeds R rows and each key line is converted once
            // for G queries.
            let mut c = 0;
            while c < d {
                let mut lines =
                    [Line { wide: _mm512_setzero_si512(), halves: [_mm256_setzero_si256(); 2] }; R];
                for (r, line) in lines.iter_mut().enumerate() {
                    let at = ((first + r) * d + c) * size;
                    // SAFETY: as above, line c of row first + r.
                    *line = unsafe { load_line::<T>(rows.ptr.wrapping_add(at), sum) };
                }
                for h in 0..halves {
                    let mut qv = [_mm512_setzero_ps(); G];
                    for (g, qv) in qv.iter_mut().enumerate() {
                        // SAFETY: as above, within query g's row.
                        *qv = unsafe { _mm512_loadu_ps(q.wrapping_add(g * d + c + 16 * h)) };
                    }
                    for (acc, line) in acc.iter_mut().zip(&lines) {
                        let k = convert::<T>(*line, h);
                        for (a, qv) in acc.iter_mut().zip(&qv) {
                            *a = _mm512_fmadd_ps(k, *qv, *a);
                        }
                    }
                }
                c += 64 / size;
            }
        }
        if R == 1 {
            let mut sums = [0f32; G];
            for (s, a) in sums.iter_mut().zip(&acc[0]) {
                *s = _mm512_reduce_add_ps(*a);
            }
            out.push(if G == 1 { sums[0] } else { aggregate(&sums, how) });
            return;
        }
        let mut all = [_mm512_setzero_ps(); 16];
        for (slot, a) in all.iter_mut().zip(acc.iter().flatten()) {
            *slot = *a;
        }
        // Lane r * G + g: row r's score for query g.
        let sums = reduce16(all);
        let mut lanes = [0f32; 16];
        if G == 1 {
            // SAFETY: `lanes` is 64 bytes.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
            out.extend_from_slice(&lanes[..R]);
        } else if G.is_power_of_two() {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(sums, sums);
            let grouped = aggregate_groups::<G>(sums, nan, how);
            // SAFETY: `lanes` is 64 bytes.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), grouped) };
            let all_nan = (1u32 << G) - 1;
            for r in 0..R {
                let nans = (u32::from(nan) >> (r * G)) & all_nan;
                out.push(if nans == all_nan { f32::NAN } else { lanes[r * G] });
            }
        } else {
            // SAFETY: `lanes` is 64 bytes.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
            for r in 0..R {
                out.push(aggregate(&lanes[r * G..(r + 1) * G], how));
            }
        }
    }

    /// The GQA kernel for keys in tiles of 16 tokens, dimension-major: a
    /// vector load is one dimension of 16 tokens, so each query's FMA
    /// scores 16 tokens at once with the query element broadcast, and a
    /// tile ends with its 16 scores in lanes: no horizontal reduction at
    /// all. Each line is weighed into the integrity sum as it is loaded.
    /// Returns the weighted word sum of every byte read, or None for a
    /// shape it does not take (not whole tiles, head_dim not a multiple of
    /// 4, G outside 1..=8).
    #[target_feature(enable = "avx512f")]
    pub(super) fn score_tiles_avx512(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        group: usize,
        how: Aggregation,
        out: &mut Vec<f32>,
    ) -> Option<u32> {
        if d == 0
            || !d.is_multiple_of(4)
            || !rows.len().is_multiple_of(16 * d)
            || queries.len() != group * d
            || !(1..=8).contains(&group)
        {
            return None;
        }
        out.reserve(rows.len() / d);
        let mut sum = WordSums::new();
        macro_rules! run {
            ($t:expr) => {
                match group {
                    1 => tiles::<$t, 1>(rows, d, queries, how, out, &mut sum),
                    2 => tiles::<$t, 2>(rows, d, queries, how, out, &mut sum),
                    3 => tiles::<$t, 3>(rows, d, queries, how, out, &mut sum),
                    4 => tiles::<$t, 4>(rows, d, queries, how, out, &mut sum),
                    5 => tiles::<$t, 5>(rows, d, queries, how, out, &mut sum),
                    6 => tiles::<$t, 6>(rows, d, queries, how, out, &mut sum),
                    7 => tiles::<$t, 7>(rows, d, queries, how, out, &mut sum),
                    _ => tiles::<$t, 8>(rows, d, queries, how, out, &mut sum),
                }
            };
        }
        match rows.dtype {
            Dtype::F32 => run!(F32),
            Dtype::F16 => run!(F16),
            Dtype::Bf16 => run!(BF16),
        }
        Some(sum.weighted())
    }

    /// Every tile of `rows`. The caller checked whole tiles, `d % 4 == 0`
    /// and `queries.len() == G * d`. Four dimensions per step, spread over
    /// [`accumulator_sets`]`(G)` sets of G accumulators so that at least 8
    /// FMA chains are in flight whatever G is: a core with two 512-bit FMA
    /// ports of 4 cycles' latency needs 8 to stay busy (a Xeon's G 8 ran at
    /// half its FMA rate with one set).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn tiles<const T: u8, const G: usize>(
        rows: Rows<'_>,
        d: usize,
        queries: &[f32],
        how: Aggregation,
        out: &mut Vec<f32>,
        sum: &mut WordSums,
    ) {
        let size = if T == F32 { 4 } else { 2 };
        let tiles = rows.len() / (16 * d);
        assert!(tiles * 16 * d <= rows.len() && queries.len() == G * d && d.is_multiple_of(4));
        let q = queries.as_ptr();
        // The integrity sum in independent parts, one per line of a step
        // (f32: four; 16-bit: two), folded together at the end: one chain
        // of adds through every line would bound the loop (the sum is
        // modular per word, so any grouping gives the same result).
        let mut wide = [_mm512_setzero_si512(); 4];
        let tile_bytes = 16 * d * size;
        // Prefetch (where this CPU wants it) that many bytes ahead, in whole
        // tiles: the same line of the tile that far on as the one being
        // loaded, into L1 near and into L2 far.
        let distances = prefetch_distances();
        let to_l1 = distances.map(|d| d.to_l1.div_ceil(tile_bytes));
        let to_l2 = distances
            .filter(|_| 2 * G / size <= L2_PREFETCH_MAX_FLOPS_PER_BYTE)
            .map(|d| d.to_l2.div_ceil(tile_bytes));
        // Tile `t + ahead`, in these rows or the ones read next; null past
        // both.
        let next_tiles = rows.next_len / tile_bytes;
        let tile_ahead = |t: usize, ahead: Option<usize>| match ahead {
            Some(ahead) if t + ahead < tiles => rows.ptr.wrapping_add((t + ahead) * tile_bytes),
            Some(ahead) if t + ahead - tiles < next_tiles => {
                rows.next.wrapping_add((t + ahead - tiles) * tile_bytes)
            }
            _ => std::ptr::null(),
        };
        for t in 0..tiles {
            let base = rows.ptr.wrapping_add(t * tile_bytes);
            let (near, far) = (tile_ahead(t, to_l1), tile_ahead(t, to_l2));
            let mut acc = [[_mm512_setzero_ps(); G]; 4];
            let mut j = 0;
            while j < d {
                // Dimensions j..j + 4 are 4 * 16 * size bytes, one or two
                // lines from `j * 16 * size`; a prefetch never faults,
                // wherever it points.
                if !near.is_null() {
                    for line in (0..4 * 16 * size).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(near.wrapping_add(j * 16 * size + line).cast());
                    }
                }
                if !far.is_null() {
                    for line in (0..4 * 16 * size).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T1>(far.wrapping_add(j * 16 * size + line).cast());
                    }
                }
                // Dimensions j..j + 4: four 16-lane vectors (two lines of
                // 16-bit keys, four of f32).
                let mut k = [_mm512_setzero_ps(); 4];
                if T == F32 {
                    for (i, k) in k.iter_mut().enumerate() {
                        // SAFETY: j + i < d, so the 64 bytes of dimension
                        // j + i of tile t lie within the whole tiles.
                        let raw =
                            unsafe { _mm512_loadu_si512(base.wrapping_add((j + i) * 64).cast()) };
                        wide[i] = _mm512_add_epi32(wide[i], raw);
                        *k = _mm512_castsi512_ps(raw);
                    }
                } else {
                    // Each line whole into the sum (one add), and its two
                    // halves converted straight from memory: the line is
                    // in L1 by then, and a conversion from a register would
                    // cost a shuffle uop on the FMA ports besides.
                    for pair in 0..2 {
                        let at = base.wrapping_add((j + 2 * pair) * 32);
                        // SAFETY: dimensions j + 2 pair and j + 2 pair + 1
                        // (< d) of tile t: 64 bytes within the whole tiles.
                        let raw = unsafe { _mm512_loadu_si512(at.cast()) };
                        wide[pair] = _mm512_add_epi32(wide[pair], raw);
                        // SAFETY: the two 32-byte halves of those 64 bytes.
                        k[2 * pair] = unsafe { convert_at::<T>(at) };
                        // SAFETY: as above.
                        k[2 * pair + 1] = unsafe { convert_at::<T>(at.wrapping_add(32)) };
                    }
                }
                for (i, k) in k.iter().enumerate() {
                    let set = i % accumulator_sets(G);
                    for (g, a) in acc[set].iter_mut().enumerate() {
                        // SAFETY: g * d + j + i < G * d == queries.len().
                        let qv = _mm512_set1_ps(unsafe { *q.wrapping_add(g * d + j + i) });
                        *a = _mm512_fmadd_ps(*k, qv, *a);
                    }
                }
                j += 4;
            }
            let mut dots = acc[0];
            for (g, dot) in dots.iter_mut().enumerate() {
                *dot = if accumulator_sets(G) == 4 {
                    let pairs =
                        [_mm512_add_ps(acc[0][g], acc[1][g]), _mm512_add_ps(acc[2][g], acc[3][g])];
                    _mm512_add_ps(pairs[0], pairs[1])
                } else {
                    _mm512_add_ps(acc[0][g], acc[1][g])
                };
            }
            let scores = aggregate_lanes(&dots, how);
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` is 64 bytes.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), scores) };
            out.extend_from_slice(&lanes);
        }
        let wide = [_mm512_add_epi32(wide[0], wide[1]), _mm512_add_epi32(wide[2], wide[3])];
        sum.wide = _mm512_add_epi32(sum.wide, _mm512_add_epi32(wide[0], wide[1]));
    }

    /// The 16 elements of 16-bit type T at `at` as f32 lanes, converted as
    /// they are loaded. f16 takes `vcvtph2ps` with a memory operand, in
    /// assembly: the intrinsic's form suppresses exceptions, which only the
    /// register form encodes, so the compiler would load the half and
    /// convert it with a second uop on an FMA port (measured in L2 at f16
    /// G 8: 112 -> 120 GFLOP/s with the line summed whole as well).
    ///
    /// # Safety
    /// The 32 bytes at `at` must be readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn convert_at<const T: u8>(at: *const u8) -> __m512 {
        if T == F16 {
            let lanes: __m512;
            // SAFETY: reads the 32 bytes at `at`, readable by the contract,
            // and writes only the output register; f16 to f32 is exact,
            // so the rounding and exception state it runs under do not
            // matter.
            unsafe {
                std::arch::asm!(
                    "vcvtph2ps {lanes}, ymmword ptr [{at}]",
                    lanes = lateout(zmm_reg) lanes,
                    at = in(reg) at,
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
            lanes
        } else {
            // SAFETY: 32 readable bytes by the contract.
            let half = unsafe { _mm256_loadu_si256(at.cast()) };
            // bfloat16 is the top half of an f32.
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        }
    }

    /// Accumulator sets of the tile kernel for G queries: 4 up to G = 4
    /// (4 to 16 chains), 2 above (10 to 16), within the 32 vector registers
    /// beside the 4 key vectors.
    const fn accumulator_sets(group: usize) -> usize {
        if group <= 4 { 4 } else { 2 }
    }

    /// How far ahead of its loads the tile kernel prefetches on this CPU,
    /// if at all (docs/PERFORMANCE.md, "Prefetching ahead"). On Intel, 4
    /// KiB into L1 and 16 KiB into L2: there the hardware prefetchers alone
    /// kept too few lines in flight (a virtualised Xeon scanned cold keys
    /// at 1.5-2.4x the memory roofline time without prefetching, 1.1-1.5x
    /// with L1's alone; L2's many more outstanding misses took f16 G 1 from
    /// 12 to 14 GB/s and f32 G 8 from 10.4 to 11.3). Elsewhere none: on Zen
    /// 4 every distance from 1 to 8 KiB was slower (G 1 1.5-1.8x the
    /// roofline against 1.2-1.3x), its hardware prefetchers keeping up with
    /// the sequential scan on their own.
    fn prefetch_distances() -> Option<PrefetchDistances> {
        static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let intel = *INTEL.get_or_init(|| {
            let vendor = __cpuid(0);
            [vendor.ebx, vendor.edx, vendor.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
        });
        intel.then_some(PrefetchDistances { to_l1: 4096, to_l2: 16384 })
    }

    /// The tile kernel prefetches into L2 as well only where it does at
    /// most this many FLOPs per key byte (2 G / element size): below it the
    /// scan waits on memory and more misses in flight help (f16 G 1, f32 G
    /// 8); above it (16-bit keys at G 8) the loop is as much compute as
    /// memory, and the extra prefetches measured 5-10% slower.
    const L2_PREFETCH_MAX_FLOPS_PER_BYTE: usize = 4;

    /// Bytes ahead of its loads a scan prefetches into each cache level.
    #[derive(Clone, Copy)]
    struct PrefetchDistances {
        to_l1: usize,
        to_l2: usize,
    }

    /// Per lane, the G queries' dot products aggregated as [`aggregate`]
    /// does: NaNs left out, NaN only if all are; the mean sums in query
    /// order, as the portable kernel does.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn aggregate_lanes(dots: &[__m512], how: Aggregation) -> __m512 {
        if dots.len() == 1 {
            return dots[0];
        }
        let mut all_nan: __mmask16 = 0xFFFF;
        let mut acc = match how {
            Aggregation::Max => _mm512_set1_ps(f32::NEG_INFINITY),
            Aggregation::Mean => _mm512_setzero_ps(),
        };
        let mut count = _mm512_setzero_ps();
        for &v in dots {
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            all_nan &= nan;
            match how {
                Aggregation::Max => acc = _mm512_mask_max_ps(acc, !nan, acc, v),
                Aggregation::Mean => {
                    acc = _mm512_mask_add_ps(acc, !nan, acc, v);
                    count = _mm512_mask_add_ps(count, !nan, count, _mm512_set1_ps(1.0));
                }
            }
        }
        if how == Aggregation::Mean {
            acc = _mm512_div_ps(acc, count);
        }
        _mm512_mask_mov_ps(acc, all_nan, _mm512_set1_ps(f32::NAN))
    }

    /// Elements `16 h .. 16 h + 16` of a line's raw bytes as f32 lanes
    /// (`h` is 0 for f32 rows, 0 or 1 for 16-bit ones).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn convert<const T: u8>(line: Line, h: usize) -> __m512 {
        if T == F32 {
            return _mm512_castsi512_ps(line.wide);
        }
        let half = line.halves[h];
        if T == F16 {
            _mm512_cvtph_ps(half)
        } else {
            // bfloat16 is the top half of an f32.
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        }
    }

    /// Each group of G consecutive lanes (G = 2, 4 or 8) of `v` aggregated
    /// as [`aggregate`] does, NaN lanes (`nan`) left out; the group's result
    /// lands in its first lane. (A group of NaNs only is the caller's to
    /// answer: NaN.) Max is exact; Mean sums in a different order than the
    /// portable kernel.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn aggregate_groups<const G: usize>(v: __m512, nan: __mmask16, how: Aggregation) -> __m512 {
        let swap32 = |x: __m512| _mm512_permute_ps::<0b10_11_00_01>(x);
        let swap64 = |x: __m512| _mm512_permute_ps::<0b01_00_11_10>(x);
        let swap128 = |x: __m512| _mm512_shuffle_f32x4::<0b10_11_00_01>(x, x);
        match how {
            Aggregation::Max => {
                let mut m = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(f32::NEG_INFINITY));
                m = _mm512_max_ps(m, swap32(m));
                if G >= 4 {
                    m = _mm512_max_ps(m, swap64(m));
                }
                if G >= 8 {
                    m = _mm512_max_ps(m, swap128(m));
                }
                m
            }
            Aggregation::Mean => {
                let mut s = _mm512_mask_mov_ps(v, nan, _mm512_setzero_ps());
                let mut n = _mm512_mask_mov_ps(_mm512_set1_ps(1.0), nan, _mm512_setzero_ps());
                for step in [swap32, swap64, swap128].into_iter().take(G.trailing_zeros() as usize)
                {
                    s = _mm512_add_ps(s, step(s));
                    n = _mm512_add_ps(n, step(n));
                }
                _mm512_div_ps(s, n)
            }
        }
    }

    /// The sums of 16 vectors, lane i holding the sum of `v[i]`'s lanes:
    /// pairs are interleaved and added within 128-bit lanes (32-bit, then
    /// 64-bit interleaves), then across them (128-bit shuffles), halving
    /// the vector count at each of four levels.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce16(v: [__m512; 16]) -> __m512 {
        let mut b = [_mm512_setzero_ps(); 8];
        for (j, b) in b.iter_mut().enumerate() {
            let (x, y) = (v[2 * j], v[2 * j + 1]);
            *b = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
        }
        let mut c = [_mm512_setzero_ps(); 4];
        for (m, c) in c.iter_mut().enumerate() {
            let (x, y) = (_mm512_castps_pd(b[2 * m]), _mm512_castps_pd(b[2 * m + 1]));
            *c = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            );
        }
        let across = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        let d0 = across(c[0], c[1]);
        let d1 = across(c[2], c[3]);
        across(d0, d1)
    }

    /// Whether this CPU has CLFLUSHOPT (CPUID leaf 7, EBX bit 23): unlike
    /// CLFLUSH, whose flushes are ordered one after another (about 200 ns a
    /// line on a virtualised Xeon), many flush at once.
    pub(super) fn has_clflushopt() -> bool {
        // Leaf 7 is asked only where the maximum leaf (leaf 0) reaches it.
        __get_cpuid_max(0).0 >= 7 && __cpuid_count(7, 0).ebx & (1 << 23) != 0
    }

    /// Flushes the cache line holding `at` (CLFLUSHOPT).
    ///
    /// # Safety
    /// The CPU must have CLFLUSHOPT ([`has_clflushopt`]) and `at` must be
    /// readable.
    #[inline]
    pub(super) unsafe fn clflushopt(at: *const u8) {
        // SAFETY: by the contract; a flush changes no memory contents.
        unsafe {
            std::arch::asm!("clflushopt [{0}]", in(reg) at, options(nostack, preserves_flags))
        };
    }

    /// 16 independent FMA chains (more than FMA latency x throughput, so
    /// the units never wait), `n` rounds of `x = x * a + b` from `start`;
    /// returns a value the caller keeps. The constants come from the caller
    /// through `black_box`: a loop of known constants that reaches a fixed
    /// point is folded away by the compiler.
    #[target_feature(enable = "avx512f")]
    pub(super) fn fma_chains512(n: usize, (a, b, start): (f32, f32, f32)) -> f32 {
        let (a, b) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
        let mut acc = [_mm512_set1_ps(start); 16];
        for _ in 0..n {
            for x in &mut acc {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(sum)
    }

    /// [`fma_chains512`] on 256-bit vectors.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn fma_chains256(n: usize, (a, b, start): (f32, f32, f32)) -> f32 {
        let (a, b) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let mut acc = [_mm256_set1_ps(start); 16];
        for _ in 0..n {
            for x in &mut acc {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 32 bytes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
}
