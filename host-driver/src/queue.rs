//! A queue pair seen from the host: fills the submission ring, rings the
//! doorbell, and consumes the completion ring by phase tag.

use std::collections::HashMap;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::time::{Duration, Instant};

use pnm_protocol::commands::{CreateQueuePairInput, CreateQueuePairOutput, DeleteQueuePairInput};
use pnm_protocol::queue::{self, CQE_SIZE, CompletionEntry, IRQ_NONE, SQE_SIZE, SubmissionEntry};
use pnm_protocol::regs::pnm;
use pnm_protocol::{Opcode, ReturnCode, SharedMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::dma::{DmaBuf, DmaPool};
use crate::error::{Error, Result};
use crate::mailbox::{Backoff, MailboxClient};

/// A finished command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub command_id: u16,
    pub opcode: u8,
    pub code: ReturnCode,
    pub result0: u32,
    pub result1: u32,
    pub result2: u64,
    pub exec_ns: u64,
}

impl Completion {
    /// The completion as a result: Ok if the device reported success.
    pub fn ok(self) -> Result<Self> {
        if self.code.is_success() {
            Ok(self)
        } else {
            Err(Error::Queue { command: opcode_name(self.opcode), code: self.code })
        }
    }
}

pub fn opcode_name(op: u8) -> &'static str {
    queue::opcode::name(op).unwrap_or("unknown command")
}

/// One submission/completion ring pair.
#[derive(Debug)]
pub struct QueuePair {
    regs: SharedMemory,
    pub qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_doorbell: u64,
    cq_doorbell: u64,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    next_cid: u16,
    /// Commands submitted and not yet completed: command id -> opcode.
    in_flight: HashMap<u16, u8>,
    /// Completions read while waiting for another command.
    stash: HashMap<u16, Completion>,
    /// Commands pushed since the last doorbell.
    unrung: bool,
}

impl QueuePair {
    /// Creates a polled queue pair of `entries` (a power of two).
    pub fn create(
        regs: SharedMemory,
        pnm_cap: u64,
        mailbox: &mut MailboxClient,
        pool: &mut DmaPool,
        entries: u16,
    ) -> Result<Self> {
        let sq = pool.alloc(mailbox, u64::from(entries) * SQE_SIZE)?;
        let cq = pool.alloc(mailbox, u64::from(entries) * CQE_SIZE)?;
        let input = CreateQueuePairInput {
            sq_addr: sq.addr.into(),
            cq_addr: cq.addr.into(),
            entries: entries.into(),
            irq_vector: IRQ_NONE.into(),
            owner_pid: std::process::id().into(),
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
        Ok(Self {
            regs,
            qid,
            entries: u32::from(entries),
            sq,
            cq,
            sq_doorbell,
            cq_doorbell: sq_doorbell + 4,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            next_cid: 0,
            in_flight: HashMap::new(),
            stash: HashMap::new(),
            unrung: false,
        })
    }

    /// Deletes the queue on the device and returns its rings to the pool.
    pub fn delete(self, mailbox: &mut MailboxClient, pool: &mut DmaPool) -> Result<()> {
        let input = DeleteQueuePairInput { queue_id: self.qid.into(), reserved: [0; 6] };
        let result = mailbox.execute(Opcode::DELETE_QUEUE_PAIR, input.as_bytes()).map(drop);
        pool.free(self.sq);
        pool.free(self.cq);
        result
    }

    /// Commands that can still be submitted before the ring is full.
    pub fn room(&self) -> u32 {
        self.entries - 1 - self.in_flight.len() as u32
    }

    /// Writes a command into the ring (without ringing the doorbell),
    /// returning its command id.
    pub fn push(&mut self, mut sqe: SubmissionEntry) -> Result<u16> {
        if self.room() == 0 {
            return Err(Error::QueueFull(self.in_flight.len() as u32));
        }
        let cid = loop {
            let cid = self.next_cid;
            self.next_cid = self.next_cid.wrapping_add(1);
            if !self.in_flight.contains_key(&cid) && !self.stash.contains_key(&cid) {
                break cid;
            }
        };
        sqe.command_id = cid.into();
        let slot = self.sq.addr + u64::from(self.sq_tail) * SQE_SIZE;
        self.regs.write_bytes(slot, sqe.as_bytes()).expect("ring lies in the DMA window");
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.in_flight.insert(cid, sqe.opcode);
        self.unrung = true;
        Ok(cid)
    }

    /// Tells the device about every pushed command (one doorbell write).
    pub fn ring(&mut self) {
        if self.unrung {
            // Release: the entries are visible before the new tail.
            self.regs.store_u32(self.sq_doorbell, self.sq_tail, Release);
            self.unrung = false;
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
            let Some(opcode) = self.in_flight.remove(&cid) else {
                return Err(Error::Protocol(format!(
                    "completion for command id {cid}, which is not in flight"
                )));
            };
            if cqe.sq_id.get() != self.qid || u32::from(cqe.sq_head.get()) >= self.entries {
                return Err(Error::Protocol(format!(
                    "completion names queue {} and SQ head {}",
                    cqe.sq_id.get(),
                    cqe.sq_head.get()
                )));
            }
            self.stash.insert(
                cid,
                Completion {
                    command_id: cid,
                    opcode,
                    code: ReturnCode(cqe.return_code()),
                    result0: cqe.result0.get(),
                    result1: cqe.result1.get(),
                    result2: cqe.result2.get(),
                    exec_ns: cqe.exec_ns.get(),
                },
            );
        }
        if n > 0 {
            // Release: we are done reading the entries we hand back.
            self.regs.store_u32(self.cq_doorbell, self.cq_head, Release);
        }
        Ok(n)
    }

    /// Waits (bounded) for command `cid`.
    pub fn wait(&mut self, cid: u16, timeout: Duration) -> Result<Completion> {
        self.ring();
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(c) = self.stash.remove(&cid) {
                return Ok(c);
            }
            if !self.in_flight.contains_key(&cid) {
                return Err(Error::Invalid(format!("command id {cid} is not in flight")));
            }
            if self.reap()? == 0 {
                if start.elapsed() >= timeout {
                    let opcode = self.in_flight[&cid];
                    return Err(Error::QueueTimeout {
                        command: opcode_name(opcode),
                        command_id: cid,
                        waited: start.elapsed(),
                    });
                }
                backoff.wait();
            }
        }
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
        // In-flight commands of this batch: command id -> position.
        let mut pending: HashMap<u16, usize> = HashMap::new();
        let mut next = 0;
        let mut finished = 0;
        let start = Instant::now();
        let mut backoff = Backoff::new();
        while finished < sqes.len() {
            while next < sqes.len() && self.room() > 0 {
                pending.insert(self.push(sqes[next])?, next);
                next += 1;
            }
            self.ring();
            if self.reap()? > 0 {
                backoff = Backoff::new();
                pending.retain(|cid, &mut pos| match self.stash.remove(cid) {
                    Some(c) => {
                        results[pos] = Some(c);
                        finished += 1;
                        false
                    }
                    None => true,
                });
            } else if start.elapsed() >= timeout {
                let (&cid, _) = pending.iter().next().expect("unfinished commands are pending");
                let opcode = self.in_flight.get(&cid).copied().unwrap_or_default();
                return Err(Error::QueueTimeout {
                    command: opcode_name(opcode),
                    command_id: cid,
                    waited: start.elapsed(),
                });
            } else {
                backoff.wait();
            }
        }
        Ok(results.into_iter().map(|c| c.expect("every command finished")).collect())
    }
}
