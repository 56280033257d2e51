//! The memory the store lives in: device DRAM behind a trait, so the store
//! is pure and runs as well over a plain buffer ([`MemDram`]) as over the
//! device's shared region.

use pnm_protocol::Dtype;

use super::KvError;
use crate::simd::Rows;

/// Memory the store lives in: device DRAM, addressed from its start.
pub trait Dram {
    fn len(&self) -> u64;
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), KvError>;
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), KvError>;
    /// Stores an 8-byte aligned little-endian word in one store, so that a
    /// device killed at any instruction leaves either the old or the new
    /// word (the descriptors' commit points rely on it).
    fn store_u64(&self, offset: u64, value: u64) -> Result<(), KvError> {
        self.write(offset, &value.to_le_bytes())
    }
    /// Calls `score` with the `len` bytes at `offset` as rows of `dtype`,
    /// read in place: the scan reads each key once, from DRAM, with no copy.
    fn with_rows<R>(
        &self,
        offset: u64,
        len: u64,
        dtype: Dtype,
        score: impl FnOnce(Rows<'_>) -> R,
    ) -> Result<R, KvError> {
        self.with_rows_then(offset, len, (0, 0), dtype, score)
    }
    /// [`Dram::with_rows`], with the `next.1` bytes at `next.0` (what the
    /// caller reads after these) handed along as the rows' continuation
    /// ([`Rows::followed_by`]) for the kernel to prefetch into. A `next`
    /// outside DRAM, or of no bytes, is left out.
    fn with_rows_then<R>(
        &self,
        offset: u64,
        len: u64,
        next: (u64, u64),
        dtype: Dtype,
        score: impl FnOnce(Rows<'_>) -> R,
    ) -> Result<R, KvError>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A hint that `len` bytes at `offset` are about to be read.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

/// Device DRAM in process memory (a byte vector, or any buffer such as an
/// anonymous mapping with huge pages): for tests, benchmarks and tools that
/// run the store without a device.
#[derive(Debug)]
pub struct MemDram<B = Vec<u8>>(std::cell::RefCell<B>);

impl MemDram {
    pub fn new(size: usize) -> Self {
        Self(std::cell::RefCell::new(vec![0; size]))
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> MemDram<B> {
    pub fn from_buffer(buffer: B) -> Self {
        Self(std::cell::RefCell::new(buffer))
    }

    /// Drops the whole buffer from the CPU's caches ([`crate::simd::evict`]):
    /// a benchmark's next scan then reads it from memory.
    pub fn evict_from_caches(&self) {
        crate::simd::evict(self.0.borrow().as_ref());
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Dram for &MemDram<B> {
    fn len(&self) -> u64 {
        self.0.borrow().as_ref().len() as u64
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), KvError> {
        let mem = self.0.borrow();
        let src = byte_range(offset, out.len() as u64)
            .and_then(|r| mem.as_ref().get(r))
            .ok_or(KvError::OutOfRange { offset, len: out.len() as u64 })?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), KvError> {
        let mut mem = self.0.borrow_mut();
        let dst = byte_range(offset, data.len() as u64)
            .and_then(|r| mem.as_mut().get_mut(r))
            .ok_or(KvError::OutOfRange { offset, len: data.len() as u64 })?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn with_rows_then<R>(
        &self,
        offset: u64,
        len: u64,
        next: (u64, u64),
        dtype: Dtype,
        score: impl FnOnce(Rows<'_>) -> R,
    ) -> Result<R, KvError> {
        let mem = self.0.borrow();
        let bytes = byte_range(offset, len)
            .and_then(|r| mem.as_ref().get(r))
            .ok_or(KvError::OutOfRange { offset, len })?;
        let rows = Rows::from_bytes(bytes, dtype);
        let then = byte_range(next.0, next.1).and_then(|r| mem.as_ref().get(r));
        Ok(score(match then {
            Some(then) if !then.is_empty() => rows.followed_by(Rows::from_bytes(then, dtype)),
            _ => rows,
        }))
    }
    fn prefetch(&self, offset: u64, len: u64) {
        let mem = self.0.borrow();
        if let Some(bytes) = byte_range(offset, len).and_then(|r| mem.as_ref().get(r)) {
            crate::simd::prefetch(bytes);
        }
    }
}

/// `[offset, offset + len)` as indices, if it fits in `usize`.
fn byte_range(offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let (start, len) = (usize::try_from(offset).ok()?, usize::try_from(len).ok()?);
    Some(start..start.checked_add(len)?)
}
