//! A handle's queue session: its queue pair, its DMA buffers, and the
//! device facts every command needs (where KV frames are, the firmware's
//! limits). Made on a handle's first data-path command; a command holds
//! the session locked while it runs ([`SessionGuard`]).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use pnm_protocol::queue::{KV_FRAME_SIZE, QueueCommand};
use pnm_protocol::{RegionLayout, SharedMemory};

use crate::commands::PnmInfo;
use crate::dma::{DmaBuf, DmaPool};
use crate::error::{Error, Result};
use crate::mailbox::MailboxClient;
use crate::queue::{Completion, QueueOptions, QueuePair};
use crate::transport::Wake;

/// The device's firmware limits (Identify PNM), checked before a command
/// goes out so a refusal names the field, value and limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_k: u32,
    pub max_group: u32,
    pub max_head_dim: u32,
}

/// Refuses `value` outside `1..=max`, naming `what`.
pub(crate) fn check_limit(what: &str, value: u32, max: u32) -> Result<()> {
    if value == 0 || value > max {
        return Err(Error::Invalid(format!(
            "{what} {value} is outside this device's limit 1..={max}"
        )));
    }
    Ok(())
}

/// One handle's queue pair and DMA buffers.
#[derive(Debug)]
pub(crate) struct Session {
    pub queue: QueuePair,
    pub pool: DmaPool,
    /// Where KV frame 0 starts in device DRAM, and how many frames there are.
    pub frames_offset: u64,
    pub frame_count: u32,
    pub limits: Limits,
    /// The device this session was made on: its pid and reset count. A
    /// device that restarted or was reset since has none of its queues.
    pub identity: (u32, u32),
}

impl Session {
    /// Creates the queue pair (and its rings' buffers) `options` asks for.
    pub(crate) fn open(
        mailbox: &mut MailboxClient,
        layout: RegionLayout,
        pnm_capability: u64,
        wake: Wake,
        options: QueueOptions,
        identity: (u32, u32),
    ) -> Result<Self> {
        let info: PnmInfo = mailbox.identify_pnm(layout)?;
        if info.kv_frame_size != KV_FRAME_SIZE {
            return Err(Error::Protocol(format!(
                "KV frame size {} (expected {KV_FRAME_SIZE})",
                info.kv_frame_size
            )));
        }
        let mut pool = DmaPool::new(&layout);
        let region = wake.transport().region();
        let queue = QueuePair::create(region, pnm_capability, mailbox, &mut pool, wake, options)
            .inspect_err(|_| pool.release(mailbox))?;
        Ok(Self {
            queue,
            pool,
            frames_offset: info.kv_frames_offset,
            frame_count: info.kv_frame_count,
            limits: Limits {
                max_k: info.max_k,
                max_group: info.max_group,
                max_head_dim: info.max_head_dim,
            },
            identity,
        })
    }

    /// Deletes the queue pair and frees the buffers.
    pub(crate) fn shutdown(self, mailbox: &mut MailboxClient) {
        let mut pool = self.pool;
        if let Err(e) = self.queue.delete(mailbox) {
            tracing::warn!(error = %e, "deleting the queue pair");
            if e.device_unresponsive() {
                // Every further command would wait out its timeout too: the
                // device reclaims the rest by owner when this process ends.
                return;
            }
        }
        pool.release(mailbox);
    }
}

/// A handle's session, locked for one command, with what the command
/// needs beside it: the mailbox (for buffers), the region, the timeout.
#[derive(Debug)]
pub(crate) struct SessionGuard<'a> {
    pub(crate) slot: MutexGuard<'a, Option<Session>>,
    pub(crate) mailbox: &'a Mutex<MailboxClient>,
    pub(crate) region: SharedMemory,
    pub(crate) command_timeout: Duration,
}

impl SessionGuard<'_> {
    pub(crate) fn session(&mut self) -> &mut Session {
        self.slot.as_mut().expect("opened before the guard is handed out")
    }

    fn mailbox(&self) -> MutexGuard<'_, MailboxClient> {
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn alloc(&mut self, len: u64) -> Result<DmaBuf> {
        let mailbox = self.mailbox;
        let mut mailbox = mailbox.lock().unwrap_or_else(|e| e.into_inner());
        self.session().pool.alloc(&mut mailbox, len)
    }

    /// Queues a command without ringing the doorbell.
    pub(crate) fn push(&mut self, command: &QueueCommand) -> Result<u16> {
        self.session().queue.push(command.encode(0))
    }

    pub(crate) fn ring(&mut self) {
        self.session().queue.ring();
    }

    /// Waits for a pushed command; its failure is an error.
    pub(crate) fn wait(&mut self, cid: u16) -> Result<Completion> {
        let timeout = self.command_timeout;
        self.session().queue.wait(cid, timeout)?.ok()
    }

    pub(crate) fn run(&mut self, command: &QueueCommand) -> Result<Completion> {
        let timeout = self.command_timeout;
        self.session().queue.execute(command.encode(0), timeout)?.ok()
    }

    pub(crate) fn mem(&self) -> SharedMemory {
        self.region
    }

    /// Deletes this handle's queue pair (a new one is made on next use):
    /// for a queue whose state the host no longer knows.
    pub(crate) fn discard_queue(&mut self) {
        if let Some(session) = self.slot.take() {
            let mut mailbox = self.mailbox();
            // Bounded short, as at drop: the device may be stuck.
            let timeout = mailbox.timeout;
            mailbox.timeout = timeout.min(Duration::from_millis(500));
            session.shutdown(&mut mailbox);
            mailbox.timeout = timeout;
        }
    }
}
