//! Helpers for tests that run the real binaries as separate processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pnm_host::{Device, DeviceOptions, Transport};

/// Path of a workspace binary, built next to this test's executable.
///
/// `cargo test` builds only test harnesses for other packages, so the first
/// call in each test process runs `cargo build` for the binaries (a no-op
/// when they are fresh; cargo's own lock serialises concurrent test
/// processes). A stale binary would test old code, so this always runs.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf();
    BUILT.call_once(|| {
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "pnm-device",
                "-p",
                "pnm-tools",
                "--profile",
            ])
            .arg(&profile)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the binaries under test");
        assert!(status.success(), "building pnm-device and pnmctl failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing after cargo build", path.display());
    path
}

/// A region path unique to this test, removed on drop.
#[derive(Debug)]
pub struct TempRegion(pub PathBuf);

impl TempRegion {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/dev/shm/cxl-pnm-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempRegion {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        // A SIGKILLed device leaves its notification socket behind.
        let _ = std::fs::remove_file(pnm_protocol::notify::socket_path(&self.0));
    }
}

/// A `pnm-device` process, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct DeviceProcess {
    pub child: Child,
}

impl DeviceProcess {
    /// Starts `pnm-device` on `region` and waits until it is ready.
    pub fn start(region: &Path, extra: &[&str]) -> Self {
        let child = Command::new(bin("pnm-device"))
            .arg("--path")
            .arg(region)
            .args(extra)
            // PNM_TEST_DEVICE_LOG=debug (say) shows what a test's device did.
            .env(
                "RUST_LOG",
                std::env::var("PNM_TEST_DEVICE_LOG")
                    .unwrap_or_else(|_| "warn,pnm_device::region=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pnm-device");
        let mut process = Self { child };
        let start = Instant::now();
        loop {
            let options =
                DeviceOptions { wait_ready: Some(Duration::from_millis(50)), ..Default::default() };
            // The device also counts as ready only once it serves *this* pid.
            match Device::open_with(region, &options) {
                Ok(device) if device.status().device_pid == process.pid() => break,
                _ if start.elapsed() > Duration::from_secs(10) => {
                    panic!("pnm-device on {} did not become ready in 10 s", region.display())
                }
                _ => {
                    if let Some(status) = process.child.try_wait().expect("poll child") {
                        panic!("pnm-device exited early with {status}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal pnm-device");
    }

    /// SIGSTOP, returning once the process is actually stopped (the signal
    /// is asynchronous; a fast device could otherwise still answer).
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
        let start = Instant::now();
        loop {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "pnm-device did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub fn wait(&mut self, bound: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < bound {
            if let Some(status) = self.child.try_wait().expect("poll child") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// SIGTERM and a bounded wait: the orderly stop.
    pub fn stop(&mut self) -> Option<i32> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status.code().unwrap_or(-1));
        }
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        self.wait(Duration::from_secs(5))
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if self.stop().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a binary to completion with a bound, returning its output.
pub fn run(binary: &str, args: &[&str]) -> Output {
    let child = Command::new(bin(binary))
        .args(args)
        .env("RUST_LOG", "warn,pnm_device::region=error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = Pid::from_raw(child.id() as i32);
    // Collect on a thread so a full pipe cannot stall the bounded wait.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.expect("collect output"),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("{binary} {args:?} did not finish in 30 s");
        }
    }
}

/// Opens a device with a short mailbox timeout.
pub fn open(path: &Path, timeout: Duration) -> Device {
    Device::open_with(path, &DeviceOptions { mailbox_timeout: timeout, ..Default::default() })
        .expect("open device")
}

/// A transport whose interrupts never arrive: the region file's, with
/// interrupt waits on an eventfd nobody rings. The device still signals
/// the real peer's vectors, which no one reads: what a guest sees after a
/// device restart under QEMU's ivshmem-doorbell.
#[derive(Debug)]
pub struct LostInterrupts {
    inner: pnm_host::transport::RegionFile,
    never: nix::sys::eventfd::EventFd,
}

impl LostInterrupts {
    pub fn open(region: &Path, command_timeout: Duration) -> Device {
        use pnm_host::transport::{RegionFile, RegionFileOptions};
        let options = RegionFileOptions {
            socket: Some(pnm_protocol::notify::socket_path(region)),
            socket_required: true,
            connect_timeout: Duration::from_secs(2),
        };
        let transport = Self {
            inner: RegionFile::open(region, &options).unwrap(),
            never: nix::sys::eventfd::EventFd::from_flags(
                nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
            )
            .unwrap(),
        };
        let options = DeviceOptions { interrupts: true, command_timeout, ..Default::default() };
        Device::with_transport(region, std::sync::Arc::new(transport), &options).unwrap()
    }
}

impl Transport for LostInterrupts {
    fn region(&self) -> pnm_protocol::SharedMemory {
        self.inner.region()
    }
    fn wake_device(&self) {
        self.inner.wake_device();
    }
    fn interrupts(&self) -> Option<&dyn pnm_host::Interrupts> {
        Some(self)
    }
}

impl pnm_host::Interrupts for LostInterrupts {
    fn peer_id(&self) -> u16 {
        self.inner.interrupts().expect("connected").peer_id()
    }
    fn wait_vector(&self, _v: u16, timeout: Duration) -> bool {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(self.never.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ms = nix::poll::PollTimeout::try_from(timeout.as_millis().min(60_000) as i32)
            .unwrap_or(nix::poll::PollTimeout::MAX);
        let _ = nix::poll::poll(&mut fds, ms);
        false
    }
    fn vector_fd(&self, _v: u16) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.never.as_fd()
    }
}

#[allow(unused_imports)]
pub use pnm_tools::testdata::random_f32s;

/// xorshift64: reproducible test data without a dependency.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Multiples of 0.5 in [-1, 1]: dot products exact in f32, many ties.
    pub fn coarse(&mut self) -> f32 {
        (self.next_u64() % 5) as f32 * 0.5 - 1.0
    }
}

/// Takes ownership of a file descriptor that arrived as SCM_RIGHTS (the
/// tests' one unsafe block: a test that speaks a socket protocol with fds).
#[allow(unsafe_code)]
pub fn adopt_received_fd(raw: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    assert!(raw >= 0);
    // SAFETY: recvmsg just installed `raw` in this process for the message
    // being read; nothing else owns it, and it is adopted exactly once.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}
