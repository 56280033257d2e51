//! The device as a PCI Express function (served over vfio-user, see
//! [`crate::vfio_user`]): its configuration space, BARs and the CXL DVSECs
//! that make Linux's cxl_pci driver take it for a CXL memory device
//! (CXL 3.1 §8.1.3 PCIe DVSEC for CXL Devices, §8.1.9 Register Locator).
//!
//! The function's BARs (docs/PROTOCOL.md §6.5):
//! - BAR0, 256 bytes: ivshmem-doorbell's registers ([`ivshmem`]), so the
//!   project's VFIO transport drives this function as it drives ivshmem.
//! - BAR1, 4 KiB: the MSI-X table (at 0) and PBA (at [`MSIX_PBA_OFFSET`]).
//! - BAR2 (64-bit, prefetchable): the whole shared region, mapped from the
//!   region file: register block, host DMA window, device DRAM.
//! - BAR4 (64-bit): this function's own CXL memory device register block
//!   (capabilities array, device status, primary mailbox, memory device
//!   status) at 0, mapped from memory private to this function, and the
//!   CXL component registers (a RAS capability) at [`COMPONENT_OFFSET`].
//!   A kernel driver owns that mailbox alone; hosts sharing the device use
//!   the region's mailbox under the Mailbox Lock.

/// Size of PCI Express configuration space.
pub const CONFIG_SIZE: usize = 4096;

/// Type 0 header offsets (PCI Local Bus 3.0 §6.1).
pub mod header {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass, class: 3 bytes.
    pub const CLASS: usize = 0x09;
    pub const HEADER_TYPE: usize = 0x0E;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
    pub const SUBSYSTEM_ID: usize = 0x2E;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_PIN: usize = 0x3D;
    /// Command bits a driver may set: memory space, bus master, parity and
    /// SERR# response, INTx disable (there is no I/O space).
    pub const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 8) | (1 << 10);
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_MASTER: u16 = 1 << 2;
    /// Status: capabilities list present.
    pub const STATUS_CAPABILITIES: u16 = 1 << 4;
    /// Status bits that are write-1-to-clear.
    pub const STATUS_RW1C: u16 = 0xF900;
    /// BAR type bits: 64-bit, prefetchable.
    pub const BAR_64: u32 = 0b100;
    pub const BAR_PREFETCH: u32 = 0b1000;
}

/// Class code of a CXL memory device (CXL 3.1 §8.1.12.1): base class 05h
/// (memory controller), subclass 02h (CXL), programming interface 10h.
pub const CXL_MEMORY_CLASS: u32 = 0x05_02_10;

/// Capability ids.
pub const CAP_PCIE: u8 = 0x10;
pub const CAP_MSIX: u8 = 0x11;
/// Extended capability ids.
pub const EXT_CAP_DSN: u16 = 0x0003;
pub const EXT_CAP_DVSEC: u16 = 0x0023;

/// The CXL consortium's vendor id, which names the CXL DVSECs.
pub const CXL_VENDOR_ID: u16 = 0x1E98;
/// DVSEC ids (CXL 3.1 Table 8-2).
pub const DVSEC_CXL_DEVICE: u16 = 0x0000;
pub const DVSEC_REGISTER_LOCATOR: u16 = 0x0008;
/// Register Locator block identifiers (CXL 3.1 Table 8-22).
pub const REGBLOCK_COMPONENT: u8 = 0x01;
pub const REGBLOCK_MEMDEV: u8 = 0x03;

/// Where each capability lies in this function's configuration space.
pub const PCIE_CAP_OFFSET: usize = 0x40;
pub const PCIE_CAP_SIZE: usize = 0x3C;
pub const MSIX_CAP_OFFSET: usize = 0x80;
pub const DSN_OFFSET: usize = 0x100;
pub const CXL_DVSEC_OFFSET: usize = 0x110;
pub const CXL_DVSEC_SIZE: usize = 0x3C;
pub const REGLOC_OFFSET: usize = 0x150;
pub const REGLOC_ENTRIES: usize = 2;

/// PCIe capability fields (PCIe 6.0 §7.5.3), relative to the capability.
pub mod pcie {
    pub const CAPABILITIES: usize = 0x02;
    pub const DEVICE_CAPABILITIES: usize = 0x04;
    pub const DEVICE_CONTROL: usize = 0x08;
    pub const DEVICE_STATUS: usize = 0x0A;
    pub const LINK_CAPABILITIES: usize = 0x0C;
    pub const LINK_CONTROL: usize = 0x10;
    pub const LINK_STATUS: usize = 0x12;
    pub const DEVICE_CONTROL_2: usize = 0x28;
    pub const LINK_CAPABILITIES_2: usize = 0x2C;
    pub const LINK_CONTROL_2: usize = 0x30;
    /// Capability version 2, device/port type 0 (PCI Express endpoint).
    pub const VERSION_2_ENDPOINT: u16 = 2;
    /// 32 GT/s (the PCIe 5.0 rate CXL 2.0/3.x devices run at), x16.
    pub const LINK_SPEED_32GT: u32 = 5;
    pub const LINK_WIDTH_X16: u32 = 16;
}

/// MSI-X capability fields and this function's table.
pub mod msix {
    pub const CONTROL: usize = 0x02;
    pub const TABLE: usize = 0x04;
    pub const PBA: usize = 0x08;
    pub const CONTROL_ENABLE: u16 = 1 << 15;
    pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
}

/// PCIe DVSEC for CXL Devices fields, relative to the DVSEC.
pub mod cxl_dvsec {
    pub const CAPABILITY: usize = 0x0A;
    pub const CONTROL: usize = 0x0C;
    pub const STATUS: usize = 0x0E;
    pub const LOCK: usize = 0x14;
    pub const RANGE1_SIZE_HIGH: usize = 0x18;
    pub const RANGE1_SIZE_LOW: usize = 0x1C;
    pub const RANGE1_BASE_HIGH: usize = 0x20;
    pub const RANGE1_BASE_LOW: usize = 0x24;
    /// Capability: CXL.io and CXL.mem capable, memory initialized by
    /// hardware, one HDM range.
    pub const CAP_IO: u16 = 1 << 1;
    pub const CAP_MEM: u16 = 1 << 2;
    pub const CAP_MEM_HWINIT: u16 = 1 << 3;
    pub const CAP_HDM_COUNT_1: u16 = 1 << 4;
    /// Control: CXL.io enabled (read-only 1), CXL.mem enable (RW).
    pub const CONTROL_IO_ENABLE: u16 = 1 << 1;
    pub const CONTROL_MEM_ENABLE: u16 = 1 << 2;
    /// Range Size Low: Memory_Info_Valid, Memory_Active; media type and
    /// memory class 010b (described by CDAT); the size's bits 31:28.
    pub const SIZE_LOW_INFO_VALID: u32 = 1 << 0;
    pub const SIZE_LOW_ACTIVE: u32 = 1 << 1;
    pub const SIZE_LOW_MEDIA_CDAT: u32 = 0b010 << 2;
    pub const SIZE_LOW_CLASS_CDAT: u32 = 0b010 << 5;
    /// Ranges are multiples of 256 MiB.
    pub const RANGE_GRANULE: u64 = 256 << 20;
}

/// BAR layout of the function.
pub const IVSHMEM_BAR: u32 = 0;
pub const IVSHMEM_BAR_SIZE: u64 = 256;
pub const MSIX_BAR: u32 = 1;
pub const MSIX_BAR_SIZE: u64 = 4096;
pub const MSIX_PBA_OFFSET: u32 = 0x800;
pub const REGION_BAR: u32 = 2;
pub const FUNCTION_BAR: u32 = 4;
/// The function's own CXL device register block: 64 KiB at BAR4 offset 0.
pub const FUNCTION_REGS_SIZE: u64 = 64 << 10;
/// The CXL component register block (64 KiB, CXL 3.1 §8.2.3) at this
/// BAR4 offset; its CXL.cachemem registers start [`CACHEMEM_OFFSET`] in.
pub const COMPONENT_OFFSET: u64 = 64 << 10;
pub const COMPONENT_SIZE: u64 = 64 << 10;
pub const FUNCTION_BAR_SIZE: u64 = COMPONENT_OFFSET + COMPONENT_SIZE;
pub const CACHEMEM_OFFSET: u64 = 0x1000;

/// The CXL.cachemem capability array (CXL 3.1 §8.2.4): a header, then one
/// pointer per capability; offsets from [`CACHEMEM_OFFSET`].
pub mod cachemem {
    /// Header: capability id 1, version 1, CXL.cachemem version 1, and the
    /// array size in bits 31:24.
    pub const HEADER_ID: u32 = 1;
    pub const RAS_ID: u32 = 2;
    pub const HDM_ID: u32 = 5;
    /// The RAS capability structure (§8.2.4.17), 0x58 bytes.
    pub const RAS_OFFSET: u64 = 0x100;
    pub const RAS_SIZE: u64 = 0x58;
    pub const RAS_UNCORRECTABLE_STATUS: u64 = 0x00;
    pub const RAS_UNCORRECTABLE_MASK: u64 = 0x04;
    pub const RAS_UNCORRECTABLE_SEVERITY: u64 = 0x08;
    pub const RAS_CORRECTABLE_STATUS: u64 = 0x0C;
    pub const RAS_CORRECTABLE_MASK: u64 = 0x10;
    pub const RAS_CAP_CONTROL: u64 = 0x14;
    /// Defined bits: uncorrectable errors 0..=11 and 14..=16, correctable 0..=6.
    pub const RAS_UNCORRECTABLE_BITS: u32 = 0x0001_CFFF;
    pub const RAS_CORRECTABLE_BITS: u32 = 0x7F;
    /// The HDM Decoder capability structure (§8.2.4.20), version 3: one
    /// decoder, of 0x20 bytes after a 0x10-byte header.
    pub const HDM_OFFSET: u64 = 0x200;
    pub const HDM_SIZE: u64 = 0x30;
    pub const HDM_CAPABILITY: u64 = 0x00;
    pub const HDM_GLOBAL_CONTROL: u64 = 0x04;
    pub const HDM_DECODER0: u64 = 0x10;
    /// Decoder registers, from the decoder's start.
    pub const DECODER_BASE_LOW: u64 = 0x00;
    pub const DECODER_BASE_HIGH: u64 = 0x04;
    pub const DECODER_SIZE_LOW: u64 = 0x08;
    pub const DECODER_SIZE_HIGH: u64 = 0x0C;
    pub const DECODER_CONTROL: u64 = 0x10;
    pub const DECODER_DPA_SKIP_LOW: u64 = 0x14;
    pub const DECODER_DPA_SKIP_HIGH: u64 = 0x18;
    /// Global Control: Poison On Decode Error Enable, HDM Decoder Enable.
    pub const GLOBAL_POISON_ON_ERROR: u32 = 1 << 0;
    pub const GLOBAL_ENABLE: u32 = 1 << 1;
    /// Decoder Control: interleave granularity (3:0) and ways (7:4), Lock
    /// On Commit, Commit, Committed, Error Not Committed, and the target
    /// type (1: a type 3 device, host-only coherent).
    pub const CONTROL_IG_IW: u32 = 0xFF;
    pub const CONTROL_LOCK_ON_COMMIT: u32 = 1 << 8;
    pub const CONTROL_COMMIT: u32 = 1 << 9;
    pub const CONTROL_COMMITTED: u32 = 1 << 10;
    pub const CONTROL_ERROR_NOT_COMMITTED: u32 = 1 << 11;
    pub const CONTROL_TARGET_TYPE3: u32 = 1 << 12;
    /// Decoder bases, sizes and DPA skips are multiples of 256 MiB: the
    /// low registers keep bits 31:28.
    pub const GRANULE_BITS: u32 = 0xF000_0000;

    /// The array's words: the header and one pointer per capability.
    pub fn array() -> [u32; 3] {
        [
            HEADER_ID | (1 << 16) | (1 << 20) | (2 << 24),
            RAS_ID | (2 << 16) | ((RAS_OFFSET as u32) << 20),
            HDM_ID | (3 << 16) | ((HDM_OFFSET as u32) << 20),
        ]
    }
}

/// ivshmem-doorbell's BAR0 registers (QEMU docs/specs/ivshmem-spec.rst),
/// which this function presents unchanged.
pub mod ivshmem {
    pub const INTR_MASK: u64 = 0x00;
    pub const INTR_STATUS: u64 = 0x04;
    /// This client's peer id on the device.
    pub const IV_POSITION: u64 = 0x08;
    /// [31:16] peer, [15:0] vector: a write rings that peer's vector.
    pub const DOORBELL: u64 = 0x0C;
    /// Bytes a driver needs of BAR0.
    pub const REGISTERS: u64 = 16;

    pub fn encode_doorbell(peer: u16, vector: u16) -> u32 {
        (u32::from(peer) << 16) | u32::from(vector)
    }

    pub fn decode_doorbell(value: u32) -> (u16, u16) {
        ((value >> 16) as u16, value as u16)
    }
}

/// What makes one function's configuration space its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    /// The Device Serial Number capability's value.
    pub serial: u64,
    /// BAR2: the region's size, a power of two.
    pub region_size: u64,
    /// The DVSEC's memory range: device DRAM, in whole 256 MiB granules.
    pub memory_size: u64,
    /// MSI-X vectors (1..=2048).
    pub vectors: u16,
}

/// A configuration space image and which of its bits a driver may change.
#[derive(Debug, Clone)]
pub struct ConfigImage {
    pub bytes: Vec<u8>,
    /// Bits a write replaces.
    pub writable: Vec<u8>,
    /// Bits a write of 1 clears.
    pub write_one_clears: Vec<u8>,
}

impl ConfigImage {
    fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn u16(&mut self, at: usize, value: u16) {
        Self::put(&mut self.bytes, at, &value.to_le_bytes());
    }

    fn u32(&mut self, at: usize, value: u32) {
        Self::put(&mut self.bytes, at, &value.to_le_bytes());
    }

    fn writable16(&mut self, at: usize, mask: u16) {
        Self::put(&mut self.writable, at, &mask.to_le_bytes());
    }

    fn writable32(&mut self, at: usize, mask: u32) {
        Self::put(&mut self.writable, at, &mask.to_le_bytes());
    }

    fn w1c16(&mut self, at: usize, mask: u16) {
        Self::put(&mut self.write_one_clears, at, &mask.to_le_bytes());
    }

    /// The little-endian value of `len` (1, 2, 4 or 8) bytes at `at`.
    pub fn read(&self, at: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&self.bytes[at..at + len]);
        u64::from_le_bytes(b)
    }

    /// Applies a driver's write of `data` at `at` (both within the space):
    /// writable bits take the new value, write-one-to-clear bits written
    /// with 1 clear, every other bit keeps its value.
    pub fn write(&mut self, at: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = at + i;
            let (old, w, c) = (self.bytes[o], self.writable[o], self.write_one_clears[o]);
            self.bytes[o] = ((old & !w) | (v & w)) & !(v & c);
        }
    }

    /// Extended capability header: id, version, next.
    fn ext_header(&mut self, at: usize, id: u16, version: u32, next: usize) {
        self.u32(at, u32::from(id) | (version << 16) | ((next as u32) << 20));
    }

    /// A DVSEC's two headers after its extended capability header.
    fn dvsec(&mut self, at: usize, next: usize, revision: u32, length: usize, id: u16) {
        self.ext_header(at, EXT_CAP_DVSEC, 1, next);
        self.u32(at + 4, u32::from(CXL_VENDOR_ID) | (revision << 16) | ((length as u32) << 20));
        self.u16(at + 8, id);
    }

    /// A memory BAR of `size` bytes (a power of two, at least 16) at BAR
    /// index `bar`: its type bits, and the address bits sizing leaves.
    fn bar(&mut self, bar: u32, size: u64, kind: u32) {
        let at = header::BAR0 + 4 * bar as usize;
        self.u32(at, kind);
        let mask = !(size - 1);
        self.writable32(at, (mask as u32) & !0xF);
        if kind & header::BAR_64 != 0 {
            self.writable32(at + 4, (mask >> 32) as u32);
        }
    }
}

/// The configuration space this device presents as a PCI function.
pub fn function_config(id: &FunctionIdentity) -> ConfigImage {
    let mut c = ConfigImage {
        bytes: vec![0; CONFIG_SIZE],
        writable: vec![0; CONFIG_SIZE],
        write_one_clears: vec![0; CONFIG_SIZE],
    };
    c.u16(header::VENDOR_ID, id.vendor_id);
    c.u16(header::DEVICE_ID, id.device_id);
    c.writable16(header::COMMAND, header::COMMAND_WRITABLE);
    c.u16(header::STATUS, header::STATUS_CAPABILITIES);
    c.w1c16(header::STATUS, header::STATUS_RW1C);
    c.u32(header::REVISION, (CXL_MEMORY_CLASS << 8) | 1);
    c.bar(IVSHMEM_BAR, IVSHMEM_BAR_SIZE, 0);
    c.bar(MSIX_BAR, MSIX_BAR_SIZE, 0);
    c.bar(REGION_BAR, id.region_size, header::BAR_64 | header::BAR_PREFETCH);
    c.bar(FUNCTION_BAR, FUNCTION_BAR_SIZE, header::BAR_64);
    c.u16(header::SUBSYSTEM_VENDOR_ID, id.vendor_id);
    c.u16(header::SUBSYSTEM_ID, id.device_id);
    c.bytes[header::CAPABILITIES] = PCIE_CAP_OFFSET as u8;
    // No INTx: a CXL.mem function signals with MSI/MSI-X only (CXL 3.1 §3.1.1).
    c.bytes[header::INTERRUPT_PIN] = 0;

    let p = PCIE_CAP_OFFSET;
    c.bytes[p] = CAP_PCIE;
    c.bytes[p + 1] = MSIX_CAP_OFFSET as u8;
    c.u16(p + pcie::CAPABILITIES, pcie::VERSION_2_ENDPOINT);
    // 256-byte max payload; role-based error reporting.
    c.u32(p + pcie::DEVICE_CAPABILITIES, 1 | (1 << 15));
    // Max read request 512 bytes, max payload 128 (the reset values).
    c.u16(p + pcie::DEVICE_CONTROL, 0x2 << 12);
    c.writable16(p + pcie::DEVICE_CONTROL, 0x7FFF);
    c.w1c16(p + pcie::DEVICE_STATUS, 0xF);
    let link = pcie::LINK_SPEED_32GT | (pcie::LINK_WIDTH_X16 << 4);
    c.u32(p + pcie::LINK_CAPABILITIES, link);
    c.writable16(p + pcie::LINK_CONTROL, 0x0FFB);
    c.u16(p + pcie::LINK_STATUS, link as u16);
    c.writable16(p + pcie::DEVICE_CONTROL_2, 0xFFFF);
    // Supported speeds 2.5 through 32 GT/s.
    c.u32(p + pcie::LINK_CAPABILITIES_2, 0b11111 << 1);
    c.u16(p + pcie::LINK_CONTROL_2, pcie::LINK_SPEED_32GT as u16);
    c.writable16(p + pcie::LINK_CONTROL_2, 0xFFFF);

    let m = MSIX_CAP_OFFSET;
    c.bytes[m] = CAP_MSIX;
    c.bytes[m + 1] = 0;
    c.u16(m + msix::CONTROL, id.vectors.clamp(1, 2048) - 1);
    c.writable16(m + msix::CONTROL, msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK);
    c.u32(m + msix::TABLE, MSIX_BAR);
    c.u32(m + msix::PBA, MSIX_PBA_OFFSET | MSIX_BAR);

    c.ext_header(DSN_OFFSET, EXT_CAP_DSN, 1, CXL_DVSEC_OFFSET);
    c.u32(DSN_OFFSET + 4, id.serial as u32);
    c.u32(DSN_OFFSET + 8, (id.serial >> 32) as u32);

    let d = CXL_DVSEC_OFFSET;
    c.dvsec(d, REGLOC_OFFSET, 1, CXL_DVSEC_SIZE, DVSEC_CXL_DEVICE);
    c.u16(
        d + cxl_dvsec::CAPABILITY,
        cxl_dvsec::CAP_IO
            | cxl_dvsec::CAP_MEM
            | cxl_dvsec::CAP_MEM_HWINIT
            | cxl_dvsec::CAP_HDM_COUNT_1,
    );
    // CXL.mem off until a driver enables it (Linux does, once it has set
    // up the HDM decoder).
    c.u16(d + cxl_dvsec::CONTROL, cxl_dvsec::CONTROL_IO_ENABLE);
    c.writable16(d + cxl_dvsec::CONTROL, cxl_dvsec::CONTROL_MEM_ENABLE);
    let size = id.memory_size / cxl_dvsec::RANGE_GRANULE * cxl_dvsec::RANGE_GRANULE;
    c.u32(d + cxl_dvsec::RANGE1_SIZE_HIGH, (size >> 32) as u32);
    c.u32(
        d + cxl_dvsec::RANGE1_SIZE_LOW,
        (size as u32 & 0xF000_0000)
            | cxl_dvsec::SIZE_LOW_INFO_VALID
            | cxl_dvsec::SIZE_LOW_ACTIVE
            | cxl_dvsec::SIZE_LOW_MEDIA_CDAT
            | cxl_dvsec::SIZE_LOW_CLASS_CDAT,
    );
    c.writable32(d + cxl_dvsec::RANGE1_BASE_HIGH, u32::MAX);
    c.writable32(d + cxl_dvsec::RANGE1_BASE_LOW, 0xF000_0000);

    let r = REGLOC_OFFSET;
    c.dvsec(r, 0, 0, 0x0C + 8 * REGLOC_ENTRIES, DVSEC_REGISTER_LOCATOR);
    let entry = |block: u8, offset: u64| {
        (
            FUNCTION_BAR | (u32::from(block) << 8) | (offset as u32 & 0xFFFF_0000),
            (offset >> 32) as u32,
        )
    };
    for (i, (low, high)) in [entry(REGBLOCK_MEMDEV, 0), entry(REGBLOCK_COMPONENT, COMPONENT_OFFSET)]
        .into_iter()
        .enumerate()
    {
        c.u32(r + 0x0C + 8 * i, low);
        c.u32(r + 0x10 + 8 * i, high);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> FunctionIdentity {
        FunctionIdentity {
            vendor_id: 0x1E98,
            device_id: 0x5043,
            serial: 0x0123_4567_89AB_CDEF,
            region_size: 1 << 30,
            memory_size: (768 << 20) + 12345,
            vectors: 8,
        }
    }

    /// Walks a capability list the way Linux's pci_find_capability does.
    fn find_capability(c: &ConfigImage, id: u8) -> Option<usize> {
        let mut at = c.bytes[header::CAPABILITIES] as usize;
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            if c.bytes[at] == id {
                return Some(at);
            }
            at = c.bytes[at + 1] as usize & !3;
        }
        None
    }

    /// Walks the extended capabilities for a CXL DVSEC, as Linux's
    /// pci_find_dvsec_capability does.
    fn find_dvsec(c: &ConfigImage, dvsec_id: u16) -> Option<usize> {
        let mut at = 0x100;
        while at != 0 {
            let h = c.read(at, 4) as u32;
            if h as u16 == EXT_CAP_DVSEC
                && c.read(at + 4, 2) as u16 == CXL_VENDOR_ID
                && c.read(at + 8, 2) as u16 == dvsec_id
            {
                return Some(at);
            }
            at = (h >> 20) as usize;
        }
        None
    }

    #[test]
    fn a_driver_finds_a_cxl_memory_device_with_its_dvsecs() {
        let c = function_config(&identity());
        assert_eq!(c.read(header::CLASS, 3) as u32, CXL_MEMORY_CLASS);
        assert_eq!(
            c.read(header::STATUS, 2) as u16 & header::STATUS_CAPABILITIES,
            header::STATUS_CAPABILITIES
        );
        let p = find_capability(&c, CAP_PCIE).expect("PCIe capability");
        assert_eq!(c.read(p + pcie::CAPABILITIES, 2) >> 4 & 0xF, 0, "an endpoint");
        let m = find_capability(&c, CAP_MSIX).expect("MSI-X capability");
        assert_eq!(c.read(m + msix::CONTROL, 2) & 0x7FF, 7, "8 vectors");
        assert_eq!(c.read(m + msix::TABLE, 4), u64::from(MSIX_BAR));
        assert_eq!(c.read(DSN_OFFSET + 4, 8), identity().serial);

        let d = find_dvsec(&c, DVSEC_CXL_DEVICE).expect("CXL device DVSEC");
        let cap = c.read(d + cxl_dvsec::CAPABILITY, 2) as u16;
        assert_eq!((cap >> 4) & 3, 1, "one HDM range");
        let low = c.read(d + cxl_dvsec::RANGE1_SIZE_LOW, 4) as u32;
        assert_eq!(low & 3, 3, "memory info valid and active");
        let size =
            (c.read(d + cxl_dvsec::RANGE1_SIZE_HIGH, 4) << 32) | u64::from(low & 0xF000_0000);
        assert_eq!(size, 768 << 20, "whole granules of device memory");

        let r = find_dvsec(&c, DVSEC_REGISTER_LOCATOR).expect("Register Locator DVSEC");
        let length = (c.read(r + 4, 4) >> 20) as usize;
        let blocks: Vec<(u32, u8, u64)> = (0..(length - 0x0C) / 8)
            .map(|i| {
                let low = c.read(r + 0x0C + 8 * i, 4);
                let high = c.read(r + 0x10 + 8 * i, 4);
                ((low & 7) as u32, (low >> 8) as u8, (high << 32) | (low & 0xFFFF_0000))
            })
            .collect();
        assert_eq!(
            blocks,
            vec![
                (FUNCTION_BAR, REGBLOCK_MEMDEV, 0),
                (FUNCTION_BAR, REGBLOCK_COMPONENT, COMPONENT_OFFSET)
            ]
        );
    }

    #[test]
    fn writes_change_only_writable_bits_and_clear_status() {
        let mut c = function_config(&identity());
        let before = c.bytes.clone();
        // The whole space written with ones: the identity stays.
        let ones = vec![0xFF; CONFIG_SIZE];
        c.write(0, &ones);
        assert_eq!(c.read(header::VENDOR_ID, 4), before_read(&before, header::VENDOR_ID, 4));
        assert_eq!(c.read(header::CLASS, 3) as u32, CXL_MEMORY_CLASS);
        assert_eq!(c.read(header::COMMAND, 2) as u16, header::COMMAND_WRITABLE);
        // BAR sizing: all ones read back as the size mask with the type bits.
        assert_eq!(c.read(header::BAR0, 4) as u32, 0xFFFF_FF00);
        assert_eq!(c.read(header::BAR0 + 4, 4) as u32, 0xFFFF_F000);
        assert_eq!(c.read(header::BAR0 + 8, 4) as u32, 0xC000_0000 | 0xC);
        assert_eq!(c.read(header::BAR0 + 12, 4) as u32, 0xFFFF_FFFF);
        assert_eq!(c.read(header::BAR0 + 16, 4) as u32, 0xFFFE_0000 | 0x4);
        // Status bits are write-one-to-clear, never set by a write.
        c.bytes[header::STATUS + 1] = 0x80;
        c.write(header::STATUS, &[0, 0x80]);
        assert_eq!(c.read(header::STATUS, 2) as u16, header::STATUS_CAPABILITIES);
    }

    fn before_read(bytes: &[u8], at: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&bytes[at..at + len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn the_doorbell_encodes_peer_and_vector() {
        let v = ivshmem::encode_doorbell(3, 5);
        assert_eq!(v, 0x0003_0005);
        assert_eq!(ivshmem::decode_doorbell(v), (3, 5));
    }
}
