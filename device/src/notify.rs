//! The notification server: hands out eventfds over a Unix socket the way
//! QEMU's ivshmem server does (see `pnm_protocol::notify`), and tells the
//! engine which peers left.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use pnm_protocol::SharedMemory;
use pnm_protocol::notify::{DEVICE_PEER, MAX_PEERS, PROTOCOL_VERSION, VECTORS};
use pnm_protocol::regs::{PNM_OFFSET, pnm};

use crate::engine::process_gone;

/// One peer's vectors.
#[derive(Debug)]
pub struct Peer {
    pub vectors: Vec<Arc<EventFd>>,
}

/// Peers known to the device, shared by the server thread and the engine.
#[derive(Debug, Default)]
pub struct PeerTable {
    peers: BTreeMap<u16, Peer>,
    /// Peers that left and whose resources the engine has not yet released.
    departed: Vec<u16>,
    /// Ids the Peer Table held when the device started, with the PID that
    /// held each: kept for that process while it lives, so one that
    /// reconnects (QEMU's chardev) gets its id back.
    reserved: BTreeMap<u16, u32>,
    /// Departed peers the engine is releasing: their ids are not given
    /// out again until it has, so a new client never inherits (or loses)
    /// what the old one held.
    releasing: std::collections::BTreeSet<u16>,
    /// The region's Peer Table, once the server runs.
    record: Option<PeerRecord>,
}

impl PeerTable {
    /// The id for a client whose process is `pid` (0: unknown): the one
    /// reserved for it, else the lowest that is neither connected nor
    /// reserved for a live process.
    fn choose_id(&mut self, pid: u32) -> Option<u16> {
        if pid != 0
            && let Some(&id) = self.reserved.iter().find(|&(_, &p)| p == pid).map(|(id, _)| id)
        {
            self.reserved.remove(&id);
            if !self.peers.contains_key(&id) {
                return Some(id);
            }
        }
        (1..MAX_PEERS).find(|id| {
            !self.peers.contains_key(id)
                && !self.reserved.contains_key(id)
                && !self.departed.contains(id)
                && !self.releasing.contains(id)
        })
    }

    /// Ends the holds of processes that are gone: their peers depart now
    /// (what a guest behind them owned is released), so returns whether
    /// any did.
    fn expire_holds(&mut self) -> bool {
        let gone: Vec<u16> = self
            .reserved
            .iter()
            .filter(|&(_, &pid)| process_gone(pid))
            .map(|(&id, _)| id)
            .collect();
        for id in &gone {
            self.reserved.remove(id);
            if let Some(record) = self.record {
                record.set(*id, 0);
            }
            self.departed.push(*id);
            tracing::info!(peer = id, "the process holding this peer id is gone");
        }
        !gone.is_empty()
    }
}

/// The Peer Table in the register block (PROTOCOL.md §6.2): which process
/// holds each peer id, kept in the region so it outlives the device.
#[derive(Debug, Clone, Copy)]
pub struct PeerRecord {
    regs: SharedMemory,
}

impl PeerRecord {
    pub fn new(regs: SharedMemory) -> Self {
        Self { regs }
    }

    fn at(id: u16) -> u64 {
        PNM_OFFSET + pnm::PEER_TABLE + pnm::PEER_TABLE_ENTRY * u64::from(id)
    }

    fn set(&self, id: u16, pid: u32) {
        self.regs.store_u32(Self::at(id), pid, Ordering::Release);
    }

    /// What the previous device left: the ids held by processes that
    /// still run. Every other entry is cleared.
    fn take_over(&self) -> BTreeMap<u16, u32> {
        let mut held = BTreeMap::new();
        for id in 0..MAX_PEERS {
            let pid = self.regs.load_u32(Self::at(id), Ordering::Acquire);
            if id != DEVICE_PEER && pid != 0 && !process_gone(pid) {
                held.insert(id, pid);
            } else if pid != 0 {
                self.set(id, 0);
            }
        }
        held
    }
}

/// The shared handle.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    table: Arc<Mutex<PeerTable>>,
    /// Set when `departed` is not empty, so the engine need not lock to look.
    pending: Arc<AtomicBool>,
}

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, PeerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Vector `v` of peer `peer`, to signal.
    pub fn vector(&self, peer: u16, v: u16) -> Option<Arc<EventFd>> {
        self.lock().peers.get(&peer).and_then(|p| p.vectors.get(usize::from(v)).cloned())
    }

    /// True while `peer` is connected.
    pub fn connected(&self, peer: u16) -> bool {
        self.lock().peers.contains_key(&peer)
    }

    /// Rings vector `v` of every connected host peer: a device-wide
    /// interrupt (event logs), which each host (or guest, as its MSI-X
    /// vector `v`) that cares waits on.
    pub fn ring_all(&self, v: u16) {
        let table = self.lock();
        for (&id, peer) in &table.peers {
            if id != DEVICE_PEER
                && let Some(fd) = peer.vectors.get(usize::from(v))
                && let Err(e) = fd.write(1)
            {
                tracing::warn!(peer = id, vector = v, error = %e, "signalling an event interrupt");
            }
        }
    }

    /// True while `peer` is connected, or held for the live process that
    /// had it before the device restarted (a QEMU whose ivshmem-doorbell
    /// does not connect again): what a guest behind it owns stays its own
    /// until that process ends.
    pub fn present(&self, peer: u16) -> bool {
        let table = self.lock();
        table.peers.contains_key(&peer)
            || table.reserved.get(&peer).is_some_and(|&pid| !process_gone(pid))
    }

    /// Holds `peer` for process `pid`, as a restarted device does.
    #[cfg(test)]
    pub fn hold_for(&self, peer: u16, pid: u32) {
        self.lock().reserved.insert(peer, pid);
    }

    /// Ends the holds of processes that are gone (see `expire_holds`);
    /// they show up in the next `take_departed`.
    pub fn expire_holds(&self) {
        if self.lock().expire_holds() {
            self.pending.store(true, Ordering::Release);
        }
    }

    /// Peers that left since the last call. Their ids stay out of use
    /// until [`Peers::released`] says the engine let go of what they held.
    pub fn take_departed(&self) -> Vec<u16> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut table = self.lock();
        let departed = std::mem::take(&mut table.departed);
        table.releasing.extend(&departed);
        departed
    }

    /// The engine released what departed peer `id` held.
    pub fn released(&self, id: u16) {
        self.lock().releasing.remove(&id);
    }

    /// Admits a peer that is not a notification client: a PCI function's
    /// user (QEMU, over vfio-user), process `pid`. Its vectors are unwired
    /// eventfds until [`Peers::wire_vector`] gives them the function's
    /// MSI-X eventfds; ringing an unwired vector is lost, as an interrupt
    /// of a vector the guest has not enabled is.
    pub fn attach(&self, pid: u32) -> std::io::Result<u16> {
        let mut table = self.lock();
        let id = table.choose_id(pid).ok_or_else(|| std::io::Error::other("no free peer id"))?;
        let vectors: Vec<Arc<EventFd>> =
            (0..VECTORS).map(|_| new_vector().map(Arc::new)).collect::<Result<_, _>>()?;
        table.peers.insert(id, Peer { vectors });
        if let Some(record) = table.record {
            record.set(id, pid);
        }
        Ok(id)
    }

    /// Wires vector `v` of attached peer `peer` to `fd` (None: unwired).
    pub fn wire_vector(&self, peer: u16, v: u16, fd: Option<EventFd>) -> std::io::Result<()> {
        let fd = match fd {
            Some(fd) => fd,
            None => new_vector()?,
        };
        let mut table = self.lock();
        let slot = table
            .peers
            .get_mut(&peer)
            .and_then(|p| p.vectors.get_mut(usize::from(v)))
            .ok_or_else(|| std::io::Error::other(format!("peer {peer} has no vector {v}")))?;
        *slot = Arc::new(fd);
        Ok(())
    }

    /// An attached peer left: as a notification client that disconnects,
    /// what it owned is released by the engine.
    pub fn detach(&self, id: u16) {
        if let Some(record) = self.lock().record {
            record.set(id, 0);
        }
        depart(self, id);
    }
}

fn new_vector() -> std::io::Result<EventFd> {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(std::io::Error::from)
}

/// The fd a queued message carries.
#[derive(Debug, Clone)]
enum Carried {
    None,
    /// The region's fd.
    Shm,
    Vector(Arc<EventFd>),
}

/// Most messages queued for one client before it counts as not reading its
/// socket and is disconnected: a handshake's, with room to spare.
const MAX_OUTBOX: usize = 4 * (3 + 2 * VECTORS as usize);

/// Sends one protocol message (an i64, optionally with one fd) without
/// blocking: Ok(false) if the client's socket buffer is full.
fn send(stream: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> std::io::Result<bool> {
    let bytes = value.to_le_bytes();
    let iov = [IoSlice::new(&bytes)];
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if fd.is_some() { &cmsg } else { &[] };
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    match sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, flags, None) {
        Ok(sent) if sent == bytes.len() => Ok(true),
        Ok(_) => Err(std::io::Error::other("short write on the notification socket")),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The server thread and what it shares.
#[derive(Debug)]
pub struct NotifyServer {
    pub path: PathBuf,
    /// (device, inode) of the socket this server bound: on stop it removes
    /// the path only if it still names that socket.
    bound: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Client {
    id: u16,
    stream: UnixStream,
    /// Messages not yet sent: the server never blocks on one client, so a
    /// client that stops reading delays nobody else.
    outbox: std::collections::VecDeque<(i64, Carried)>,
}

impl Client {
    fn queue(&mut self, value: i64, fd: Carried) {
        self.outbox.push_back((value, fd));
    }

    /// Sends what the socket takes now. Err: the client is gone, or it
    /// let [`MAX_OUTBOX`] messages pile up.
    fn flush(&mut self, shm: &OwnedFd) -> std::io::Result<()> {
        while let Some((value, fd)) = self.outbox.front() {
            let borrowed = match fd {
                Carried::None => None,
                Carried::Shm => Some(shm.as_fd()),
                Carried::Vector(v) => Some(v.as_fd()),
            };
            if !send(&self.stream, *value, borrowed)? {
                break;
            }
            self.outbox.pop_front();
        }
        if self.outbox.len() > MAX_OUTBOX {
            return Err(std::io::Error::other(format!(
                "{} notification messages unread: the client does not read its socket",
                self.outbox.len()
            )));
        }
        Ok(())
    }
}

impl NotifyServer {
    /// Listens on `path`. A stale socket there (nobody accepts on it) is
    /// replaced; a live one (another device's) or anything that is not a
    /// socket is refused, never deleted. The socket gets the region's
    /// access rule: owner and group only. The device's own vectors are
    /// `device_vectors`; `shm` is the region's fd.
    pub fn start(
        path: &Path,
        peers: Peers,
        device_vectors: Vec<Arc<EventFd>>,
        shm: OwnedFd,
        regs: SharedMemory,
    ) -> std::io::Result<Self> {
        let (listener, bound) = bind_socket(path)?;
        let record = PeerRecord::new(regs);
        {
            let mut table = peers.lock();
            table.peers.insert(DEVICE_PEER, Peer { vectors: device_vectors });
            table.reserved = record.take_over();
            table.record = Some(record);
            if !table.reserved.is_empty() {
                tracing::info!(
                    peers = ?table.reserved,
                    "peer ids kept for the processes that held them (peer id: pid)"
                );
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pnm-notify".into())
                .spawn(move || serve(&listener, &peers, record, &shm, &stop))?
        };
        Ok(Self { path: path.to_path_buf(), bound, stop, thread: Some(thread) })
    }
}

/// Listens on `path` (non-blocking), with the region's access rule (owner
/// and group only). A stale socket there (nobody accepts on it) is
/// replaced; a live one (another device's) or anything that is not a
/// socket is refused, never deleted. Returns the listener and the
/// (device, inode) of the socket, for [`remove_socket`].
pub(crate) fn bind_socket(path: &Path) -> std::io::Result<(UnixListener, (u64, u64))> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket; not replacing it", path.display()),
                ));
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("{} is served by another device", path.display()),
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing a stale socket");
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    let meta = std::fs::symlink_metadata(path)?;
    listener.set_nonblocking(true)?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes the socket [`bind_socket`] bound, if `path` still names it:
/// another device may have taken the path since.
pub(crate) fn remove_socket(path: &Path, bound: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == bound) {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_socket(&self.path, self.bound);
    }
}

fn serve(
    listener: &UnixListener,
    peers: &Peers,
    record: PeerRecord,
    shm: &OwnedFd,
    stop: &AtomicBool,
) {
    let mut clients: Vec<Client> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        fds.extend(clients.iter().map(|c| {
            let events = if c.outbox.is_empty() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLIN | PollFlags::POLLOUT
            };
            PollFd::new(c.stream.as_fd(), events)
        }));
        // A bounded wait, so a stop request is seen within 100 ms.
        if let Err(e) = poll(&mut fds, PollTimeout::from(100u16)) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!(error = %e, "notification poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let revents: Vec<PollFlags> =
            fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
        drop(fds);
        // Clients send nothing: readable means closed (or misbehaving).
        let mut gone = Vec::new();
        for (i, client) in clients.iter_mut().enumerate() {
            let events = revents[i + 1];
            if events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                let mut buf = [0u8; 64];
                match std::io::Read::read(&mut &client.stream, &mut buf) {
                    Ok(0) => gone.push(client.id),
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => gone.push(client.id),
                    _ => tracing::debug!(peer = client.id, "ignoring bytes from a client"),
                }
            } else if events.contains(PollFlags::POLLOUT)
                && let Err(e) = client.flush(shm)
            {
                tracing::warn!(peer = client.id, error = %e, "notification client dropped");
                gone.push(client.id);
            }
        }
        for id in gone {
            drop_client(peers, record, &mut clients, id);
        }
        if !revents[0].is_empty() {
            match listener.accept() {
                Ok((stream, _)) => match admit(stream, peers, record, &mut clients, shm) {
                    Ok(()) => {}
                    Err(e) => tracing::warn!(error = %e, "notification client refused"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(error = %e, "accept on the notification socket"),
            }
        }
    }
}

/// Disconnects client `id` if it is still connected.
fn drop_client(peers: &Peers, record: PeerRecord, clients: &mut Vec<Client>, id: u16) {
    if let Some(at) = clients.iter().position(|c| c.id == id) {
        clients.remove(at);
        record.set(id, 0);
        depart(peers, id);
    }
}

/// Gives a new client its id, the region, the device's vectors and its
/// own. Host peers talk only to the device, never to each other, so no
/// peer hears of the others: a join or a leave costs the others nothing
/// (with every peer's vectors sent to every client, 32 hosts coming and
/// going paid O(peers) fd passes per join; see PERFORMANCE.md). Nothing
/// here waits for the client.
fn admit(
    stream: UnixStream,
    peers: &Peers,
    record: PeerRecord,
    clients: &mut Vec<Client>,
    shm: &OwnedFd,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    // The connecting process, to give it back an id it held before a
    // restart (0 if the kernel cannot say).
    let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_or(0, |c| u32::try_from(c.pid()).unwrap_or(0));
    let mut client = {
        let mut table = peers.lock();
        let id = table.choose_id(pid).ok_or_else(|| std::io::Error::other("no free peer id"))?;
        let vectors: Vec<Arc<EventFd>> =
            (0..VECTORS).map(|_| new_vector().map(Arc::new)).collect::<Result<_, _>>()?;
        let mut client = Client { id, stream, outbox: Default::default() };
        client.queue(PROTOCOL_VERSION, Carried::None);
        client.queue(i64::from(id), Carried::None);
        client.queue(-1, Carried::Shm);
        if let Some(device) = table.peers.get(&DEVICE_PEER) {
            for v in &device.vectors {
                client.queue(i64::from(DEVICE_PEER), Carried::Vector(v.clone()));
            }
        }
        for v in &vectors {
            client.queue(i64::from(id), Carried::Vector(v.clone()));
        }
        table.peers.insert(id, Peer { vectors });
        record.set(id, pid);
        client
    };
    let id = client.id;
    tracing::info!(peer = id, pid, "notification peer connected");
    if let Err(e) = client.flush(shm) {
        clients.push(client);
        drop_client(peers, record, clients, id);
        return Err(e);
    }
    clients.push(client);
    Ok(())
}

fn depart(peers: &Peers, id: u16) {
    {
        let mut table = peers.lock();
        table.peers.remove(&id);
        table.departed.push(id);
    }
    peers.pending.store(true, Ordering::Release);
    tracing::info!(peer = id, "notification peer left");
}
