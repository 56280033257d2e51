//! The device as a PCI function over vfio-user, with the real pnm-device
//! binary and a vfio-user client speaking the protocol QEMU's
//! vfio-user-pci speaks: configuration space with the CXL DVSECs, BARs
//! handed over as fds, the function's own mailbox, MSI-X wiring, the
//! doorbell, and a hostile client's messages refused without harm.

mod common;

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{DeviceProcess, TempRegion, adopt_received_fd};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use pnm_protocol::pci::{self, ivshmem};
use pnm_protocol::regs::{self, mailbox, pnm};
use pnm_protocol::vfio_user::{self as wire, Header, command, errno, irq, region};
use zerocopy::{FromBytes, IntoBytes};

/// A vfio-user client, as QEMU is one.
struct Client {
    stream: UnixStream,
    next_id: u16,
}

/// A reply: its header, payload and the fd it carried.
struct Reply {
    header: Header,
    payload: Vec<u8>,
    fd: Option<OwnedFd>,
}

impl Reply {
    fn ok(self) -> Self {
        assert_eq!(
            self.header.flags.get() & wire::flags::ERROR,
            0,
            "error reply, errno {}",
            self.header.error.get()
        );
        self
    }

    fn errno(&self) -> Option<u32> {
        (self.header.flags.get() & wire::flags::ERROR != 0).then(|| self.header.error.get())
    }
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect to the vfio-user socket");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { stream, next_id: 0 }
    }

    fn send(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        self.next_id += 1;
        let message = wire::encode_command(self.next_id, cmd, payload);
        let iov = [IoSlice::new(&message)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let sent = sendmsg::<()>(self.stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
            .expect("send");
        assert_eq!(sent, message.len());
        self.next_id
    }

    fn receive(&mut self) -> Reply {
        let mut head = [0u8; 16];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let (got, raw) = {
            let mut iov = [IoSliceMut::new(&mut head)];
            let msg = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .expect("receive a reply");
            let mut raw = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw.extend(fds);
                }
            }
            (msg.bytes, raw)
        };
        let mut fds: Vec<OwnedFd> = raw.into_iter().map(adopt_received_fd).collect();
        assert!(got > 0, "the server closed the connection");
        self.stream.read_exact(&mut head[got..]).unwrap();
        let header = Header::read_from_bytes(&head).unwrap();
        let mut payload = vec![0u8; header.message_size.get() as usize - 16];
        self.stream.read_exact(&mut payload).unwrap();
        assert_eq!(header.flags.get() & wire::flags::TYPE_MASK, wire::flags::TYPE_REPLY);
        Reply { header, payload, fd: fds.pop() }
    }

    fn call(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(cmd, payload, fds);
        let reply = self.receive();
        assert_eq!((reply.header.message_id.get(), reply.header.command.get()), (id, cmd));
        reply
    }

    fn version(&mut self) -> String {
        let mut payload = wire::Version { major: 0.into(), minor: 0.into() }.as_bytes().to_vec();
        payload.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":16}}\0");
        let reply = self.call(command::VERSION, &payload, &[]).ok();
        let (v, caps) = wire::Version::read_from_prefix(&reply.payload).unwrap();
        assert_eq!((v.major.get(), v.minor.get()), (0, 0));
        String::from_utf8(caps.strip_suffix(&[0]).expect("NUL-terminated").to_vec()).unwrap()
    }

    fn region_info(&mut self, index: u32, argsz: u32) -> Reply {
        let info =
            wire::RegionInfo { argsz: argsz.into(), index: index.into(), ..Default::default() };
        self.call(command::DEVICE_GET_REGION_INFO, info.as_bytes(), &[])
    }

    fn read(&mut self, index: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
        let access =
            wire::RegionAccess { offset: offset.into(), region: index.into(), count: count.into() };
        let reply = self.call(command::REGION_READ, access.as_bytes(), &[]);
        match reply.errno() {
            Some(e) => Err(e),
            None => Ok(reply.payload[16..].to_vec()),
        }
    }

    fn write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), u32> {
        let access = wire::RegionAccess {
            offset: offset.into(),
            region: index.into(),
            count: (data.len() as u32).into(),
        };
        let mut payload = access.as_bytes().to_vec();
        payload.extend_from_slice(data);
        match self.call(command::REGION_WRITE, &payload, &[]).errno() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn config_u32(&mut self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read(region::CONFIG, offset, 4).unwrap().try_into().unwrap())
    }

    fn set_irqs(&mut self, flags: u32, start: u32, count: u32, fds: &[RawFd]) -> Option<u32> {
        let set = wire::IrqSet {
            argsz: 20.into(),
            flags: flags.into(),
            index: irq::MSIX.into(),
            start: start.into(),
            count: count.into(),
        };
        self.call(command::DEVICE_SET_IRQS, set.as_bytes(), fds).errno()
    }
}

/// The file a received fd is, reopened by its /proc link (a new open file
/// description, so reads and writes need no unsafe mapping).
fn reopen(fd: &OwnedFd) -> (File, PathBuf) {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap();
    (file, link)
}

fn start(tag: &str) -> (TempRegion, DeviceProcess, PathBuf) {
    let region = TempRegion::new(tag);
    let socket = PathBuf::from(format!("{}.vfio-user", region.path().display()));
    let _ = std::fs::remove_file(&socket);
    let device = DeviceProcess::start(
        region.path(),
        &["--size", "512MiB", "--vfio-user", socket.to_str().unwrap()],
    );
    (region, device, socket)
}

/// Walks the extended capabilities for a CXL DVSEC, as Linux does.
fn find_dvsec(client: &mut Client, id: u16) -> Option<u64> {
    let mut at = 0x100u64;
    while at != 0 {
        let header = client.config_u32(at);
        if header as u16 == pci::EXT_CAP_DVSEC
            && client.config_u32(at + 4) as u16 == pci::CXL_VENDOR_ID
            && client.config_u32(at + 8) as u16 == id
        {
            return Some(at);
        }
        at = u64::from(header >> 20);
    }
    None
}

#[test]
fn a_client_finds_a_cxl_memory_device_and_runs_its_mailbox() {
    let (region, _device, socket) = start("vfio-user");
    let mut client = Client::connect(&socket);
    let caps = client.version();
    assert!(caps.contains("\"max_data_xfer_size\":1048576"), "{caps}");

    let info = client
        .call(
            command::DEVICE_GET_INFO,
            wire::DeviceInfo { argsz: 16.into(), ..Default::default() }.as_bytes(),
            &[],
        )
        .ok();
    let info = wire::DeviceInfo::read_from_bytes(&info.payload).unwrap();
    assert_eq!(info.num_regions.get(), region::COUNT);
    assert_eq!(info.flags.get() & wire::device::FLAG_PCI, wire::device::FLAG_PCI);

    // Configuration space: the CXL memory device class and both DVSECs.
    assert_eq!(client.config_u32(0x08) >> 8, pci::CXL_MEMORY_CLASS);
    let dvsec = find_dvsec(&mut client, pci::DVSEC_CXL_DEVICE).expect("CXL device DVSEC");
    let size_low = client.config_u32(dvsec + pci::cxl_dvsec::RANGE1_SIZE_LOW as u64);
    assert_eq!(size_low & 3, 3, "memory info valid and active");
    let locator = find_dvsec(&mut client, pci::DVSEC_REGISTER_LOCATOR).expect("Register Locator");
    let memdev_entry = client.config_u32(locator + 0x0C);
    assert_eq!(memdev_entry & 7, pci::FUNCTION_BAR);
    assert_eq!((memdev_entry >> 8) as u8, pci::REGBLOCK_MEMDEV);

    // BAR2: the region file itself, mappable.
    let bar2 = client.region_info(region::BAR2, 32).ok();
    let bar2_info = wire::RegionInfo::read_from_prefix(&bar2.payload).unwrap().0;
    assert_eq!(bar2_info.size.get(), 512 << 20);
    assert_ne!(bar2_info.flags.get() & region::FLAG_MMAP, 0);
    let (region_file, link) = reopen(bar2.fd.as_ref().expect("BAR2's fd"));
    assert_eq!(link, region.path());
    let mut magic = [0u8; 8];
    region_file.read_exact_at(&mut magic, regs::PNM_OFFSET + pnm::MAGIC).unwrap();
    assert_eq!(u64::from_le_bytes(magic), pnm::MAGIC_VALUE);

    // BAR4: asked with too little room, the size it needs and no
    // capabilities; asked again, the sparse mmap area of the register block.
    let short = client.region_info(region::BAR4, 32).ok();
    let short = wire::RegionInfo::read_from_prefix(&short.payload).unwrap().0;
    assert_eq!(short.argsz.get(), 64);
    assert_eq!(short.flags.get() & region::FLAG_CAPS, 0);
    let bar4 = client.region_info(region::BAR4, 64).ok();
    let (bar4_info, caps) = wire::RegionInfo::read_from_prefix(&bar4.payload).unwrap();
    assert_eq!(bar4_info.size.get(), pci::FUNCTION_BAR_SIZE);
    assert_eq!(bar4_info.cap_offset.get(), 32);
    let (cap, rest) = wire::CapHeader::read_from_prefix(caps).unwrap();
    assert_eq!(cap.id.get(), region::CAP_SPARSE_MMAP);
    let (sparse, rest) = wire::SparseMmap::read_from_prefix(rest).unwrap();
    assert_eq!(sparse.nr_areas.get(), 1);
    let area = wire::SparseArea::read_from_bytes(rest).unwrap();
    assert_eq!((area.offset.get(), area.size.get()), (0, pci::FUNCTION_REGS_SIZE));

    // The function's own mailbox, as cxl_pci drives it: Identify.
    let (function, _) = reopen(bar4.fd.as_ref().expect("BAR4's fd"));
    let mut status = [0u8; 8];
    function.read_exact_at(&mut status, regs::MEMDEV_STATUS_OFFSET).unwrap();
    assert_eq!(u64::from_le_bytes(status), regs::memdev_status::READY);
    let mb = regs::MAILBOX_OFFSET;
    let cmd = mailbox::encode_command(pnm_protocol::Opcode::IDENTIFY_MEMORY_DEVICE.0, 0);
    function.write_all_at(&cmd.to_le_bytes(), mb + mailbox::COMMAND).unwrap();
    function.write_all_at(&mailbox::CONTROL_DOORBELL.to_le_bytes(), mb + mailbox::CONTROL).unwrap();
    let started = Instant::now();
    loop {
        let mut control = [0u8; 4];
        function.read_exact_at(&mut control, mb + mailbox::CONTROL).unwrap();
        if u32::from_le_bytes(control) & mailbox::CONTROL_DOORBELL == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the function's mailbox never answered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut reg = [0u8; 8];
    function.read_exact_at(&mut reg, mb + mailbox::STATUS).unwrap();
    assert_eq!(mailbox::status_return_code(u64::from_le_bytes(reg)), 0, "Success");
    function.read_exact_at(&mut reg, mb + mailbox::COMMAND).unwrap();
    let (_, out_len) = mailbox::decode_command(u64::from_le_bytes(reg));
    let mut out = vec![0u8; out_len as usize];
    function.read_exact_at(&mut out, mb + mailbox::PAYLOAD).unwrap();
    let id = pnm_protocol::commands::IdentifyOutput::read_from_prefix(&out).unwrap().0;
    assert_eq!(id.total_capacity.get(), 1, "256 MiB units of device DRAM");
    // The region's own mailbox saw nothing of it.
    let mut region_cmd = [0u8; 8];
    region_file.read_exact_at(&mut region_cmd, mb + mailbox::COMMAND).unwrap();
    assert_eq!(u64::from_le_bytes(region_cmd), 0);

    // BAR0: IVPosition is this client's peer id.
    let position = client.read(region::BAR0, ivshmem::IV_POSITION, 4).unwrap();
    assert_ne!(u32::from_le_bytes(position.try_into().unwrap()), 0);

    // MSI-X: wired eventfds fire on a software trigger.
    let vectors: Vec<EventFd> =
        (0..2).map(|_| EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap()).collect();
    let raw: Vec<RawFd> = vectors.iter().map(|v| v.as_raw_fd()).collect();
    assert_eq!(client.set_irqs(irq::DATA_EVENTFD | irq::ACTION_TRIGGER, 3, 2, &raw), None);
    assert_eq!(client.set_irqs(irq::DATA_NONE | irq::ACTION_TRIGGER, 3, 2, &[]), None);
    for v in &vectors {
        assert_eq!(v.read().expect("the vector fired"), 1);
    }
}

#[test]
fn hostile_messages_get_typed_errors_and_change_nothing() {
    let (region, _device, socket) = start("vfio-user-hostile");
    let mut client = Client::connect(&socket);
    client.version();
    let before = std::fs::read(region.path()).unwrap();

    // Out of bounds, unknown regions, wrapping offsets: EINVAL, nothing written.
    assert_eq!(client.write(region::BAR2, (512 << 20) - 2, &[0xAA; 4]), Err(errno::EINVAL));
    assert_eq!(client.write(region::BAR2, u64::MAX - 1, &[0xAA; 4]), Err(errno::EINVAL));
    assert_eq!(client.read(region::CONFIG, 4094, 4), Err(errno::EINVAL));
    assert_eq!(client.read(42, 0, 4), Err(errno::EINVAL));
    assert_eq!(client.region_info(99, 32).errno(), Some(errno::EINVAL));
    // Too large a transfer: E2BIG, the payload never allocated.
    let access = wire::RegionAccess {
        offset: 0.into(),
        region: region::BAR2.into(),
        count: u32::MAX.into(),
    };
    assert_eq!(
        client.call(command::REGION_READ, access.as_bytes(), &[]).errno(),
        Some(errno::E2BIG)
    );
    // Unsupported commands and interrupt requests.
    assert_eq!(client.call(command::DMA_READ, &[0; 16], &[]).errno(), Some(errno::ENOTSUP));
    assert_eq!(
        client.set_irqs(irq::DATA_EVENTFD | irq::ACTION_TRIGGER, 7, 2, &[]),
        Some(errno::EINVAL)
    );
    assert_eq!(
        client.set_irqs(irq::DATA_BOOL | irq::ACTION_TRIGGER, 0, 1, &[]),
        Some(errno::ENOTSUP)
    );
    // An fd that is not an eventfd is refused, not written to.
    let not_eventfd = File::open(region.path()).unwrap();
    assert_eq!(
        client.set_irqs(irq::DATA_EVENTFD | irq::ACTION_TRIGGER, 0, 1, &[not_eventfd.as_raw_fd()]),
        Some(errno::EINVAL)
    );
    // The read-only identity of configuration space survives writes.
    client.write(region::CONFIG, 0, &[0xFF; 64]).unwrap();
    assert_eq!(client.config_u32(0x08) >> 8, pci::CXL_MEMORY_CLASS);
    assert_eq!(client.config_u32(0) as u16, pci::CXL_VENDOR_ID);
    // A doorbell for another peer is not rung (and does not fail).
    client
        .write(region::BAR0, ivshmem::DOORBELL, &ivshmem::encode_doorbell(5, 0).to_le_bytes())
        .unwrap();
    // The region is as it was (the heartbeat and peer table aside).
    let after = std::fs::read(region.path()).unwrap();
    let pnm_page = (regs::PNM_OFFSET as usize)..(regs::REGISTER_BLOCK_SIZE as usize);
    assert_eq!(
        before[regs::REGISTER_BLOCK_SIZE as usize..],
        after[regs::REGISTER_BLOCK_SIZE as usize..]
    );
    assert_eq!(before[..pnm_page.start], after[..pnm_page.start]);

    // A second client is refused while the first is connected.
    let mut second = UnixStream::connect(&socket).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(second.read(&mut byte).unwrap(), 0, "closed at once");

    // A header that cannot be trusted ends the connection; the function
    // then serves the next client.
    let mut bad = wire::encode_command(1, command::VERSION, &[]);
    bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    client.stream.write_all(&bad).unwrap();
    assert_eq!(client.stream.read(&mut byte).unwrap(), 0, "connection closed");
    let started = Instant::now();
    let mut next = loop {
        // The server notices the first client left within its poll period.
        let mut c = Client::connect(&socket);
        c.stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut payload = wire::Version { major: 0.into(), minor: 0.into() }.as_bytes().to_vec();
        payload.extend_from_slice(b"{}\0");
        c.send(command::VERSION, &payload, &[]);
        let mut head = [0u8; 16];
        if c.stream.read_exact(&mut head).is_ok() {
            let mut rest =
                vec![0u8; Header::read_from_bytes(&head).unwrap().message_size.get() as usize - 16];
            c.stream.read_exact(&mut rest).unwrap();
            c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            break c;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no new client admitted");
    };
    assert_eq!(next.config_u32(0x08) >> 8, pci::CXL_MEMORY_CLASS);
}

/// The guest behind a vfio-user client, as the VFIO transport is one:
/// the region mapped, what it creates owned by the client's peer.
#[derive(Debug)]
struct GuestOf {
    region: pnm_host::transport::RegionFile,
    peer: u16,
}

impl pnm_host::Transport for GuestOf {
    fn region(&self) -> pnm_protocol::SharedMemory {
        self.region.region()
    }
    fn wake_device(&self) {}
    fn interrupts(&self) -> Option<&dyn pnm_host::Interrupts> {
        None
    }
    fn guest_peer(&self) -> Option<u16> {
        Some(self.peer)
    }
}

#[test]
fn what_the_guest_owned_is_reclaimed_when_its_client_goes() {
    use pnm_host::transport::{RegionFile, RegionFileOptions};
    use pnm_host::{Device, DeviceOptions, QueueOptions};
    let (region, _device, socket) = start("vfio-user-reclaim");
    let mut client = Client::connect(&socket);
    client.version();
    let position = client.read(region::BAR0, ivshmem::IV_POSITION, 4).unwrap();
    let peer = u32::from_le_bytes(position.try_into().unwrap()) as u16;
    let options =
        RegionFileOptions { socket: None, socket_required: false, connect_timeout: Duration::ZERO };
    let transport = GuestOf { region: RegionFile::open(region.path(), &options).unwrap(), peer };
    let device_options = DeviceOptions {
        interrupts: false,
        command_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let guest =
        Device::with_transport(region.path(), std::sync::Arc::new(transport), &device_options)
            .unwrap();
    let queue = guest.handle(QueueOptions { entries: 8, ..Default::default() }).unwrap();
    queue.nop().unwrap();

    // QEMU goes away: the peer departs, its queue pair and buffers are
    // deleted, and nothing more can be created in its name.
    drop(client);
    let started = Instant::now();
    while queue.nop().is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the guest's queue outlived its client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Handles create their queue pair on first use.
    let refused = guest.handle(QueueOptions { entries: 8, ..Default::default() }).unwrap().nop();
    let refusal = refused.expect_err("a queue pair created for a departed peer").to_string();
    // The device refuses a guest owner whose peer is gone (No Such Peer in its log).
    assert!(refusal.contains("Invalid Input"), "{refusal}");
    // The device serves the next client, and hosts, as before.
    let mut next = Client::connect(&socket);
    next.version();
    assert!(common::open(region.path(), Duration::from_secs(2)).health_info().is_ok());
}
