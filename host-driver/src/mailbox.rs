//! The primary mailbox client, following the spec's caller flow
//! (CXL 3.1 §8.2.8.4.4) as Linux `cxl_pci` does.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use pnm_protocol::regs::mailbox;
use pnm_protocol::{Opcode, ReturnCode, SharedMemory};

use crate::error::{Error, Result};

/// Default time a command may take, as in Linux.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits with a bound: spins briefly, then yields, then sleeps, so short
/// waits are fast and long ones do not burn a core.
#[derive(Debug)]
pub(crate) struct Backoff {
    polls: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { polls: 0 }
    }

    pub(crate) fn wait(&mut self) {
        self.polls = self.polls.saturating_add(1);
        if self.polls < 1_000 {
            std::hint::spin_loop();
        } else if self.polls < 2_000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A client of one mailbox.
#[derive(Debug)]
pub struct MailboxClient {
    regs: SharedMemory,
    /// Offset of the mailbox capability in the register block.
    base: u64,
    payload_size: u64,
    /// Where the device's heartbeat counter is, to tell a dead device from a slow one.
    heartbeat_at: u64,
    pub timeout: Duration,
}

impl MailboxClient {
    pub(crate) fn new(regs: SharedMemory, base: u64, payload_size: u64, heartbeat_at: u64) -> Self {
        Self { regs, base, payload_size, heartbeat_at, timeout: DEFAULT_TIMEOUT }
    }

    pub fn payload_size(&self) -> u64 {
        self.payload_size
    }

    /// Runs one command and returns its output payload.
    pub fn execute(&mut self, opcode: Opcode, input: &[u8]) -> Result<Vec<u8>> {
        let span = tracing::debug_span!("mailbox", %opcode, input_len = input.len());
        let _entered = span.enter();
        if input.len() as u64 > self.payload_size {
            return Err(Error::InputTooLarge { opcode, len: input.len(), max: self.payload_size });
        }
        let control_at = self.base + mailbox::CONTROL;
        let control = self.regs.load_u32(control_at, Acquire);
        if control & mailbox::CONTROL_DOORBELL != 0 {
            return Err(Error::MailboxBusy);
        }
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
        if code == ReturnCode::BACKGROUND_COMMAND_STARTED
            || status & mailbox::STATUS_BACKGROUND != 0
        {
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
