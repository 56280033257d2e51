//! The notification socket's greeting as a host reads it from a device (or
//! something pretending to be one): `[value i64][flags u8]...` messages,
//! flags [0] attaching an fd and [1] cutting the message short. Whatever
//! arrives, connecting answers a client or a typed error, never panics, and
//! a client it accepts has all its vectors and the peer id it was given.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use pnm_host::notify::NotifyClient;
use pnm_protocol::notify::VECTORS;

fn main() {
    let dir = std::env::temp_dir().join(format!("pnm-fuzz-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("socket");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the socket");
    let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("an eventfd");
    afl::fuzz!(|data: &[u8]| {
        let messages: Vec<(i64, u8)> = data
            .chunks_exact(9)
            .take(64)
            .map(|m| (i64::from_le_bytes(m[..8].try_into().expect("8 bytes")), m[8]))
            .collect();
        let peer = messages.get(1).map(|m| m.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let Ok((stream, _)) = listener.accept() else { return };
                for &(value, flags) in &messages {
                    let bytes = value.to_le_bytes();
                    let len = if flags & 2 != 0 { 7 } else { 8 };
                    let iov = [IoSlice::new(&bytes[..len])];
                    let fds = [fd.as_raw_fd()];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    let cmsgs: &[ControlMessage<'_>] = if flags & 1 != 0 { &cmsg } else { &[] };
                    if sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
                        .is_err()
                    {
                        return;
                    }
                }
                // Closing ends the greeting: the client sees EOF, not a wait.
            });
            if let Ok(client) = NotifyClient::connect(&path, Duration::from_millis(200)) {
                assert_eq!(Some(i64::from(client.peer_id)), peer);
                assert_eq!(client.vectors.len(), usize::from(VECTORS));
            }
        });
    });
}
