//! Accessors for memory that another process writes concurrently.
//!
//! This is the crate's one unsafe module. A [`SharedMemory`] is a raw view of
//! a mapping (the shared region file, or later a BAR mapped through VFIO).
//! It never hands out `&T`/`&mut T` into the mapping: registers are read and
//! written through atomics with the caller's explicit ordering, and bulk data
//! is copied in and out, so the compiler never assumes the bytes are stable.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// An access fell outside the mapping or was misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access of {len} bytes at offset {offset:#x} is outside the {size:#x}-byte shared memory")]
pub struct OutOfBounds {
    pub offset: u64,
    pub len: u64,
    pub size: u64,
}

/// A raw view of shared memory: a base pointer and a length.
///
/// Copying a `SharedMemory` copies the view, not the memory; whoever created
/// it keeps the mapping alive for as long as any copy is used (see [`new`]).
///
/// [`new`]: SharedMemory::new
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMemory {
    base: *mut u8,
    len: usize,
}

// SAFETY: the view only ever accesses the memory through atomics and raw
// copies, never through references, so moving or sharing it between threads
// is sound for the same reasons sharing it between processes is.
unsafe impl Send for SharedMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Wraps `len` bytes of mapped memory at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to
    /// 8 bytes, for as long as this view or any copy of it is used; nothing in
    /// this process may hold a Rust reference into that memory meanwhile.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        assert_eq!(base as usize % 8, 0, "shared memory must be 8-byte aligned");
        Self { base, len }
    }

    /// Size of the view in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True if the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `[offset, offset + len)` lies inside the view.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), OutOfBounds> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(OutOfBounds { offset, len, size: self.len as u64 }),
        }
    }

    /// Pointer to `len` in-bounds bytes at `offset`.
    fn range_ptr(&self, offset: u64, len: u64) -> Result<*mut u8, OutOfBounds> {
        self.check(offset, len)?;
        // In bounds (checked above), so this is the same pointer `add` would give.
        Ok(self.base.wrapping_add(offset as usize))
    }

    /// Pointer to an aligned, in-bounds scalar, or a panic: register offsets
    /// are constants or were validated by the caller, so a bad one is a bug.
    fn scalar_ptr(&self, offset: u64, width: u64) -> *mut u8 {
        assert_eq!(offset % width, 0, "register access bug: misaligned offset {offset:#x}");
        self.range_ptr(offset, width).unwrap_or_else(|e| panic!("register access bug: {e}"))
    }

    pub fn load_u8(&self, offset: u64, order: Ordering) -> u8 {
        let p = self.scalar_ptr(offset, 1);
        // SAFETY: `p` is in bounds and valid for the view's lifetime (see
        // `new`); all accesses to shared memory go through atomics or copies.
        unsafe { AtomicU8::from_ptr(p) }.load(order)
    }

    pub fn store_u8(&self, offset: u64, value: u8, order: Ordering) {
        let p = self.scalar_ptr(offset, 1);
        // SAFETY: as in `load_u8`.
        unsafe { AtomicU8::from_ptr(p) }.store(value, order)
    }

    pub fn load_u16(&self, offset: u64, order: Ordering) -> u16 {
        let p = self.scalar_ptr(offset, 2).cast::<u16>();
        // SAFETY: in bounds and 2-byte aligned (checked in `scalar_ptr`,
        // base is 8-aligned), valid for the view's lifetime.
        unsafe { AtomicU16::from_ptr(p) }.load(order)
    }

    pub fn store_u16(&self, offset: u64, value: u16, order: Ordering) {
        let p = self.scalar_ptr(offset, 2).cast::<u16>();
        // SAFETY: as in `load_u16`.
        unsafe { AtomicU16::from_ptr(p) }.store(value, order)
    }

    pub fn load_u32(&self, offset: u64, order: Ordering) -> u32 {
        let p = self.scalar_ptr(offset, 4).cast::<u32>();
        // SAFETY: in bounds and 4-byte aligned (checked in `scalar_ptr`,
        // base is 8-aligned), valid for the view's lifetime.
        unsafe { AtomicU32::from_ptr(p) }.load(order)
    }

    pub fn store_u32(&self, offset: u64, value: u32, order: Ordering) {
        let p = self.scalar_ptr(offset, 4).cast::<u32>();
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p) }.store(value, order)
    }

    pub fn load_u64(&self, offset: u64, order: Ordering) -> u64 {
        let p = self.scalar_ptr(offset, 8).cast::<u64>();
        // SAFETY: in bounds and 8-byte aligned (checked in `scalar_ptr`,
        // base is 8-aligned), valid for the view's lifetime.
        unsafe { AtomicU64::from_ptr(p) }.load(order)
    }

    pub fn store_u64(&self, offset: u64, value: u64, order: Ordering) {
        let p = self.scalar_ptr(offset, 8).cast::<u64>();
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(p) }.store(value, order)
    }

    /// Atomically adds to a 64-bit counter (Release), returning the old value.
    pub fn fetch_add_u64(&self, offset: u64, value: u64) -> u64 {
        let p = self.scalar_ptr(offset, 8).cast::<u64>();
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(p) }.fetch_add(value, Ordering::AcqRel)
    }

    /// Atomically replaces a 64-bit word that holds `current` with `new`
    /// (AcqRel on success, Acquire on failure); returns the word it found.
    /// The cross-process locks in the region are built on it.
    pub fn compare_exchange_u64(&self, offset: u64, current: u64, new: u64) -> Result<u64, u64> {
        let p = self.scalar_ptr(offset, 8).cast::<u64>();
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(p) }.compare_exchange(
            current,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
    }

    /// Copies bytes out of shared memory.
    ///
    /// Ordering with the writer comes from the protocol around the copy (an
    /// Acquire load of a doorbell, phase bit or commit index before it); the
    /// copy itself has no ordering, like a DMA read.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) -> Result<(), OutOfBounds> {
        let src = self.range_ptr(offset, out.len() as u64)?;
        // SAFETY: the source range is inside the mapping (checked above) and
        // `out` is a distinct local buffer, so the ranges cannot overlap. The
        // bytes may be changed concurrently by a misbehaving peer; we only
        // copy them, never form a reference, so that yields garbage data that
        // the caller validates, not undefined behaviour in our own objects.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies bytes into shared memory (see [`read_bytes`](Self::read_bytes)
    /// for ordering).
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        let dst = self.range_ptr(offset, data.len() as u64)?;
        // SAFETY: the destination range is inside the mapping (checked
        // above), `data` is local memory, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `from` to `to` inside the view (the ranges
    /// may overlap), like a DMA engine moving data between two buffers.
    pub fn copy_within(&self, from: u64, to: u64, len: u64) -> Result<(), OutOfBounds> {
        let src = self.range_ptr(from, len)?;
        let dst = self.range_ptr(to, len)?;
        // SAFETY: both ranges are inside the mapping (checked above);
        // `ptr::copy` allows them to overlap.
        unsafe { std::ptr::copy(src, dst, len as usize) };
        Ok(())
    }

    /// Pointer to `len` in-bounds bytes at `offset`, for code that reads
    /// them in place (the scoring kernels) under the same rules as
    /// [`read_bytes`](Self::read_bytes): raw reads only, no references.
    pub fn read_ptr(&self, offset: u64, len: u64) -> Result<*const u8, OutOfBounds> {
        self.range_ptr(offset, len).map(|p| p.cast_const())
    }

    /// Asks the CPU to start loading `len` bytes at `offset` into its caches
    /// (a hint: out-of-bounds ranges are ignored, nothing is read here).
    pub fn prefetch(&self, offset: u64, len: u64) {
        let Ok(start) = self.range_ptr(offset, len) else { return };
        #[cfg(target_arch = "x86_64")]
        for line in (0..len as usize).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing into Rust's
            // view of memory; the address is inside the mapping anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.wrapping_add(line).cast_const().cast(),
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = start;
    }

    /// Sets `len` bytes at `offset` to `value`.
    pub fn fill(&self, offset: u64, len: u64, value: u8) -> Result<(), OutOfBounds> {
        let dst = self.range_ptr(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(dst, value, len as usize) };
        Ok(())
    }

    /// A view of a sub-range, for handing one window of the region to code
    /// that should not see the rest.
    pub fn subrange(&self, offset: u64, len: u64) -> Result<SharedMemory, OutOfBounds> {
        assert_eq!(offset % 8, 0, "sub-views must stay 8-byte aligned");
        Ok(SharedMemory { base: self.range_ptr(offset, len)?, len: len as usize })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_view<R>(len: usize, f: impl FnOnce(SharedMemory) -> R) -> R {
        let mut backing = vec![0u64; len.div_ceil(8)];
        // SAFETY: `backing` outlives the view, is 8-aligned, and is only
        // touched through the view inside `f`.
        let view = unsafe { SharedMemory::new(backing.as_mut_ptr().cast(), len) };
        f(view)
    }

    #[test]
    fn scalars_round_trip_little_endian() {
        with_view(64, |m| {
            m.store_u64(8, 0x1122_3344_5566_7788, Ordering::Release);
            assert_eq!(m.load_u32(8, Ordering::Acquire), 0x5566_7788);
            assert_eq!(m.load_u32(12, Ordering::Acquire), 0x1122_3344);
            assert_eq!(m.load_u8(8, Ordering::Acquire), 0x88);
            assert_eq!(m.fetch_add_u64(8, 1), 0x1122_3344_5566_7788);
            assert_eq!(m.load_u64(8, Ordering::Acquire), 0x1122_3344_5566_7789);
        });
    }

    #[test]
    fn copies_are_bounds_checked() {
        with_view(32, |m| {
            assert!(m.write_bytes(28, &[1, 2, 3, 4]).is_ok());
            let err = m.write_bytes(29, &[1, 2, 3, 4]).unwrap_err();
            assert_eq!(err, OutOfBounds { offset: 29, len: 4, size: 32 });
            assert!(m.read_bytes(u64::MAX, &mut [0u8; 2]).is_err());
            let mut out = [0u8; 4];
            m.read_bytes(28, &mut out).unwrap();
            assert_eq!(out, [1, 2, 3, 4]);
            let sub = m.subrange(24, 8).unwrap();
            assert_eq!(sub.load_u32(4, Ordering::Acquire), u32::from_le_bytes([1, 2, 3, 4]));
            assert!(m.subrange(24, 16).is_err());
        });
    }

    #[test]
    #[should_panic(expected = "misaligned")]
    fn misaligned_register_access_is_a_bug() {
        with_view(32, |m| m.load_u32(2, Ordering::Relaxed));
    }
}
