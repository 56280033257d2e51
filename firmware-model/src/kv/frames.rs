//! The frame allocator: which KV frames of device DRAM are in use. It
//! lives in process memory only and is rebuilt from the page tables at
//! load, so it cannot disagree with them.

/// One bit per frame: set = in use.
#[derive(Debug)]
pub(super) struct FrameAllocator {
    used: Vec<u64>,
    free: u64,
    count: u32,
}

impl FrameAllocator {
    /// `count` frames, all free.
    pub(super) fn new(count: u32) -> Self {
        Self { used: vec![0; (count as usize).div_ceil(64)], free: u64::from(count), count }
    }

    pub(super) fn free_frames(&self) -> u64 {
        self.free
    }

    pub(super) fn is_used(&self, frame: u32) -> bool {
        self.used[frame as usize / 64] & (1 << (frame % 64)) != 0
    }

    pub(super) fn set_used(&mut self, frame: u32, used: bool) {
        let word = &mut self.used[frame as usize / 64];
        let bit = 1u64 << (frame % 64);
        if used {
            debug_assert!(*word & bit == 0, "frame {frame} allocated twice");
            *word |= bit;
            self.free -= 1;
        } else {
            debug_assert!(*word & bit != 0, "frame {frame} freed twice");
            *word &= !bit;
            self.free += 1;
        }
    }

    /// Takes `n` free frames, lowest first (the caller checked that there
    /// are `n`).
    pub(super) fn allocate(&mut self, n: u64) -> Vec<u32> {
        let mut out = Vec::with_capacity(n as usize);
        if n == 0 {
            return out;
        }
        'words: for w in 0..self.used.len() {
            while self.used[w] != u64::MAX {
                let bit = (!self.used[w]).trailing_zeros();
                let frame = (w * 64) as u32 + bit;
                if frame >= self.count {
                    continue 'words;
                }
                self.set_used(frame, true);
                out.push(frame);
                if out.len() as u64 == n {
                    break 'words;
                }
            }
        }
        assert_eq!(out.len() as u64, n, "caller checked free frames");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_first_and_never_past_the_count() {
        let mut frames = FrameAllocator::new(130);
        assert_eq!(frames.allocate(3), [0, 1, 2]);
        frames.set_used(1, false);
        assert_eq!(frames.free_frames(), 128);
        assert_eq!(frames.allocate(2), [1, 3]);
        let rest = frames.allocate(frames.free_frames());
        assert_eq!(rest.len(), 126);
        assert_eq!(*rest.last().unwrap(), 129, "frames 130..192 of the last word are not frames");
        assert_eq!(frames.free_frames(), 0);
        assert!((0..130).all(|f| frames.is_used(f)));
    }
}
