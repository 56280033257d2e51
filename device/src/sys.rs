//! The device crate's one unsafe module: turning a mapping into a
//! [`SharedMemory`] view.
#![allow(unsafe_code)]

use memmap2::MmapRaw;
use pnm_protocol::SharedMemory;

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
