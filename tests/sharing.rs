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
            reserved: [0; 4],
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
