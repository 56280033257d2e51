//! The host DMA window's allocator: hosts ask the device for buffers so
//! that several host processes can share the window without colliding.

use std::collections::BTreeMap;

use pnm_protocol::RegionLayout;
use pnm_protocol::commands::{DMA_GRANULE, DMA_WINDOW_SHARE_PER_OWNER, Owner};

use crate::refusal::{Reason, Refusal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub len: u64,
    pub owner: Owner,
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

    /// Allocates `size` bytes (rounded up to the granule) for `owner`.
    /// Refused: size or owner 0 (Invalid Input); no gap fits, or the owner
    /// would hold more than its share of the window (Resources Exhausted).
    pub fn allocate(&mut self, size: u64, owner: Option<Owner>) -> Result<u64, Refusal> {
        let Some(owner) = owner else {
            return Err(Refusal::invalid(Reason::NoOwner));
        };
        if size == 0 {
            return Err(Refusal::invalid(Reason::EmptyDmaBuffer));
        }
        let full = Refusal::exhausted(Reason::DmaWindowFull { want: size });
        let len = size.checked_next_multiple_of(DMA_GRANULE).ok_or(full.clone())?;
        let held: u64 = self.allocations.values().filter(|a| a.owner == owner).map(|a| a.len).sum();
        let share = (self.end - self.start) / DMA_WINDOW_SHARE_PER_OWNER;
        if held.saturating_add(len) > share {
            return Err(Refusal::exhausted(Reason::DmaShare {
                owner: owner.word(),
                held,
                want: len,
                share,
            }));
        }
        let mut cursor = self.start;
        for (&addr, a) in &self.allocations {
            if addr - cursor >= len {
                break;
            }
            cursor = addr + a.len;
        }
        if self.end.saturating_sub(cursor) < len {
            return Err(full);
        }
        self.allocations.insert(cursor, Allocation { len, owner });
        Ok(cursor)
    }

    /// Frees the allocation starting at `addr`; false if there is none.
    pub fn free(&mut self, addr: u64) -> bool {
        self.allocations.remove(&addr).is_some()
    }

    /// Frees every allocation `is_dead` says has no owner any more.
    pub fn reclaim(&mut self, is_dead: impl Fn(Owner) -> bool) -> usize {
        let before = self.allocations.len();
        self.allocations.retain(|_, a| !is_dead(a.owner));
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
    use pnm_protocol::ReturnCode;

    const FULL: Result<u64, ReturnCode> = Err(ReturnCode::RESOURCES_EXHAUSTED);

    #[test]
    fn first_fit_with_reuse_and_exhaustion() {
        let layout = RegionLayout::new(4 << 20, None).unwrap();
        let mut dma = DmaAllocator::new(&layout);
        let window_end = layout.dma_window_offset + layout.dma_window_size;
        let half = layout.dma_window_size / 2;
        let a = dma.allocate(1, Owner::decode(7, 0)).unwrap();
        assert_eq!(a, layout.dma_window_offset);
        let b = dma.allocate(8192, Owner::decode(7, 0)).unwrap();
        assert_eq!(b, a + 4096);
        assert!(dma.free(a));
        assert!(!dma.free(a), "double free is refused");
        assert_eq!(
            dma.allocate(4096, Owner::decode(8, 0)).map_err(|r| r.code),
            Ok(a),
            "the gap is reused"
        );
        assert_eq!(
            dma.allocate(0, Owner::decode(1, 0)).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT)
        );
        assert_eq!(
            dma.allocate(4096, Owner::decode(0, 0)).map_err(|r| r.code),
            Err(ReturnCode::INVALID_INPUT),
            "owner 0 is nobody"
        );
        assert_eq!(dma.allocate(u64::MAX, Owner::decode(1, 0)).map_err(|r| r.code), FULL);
        // One owner gets at most half the window, however it asks.
        assert_eq!(dma.allocate(half + 4096, Owner::decode(9, 0)).map_err(|r| r.code), FULL);
        let c = dma.allocate(half - 4096, Owner::decode(9, 0)).unwrap();
        assert_eq!(
            dma.allocate(8192, Owner::decode(9, 0)).map_err(|r| r.code),
            FULL,
            "past its share"
        );
        let rest = window_end - (c + half - 4096);
        let d = dma.allocate(rest, Owner::decode(10, 0)).unwrap();
        assert_eq!(d + rest, window_end);
        assert_eq!(dma.allocate(1, Owner::decode(11, 0)).map_err(|r| r.code), FULL, "window full");
        assert_eq!(dma.reclaim(|owner| owner == Owner::Process(7)), 1);
        assert_eq!(dma.allocate(8192, Owner::decode(1, 0)).map_err(|r| r.code), Ok(b));
        // A guest's process is another owner than the host's of the same
        // PID, and goes with its peer.
        assert_eq!(dma.reclaim(|_| true), 4, "everything");
        let guest = Owner::Guest { pid: 7, peer: 3 };
        let g = dma.allocate(half - 4096, Some(guest)).unwrap();
        assert!(dma.allocate(half - 4096, Some(Owner::Process(7))).is_ok(), "its own share");
        assert_eq!(dma.reclaim(|o| matches!(o, Owner::Guest { peer: 3, .. })), 1);
        assert_eq!(dma.allocate(4096, Some(guest)).map_err(|r| r.code), Ok(g));
    }
}
