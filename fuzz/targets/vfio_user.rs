//! The vfio-user server as QEMU (or something pretending to be it) talks
//! to it: the input is the byte stream a client sends, as many messages as
//! it holds, then the client's end closes. Whatever arrives, the server
//! answers or closes the connection, never panics, never writes the region
//! outside the accesses it was asked for, and serves the next client.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use pnm_device::Region;
use pnm_device::notify::Peers;
use pnm_device::region::FunctionRegisters;
use pnm_device::vfio_user::{FunctionBacking, VfioUserServer};
use pnm_protocol::pci::FunctionIdentity;

fn main() {
    let dir = std::env::temp_dir().join(format!("pnm-fuzz-vfio-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("socket");
    let _ = std::fs::remove_file(&path);
    let region = Region::embedded(8 << 20, None).expect("an embedded region");
    let backing = FunctionBacking {
        peers: Peers::default(),
        region_fd: region.reopen_fd().expect("the region's fd"),
        region: region.regs(),
        registers: Arc::new(FunctionRegisters::create().expect("a register block")),
        identity: FunctionIdentity {
            vendor_id: 0x1E98,
            device_id: 0x0D93,
            serial: 1,
            region_size: region.layout.size,
            memory_size: region.layout.dram_size,
            vectors: 8,
        },
    };
    let _server = VfioUserServer::start(&path, backing).expect("the server");
    afl::fuzz!(|data: &[u8]| {
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("a read timeout");
        // The server may close before reading everything: a failed write is news, not a bug.
        let _ = stream.write_all(data);
        let _ = stream.shutdown(Shutdown::Write);
        // Until the server closes: then it has let go of this client.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
}
