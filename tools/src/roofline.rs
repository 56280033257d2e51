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
    /// Allocates and touches `bytes` (rounded down to 32-byte blocks), in
    /// huge pages where the kernel gives them, like the in-process store the
    /// kernels are timed on.
    pub fn new(bytes: usize) -> std::io::Result<Self> {
        let len = (bytes / 32 * 32).max(32);
        let mut map = huge_page_buffer(len)?;
        let words =
            <[u64]>::mut_from_bytes(&mut map[..len]).expect("page-aligned, 32-byte multiple");
        for (i, w) in words.iter_mut().enumerate() {
            *w = i as u64;
        }
        Ok(Self { map })
    }

    fn words(&self) -> &[u64] {
        <[u64]>::ref_from_bytes(&self.map[..]).expect("page-aligned, 32-byte multiple")
    }

    /// Best of `reps` full reads, in GB/s (best, because interference on a
    /// shared machine only ever slows a read down).
    pub fn read_gb_per_s(&self, reps: usize) -> f64 {
        let best = (0..reps.max(1))
            .map(|_| {
                let start = Instant::now();
                // Four independent sums so the loop is bound by loads, not adds.
                let mut acc = [0u64; 4];
                for c in self.words().chunks_exact(4) {
                    for i in 0..4 {
                        acc[i] = acc[i].wrapping_add(c[i]);
                    }
                }
                black_box(acc);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        self.map.len() as f64 / best / 1e9
    }
}
