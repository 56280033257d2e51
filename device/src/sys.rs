//! The device crate's one unsafe module: turning a mapping into a
//! [`SharedMemory`] view, and letting the kernels read device DRAM in place.
#![allow(unsafe_code)]

use memmap2::MmapRaw;
use pnm_firmware::simd::Rows;
use pnm_protocol::{Dtype, OutOfBounds, SharedMemory};

/// Calls `score` with `len` bytes of `mem` at `offset` as rows of `dtype`,
/// read where they lie.
pub fn with_rows<R>(
    mem: SharedMemory,
    offset: u64,
    len: u64,
    dtype: Dtype,
    score: impl FnOnce(Rows<'_>) -> R,
) -> Result<R, OutOfBounds> {
    let ptr = mem.read_ptr(offset, len)?;
    // SAFETY: the range is inside the view (checked by `read_ptr`), and the
    // mapping behind every view outlives the device's objects (see
    // `Mapping::new`), so it stays readable for this call. A host may write
    // the bytes meanwhile; `Rows` reads through raw pointers only, so that
    // can only make scores garbage.
    let rows = unsafe { Rows::from_raw(ptr, len as usize, dtype) };
    Ok(score(rows))
}

/// A shared mapping of the region file and the view through which all of
/// the device's accesses go.
#[derive(Debug)]
pub struct Mapping {
    // Kept alive for as long as `view` (and its copies inside this crate) are used.
    map: MmapRaw,
    view: SharedMemory,
}

impl Mapping {
    pub fn new(map: MmapRaw) -> Self {
        // SAFETY: `map` is a live MAP_SHARED mapping of `map.len()` bytes,
        // page-aligned (so 8-aligned), and it is stored next to the view and
        // dropped only with it. The view's copies never leave the device's
        // own objects, which the device joins before dropping the mapping.
        // This crate never forms references into the mapping.
        let view = unsafe { SharedMemory::new(map.as_mut_ptr(), map.len()) };
        Self { map, view }
    }

    pub fn view(&self) -> SharedMemory {
        self.view
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.map.flush()
    }
}
