//! The device as a PCI Express function served over vfio-user
//! (`pnm_protocol::vfio_user`): QEMU's `vfio-user-pci` connects to this
//! socket and the guest sees a CXL memory device (class 050210h) that
//! Linux's cxl_pci binds, beside every other client of the same device.
//!
//! What the function is made of (`pnm_protocol::pci` has the layout):
//! - configuration space, emulated here (BAR sizing, command, the CXL
//!   DVSECs, the capability chain);
//! - BAR0, ivshmem-doorbell's registers: IVPosition is this client's peer
//!   id, a Doorbell write rings a device vector (never another peer's);
//! - BAR1, the MSI-X table, which QEMU emulates; the vectors it wires
//!   with DEVICE_SET_IRQS become this peer's vectors, so the device's
//!   interrupts (queue completions, events) reach the guest as MSI-X;
//! - BAR2, the region, mapped by QEMU from the region file: guest loads
//!   and stores reach device memory with no message per access;
//! - BAR4, the function's own register block (mapped from a sealed memfd,
//!   its mailbox served by the engine) and the component registers (a RAS
//!   capability, emulated here).
//!
//! One client at a time: a function has one user. The client is a peer of
//! the device while connected; when it goes, what its guest owned (queue
//! pairs, DMA buffers) is reclaimed like any departed peer's. The device
//! never reads or writes guest memory (every buffer is in BAR2), so
//! DMA_MAP is accepted and its memory not mapped.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use pnm_protocol::SharedMemory;
use pnm_protocol::notify::{DEVICE_PEER, VECTORS};
use pnm_protocol::pci::{self, ConfigImage, FunctionIdentity, cachemem, ivshmem};
use pnm_protocol::vfio_user::{
    self as wire, DeviceInfo, Header, Request, WireError, errno, irq, region,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::notify::{Peers, bind_socket, remove_socket};
use crate::region::FunctionRegisters;
use crate::sys::{adopt_received_fds, received_eventfd};

/// How long the rest of a message may take once its first bytes came, and
/// how long a reply may wait for room in the socket: a client that stalls
/// mid-message is disconnected rather than holding the server.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the server needs of the device.
#[derive(Debug)]
pub struct FunctionBacking {
    pub peers: Peers,
    /// The region file (BAR2), reopened, for clients to map.
    pub region_fd: OwnedFd,
    pub region: SharedMemory,
    pub registers: Arc<FunctionRegisters>,
    pub identity: FunctionIdentity,
}

/// The server thread.
#[derive(Debug)]
pub struct VfioUserServer {
    pub path: PathBuf,
    bound: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VfioUserServer {
    /// Listens on `path` (owner and group only, as the region).
    pub fn start(path: &Path, backing: FunctionBacking) -> std::io::Result<Self> {
        let (listener, bound) = bind_socket(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pnm-vfio-user".into())
                .spawn(move || serve(&listener, &backing, &stop))?
        };
        Ok(Self { path: path.to_path_buf(), bound, stop, thread: Some(thread) })
    }
}

impl Drop for VfioUserServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_socket(&self.path, self.bound);
    }
}

fn serve(listener: &UnixListener, backing: &FunctionBacking, stop: &AtomicBool) {
    let mut client: Option<Session> = None;
    while !stop.load(Ordering::Acquire) {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(s) = &client {
            fds.push(PollFd::new(s.stream.as_fd(), PollFlags::POLLIN));
        }
        // Bounded, so a stop request is seen within 100 ms.
        if let Err(e) = poll(&mut fds, PollTimeout::from(100u16)) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!(error = %e, "vfio-user poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let revents: Vec<PollFlags> =
            fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
        drop(fds);
        if let Some(session) = client.as_mut()
            && !revents[1].is_empty()
            && let Err(e) = session.serve_one(backing)
        {
            tracing::info!(peer = session.peer, reason = %e, "vfio-user client disconnected");
            if let Some(session) = client.take() {
                session.close(backing);
            }
        }
        if !revents[0].is_empty() {
            match listener.accept() {
                Ok((stream, _)) if client.is_some() => {
                    // A function has one user; the second is told by EOF.
                    tracing::warn!("vfio-user client refused: the function is in use");
                    drop(stream);
                }
                Ok((stream, _)) => match Session::open(stream, backing) {
                    Ok(session) => client = Some(session),
                    Err(e) => tracing::warn!(error = %e, "vfio-user client refused"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(error = %e, "accept on the vfio-user socket"),
            }
        }
    }
    if let Some(session) = client.take() {
        session.close(backing);
    }
}

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("the client closed the connection")]
    Closed,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("unusable message header: {0}")]
    Header(WireError),
    #[error("{0} file descriptors with one message, more than {max}", max = wire::MAX_MSG_FDS)]
    TooManyFds(usize),
}

/// One connected client and the function's state as it set it.
struct Session {
    stream: UnixStream,
    peer: u16,
    config: ConfigImage,
    /// ivshmem's Interrupt Mask and Status (kept, meaningless without INTx).
    intr_mask: u32,
    intr_status: u32,
    component: ComponentRegisters,
    /// DMA_MAP regions the client announced (never mapped), to bound them.
    dma_maps: u32,
}

/// A reply: its payload and the fd it carries.
struct Reply {
    payload: Vec<u8>,
    fd: Option<OwnedFd>,
}

impl Reply {
    fn empty() -> Self {
        Self { payload: Vec::new(), fd: None }
    }

    fn of(payload: &[u8]) -> Self {
        Self { payload: payload.to_vec(), fd: None }
    }
}

impl Session {
    fn open(stream: UnixStream, backing: &FunctionBacking) -> std::io::Result<Self> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        stream.set_write_timeout(Some(MESSAGE_TIMEOUT))?;
        let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_or(0, |c| u32::try_from(c.pid()).unwrap_or(0));
        let peer = backing.peers.attach(pid)?;
        backing.registers.reset();
        tracing::info!(peer, pid, "vfio-user client connected");
        Ok(Self {
            stream,
            peer,
            config: pci::function_config(&backing.identity),
            intr_mask: 0,
            intr_status: 0,
            component: ComponentRegisters::default(),
            dma_maps: 0,
        })
    }

    fn close(self, backing: &FunctionBacking) {
        backing.peers.detach(self.peer);
    }

    /// Reads one message and answers it. Err: the connection ends.
    fn serve_one(&mut self, backing: &FunctionBacking) -> Result<(), SessionEnd> {
        let mut head = [0u8; size_of::<Header>()];
        let fds = self.receive_header(&mut head)?;
        let header = Header::read_from_bytes(&head).expect("16 bytes");
        let len = header.validate().map_err(SessionEnd::Header)?;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        let command = header.command.get();
        let answer = match Request::decode(&header, &payload) {
            Ok(request) => self.handle(request, fds, backing),
            Err(e) => Err(e.into()),
        };
        let (reply_header, reply) = match answer {
            Ok(reply) => {
                tracing::trace!(command, id = header.message_id.get(), "vfio-user");
                (header.reply(reply.payload.len()), reply)
            }
            Err(refusal) => {
                tracing::debug!(command, reason = %refusal.reason, errno = refusal.errno, "vfio-user command refused");
                (header.error_reply(refusal.errno), Reply::empty())
            }
        };
        if header.wants_reply() {
            self.send(&reply_header, &reply)?;
        }
        Ok(())
    }

    /// Reads a header's 16 bytes and the fds sent with them.
    fn receive_header(&mut self, head: &mut [u8; 16]) -> Result<Vec<OwnedFd>, SessionEnd> {
        let mut cmsg = nix::cmsg_space!([RawFd; wire::MAX_MSG_FDS as usize]);
        let (got, raw, truncated) = {
            let mut iov = [IoSliceMut::new(&mut head[..])];
            let msg = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut raw = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw.extend(fds);
                }
            }
            (msg.bytes, raw, msg.flags.contains(MsgFlags::MSG_CTRUNC))
        };
        let fds = adopt_received_fds(&raw);
        if got == 0 {
            return Err(SessionEnd::Closed);
        }
        if truncated {
            return Err(SessionEnd::TooManyFds(fds.len()));
        }
        self.stream.read_exact(&mut head[got..])?;
        Ok(fds)
    }

    fn send(&mut self, header: &Header, reply: &Reply) -> Result<(), SessionEnd> {
        let mut message = header.as_bytes().to_vec();
        message.extend_from_slice(&reply.payload);
        let iov = [IoSlice::new(&message)];
        let raw: [RawFd; 1] = [reply.fd.as_ref().map_or(-1, |f| f.as_raw_fd())];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if reply.fd.is_some() { &cmsg } else { &[] };
        let sent =
            sendmsg::<()>(self.stream.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)?;
        if sent < message.len() {
            // The fd went with the first part; the rest is plain bytes.
            std::io::Write::write_all(&mut self.stream, &message[sent..])?;
        }
        Ok(())
    }

    fn handle(
        &mut self,
        request: Request<'_>,
        fds: Vec<OwnedFd>,
        backing: &FunctionBacking,
    ) -> Result<Reply, Refusal> {
        match request {
            Request::Version { major, minor, capabilities } => {
                tracing::debug!(major, minor, capabilities, "vfio-user client version");
                let mut payload = wire::Version {
                    major: wire::VERSION_MAJOR.into(),
                    minor: wire::VERSION_MINOR.into(),
                }
                .as_bytes()
                .to_vec();
                payload.extend_from_slice(wire::SERVER_CAPABILITIES.as_bytes());
                payload.push(0);
                Ok(Reply { payload, fd: None })
            }
            Request::DmaMap { address, size, .. } => {
                // At most one fd, the memory mapped; never used (see above).
                if fds.len() > 1 {
                    return Err(Refusal::new(errno::EINVAL, "DMA_MAP with more than one fd"));
                }
                if address.checked_add(size).is_none() || size == 0 {
                    return Err(Refusal::new(errno::EINVAL, "DMA_MAP range wraps or is empty"));
                }
                if self.dma_maps >= MAX_DMA_MAPS {
                    return Err(Refusal::new(errno::ENOSPC, "too many DMA mappings"));
                }
                self.dma_maps += 1;
                Ok(Reply::empty())
            }
            Request::DmaUnmap { address, size, flags } => {
                self.dma_maps = self.dma_maps.saturating_sub(1);
                let echo = wire::DmaUnmap {
                    argsz: (size_of::<wire::DmaUnmap>() as u32).into(),
                    flags: flags.into(),
                    address: address.into(),
                    size: size.into(),
                };
                Ok(Reply::of(echo.as_bytes()))
            }
            Request::DeviceGetInfo { .. } => {
                let info = DeviceInfo {
                    argsz: (size_of::<DeviceInfo>() as u32).into(),
                    flags: (wire::device::FLAG_PCI | wire::device::FLAG_RESET).into(),
                    num_regions: region::COUNT.into(),
                    num_irqs: irq::COUNT.into(),
                };
                Ok(Reply::of(info.as_bytes()))
            }
            Request::RegionInfo { argsz, index } => region_info(argsz, index, backing),
            Request::IrqInfo { index } => {
                let (flags, count) = match index {
                    irq::MSIX => (irq::INFO_EVENTFD | irq::INFO_NORESIZE, u32::from(VECTORS)),
                    i if i < irq::COUNT => (0, 0),
                    _ => return Err(Refusal::new(errno::EINVAL, "no such interrupt index")),
                };
                let info = wire::IrqInfo {
                    argsz: (size_of::<wire::IrqInfo>() as u32).into(),
                    flags: flags.into(),
                    index: index.into(),
                    count: count.into(),
                };
                Ok(Reply::of(info.as_bytes()))
            }
            Request::SetIrqs { flags, index, start, count } => {
                self.set_irqs(flags, index, start, count, fds, backing)?;
                Ok(Reply::empty())
            }
            Request::RegionRead { region, offset, count } => {
                let mut data = vec![0u8; count as usize];
                self.region_read(region, offset, &mut data, backing)?;
                let mut payload = wire::RegionAccess {
                    offset: offset.into(),
                    region: region.into(),
                    count: count.into(),
                }
                .as_bytes()
                .to_vec();
                payload.extend_from_slice(&data);
                Ok(Reply { payload, fd: None })
            }
            Request::RegionWrite { region, offset, data } => {
                self.region_write(region, offset, data, backing)?;
                let echo = wire::RegionAccess {
                    offset: offset.into(),
                    region: region.into(),
                    count: (data.len() as u32).into(),
                };
                Ok(Reply::of(echo.as_bytes()))
            }
            Request::DeviceReset => {
                // A function-level reset: this function's PCI state and
                // interrupts, not the device other clients share.
                self.config = pci::function_config(&backing.identity);
                self.intr_mask = 0;
                self.intr_status = 0;
                self.component = ComponentRegisters::default();
                for v in 0..VECTORS {
                    let _ = backing.peers.wire_vector(self.peer, v, None);
                }
                tracing::info!(peer = self.peer, "vfio-user function reset");
                Ok(Reply::empty())
            }
        }
    }

    fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
        backing: &FunctionBacking,
    ) -> Result<(), Refusal> {
        let data = flags & irq::DATA_MASK;
        let action = flags & irq::ACTION_MASK_ALL;
        if flags & !(irq::DATA_MASK | irq::ACTION_MASK_ALL) != 0
            || !data.is_power_of_two()
            || !action.is_power_of_two()
        {
            return Err(Refusal::new(
                errno::EINVAL,
                "SET_IRQS flags name one data type and one action",
            ));
        }
        if index != irq::MSIX {
            // Nothing but MSI-X exists; turning the others off is a no-op.
            return if data == irq::DATA_NONE && count == 0 {
                Ok(())
            } else {
                Err(Refusal::new(errno::EINVAL, "only MSI-X interrupts exist"))
            };
        }
        if action != irq::ACTION_TRIGGER {
            return Err(Refusal::new(errno::EINVAL, "MSI-X vectors are not maskable here"));
        }
        if data == irq::DATA_BOOL {
            return Err(Refusal::new(errno::ENOTSUP, "boolean interrupt data"));
        }
        let end = start.checked_add(count).filter(|&e| e <= u32::from(VECTORS));
        let Some(end) = end else {
            return Err(Refusal::new(errno::EINVAL, "vectors beyond the function's"));
        };
        let vectors = start as u16..end as u16;
        match data {
            irq::DATA_NONE if count == 0 => {
                // Every vector off.
                for v in 0..VECTORS {
                    let _ = backing.peers.wire_vector(self.peer, v, None);
                }
            }
            irq::DATA_NONE => {
                // A software trigger of each vector, as VFIO does.
                for v in vectors {
                    if let Some(fd) = backing.peers.vector(self.peer, v) {
                        let _ = fd.write(1);
                    }
                }
            }
            _ if fds.is_empty() => {
                // Vectors with fd -1: disconnected.
                for v in vectors {
                    let _ = backing.peers.wire_vector(self.peer, v, None);
                }
            }
            _ => {
                if fds.len() != count as usize {
                    return Err(Refusal::new(errno::EINVAL, "one eventfd per vector"));
                }
                let eventfds = fds
                    .into_iter()
                    .map(received_eventfd)
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(|_| Refusal::new(errno::EINVAL, "an fd that is not an eventfd"))?;
                for (v, fd) in vectors.zip(eventfds) {
                    backing
                        .peers
                        .wire_vector(self.peer, v, Some(fd))
                        .map_err(|_| Refusal::new(errno::EINVAL, "peer gone"))?;
                }
                tracing::debug!(peer = self.peer, start, count, "MSI-X vectors wired");
            }
        }
        Ok(())
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
        backing: &FunctionBacking,
    ) -> Result<(), Refusal> {
        match index {
            region::CONFIG => {
                let at = within(offset, data.len(), pci::CONFIG_SIZE as u64)?;
                data.copy_from_slice(&self.config.bytes[at..at + data.len()]);
            }
            region::BAR0 => {
                within(offset, data.len(), pci::IVSHMEM_BAR_SIZE)?;
                read_registers(offset, data, |word| match word {
                    ivshmem::INTR_MASK => self.intr_mask,
                    ivshmem::INTR_STATUS => self.intr_status,
                    ivshmem::IV_POSITION => u32::from(self.peer),
                    _ => 0,
                });
            }
            region::BAR1 => {
                // The MSI-X table and PBA are QEMU's; nothing else is here.
                within(offset, data.len(), pci::MSIX_BAR_SIZE)?;
                data.fill(0);
            }
            region::BAR2 => backing.region.read_bytes(offset, data).map_err(out_of_bounds)?,
            region::BAR4 => {
                within(offset, data.len(), pci::FUNCTION_BAR_SIZE)?;
                if offset < pci::COMPONENT_OFFSET {
                    backing.registers.view().read_bytes(offset, data).map_err(out_of_bounds)?;
                } else {
                    let component = &self.component;
                    read_registers(offset - pci::COMPONENT_OFFSET, data, |w| component.read(w));
                }
            }
            _ => return Err(Refusal::new(errno::EINVAL, "no such region")),
        }
        Ok(())
    }

    fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
        backing: &FunctionBacking,
    ) -> Result<(), Refusal> {
        match index {
            region::CONFIG => {
                let at = within(offset, data.len(), pci::CONFIG_SIZE as u64)?;
                self.config.write(at, data);
            }
            region::BAR0 => {
                within(offset, data.len(), pci::IVSHMEM_BAR_SIZE)?;
                if offset == ivshmem::DOORBELL && data.len() == 4 {
                    let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                    let (peer, vector) = ivshmem::decode_doorbell(value);
                    // A guest may wake the device, not signal other hosts.
                    if peer == DEVICE_PEER {
                        if let Some(fd) = backing.peers.vector(peer, vector) {
                            let _ = fd.write(1);
                        }
                    } else {
                        tracing::debug!(
                            peer = self.peer,
                            target = peer,
                            "doorbell to another peer ignored"
                        );
                    }
                } else if offset == ivshmem::INTR_MASK && data.len() == 4 {
                    self.intr_mask = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                } else if offset == ivshmem::INTR_STATUS && data.len() == 4 {
                    self.intr_status = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                }
            }
            region::BAR1 => {
                within(offset, data.len(), pci::MSIX_BAR_SIZE)?;
            }
            region::BAR2 => backing.region.write_bytes(offset, data).map_err(out_of_bounds)?,
            region::BAR4 => {
                within(offset, data.len(), pci::FUNCTION_BAR_SIZE)?;
                if offset < pci::COMPONENT_OFFSET {
                    backing.registers.view().write_bytes(offset, data).map_err(out_of_bounds)?;
                } else if data.len() == 4 && offset.is_multiple_of(4) {
                    let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                    self.component.write(offset - pci::COMPONENT_OFFSET, value);
                }
            }
            _ => return Err(Refusal::new(errno::EINVAL, "no such region")),
        }
        Ok(())
    }
}

/// Most DMA_MAP regions a client may announce (QEMU's default limit).
const MAX_DMA_MAPS: u32 = 65535;

/// A refused command: the errno of its error reply, and why (logged).
#[derive(Debug)]
struct Refusal {
    errno: u32,
    reason: String,
}

impl Refusal {
    fn new(errno: u32, reason: &str) -> Self {
        Self { errno, reason: reason.to_string() }
    }
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        Self { errno: e.errno(), reason: e.to_string() }
    }
}

fn out_of_bounds(e: pnm_protocol::OutOfBounds) -> Refusal {
    Refusal { errno: errno::EINVAL, reason: e.to_string() }
}

/// `offset..offset + len` inside `size`: the offset as an index.
fn within(offset: u64, len: usize, size: u64) -> Result<usize, Refusal> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(offset as usize),
        _ => Err(Refusal::new(errno::EINVAL, "access beyond the region")),
    }
}

/// Fills `data` (read at `offset`) from 32-bit registers `word(aligned offset)`.
fn read_registers(offset: u64, data: &mut [u8], mut word: impl FnMut(u64) -> u32) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset + i as u64;
        *byte = word(at & !3).to_le_bytes()[(at & 3) as usize];
    }
}

/// The component registers (CXL 3.1 §8.2.4): the CXL.cachemem capability
/// array, a RAS capability (status bits write-one-to-clear, masks and
/// severity read back what was written; no error is ever logged here, the
/// device reports errors through its event logs) and an HDM Decoder
/// capability with one decoder (Commit sets Committed), which Linux's CXL
/// port driver enables and programs.
#[derive(Debug, Clone, Copy)]
struct ComponentRegisters {
    uncorrectable_status: u32,
    uncorrectable_mask: u32,
    uncorrectable_severity: u32,
    correctable_status: u32,
    correctable_mask: u32,
    hdm_global: u32,
    /// Decoder 0: base, size and DPA skip (low, high each), control.
    decoder_base: [u32; 2],
    decoder_size: [u32; 2],
    decoder_skip: [u32; 2],
    decoder_control: u32,
}

impl Default for ComponentRegisters {
    fn default() -> Self {
        // The spec's reset values: every error masked, the uncorrectable
        // ones fatal; decoders off and not committed.
        Self {
            uncorrectable_status: 0,
            uncorrectable_mask: cachemem::RAS_UNCORRECTABLE_BITS,
            uncorrectable_severity: cachemem::RAS_UNCORRECTABLE_BITS,
            correctable_status: 0,
            correctable_mask: cachemem::RAS_CORRECTABLE_BITS,
            hdm_global: 0,
            decoder_base: [0; 2],
            decoder_size: [0; 2],
            decoder_skip: [0; 2],
            decoder_control: cachemem::CONTROL_TARGET_TYPE3,
        }
    }
}

impl ComponentRegisters {
    /// The 32-bit register at `offset` of the component block.
    fn read(&self, offset: u64) -> u32 {
        let array = cachemem::array();
        let cm = offset.wrapping_sub(pci::CACHEMEM_OFFSET);
        let ras = cachemem::RAS_OFFSET..cachemem::RAS_OFFSET + cachemem::RAS_SIZE;
        let hdm = cachemem::HDM_OFFSET..cachemem::HDM_OFFSET + cachemem::HDM_SIZE;
        match cm {
            _ if cm < 4 * array.len() as u64 => array[(cm / 4) as usize],
            _ if ras.contains(&cm) => match cm - ras.start {
                cachemem::RAS_UNCORRECTABLE_STATUS => self.uncorrectable_status,
                cachemem::RAS_UNCORRECTABLE_MASK => self.uncorrectable_mask,
                cachemem::RAS_UNCORRECTABLE_SEVERITY => self.uncorrectable_severity,
                cachemem::RAS_CORRECTABLE_STATUS => self.correctable_status,
                cachemem::RAS_CORRECTABLE_MASK => self.correctable_mask,
                _ => 0,
            },
            _ if hdm.contains(&cm) => self.read_hdm(cm - hdm.start),
            _ => 0,
        }
    }

    fn read_hdm(&self, reg: u64) -> u32 {
        use cachemem::*;
        match reg {
            // One decoder (count field 0), no interleave targets; address
            // bits 11:8 and 14:12 usable for interleave.
            HDM_CAPABILITY => (1 << 8) | (1 << 9),
            HDM_GLOBAL_CONTROL => self.hdm_global,
            _ if reg >= HDM_DECODER0 => match reg - HDM_DECODER0 {
                DECODER_BASE_LOW => self.decoder_base[0],
                DECODER_BASE_HIGH => self.decoder_base[1],
                DECODER_SIZE_LOW => self.decoder_size[0],
                DECODER_SIZE_HIGH => self.decoder_size[1],
                DECODER_CONTROL => self.decoder_control,
                DECODER_DPA_SKIP_LOW => self.decoder_skip[0],
                DECODER_DPA_SKIP_HIGH => self.decoder_skip[1],
                _ => 0,
            },
            _ => 0,
        }
    }

    fn write(&mut self, offset: u64, value: u32) {
        let cm = offset.wrapping_sub(pci::CACHEMEM_OFFSET);
        let (unc, cor) = (cachemem::RAS_UNCORRECTABLE_BITS, cachemem::RAS_CORRECTABLE_BITS);
        if let Some(reg) = cm.checked_sub(cachemem::RAS_OFFSET)
            && reg < cachemem::RAS_SIZE
        {
            match reg {
                cachemem::RAS_UNCORRECTABLE_STATUS => self.uncorrectable_status &= !value,
                cachemem::RAS_UNCORRECTABLE_MASK => self.uncorrectable_mask = value & unc,
                cachemem::RAS_UNCORRECTABLE_SEVERITY => self.uncorrectable_severity = value & unc,
                cachemem::RAS_CORRECTABLE_STATUS => self.correctable_status &= !value,
                cachemem::RAS_CORRECTABLE_MASK => self.correctable_mask = value & cor,
                _ => {}
            }
        } else if let Some(reg) = cm.checked_sub(cachemem::HDM_OFFSET)
            && reg < cachemem::HDM_SIZE
        {
            self.write_hdm(reg, value);
        }
    }

    fn write_hdm(&mut self, reg: u64, value: u32) {
        use cachemem::*;
        if reg == HDM_GLOBAL_CONTROL {
            self.hdm_global = value & (GLOBAL_ENABLE | GLOBAL_POISON_ON_ERROR);
            return;
        }
        let Some(reg) = reg.checked_sub(HDM_DECODER0) else { return };
        let locked = self.decoder_control & (CONTROL_LOCK_ON_COMMIT | CONTROL_COMMITTED)
            == CONTROL_LOCK_ON_COMMIT | CONTROL_COMMITTED;
        // A committed decoder's programming stays as committed: software
        // uncommits it first (and a locked one stays until reset).
        let committed = self.decoder_control & CONTROL_COMMITTED != 0;
        match reg {
            DECODER_CONTROL if !locked => {
                let commit = value & CONTROL_COMMIT != 0;
                let mut control = (value
                    & (CONTROL_IG_IW | CONTROL_LOCK_ON_COMMIT | CONTROL_COMMIT))
                    | CONTROL_TARGET_TYPE3;
                if commit {
                    control |= CONTROL_COMMITTED;
                }
                self.decoder_control = control;
            }
            DECODER_BASE_LOW if !committed => self.decoder_base[0] = value & GRANULE_BITS,
            DECODER_BASE_HIGH if !committed => self.decoder_base[1] = value,
            DECODER_SIZE_LOW if !committed => self.decoder_size[0] = value & GRANULE_BITS,
            DECODER_SIZE_HIGH if !committed => self.decoder_size[1] = value,
            DECODER_DPA_SKIP_LOW if !committed => self.decoder_skip[0] = value & GRANULE_BITS,
            DECODER_DPA_SKIP_HIGH if !committed => self.decoder_skip[1] = value,
            _ => {}
        }
    }
}

/// The region info reply for region `index`, `argsz` the room the client
/// gave for it (capabilities included).
fn region_info(argsz: u32, index: u32, backing: &FunctionBacking) -> Result<Reply, Refusal> {
    use region::{FLAG_CAPS, FLAG_MMAP, FLAG_READ, FLAG_WRITE};
    let rw = FLAG_READ | FLAG_WRITE;
    let (size, flags, fd, sparse) = match index {
        region::BAR0 => (pci::IVSHMEM_BAR_SIZE, rw, None, None),
        region::BAR1 => (pci::MSIX_BAR_SIZE, rw, None, None),
        region::BAR2 => {
            let fd = backing.region_fd.try_clone().map_err(|e| Refusal {
                errno: errno::EINVAL,
                reason: format!("duplicating the region fd: {e}"),
            })?;
            (backing.region.len(), rw | FLAG_MMAP, Some(fd), None)
        }
        region::BAR4 => {
            let fd = backing.registers.fd().map_err(|e| Refusal {
                errno: errno::EINVAL,
                reason: format!("duplicating the register block's fd: {e}"),
            })?;
            // Only the register block maps; the component registers trap.
            let area = wire::SparseArea { offset: 0.into(), size: pci::FUNCTION_REGS_SIZE.into() };
            (pci::FUNCTION_BAR_SIZE, rw | FLAG_MMAP | FLAG_CAPS, Some(fd), Some(area))
        }
        region::CONFIG => (pci::CONFIG_SIZE as u64, rw, None, None),
        i if i < region::COUNT => (0, 0, None, None),
        _ => return Err(Refusal::new(errno::EINVAL, "no such region")),
    };
    let info_size = size_of::<wire::RegionInfo>();
    let caps = sparse.map(|area| {
        let mut caps = wire::CapHeader {
            id: region::CAP_SPARSE_MMAP.into(),
            version: 1.into(),
            next: 0.into(),
        }
        .as_bytes()
        .to_vec();
        caps.extend_from_slice(
            wire::SparseMmap { nr_areas: 1.into(), reserved: 0.into() }.as_bytes(),
        );
        caps.extend_from_slice(area.as_bytes());
        caps
    });
    let needed = info_size + caps.as_ref().map_or(0, Vec::len);
    // Too little room: the size needed, and no capabilities (nor their
    // flag, which QEMU takes as a promise of them); the client asks again.
    let fits = needed <= argsz as usize;
    let flags = if fits { flags } else { flags & !FLAG_CAPS };
    let info = wire::RegionInfo {
        argsz: (needed as u32).into(),
        flags: flags.into(),
        index: index.into(),
        cap_offset: (if caps.is_some() && fits { info_size as u32 } else { 0 }).into(),
        size: size.into(),
        offset: 0.into(),
    };
    let mut payload = info.as_bytes().to_vec();
    if fits && let Some(caps) = caps {
        payload.extend_from_slice(&caps);
    }
    Ok(Reply { payload, fd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ras_status_clears_on_one_and_masks_keep_defined_bits() {
        let mut ras = ComponentRegisters::default();
        let base = pci::CACHEMEM_OFFSET + cachemem::RAS_OFFSET;
        assert_eq!(ras.read(pci::CACHEMEM_OFFSET) & 0xFFFF, cachemem::HEADER_ID);
        assert_eq!(ras.read(pci::CACHEMEM_OFFSET + 4) & 0xFFFF, cachemem::RAS_ID);
        assert_eq!(
            ras.read(base + cachemem::RAS_UNCORRECTABLE_MASK),
            cachemem::RAS_UNCORRECTABLE_BITS
        );
        ras.write(base + cachemem::RAS_UNCORRECTABLE_MASK, u32::MAX);
        assert_eq!(
            ras.read(base + cachemem::RAS_UNCORRECTABLE_MASK),
            cachemem::RAS_UNCORRECTABLE_BITS
        );
        ras.write(base + cachemem::RAS_UNCORRECTABLE_MASK, 0);
        assert_eq!(ras.read(base + cachemem::RAS_UNCORRECTABLE_MASK), 0);
        ras.correctable_status = 0b101;
        ras.write(base + cachemem::RAS_CORRECTABLE_STATUS, 0b001);
        assert_eq!(ras.read(base + cachemem::RAS_CORRECTABLE_STATUS), 0b100);
        // Outside the capabilities: zeros, writes ignored.
        ras.write(0, u32::MAX);
        assert_eq!(ras.read(0), 0);
    }

    #[test]
    fn an_hdm_decoder_commits_and_holds_its_programming_while_committed() {
        use cachemem::*;
        let mut c = ComponentRegisters::default();
        let hdm = pci::CACHEMEM_OFFSET + HDM_OFFSET;
        let d0 = hdm + HDM_DECODER0;
        assert_eq!(c.read(pci::CACHEMEM_OFFSET + 8) & 0xFFFF, HDM_ID);
        assert_eq!(c.read(hdm + HDM_CAPABILITY) & 0xF, 0, "one decoder");
        c.write(hdm + HDM_GLOBAL_CONTROL, u32::MAX);
        assert_eq!(c.read(hdm + HDM_GLOBAL_CONTROL), GLOBAL_ENABLE | GLOBAL_POISON_ON_ERROR);
        c.write(d0 + DECODER_BASE_LOW, 0x1234_5678);
        c.write(d0 + DECODER_BASE_HIGH, 0x3);
        c.write(d0 + DECODER_SIZE_LOW, 0x1000_0000);
        assert_eq!(c.read(d0 + DECODER_BASE_LOW), 0x1000_0000, "256 MiB granules");
        c.write(d0 + DECODER_CONTROL, CONTROL_COMMIT);
        let control = c.read(d0 + DECODER_CONTROL);
        assert_ne!(control & CONTROL_COMMITTED, 0);
        assert_ne!(control & CONTROL_TARGET_TYPE3, 0);
        // Committed: the range stays as it was committed.
        c.write(d0 + DECODER_BASE_HIGH, 0x7);
        assert_eq!(c.read(d0 + DECODER_BASE_HIGH), 0x3);
        // Uncommitted, it may be programmed again.
        c.write(d0 + DECODER_CONTROL, 0);
        assert_eq!(c.read(d0 + DECODER_CONTROL) & CONTROL_COMMITTED, 0);
        c.write(d0 + DECODER_BASE_HIGH, 0x7);
        assert_eq!(c.read(d0 + DECODER_BASE_HIGH), 0x7);
    }

    #[test]
    fn registers_read_at_any_offset_and_width() {
        let mut data = [0u8; 6];
        read_registers(2, &mut data, |w| match w {
            0 => 0x4433_2211,
            4 => 0x8877_6655,
            _ => 0,
        });
        assert_eq!(data, [0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    }

    #[test]
    fn accesses_beyond_a_region_are_refused_without_overflow() {
        assert!(within(u64::MAX, 4, 4096).is_err());
        assert!(within(4093, 4, 4096).is_err());
        assert_eq!(within(4092, 4, 4096).unwrap(), 4092);
    }
}
