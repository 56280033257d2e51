//! The CXL device register block (CXL 3.1 §8.2.8) as this device lays it out.
//!
//! Every offset is defined once here. The block starts at offset 0 of the
//! shared region (in a QEMU guest: BAR2 offset 0) and is [`REGISTER_BLOCK_SIZE`]
//! bytes long. The mailbox and the vendor PNM capability each start on their
//! own 4 KiB page, as the spec asks of performance- and security-sensitive
//! registers.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the register block at the start of the region.
pub const REGISTER_BLOCK_SIZE: u64 = 0x1_0000;

// ---------------------------------------------------------------------------
// Device Capabilities Array (§8.2.8.1, §8.2.8.2)
// ---------------------------------------------------------------------------

/// Offset of the Device Capabilities Array Register.
pub const CAP_ARRAY_OFFSET: u64 = 0x0;
/// Size of the array header and of each capability header.
pub const CAP_HEADER_SIZE: u64 = 0x10;
/// Capability ID of the array header itself.
pub const CAP_ARRAY_ID: u16 = 0x0000;
/// Version of the Device Capabilities Array Register.
pub const CAP_ARRAY_VERSION: u8 = 0x01;
/// The Type field: 1 = memory device.
pub const CAP_ARRAY_TYPE_MEMORY_DEVICE: u8 = 0x1;
/// Most capability headers a client will walk before calling the array bogus.
pub const MAX_CAPABILITIES: u16 = (0x100 / CAP_HEADER_SIZE as u16) - 1;

/// Capability IDs (§8.2.8.2.1).
pub mod cap_id {
    pub const DEVICE_STATUS: u16 = 0x0001;
    pub const PRIMARY_MAILBOX: u16 = 0x0002;
    pub const SECONDARY_MAILBOX: u16 = 0x0003;
    pub const MEMORY_DEVICE_STATUS: u16 = 0x4000;
    /// First ID of the vendor-specific range (8000h-FFFFh).
    pub const VENDOR_FIRST: u16 = 0x8000;
    /// This device's vendor-specific PNM capability.
    pub const PNM: u16 = 0x8C11;
}

/// Device Capabilities Array Register (128 bits, read at most 64 at a time).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CapArrayHeader {
    /// [15:0] Capability ID, always 0000h.
    pub id: U16,
    /// [23:16] Version, 01h.
    pub version: u8,
    /// [27:24] Type; [31:28] reserved.
    pub kind: u8,
    /// [47:32] Capabilities Count, not counting this header.
    pub count: U16,
    pub reserved: [u8; 10],
}

/// One Device Capability Header (128 bits).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CapHeader {
    /// [15:0] Capability ID.
    pub id: U16,
    /// [23:16] Version.
    pub version: u8,
    pub reserved0: u8,
    /// [63:32] Offset of the capability's registers from the block start.
    pub offset: U32,
    /// [95:64] Length of the capability's registers in bytes.
    pub length: U32,
    pub reserved1: [u8; 4],
}

const _: () = {
    assert!(size_of::<CapArrayHeader>() == CAP_HEADER_SIZE as usize);
    assert!(std::mem::offset_of!(CapArrayHeader, version) == 2);
    assert!(std::mem::offset_of!(CapArrayHeader, kind) == 3);
    assert!(std::mem::offset_of!(CapArrayHeader, count) == 4);
    assert!(size_of::<CapHeader>() == CAP_HEADER_SIZE as usize);
    assert!(std::mem::offset_of!(CapHeader, offset) == 4);
    assert!(std::mem::offset_of!(CapHeader, length) == 8);
};

/// One capability as this device places it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilityPlacement {
    pub id: u16,
    pub version: u8,
    pub offset: u64,
    pub length: u64,
    pub name: &'static str,
}

// ---------------------------------------------------------------------------
// Device Status registers (§8.2.8.3), capability version 2
// ---------------------------------------------------------------------------

pub const DEVICE_STATUS_OFFSET: u64 = 0x100;
pub const DEVICE_STATUS_LENGTH: u64 = 0x100;
pub const DEVICE_STATUS_VERSION: u8 = 2;
/// Event Status (32 bit): one bit per event log with records pending.
pub const DEVICE_STATUS_EVENT_STATUS: u64 = 0x00;

// ---------------------------------------------------------------------------
// Memory Device Status registers (§8.2.8.5), capability version 1
// ---------------------------------------------------------------------------

pub const MEMDEV_STATUS_OFFSET: u64 = 0x200;
pub const MEMDEV_STATUS_LENGTH: u64 = 0x8;
pub const MEMDEV_STATUS_VERSION: u8 = 1;

/// Memory Device Status Register (64 bit) fields.
pub mod memdev_status {
    pub const FATAL: u64 = 1 << 0;
    pub const FW_HALT: u64 = 1 << 1;
    pub const MEDIA_STATUS_SHIFT: u32 = 2;
    pub const MEDIA_STATUS_MASK: u64 = 0b11 << MEDIA_STATUS_SHIFT;
    pub const MEDIA_NOT_READY: u64 = 0;
    pub const MEDIA_READY: u64 = 1;
    pub const MEDIA_ERROR: u64 = 2;
    pub const MEDIA_DISABLED: u64 = 3;
    pub const MAILBOX_READY: u64 = 1 << 4;
    pub const RESET_NEEDED_SHIFT: u32 = 5;
    pub const RESET_NEEDED_MASK: u64 = 0b111 << RESET_NEEDED_SHIFT;

    /// The Media Status field.
    pub fn media_status(reg: u64) -> u64 {
        (reg & MEDIA_STATUS_MASK) >> MEDIA_STATUS_SHIFT
    }

    /// The register value of a healthy, ready device.
    pub const READY: u64 = (MEDIA_READY << MEDIA_STATUS_SHIFT) | MAILBOX_READY;
}

// ---------------------------------------------------------------------------
// Mailbox registers (§8.2.8.4), capability version 1
// ---------------------------------------------------------------------------

pub const MAILBOX_OFFSET: u64 = 0x1000;
pub const MAILBOX_VERSION: u8 = 1;
/// Payload Size field: the payload area is 2^n bytes.
pub const MAILBOX_PAYLOAD_SIZE_LOG2: u32 = 12;
pub const MAILBOX_PAYLOAD_SIZE: u64 = 1 << MAILBOX_PAYLOAD_SIZE_LOG2;
pub const MAILBOX_LENGTH: u64 = mailbox::PAYLOAD + MAILBOX_PAYLOAD_SIZE;

/// Mailbox register offsets from the mailbox capability, and their fields.
pub mod mailbox {
    /// Mailbox Capabilities (32 bit, RO).
    pub const CAPABILITIES: u64 = 0x00;
    /// Mailbox Control (32 bit).
    pub const CONTROL: u64 = 0x04;
    /// Command (64 bit).
    pub const COMMAND: u64 = 0x08;
    /// Mailbox Status (64 bit, RO).
    pub const STATUS: u64 = 0x10;
    /// Background Command Status (64 bit, RO).
    pub const BACKGROUND_STATUS: u64 = 0x18;
    /// Command Payload Registers.
    pub const PAYLOAD: u64 = 0x20;

    /// Mailbox Capabilities [4:0] Payload Size (log2 bytes).
    pub const CAP_PAYLOAD_SIZE_MASK: u32 = 0x1F;
    /// Mailbox Capabilities [5] MB Doorbell Interrupt Capable.
    pub const CAP_DOORBELL_IRQ: u32 = 1 << 5;
    /// Mailbox Capabilities [6] Background Command Complete Interrupt Capable.
    pub const CAP_BACKGROUND_IRQ: u32 = 1 << 6;
    /// Mailbox Capabilities [10:7] Interrupt Message Number: the vector a
    /// background command's completion rings on every peer.
    pub const CAP_IRQ_MESSAGE_SHIFT: u32 = 7;
    /// The vector this device names there.
    pub const BACKGROUND_IRQ_VECTOR: u16 = 7;
    /// Mailbox Capabilities [18:11] Mailbox Ready Time in seconds.
    pub const CAP_READY_TIME_SHIFT: u32 = 11;

    /// Mailbox Control [0] Doorbell.
    pub const CONTROL_DOORBELL: u32 = 1 << 0;
    /// Mailbox Control [1] MB Doorbell Interrupt.
    pub const CONTROL_DOORBELL_IRQ: u32 = 1 << 1;
    /// Mailbox Control [2] Background Command Complete Interrupt.
    pub const CONTROL_BACKGROUND_IRQ: u32 = 1 << 2;

    /// Command [15:0] Command Opcode.
    pub const COMMAND_OPCODE_MASK: u64 = 0xFFFF;
    /// Command [36:16] Payload Length.
    pub const COMMAND_LENGTH_SHIFT: u32 = 16;
    pub const COMMAND_LENGTH_MASK: u64 = 0x1F_FFFF << COMMAND_LENGTH_SHIFT;

    /// Mailbox Status [0] Background Operation.
    pub const STATUS_BACKGROUND: u64 = 1 << 0;
    /// Mailbox Status [47:32] Return Code.
    pub const STATUS_RETURN_CODE_SHIFT: u32 = 32;
    /// Mailbox Status [63:48] Vendor Specific Extended Status.
    pub const STATUS_VENDOR_SHIFT: u32 = 48;

    /// Packs the Command register.
    pub const fn encode_command(opcode: u16, payload_len: u32) -> u64 {
        (opcode as u64) | (((payload_len as u64) << COMMAND_LENGTH_SHIFT) & COMMAND_LENGTH_MASK)
    }

    /// Unpacks the Command register into (opcode, payload length).
    pub const fn decode_command(reg: u64) -> (u16, u32) {
        (
            (reg & COMMAND_OPCODE_MASK) as u16,
            ((reg & COMMAND_LENGTH_MASK) >> COMMAND_LENGTH_SHIFT) as u32,
        )
    }

    /// Packs the Background Command Status register.
    pub const fn encode_background_status(opcode: u16, percent: u8, return_code: u16) -> u64 {
        (opcode as u64) | (((percent & 0x7F) as u64) << 16) | ((return_code as u64) << 32)
    }

    /// Unpacks the Background Command Status register into (opcode,
    /// percent complete, return code).
    pub const fn decode_background_status(reg: u64) -> (u16, u8, u16) {
        (reg as u16, ((reg >> 16) & 0x7F) as u8, (reg >> 32) as u16)
    }

    /// Packs the Mailbox Status register.
    pub const fn encode_status(return_code: u16, vendor_status: u16) -> u64 {
        ((return_code as u64) << STATUS_RETURN_CODE_SHIFT)
            | ((vendor_status as u64) << STATUS_VENDOR_SHIFT)
    }

    /// The Return Code field of Mailbox Status.
    pub const fn status_return_code(reg: u64) -> u16 {
        (reg >> STATUS_RETURN_CODE_SHIFT) as u16
    }

    /// The Vendor Specific Extended Status field of Mailbox Status.
    pub const fn status_vendor(reg: u64) -> u16 {
        (reg >> STATUS_VENDOR_SHIFT) as u16
    }
}

// ---------------------------------------------------------------------------
// Vendor-specific PNM capability (ID 8C11h), version 1
// ---------------------------------------------------------------------------

pub const PNM_OFFSET: u64 = 0x3000;
pub const PNM_LENGTH: u64 = REGISTER_BLOCK_SIZE - PNM_OFFSET;
pub const PNM_VERSION: u8 = 1;

/// The PNM capability's registers, as offsets from its start.
///
/// Page 0 (00h-FFFh) holds identification, layout and liveness; page 1
/// (1000h-1FFFh) the queue doorbells, so a host can map it alone.
pub mod pnm {
    /// Magic (64 bit, RO): [`MAGIC_VALUE`], tells a PNM capability from
    /// another vendor's use of the same ID.
    pub const MAGIC: u64 = 0x000;
    /// ABI Version (32 bit, RO): [31:16] major, [15:0] minor.
    pub const ABI_VERSION: u64 = 0x008;
    /// Compute Units (32 bit, RO).
    pub const COMPUTE_UNITS: u64 = 0x00C;
    /// Region Size (64 bit, RO): bytes in the whole shared region.
    pub const REGION_SIZE: u64 = 0x010;
    /// Host DMA Window Offset (64 bit, RO) from the region start.
    pub const DMA_WINDOW_OFFSET: u64 = 0x018;
    /// Host DMA Window Size (64 bit, RO).
    pub const DMA_WINDOW_SIZE: u64 = 0x020;
    /// Device DRAM Offset (64 bit, RO) from the region start.
    pub const DRAM_OFFSET: u64 = 0x028;
    /// Device DRAM Size (64 bit, RO).
    pub const DRAM_SIZE: u64 = 0x030;
    /// Heartbeat (64 bit, RO): advanced by the device every
    /// Heartbeat Period while it is alive.
    pub const HEARTBEAT: u64 = 0x038;
    /// Heartbeat Period (32 bit, RO) in microseconds.
    pub const HEARTBEAT_PERIOD_US: u64 = 0x040;
    /// Device PID (32 bit, RO): process serving the region, 0 when none.
    pub const DEVICE_PID: u64 = 0x044;
    /// Reset Control (32 bit, RW): the host writes [`RESET_REQUEST`]; the
    /// device clears it when the reset is complete.
    pub const RESET_CONTROL: u64 = 0x048;
    /// Reset Count (32 bit, RO): resets completed since the region was formatted.
    pub const RESET_COUNT: u64 = 0x04C;
    /// Shutdown State (32 bit, RO): [`SHUTDOWN_CLEAN`] after an orderly stop,
    /// [`SHUTDOWN_RUNNING`] while served (so a crash leaves it dirty).
    pub const SHUTDOWN_STATE: u64 = 0x050;
    /// Dirty Shutdown Count (32 bit, RO): starts that found the previous
    /// device had not stopped cleanly.
    pub const DIRTY_SHUTDOWN_COUNT: u64 = 0x054;
    /// Max Queue Pairs (32 bit, RO).
    pub const MAX_QUEUE_PAIRS: u64 = 0x058;
    /// Doorbell Stride (32 bit, RO): bytes between queue pairs' doorbells.
    pub const DOORBELL_STRIDE: u64 = 0x05C;
    /// Doorbell Offset (32 bit, RO): where the doorbell page starts,
    /// from the capability's start.
    pub const DOORBELL_OFFSET: u64 = 0x060;
    /// Device Sleeping (32 bit, RO): 1 while the engine is about to block
    /// on its wake eventfd; a host that rings a doorbell and then (after a
    /// SeqCst fence) sees 1 must ring the device's wake vector.
    pub const DEVICE_SLEEPING: u64 = 0x064;
    /// Interrupt Mask Offset (32 bit, RO): where the per-queue interrupt
    /// mask registers start, from the capability's start.
    pub const IRQ_MASK_OFFSET: u64 = 0x068;
    /// Mailbox Lock (64 bit, RW): 0 while free; else [31:0] the holder's
    /// PID and [63:32] a nonce the holder chose. Hosts that share the
    /// device take it (compare-and-swap from 0) around every use of the
    /// primary mailbox; the device frees it when its holder dies or
    /// overstays [`MAILBOX_LOCK_LEASE_MS`].
    pub const MAILBOX_LOCK: u64 = 0x070;
    /// Mailbox Lock Lease (32 bit, RO): milliseconds a holder may keep the
    /// Mailbox Lock before the device takes it back.
    pub const MAILBOX_LOCK_LEASE: u64 = 0x078;
    /// Mailbox Lock Breaks (32 bit, RO): locks the device took back from a
    /// dead or overstaying holder since it started.
    pub const MAILBOX_LOCK_BREAKS: u64 = 0x07C;
    /// Unit Busy (64 bit, RO; ABI 3.4): nanoseconds the compute units spent
    /// running commands since the device started, summed over the units
    /// (each share of a split Top-K counted for its own run). A host reads
    /// it before and after a burst of commands: the difference over the
    /// compute units is the least time the burst could take.
    pub const UNIT_BUSY_NS: u64 = 0x080;

    /// Start of the doorbell page.
    pub const DOORBELL_PAGE: u64 = 0x1000;
    /// Bytes per queue pair's doorbells: SQ tail (32 bit) then CQ head (32 bit).
    pub const DOORBELL_STRIDE_BYTES: u32 = 8;
    /// Start of the per-queue interrupt mask registers (32 bit each, RW,
    /// bit 0 = masked) in the doorbell page.
    pub const IRQ_MASK_PAGE: u64 = 0x1800;
    /// Start of the Peer Table (page 2, RO): one 32-bit entry per
    /// notification peer id, the PID of the process connected as that
    /// peer (0: free; entry 0, the device's, is unused). It outlives the
    /// device process, so a restarted device gives a process that
    /// reconnects the peer id it held before: QEMU's ivshmem-doorbell
    /// reconnects its chardev but keeps the id its guest reads in
    /// IVPosition.
    pub const PEER_TABLE: u64 = 0x2000;
    /// Bytes per Peer Table entry.
    pub const PEER_TABLE_ENTRY: u64 = 4;

    /// "CXLPNM" followed by two zero bytes, little-endian.
    pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"CXLPNM\0\0");
    pub const RESET_REQUEST: u32 = 1;
    pub const SHUTDOWN_RUNNING: u32 = 0;
    pub const SHUTDOWN_CLEAN: u32 = 1;
    /// The Mailbox Lock Lease this device publishes: far above any mailbox
    /// command's run time (microseconds) and the host's default command
    /// timeout (2 s), so only a stopped or hostile holder outlives it.
    pub const MAILBOX_LOCK_LEASE_MS: u32 = 5_000;

    /// The Mailbox Lock word of a holder.
    pub const fn mailbox_lock_value(pid: u32, nonce: u32) -> u64 {
        ((nonce as u64) << 32) | pid as u64
    }

    /// The holder PID in a Mailbox Lock word.
    pub const fn mailbox_lock_holder(value: u64) -> u32 {
        value as u32
    }
}

/// ABI version of this crate: bump major on incompatible change.
pub const ABI_VERSION_MAJOR: u16 = 3;
pub const ABI_VERSION_MINOR: u16 = 4;
pub const ABI_VERSION: u32 = ((ABI_VERSION_MAJOR as u32) << 16) | ABI_VERSION_MINOR as u32;

/// The capabilities this device advertises, in array order.
pub const CAPABILITIES: [CapabilityPlacement; 4] = [
    CapabilityPlacement {
        id: cap_id::DEVICE_STATUS,
        version: DEVICE_STATUS_VERSION,
        offset: DEVICE_STATUS_OFFSET,
        length: DEVICE_STATUS_LENGTH,
        name: "Device Status",
    },
    CapabilityPlacement {
        id: cap_id::PRIMARY_MAILBOX,
        version: MAILBOX_VERSION,
        offset: MAILBOX_OFFSET,
        length: MAILBOX_LENGTH,
        name: "Primary Mailbox",
    },
    CapabilityPlacement {
        id: cap_id::MEMORY_DEVICE_STATUS,
        version: MEMDEV_STATUS_VERSION,
        offset: MEMDEV_STATUS_OFFSET,
        length: MEMDEV_STATUS_LENGTH,
        name: "Memory Device Status",
    },
    CapabilityPlacement {
        id: cap_id::PNM,
        version: PNM_VERSION,
        offset: PNM_OFFSET,
        length: PNM_LENGTH,
        name: "Vendor PNM",
    },
];

/// The capabilities of a PCI function's own register block (BAR4 of the
/// vfio-user function, `crate::pci`): the spec's three, without the vendor
/// PNM capability, whose registers exist once, in the shared region.
pub const FUNCTION_CAPABILITIES: [CapabilityPlacement; 3] =
    [CAPABILITIES[0], CAPABILITIES[1], CAPABILITIES[2]];

const _: () = {
    // Capability headers fit before the first capability.
    assert!(CAP_HEADER_SIZE * (CAPABILITIES.len() as u64 + 1) <= DEVICE_STATUS_OFFSET);
    assert!(DEVICE_STATUS_OFFSET + DEVICE_STATUS_LENGTH <= MEMDEV_STATUS_OFFSET);
    assert!(MEMDEV_STATUS_OFFSET + MEMDEV_STATUS_LENGTH <= MAILBOX_OFFSET);
    assert!(MAILBOX_OFFSET.is_multiple_of(0x1000));
    assert!(MAILBOX_OFFSET + MAILBOX_LENGTH <= PNM_OFFSET);
    assert!(PNM_OFFSET.is_multiple_of(0x1000));
    assert!(PNM_OFFSET + PNM_LENGTH <= REGISTER_BLOCK_SIZE);
    assert!(MAILBOX_PAYLOAD_SIZE_LOG2 >= 8 && MAILBOX_PAYLOAD_SIZE_LOG2 <= 20);
    assert!(pnm::DOORBELL_OFFSET < pnm::DOORBELL_PAGE);
    assert!(pnm::DOORBELL_PAGE.is_multiple_of(0x1000));
    // Every queue's doorbells and mask fit the doorbell page.
    assert!(
        pnm::DOORBELL_PAGE
            + crate::queue::MAX_QUEUE_PAIRS as u64 * pnm::DOORBELL_STRIDE_BYTES as u64
            <= pnm::IRQ_MASK_PAGE
    );
    assert!(
        pnm::IRQ_MASK_PAGE + 4 * crate::queue::MAX_QUEUE_PAIRS as u64
            <= pnm::DOORBELL_PAGE + 0x1000
    );
    // The Peer Table has its own page, after the doorbells.
    assert!(pnm::PEER_TABLE == pnm::DOORBELL_PAGE + 0x1000);
    assert!(
        pnm::PEER_TABLE + pnm::PEER_TABLE_ENTRY * crate::notify::MAX_PEERS as u64
            <= pnm::PEER_TABLE + 0x1000
    );
    assert!(PNM_OFFSET + pnm::PEER_TABLE + 0x1000 <= REGISTER_BLOCK_SIZE);
};

/// Header of a capability array of `count` capabilities.
pub fn cap_array_header(count: usize) -> CapArrayHeader {
    CapArrayHeader {
        id: CAP_ARRAY_ID.into(),
        version: CAP_ARRAY_VERSION,
        kind: CAP_ARRAY_TYPE_MEMORY_DEVICE,
        count: (count as u16).into(),
        reserved: [0; 10],
    }
}

/// Capability header `index` as this device writes it.
pub fn cap_header(placement: &CapabilityPlacement) -> CapHeader {
    CapHeader {
        id: placement.id.into(),
        version: placement.version,
        reserved0: 0,
        offset: (placement.offset as u32).into(),
        length: (placement.length as u32).into(),
        reserved1: [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_register_round_trips() {
        let reg = mailbox::encode_command(0x4000, 0x18);
        assert_eq!(reg, 0x0018_4000);
        assert_eq!(mailbox::decode_command(reg), (0x4000, 0x18));
        // The length field is 21 bits wide; bits above it are not length.
        assert_eq!(mailbox::decode_command(u64::MAX), (0xFFFF, 0x1F_FFFF));
    }

    #[test]
    fn status_register_fields() {
        let reg = mailbox::encode_status(0x16, 0xBEEF);
        assert_eq!(mailbox::status_return_code(reg), 0x16);
        assert_eq!(mailbox::status_vendor(reg), 0xBEEF);
        assert_eq!(memdev_status::media_status(memdev_status::READY), memdev_status::MEDIA_READY);
        assert_ne!(memdev_status::READY & memdev_status::MAILBOX_READY, 0);
    }

    #[test]
    fn capability_headers_encode_as_the_spec_lays_bits() {
        let bytes = cap_array_header(CAPABILITIES.len());
        let raw = bytes.as_bytes();
        let low = u64::from_le_bytes(raw[..8].try_into().unwrap());
        assert_eq!(low & 0xFFFF, 0);
        assert_eq!((low >> 16) & 0xFF, 1);
        assert_eq!((low >> 24) & 0xF, 1);
        assert_eq!((low >> 32) & 0xFFFF, 4);
        let mb = cap_header(&CAPABILITIES[1]);
        let raw = mb.as_bytes();
        let low = u64::from_le_bytes(raw[..8].try_into().unwrap());
        let high = u64::from_le_bytes(raw[8..].try_into().unwrap());
        assert_eq!(low & 0xFFFF, 2);
        assert_eq!(low >> 32, MAILBOX_OFFSET);
        assert_eq!(high & 0xFFFF_FFFF, MAILBOX_LENGTH);
    }
}

/// A register as the documentation lists it: offset from its capability,
/// width in bits, name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterDef {
    pub offset: u64,
    pub bits: u32,
    pub name: &'static str,
}

const fn reg(offset: u64, bits: u32, name: &'static str) -> RegisterDef {
    RegisterDef { offset, bits, name }
}

/// The mailbox registers, in address order.
pub const MAILBOX_REGISTERS: [RegisterDef; 6] = [
    reg(mailbox::CAPABILITIES, 32, "Mailbox Capabilities"),
    reg(mailbox::CONTROL, 32, "Mailbox Control"),
    reg(mailbox::COMMAND, 64, "Command"),
    reg(mailbox::STATUS, 64, "Mailbox Status"),
    reg(mailbox::BACKGROUND_STATUS, 64, "Background Command Status"),
    reg(mailbox::PAYLOAD, 8 * MAILBOX_PAYLOAD_SIZE as u32, "Command Payload"),
];

/// The PNM capability's registers, in address order.
pub const PNM_REGISTERS: [RegisterDef; 24] = [
    reg(pnm::MAGIC, 64, "Magic"),
    reg(pnm::ABI_VERSION, 32, "ABI Version"),
    reg(pnm::COMPUTE_UNITS, 32, "Compute Units"),
    reg(pnm::REGION_SIZE, 64, "Region Size"),
    reg(pnm::DMA_WINDOW_OFFSET, 64, "Host DMA Window Offset"),
    reg(pnm::DMA_WINDOW_SIZE, 64, "Host DMA Window Size"),
    reg(pnm::DRAM_OFFSET, 64, "Device DRAM Offset"),
    reg(pnm::DRAM_SIZE, 64, "Device DRAM Size"),
    reg(pnm::HEARTBEAT, 64, "Heartbeat"),
    reg(pnm::HEARTBEAT_PERIOD_US, 32, "Heartbeat Period"),
    reg(pnm::DEVICE_PID, 32, "Device PID"),
    reg(pnm::RESET_CONTROL, 32, "Reset Control"),
    reg(pnm::RESET_COUNT, 32, "Reset Count"),
    reg(pnm::SHUTDOWN_STATE, 32, "Shutdown State"),
    reg(pnm::DIRTY_SHUTDOWN_COUNT, 32, "Dirty Shutdown Count"),
    reg(pnm::MAX_QUEUE_PAIRS, 32, "Max Queue Pairs"),
    reg(pnm::DOORBELL_STRIDE, 32, "Doorbell Stride"),
    reg(pnm::DOORBELL_OFFSET, 32, "Doorbell Offset"),
    reg(pnm::DEVICE_SLEEPING, 32, "Device Sleeping"),
    reg(pnm::IRQ_MASK_OFFSET, 32, "Interrupt Mask Offset"),
    reg(pnm::MAILBOX_LOCK, 64, "Mailbox Lock"),
    reg(pnm::MAILBOX_LOCK_LEASE, 32, "Mailbox Lock Lease"),
    reg(pnm::MAILBOX_LOCK_BREAKS, 32, "Mailbox Lock Breaks"),
    reg(pnm::UNIT_BUSY_NS, 64, "Unit Busy"),
];

const _: () = {
    // Registers are in order and do not overlap.
    let mut i = 1;
    while i < PNM_REGISTERS.len() {
        let prev = PNM_REGISTERS[i - 1];
        assert!(prev.offset + prev.bits as u64 / 8 <= PNM_REGISTERS[i].offset);
        assert!(PNM_REGISTERS[i].offset.is_multiple_of(PNM_REGISTERS[i].bits as u64 / 8));
        i += 1;
    }
};
