//! What the firmware supports. The device reports these through Identify PNM
//! and validates every command against them.

pub use pnm_protocol::Dtype;

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
    /// Most layers and KV heads a sequence may have.
    pub max_layers: u32,
    pub max_heads: u32,
    /// Most sequences the KV store holds.
    pub max_sequences: u32,
    /// Firmware revision string reported in Identify.
    pub revision: &'static str,
}

impl FirmwareLimits {
    /// The supported dtypes as Identify PNM's bit mask.
    pub fn dtype_mask(&self) -> u32 {
        self.dtypes.iter().fold(0, |mask, d| mask | d.bit())
    }
}

// `kernels::score_rows` keeps a group's scores in a 64-entry stack array.
const _: () = assert!(LIMITS.max_group <= 64);

pub const LIMITS: FirmwareLimits = FirmwareLimits {
    dtypes: &Dtype::ALL,
    max_head_dim: 256,
    max_k: 8192,
    max_group: 8,
    max_layers: 256,
    max_heads: 256,
    max_sequences: 1024,
    revision: concat!("pnm-fw ", env!("CARGO_PKG_VERSION")),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_mask_covers_all_dtypes() {
        assert_eq!(LIMITS.dtype_mask(), 0b111);
        assert!(LIMITS.revision.len() <= 16, "fits Identify's 16-byte FW Revision");
    }
}
