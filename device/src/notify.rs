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
use pnm_protocol::notify::{DEVICE_PEER, MAX_PEERS, PROTOCOL_VERSION, VECTORS};

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

    /// Peers that left since the last call.
    pub fn take_departed(&self) -> Vec<u16> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut self.lock().departed)
    }
}

fn new_vector() -> std::io::Result<EventFd> {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(std::io::Error::from)
}

/// Sends one protocol message: an i64, optionally with one fd.
fn send(stream: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let bytes = value.to_le_bytes();
    let iov = [IoSlice::new(&bytes)];
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if fd.is_some() { &cmsg } else { &[] };
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(std::io::Error::other("short write on the notification socket"));
    }
    Ok(())
}

/// The server thread and what it shares.
#[derive(Debug)]
pub struct NotifyServer {
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Client {
    id: u16,
    stream: UnixStream,
}

impl NotifyServer {
    /// Listens on `path` (a stale socket file there is replaced). The
    /// device's own vectors are `device_vectors`; `shm` is the region's fd.
    pub fn start(
        path: &Path,
        peers: Peers,
        device_vectors: Vec<Arc<EventFd>>,
        shm: OwnedFd,
    ) -> std::io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        peers.lock().peers.insert(DEVICE_PEER, Peer { vectors: device_vectors });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pnm-notify".into())
                .spawn(move || serve(&listener, &peers, &shm, &stop))?
        };
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, peers: &Peers, shm: &OwnedFd, stop: &AtomicBool) {
    let mut clients: Vec<Client> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        fds.extend(clients.iter().map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)));
        // A bounded wait, so a stop request is seen within 100 ms.
        if let Err(e) = poll(&mut fds, PollTimeout::from(100u16)) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!(error = %e, "notification poll failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let ready: Vec<bool> =
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(fds);
        // Clients send nothing: readable means closed (or misbehaving).
        let mut gone = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            if ready[i + 1] {
                let mut buf = [0u8; 64];
                match std::io::Read::read(&mut &client.stream, &mut buf) {
                    Ok(0) | Err(_) => gone.push(i),
                    Ok(_) => tracing::debug!(peer = client.id, "ignoring bytes from a client"),
                }
            }
        }
        for i in gone.into_iter().rev() {
            let client = clients.remove(i);
            depart(peers, &clients, client.id);
        }
        if ready[0] {
            match listener.accept() {
                Ok((stream, _)) => match admit(stream, peers, shm, &clients) {
                    Ok(client) => clients.push(client),
                    Err(e) => tracing::warn!(error = %e, "notification client refused"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(error = %e, "accept on the notification socket"),
            }
        }
    }
}

/// Gives a new client its id, the region, every peer's vectors and its own.
fn admit(
    stream: UnixStream,
    peers: &Peers,
    shm: &OwnedFd,
    clients: &[Client],
) -> std::io::Result<Client> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut table = peers.lock();
    let id = (1..MAX_PEERS)
        .find(|id| !table.peers.contains_key(id))
        .ok_or_else(|| std::io::Error::other("no free peer id"))?;
    let vectors: Vec<Arc<EventFd>> =
        (0..VECTORS).map(|_| new_vector().map(Arc::new)).collect::<Result<_, _>>()?;
    send(&stream, PROTOCOL_VERSION, None)?;
    send(&stream, i64::from(id), None)?;
    send(&stream, -1, Some(shm.as_fd()))?;
    for (&peer, p) in &table.peers {
        for v in &p.vectors {
            send(&stream, i64::from(peer), Some(v.as_fd()))?;
        }
    }
    for v in &vectors {
        send(&stream, i64::from(id), Some(v.as_fd()))?;
    }
    // Tell the others about the newcomer; a client that cannot take it is
    // dropped when its connection fails.
    for other in clients {
        for v in &vectors {
            if let Err(e) = send(&other.stream, i64::from(id), Some(v.as_fd())) {
                tracing::warn!(peer = other.id, error = %e, "announcing a peer");
            }
        }
    }
    table.peers.insert(id, Peer { vectors });
    tracing::info!(peer = id, "notification peer connected");
    Ok(Client { id, stream })
}

fn depart(peers: &Peers, clients: &[Client], id: u16) {
    {
        let mut table = peers.lock();
        table.peers.remove(&id);
        table.departed.push(id);
    }
    peers.pending.store(true, Ordering::Release);
    for other in clients {
        let _ = send(&other.stream, i64::from(id), None);
    }
    tracing::info!(peer = id, "notification peer left");
}
