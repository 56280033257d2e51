//! Notifications between hosts and the device, shaped like QEMU's ivshmem
//! server protocol so the same device can later serve an ivshmem-doorbell
//! device unchanged.
//!
//! The device listens on a Unix stream socket (by convention the region's
//! path with [`SOCKET_SUFFIX`] appended). Every participant is a *peer* with
//! [`VECTORS`] eventfds; ringing peer P's vector v is writing the u64 value 1
//! to P's eventfd v. The device is peer [`DEVICE_PEER`]; its vector
//! [`WAKE_VECTOR`] wakes a sleeping device. A host's vectors are its
//! interrupt vectors: a queue pair created with `irq_vector = v` and
//! `peer_id = P` signals P's vector v.
//!
//! Server -> client messages are one little-endian i64 each, some carrying
//! one file descriptor (SCM_RIGHTS). On connect the client receives, in order:
//! 1. [`PROTOCOL_VERSION`] (no fd);
//! 2. its own peer id (no fd);
//! 3. -1 with the shared-memory fd (the region);
//! 4. for each other peer: its id, once per vector, each with that vector's eventfd;
//! 5. its own id once per vector, each with its own eventfd.
//!
//! Later, a peer id with an fd announces a new peer's vector; a peer id
//! without an fd says that peer left. Clients never send anything; the
//! device learns a client left when its connection closes, and then deletes
//! that peer's queue pairs and DMA buffers.

/// The ivshmem server protocol version.
pub const PROTOCOL_VERSION: i64 = 0;
/// Appended to the region path to name the device's socket.
pub const SOCKET_SUFFIX: &str = ".sock";
/// Eventfds per peer.
pub const VECTORS: u16 = 8;
/// The device's own peer id.
pub const DEVICE_PEER: u16 = 0;
/// The device's vector that wakes it from sleep.
pub const WAKE_VECTOR: u16 = 0;
/// Most host peers connected at once.
pub const MAX_PEERS: u16 = 256;

/// The socket path for a region path.
pub fn socket_path(region: &std::path::Path) -> std::path::PathBuf {
    let mut s = region.as_os_str().to_owned();
    s.push(SOCKET_SUFFIX);
    s.into()
}
