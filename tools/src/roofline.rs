//! This machine's memory read bandwidth, the roofline every kernel figure is
//! divided by: a scan of keys can go no faster than memory can be read.

use std::hint::black_box;
use std::time::Instant;

use memmap2::{Advice, MmapMut};
use zerocopy::FromBytes;

/// Anonymous memory advised to use transparent huge pages, as a large
/// NumPy array or a tuned allocator would get; on a kernel without them it
/// is plain memory.
pub fn huge_page_buffer(bytes: usize) -> std::io::Result<MmapMut> {
    let map = MmapMut::map_anon(bytes.max(1))?;
    if let Err(e) = map.advise(Advice::HugePage) {
        tracing::debug!(error = %e, "no transparent huge pages for a benchmark buffer");
    }
    Ok(map)
}

/// A buffer far larger than the caches, read by one thread.
#[derive(Debug)]
pub struct Roofline {
    map: MmapMut,
}

impl Roofline {
    /// Allocates and touches `bytes` (rounded down to 64-byte lines), in
    /// huge pages where the kernel gives them, like the in-process store the
    /// kernels are timed on.
    pub fn new(bytes: usize) -> std::io::Result<Self> {
        let len = (bytes / 64 * 64).max(64);
        let mut map = huge_page_buffer(len)?;
        let words =
            <[u64]>::mut_from_bytes(&mut map[..len]).expect("page-aligned, 64-byte multiple");
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u64;
        }
        Ok(Self { map })
    }

    fn words(&self) -> &[u64] {
        <[u64]>::ref_from_bytes(&self.map[..]).expect("page-aligned, 64-byte multiple")
    }

    /// Best of `reps` rounds of full reads from memory, in GB/s (best,
    /// because interference on a shared machine only ever slows a read
    /// down). Every read starts with the buffer evicted from the caches, as
    /// the kernels' keys are when they are timed (a last-level cache of
    /// hundreds of MiB would otherwise serve a warm buffer). Each round
    /// reads once per [`READ_PREFETCHES`] way: as the hardware prefetcher
    /// alone streams it, and with software prefetches ahead of every line:
    /// on some machines (seen on a virtualised Xeon) the hardware
    /// prefetcher keeps too few lines in flight and a loop that prefetches
    /// reads faster, so a roofline without it would not be one.
    pub fn read_gb_per_s(&self, reps: usize) -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            for prefetch in READ_PREFETCHES {
                pnm_firmware::simd::evict(&self.map);
                let start = Instant::now();
                black_box(self.read_all(prefetch));
                best = best.min(start.elapsed().as_secs_f64());
            }
        }
        self.map.len() as f64 / best / 1e9
    }

    /// Sums every word, line by line (four independent sums so the loop is
    /// bound by loads, not adds), prefetching ahead as asked.
    fn read_all(&self, prefetch: ReadPrefetch) -> [u64; 4] {
        let bytes = &self.map[..];
        let line_ahead = |i: usize, ahead: usize| bytes.get(i * 64 + ahead..i * 64 + ahead + 1);
        let mut acc = [0u64; 4];
        for (i, line) in self.words().chunks_exact(8).enumerate() {
            if let Some(to_l1) = prefetch.to_l1
                && let Some(target) = line_ahead(i, to_l1)
            {
                pnm_firmware::simd::prefetch(target);
            }
            if let Some(to_l2) = prefetch.to_l2
                && let Some(target) = line_ahead(i, to_l2)
            {
                pnm_firmware::simd::prefetch_to_l2(target);
            }
            for k in 0..4 {
                acc[k] = acc[k].wrapping_add(line[k]).wrapping_add(line[k + 4]);
            }
        }
        acc
    }
}

/// How far ahead of its loads a roofline read prefetches, in bytes, into
/// L1 and into L2 (None: not at all).
#[derive(Debug, Clone, Copy)]
pub struct ReadPrefetch {
    pub to_l1: Option<usize>,
    pub to_l2: Option<usize>,
}

/// The ways the read roofline reads: the hardware prefetcher alone; into
/// L1 a few lines' worth of a fast core's memory latency ahead, and well
/// beyond it; and into L1 near and L2 far, as the tile kernel does on
/// Intel.
pub const READ_PREFETCHES: [ReadPrefetch; 5] = [
    ReadPrefetch { to_l1: None, to_l2: None },
    ReadPrefetch { to_l1: Some(2048), to_l2: None },
    ReadPrefetch { to_l1: Some(8192), to_l2: None },
    ReadPrefetch { to_l1: Some(32768), to_l2: None },
    ReadPrefetch { to_l1: Some(4096), to_l2: Some(16384) },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_read_sums_every_word_once_whatever_it_prefetches() {
        let roofline = Roofline::new(1 << 20).unwrap();
        // Word i holds i: the four sums together are 0 + 1 + ... + (n - 1).
        let n = (1u64 << 20) / 8;
        for prefetch in READ_PREFETCHES {
            let sums = roofline.read_all(prefetch);
            let total = sums.iter().fold(0u64, |a, s| a.wrapping_add(*s));
            assert_eq!(total, n * (n - 1) / 2, "prefetching {prefetch:?}");
        }
        assert!(roofline.read_gb_per_s(1) > 0.0);
    }
}
