//! The VFIO transport: the device as a PCI function bound to vfio-pci. In a
//! QEMU guest that function is QEMU's ivshmem-doorbell connected to
//! pnm-device's notification socket, or pnm-device's own PCI function over
//! vfio-user (a CXL memory device, `pnm_protocol::pci`), which presents the
//! same three BARs:
//!
//! - BAR2 is the whole region (register block | host DMA window | device
//!   DRAM, at the offsets the register block publishes), mapped through the
//!   VFIO device fd at its region offset.
//! - BAR0 holds ivshmem's registers: IVPosition (this host's peer id, as
//!   the device's socket assigned it) and Doorbell ([31:16] peer, [15:0]
//!   vector: a write rings that peer's vector; the device's wake vector is
//!   peer 0, vector 0).
//! - The MSI-X vectors (BAR1) the device signals arrive on eventfds, one
//!   per vector, wired by VFIO.
//!
//! Everything above ([`Transport`]) is the same code as on the host.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use memmap2::MmapOptions;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pnm_protocol::SharedMemory;
use pnm_protocol::notify::{DEVICE_PEER, VECTORS, WAKE_VECTOR};
use pnm_protocol::pci::header::{
    COMMAND_MASTER as PCI_COMMAND_MASTER, COMMAND_MEMORY as PCI_COMMAND_MEMORY,
};
use pnm_protocol::pci::ivshmem::{self, DOORBELL, IV_POSITION, REGISTERS as IVSHMEM_REGISTERS};
use pnm_protocol::regs::REGISTER_BLOCK_SIZE;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result, VfioProblem};
use crate::sys::{Mapping, eventfd_as_fd};
use crate::transport::{Interrupts, Transport};

// PCI config space Command register, and its Memory Space and Bus Master
// bits: an MSI-X message is a memory write by the device, delivered only
// with Bus Master set (vfio-pci leaves it to the user).
const PCI_COMMAND: u64 = pnm_protocol::pci::header::COMMAND as u64;

/// A device reached through VFIO.
pub struct VfioTransport {
    mapping: Mapping,
    vectors: Vec<EventFd>,
    peer_id: u16,
    // Last: fields drop in declaration order, so the device fd is closed
    // after its BAR is unmapped.
    device: VfioDevice,
}

impl VfioTransport {
    /// Opens PCI device `bdf` (for example `0000:00:03.0`), which must be
    /// bound to vfio-pci, maps its BAR2 and enables its MSI-X vectors.
    pub fn open(bdf: &str) -> Result<Self> {
        let fail = |problem| Error::Vfio { device: bdf.to_string(), problem };
        let sysfs = PathBuf::from("/sys/bus/pci/devices").join(bdf);
        if bdf.is_empty() || bdf.contains('/') || !sysfs.exists() {
            return Err(fail(VfioProblem::NoSuchDevice));
        }
        if !sysfs.join("iommu_group").exists() {
            return Err(fail(VfioProblem::NoIommuGroup));
        }
        let driver = std::fs::read_link(sysfs.join("driver"))
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(fail(VfioProblem::NotBoundToVfioPci { driver }));
        }
        let vfio = |e: vfio_ioctls::VfioError| fail(VfioProblem::Vfio(e.to_string()));
        let container = Arc::new(VfioContainer::new(None).map_err(vfio)?);
        let device = VfioDevice::new(&sysfs, container, false).map_err(vfio)?;

        let registers = device.get_region_size(VFIO_PCI_BAR0_REGION_INDEX);
        if registers < IVSHMEM_REGISTERS {
            return Err(fail(VfioProblem::Bar {
                index: 0,
                size: registers,
                expected: "ivshmem's registers need 16",
            }));
        }
        let size = device.get_region_size(VFIO_PCI_BAR2_REGION_INDEX);
        if !size.is_power_of_two() || size < REGISTER_BLOCK_SIZE {
            return Err(fail(VfioProblem::Bar {
                index: 2,
                size,
                expected: "a region is a power of two of at least the register block",
            }));
        }
        let len = usize::try_from(size).map_err(|_| {
            fail(VfioProblem::Bar { index: 2, size, expected: "it must fit this address space" })
        })?;
        let map = MmapOptions::new()
            .offset(device.get_region_offset(VFIO_PCI_BAR2_REGION_INDEX))
            .len(len)
            .map_raw(device.as_raw_fd())
            .map_err(|e| fail(VfioProblem::Map(e)))?;
        let mut position = [0u8; 4];
        device.region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut position, IV_POSITION);
        let peer_id = u32::from_le_bytes(position) as u16;

        let count = device.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).map_or(0, |i| i.count);
        let count = count.min(u32::from(VECTORS));
        let vectors = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| fail(VfioProblem::Interrupts(e.to_string())))?;
        if !vectors.is_empty() {
            let mut command = [0u8; 2];
            device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut command, PCI_COMMAND);
            let command = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
            device.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &command.to_le_bytes(), PCI_COMMAND);
            device
                .enable_msix(vectors.iter().collect())
                .map_err(|e| fail(VfioProblem::Interrupts(e.to_string())))?;
        }
        tracing::info!(bdf, size, peer_id, vectors = vectors.len(), "device opened through VFIO");
        Ok(Self { mapping: Mapping::new(map), vectors, peer_id, device })
    }

    fn ring(&self, peer: u16, vector: u16) {
        let value = ivshmem::encode_doorbell(peer, vector);
        self.device.region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), DOORBELL);
    }
}

impl std::fmt::Debug for VfioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioTransport")
            .field("region", &self.mapping)
            .field("peer_id", &self.peer_id)
            .field("vectors", &self.vectors.len())
            .finish_non_exhaustive()
    }
}

impl Transport for VfioTransport {
    fn region(&self) -> SharedMemory {
        self.mapping.view()
    }

    fn wake_device(&self) {
        self.ring(DEVICE_PEER, WAKE_VECTOR);
    }

    fn interrupts(&self) -> Option<&dyn Interrupts> {
        (!self.vectors.is_empty()).then_some(self as &dyn Interrupts)
    }

    fn guest_peer(&self) -> Option<u16> {
        Some(self.peer_id)
    }
}

impl Interrupts for VfioTransport {
    fn peer_id(&self) -> u16 {
        self.peer_id
    }

    fn wait_vector(&self, v: u16, timeout: Duration) -> bool {
        let Some(fd) = self.vectors.get(usize::from(v)) else { return false };
        let mut fds = [PollFd::new(eventfd_as_fd(fd), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let rung = matches!(poll(&mut fds, ms), Ok(n) if n > 0);
        // Consume the count (non-blocking: nothing to read is fine).
        let _ = fd.read();
        rung
    }

    fn vector_fd(&self, v: u16) -> BorrowedFd<'_> {
        eventfd_as_fd(&self.vectors[usize::from(v)])
    }
}

impl Drop for VfioTransport {
    fn drop(&mut self) {
        if !self.vectors.is_empty() {
            let _ = self.device.disable_msix();
        }
    }
}
