//! What the firmware supports. The device reports these through Identify PNM
//! and validates every command against them.

use pnm_protocol::commands::dtype_bits;

/// Element type of stored keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::Bf16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// The bit this dtype has in Identify PNM's supported-dtypes mask.
    pub const fn bit(self) -> u32 {
        match self {
            Self::F32 => dtype_bits::F32,
            Self::F16 => dtype_bits::F16,
            Self::Bf16 => dtype_bits::BF16,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// The firmware's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareLimits {
    pub dtypes: &'static [Dtype],
    /// Largest head dimension a key or query may have.
    pub max_head_dim: u32,
    /// Largest k a Top-K may select.
    pub max_k: u32,
    /// Most queries scored together (a GQA group).
    pub max_group: u32,
    /// Tokens per KV page.
    pub page_tokens: u32,
    /// Firmware revision string reported in Identify.
    pub revision: &'static str,
}

impl FirmwareLimits {
    /// The supported dtypes as Identify PNM's bit mask.
    pub fn dtype_mask(&self) -> u32 {
        self.dtypes.iter().fold(0, |mask, d| mask | d.bit())
    }
}

pub const LIMITS: FirmwareLimits = FirmwareLimits {
    dtypes: &Dtype::ALL,
    max_head_dim: 256,
    max_k: 8192,
    max_group: 8,
    page_tokens: 64,
    revision: concat!("pnm-fw ", env!("CARGO_PKG_VERSION")),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_mask_covers_all_dtypes() {
        assert_eq!(LIMITS.dtype_mask(), dtype_bits::F32 | dtype_bits::F16 | dtype_bits::BF16);
        assert!(LIMITS.revision.len() <= 16, "fits Identify's 16-byte FW Revision");
    }
}
