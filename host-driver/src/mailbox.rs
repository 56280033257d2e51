//! The primary mailbox client, following the spec's caller flow
//! (CXL 3.1 §8.2.8.4.4) as Linux `cxl_pci` does.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use pnm_protocol::commands::Owner;
use pnm_protocol::regs::{mailbox, pnm};
use pnm_protocol::{Opcode, ReturnCode, SharedMemory};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::transport::Wake;

/// Default time a command may take, as in Linux.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest nap between two tries for a held Mailbox Lock: about ten
/// commands' time, so a free lock is not left idle for long.
const MAX_LOCK_NAP: Duration = Duration::from_micros(500);

/// Longest Mailbox Lock lease a host believes a device publishes.
const MAX_LOCK_LEASE: Duration = Duration::from_secs(60);

/// A fresh nonce for each Mailbox Lock acquisition: with the PID it makes
/// every lock word unique, so a holder never releases a lock that the
/// device broke and another host then took.
fn next_nonce() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start each process somewhere different: PIDs are reused.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(0, seed | 1, Relaxed, Relaxed);
    NEXT.fetch_add(1, Relaxed)
}

/// A held Mailbox Lock; released (or found broken) by [`MailboxLock::release`].
#[derive(Debug)]
struct MailboxLock {
    at: u64,
    value: u64,
}

impl MailboxLock {
    /// Takes the lock, waiting at most `bound` for its holder to release it
    /// (or for the device to break a dead or overstaying holder's).
    fn acquire(regs: SharedMemory, at: u64, bound: Duration, owner: Owner) -> Result<Self> {
        let value = pnm::mailbox_lock_value(owner.word(), next_nonce());
        let start = Instant::now();
        // Waiters sleep, with growing and jittered naps: the holder (and
        // the device) need the CPUs more than a crowd of waiters polling
        // for a word that changes once per command. Spinning or yielding
        // here, 32 processes on 2 cores ran at a third of one process's
        // rate; see PERFORMANCE.md.
        let mut nap = Duration::from_micros(20);
        let mut jitter = value ^ (value >> 29);
        loop {
            match regs.compare_exchange_u64(at, 0, value) {
                Ok(_) => return Ok(Self { at, value }),
                Err(held) => {
                    let waited = start.elapsed();
                    if waited >= bound {
                        return Err(Error::MailboxLockTimeout {
                            holder_pid: pnm::mailbox_lock_holder(held),
                            waited,
                        });
                    }
                    jitter ^= jitter << 13;
                    jitter ^= jitter >> 7;
                    jitter ^= jitter << 17;
                    let spread = nap.as_micros() as u64 / 2 + 1;
                    std::thread::sleep(nap + Duration::from_micros(jitter % spread));
                    nap = (nap * 2).min(MAX_LOCK_NAP);
                }
            }
        }
    }

    /// Releases the lock; false if it was no longer ours (the device broke
    /// it), in which case another host may have used the mailbox meanwhile.
    fn release(self, regs: SharedMemory) -> bool {
        regs.compare_exchange_u64(self.at, self.value, 0).is_ok()
    }
}

/// A client of one mailbox.
#[derive(Debug)]
pub struct MailboxClient {
    regs: SharedMemory,
    /// Offset of the mailbox capability in the register block.
    base: u64,
    /// Where the Mailbox Lock is, and the device's lease on it.
    lock_at: u64,
    lock_lease: Duration,
    payload_size: u64,
    /// Where the device's heartbeat counter is, to tell a dead device from a slow one.
    heartbeat_at: u64,
    /// Wakes a sleeping device after the doorbell.
    wake: Wake,
    pub timeout: Duration,
}

impl MailboxClient {
    pub(crate) fn new(
        regs: SharedMemory,
        base: u64,
        payload_size: u64,
        lock_at: u64,
        heartbeat_at: u64,
        wake: Wake,
    ) -> Self {
        // The device publishes its lease; a wild value must not make a wait unbounded.
        let lease_at = lock_at - pnm::MAILBOX_LOCK + pnm::MAILBOX_LOCK_LEASE;
        let lease = Duration::from_millis(u64::from(regs.load_u32(lease_at, Relaxed)));
        Self {
            regs,
            base,
            lock_at,
            lock_lease: lease.min(MAX_LOCK_LEASE),
            payload_size,
            heartbeat_at,
            wake,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Who this process is to the device (the owner of what it allocates).
    pub(crate) fn owner(&self) -> Owner {
        crate::transport::owner(self.wake.transport().as_ref())
    }

    pub fn payload_size(&self) -> u64 {
        self.payload_size
    }

    /// Runs one command and returns its output payload.
    ///
    /// The primary mailbox holds one command at a time for the whole
    /// device, so the command runs under the Mailbox Lock (PROTOCOL.md
    /// §3.4): other processes and guests wait for it, and the answer is
    /// returned only if the lock was still ours when it was read.
    pub fn execute(&mut self, opcode: Opcode, input: &[u8]) -> Result<Vec<u8>> {
        let span = tracing::debug_span!("mailbox", %opcode, input_len = input.len());
        let _entered = span.enter();
        if input.len() as u64 > self.payload_size {
            return Err(Error::InputTooLarge { opcode, len: input.len(), max: self.payload_size });
        }
        let lock = self.take_lock()?;
        let result = self.execute_locked(opcode, input, false);
        if !lock.release(self.regs) {
            tracing::warn!(%opcode, "the device broke our Mailbox Lock; the answer is discarded");
            return Err(Error::MailboxLockLost { opcode });
        }
        result
    }

    /// Takes the Mailbox Lock. A holder that stopped is broken after the
    /// lease: wait that long at most, plus one command's time.
    fn take_lock(&self) -> Result<MailboxLock> {
        MailboxLock::acquire(self.regs, self.lock_at, self.lock_lease + self.timeout, self.owner())
    }

    /// Runs `f` under the Mailbox Lock, for register operations that must
    /// not cut into another host's command (a reset).
    pub(crate) fn with_lock<R>(&mut self, f: impl FnOnce() -> R) -> Result<R> {
        let lock = self.take_lock()?;
        let result = f();
        // A broken lock changes nothing for a reset: it has happened.
        lock.release(self.regs);
        Ok(result)
    }

    /// Starts a background command (Scan Media): Ok once the device
    /// answered Background Command Started (the Background Command Status
    /// register then tells its progress).
    pub fn start_background(&mut self, opcode: Opcode, input: &[u8]) -> Result<()> {
        let lock = self.take_lock()?;
        let result = self.execute_locked(opcode, input, true);
        if !lock.release(self.regs) {
            return Err(Error::MailboxLockLost { opcode });
        }
        result.map(drop)
    }

    fn execute_locked(
        &mut self,
        opcode: Opcode,
        input: &[u8],
        background: bool,
    ) -> Result<Vec<u8>> {
        let control_at = self.base + mailbox::CONTROL;
        // A doorbell still set under the lock is a command whose caller
        // died or gave up waiting: the device still completes it.
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let control = loop {
            let control = self.regs.load_u32(control_at, Acquire);
            if control & mailbox::CONTROL_DOORBELL == 0 {
                break control;
            }
            if start.elapsed() >= self.timeout {
                return Err(Error::MailboxBusy);
            }
            backoff.wait();
        };
        self.regs
            .write_bytes(self.base + mailbox::PAYLOAD, input)
            .expect("payload fits: checked against the advertised payload size");
        // The Command register is written in one 64-bit store, as the spec requires.
        self.regs.store_u64(
            self.base + mailbox::COMMAND,
            mailbox::encode_command(opcode.0, input.len() as u32),
            Relaxed,
        );
        let heartbeat_at = self.heartbeat_at;
        let beat_before = self.regs.load_u64(heartbeat_at, Relaxed);
        // Release: payload and Command are visible before the doorbell.
        self.regs.store_u32(control_at, control | mailbox::CONTROL_DOORBELL, Release);
        self.wake.after_doorbell(true);

        let start = Instant::now();
        let mut backoff = Backoff::new();
        while self.regs.load_u32(control_at, Acquire) & mailbox::CONTROL_DOORBELL != 0 {
            let waited = start.elapsed();
            if waited >= self.timeout {
                let heartbeat_stopped = self.regs.load_u64(heartbeat_at, Relaxed) == beat_before;
                return Err(Error::Timeout { opcode, waited, heartbeat_stopped });
            }
            backoff.wait();
        }

        let status = self.regs.load_u64(self.base + mailbox::STATUS, Acquire);
        let code = ReturnCode(mailbox::status_return_code(status));
        let (_, output_len) =
            mailbox::decode_command(self.regs.load_u64(self.base + mailbox::COMMAND, Acquire));
        tracing::debug!(%code, output_len, elapsed = ?start.elapsed(), "completed");
        // Mailbox Status [0] may be set by another host's background
        // command still running; only this command's code says whether it
        // went to the background.
        if code == ReturnCode::BACKGROUND_COMMAND_STARTED {
            if background {
                return Ok(Vec::new());
            }
            return Err(Error::MalformedOutput {
                opcode,
                reason: "device started a background operation for a foreground command".into(),
            });
        }
        if !code.is_success() {
            return Err(Error::Command { opcode, code });
        }
        if u64::from(output_len) > self.payload_size {
            return Err(Error::MalformedOutput {
                opcode,
                reason: format!(
                    "output length {output_len} exceeds the payload size {}",
                    self.payload_size
                ),
            });
        }
        let mut output = vec![0u8; output_len as usize];
        self.regs
            .read_bytes(self.base + mailbox::PAYLOAD, &mut output)
            .expect("output fits: checked against the payload size");
        Ok(output)
    }
}
