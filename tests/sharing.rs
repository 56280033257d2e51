//! Many host processes on one device: the mailbox is exclusive across
//! processes, a dead holder does not block the others, and every answer a
//! process gets is its own.
//!
//! The hammering processes are this test binary run again with
//! `PNM_SHARING_CHILD` set: the `child_*` tests do nothing without it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DeviceProcess, TempRegion, open};
use pnm_host::{Device, QueueOptions};
use pnm_protocol::Opcode;
use pnm_protocol::commands::{AllocateDmaInput, DmaBufferAddr};
use pnm_protocol::regs::{self, pnm};
use zerocopy::{FromBytes, IntoBytes};

const CHILD_ENV: &str = "PNM_SHARING_CHILD";

/// Runs this test binary's `test` in `n` processes against `region` for
/// `secs` seconds each; returns their outputs (each asserted successful).
fn run_children(test: &str, region: &Path, n: usize, secs: u64) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..n)
        .map(|i| {
            Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads", "1"])
                .env(CHILD_ENV, format!("{}:{i}:{secs}", region.display()))
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
            stdout
        })
        .collect()
}

/// (region, child index, seconds) if this process is a child.
fn child_args() -> Option<(String, u32, u64)> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    let mut parts = spec.rsplitn(3, ':');
    let secs = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    Some((parts.next()?.to_string(), index, secs))
}

/// Mailbox commands of every kind, back to back, each answer checked: an
/// answer meant for another process shows up as a wrong length, a wrong
/// value, or a DMA buffer that another process writes into.
#[test]
fn child_mailbox_hammer() {
    let Some((region, index, secs)) = child_args() else { return };
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&region).unwrap();
    let dev = open(Path::new(&region), Duration::from_secs(10));
    let info = dev.identify_pnm().unwrap();
    let health = dev.health_info().unwrap();
    let cel = dev.command_effects_log().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut commands = 0u64;
    let mut round = 0u32;
    while Instant::now() < deadline {
        round += 1;
        assert_eq!(dev.identify_pnm().unwrap(), info);
        assert_eq!(dev.get_timestamp().unwrap(), 0, "nobody sets the timestamp");
        assert_eq!(dev.health_info().unwrap(), health);
        assert_eq!(dev.command_effects_log().unwrap(), cel);
        // A buffer of a size only this child asks for, filled with a
        // pattern only this child writes: a buffer handed to two processes
        // shows as a pattern overwritten.
        let size = 4096 * u64::from(index + 1);
        let input = AllocateDmaInput {
            size: size.into(),
            owner_pid: std::process::id().into(),
            peer_id: 0.into(),
            reserved: [0; 2],
        };
        let out = dev.mailbox_raw(Opcode::ALLOCATE_DMA, input.as_bytes()).unwrap();
        let addr = DmaBufferAddr::read_from_bytes(&out).unwrap().addr.get();
        let pattern: Vec<u8> =
            (0..size).map(|i| (i as u32 ^ index.wrapping_mul(0x9E37) ^ round) as u8).collect();
        file.write_all_at(&pattern, addr).unwrap();
        std::thread::yield_now();
        let mut back = vec![0u8; size as usize];
        file.read_exact_at(&mut back, addr).unwrap();
        assert!(back == pattern, "DMA buffer {addr:#x} was written by another process");
        dev.mailbox_raw(Opcode::FREE_DMA, DmaBufferAddr { addr: addr.into() }.as_bytes()).unwrap();
        // A queue pair of its own (Create and Delete Queue Pair), used once.
        let handle = dev.handle(QueueOptions::default()).unwrap();
        handle.nop().unwrap();
        drop(handle);
        commands += 8;
    }
    println!("commands {commands}");
}

#[test]
fn the_mailbox_is_exclusive_across_processes() {
    let region = TempRegion::new("hammer");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let outputs = run_children("child_mailbox_hammer", region.path(), 6, 3);
    let total: u64 = outputs
        .iter()
        .map(|o| {
            o.lines()
                // The harness may print the test's name on the same line.
                .find_map(|l| l.split("commands ").nth(1))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .expect("child reports its command count")
        })
        .sum();
    assert!(total > 600, "only {total} mailbox commands in 3 s from 6 processes");
    // Nothing leaked: every child freed its buffers and queues.
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.status().mailbox_lock, 0);
}

/// Writes the Mailbox Lock word directly, as a host in the middle of a
/// command would have it.
fn plant_lock(region: &Path, value: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(region).unwrap();
    file.write_all_at(&value.to_le_bytes(), regs::PNM_OFFSET + pnm::MAILBOX_LOCK).unwrap();
}

#[test]
fn a_mailbox_holder_that_dies_blocks_others_for_well_under_a_second() {
    let region = TempRegion::new("deadholder");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), Duration::from_secs(2));
    // A process that holds the lock, then dies without releasing it.
    let mut holder = Command::new("sleep").arg("60").spawn().unwrap();
    plant_lock(region.path(), pnm::mailbox_lock_value(holder.id(), 7));
    let waiter = std::thread::spawn(move || {
        let result = dev.identify();
        (result.is_ok(), Instant::now(), dev.status())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "the mailbox was used while another process held it");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let (ok, answered, status) = waiter.join().unwrap();
    assert!(ok, "the waiter got its answer once the dead holder's lock was broken");
    let after = answered.duration_since(killed);
    println!("answered {after:?} after the lock holder died");
    assert!(after < Duration::from_secs(1), "waited {after:?} after the holder died");
    assert_eq!(status.mailbox_lock_breaks, 1);
}

#[test]
fn a_mailbox_holder_that_hangs_is_broken_after_the_lease() {
    let region = TempRegion::new("hungholder");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = open(region.path(), Duration::from_secs(2));
    // The holder is alive (this process) but never releases.
    plant_lock(region.path(), pnm::mailbox_lock_value(std::process::id(), 9));
    let start = Instant::now();
    dev.identify().expect("answered once the lease ran out");
    let waited = start.elapsed();
    let lease = Duration::from_millis(pnm::MAILBOX_LOCK_LEASE_MS.into());
    assert!(waited >= lease - Duration::from_millis(100), "lock broken early: {waited:?}");
    assert!(waited < lease + Duration::from_secs(1), "lock broken late: {waited:?}");
    assert_eq!(dev.status().mailbox_lock_breaks, 1);
}

const APPEND_HEADS: u16 = 2;
const APPEND_DIM: u16 = 64;
/// Tokens each killed appender tries to add: several KV_APPEND chunks.
const CHILD_TOKENS: u64 = 40_000;

fn append_shape() -> pnm_host::KvShape {
    pnm_host::KvShape {
        dtype: pnm_protocol::Dtype::F16,
        layers: 1,
        heads: APPEND_HEADS,
        head_dim: APPEND_DIM,
    }
}

/// K and V rows ([1][heads][tokens][dim], f16) that only `seed` writes.
fn append_rows(seed: u64, tokens: u64) -> (Vec<u8>, Vec<u8>) {
    let n = (tokens * u64::from(APPEND_HEADS) * u64::from(APPEND_DIM)) as usize;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        half::f16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0).to_le_bytes()
    };
    let keys = (0..n).flat_map(|_| next()).collect();
    let values = (0..n).flat_map(|_| next()).collect();
    (keys, values)
}

/// One stream's rows `[from, from + tokens)` of a `[heads][tokens][dim]` array.
fn stream_rows(rows: &[u8], tokens: u64, head: u16) -> &[u8] {
    let row = usize::from(APPEND_DIM) * 2;
    let start = usize::from(head) * tokens as usize * row;
    &rows[start..start + tokens as usize * row]
}

/// Starts [`child_appender`] on `seq` with rows of `seed`; returns once it
/// is about to append.
fn start_appender(region: &Path, seed: u64, seq: u32) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_appender", "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, format!("{}:{seed}:{seq}", region.display()))
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("start") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "appender exited before starting");
    }
    // Keep reading: a closed pipe would fail the appender's next print.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// A random number below its argument, from `seed`.
fn xorshift(mut state: u64) -> impl FnMut(u64) -> u64 {
    move |bound| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound.max(1)
    }
}

/// Every row stored in `seq`, per head, equals `expected` (K rows, V rows).
fn assert_rows(dev: &Device, seq: &pnm_host::Sequence, expected: &[(Vec<u8>, Vec<u8>)]) {
    let tokens = dev.kv_sequence(seq.id).unwrap().tokens;
    for head in 0..APPEND_HEADS {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for start in (0..tokens as u32).step_by(4096) {
            let indices: Vec<u32> = (start..(start + 4096).min(tokens as u32)).collect();
            let rows = dev.gather(seq, 0, head, &indices).unwrap();
            keys.extend_from_slice(&rows.keys);
            values.extend_from_slice(&rows.values);
        }
        let (want_k, want_v) = &expected[usize::from(head)];
        assert!(&keys == want_k, "head {head}: stored keys differ from the completed appends'");
        assert!(&values == want_v, "head {head}: stored values differ from the completed appends'");
    }
}

/// Appends [`CHILD_TOKENS`] rows of its seed to the sequence it is given.
#[test]
fn child_appender() {
    let Some((region, seed, seq)) = child_args() else { return };
    let dev = Device::open(&region).unwrap();
    let sequence = dev.kv_sequence(seq as u32).unwrap();
    let (keys, values) = append_rows(u64::from(seed), CHILD_TOKENS);
    println!("start");
    dev.kv_append(&sequence, &keys, &values, CHILD_TOKENS, &mut |_| {}).unwrap();
    println!("appended");
}

#[test]
fn appenders_killed_at_random_moments_leave_exactly_the_rows_of_completed_appends() {
    let region = TempRegion::new("killappend");
    let _device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let seq = dev.kv_create(append_shape()).unwrap();
    // What the sequence must hold: per head, K rows and V rows in order.
    let mut expected = vec![(Vec::new(), Vec::new()); usize::from(APPEND_HEADS)];
    let add = |rows: &(Vec<u8>, Vec<u8>), tokens: u64, expected: &mut Vec<(Vec<u8>, Vec<u8>)>| {
        for (h, (k, v)) in expected.iter_mut().enumerate() {
            k.extend_from_slice(stream_rows(&rows.0, tokens, h as u16));
            v.extend_from_slice(stream_rows(&rows.1, tokens, h as u16));
        }
    };
    let mut random = xorshift(0x2545_F491_4F6C_DD1D);
    let (mut completed, mut rolled_back) = (0, 0);
    let mut append_time = Duration::ZERO;
    for round in 0..21u64 {
        let before = dev.kv_sequence(seq.id).unwrap().tokens;
        let mut child = start_appender(region.path(), round, seq.id);
        let started = Instant::now();
        if round == 0 {
            // The first runs to the end: how long an append takes here.
            assert!(child.wait().unwrap().success());
            append_time = started.elapsed();
        } else {
            // SIGKILL at a random moment of the append (or just after it).
            let at = random(append_time.as_micros() as u64 * 6 / 5);
            std::thread::sleep(Duration::from_micros(at));
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let after = dev.kv_sequence(seq.id).unwrap().tokens;
        let rows = append_rows(round, CHILD_TOKENS);
        if after == before + CHILD_TOKENS {
            completed += 1;
            add(&rows, CHILD_TOKENS, &mut expected);
        } else {
            assert_eq!(after, before, "round {round}: a killed append left a part of its rows");
            rolled_back += 1;
        }
        // Another process appends next, at once: it waits (bounded) for the
        // dead appender's reservation to be rolled back, then lands after
        // exactly the committed rows.
        let own = append_rows(1000 + round, 300);
        let current = dev.kv_sequence(seq.id).unwrap();
        let grown = dev.kv_append(&current, &own.0, &own.1, 300, &mut |_| {}).unwrap();
        assert_eq!(grown.tokens, after + 300);
        add(&own, 300, &mut expected);
    }
    println!(
        "{completed} appends completed, {rolled_back} killed midway (append: {append_time:?})"
    );
    assert!(rolled_back >= 5, "too few kills landed inside an append to test anything");

    // Every stored row, compared with its source.
    assert_rows(&dev, &seq, &expected);
}

/// The load test (tests/load_sharing.py) in small: 8 concurrent `pnmctl
/// topk` processes for 5 s, every answer checked against NumPy. The full
/// run (32 processes, 60 s) and its figures are in docs/PERFORMANCE.md.
#[test]
#[cfg_attr(not(numpy), ignore = "skipped: python3 with numpy is not available (pip install numpy)")]
fn concurrent_pnmctl_processes_all_get_numpy_checked_answers() {
    let region = TempRegion::new("load");
    let _device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/load_sharing.py"))
        .arg("--pnmctl")
        .arg(common::bin("pnmctl"))
        .arg("--pnm-device")
        .arg(common::bin("pnm-device"))
        .arg("--device")
        .arg(region.path())
        .args(["--procs", "8", "--seconds", "5", "--alone-seconds", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn devices_killed_at_random_moments_of_an_append_keep_exactly_the_completed_rows() {
    let region = TempRegion::new("killdevice");
    let mut device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    let seq = Device::open(region.path()).unwrap().kv_create(append_shape()).unwrap();
    let mut expected = vec![(Vec::new(), Vec::new()); usize::from(APPEND_HEADS)];
    let add = |rows: &(Vec<u8>, Vec<u8>), expected: &mut Vec<(Vec<u8>, Vec<u8>)>| {
        for (h, (k, v)) in expected.iter_mut().enumerate() {
            k.extend_from_slice(stream_rows(&rows.0, CHILD_TOKENS, h as u16));
            v.extend_from_slice(stream_rows(&rows.1, CHILD_TOKENS, h as u16));
        }
    };
    let mut random = xorshift(0x9E37_79B9_7F4A_7C15);
    let (mut completed, mut rolled_back) = (0, 0);
    let mut append_time = Duration::ZERO;
    for round in 0..11u64 {
        let before = Device::open(region.path()).unwrap().kv_sequence(seq.id).unwrap().tokens;
        let mut child = start_appender(region.path(), 500 + round, seq.id);
        let started = Instant::now();
        if round == 0 {
            assert!(child.wait().unwrap().success());
            append_time = started.elapsed();
        } else {
            // The device dies at a random moment of the append; its host
            // with it (it would only wait out its timeout).
            std::thread::sleep(Duration::from_micros(random(append_time.as_micros() as u64)));
            device.signal(nix::sys::signal::Signal::SIGKILL);
            device.wait(Duration::from_secs(5)).expect("killed device exits");
            let _ = child.kill();
            child.wait().unwrap();
            device = DeviceProcess::start(region.path(), &[]);
        }
        let after = Device::open(region.path()).unwrap().kv_sequence(seq.id).unwrap().tokens;
        if after == before + CHILD_TOKENS {
            completed += 1;
            add(&append_rows(500 + round, CHILD_TOKENS), &mut expected);
        } else {
            assert_eq!(after, before, "round {round}: a part of an append survived the device");
            rolled_back += 1;
        }
    }
    println!("{completed} appends completed, {rolled_back} cut by a device kill");
    assert!(rolled_back >= 3, "too few kills landed inside an append to test anything");
    let dev = Device::open(region.path()).unwrap();
    assert_rows(&dev, &seq, &expected);
}
