//! Scoring and Top-K selection: what the device computes next to its DRAM.
//!
//! Scores are `q . k` accumulated in f32. The order of results is total and
//! deterministic:
//! - higher score first;
//! - equal scores: lower token index first;
//! - NaN ranks below every number (including -inf), so a NaN key never
//!   displaces a real one; NaNs among themselves are ordered by index.
//!
//! For a GQA group of G queries the token's score is an aggregate of its G
//! scores ([`Aggregation`]), ignoring NaNs unless all G are NaN.

use crate::limits::Dtype;

pub use pnm_protocol::queue::Aggregation;

/// Converts `count` elements of `dtype` (little-endian bytes) to f32.
///
/// `out` is cleared and refilled. `bytes` must hold exactly
/// `out_len * dtype.size()` bytes.
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    debug_assert_eq!(bytes.len() % dtype.size(), 0);
    out.clear();
    match dtype {
        Dtype::F32 => {
            out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        }
        Dtype::F16 => {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            );
        }
        Dtype::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
    }
}

#[cfg(target_endian = "big")]
compile_error!("the KV store reads little-endian rows straight into typed buffers");

/// Reusable buffers that turn a block of stored rows into f32, reading the
/// rows straight into typed memory (no per-element byte shuffling).
#[derive(Debug, Default)]
pub struct RowBlock {
    halves: Vec<u16>,
    floats: Vec<f32>,
}

impl RowBlock {
    /// Reads `count` elements of `dtype` through `fill` (which copies the
    /// stored little-endian bytes into the slice it is given) and returns
    /// them as f32.
    pub fn load<E>(
        &mut self,
        dtype: Dtype,
        count: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<&[f32], E> {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        use zerocopy::IntoBytes;
        self.floats.resize(count, 0.0);
        match dtype {
            Dtype::F32 => fill(self.floats.as_mut_bytes())?,
            Dtype::F16 | Dtype::Bf16 => {
                self.halves.resize(count, 0);
                fill(self.halves.as_mut_bytes())?;
                // `half` converts whole slices with F16C where the CPU has it.
                if dtype == Dtype::F16 {
                    self.halves
                        .reinterpret_cast::<half::f16>()
                        .convert_to_f32_slice(&mut self.floats);
                } else {
                    self.halves
                        .reinterpret_cast::<half::bf16>()
                        .convert_to_f32_slice(&mut self.floats);
                }
            }
        }
        Ok(&self.floats)
    }
}

/// Scores stored rows: the SIMD kernel where the CPU has it, else the
/// portable one. `scratch` holds the f32 rows of the portable path. Returns
/// the rows' integrity sum if the kernel took it as it read them
/// ([`crate::simd::Scored`]).
pub fn score_stored(
    rows: crate::simd::Rows<'_>,
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    scratch: &mut Vec<f32>,
    out: &mut Vec<f32>,
) -> Option<u32> {
    match crate::simd::score_rows_summed(rows, head_dim, queries, how, out) {
        crate::simd::Scored::Yes { line_sum } => line_sum,
        crate::simd::Scored::No => {
            rows.to_f32(scratch);
            score_rows(scratch, head_dim, queries, how, out);
            None
        }
    }
}

/// [`score_stored`] for keys in tiles (16 tokens, dimension-major; whole
/// tiles of `head_dim` in `rows`): the AVX-512 tile kernel where the CPU has
/// it, else the tiles turned into f32 rows (in `scratch`) and scored as rows.
pub fn score_stored_tiles(
    rows: crate::simd::Rows<'_>,
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    scratch: &mut Vec<f32>,
    out: &mut Vec<f32>,
) -> Option<u32> {
    match crate::simd::score_tiles_summed(rows, head_dim, queries, how, out) {
        crate::simd::Scored::Yes { line_sum } => line_sum,
        crate::simd::Scored::No => {
            rows.tiles_to_f32_rows(head_dim, scratch);
            let floats = crate::simd::Rows::f32(scratch);
            if !crate::simd::score_rows(floats, head_dim, queries, how, out) {
                score_rows(scratch, head_dim, queries, how, out);
            }
            None
        }
    }
}

/// Dot product accumulated in f32, in eight independent lanes so the
/// compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            lanes[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    let pairs =
        [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]) + tail
}

/// Aggregates one token's group scores.
#[inline]
pub fn aggregate(scores: &[f32], how: Aggregation) -> f32 {
    let mut best = f32::NAN;
    let mut sum = 0f32;
    let mut count = 0u32;
    for &s in scores {
        if s.is_nan() {
            continue;
        }
        best = if best.is_nan() { s } else { best.max(s) };
        sum += s;
        count += 1;
    }
    match how {
        _ if count == 0 => f32::NAN,
        Aggregation::Max => best,
        Aggregation::Mean => sum / count as f32,
    }
}

/// Scores `keys` (f32 rows of `head_dim`) against `queries` (G rows of
/// `head_dim`), appending one aggregated score per key row to `out`.
pub fn score_rows(
    keys: &[f32],
    head_dim: usize,
    queries: &[f32],
    how: Aggregation,
    out: &mut Vec<f32>,
) {
    let group = queries.len() / head_dim;
    let mut per_query = [0f32; 64];
    for key in keys.chunks_exact(head_dim) {
        for (g, q) in queries.chunks_exact(head_dim).enumerate() {
            per_query[g] = dot(q, key);
        }
        out.push(aggregate(&per_query[..group], how));
    }
}

/// The ranking order (the protocol's: higher score first, NaN last, lower
/// index on ties).
pub use pnm_protocol::queue::rank;

/// One selected token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub index: u32,
    pub score: f32,
}

/// The `k` best of `scores` (index = position), best first, by [`rank`].
/// Returns `min(k, scores.len())` entries.
pub fn top_k(scores: &[f32], k: usize) -> Vec<Scored> {
    let mut all: Vec<(f32, u32)> = scores.iter().enumerate().map(|(i, &s)| (s, i as u32)).collect();
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, |&a, &b| rank(a, b));
        all.truncate(k);
    }
    all.sort_unstable_by(|&a, &b| rank(a, b));
    all.into_iter().map(|(score, index)| Scored { index, score }).collect()
}

/// A token's place in the ranking as one integer: ascending keys are
/// [`rank`] order (higher score first, NaN last, then lower index), so
/// selection and sorting compare integers instead of floats.
///
/// The key keeps the score: [`key_score`] gives it back, with -0.0 as 0.0
/// and every NaN as the canonical NaN (the two cases `rank` cannot tell
/// apart either).
#[inline]
pub fn rank_key(score: f32, index: u32) -> u64 {
    // Order-preserving f32 -> u32 map, 0 for NaN; inverted so best is least.
    let ordered = if score.is_nan() {
        0
    } else {
        let bits = (score + 0.0).to_bits(); // -0.0 + 0.0 == +0.0
        if bits >> 31 == 1 { !bits } else { bits | 1 << 31 }
    };
    (u64::from(!ordered) << 32) | u64::from(index)
}

/// The score a [`rank_key`] was made from.
#[inline]
pub fn key_score(key: u64) -> f32 {
    let ordered = !((key >> 32) as u32);
    match ordered {
        0 => f32::NAN,
        o if o >> 31 == 1 => f32::from_bits(o & !(1 << 31)),
        o => f32::from_bits(!o),
    }
}

/// Exact Top-K over scores that arrive block by block, in O(k) memory: a
/// score is kept only if it ranks above the k-th best seen so far.
#[derive(Debug, Default)]
pub struct TopKStream {
    k: usize,
    /// Rank keys of every token that beat the threshold when seen.
    candidates: Vec<u64>,
    /// Rank key of the k-th best kept so far, once k are known.
    threshold: Option<u64>,
}

/// Scores compared with the threshold into one bit mask (at most 32, the
/// mask's width); only set bits are looked at one by one.
const FILTER_CHUNK: usize = 32;

impl TopKStream {
    /// Starts a selection of `k`, reusing this stream's buffer.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.candidates.clear();
        self.threshold = None;
    }

    /// Adds `scores`, whose token indices start at `first`.
    pub fn push_block(&mut self, scores: &[f32], first: u32) {
        if self.k == 0 {
            return;
        }
        let threshold = self.threshold.map(|key| (key, key_score(key)));
        match threshold {
            // The hot case: once a real threshold is known, most chunks hold
            // no score >= it (NaNs never are) and are skipped whole.
            Some((threshold, t)) if !t.is_nan() => {
                for (c, chunk) in scores.chunks(FILTER_CHUNK).enumerate() {
                    // One bit per score >= t (vector compares and mask
                    // moves), then only the set bits are looked at.
                    let mut passed = crate::simd::at_least_mask(chunk, t);
                    let base = first + (c * FILTER_CHUNK) as u32;
                    while passed != 0 {
                        let i = passed.trailing_zeros();
                        passed &= passed - 1;
                        let key = rank_key(chunk[i as usize], base + i);
                        if key < threshold {
                            self.candidates.push(key);
                        }
                    }
                }
            }
            threshold => {
                for (i, &s) in scores.iter().enumerate() {
                    let key = rank_key(s, first + i as u32);
                    if threshold.is_none_or(|(t, _)| key < t) {
                        self.candidates.push(key);
                    }
                }
            }
        }
        // Shrinking often keeps the threshold close to the true k-th best,
        // so fewer scores pass it (docs/PERFORMANCE.md, "Kernel").
        if self.candidates.len() >= self.k + self.k / 2 + 256 {
            self.shrink();
        }
    }

    /// Keeps the best k and raises the threshold to the k-th of them.
    fn shrink(&mut self) {
        let k = self.k;
        if self.candidates.len() > k {
            // The k-th best lands at k - 1 with the better ones before it.
            let kth = *self.candidates.select_nth_unstable(k - 1).1;
            self.candidates.truncate(k);
            self.threshold = Some(kth);
        } else if self.candidates.len() == k {
            self.threshold = self.candidates.iter().copied().max();
        }
    }

    /// The best `min(k, scores seen)`, best first.
    pub fn finish(&mut self) -> Vec<Scored> {
        self.shrink();
        self.candidates.sort_unstable();
        self.candidates
            .iter()
            .map(|&key| Scored { index: key as u32, score: key_score(key) })
            .collect()
    }
}

/// Merges per-part Top-K lists (each already ranked, indices global) into
/// the overall Top-K; exact because each part kept its own best `k`.
pub fn merge_top_k(parts: &[Vec<Scored>], k: usize) -> Vec<Scored> {
    let mut all: Vec<u64> = parts.iter().flatten().map(|s| rank_key(s.score, s.index)).collect();
    if all.len() > k && k > 0 {
        all.select_nth_unstable(k - 1);
    }
    all.truncate(k);
    all.sort_unstable();
    all.into_iter().map(|key| Scored { index: key as u32, score: key_score(key) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive reference: full sort of every (score, index), by the
    /// documented order.
    fn naive_top_k(scores: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> =
            scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
        v.sort_by(|a, b| {
            let key = |s: f32| if s.is_nan() { f64::NEG_INFINITY } else { f64::from(s) };
            // NaN strictly below -inf: compare NaN-ness first.
            a.1.is_nan()
                .cmp(&b.1.is_nan())
                .then(key(b.1).partial_cmp(&key(a.1)).unwrap())
                .then(a.0.cmp(&b.0))
        });
        v.truncate(k);
        v
    }

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum()
    }

    #[test]
    fn ties_break_by_lower_index_and_nan_ranks_last() {
        let scores = [1.0, f32::NAN, 3.0, 3.0, f32::NEG_INFINITY, 1.0, f32::NAN];
        let got: Vec<u32> = top_k(&scores, 7).iter().map(|s| s.index).collect();
        assert_eq!(got, [2, 3, 0, 5, 4, 1, 6]);
        assert_eq!(top_k(&scores, 2).iter().map(|s| s.index).collect::<Vec<_>>(), [2, 3]);
        assert!(top_k(&scores, 0).is_empty());
        assert_eq!(top_k(&[], 5), []);
    }

    #[test]
    fn aggregation_ignores_nan_unless_all_are() {
        assert_eq!(aggregate(&[1.0, f32::NAN, 3.0], Aggregation::Max), 3.0);
        assert_eq!(aggregate(&[1.0, f32::NAN, 3.0], Aggregation::Mean), 2.0);
        assert!(aggregate(&[f32::NAN, f32::NAN], Aggregation::Max).is_nan());
        assert_eq!(aggregate(&[f32::NEG_INFINITY, -1.0], Aggregation::Max), -1.0);
    }

    #[test]
    fn row_blocks_convert_like_to_f32() {
        let values = [0.0f32, -1.5, 65504.0, 1e-3, f32::INFINITY, 3.25];
        for dtype in Dtype::ALL {
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => {
                    values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()
                }
                Dtype::Bf16 => {
                    values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()
                }
            };
            let mut want = Vec::new();
            to_f32(dtype, &bytes, &mut want);
            let mut block = RowBlock::default();
            let got = block
                .load(dtype, values.len(), |out: &mut [u8]| -> Result<(), ()> {
                    out.copy_from_slice(&bytes);
                    Ok(())
                })
                .unwrap();
            assert_eq!(got, want.as_slice(), "{dtype:?}");
        }
    }

    /// Values in [-1, 1), one per call, from `seed` (xorshift).
    fn unit_stream(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// `values` stored as `dtype`: little-endian bytes, rounded to nearest.
    fn stored_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for &v in values {
            match dtype {
                Dtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                Dtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                Dtype::Bf16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        bytes
    }

    proptest! {
        #[test]
        fn simd_scores_match_the_portable_kernel(
            dtype_i in 0usize..3,
            d8 in 1usize..=32,
            group in 1usize..=8,
            rows in 1usize..40,
            seed in any::<u64>(),
        ) {
            let dtype = Dtype::ALL[dtype_i];
            let d = d8 * 8;
            let mut next = unit_stream(seed);
            let values: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let queries: Vec<f32> = (0..group * d).map(|_| next()).collect();
            let (halves, floats): (Vec<u16>, Vec<f32>) = match dtype {
                Dtype::F32 => (Vec::new(), values.clone()),
                Dtype::F16 => (values.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(), Vec::new()),
                Dtype::Bf16 => (values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(), Vec::new()),
            };
            let stored = match dtype {
                Dtype::F32 => crate::simd::Rows::f32(&floats),
                Dtype::F16 | Dtype::Bf16 => crate::simd::Rows::halves(&halves, dtype),
            };
            let mut scalar_in = Vec::new();
            stored.to_f32(&mut scalar_in);
            let mut want = Vec::new();
            score_rows(&scalar_in, d, &queries, Aggregation::Max, &mut want);
            let mut got = Vec::new();
            if crate::simd::score_rows(stored, d, &queries, Aggregation::Max, &mut got) {
                prop_assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    // Summation order differs: relative to the magnitude of the terms.
                    prop_assert!((g - w).abs() <= 1e-5 * d as f32, "{} vs {}", g, w);
                }
            }
        }
    }

    proptest! {
        /// The blocked GQA kernel (AVX-512 where the CPU has it) for every
        /// dtype, G = 1..=8, head_dims of whole lines, row counts that leave
        /// partial blocks: scores against the portable kernel (both
        /// aggregations), and its fused integrity sum exactly equal to the
        /// reference weighted sum of the bytes.
        #[test]
        fn blocked_kernel_matches_the_portable_kernel_and_sums_every_line(
            dtype_i in 0usize..3,
            lines in 1usize..=8,
            group in 1usize..=8,
            rows in 1usize..40,
            mean in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dtype = Dtype::ALL[dtype_i];
            let d = lines * 64 / dtype.size();
            let how = if mean { Aggregation::Mean } else { Aggregation::Max };
            let mut next = unit_stream(seed);
            let values: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let queries: Vec<f32> = (0..group * d).map(|_| next()).collect();
            let bytes = stored_bytes(dtype, &values);
            let stored = crate::simd::Rows::from_bytes(&bytes, dtype);
            let mut floats = Vec::new();
            stored.to_f32(&mut floats);
            let mut want = Vec::new();
            score_rows(&floats, d, &queries, how, &mut want);
            let mut got = Vec::new();
            let scored = crate::simd::score_rows_summed(stored, d, &queries, how, &mut got);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let fused = matches!(scored, crate::simd::Scored::Yes { line_sum: Some(_) });
                prop_assert!(fused, "the AVX-512 kernel takes whole lines");
            }
            match scored {
                crate::simd::Scored::No => {}
                crate::simd::Scored::Yes { line_sum } => {
                    prop_assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        prop_assert!((g - w).abs() <= 1e-5 * d as f32, "{} vs {}", g, w);
                    }
                    if let Some(sum) = line_sum {
                        let reference = crate::integrity::weighted_sum(&bytes);
                        prop_assert_eq!(sum, reference);
                    }
                }
            }
        }
    }

    proptest! {
        /// Keys in tiles (16 tokens, dimension-major), every dtype, G =
        /// 1..=8, both aggregations, head_dims the tile kernel takes and
        /// ones it leaves to the row kernels: the same scores as the
        /// portable kernel on the same keys as rows, in token order, and
        /// the fused integrity sum exactly the reference weighted sum.
        #[test]
        fn tile_kernel_matches_the_portable_kernel_on_rows(
            dtype_i in 0usize..3,
            d in prop::sample::select(vec![4usize, 8, 12, 32, 64, 128, 256, 2, 6]),
            group in 1usize..=8,
            tiles in 1usize..5,
            mean in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dtype = Dtype::ALL[dtype_i];
            let how = if mean { Aggregation::Mean } else { Aggregation::Max };
            let tokens = tiles * 16;
            let mut next = unit_stream(seed);
            let values: Vec<f32> = (0..tokens * d).map(|_| next()).collect();
            let queries: Vec<f32> = (0..group * d).map(|_| next()).collect();
            let rows = stored_bytes(dtype, &values);
            // Tiles built independently of the protocol's writer.
            let size = dtype.size();
            let mut tiled = vec![0u8; rows.len()];
            for t in 0..tokens {
                for j in 0..d {
                    let at = ((t / 16) * 16 * d + j * 16 + t % 16) * size;
                    tiled[at..at + size].copy_from_slice(&rows[(t * d + j) * size..][..size]);
                }
            }
            let mut floats = Vec::new();
            crate::simd::Rows::from_bytes(&rows, dtype).to_f32(&mut floats);
            let mut want = Vec::new();
            score_rows(&floats, d, &queries, how, &mut want);
            let mut got = Vec::new();
            let mut scratch = Vec::new();
            let stored = crate::simd::Rows::from_bytes(&tiled, dtype);
            let sum = score_stored_tiles(stored, d, &queries, how, &mut scratch, &mut got);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && d % 4 == 0 {
                prop_assert!(sum.is_some(), "the AVX-512 tile kernel takes head_dim {}", d);
            }
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-5 * d as f32, "{} vs {}", g, w);
            }
            if let Some(sum) = sum {
                prop_assert_eq!(sum, crate::integrity::weighted_sum(&tiled));
            }
        }
    }

    /// The tile kernel keeps NaN out of a group's aggregate unless every
    /// query's score is NaN, as the portable kernel does.
    #[test]
    fn tile_kernel_aggregates_nan_as_the_portable_kernel_does() {
        let d = 4;
        // Token 0: keys all NaN (every score NaN). Token 1: one infinite
        // element, so a query with 0 there scores NaN and the others not.
        let mut values = vec![0.5f32; 16 * d];
        values[..d].fill(f32::NAN);
        values[d] = f32::INFINITY;
        let mut tiled = vec![0f32; 16 * d];
        for t in 0..16 {
            for j in 0..d {
                tiled[j * 16 + t] = values[t * d + j];
            }
        }
        let queries = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        for how in [Aggregation::Max, Aggregation::Mean] {
            let mut want = Vec::new();
            score_rows(&values, d, &queries, how, &mut want);
            let mut got = Vec::new();
            let rows = crate::simd::Rows::f32(&tiled);
            score_stored_tiles(rows, d, &queries, how, &mut Vec::new(), &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!(g.to_bits() == w.to_bits() || (g - w).abs() < 1e-6, "{how:?}: {g} vs {w}");
            }
        }
    }

    /// The one-query instances (AVX-512 where the CPU has it) for every
    /// head_dim they exist for, against the portable kernel.
    #[test]
    fn one_query_kernels_match_the_portable_kernel() {
        for dtype in Dtype::ALL {
            for d in [64usize, 128, 192, 256] {
                let rows = 37;
                let values: Vec<f32> =
                    (0..rows * d).map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5).collect();
                let query: Vec<f32> = (0..d).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                let halves: Vec<u16> = match dtype {
                    Dtype::F32 => Vec::new(),
                    Dtype::F16 => {
                        values.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect()
                    }
                    Dtype::Bf16 => {
                        values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
                    }
                };
                let stored = match dtype {
                    Dtype::F32 => crate::simd::Rows::f32(&values),
                    Dtype::F16 | Dtype::Bf16 => crate::simd::Rows::halves(&halves, dtype),
                };
                let mut floats = Vec::new();
                stored.to_f32(&mut floats);
                let mut want = Vec::new();
                score_rows(&floats, d, &query, Aggregation::Max, &mut want);
                let mut got = Vec::new();
                if crate::simd::score_rows(stored, d, &query, Aggregation::Max, &mut got) {
                    assert_eq!(got.len(), rows);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-5 * d as f32, "{dtype:?} d {d}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn conversions_match_half() {
        let values = [0.0f32, -1.5, 65504.0, 1e-3, f32::INFINITY];
        let f16: Vec<u8> =
            values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> =
            values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let mut out = Vec::new();
        to_f32(Dtype::F16, &f16, &mut out);
        assert_eq!(out[1], -1.5);
        assert_eq!(out[2], 65504.0);
        to_f32(Dtype::Bf16, &bf16, &mut out);
        assert_eq!(out[4], f32::INFINITY);
        assert_eq!(out.len(), 5);
    }

    proptest! {
        #[test]
        fn top_k_equals_the_naive_sort(
            scores in proptest::collection::vec(
                prop_oneof![
                    8 => -4i8..4i8, // small integers: many exact ties
                    1 => Just(i8::MIN), // NaN marker
                    1 => Just(i8::MAX), // +inf marker
                ],
                0..300,
            ),
            k in 0usize..320,
        ) {
            let scores: Vec<f32> = scores.iter().map(|&s| match s {
                i8::MIN => f32::NAN,
                i8::MAX => f32::INFINITY,
                s => f32::from(s),
            }).collect();
            let got: Vec<(u32, f32)> = top_k(&scores, k).iter().map(|s| (s.index, s.score)).collect();
            let want = naive_top_k(&scores, k);
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                prop_assert_eq!(g.0, w.0);
                prop_assert!(g.1 == w.1 || (g.1.is_nan() && w.1.is_nan()));
            }
        }

        #[test]
        fn vector_threshold_mask_equals_the_scalar_test(
            picks in proptest::collection::vec(0usize..9, 32),
            // Full chunks take the vector path, shorter ones the scalar one.
            len in prop_oneof![Just(32usize), 0usize..32],
            t_pick in 0usize..9,
        ) {
            let values = [f32::NAN, f32::NEG_INFINITY, -1.5, -0.0, 0.0, 1e-40, 2.0,
                f32::INFINITY, -f32::NAN];
            let scores: Vec<f32> = picks[..len].iter().map(|&i| values[i]).collect();
            let t = values[t_pick];
            let want = scores.iter().enumerate().fold(0u32, |m, (i, &s)| m | (u32::from(s >= t) << i));
            prop_assert_eq!(crate::simd::at_least_mask(&scores, t), want);
        }

        #[test]
        fn rank_keys_order_like_rank(a in 0u32..12, b in 0u32..12, ia in 0u32..4, ib in 0u32..4) {
            let values = [f32::NAN, -f32::NAN, f32::NEG_INFINITY, -1.5, -0.0, 0.0, 1e-40,
                2.0, 2.5, f32::MAX, f32::INFINITY, -1e-40];
            let (x, y) = ((values[a as usize], ia), (values[b as usize], ib));
            prop_assert_eq!(rank_key(x.0, x.1).cmp(&rank_key(y.0, y.1)), rank(x, y));
            let back = key_score(rank_key(x.0, x.1));
            prop_assert!(back.to_bits() == (x.0 + 0.0).to_bits() || (back.is_nan() && x.0.is_nan()));
        }

        #[test]
        fn streaming_selection_equals_the_whole(
            scores in proptest::collection::vec(-30i16..36, 0..3000),
            block in 1usize..700,
            k in 1usize..300,
        ) {
            // Coarse values for many ties, plus NaN, -0.0 and infinities.
            let special = |s: i16| match s {
                30 | 31 => f32::NAN,
                32 => -0.0,
                33 => f32::INFINITY,
                34 => f32::NEG_INFINITY,
                _ => f32::from(s) / 4.0,
            };
            let scores: Vec<f32> = scores.iter().map(|&s| special(s)).collect();
            let mut stream = TopKStream::default();
            stream.reset(k);
            for (b, chunk) in scores.chunks(block).enumerate() {
                stream.push_block(chunk, (b * block) as u32);
            }
            // Bit patterns, so NaN entries compare equal to themselves
            // (the stream reports -0.0 as 0.0 and any NaN as the canonical one).
            let bits = |v: Vec<Scored>| -> Vec<(u32, u32)> {
                v.iter().map(|s| (s.index, key_score(rank_key(s.score, 0)).to_bits())).collect()
            };
            prop_assert_eq!(bits(stream.finish()), bits(top_k(&scores, k)));
        }

        #[test]
        fn merged_parts_equal_the_whole(
            scores in proptest::collection::vec(-50i16..50, 1..400),
            parts in 1usize..6,
            k in 1usize..64,
        ) {
            let scores: Vec<f32> = scores.iter().map(|&s| f32::from(s) / 4.0).collect();
            let chunk = scores.len().div_ceil(parts);
            let partials: Vec<Vec<Scored>> = scores
                .chunks(chunk)
                .enumerate()
                .map(|(p, c)| {
                    top_k(c, k)
                        .into_iter()
                        .map(|s| Scored { index: s.index + (p * chunk) as u32, score: s.score })
                        .collect()
                })
                .collect();
            prop_assert_eq!(merge_top_k(&partials, k), top_k(&scores, k));
        }

        #[test]
        fn dot_matches_f64_reference(
            pairs in proptest::collection::vec((-8.0f32..8.0, -8.0f32..8.0), 1..257),
        ) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let got = f64::from(dot(&a, &b));
            let want = naive_dot(&a, &b);
            let scale: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from((x * y).abs())).sum::<f64>() + 1.0;
            prop_assert!((got - want).abs() <= 1e-5 * scale, "{} vs {}", got, want);
        }
    }
}
