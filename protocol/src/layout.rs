//! Layout of the shared region: register block | host DMA window | device DRAM.
//!
//! The region's size is a power of two so the same file can back a QEMU
//! ivshmem BAR2. Device DRAM starts on a 2 MiB boundary so it can be backed
//! by huge pages.

use crate::regs::REGISTER_BLOCK_SIZE;

/// Smallest region: one 2 MiB stretch for registers + DMA window, one for DRAM.
pub const MIN_REGION_SIZE: u64 = 4 << 20;
/// Largest region this ABI describes.
pub const MAX_REGION_SIZE: u64 = 1 << 40;
/// Device DRAM alignment.
pub const DRAM_ALIGN: u64 = 2 << 20;
/// Smallest host DMA window.
pub const MIN_DMA_WINDOW: u64 = 1 << 20;
/// Largest default host DMA window (an explicit size may be larger).
pub const MAX_DEFAULT_DMA_WINDOW: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("region size {0} is not a power of two (QEMU ivshmem BAR2 needs one)")]
    NotPowerOfTwo(u64),
    #[error("region size {0} is below the minimum of {MIN_REGION_SIZE} bytes")]
    TooSmall(u64),
    #[error("region size {0} is above the maximum of {MAX_REGION_SIZE} bytes")]
    TooLarge(u64),
    #[error("a host DMA window of {window} bytes leaves no device DRAM in a {size}-byte region")]
    WindowTooLarge { window: u64, size: u64 },
    #[error("a host DMA window of {0} bytes is below the minimum of {MIN_DMA_WINDOW}")]
    WindowTooSmall(u64),
    #[error("the layout says {layout} bytes, the file has {file}")]
    SizeMismatch { layout: u64, file: u64 },
    #[error("the DMA window starts at {0:#x}, not after the register block")]
    WindowStart(u64),
    #[error(
        "the DMA window {offset:#x}+{size:#x} does not end at the aligned DRAM start {dram:#x}"
    )]
    WindowEnd { offset: u64, size: u64, dram: u64 },
    #[error("device DRAM {offset:#x}+{size:#x} does not end at the region end {end:#x}")]
    DramEnd { offset: u64, size: u64, end: u64 },
}

/// Where each part of the region lies, in bytes from the region start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    pub size: u64,
    pub dma_window_offset: u64,
    pub dma_window_size: u64,
    pub dram_offset: u64,
    pub dram_size: u64,
}

impl RegionLayout {
    /// Lays out a region of `size` bytes. The host DMA window is at least
    /// `dma_window` bytes (default: an eighth of the region, clamped to
    /// 1..=256 MiB) and extends up to the 2 MiB-aligned start of device DRAM.
    pub fn new(size: u64, dma_window: Option<u64>) -> Result<Self, LayoutError> {
        if !size.is_power_of_two() {
            return Err(LayoutError::NotPowerOfTwo(size));
        }
        if size < MIN_REGION_SIZE {
            return Err(LayoutError::TooSmall(size));
        }
        if size > MAX_REGION_SIZE {
            return Err(LayoutError::TooLarge(size));
        }
        let window =
            dma_window.unwrap_or_else(|| (size / 8).clamp(MIN_DMA_WINDOW, MAX_DEFAULT_DMA_WINDOW));
        if window < MIN_DMA_WINDOW {
            return Err(LayoutError::WindowTooSmall(window));
        }
        let dram_offset = (REGISTER_BLOCK_SIZE + window)
            .checked_next_multiple_of(DRAM_ALIGN)
            .filter(|&start| start < size)
            .ok_or(LayoutError::WindowTooLarge { window, size })?;
        Ok(Self {
            size,
            dma_window_offset: REGISTER_BLOCK_SIZE,
            dma_window_size: dram_offset - REGISTER_BLOCK_SIZE,
            dram_offset,
            dram_size: size - dram_offset,
        })
    }

    /// Checks a layout read back from a region (untrusted) against the
    /// rules `new` follows and against the file's actual size.
    pub fn validate(&self, file_size: u64) -> Result<(), LayoutError> {
        if self.size != file_size {
            return Err(LayoutError::SizeMismatch { layout: self.size, file: file_size });
        }
        if !self.size.is_power_of_two() {
            return Err(LayoutError::NotPowerOfTwo(self.size));
        }
        if self.size < MIN_REGION_SIZE {
            return Err(LayoutError::TooSmall(self.size));
        }
        if self.dma_window_offset != REGISTER_BLOCK_SIZE {
            return Err(LayoutError::WindowStart(self.dma_window_offset));
        }
        let window_end = self.dma_window_offset.checked_add(self.dma_window_size);
        if window_end != Some(self.dram_offset) || !self.dram_offset.is_multiple_of(DRAM_ALIGN) {
            return Err(LayoutError::WindowEnd {
                offset: self.dma_window_offset,
                size: self.dma_window_size,
                dram: self.dram_offset,
            });
        }
        if self.dram_offset.checked_add(self.dram_size) != Some(self.size) || self.dram_size == 0 {
            return Err(LayoutError::DramEnd {
                offset: self.dram_offset,
                size: self.dram_size,
                end: self.size,
            });
        }
        Ok(())
    }
}

/// Parses a byte size: a number with an optional suffix B, K/KiB, M/MiB,
/// G/GiB, T/TiB (all binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("'{text}' is not a size"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size suffix '{other}' in '{text}'")),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| format!("'{text}' does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_layouts() {
        let l = RegionLayout::new(1 << 30, None).unwrap();
        assert_eq!(l.dma_window_offset, 0x1_0000);
        assert_eq!(l.dram_offset, 130 << 20);
        assert_eq!(l.dram_size, (1 << 30) - (130 << 20));
        let small = RegionLayout::new(MIN_REGION_SIZE, None).unwrap();
        assert_eq!(small.dram_offset, 2 << 20);
        assert_eq!(small.dram_size, 2 << 20);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(RegionLayout::new(3 << 20, None), Err(LayoutError::NotPowerOfTwo(3 << 20)));
        assert_eq!(RegionLayout::new(1 << 20, None), Err(LayoutError::TooSmall(1 << 20)));
        assert!(matches!(
            RegionLayout::new(4 << 20, Some(4 << 20)),
            Err(LayoutError::WindowTooLarge { .. })
        ));
        assert_eq!(RegionLayout::new(8 << 20, Some(4096)), Err(LayoutError::WindowTooSmall(4096)));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 tib ").unwrap(), 2 << 40);
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    proptest! {
        #[test]
        fn every_valid_layout_validates(log2 in 22u32..=40, window_mib in proptest::option::of(1u64..2048)) {
            let size = 1u64 << log2;
            if let Ok(layout) = RegionLayout::new(size, window_mib.map(|m| m << 20)) {
                prop_assert!(layout.validate(size).is_ok());
                prop_assert!(layout.dma_window_size >= window_mib.map_or(MIN_DMA_WINDOW, |m| m << 20));
                prop_assert_eq!(layout.dram_offset % DRAM_ALIGN, 0);
                prop_assert!(layout.validate(size * 2).is_err());
            }
        }
    }
}
