//! The vfio-user protocol (QEMU docs/interop/vfio-user.rst, version 0.1):
//! how a PCI device served by another process talks to QEMU's
//! `vfio-user-pci` over a Unix stream socket. pnm-device is the server.
//!
//! Every message starts with a [`Header`]; commands carry the payloads
//! below (most are VFIO ioctl structures, little-endian). File descriptors
//! travel beside a message as SCM_RIGHTS: the eventfds of
//! `DEVICE_SET_IRQS`, the guest memory of `DMA_MAP`, and (server to client)
//! the fd a mappable region is mmapped from, with `DEVICE_GET_REGION_INFO`'s
//! reply. [`Request::decode`] is the one decoder of what a client sends;
//! it checks every length before anything is used.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The protocol version this server speaks (QEMU 10.1 and later ask for
/// 0.0 and accept a server minor no higher than their own).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 0;

/// Most data one REGION_READ or REGION_WRITE moves (the default of the
/// spec's `max_data_xfer_size`).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Most file descriptors the server takes with one message.
pub const MAX_MSG_FDS: u32 = 16;
/// Longest capability string a client may send with VERSION.
pub const MAX_CAPABILITIES: usize = 4096;
/// Longest message this server reads: a region write of
/// [`MAX_DATA_XFER`] bytes with its header.
pub const MAX_MESSAGE: u32 =
    (size_of::<Header>() + size_of::<RegionAccess>()) as u32 + MAX_DATA_XFER;

/// The capabilities the server answers VERSION with: no migration, no
/// multi-write messages, 4 KiB pages for DMA.
pub const SERVER_CAPABILITIES: &str = concat!(
    r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"#,
    r#""pgsizes":4096,"max_dma_maps":65535}}"#
);

/// Message header.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Chosen by the sender of a command; echoed in its reply.
    pub message_id: U16,
    pub command: U16,
    /// Of the whole message, this header included.
    pub message_size: U32,
    pub flags: U32,
    /// An errno, in an error reply.
    pub error: U32,
}

/// Command numbers.
pub mod command {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const REGION_WRITE_MULTI: u16 = 15;
}

/// Header flags.
pub mod flags {
    pub const TYPE_MASK: u32 = 0xF;
    pub const TYPE_COMMAND: u32 = 0;
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply (posted writes).
    pub const NO_REPLY: u32 = 1 << 4;
    /// A reply whose `error` holds an errno.
    pub const ERROR: u32 = 1 << 5;
}

/// The errno values this server replies with.
pub mod errno {
    pub const E2BIG: u32 = 7;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ERANGE: u32 = 34;
    pub const ENOTSUP: u32 = 95;
}

/// VERSION's payload; the NUL-terminated JSON capabilities follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Version {
    pub major: U16,
    pub minor: U16,
}

/// DMA_MAP (struct vfio_iommu_type1_dma_map, with the fd offset).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DmaMap {
    pub argsz: U32,
    pub flags: U32,
    /// Offset of the mapping in the fd passed with the message.
    pub offset: U64,
    pub address: U64,
    pub size: U64,
}

/// DMA_UNMAP (struct vfio_iommu_type1_dma_unmap).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DmaUnmap {
    pub argsz: U32,
    pub flags: U32,
    pub address: U64,
    pub size: U64,
}

/// DEVICE_GET_INFO (struct vfio_device_info).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DeviceInfo {
    pub argsz: U32,
    pub flags: U32,
    pub num_regions: U32,
    pub num_irqs: U32,
}

/// DEVICE_GET_REGION_INFO (struct vfio_region_info). For a mappable
/// region `offset` is where in the fd sent with the reply it starts.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionInfo {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub cap_offset: U32,
    pub size: U64,
    pub offset: U64,
}

/// A capability in a region info chain (struct vfio_info_cap_header).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapHeader {
    pub id: U16,
    pub version: U16,
    /// Offset of the next capability from the start of the region info; 0 ends the chain.
    pub next: U32,
}

/// The sparse mmap capability's body: which parts of a region may be
/// mmapped (the rest goes through REGION_READ/WRITE).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SparseMmap {
    pub nr_areas: U32,
    pub reserved: U32,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SparseArea {
    pub offset: U64,
    pub size: U64,
}

/// DEVICE_GET_IRQ_INFO (struct vfio_irq_info).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IrqInfo {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub count: U32,
}

/// DEVICE_SET_IRQS (struct vfio_irq_set, without the data: eventfds come
/// as SCM_RIGHTS, one per vector, or none).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IrqSet {
    pub argsz: U32,
    pub flags: U32,
    pub index: U32,
    pub start: U32,
    pub count: U32,
}

/// REGION_READ and REGION_WRITE; a write's data (and a read reply's)
/// follows.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionAccess {
    pub offset: U64,
    pub region: U32,
    pub count: U32,
}

const _: () = {
    assert!(size_of::<Header>() == 16);
    assert!(size_of::<Version>() == 4);
    assert!(size_of::<DmaMap>() == 32);
    assert!(size_of::<DmaUnmap>() == 24);
    assert!(size_of::<DeviceInfo>() == 16);
    assert!(size_of::<RegionInfo>() == 32);
    assert!(size_of::<CapHeader>() == 8);
    assert!(size_of::<SparseMmap>() == 8);
    assert!(size_of::<SparseArea>() == 16);
    assert!(size_of::<IrqInfo>() == 16);
    assert!(size_of::<IrqSet>() == 20);
    assert!(size_of::<RegionAccess>() == 16);
};

/// VFIO's PCI region indexes (linux/vfio.h).
pub mod region {
    pub const BAR0: u32 = 0;
    pub const BAR1: u32 = 1;
    pub const BAR2: u32 = 2;
    pub const BAR4: u32 = 4;
    pub const ROM: u32 = 6;
    pub const CONFIG: u32 = 7;
    pub const VGA: u32 = 8;
    pub const COUNT: u32 = 9;
    /// Region info flags.
    pub const FLAG_READ: u32 = 1 << 0;
    pub const FLAG_WRITE: u32 = 1 << 1;
    pub const FLAG_MMAP: u32 = 1 << 2;
    pub const FLAG_CAPS: u32 = 1 << 3;
    /// The sparse mmap capability's id.
    pub const CAP_SPARSE_MMAP: u16 = 1;
}

/// VFIO's PCI interrupt indexes and flags (linux/vfio.h).
pub mod irq {
    pub const INTX: u32 = 0;
    pub const MSI: u32 = 1;
    pub const MSIX: u32 = 2;
    pub const ERR: u32 = 3;
    pub const REQ: u32 = 4;
    pub const COUNT: u32 = 5;
    /// IRQ info flags.
    pub const INFO_EVENTFD: u32 = 1 << 0;
    pub const INFO_NORESIZE: u32 = 1 << 3;
    /// SET_IRQS data types (one of) and actions (one of).
    pub const DATA_NONE: u32 = 1 << 0;
    pub const DATA_BOOL: u32 = 1 << 1;
    pub const DATA_EVENTFD: u32 = 1 << 2;
    pub const DATA_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
    pub const ACTION_MASK: u32 = 1 << 3;
    pub const ACTION_UNMASK: u32 = 1 << 4;
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    pub const ACTION_MASK_ALL: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
}

/// DEVICE_GET_INFO flags.
pub mod device {
    pub const FLAG_RESET: u32 = 1 << 0;
    pub const FLAG_PCI: u32 = 1 << 1;
}

/// Why a client's message was refused: the errno of the error reply (or,
/// for a header that cannot be trusted, the reason to close the socket).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message size {size} outside 16..={max}")]
    BadSize { size: u32, max: u32 },
    #[error("message type {0:#x} is not a command")]
    NotACommand(u32),
    #[error("command {command}: payload of {len} bytes, needs {needed}")]
    Short { command: u16, len: usize, needed: usize },
    #[error("command {command}: {len} bytes of trailing data")]
    Trailing { command: u16, len: usize },
    #[error(
        "VERSION capabilities are not NUL-terminated UTF-8 of at most {MAX_CAPABILITIES} bytes"
    )]
    BadCapabilities,
    #[error("VERSION {major}.{minor}: this server speaks {VERSION_MAJOR}.x")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("region access of {count} bytes, more than {MAX_DATA_XFER}")]
    TooLarge { count: u32 },
    #[error("region write: count {count} but {len} bytes of data")]
    CountMismatch { count: u32, len: usize },
    #[error("argsz {argsz} smaller than the {needed}-byte structure")]
    ArgSize { argsz: u32, needed: usize },
    #[error("command {0} is not supported")]
    Unsupported(u16),
}

impl WireError {
    /// The errno an error reply carries.
    pub fn errno(&self) -> u32 {
        match self {
            Self::TooLarge { .. } => errno::E2BIG,
            Self::Unsupported(_) | Self::UnsupportedVersion { .. } => errno::ENOTSUP,
            _ => errno::EINVAL,
        }
    }
}

impl Header {
    /// Checks what can be checked before the payload is read: a sane size
    /// (it bounds the read) and that this is a command. A header failing
    /// this cannot be answered reliably: the connection ends.
    pub fn validate(&self) -> Result<usize, WireError> {
        let size = self.message_size.get();
        if size < size_of::<Header>() as u32 || size > MAX_MESSAGE {
            return Err(WireError::BadSize { size, max: MAX_MESSAGE });
        }
        let kind = self.flags.get() & flags::TYPE_MASK;
        if kind != flags::TYPE_COMMAND || self.flags.get() & flags::ERROR != 0 {
            return Err(WireError::NotACommand(self.flags.get()));
        }
        Ok(size as usize - size_of::<Header>())
    }

    pub fn wants_reply(&self) -> bool {
        self.flags.get() & flags::NO_REPLY == 0
    }

    /// The header of the reply to this command, `payload` bytes after it.
    pub fn reply(&self, payload: usize) -> Header {
        Header {
            message_id: self.message_id,
            command: self.command,
            message_size: ((size_of::<Header>() + payload) as u32).into(),
            flags: flags::TYPE_REPLY.into(),
            error: 0.into(),
        }
    }

    /// The header of an error reply to this command.
    pub fn error_reply(&self, errno: u32) -> Header {
        Header {
            flags: (flags::TYPE_REPLY | flags::ERROR).into(),
            error: errno.into(),
            ..self.reply(0)
        }
    }
}

/// A client's command, decoded from its header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Version { major: u16, minor: u16, capabilities: &'a str },
    DmaMap { offset: u64, address: u64, size: u64, flags: u32 },
    DmaUnmap { address: u64, size: u64, flags: u32 },
    DeviceGetInfo { argsz: u32 },
    RegionInfo { argsz: u32, index: u32 },
    IrqInfo { index: u32 },
    SetIrqs { flags: u32, index: u32, start: u32, count: u32 },
    RegionRead { region: u32, offset: u64, count: u32 },
    RegionWrite { region: u32, offset: u64, data: &'a [u8] },
    DeviceReset,
}

/// The fixed part of a payload; `exact` refuses trailing bytes.
fn fixed<T: FromBytes + KnownLayout + Immutable>(
    command: u16,
    payload: &[u8],
    exact: bool,
) -> Result<(T, &[u8]), WireError> {
    let (value, rest) = T::read_from_prefix(payload).map_err(|_| WireError::Short {
        command,
        len: payload.len(),
        needed: size_of::<T>(),
    })?;
    if exact && !rest.is_empty() {
        return Err(WireError::Trailing { command, len: rest.len() });
    }
    Ok((value, rest))
}

fn argsz(argsz: U32, needed: usize) -> Result<u32, WireError> {
    let argsz = argsz.get();
    if (argsz as usize) < needed {
        return Err(WireError::ArgSize { argsz, needed });
    }
    Ok(argsz)
}

impl<'a> Request<'a> {
    /// Decodes a command whose header passed [`Header::validate`] and whose
    /// payload is the `message_size - 16` bytes that followed it.
    pub fn decode(header: &Header, payload: &'a [u8]) -> Result<Self, WireError> {
        let c = header.command.get();
        match c {
            command::VERSION => {
                let (v, rest) = fixed::<Version>(c, payload, false)?;
                let text = match rest.split_last() {
                    Some((0, text)) if text.len() <= MAX_CAPABILITIES => text,
                    _ => return Err(WireError::BadCapabilities),
                };
                let capabilities =
                    std::str::from_utf8(text).map_err(|_| WireError::BadCapabilities)?;
                if capabilities.contains('\0') {
                    return Err(WireError::BadCapabilities);
                }
                let (major, minor) = (v.major.get(), v.minor.get());
                if major != VERSION_MAJOR {
                    return Err(WireError::UnsupportedVersion { major, minor });
                }
                Ok(Self::Version { major, minor, capabilities })
            }
            command::DMA_MAP => {
                let (m, _) = fixed::<DmaMap>(c, payload, true)?;
                argsz(m.argsz, size_of::<DmaMap>())?;
                Ok(Self::DmaMap {
                    offset: m.offset.get(),
                    address: m.address.get(),
                    size: m.size.get(),
                    flags: m.flags.get(),
                })
            }
            command::DMA_UNMAP => {
                let (m, _) = fixed::<DmaUnmap>(c, payload, true)?;
                argsz(m.argsz, size_of::<DmaUnmap>())?;
                Ok(Self::DmaUnmap {
                    address: m.address.get(),
                    size: m.size.get(),
                    flags: m.flags.get(),
                })
            }
            command::DEVICE_GET_INFO => {
                let (m, _) = fixed::<DeviceInfo>(c, payload, true)?;
                Ok(Self::DeviceGetInfo { argsz: argsz(m.argsz, size_of::<DeviceInfo>())? })
            }
            command::DEVICE_GET_REGION_INFO => {
                // QEMU sends argsz bytes of room for the reply's capabilities,
                // not bytes of payload: only the fixed part is read.
                let (m, _) = fixed::<RegionInfo>(c, payload, false)?;
                let argsz = argsz(m.argsz, size_of::<RegionInfo>())?;
                Ok(Self::RegionInfo { argsz, index: m.index.get() })
            }
            command::DEVICE_GET_IRQ_INFO => {
                let (m, _) = fixed::<IrqInfo>(c, payload, true)?;
                argsz(m.argsz, size_of::<IrqInfo>())?;
                Ok(Self::IrqInfo { index: m.index.get() })
            }
            command::DEVICE_SET_IRQS => {
                let (m, _) = fixed::<IrqSet>(c, payload, true)?;
                argsz(m.argsz, size_of::<IrqSet>())?;
                Ok(Self::SetIrqs {
                    flags: m.flags.get(),
                    index: m.index.get(),
                    start: m.start.get(),
                    count: m.count.get(),
                })
            }
            command::REGION_READ => {
                let (m, _) = fixed::<RegionAccess>(c, payload, true)?;
                let count = m.count.get();
                if count > MAX_DATA_XFER {
                    return Err(WireError::TooLarge { count });
                }
                Ok(Self::RegionRead { region: m.region.get(), offset: m.offset.get(), count })
            }
            command::REGION_WRITE => {
                let (m, data) = fixed::<RegionAccess>(c, payload, false)?;
                let count = m.count.get();
                if count > MAX_DATA_XFER {
                    return Err(WireError::TooLarge { count });
                }
                if data.len() != count as usize {
                    return Err(WireError::CountMismatch { count, len: data.len() });
                }
                Ok(Self::RegionWrite { region: m.region.get(), offset: m.offset.get(), data })
            }
            command::DEVICE_RESET => {
                if !payload.is_empty() {
                    return Err(WireError::Trailing { command: c, len: payload.len() });
                }
                Ok(Self::DeviceReset)
            }
            other => Err(WireError::Unsupported(other)),
        }
    }
}

/// Encodes a command as a client sends it (for tests and tools).
pub fn encode_command(message_id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        message_id: message_id.into(),
        command: command.into(),
        message_size: ((size_of::<Header>() + payload.len()) as u32).into(),
        flags: flags::TYPE_COMMAND.into(),
        error: 0.into(),
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Request<'_>, WireError> {
        let (header, payload) = Header::read_from_prefix(bytes).unwrap();
        let len = header.validate()?;
        assert_eq!(len, payload.len());
        Request::decode(&header, payload)
    }

    #[test]
    fn version_is_decoded_with_its_capabilities() {
        let mut payload = Version { major: 0.into(), minor: 0.into() }.as_bytes().to_vec();
        payload.extend_from_slice(b"{\"capabilities\":{}}\0");
        let msg = encode_command(7, command::VERSION, &payload);
        assert_eq!(
            decode(&msg),
            Ok(Request::Version { major: 0, minor: 0, capabilities: "{\"capabilities\":{}}" })
        );
        // Not NUL-terminated, or a NUL inside: refused.
        let msg = encode_command(7, command::VERSION, &payload[..payload.len() - 1]);
        assert_eq!(decode(&msg), Err(WireError::BadCapabilities));
        let mut inner = payload.clone();
        inner[6] = 0;
        assert_eq!(
            decode(&encode_command(7, command::VERSION, &inner)),
            Err(WireError::BadCapabilities)
        );
        let mut v1 = payload;
        v1[0] = 1;
        assert_eq!(
            decode(&encode_command(7, command::VERSION, &v1)),
            Err(WireError::UnsupportedVersion { major: 1, minor: 0 })
        );
    }

    #[test]
    fn region_write_carries_exactly_count_bytes() {
        let access = RegionAccess { offset: 0x10.into(), region: 7.into(), count: 4.into() };
        let mut payload = access.as_bytes().to_vec();
        payload.extend_from_slice(&[1, 2, 3, 4]);
        let msg = encode_command(1, command::REGION_WRITE, &payload);
        assert_eq!(
            decode(&msg),
            Ok(Request::RegionWrite { region: 7, offset: 0x10, data: &[1, 2, 3, 4] })
        );
        let short = encode_command(1, command::REGION_WRITE, &payload[..payload.len() - 1]);
        assert_eq!(decode(&short), Err(WireError::CountMismatch { count: 4, len: 3 }));
        let big = RegionAccess { count: (MAX_DATA_XFER + 1).into(), ..access };
        let msg = encode_command(1, command::REGION_READ, big.as_bytes());
        assert_eq!(decode(&msg), Err(WireError::TooLarge { count: MAX_DATA_XFER + 1 }));
    }

    #[test]
    fn headers_that_cannot_be_trusted_are_refused_before_any_read() {
        let mut h = Header { message_size: 15.into(), ..Default::default() };
        assert!(matches!(h.validate(), Err(WireError::BadSize { .. })));
        h.message_size = (MAX_MESSAGE + 1).into();
        assert!(matches!(h.validate(), Err(WireError::BadSize { .. })));
        h.message_size = 16.into();
        h.flags = flags::TYPE_REPLY.into();
        assert!(matches!(h.validate(), Err(WireError::NotACommand(_))));
        h.flags = flags::NO_REPLY.into();
        assert_eq!(h.validate(), Ok(0));
        assert!(!h.wants_reply());
    }

    #[test]
    fn short_payloads_small_argsz_and_unknown_commands_are_typed_errors() {
        let msg = encode_command(1, command::DEVICE_GET_INFO, &[0; 8]);
        assert!(matches!(decode(&msg), Err(WireError::Short { needed: 16, .. })));
        let info = DeviceInfo { argsz: 4.into(), ..Default::default() };
        let msg = encode_command(1, command::DEVICE_GET_INFO, info.as_bytes());
        assert_eq!(decode(&msg), Err(WireError::ArgSize { argsz: 4, needed: 16 }));
        let msg = encode_command(1, command::REGION_WRITE_MULTI, &[]);
        assert_eq!(decode(&msg).unwrap_err().errno(), errno::ENOTSUP);
        let msg = encode_command(1, command::DEVICE_RESET, &[0]);
        assert!(matches!(decode(&msg), Err(WireError::Trailing { .. })));
    }

    #[test]
    fn replies_echo_the_command_and_its_id() {
        let h = Header { message_id: 9.into(), command: 5.into(), ..Default::default() };
        let r = h.reply(32);
        assert_eq!((r.message_id.get(), r.command.get(), r.message_size.get()), (9, 5, 48));
        assert_eq!(r.flags.get(), flags::TYPE_REPLY);
        let e = h.error_reply(errno::EINVAL);
        assert_eq!(e.flags.get(), flags::TYPE_REPLY | flags::ERROR);
        assert_eq!(e.error.get(), errno::EINVAL);
    }
}
