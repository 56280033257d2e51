//! The host end of the notification protocol (`pnm_protocol::notify`):
//! connects to the device's socket and receives eventfds: the device's wake
//! vector, to ring when it sleeps, and this host's own interrupt vectors.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use pnm_protocol::notify::{DEVICE_PEER, PROTOCOL_VERSION, VECTORS, WAKE_VECTOR};

use crate::error::{Error, Result};

/// What the device handed this host.
#[derive(Debug)]
pub struct NotifyClient {
    pub peer_id: u16,
    /// The device's wake vector.
    pub device_wake: OwnedFd,
    /// This host's interrupt vectors.
    pub vectors: Vec<OwnedFd>,
    /// Kept open: the device deletes this peer's queues when it closes.
    stream: UnixStream,
}

fn protocol(reason: impl Into<String>) -> Error {
    Error::Protocol(format!("notification socket: {}", reason.into()))
}

/// Receives one message: an i64 and at most one fd.
fn receive(stream: &UnixStream) -> Result<(i64, Option<OwnedFd>)> {
    let mut value = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut value)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg =
        recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| protocol(e.to_string()))?;
    if msg.bytes != 8 {
        return Err(protocol(format!("{} bytes, expected an 8-byte message", msg.bytes)));
    }
    let mut fd = None;
    for cmsg in msg.cmsgs().map_err(|e| protocol(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // Own every received fd (so extras are closed), keep the first.
                let owned = crate::sys::own_received_fd(raw);
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    Ok((i64::from_le_bytes(value), fd))
}

impl NotifyClient {
    /// Connects and reads the greeting, within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let stream =
            UnixStream::connect(path).map_err(|error| Error::Open { path: path.into(), error })?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| protocol(e.to_string()))?;
        let (version, _) = receive(&stream)?;
        if version != PROTOCOL_VERSION {
            return Err(protocol(format!("protocol version {version}")));
        }
        let (own, _) = receive(&stream)?;
        let peer_id = u16::try_from(own).map_err(|_| protocol(format!("peer id {own}")))?;
        let (minus_one, shm) = receive(&stream)?;
        if minus_one != -1 || shm.is_none() {
            return Err(protocol("no shared-memory fd"));
        }
        // Other peers' vectors, then ours (VECTORS messages with our id).
        let mut device = Vec::new();
        let mut vectors = Vec::new();
        while vectors.len() < usize::from(VECTORS) {
            let (peer, fd) = receive(&stream)?;
            let fd = fd.ok_or_else(|| protocol(format!("peer {peer} announced without an fd")))?;
            if peer == i64::from(peer_id) {
                vectors.push(fd);
            } else if peer == i64::from(DEVICE_PEER) {
                device.push(fd);
            }
        }
        let device_wake = device
            .into_iter()
            .nth(usize::from(WAKE_VECTOR))
            .ok_or_else(|| protocol("the device announced no wake vector"))?;
        stream.set_nonblocking(true).map_err(|e| protocol(e.to_string()))?;
        Ok(Self { peer_id, device_wake, vectors, stream })
    }

    /// Reads and drops later announcements (other peers coming and going),
    /// so their fds do not pile up in the socket.
    pub fn drain(&self) {
        while let Ok((_, fd)) = receive(&self.stream) {
            drop(fd);
        }
    }

    /// Rings the device's wake vector.
    pub fn wake_device(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(self.device_wake.as_fd(), &one);
    }

    /// Waits (bounded) until vector `v` is rung; returns whether it was.
    pub fn wait_vector(&self, v: u16, timeout: Duration) -> bool {
        let fd = &self.vectors[usize::from(v)];
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let rung = matches!(poll(&mut fds, ms), Ok(n) if n > 0);
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(fd, &mut buf);
        rung
    }

    /// This host's vector `v`.
    pub fn vector(&self, v: u16) -> &OwnedFd {
        &self.vectors[usize::from(v)]
    }
}
