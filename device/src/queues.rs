//! Queue pairs: submission rings the host fills and completion rings the
//! device fills, in the host DMA window, with doorbells in the PNM
//! capability's doorbell page.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;

use pnm_protocol::commands::{
    CreateQueuePairInput, Owner, QUEUE_PRIORITY_HIGH, QUEUE_PRIORITY_NORMAL,
};
use pnm_protocol::queue::{
    CQE_SIZE, CompletionEntry, IRQ_NONE, MAX_QUEUE_ENTRIES, MAX_QUEUE_PAIRS,
    MAX_QUEUE_PAIRS_PER_OWNER, MIN_QUEUE_ENTRIES, QueueCommand, QueueOpcode, RING_ALIGN, SQE_SIZE,
    SubmissionEntry,
};
use pnm_protocol::regs::{self, pnm};
use pnm_protocol::{RegionLayout, ReturnCode, SharedMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::executor::{Executor, Outcome};
use crate::faults::{CompletionFault, Faults};
use crate::notify::Peers;
use crate::refusal::{Buffer, Limit, Reason, Refusal};
use crate::units::{ComputeUnits, Job};
use pnm_firmware::kv::Writer;

/// Most commands taken from one queue before the engine moves to the next,
/// so no queue starves another.
const BATCH: u32 = 32;

/// A queue's interrupt: the peer vector it signals and its coalescing.
#[derive(Debug)]
struct Interrupt {
    /// None: the peer is held for its process but not connected.
    fd: Option<Arc<EventFd>>,
    peer: u16,
    /// Signal once this many completions are pending.
    count: u32,
    /// Signal at the latest this long after the first pending completion.
    delay: Duration,
    pending: u32,
    first_pending: Option<Instant>,
}

/// A queue's completion side, shared by the engine and the compute units
/// that finish its commands.
#[derive(Debug)]
pub struct CompletionRing {
    regs: SharedMemory,
    qid: u16,
    cq_addr: u64,
    entries: u32,
    irq: Option<Interrupt>,
    cq_tail: u32,
    /// The host's CQ head as last read: re-read only when the ring looks
    /// full, so the doorbell's cache line is not pulled over per command.
    cq_head_seen: u32,
    phase: bool,
    /// Commands taken from the SQ whose completions are not posted yet;
    /// each has a CQ slot reserved, so a compute unit can always post.
    outstanding: u32,
    /// Set when the queue is deleted: late completions are dropped rather
    /// than written into memory the host may have reused.
    deleted: bool,
    faults: Arc<Faults>,
    /// Completions held back by an injected delay, with when they are due.
    delayed: Vec<(Instant, Finished)>,
}

/// What a finished command posts.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub outcome: Outcome,
    pub exec_ns: u64,
    pub sq_head: u16,
    pub command_id: u16,
}

impl CompletionRing {
    /// Reserves a CQ slot for one more command; false if the ring is full.
    fn reserve(&mut self) -> bool {
        let used = |seen: u32| (self.cq_tail + self.entries - seen % self.entries) % self.entries;
        if used(self.cq_head_seen) + self.outstanding + 1 >= self.entries {
            self.cq_head_seen = self.regs.load_u32(cq_doorbell(self.qid), Acquire);
            if used(self.cq_head_seen) + self.outstanding + 1 >= self.entries {
                return false;
            }
        }
        self.outstanding += 1;
        true
    }

    /// Writes a completion entry (its slot was reserved), unless an
    /// injected fault drops, delays, duplicates or garbles it.
    pub fn post(&mut self, f: Finished) {
        match self.faults.completion() {
            CompletionFault::None => {}
            CompletionFault::Drop => {
                tracing::warn!(qid = self.qid, cid = f.command_id, "injected: completion dropped");
                self.outstanding -= 1;
                return;
            }
            CompletionFault::Delay(by) => {
                tracing::warn!(
                    qid = self.qid,
                    cid = f.command_id,
                    ?by,
                    "injected: completion delayed"
                );
                self.delayed.push((Instant::now() + by, f));
                return;
            }
            CompletionFault::Corrupt => {
                tracing::warn!(qid = self.qid, cid = f.command_id, "injected: completion garbled");
                // An id and queue no host has in flight: the command itself
                // never completes.
                let garbled = Finished { command_id: f.command_id ^ 0x8000, ..f };
                return self.write(garbled, self.qid ^ 0x8000);
            }
            CompletionFault::Duplicate => {
                tracing::warn!(
                    qid = self.qid,
                    cid = f.command_id,
                    "injected: completion posted twice"
                );
                self.write(f, self.qid);
                // The copy takes a slot of its own, if the ring has one.
                if self.reserve() {
                    self.write(f, self.qid);
                }
                return;
            }
        }
        self.write(f, self.qid);
    }

    /// Posts the delayed completions that are due; the earliest left.
    pub fn post_due(&mut self, now: Instant) -> Option<Instant> {
        let (due, later): (Vec<_>, Vec<_>) = self.delayed.drain(..).partition(|(t, _)| *t <= now);
        self.delayed = later;
        for (_, f) in due {
            self.write(f, self.qid);
        }
        if !self.delayed.is_empty() {
            self.maybe_signal();
        }
        self.delayed.iter().map(|(t, _)| *t).min()
    }

    /// Writes one entry into its reserved slot.
    fn write(&mut self, f: Finished, sq_id: u16) {
        self.outstanding -= 1;
        if self.deleted {
            return;
        }
        let cqe = CompletionEntry {
            result0: f.outcome.result0.into(),
            result1: f.outcome.result1.into(),
            result2: f.outcome.result2.into(),
            exec_ns: (f.exec_ns.min(u64::from(u32::MAX)) as u32).into(),
            model_ns: f.outcome.model_ns.into(),
            sq_head: f.sq_head.into(),
            sq_id: sq_id.into(),
            command_id: f.command_id.into(),
            status: 0.into(),
        };
        let slot = self.cq_addr + u64::from(self.cq_tail) * CQE_SIZE;
        let bytes = cqe.as_bytes();
        self.regs
            .write_bytes(slot, &bytes[..30])
            .expect("ring checked inside the window at create");
        // Release: the entry's other fields are visible before its phase flips.
        let status = CompletionEntry::encode_status(f.outcome.code.0, self.phase);
        self.regs.store_u16(slot + 30, status, Release);
        self.cq_tail += 1;
        if self.cq_tail == self.entries {
            self.cq_tail = 0;
            self.phase = !self.phase;
        }
        if let Some(irq) = self.irq.as_mut() {
            irq.pending += 1;
            irq.first_pending.get_or_insert_with(Instant::now);
        }
    }

    /// Signals the interrupt if the coalescing count is reached (or there
    /// is no time limit). Returns true if a timer is left running.
    pub fn maybe_signal(&mut self) -> bool {
        let Some(irq) = self.irq.as_mut() else { return false };
        if irq.pending == 0 || self.deleted {
            return false;
        }
        if irq.pending >= irq.count || irq.delay.is_zero() {
            signal(self.regs, self.qid, irq);
            return false;
        }
        true
    }
}

#[derive(Debug)]
struct QueuePair {
    sq_addr: u64,
    entries: u32,
    /// High priority: served first by the engine and the compute units.
    high: bool,
    owner: Owner,
    /// Names this queue's KV reservations; never reused while the device runs.
    writer: Writer,
    /// The peer its interrupts go to, if any.
    peer: Option<u16>,
    sq_head: u32,
    /// A bad SQ tail doorbell value was seen; logged once.
    tail_error: bool,
    /// The SQ tail doorbell as last read, and one an injected fault made
    /// the device miss (its entries wait for the next doorbell).
    seen_tail: u32,
    ignored_tail: Option<u32>,
    cq: Arc<Mutex<CompletionRing>>,
}

impl QueuePair {
    fn cq(&self) -> MutexGuard<'_, CompletionRing> {
        self.cq.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        self.cq().deleted = true;
    }
}

/// The device's queue pairs.
#[derive(Debug)]
pub struct QueueTable {
    regs: SharedMemory,
    layout: RegionLayout,
    peers: Peers,
    queues: Vec<Option<QueuePair>>,
    /// Writers handed out so far (0 is [`Writer::LOCAL`]).
    writers: u64,
    /// Writers of deleted queues whose KV reservations are yet to be rolled back.
    gone: Vec<Writer>,
    /// Injected faults (doorbells, completions, abort).
    faults: Arc<Faults>,
    /// Some completion is held back by an injected delay.
    delaying: bool,
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
    /// The faults injected into this device (see [`Faults`]).
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Self {
        self.faults = faults;
        self
    }

    pub fn new(regs: SharedMemory, layout: RegionLayout, peers: Peers) -> Self {
        Self {
            regs,
            layout,
            peers,
            queues: (0..MAX_QUEUE_PAIRS).map(|_| None).collect(),
            writers: 0,
            gone: Vec::new(),
            faults: Default::default(),
            delaying: false,
        }
    }

    /// Checks that both rings start on a 64-byte boundary, then that both
    /// lie in the host DMA window.
    fn check_rings(&self, rings: [(Buffer, u64, u64); 2]) -> Result<(), Refusal> {
        for (buffer, addr, _) in rings {
            if !addr.is_multiple_of(RING_ALIGN) {
                return Err(Refusal::invalid(Reason::Misaligned {
                    buffer,
                    addr,
                    align: RING_ALIGN,
                }));
            }
        }
        let start = self.layout.dma_window_offset;
        let end = start + self.layout.dma_window_size;
        for (buffer, addr, len) in rings {
            if addr < start || addr.checked_add(len).is_none_or(|e| e > end) {
                return Err(Refusal::new(
                    ReturnCode::INVALID_PHYSICAL_ADDRESS,
                    Reason::OutsideDmaWindow { buffer, addr, len },
                ));
            }
        }
        Ok(())
    }

    /// Creates a queue pair, returning its id.
    pub fn create(&mut self, input: &CreateQueuePairInput) -> Result<u16, Refusal> {
        let entries = u32::from(input.entries.get());
        let (sq, cq) = (input.sq_addr.get(), input.cq_addr.get());
        if !entries.is_power_of_two() || !(MIN_QUEUE_ENTRIES..=MAX_QUEUE_ENTRIES).contains(&entries)
        {
            return Err(Refusal::invalid(Reason::OutOfLimit {
                limit: Limit::QueueEntries,
                value: entries.into(),
                min: MIN_QUEUE_ENTRIES.into(),
                max: MAX_QUEUE_ENTRIES.into(),
            }));
        }
        let irq = match input.irq_vector.get() {
            IRQ_NONE => None,
            vector => {
                let peer = input.peer_id.get();
                // Only host peers' vectors: the device does not interrupt itself.
                if peer == pnm_protocol::notify::DEVICE_PEER {
                    return Err(Refusal::invalid(Reason::DevicePeer(peer)));
                }
                let fd = match self.peers.vector(peer, vector) {
                    Some(fd) => Some(fd),
                    // Held for its process since a restart, not connected:
                    // nothing reaches it (its host polls once it sees its
                    // interrupts missing).
                    None if vector < pnm_protocol::notify::VECTORS && self.peers.present(peer) => {
                        tracing::warn!(
                            peer,
                            vector,
                            "interrupt queue for a peer that did not connect to this device \
                             run: its interrupts go nowhere"
                        );
                        None
                    }
                    None => return Err(Refusal::invalid(Reason::NoSuchVector { peer, vector })),
                };
                let count = u32::from(input.coalesce_count.get()).clamp(1, entries);
                let delay = Duration::from_micros(u64::from(input.coalesce_usec.get()));
                Some(Interrupt { fd, peer, count, delay, pending: 0, first_pending: None })
            }
        };
        let (sq_len, cq_len) = (u64::from(entries) * SQE_SIZE, u64::from(entries) * CQE_SIZE);
        self.check_rings([
            (Buffer::SubmissionRing, sq, sq_len),
            (Buffer::CompletionRing, cq, cq_len),
        ])?;
        if sq < cq + cq_len && cq < sq + sq_len {
            return Err(Refusal::invalid(Reason::RingsOverlap));
        }
        let high = match input.priority {
            QUEUE_PRIORITY_NORMAL => false,
            QUEUE_PRIORITY_HIGH => true,
            other => return Err(Refusal::invalid(Reason::UnknownPriority(other))),
        };
        if input.reserved != [0; 7] {
            return Err(Refusal::invalid(Reason::ReservedNotZero));
        }
        // Every queue has an owner to reclaim it from (0 names no process).
        let owner = Owner::decode(input.owner_pid.get(), input.peer_id.get())
            .ok_or(Refusal::invalid(Reason::NoOwner))?;
        if let Owner::Guest { peer, .. } = owner
            && !self.peers.present(peer)
        {
            return Err(Refusal::invalid(Reason::NoSuchPeer(peer)));
        }
        let held = self.queues.iter().flatten().filter(|q| q.owner == owner).count();
        if held as u32 >= MAX_QUEUE_PAIRS_PER_OWNER {
            return Err(Refusal::exhausted(Reason::OwnerQueueLimit {
                owner: input.owner_pid.get(),
                max: MAX_QUEUE_PAIRS_PER_OWNER,
            }));
        }
        let qid = self
            .queues
            .iter()
            .position(Option::is_none)
            .ok_or(Refusal::exhausted(Reason::NoFreeQueue))?;
        let qid = qid as u16;
        // A fresh completion ring reads as all-old-phase, whatever the host left there.
        self.regs.fill(cq, cq_len, 0)?;
        self.regs.store_u32(sq_doorbell(qid), 0, Relaxed);
        self.regs.store_u32(irq_mask(qid), 0, Relaxed);
        self.regs.store_u32(cq_doorbell(qid), 0, Release);
        let peer = irq.as_ref().map(|i| i.peer);
        let ring = CompletionRing {
            regs: self.regs,
            qid,
            cq_addr: cq,
            entries,
            irq,
            cq_tail: 0,
            cq_head_seen: 0,
            phase: true,
            outstanding: 0,
            deleted: false,
            faults: self.faults.clone(),
            delayed: Vec::new(),
        };
        self.writers += 1;
        self.queues[usize::from(qid)] = Some(QueuePair {
            sq_addr: sq,
            entries,
            high,
            owner,
            writer: Writer(self.writers),
            peer,
            sq_head: 0,
            tail_error: false,
            seen_tail: 0,
            ignored_tail: None,
            cq: Arc::new(Mutex::new(ring)),
        });
        tracing::info!(qid, entries, ?owner, "queue pair created");
        Ok(qid)
    }

    pub fn delete(&mut self, qid: u16) -> Result<(), Refusal> {
        if self.queues.get(usize::from(qid)).is_none_or(Option::is_none) {
            return Err(Refusal::invalid(Reason::NoSuchQueue(qid)));
        }
        self.remove(usize::from(qid));
        tracing::info!(qid, "queue pair deleted");
        Ok(())
    }

    /// Empties a slot; the queue's KV reservations are rolled back by the
    /// engine ([`Self::take_gone`]) before it serves another command.
    fn remove(&mut self, slot: usize) {
        if let Some(q) = self.queues[slot].take() {
            self.gone.push(q.writer);
        }
    }

    /// Writers of queues deleted since the last call.
    pub fn take_gone(&mut self) -> Vec<Writer> {
        std::mem::take(&mut self.gone)
    }

    /// Deletes every queue whose owner `is_dead` reports gone.
    pub fn reclaim(&mut self, is_dead: impl Fn(Owner) -> bool) -> usize {
        let mut n = 0;
        for qid in 0..self.queues.len() {
            if let Some(q) = &self.queues[qid]
                && is_dead(q.owner)
            {
                tracing::warn!(qid, owner = ?q.owner, "owner gone; queue pair reclaimed");
                self.remove(qid);
                n += 1;
            }
        }
        n
    }

    /// True while notification peer `peer` is connected.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn peer_present(&self, peer: u16) -> bool {
        self.peers.present(peer)
    }

    /// Deletes every queue whose interrupts go to `peer`, or that a process
    /// in guest `peer` owns (it disconnected).
    pub fn reclaim_peer(&mut self, peer: u16) -> usize {
        let mut n = 0;
        for qid in 0..self.queues.len() {
            let owned_by = |q: &QueuePair| {
                q.peer == Some(peer) || matches!(q.owner, Owner::Guest { peer: p, .. } if p == peer)
            };
            if self.queues[qid].as_ref().is_some_and(owned_by) {
                self.remove(qid);
                n += 1;
            }
        }
        n
    }

    /// When the earliest coalescing timer is due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timers = self.queues.iter().flatten().filter(|q| q.peer.is_some()).filter_map(|q| {
            let cq = q.cq();
            cq.irq.as_ref().and_then(|i| i.first_pending.map(|t| t + i.delay))
        });
        let delayed = self
            .queues
            .iter()
            .flatten()
            .filter(|_| self.delaying)
            .filter_map(|q| q.cq().delayed.iter().map(|(t, _)| *t).min());
        timers.chain(delayed).min()
    }

    /// Signals every queue whose coalescing timer has expired, and posts
    /// the injected-delay completions that are due.
    pub fn flush_interrupts(&mut self, now: Instant) {
        let regs = self.regs;
        if self.delaying || self.faults.delays_pending() {
            let mut any = false;
            for q in self.queues.iter().flatten() {
                let mut cq = q.cq();
                any |= cq.post_due(now).is_some();
                cq.maybe_signal();
            }
            self.delaying = any;
        }
        for (qid, q) in self.queues.iter().enumerate() {
            // Polled queues have no timers: skip them without touching
            // their lock, which the compute units take to post.
            let Some(q) = q.as_ref().filter(|q| q.peer.is_some()) else { continue };
            let mut cq = q.cq();
            if let Some(irq) = cq.irq.as_mut()
                && irq.first_pending.is_some_and(|t| now.duration_since(t) >= irq.delay)
            {
                signal(regs, qid as u16, irq);
            }
        }
    }

    pub fn clear(&mut self) {
        (0..self.queues.len()).for_each(|qid| self.remove(qid));
    }

    pub fn active(&self) -> usize {
        self.queues.iter().flatten().count()
    }

    /// Serves every queue once, up to a batch each: quick commands run
    /// here, Top-K and gather go to the compute units. True if any command
    /// was taken.
    pub fn poll(&mut self, executor: &mut Executor, units: &ComputeUnits) -> bool {
        let mut worked = false;
        // High-priority queues first, then the rest; every queue every pass.
        for high in [true, false] {
            for qid in 0..self.queues.len() {
                if self.queues[qid].as_ref().is_some_and(|q| q.high == high) {
                    worked |= self.serve(qid as u16, executor, units);
                }
            }
        }
        worked
    }

    fn serve(&mut self, qid: u16, executor: &mut Executor, units: &ComputeUnits) -> bool {
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
        if tail != q.seen_tail {
            q.seen_tail = tail;
            q.ignored_tail = None;
            if q.sq_head != tail && self.faults.drop_doorbell() {
                tracing::warn!(qid, tail, "injected: SQ doorbell missed");
                q.ignored_tail = Some(tail);
            }
        }
        if q.ignored_tail == Some(tail) {
            return false;
        }
        let mut taken = 0;
        let mut inline = 0;
        while q.sq_head != tail && taken < BATCH {
            if !q.cq().reserve() {
                break; // completion ring full: wait for the host to consume
            }
            let mut raw = [0u8; SQE_SIZE as usize];
            let at = q.sq_addr + u64::from(q.sq_head) * SQE_SIZE;
            regs.read_bytes(at, &mut raw).expect("ring checked inside the window at create");
            let sqe = SubmissionEntry::read_from_bytes(&raw).expect("64 bytes make an entry");
            q.sq_head = (q.sq_head + 1) % q.entries;
            taken += 1;
            let sq_head = q.sq_head as u16;
            let command_id = sqe.command_id.get();
            if self.faults.abort_now() {
                tracing::error!(qid, cid = command_id, opcode = %sqe.opcode, "injected: the device aborts mid-command");
                std::process::abort();
            }
            if units.available() && sqe.opcode.is_compute() {
                // Decoded here, so a unit gets only well-formed commands;
                // one that does not decode is refused below, inline.
                if let Ok(command) = QueueCommand::decode(&sqe) {
                    tracing::trace!(qid, cid = command_id, "to a compute unit");
                    let job =
                        Job::new(command, command_id, sq_head, q.cq.clone(), q.high, q.writer);
                    units.submit_command(executor, job);
                    continue;
                }
            }
            // NOP measures the command path itself: no clock reads for it.
            let (outcome, exec_ns) = if sqe.opcode == QueueOpcode::NOP {
                (executor.execute_entry(&sqe, q.writer), 0)
            } else {
                let start = Instant::now();
                let outcome = executor.execute_entry(&sqe, q.writer);
                let _ = self.faults.stretch(start.elapsed());
                (outcome, start.elapsed().as_nanos() as u64)
            };
            tracing::trace!(qid, opcode = %sqe.opcode, cid = command_id, code = %outcome.code, exec_ns);
            q.cq().post(Finished { outcome, exec_ns, sq_head, command_id });
            inline += 1;
        }
        if inline > 0 {
            // One interrupt decision per batch: a batch coalesces by itself.
            q.cq().maybe_signal();
        }
        taken > 0
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
    if regs.load_u32(irq_mask(qid), SeqCst) & 1 == 0
        && let Some(fd) = &irq.fd
        && let Err(e) = fd.write(1)
    {
        tracing::warn!(qid, error = %e, "signalling an interrupt vector");
    }
    irq.pending = 0;
    irq.first_pending = None;
}
