//! Notifications and queues at scale through a separate pnm-device:
//! interrupts, coalescing, many queues at once, and hosts that die.

mod common;

use std::time::{Duration, Instant};

use common::{DeviceProcess, TempRegion, bin};
use pnm_host::{
    Device, DeviceOptions, Dtype, Error, InterruptConfig, KvShape, Query, QueueOptions, TopkRequest,
};
use pnm_protocol::ReturnCode;
use pnm_protocol::queue::{QueueOpcode, SubmissionEntry};

fn nop() -> SubmissionEntry {
    SubmissionEntry { opcode: QueueOpcode::NOP, ..Default::default() }
}

fn open(path: &std::path::Path, interrupts: bool) -> Device {
    let options = DeviceOptions {
        interrupts,
        // Short: a lost wake-up fails the test instead of stalling it.
        command_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Device::open_with(path, &options).unwrap()
}

#[test]
fn interrupt_waits_never_lose_a_wake_up() {
    let region = TempRegion::new("irq");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), true);
    assert!(dev.interrupts().is_some());
    // Single commands, each waited for on the interrupt vector, with idle
    // gaps so the device also goes to sleep and must be woken.
    for i in 0..400 {
        dev.nop().unwrap();
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Batches too.
    let batch = vec![nop(); 1000];
    assert_eq!(dev.submit_raw(&batch).unwrap().len(), 1000);
}

#[test]
fn coalesced_interrupts_fire_on_count_and_on_time() {
    let region = TempRegion::new("coalesce");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), false);
    let irq = InterruptConfig { vector: 3, coalesce_count: 16, coalesce_usec: 300 };
    let q = dev
        .handle(QueueOptions { entries: 64, interrupts: Some(irq), ..Default::default() })
        .unwrap();
    // Fewer completions than the count: only the timer can signal them.
    for n in [1, 3, 15] {
        let start = Instant::now();
        assert_eq!(q.submit_raw(&vec![nop(); n]).unwrap().len(), n);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{n} commands waited {:?}",
            start.elapsed()
        );
    }
    // More than the count: signalled by count, repeatedly.
    assert_eq!(q.submit_raw(&vec![nop(); 500]).unwrap().len(), 500);
}

#[test]
fn many_queues_and_threads_each_completion_matched_once() {
    let region = TempRegion::new("many");
    let _device = DeviceProcess::start(region.path(), &["--size", "128MiB"]);
    let dev = open(region.path(), false);
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 4, head_dim: 16 };
    let tokens = 600u64;
    let keys: Vec<u8> = (0..shape.bytes(tokens) / 4)
        .flat_map(|i| (((i * 7919) % 1000) as f32 / 500.0 - 1.0).to_le_bytes())
        .collect();
    let seq = dev.kv_create(shape).unwrap();
    let seq = dev.kv_append(&seq, &keys, &keys, tokens, &mut |_| {}).unwrap();
    // The answer each head must give, computed once on the default queue.
    let query: Vec<f32> = (0..16).map(|i| (i as f32 * 0.3).sin()).collect();
    let want: Vec<_> = (0..4)
        .map(|h| dev.topk(&TopkRequest::new(&seq, 0, h, &Query::f32(&query, 16), 25)).unwrap())
        .collect();
    std::thread::scope(|scope| {
        for t in 0..8u16 {
            let dev = &dev;
            let (query, want) = (&query, &want);
            scope.spawn(move || {
                let interrupts =
                    (t % 2 == 1).then_some(InterruptConfig { vector: t % 8, ..Default::default() });
                let q = dev
                    .handle(QueueOptions { entries: 16, interrupts, ..Default::default() })
                    .unwrap();
                for i in 0..150u16 {
                    let head = (t + i) % 4;
                    let got = q
                        .topk(&TopkRequest::new(&seq, 0, head, &Query::f32(query, 16), 25))
                        .unwrap();
                    assert_eq!(
                        got.indices,
                        want[usize::from(head)].indices,
                        "thread {t} command {i}"
                    );
                    // And NOP bursts larger than the 16-entry ring: backpressure.
                    if i % 50 == 0 {
                        assert_eq!(q.submit_raw(&vec![nop(); 100]).unwrap().len(), 100);
                    }
                }
            });
        }
    });
}

#[test]
fn a_host_killed_mid_flight_leaves_the_device_healthy() {
    let region = TempRegion::new("kill-host");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    // A host with 32 interrupt queues hammering the device, killed mid-run.
    let mut host = std::process::Command::new(bin("pnmctl"))
        .arg("--device")
        .arg(region.path())
        .args([
            "bench",
            "nop",
            "--interrupts",
            "--queues",
            "32",
            "--samples",
            "100000000",
            "--seconds",
            "60",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(host.try_wait().unwrap().is_none(), "the host is running");
    host.kill().unwrap();
    host.wait().unwrap();
    // A new host attaches and gets its whole share of queue pairs (half the
    // device's): the dead host's 32 (and its DMA buffers) were reclaimed.
    let dev = open(region.path(), false);
    let share = pnm_protocol::queue::MAX_QUEUE_PAIRS_PER_OWNER as usize;
    let start = Instant::now();
    let handles: Vec<Device> = loop {
        let attempt: Result<Vec<Device>, Error> = (0..share)
            .map(|_| {
                let h = dev.handle(QueueOptions { entries: 8, ..Default::default() })?;
                h.nop()?;
                Ok(h)
            })
            .collect();
        match attempt {
            Ok(handles) => break handles,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                drop(e);
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("queues of the dead host were not reclaimed: {e}"),
        }
    };
    for h in &handles {
        h.nop().unwrap();
    }
    assert!(dev.health_info().is_ok());
    // One more is past this host's share; another host still gets queues.
    let extra = dev.handle(QueueOptions { entries: 8, ..Default::default() }).unwrap();
    assert!(
        matches!(extra.nop(), Err(e) if e.return_code() == Some(ReturnCode::RESOURCES_EXHAUSTED))
    );
}

#[test]
fn long_commands_run_on_compute_units_while_the_engine_keeps_serving() {
    let region = TempRegion::new("cu");
    let _device =
        DeviceProcess::start(region.path(), &["--size", "512MiB", "--compute-units", "1"]);
    let dev = open(region.path(), false);
    // A long Top-K: 1 head of 800K f32 keys of 32 dims, 8 queries.
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 32 };
    let tokens = 800_000u64;
    let keys: Vec<u8> =
        (0..shape.bytes(tokens) / 4).flat_map(|i| ((i % 977) as f32).to_le_bytes()).collect();
    let seq = dev.kv_create(shape).unwrap();
    let seq = dev.kv_append(&seq, &keys, &keys, tokens, &mut |_| {}).unwrap();
    // A GQA group of 8: eight dot products per key makes it long.
    let query: Vec<f32> = vec![0.5; 8 * 32];
    let other = dev.handle(QueueOptions::default()).unwrap();
    other.nop().unwrap();
    let t0 = Instant::now();
    let (long_done, nop_times) = std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            let top =
                dev.topk(&TopkRequest::new(&seq, 0, 0, &Query::f32(&query, 32), 100)).unwrap();
            assert_eq!(top.tokens, tokens);
            Instant::now()
        });
        // While it runs, another queue's NOPs keep completing. (Counted,
        // not timed: on a loaded machine each may wait out a time slice.)
        std::thread::sleep(Duration::from_millis(2));
        let mut nop_times = Vec::new();
        while !long.is_finished() {
            other.nop().unwrap();
            nop_times.push(Instant::now());
        }
        (long.join().unwrap(), nop_times)
    });
    let served = nop_times.iter().filter(|&&t| t < long_done).count();
    assert!(
        served >= 3,
        "{served} NOPs completed while the Top-K ran (done at {:?})",
        long_done - t0
    );
}

#[test]
fn the_notification_socket_speaks_the_ivshmem_server_protocol() {
    let region = TempRegion::new("ivshmem");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let socket = pnm_protocol::notify::socket_path(region.path());
    let out = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ivshmem_client.py"))
        .arg(&socket)
        .arg((64u64 << 20).to_string())
        .output()
        .expect("python3 runs the ivshmem protocol client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn the_socket_path_is_never_taken_from_a_live_device_or_a_file() {
    let region = TempRegion::new("sock-a");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let socket = pnm_protocol::notify::socket_path(region.path());
    // A second device pointed at the first one's socket is refused, and the
    // first keeps its socket.
    let other = TempRegion::new("sock-b");
    // A second device on another region with `socket` as its socket: refused, saying `why`.
    let refused = |socket: &std::path::Path, why: &str| {
        let (path, socket) = (other.path().to_str().unwrap(), socket.to_str().unwrap());
        let out =
            common::run("pnm-device", &["--path", path, "--size", "64MiB", "--socket", socket]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why));
    };
    refused(&socket, "served by another device");
    assert!(open(region.path(), true).nop().is_ok(), "the first device still has its socket");
    // A regular file at the socket path is neither deleted nor replaced.
    let file = std::env::temp_dir().join(format!("cxl-pnm-not-a-socket-{}", std::process::id()));
    std::fs::write(&file, b"keep me").unwrap();
    refused(&file, "not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn clients_that_never_read_their_socket_delay_no_one() {
    let region = TempRegion::new("silent");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let socket = pnm_protocol::notify::socket_path(region.path());
    // 20 peers that connect and never read a byte.
    let silent: Vec<std::os::unix::net::UnixStream> =
        (0..20).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()).collect();
    // Every new interrupt-driven host still gets its vectors at once: its
    // handshake must finish within a 250 ms read timeout, host after host
    // (each announced to the silent peers, whose socket buffers fill up).
    for _ in 0..60 {
        let dev = Device::open_with(
            region.path(),
            &DeviceOptions {
                interrupts: true,
                mailbox_timeout: Duration::from_millis(250),
                ..Default::default()
            },
        )
        .expect("handshake despite silent peers");
        dev.nop().unwrap();
    }
    drop(silent);
}

/// A notification client in its own process (its own PID): joins, prints
/// its peer id, and on each line from stdin leaves and joins again.
const REJOINING_CLIENT: &str = r#"
import socket, struct, sys
def join():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    data = b""
    while len(data) < 16:
        data += s.recv(16 - len(data))
    print(struct.unpack("<qq", data)[1], flush=True)
    return s
s = join()
for _ in sys.stdin:
    s.close()
    s = join()
"#;

struct PeerProcess {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl PeerProcess {
    fn join(socket: &std::path::Path) -> (Self, u16) {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args(["-c", REJOINING_CLIENT])
            .arg(socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut peer = Self { child, lines };
        let id = peer.id();
        (peer, id)
    }

    fn id(&mut self) -> u16 {
        self.lines.next().expect("the client printed its id").unwrap().trim().parse().unwrap()
    }

    fn rejoin(&mut self) -> u16 {
        use std::io::Write;
        writeln!(self.child.stdin.as_mut().unwrap()).unwrap();
        self.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Peer Table entry for `id` (PROTOCOL.md §6.2), read from the region file.
fn peer_table_entry(region: &std::path::Path, id: u16) -> u32 {
    use pnm_protocol::regs::{PNM_OFFSET, pnm};
    use std::os::unix::fs::FileExt;
    let mut word = [0u8; 4];
    let at = PNM_OFFSET + pnm::PEER_TABLE + pnm::PEER_TABLE_ENTRY * u64::from(id);
    std::fs::File::open(region).unwrap().read_exact_at(&mut word, at).unwrap();
    u32::from_le_bytes(word)
}

/// Kills the device as a crash would, and waits for it to be gone.
fn crash(device: &mut DeviceProcess) {
    device.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(device.wait(Duration::from_secs(5)).is_some());
}

/// Waits (bounded) until the Peer Table entry for `id` is free.
fn wait_until_freed(region: &std::path::Path, id: u16, what: &str) {
    let start = Instant::now();
    while peer_table_entry(region, id) != 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_process_that_rejoins_a_restarted_device_gets_its_peer_id_back() {
    let region = TempRegion::new("rejoin");
    let socket = pnm_protocol::notify::socket_path(region.path());
    let mut first = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    // QEMU's part: it keeps the id its guest read, whatever a new device says.
    let (mut qemu, id) = PeerProcess::join(&socket);
    assert_eq!(peer_table_entry(region.path(), id), qemu.child.id());

    crash(&mut first);
    let mut second = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    // Another process joins first: it does not get the id held for QEMU.
    let (mut other, other_id) = PeerProcess::join(&socket);
    assert_ne!(other_id, id);
    assert_eq!(qemu.rejoin(), id, "the rejoining process gets its id back");
    assert_eq!(peer_table_entry(region.path(), id), qemu.child.id());
    assert_eq!(peer_table_entry(region.path(), other_id), other.child.id());

    // A peer that leaves frees its entry.
    qemu.kill();
    wait_until_freed(region.path(), id, "the departed peer's entry stays");
    // An id held by a process that died while no device ran is free again.
    crash(&mut second);
    other.kill();
    assert_ne!(peer_table_entry(region.path(), other_id), 0, "left by the killed device");
    let _third = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    assert_eq!(peer_table_entry(region.path(), other_id), 0);
    let (_next, next_id) = PeerProcess::join(&socket);
    assert_eq!(next_id, 1, "the lowest id, no longer held");
}

#[test]
fn interrupts_that_never_come_turn_the_queue_into_a_polled_one() {
    let region = TempRegion::new("lost-irq");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    // Long enough that waiting each command's timeout out would take minutes.
    let device = common::LostInterrupts::open(region.path(), Duration::from_secs(10));
    let start = Instant::now();
    for _ in 0..50 {
        assert!(device.submit_raw(&[nop()]).unwrap()[0].code.is_success());
    }
    assert!(!device.waits_on_interrupts(), "the queue polls after missed interrupts");
    assert_eq!(device.missed_interrupts(), 3, "three in a row, then no more waiting on them");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    // A queue whose interrupts do arrive never counts one as missed.
    let healthy = open(region.path(), true);
    for _ in 0..50 {
        healthy.nop().unwrap();
    }
    assert!(healthy.waits_on_interrupts());
    assert_eq!(healthy.missed_interrupts(), 0);
}

#[test]
fn a_held_peer_id_is_released_when_its_process_ends() {
    let region = TempRegion::new("held");
    let socket = pnm_protocol::notify::socket_path(region.path());
    let mut first = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let (mut qemu, id) = PeerProcess::join(&socket);
    crash(&mut first);
    let _second = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    // Never rejoins, and ends: the device notices within its reclaim
    // period and frees the id, which the next client may then have.
    assert_eq!(peer_table_entry(region.path(), id), qemu.child.id());
    qemu.kill();
    wait_until_freed(region.path(), id, "the hold outlived its process");
    std::thread::sleep(Duration::from_millis(50));
    let (_next, next_id) = PeerProcess::join(&socket);
    assert_eq!(next_id, id);
}

#[test]
fn an_event_log_policy_rings_every_host_when_its_log_gets_a_first_record() {
    use pnm_host::EventLog;
    use pnm_protocol::events::{EventRecord, InterruptMode, uuid};
    use zerocopy::FromZeros;
    let region = TempRegion::new("event-irq");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB", "--allow-injection"]);
    let dev = open(region.path(), true);
    let other = open(region.path(), true);
    let mut policy = [InterruptMode::None; 4];
    policy[EventLog::Failure as usize] = InterruptMode::Msi(5);
    dev.set_event_interrupt_policy(policy).unwrap();
    assert_eq!(dev.get_event_interrupt_policy().unwrap(), policy);
    let mut record = EventRecord::new_zeroed();
    record.header.uuid = uuid::GENERAL_MEDIA;
    let rung = |d: &pnm_host::Device, bound_ms| {
        d.interrupts().unwrap().wait_vector(5, Duration::from_millis(bound_ms))
    };
    // A first record rings vector 5 of every host; a second does not.
    let first = dev.inject_event(EventLog::Failure, &record).unwrap().unwrap();
    assert!(rung(&dev, 2000) && rung(&other, 2000), "both hosts are rung");
    assert!(dev.inject_event(EventLog::Failure, &record).unwrap().is_some());
    assert!(!rung(&dev, 100), "only the log's first record rings");
    // Another log, no policy: no ring.
    dev.inject_event(EventLog::Informational, &record).unwrap();
    assert!(!rung(&dev, 100));
    assert_eq!(dev.event_status(), 1 << 0 | 1 << 2);
    let got = dev.get_event_records(EventLog::Failure).unwrap();
    assert_eq!(got.records.len(), 2);
    assert_eq!(got.records[0].handle, first);
    // Emptied, the log rings again on its next record.
    dev.clear_all_event_records(EventLog::Failure).unwrap();
    dev.inject_event(EventLog::Failure, &record).unwrap();
    assert!(rung(&dev, 2000));
    // Settings the device does not do are refused and change nothing.
    let refused = |settings: &[u8]| {
        let code = dev
            .mailbox_raw(pnm_protocol::Opcode::SET_EVENT_INTERRUPT_POLICY, settings)
            .unwrap_err()
            .return_code();
        assert_eq!(code, Some(ReturnCode::INVALID_INPUT), "{settings:?}");
    };
    refused(&[0, 0, 0x52, 0]); // firmware interrupt
    refused(&[0, 0, 0x91, 0]); // vector 9 of 8
    refused(&[0, 0, 0x07, 0]); // reserved bits
    refused(&[0, 0, 0, 0, 0x11]); // a Dynamic Capacity log it does not keep
    assert_eq!(dev.get_event_interrupt_policy().unwrap(), policy);
}

#[test]
fn a_finished_scan_media_rings_the_mailbox_vector_when_the_host_asked_for_it() {
    use pnm_protocol::regs::mailbox;
    let region = TempRegion::new("bg-irq");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), true);
    let other = open(region.path(), true);
    let rung = |d: &pnm_host::Device, bound_ms| {
        d.interrupts()
            .unwrap()
            .wait_vector(mailbox::BACKGROUND_IRQ_VECTOR, Duration::from_millis(bound_ms))
    };
    let lines = dev.layout().dram_size / 64;
    // Not asked for: no ring.
    dev.scan_media(0, lines, false, Duration::from_secs(30)).unwrap();
    assert!(!rung(&dev, 100));
    dev.set_background_interrupt(true).unwrap();
    let found = dev.scan_media(0, lines, false, Duration::from_secs(30)).unwrap();
    assert!(found.records.is_empty());
    assert!(rung(&dev, 2000) && rung(&other, 2000), "every host is rung");
    // Other commands still run with the bit set (the doorbell path keeps it).
    dev.identify().unwrap();
    dev.set_background_interrupt(false).unwrap();
    dev.scan_media(0, lines, false, Duration::from_secs(30)).unwrap();
    assert!(!rung(&dev, 100));
}

#[test]
fn injection_is_refused_unless_the_device_allows_it() {
    use pnm_protocol::events::EventRecord;
    use zerocopy::FromZeros;
    let region = TempRegion::new("no-inject");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), false);
    let err = dev.inject_event(pnm_host::EventLog::Fatal, &EventRecord::new_zeroed()).unwrap_err();
    assert_eq!(err.return_code(), Some(ReturnCode::UNSUPPORTED));
    let cel: Vec<u16> = dev.command_effects_log().unwrap().iter().map(|e| e.opcode).collect();
    assert!(!cel.contains(&pnm_protocol::Opcode::INJECT_EVENT.0), "not listed when not served");
    assert_eq!(dev.event_status(), 0);
}
