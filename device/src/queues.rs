//! Queue pairs: submission rings the host fills and completion rings the
//! device fills, in the host DMA window, with doorbells in the PNM
//! capability's doorbell page.

use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;

use pnm_protocol::commands::CreateQueuePairInput;
use pnm_protocol::queue::{
    self, CQE_SIZE, CompletionEntry, IRQ_NONE, MAX_QUEUE_ENTRIES, MAX_QUEUE_PAIRS,
    MIN_QUEUE_ENTRIES, RING_ALIGN, SQE_SIZE, SubmissionEntry,
};
use pnm_protocol::regs::{self, pnm};
use pnm_protocol::{RegionLayout, ReturnCode, SharedMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::datapath::DataPath;
use crate::notify::Peers;

/// Most commands taken from one queue before the engine moves to the next,
/// so no queue starves another.
const BATCH: u32 = 32;

/// A queue's interrupt: the peer vector it signals and its coalescing.
#[derive(Debug)]
struct Interrupt {
    fd: Arc<EventFd>,
    peer: u16,
    /// Signal once this many completions are pending.
    count: u32,
    /// Signal at the latest this long after the first pending completion.
    delay: Duration,
    pending: u32,
    first_pending: Option<Instant>,
}

#[derive(Debug)]
struct QueuePair {
    sq_addr: u64,
    cq_addr: u64,
    entries: u32,
    owner_pid: u32,
    irq: Option<Interrupt>,
    sq_head: u32,
    cq_tail: u32,
    /// The host's CQ head as last read: re-read only when the ring looks
    /// full, so the doorbell's cache line is not pulled over per command.
    cq_head_seen: u32,
    phase: bool,
    /// A bad SQ tail doorbell value was seen; logged once.
    tail_error: bool,
}

/// The device's queue pairs.
#[derive(Debug)]
pub struct QueueTable {
    regs: SharedMemory,
    layout: RegionLayout,
    peers: Peers,
    queues: Vec<Option<QueuePair>>,
}

fn sq_doorbell(qid: u16) -> u64 {
    regs::PNM_OFFSET + pnm::DOORBELL_PAGE + u64::from(qid) * u64::from(pnm::DOORBELL_STRIDE_BYTES)
}

fn cq_doorbell(qid: u16) -> u64 {
    sq_doorbell(qid) + 4
}

fn irq_mask(qid: u16) -> u64 {
    regs::PNM_OFFSET + pnm::IRQ_MASK_PAGE + 4 * u64::from(qid)
}

impl QueueTable {
    pub fn new(regs: SharedMemory, layout: RegionLayout, peers: Peers) -> Self {
        Self { regs, layout, peers, queues: (0..MAX_QUEUE_PAIRS).map(|_| None).collect() }
    }

    fn in_window(&self, addr: u64, len: u64) -> bool {
        let start = self.layout.dma_window_offset;
        let end = start + self.layout.dma_window_size;
        addr >= start && addr.checked_add(len).is_some_and(|e| e <= end)
    }

    /// Creates a queue pair, returning its id.
    pub fn create(&mut self, input: &CreateQueuePairInput) -> Result<u16, ReturnCode> {
        let entries = u32::from(input.entries.get());
        let (sq, cq) = (input.sq_addr.get(), input.cq_addr.get());
        if !entries.is_power_of_two() || !(MIN_QUEUE_ENTRIES..=MAX_QUEUE_ENTRIES).contains(&entries)
        {
            return Err(ReturnCode::INVALID_INPUT);
        }
        let irq = match input.irq_vector.get() {
            IRQ_NONE => None,
            vector => {
                let peer = input.peer_id.get();
                // Only host peers' vectors: the device does not interrupt itself.
                if peer == pnm_protocol::notify::DEVICE_PEER {
                    return Err(ReturnCode::INVALID_INPUT);
                }
                let fd = self.peers.vector(peer, vector).ok_or(ReturnCode::INVALID_INPUT)?;
                let count = u32::from(input.coalesce_count.get()).clamp(1, entries);
                let delay = Duration::from_micros(u64::from(input.coalesce_usec.get()));
                Some(Interrupt { fd, peer, count, delay, pending: 0, first_pending: None })
            }
        };
        let (sq_len, cq_len) = (u64::from(entries) * SQE_SIZE, u64::from(entries) * CQE_SIZE);
        if sq % RING_ALIGN != 0 || cq % RING_ALIGN != 0 {
            return Err(ReturnCode::INVALID_INPUT);
        }
        if !self.in_window(sq, sq_len) || !self.in_window(cq, cq_len) {
            return Err(ReturnCode::INVALID_PHYSICAL_ADDRESS);
        }
        if sq < cq + cq_len && cq < sq + sq_len {
            return Err(ReturnCode::INVALID_INPUT);
        }
        let qid =
            self.queues.iter().position(Option::is_none).ok_or(ReturnCode::RESOURCES_EXHAUSTED)?;
        let qid = qid as u16;
        // A fresh completion ring reads as all-old-phase, whatever the host left there.
        self.regs.fill(cq, cq_len, 0).map_err(|_| ReturnCode::INTERNAL_ERROR)?;
        self.regs.store_u32(sq_doorbell(qid), 0, Relaxed);
        self.regs.store_u32(irq_mask(qid), 0, Relaxed);
        self.regs.store_u32(cq_doorbell(qid), 0, Release);
        self.queues[usize::from(qid)] = Some(QueuePair {
            sq_addr: sq,
            cq_addr: cq,
            entries,
            owner_pid: input.owner_pid.get(),
            irq,
            sq_head: 0,
            cq_tail: 0,
            cq_head_seen: 0,
            phase: true,
            tail_error: false,
        });
        tracing::info!(qid, entries, owner_pid = input.owner_pid.get(), "queue pair created");
        Ok(qid)
    }

    pub fn delete(&mut self, qid: u16) -> Result<(), ReturnCode> {
        let slot = self.queues.get_mut(usize::from(qid)).ok_or(ReturnCode::INVALID_INPUT)?;
        if slot.take().is_none() {
            return Err(ReturnCode::INVALID_INPUT);
        }
        tracing::info!(qid, "queue pair deleted");
        Ok(())
    }

    /// Deletes every queue whose owner `is_dead` reports gone.
    pub fn reclaim(&mut self, is_dead: impl Fn(u32) -> bool) -> usize {
        let mut n = 0;
        for (qid, slot) in self.queues.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|q| q.owner_pid != 0 && is_dead(q.owner_pid)) {
                tracing::warn!(qid, "owner process gone; queue pair reclaimed");
                *slot = None;
                n += 1;
            }
        }
        n
    }

    /// Deletes every queue whose interrupts go to `peer` (it disconnected).
    pub fn reclaim_peer(&mut self, peer: u16) -> usize {
        let mut n = 0;
        for slot in &mut self.queues {
            if slot.as_ref().is_some_and(|q| q.irq.as_ref().is_some_and(|i| i.peer == peer)) {
                *slot = None;
                n += 1;
            }
        }
        n
    }

    /// When the earliest coalescing timer is due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .iter()
            .flatten()
            .filter_map(|q| q.irq.as_ref())
            .filter_map(|i| i.first_pending.map(|t| t + i.delay))
            .min()
    }

    /// Signals every queue whose coalescing timer has expired.
    pub fn flush_interrupts(&mut self, now: Instant) {
        let regs = self.regs;
        for (qid, q) in self.queues.iter_mut().enumerate() {
            if let Some(irq) = q.as_mut().and_then(|q| q.irq.as_mut()) {
                if irq.first_pending.is_some_and(|t| now.duration_since(t) >= irq.delay) {
                    signal(regs, qid as u16, irq);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.queues.iter_mut().for_each(|q| *q = None);
    }

    pub fn active(&self) -> usize {
        self.queues.iter().flatten().count()
    }

    /// Serves every queue once, up to a batch each. True if any command ran.
    pub fn poll(&mut self, datapath: &mut DataPath) -> bool {
        let mut worked = false;
        for qid in 0..self.queues.len() {
            if self.queues[qid].is_some() {
                worked |= self.serve(qid as u16, datapath);
            }
        }
        worked
    }

    fn serve(&mut self, qid: u16, datapath: &mut DataPath) -> bool {
        let regs = self.regs;
        let q = self.queues[usize::from(qid)].as_mut().expect("caller checked");
        let tail = regs.load_u32(sq_doorbell(qid), Acquire);
        if tail >= q.entries {
            if !q.tail_error {
                tracing::warn!(
                    qid,
                    tail,
                    entries = q.entries,
                    "SQ tail doorbell out of range; ignored"
                );
                q.tail_error = true;
            }
            return false;
        }
        q.tail_error = false;
        let mut done = 0;
        while q.sq_head != tail && done < BATCH {
            if (q.cq_tail + 1) % q.entries == q.cq_head_seen % q.entries {
                q.cq_head_seen = regs.load_u32(cq_doorbell(qid), Acquire);
                if (q.cq_tail + 1) % q.entries == q.cq_head_seen % q.entries {
                    break; // completion ring full: wait for the host to consume
                }
            }
            let mut raw = [0u8; SQE_SIZE as usize];
            let at = q.sq_addr + u64::from(q.sq_head) * SQE_SIZE;
            regs.read_bytes(at, &mut raw).expect("ring checked inside the window at create");
            let sqe = SubmissionEntry::read_from_bytes(&raw).expect("64 bytes make an entry");
            q.sq_head = (q.sq_head + 1) % q.entries;

            // NOP measures the command path itself: no clock reads for it.
            let (outcome, exec_ns) = if sqe.opcode == queue::opcode::NOP {
                (datapath.execute(&sqe), 0)
            } else {
                let start = Instant::now();
                let outcome = datapath.execute(&sqe);
                (outcome, start.elapsed().as_nanos() as u64)
            };
            tracing::trace!(qid, opcode = queue::opcode::name(sqe.opcode), cid = sqe.command_id.get(), code = %outcome.code, exec_ns);

            let cqe = CompletionEntry {
                result0: outcome.result0.into(),
                result1: outcome.result1.into(),
                result2: outcome.result2.into(),
                exec_ns: exec_ns.into(),
                sq_head: (q.sq_head as u16).into(),
                sq_id: qid.into(),
                command_id: sqe.command_id,
                status: 0.into(),
            };
            let slot = q.cq_addr + u64::from(q.cq_tail) * CQE_SIZE;
            let bytes = cqe.as_bytes();
            regs.write_bytes(slot, &bytes[..30]).expect("ring checked inside the window at create");
            // Release: the entry's other fields are visible before its phase flips.
            let status = CompletionEntry::encode_status(outcome.code.0, q.phase);
            regs.store_u16(slot + 30, status, Release);
            q.cq_tail += 1;
            if q.cq_tail == q.entries {
                q.cq_tail = 0;
                q.phase = !q.phase;
            }
            done += 1;
        }
        if done > 0 {
            if let Some(irq) = q.irq.as_mut() {
                irq.pending += done;
                irq.first_pending.get_or_insert_with(Instant::now);
                if irq.pending >= irq.count || irq.delay.is_zero() {
                    signal(regs, qid, irq);
                }
            }
        }
        done > 0
    }
}

/// Rings a queue's interrupt vector unless the host masked it.
///
/// No lost wake-up: the completions were published (Release) before this
/// SeqCst fence and mask read; a host unmasks with a SeqCst store and then
/// re-reads the completion ring, so either it sees the completions or the
/// device sees the mask clear and rings.
fn signal(regs: SharedMemory, qid: u16, irq: &mut Interrupt) {
    std::sync::atomic::fence(SeqCst);
    if regs.load_u32(irq_mask(qid), SeqCst) & 1 == 0 {
        if let Err(e) = irq.fd.write(1) {
            tracing::warn!(qid, error = %e, "signalling an interrupt vector");
        }
    }
    irq.pending = 0;
    irq.first_pending = None;
}
