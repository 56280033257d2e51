//! A queue pair seen from the host: fills the submission ring, rings the
//! doorbell, and consumes the completion ring by phase tag.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::time::{Duration, Instant};

use pnm_protocol::commands::{
    CreateQueuePairInput, CreateQueuePairOutput, DeleteQueuePairInput, QUEUE_PRIORITY_HIGH,
    QUEUE_PRIORITY_NORMAL,
};
use pnm_protocol::queue::{
    self, CQE_SIZE, CompletionEntry, IRQ_NONE, QueueOpcode, SQE_SIZE, SubmissionEntry,
};
use pnm_protocol::regs::pnm;
use pnm_protocol::{Opcode, ReturnCode, SharedMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::backoff::{Backoff, RecentExec};
use crate::dma::{DmaBuf, DmaPool};
use crate::error::{Error, Result};
use crate::mailbox::MailboxClient;
use crate::transport::Wake;

/// A finished command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub command_id: u16,
    pub opcode: QueueOpcode,
    pub code: ReturnCode,
    pub result0: u32,
    pub result1: u32,
    pub result2: u64,
    /// Nanoseconds the emulator spent on the command.
    pub exec_ns: u64,
    /// Nanoseconds the device's timing model says its hardware would take.
    pub model_ns: u64,
}

impl Completion {
    /// The completion as a result: Ok if the device reported success.
    pub fn ok(self) -> Result<Self> {
        match self.code {
            code if code.is_success() => Ok(self),
            ReturnCode::MEDIA_ERROR => Err(Error::MediaError {
                command: opcode_name(self.opcode),
                first_token: u64::from(self.result1),
                tokens: u64::from(self.result0),
                dpa: self.result2,
            }),
            code => Err(Error::Queue { command: opcode_name(self.opcode), code }),
        }
    }
}

pub fn opcode_name(op: QueueOpcode) -> &'static str {
    op.name().unwrap_or("unknown command")
}

/// Interrupts for a queue pair: which of this host's vectors, and how the
/// device coalesces them. Queues waited on by different threads need
/// different vectors: a waiter consumes its vector's count when it wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptConfig {
    pub vector: u16,
    /// Signal once this many completions are pending (1: every completion).
    pub coalesce_count: u16,
    /// Signal at the latest this long after the first pending completion.
    pub coalesce_usec: u32,
}

impl Default for InterruptConfig {
    fn default() -> Self {
        Self { vector: 0, coalesce_count: 1, coalesce_usec: 0 }
    }
}

/// How long an interrupt waiter sleeps before it looks at the ring itself
/// (plus the queue's coalescing time).
const INTERRUPT_CHECK: Duration = Duration::from_millis(50);
/// How long after finding a completion the waiter still waits for its
/// interrupt before it counts the interrupt as missed.
const MISSED_GRACE: Duration = Duration::from_millis(10);
/// Missed interrupts in a row after which a queue polls instead.
const MISSES_BEFORE_POLLING: u32 = 3;

/// Tells a lost interrupt from a slow command, for the sync and async
/// waiters alike. A waiter sleeps on its vector at most
/// [`MissedInterrupts::check_interval`], then looks at the completion ring
/// while the queue is still unmasked: a completion there has its interrupt
/// on the way, and if none arrives within [`MissedInterrupts::grace`] it
/// was lost. After [`MISSES_BEFORE_POLLING`] in a row the queue polls from
/// then on, so a host whose interrupts stopped arriving (a guest after the
/// device restarted: QEMU's ivshmem-doorbell keeps the first device's
/// eventfds for its MSI-X vectors) still gets every answer, without
/// waiting out each command's timeout.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MissedInterrupts {
    in_row: u32,
    total: u64,
}

impl MissedInterrupts {
    pub(crate) fn check_interval(cfg: &InterruptConfig) -> Duration {
        INTERRUPT_CHECK + Duration::from_micros(u64::from(cfg.coalesce_usec))
    }

    pub(crate) fn grace(cfg: &InterruptConfig) -> Duration {
        MISSED_GRACE + Duration::from_micros(u64::from(cfg.coalesce_usec))
    }

    /// Records whether a completion came without its interrupt; true when
    /// the queue should poll from now on (said once, as a warning).
    pub(crate) fn record(&mut self, missed: bool, qid: u16, vector: u16) -> bool {
        if !missed {
            self.in_row = 0;
            return false;
        }
        self.in_row += 1;
        self.total += 1;
        if self.in_row < MISSES_BEFORE_POLLING {
            return false;
        }
        tracing::warn!(
            queue = qid,
            vector,
            missed = self.in_row,
            "completions keep arriving without their interrupts; polling this queue from now \
             on (a guest whose device restarted under QEMU's ivshmem-doorbell loses its MSI-X \
             vectors until QEMU re-creates the PCI device)"
        );
        true
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

/// How a device handle's queue pair is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Entries in each ring (a power of two, 2..=4096).
    pub entries: u16,
    /// Interrupt-driven waits (needs the notification socket); None polls.
    pub interrupts: Option<InterruptConfig>,
    /// A high-priority queue: the device serves its commands before normal
    /// queues' (PROTOCOL.md §5.7), for latency-critical work.
    pub high_priority: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self { entries: 256, interrupts: None, high_priority: false }
    }
}

/// One submission/completion ring pair.
#[derive(Debug)]
pub struct QueuePair {
    regs: SharedMemory,
    /// Wakes a sleeping device after the doorbell; its transport has the
    /// interrupt vectors.
    wake: Wake,
    irq: Option<(InterruptConfig, u64)>,
    pub qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_doorbell: u64,
    cq_doorbell: u64,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    /// One slot per command id (ids are 0..entries-1).
    slots: Vec<Slot>,
    /// Command ids whose slot is free.
    free: Vec<u16>,
    /// Commands pushed since the last doorbell.
    unrung: bool,
    /// Command ids reaped, for a caller that tracks them (the async API).
    pub(crate) reaped: Option<Vec<u16>>,
    /// Per opcode, the device's recent Execution Times: how long a polled
    /// waiter may nap, and whether it should spin at all.
    recent_exec: Box<[RecentExec; 256]>,
    missed: MissedInterrupts,
    /// Completions discarded: for no command in flight on this queue.
    pub stale_completions: u64,
}

/// A command id's state.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Free,
    /// Submitted, not completed: its opcode.
    InFlight(QueueOpcode),
    /// Completed, not yet claimed by its waiter.
    Done(Completion),
}

impl QueuePair {
    /// Creates a queue pair as `options` ask (entries a power of two).
    pub(crate) fn create(
        regs: SharedMemory,
        pnm_cap: u64,
        mailbox: &mut MailboxClient,
        pool: &mut DmaPool,
        wake: Wake,
        options: QueueOptions,
    ) -> Result<Self> {
        let QueueOptions { entries, interrupts: irq, high_priority } = options;
        let peer_id = wake.transport().interrupts().map(|i| i.peer_id());
        if irq.is_some() && peer_id.is_none() {
            return Err(Error::Invalid("interrupts need the device's notification socket".into()));
        }
        let owner = mailbox.owner();
        let sq = pool.alloc(mailbox, u64::from(entries) * SQE_SIZE)?;
        let cq = pool.alloc(mailbox, u64::from(entries) * CQE_SIZE)?;
        let input = CreateQueuePairInput {
            sq_addr: sq.addr.into(),
            cq_addr: cq.addr.into(),
            entries: entries.into(),
            irq_vector: irq.map_or(IRQ_NONE, |i| i.vector).into(),
            owner_pid: owner.word().into(),
            // A guest's queue belongs to the peer it is, interrupts or not.
            peer_id: peer_id.unwrap_or(owner.peer()).into(),
            coalesce_count: irq.map_or(0, |i| i.coalesce_count).into(),
            coalesce_usec: irq.map_or(0, |i| i.coalesce_usec).into(),
            priority: if high_priority { QUEUE_PRIORITY_HIGH } else { QUEUE_PRIORITY_NORMAL },
            reserved: [0; 7],
        };
        let out = mailbox.execute(Opcode::CREATE_QUEUE_PAIR, input.as_bytes())?;
        let qid = CreateQueuePairOutput::read_from_bytes(&out)
            .map_err(|_| Error::MalformedOutput {
                opcode: Opcode::CREATE_QUEUE_PAIR,
                reason: format!("{} bytes", out.len()),
            })?
            .queue_id
            .get();
        if u32::from(qid) >= queue::MAX_QUEUE_PAIRS {
            return Err(Error::Protocol(format!("queue id {qid} beyond the doorbell page")));
        }
        let stride = u64::from(regs.load_u32(pnm_cap + pnm::DOORBELL_STRIDE, Acquire));
        let page = u64::from(regs.load_u32(pnm_cap + pnm::DOORBELL_OFFSET, Acquire));
        let sq_doorbell = pnm_cap + page + u64::from(qid) * stride;
        if stride < 8 || regs.check(sq_doorbell, 8).is_err() {
            return Err(Error::Protocol(format!(
                "doorbell page {page:#x} stride {stride} is not usable"
            )));
        }
        let mask_base = u64::from(regs.load_u32(pnm_cap + pnm::IRQ_MASK_OFFSET, Acquire));
        let mask = pnm_cap + mask_base + 4 * u64::from(qid);
        if irq.is_some() && (mask_base == 0 || regs.check(mask, 4).is_err()) {
            return Err(Error::Protocol(format!(
                "interrupt mask page {mask_base:#x} is not usable"
            )));
        }
        // Masked until a waiter needs it (see `sleep_until_interrupt`).
        if irq.is_some() {
            regs.store_u32(mask, 1, Release);
        }
        Ok(Self {
            regs,
            wake,
            irq: irq.map(|i| (i, mask)),
            qid,
            entries: u32::from(entries),
            sq,
            cq,
            sq_doorbell,
            cq_doorbell: sq_doorbell + 4,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            slots: vec![Slot::Free; usize::from(entries)],
            // At most entries - 1 in flight: a full ring is one short of wrapping.
            free: (0..entries - 1).rev().collect(),
            reaped: None,
            unrung: false,
            recent_exec: Box::new([RecentExec::default(); 256]),
            missed: MissedInterrupts::default(),
            stale_completions: 0,
        })
    }

    /// Deletes the queue on the device; its rings go back to their pool
    /// as it drops.
    pub fn delete(self, mailbox: &mut MailboxClient) -> Result<()> {
        let input = DeleteQueuePairInput { queue_id: self.qid.into(), reserved: [0; 6] };
        mailbox.execute(Opcode::DELETE_QUEUE_PAIR, input.as_bytes()).map(drop)
    }

    /// Commands that can still be submitted before the ring is full.
    pub fn room(&self) -> u32 {
        self.free.len() as u32
    }

    fn in_flight(&self) -> u32 {
        self.entries - 1 - self.room()
    }

    /// Writes a command into the ring (without ringing the doorbell),
    /// returning its command id.
    pub fn push(&mut self, mut sqe: SubmissionEntry) -> Result<u16> {
        let Some(cid) = self.free.pop() else {
            return Err(Error::QueueFull(self.in_flight()));
        };
        sqe.command_id = cid.into();
        let slot = self.sq.addr + u64::from(self.sq_tail) * SQE_SIZE;
        self.regs.write_bytes(slot, sqe.as_bytes()).expect("ring lies in the DMA window");
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.slots[usize::from(cid)] = Slot::InFlight(sqe.opcode);
        self.unrung = true;
        Ok(cid)
    }

    /// Tells the device about every pushed command (one doorbell write).
    pub fn ring(&mut self) {
        if self.unrung {
            // Release: the entries are visible before the new tail.
            self.regs.store_u32(self.sq_doorbell, self.sq_tail, Release);
            self.unrung = false;
            self.wake.after_doorbell(self.irq.is_none());
        }
    }

    /// Reads every new completion; returns how many.
    pub fn reap(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            let slot = self.cq.addr + u64::from(self.cq_head) * CQE_SIZE;
            let status = self.regs.load_u16(slot + 30, Acquire);
            if (status & 1 != 0) != self.phase {
                break;
            }
            let mut raw = [0u8; CQE_SIZE as usize];
            self.regs.read_bytes(slot, &mut raw).expect("ring lies in the DMA window");
            let cqe = CompletionEntry::read_from_bytes(&raw).expect("32 bytes make an entry");
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            let cid = cqe.command_id.get();
            // A completion for no command in flight on this queue (a
            // duplicate, a garbled or a stale entry) is discarded: it must
            // not complete another command, and it is no reason to stop.
            let in_flight = self.slots.get(usize::from(cid)).copied();
            let Some(Slot::InFlight(opcode)) = in_flight.filter(|_| cqe.sq_id.get() == self.qid)
            else {
                self.stale_completions += 1;
                tracing::warn!(
                    qid = self.qid,
                    cid,
                    sq_id = cqe.sq_id.get(),
                    "completion for no command in flight discarded"
                );
                continue;
            };
            if u32::from(cqe.sq_head.get()) >= self.entries {
                return Err(Error::Protocol(format!(
                    "completion names SQ head {} of a {}-entry ring",
                    cqe.sq_head.get(),
                    self.entries
                )));
            }
            if let Some(reaped) = &mut self.reaped {
                reaped.push(cid);
            }
            if ReturnCode(cqe.return_code()).is_success() {
                self.recent_exec[usize::from(opcode.0)].record(cqe.exec_ns.get());
            }
            self.slots[usize::from(cid)] = Slot::Done(Completion {
                command_id: cid,
                opcode,
                code: ReturnCode(cqe.return_code()),
                result0: cqe.result0.get(),
                result1: cqe.result1.get(),
                result2: cqe.result2.get(),
                exec_ns: u64::from(cqe.exec_ns.get()),
                model_ns: u64::from(cqe.model_ns.get()),
            });
        }
        if n > 0 {
            // Release: we are done reading the entries we hand back.
            self.regs.store_u32(self.cq_doorbell, self.cq_head, Release);
        }
        Ok(n)
    }

    /// The completion of `cid`, if it has arrived; frees the id.
    pub(crate) fn take(&mut self, cid: u16) -> Option<Completion> {
        match self.slots.get(usize::from(cid)) {
            Some(&Slot::Done(c)) => {
                self.slots[usize::from(cid)] = Slot::Free;
                self.free.push(cid);
                Some(c)
            }
            _ => None,
        }
    }

    fn opcode_of(&self, cid: u16) -> QueueOpcode {
        match self.slots.get(usize::from(cid)) {
            Some(&Slot::InFlight(op)) => op,
            _ => QueueOpcode::NOP,
        }
    }

    /// Waits (bounded) for command `cid`.
    pub fn wait(&mut self, cid: u16, timeout: Duration) -> Result<Completion> {
        self.ring();
        let start = Instant::now();
        let recent = self.recent_exec[usize::from(self.opcode_of(cid).0)];
        if self.irq.is_none()
            && let Some(nap) = recent.nap()
            && self.reap()? == 0
        {
            std::thread::sleep(nap.min(timeout));
        }
        let mut backoff = recent.backoff();
        loop {
            if let Some(c) = self.take(cid) {
                return Ok(c);
            }
            if !matches!(self.slots.get(usize::from(cid)), Some(Slot::InFlight(_))) {
                return Err(Error::Invalid(format!("command id {cid} is not in flight")));
            }
            if self.reap()? == 0 {
                if start.elapsed() >= timeout {
                    return Err(Error::QueueTimeout {
                        command: opcode_name(self.opcode_of(cid)),
                        command_id: cid,
                        waited: start.elapsed(),
                    });
                }
                match self.irq {
                    Some((cfg, _)) => self.sleep_until_interrupt(
                        cfg.vector,
                        timeout.saturating_sub(start.elapsed()),
                    )?,
                    None => backoff.wait(),
                }
            }
        }
    }

    /// Sets the queue's interrupt mask (true: the device does not signal).
    /// Clearing it is SeqCst: see `sleep_until_interrupt`.
    #[cfg(feature = "async")]
    pub(crate) fn set_masked(&self, masked: bool) {
        if let Some((_, mask)) = self.irq {
            if masked {
                self.regs.store_u32(mask, 1, Relaxed);
            } else {
                self.regs.store_u32(mask, 0, SeqCst);
                std::sync::atomic::fence(SeqCst);
            }
        }
    }

    #[cfg(feature = "async")]
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Blocks on the queue's interrupt vector, with the no-lost-wake-up
    /// protocol: unmask (SeqCst), look at the ring again, and only then
    /// sleep; mask again on waking. The sleep is cut short to look for
    /// lost interrupts (see [`MissedInterrupts`]).
    fn sleep_until_interrupt(&mut self, vector: u16, bound: Duration) -> Result<()> {
        let (cfg, mask) = self.irq.expect("interrupt queue");
        self.regs.store_u32(mask, 0, SeqCst);
        std::sync::atomic::fence(SeqCst);
        if self.reap()? == 0 {
            let transport = self.wake.transport().clone();
            let interrupts = transport.interrupts().expect("checked at create");
            let check = bound.min(MissedInterrupts::check_interval(&cfg));
            if interrupts.wait_vector(vector, check) {
                self.missed.record(false, self.qid, vector);
            } else if self.reap()? > 0 {
                // Posted while the queue was unmasked: its interrupt is due.
                let late = interrupts.wait_vector(vector, MissedInterrupts::grace(&cfg));
                if self.missed.record(!late, self.qid, vector) {
                    self.irq = None;
                }
            }
        }
        self.regs.store_u32(mask, 1, Relaxed);
        Ok(())
    }

    /// Completions that arrived without their interrupt so far.
    pub fn missed_interrupts(&self) -> u64 {
        self.missed.total()
    }

    /// Whether waits on this queue block on its interrupt vector (false:
    /// created polled, or switched to polling after missed interrupts).
    pub fn waits_on_interrupts(&self) -> bool {
        self.irq.is_some()
    }

    /// Submits one command and waits for it.
    pub fn execute(&mut self, sqe: SubmissionEntry, timeout: Duration) -> Result<Completion> {
        let cid = self.push(sqe)?;
        self.wait(cid, timeout)
    }

    /// Submits many commands, keeping the ring as full as it allows, and
    /// returns their completions in submission order.
    pub fn execute_all(
        &mut self,
        sqes: &[SubmissionEntry],
        timeout: Duration,
    ) -> Result<Vec<Completion>> {
        let mut results: Vec<Option<Completion>> = vec![None; sqes.len()];
        // In-flight commands of this batch: (command id, position).
        let mut pending: Vec<(u16, usize)> = Vec::new();
        let mut next = 0;
        let mut finished = 0;
        let start = Instant::now();
        let mut backoff = Backoff::new();
        while finished < sqes.len() {
            while next < sqes.len() && self.room() > 0 {
                pending.push((self.push(sqes[next])?, next));
                next += 1;
            }
            self.ring();
            let reaped = self.reap()?;
            let before = finished;
            // Completions may also have been reaped by an interrupt wait.
            pending.retain(|&(cid, pos)| match self.take(cid) {
                Some(c) => {
                    results[pos] = Some(c);
                    finished += 1;
                    false
                }
                None => true,
            });
            if reaped > 0 || finished > before {
                backoff = Backoff::new();
            } else if start.elapsed() >= timeout {
                let (cid, _) = pending[0];
                return Err(Error::QueueTimeout {
                    command: opcode_name(self.opcode_of(cid)),
                    command_id: cid,
                    waited: start.elapsed(),
                });
            } else if let Some((cfg, _)) = self.irq {
                self.sleep_until_interrupt(cfg.vector, timeout.saturating_sub(start.elapsed()))?;
            } else {
                backoff.wait();
            }
        }
        Ok(results.into_iter().map(|c| c.expect("every command finished")).collect())
    }
}
