//! The host DMA window's allocator: hosts ask the device for buffers so
//! that several host processes can share the window without colliding.

use std::collections::BTreeMap;

use pnm_protocol::RegionLayout;
use pnm_protocol::commands::DMA_GRANULE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub len: u64,
    pub owner_pid: u32,
}

/// First-fit allocator over the host DMA window, in 4 KiB granules.
#[derive(Debug)]
pub struct DmaAllocator {
    start: u64,
    end: u64,
    /// Live allocations by address.
    allocations: BTreeMap<u64, Allocation>,
}

impl DmaAllocator {
    pub fn new(layout: &RegionLayout) -> Self {
        let start = layout.dma_window_offset.next_multiple_of(DMA_GRANULE);
        let end = layout.dma_window_offset + layout.dma_window_size;
        Self { start, end, allocations: BTreeMap::new() }
    }

    /// Allocates `size` bytes (rounded up to the granule); None if no gap fits.
    pub fn allocate(&mut self, size: u64, owner_pid: u32) -> Option<u64> {
        let len = size.checked_next_multiple_of(DMA_GRANULE)?;
        if len == 0 {
            return None;
        }
        let mut cursor = self.start;
        for (&addr, a) in &self.allocations {
            if addr - cursor >= len {
                break;
            }
            cursor = addr + a.len;
        }
        if self.end.checked_sub(cursor)? < len {
            return None;
        }
        self.allocations.insert(cursor, Allocation { len, owner_pid });
        Some(cursor)
    }

    /// Frees the allocation starting at `addr`; false if there is none.
    pub fn free(&mut self, addr: u64) -> bool {
        self.allocations.remove(&addr).is_some()
    }

    /// Frees every allocation `is_dead` says has no owner any more.
    pub fn reclaim(&mut self, is_dead: impl Fn(u32) -> bool) -> usize {
        let before = self.allocations.len();
        self.allocations.retain(|_, a| a.owner_pid == 0 || !is_dead(a.owner_pid));
        before - self.allocations.len()
    }

    pub fn clear(&mut self) {
        self.allocations.clear();
    }

    pub fn allocated(&self) -> u64 {
        self.allocations.values().map(|a| a.len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_with_reuse_and_exhaustion() {
        let layout = RegionLayout::new(4 << 20, None).unwrap();
        let mut dma = DmaAllocator::new(&layout);
        let window_end = layout.dma_window_offset + layout.dma_window_size;
        let a = dma.allocate(1, 7).unwrap();
        assert_eq!(a, layout.dma_window_offset);
        let b = dma.allocate(8192, 7).unwrap();
        assert_eq!(b, a + 4096);
        assert!(dma.free(a));
        assert!(!dma.free(a), "double free is refused");
        assert_eq!(dma.allocate(4096, 8), Some(a), "the gap is reused");
        assert_eq!(dma.allocate(0, 1), None);
        assert_eq!(dma.allocate(u64::MAX, 1), None);
        let rest = window_end - (b + 8192);
        let c = dma.allocate(rest, 9).unwrap();
        assert_eq!(c + rest, window_end);
        assert_eq!(dma.allocate(1, 9), None, "window full");
        assert_eq!(dma.reclaim(|pid| pid == 7), 1);
        assert_eq!(dma.allocate(8192, 1), Some(b));
    }
}
