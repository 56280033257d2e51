//! The firmware crate's one unsafe module: scoring kernels for x86-64 with
//! AVX2, FMA and F16C, chosen at run time. Every entry point here checks the
//! CPU's features first and returns `false` when it cannot run, so callers
//! fall back to the portable kernel (`kernels::score_rows`), which stays the
//! reference the tests compare against.
#![allow(unsafe_code)]

use crate::kernels::{Aggregation, aggregate};

/// Stored rows of one block, in their storage type.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
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
    #[cfg(target_arch = "x86_64")]
    {
        let group = queries.len() / head_dim.max(1);
        let fits = head_dim % 8 == 0 && head_dim > 0 && (1..=8).contains(&group);
        if fits
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features `score` is compiled for were just detected
            // on this CPU, and the shape conditions it needs were checked.
            unsafe { x86::score(rows, head_dim, queries, group, how, out) };
            return true;
        }
    }
    let _ = (rows, head_dim, queries, how, out);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Aggregation, Rows, aggregate};

    /// Eight elements of row storage from `at`, as f32 lanes.
    ///
    /// # Safety
    /// `at + 8` must not exceed the rows' length (the hot loop proves it
    /// once per row instead of a bounds check per load).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(rows: Rows<'_>, at: usize) -> __m256 {
        match rows {
            Rows::F32(v) => {
                debug_assert!(at + 8 <= v.len());
                // SAFETY: in bounds by the caller's contract; unaligned load.
                unsafe { _mm256_loadu_ps(v.as_ptr().wrapping_add(at)) }
            }
            Rows::F16(v) => {
                debug_assert!(at + 8 <= v.len());
                // SAFETY: eight u16s (16 bytes) in bounds by the contract.
                let h = unsafe { _mm_loadu_si128(v.as_ptr().wrapping_add(at).cast()) };
                _mm256_cvtph_ps(h)
            }
            Rows::Bf16(v) => {
                debug_assert!(at + 8 <= v.len());
                // SAFETY: as for F16.
                let h = unsafe { _mm_loadu_si128(v.as_ptr().wrapping_add(at).cast()) };
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
        let len = match rows {
            Rows::F32(v) => v.len(),
            Rows::F16(v) | Rows::Bf16(v) => v.len(),
        };
        let n = len / d;
        out.reserve(n);
        let mut per_query = [0f32; 8];
        // The loads below stay in bounds: base + d <= n * d <= len for the
        // rows, g * d + d <= group * d == queries.len() for the queries, and
        // every offset c advances in steps of 8 up to d (d % 8 == 0).
        assert!(d % 8 == 0 && queries.len() == group * d && group <= 8);
        for r in 0..n {
            let base = r * d;
            if group == 1 {
                // Four independent chains hide the FMA latency.
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut c = 0;
                while c + 32 <= d {
                    for (j, a) in acc.iter_mut().enumerate() {
                        let at = c + 8 * j;
                        // SAFETY: at + 8 <= c + 32 <= d (see above).
                        let k = unsafe { load8(rows, base + at) };
                        // SAFETY: as above, within the single query row.
                        let q = unsafe { load_query(queries, at) };
                        *a = _mm256_fmadd_ps(k, q, *a);
                    }
                    c += 32;
                }
                while c < d {
                    // SAFETY: c + 8 <= d (see above).
                    let k = unsafe { load8(rows, base + c) };
                    // SAFETY: as above.
                    let q = unsafe { load_query(queries, c) };
                    acc[0] = _mm256_fmadd_ps(k, q, acc[0]);
                    c += 8;
                }
                let sum =
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                out.push(hsum(sum));
            } else {
                // One chain per query: each key block is loaded once per group.
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < d {
                    // SAFETY: c + 8 <= d (see above).
                    let k = unsafe { load8(rows, base + c) };
                    for (g, a) in acc.iter_mut().enumerate().take(group) {
                        // SAFETY: g < group, so g * d + c + 8 <= queries.len().
                        let q = unsafe { load_query(queries, g * d + c) };
                        *a = _mm256_fmadd_ps(k, q, *a);
                    }
                    c += 8;
                }
                for (g, a) in acc.iter().enumerate().take(group) {
                    per_query[g] = hsum(*a);
                }
                out.push(aggregate(&per_query[..group], how));
            }
        }
    }
}
