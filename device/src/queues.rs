//! Queue pairs: submission rings the host fills and completion rings the
//! device fills, in the host DMA window, with doorbells in the PNM
//! capability's doorbell page.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Instant;

use pnm_protocol::commands::CreateQueuePairInput;
use pnm_protocol::queue::{
    self, CQE_SIZE, CompletionEntry, IRQ_NONE, MAX_QUEUE_ENTRIES, MAX_QUEUE_PAIRS,
    MIN_QUEUE_ENTRIES, RING_ALIGN, SQE_SIZE, SubmissionEntry,
};
use pnm_protocol::regs::{self, pnm};
use pnm_protocol::{RegionLayout, ReturnCode, SharedMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::datapath::DataPath;

/// Most commands taken from one queue before the engine moves to the next,
/// so no queue starves another.
const BATCH: u32 = 32;

#[derive(Debug)]
struct QueuePair {
    sq_addr: u64,
    cq_addr: u64,
    entries: u32,
    owner_pid: u32,
    sq_head: u32,
    cq_tail: u32,
    phase: bool,
    /// A bad SQ tail doorbell value was seen; logged once.
    tail_error: bool,
}

/// The device's queue pairs.
#[derive(Debug)]
pub struct QueueTable {
    regs: SharedMemory,
    layout: RegionLayout,
    queues: Vec<Option<QueuePair>>,
}

fn sq_doorbell(qid: u16) -> u64 {
    regs::PNM_OFFSET + pnm::DOORBELL_PAGE + u64::from(qid) * u64::from(pnm::DOORBELL_STRIDE_BYTES)
}

fn cq_doorbell(qid: u16) -> u64 {
    sq_doorbell(qid) + 4
}

impl QueueTable {
    pub fn new(regs: SharedMemory, layout: RegionLayout) -> Self {
        Self { regs, layout, queues: (0..MAX_QUEUE_PAIRS).map(|_| None).collect() }
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
        if input.irq_vector.get() != IRQ_NONE {
            // Interrupt vectors are not offered by this device version.
            return Err(ReturnCode::INVALID_INPUT);
        }
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
        self.regs.store_u32(cq_doorbell(qid), 0, Release);
        self.queues[usize::from(qid)] = Some(QueuePair {
            sq_addr: sq,
            cq_addr: cq,
            entries,
            owner_pid: input.owner_pid.get(),
            sq_head: 0,
            cq_tail: 0,
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
            let cq_head = regs.load_u32(cq_doorbell(qid), Acquire);
            if (q.cq_tail + 1) % q.entries == cq_head % q.entries {
                break; // completion ring full: wait for the host to consume
            }
            let mut raw = [0u8; SQE_SIZE as usize];
            let at = q.sq_addr + u64::from(q.sq_head) * SQE_SIZE;
            regs.read_bytes(at, &mut raw).expect("ring checked inside the window at create");
            let sqe = SubmissionEntry::read_from_bytes(&raw).expect("64 bytes make an entry");
            q.sq_head = (q.sq_head + 1) % q.entries;

            let start = Instant::now();
            let outcome = datapath.execute(&sqe);
            let exec_ns = start.elapsed().as_nanos() as u64;
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
        done > 0
    }
}
