//! The async host API on tokio: many tasks, many commands in flight on one
//! queue pair, completions delivered by the queue's interrupt vector through
//! `AsyncFd` to the right future.
//!
//! A reaper task owns the waiting: it reads completions, hands each to the
//! future that submitted it (or drops it if that future was cancelled), and
//! sleeps on the interrupt eventfd with the unmask-recheck-sleep handshake.
//! A full queue makes `submit` wait for room (a semaphore of `entries - 1`
//! permits, each held until its command's completion is reaped) and
//! `try_submit` fail with [`Error::QueueFull`]; nothing is dropped.
//!
//! Every wait is bounded: a command's future resolves with
//! [`Error::QueueTimeout`] after the device's command timeout, and while
//! commands are in flight the reaper looks at the ring itself every so
//! often, so interrupts that stop arriving (see `MissedInterrupts`) turn
//! the queue into a polled one instead of stalling it.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pnm_protocol::SharedMemory;
use pnm_protocol::queue::{
    HostBuffer, QueueCommand, QueueOpcode, Stream, SubmissionEntry, Topk, TopkLayout,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use crate::device::Device;
use crate::dma::{DmaBuf, DmaPool};
use crate::error::{Error, Result};
use crate::kv::{Rows, TopK, TopkRequest};
use crate::queue::{
    Completion, InterruptConfig, MissedInterrupts, QueueOptions, QueuePair, opcode_name,
};

/// How often a reaper that gave up on interrupts looks at the ring.
const POLL_PERIOD: Duration = Duration::from_millis(1);

/// A submitted command's answer to come.
struct Pending {
    rx: oneshot::Receiver<Completion>,
    cid: u16,
    opcode: QueueOpcode,
    timeout: Duration,
}

struct Waiter {
    reply: oneshot::Sender<Completion>,
    _permit: OwnedSemaphorePermit,
}

struct State {
    /// Taken only when the queue is deleted (on drop).
    queue: Option<QueuePair>,
    pool: DmaPool,
    waiters: Vec<Option<Waiter>>,
}

impl State {
    fn queue(&mut self) -> &mut QueuePair {
        self.queue.as_mut().expect("present until drop")
    }
}

struct Shared {
    device: Device,
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    regs: SharedMemory,
    /// Told of every submission, so an idle reaper starts watching for
    /// lost interrupts.
    submitted: Notify,
    irq: InterruptConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An interrupt-driven queue pair for async tasks. Cloning shares it.
#[derive(Clone)]
pub struct AsyncQueue {
    shared: Arc<Shared>,
    reaper: Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for AsyncQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncQueue").field("device", &self.shared.device.path()).finish()
    }
}

impl AsyncQueue {
    /// A new queue pair on `device` with `entries` per ring and interrupts
    /// on `vector` of this host. Must be called inside a tokio runtime.
    pub fn new(device: &Device, entries: u16, irq: InterruptConfig) -> Result<Self> {
        let handle =
            device.handle(QueueOptions { entries, interrupts: Some(irq), ..Default::default() })?;
        let (queue, pool) = handle.take_queue()?;
        let interrupts = handle.interrupts().expect("interrupt handles have vectors");
        let fd = interrupts
            .vector_fd(irq.vector)
            .try_clone_to_owned()
            .and_then(crate::sys::register_async_fd)
            .map_err(|e| Error::Invalid(format!("registering the interrupt eventfd: {e}")))?;
        let waiters = (0..queue.entries()).map(|_| None).collect();
        let permits = Arc::new(Semaphore::new((queue.entries() - 1) as usize));
        let regs = handle.region();
        let shared = Arc::new(Shared {
            device: handle,
            state: Mutex::new(State { queue: Some(queue), pool, waiters }),
            permits,
            regs,
            submitted: Notify::new(),
            irq,
        });
        let reaper = tokio::spawn(reap(shared.clone(), fd));
        Ok(Self { shared, reaper: Arc::new(reaper) })
    }

    fn enqueue(&self, mut sqe: SubmissionEntry, permit: OwnedSemaphorePermit) -> Result<Pending> {
        let (reply, rx) = oneshot::channel();
        let mut state = self.shared.lock();
        sqe.command_id = 0.into();
        let cid = state.queue().push(sqe)?;
        state.waiters[usize::from(cid)] = Some(Waiter { reply, _permit: permit });
        state.queue().ring();
        drop(state);
        self.shared.submitted.notify_one();
        Ok(Pending { rx, cid, opcode: sqe.opcode, timeout: self.shared.device.command_timeout() })
    }

    async fn complete(pending: Pending) -> Result<Completion> {
        let Pending { rx, cid, opcode, timeout } = pending;
        let start = Instant::now();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(_)) => Err(Error::Protocol(format!(
                "{} was abandoned: the queue's reaper stopped",
                opcode_name(opcode)
            ))),
            Err(_) => Err(Error::QueueTimeout {
                command: opcode_name(opcode),
                command_id: cid,
                waited: start.elapsed(),
            }),
        }
    }

    /// Submits a command, waiting for room if the queue is full, and
    /// resolves with its completion.
    pub async fn submit(&self, sqe: SubmissionEntry) -> Result<Completion> {
        let permit = self
            .shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Invalid("queue closed".into()))?;
        let pending = self.enqueue(sqe, permit)?;
        Self::complete(pending).await
    }

    /// Submits a command if the queue has room now, else [`Error::QueueFull`].
    pub fn try_submit(
        &self,
        sqe: SubmissionEntry,
    ) -> Result<impl Future<Output = Result<Completion>> + use<>> {
        let permit = self
            .shared
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::QueueFull(self.shared.lock().queue().entries() - 1))?;
        let pending = self.enqueue(sqe, permit)?;
        Ok(Self::complete(pending))
    }

    pub async fn nop(&self) -> Result<Completion> {
        self.submit(QueueCommand::Nop.encode(0)).await?.ok()
    }

    fn alloc(&self, len: u64) -> Result<DmaBuf> {
        let mut state = self.shared.lock();
        let mut mailbox = self.shared.device.mailbox_client();
        state.pool.alloc(&mut mailbox, len)
    }

    /// One Top-K: TOPK.
    pub async fn topk(&self, request: &TopkRequest<'_>) -> Result<TopK> {
        Ok(self.run_topk(request, false).await?.0)
    }

    /// Top-K and the selected K and V rows (in the sequence's dtype):
    /// TOPK_GATHER.
    pub async fn topk_gather(&self, request: &TopkRequest<'_>) -> Result<(TopK, Rows)> {
        let (top, rows) = self.run_topk(request, true).await?;
        Ok((top, rows.expect("TOPK_GATHER returns rows")))
    }

    async fn run_topk(
        &self,
        request: &TopkRequest<'_>,
        rows: bool,
    ) -> Result<(TopK, Option<Rows>)> {
        let TopkRequest { seq, layer, head, query, k, aggregation, selection, skip_bad_rows } =
            *request;
        let row_bytes = seq.shape.row_bytes();
        let layout = TopkLayout { k: u64::from(k), row_bytes: if rows { row_bytes } else { 0 } };
        let q = self.alloc(query.data.len() as u64)?;
        let out = self.alloc(layout.len())?;
        let regs = self.shared.regs;
        regs.write_bytes(q.addr, &query.data).expect("DMA buffer in the region");
        let topk = Topk {
            stream: Stream { seq: seq.id, layer, head },
            k,
            group: query.group,
            query_dtype: query.dtype,
            aggregation,
            selection,
            skip_bad_rows,
            queries: HostBuffer { addr: q.addr, len: query.data.len() as u32 },
            results: HostBuffer {
                addr: out.addr,
                len: layout.len().min(u64::from(u32::MAX)) as u32,
            },
        };
        let sqe =
            if rows { QueueCommand::TopkGather(topk) } else { QueueCommand::Topk(topk) }.encode(0);
        let result = async {
            let c = self.submit(sqe).await?.ok()?;
            let top = Device::read_topk(regs, &c, k, out.addr, layout)?;
            let selected = rows.then(|| {
                let mut r = Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
                let n = top.indices.len() as u64;
                r.read_from(
                    regs,
                    out.addr + layout.key_rows(),
                    out.addr + layout.value_rows(),
                    n,
                    row_bytes,
                );
                r
            });
            Ok((top, selected))
        }
        .await;
        if matches!(result, Err(Error::QueueTimeout { .. })) {
            // The device may still write them: they stay allocated (the
            // device frees them when this process goes).
            std::mem::forget((q, out));
        } else {
            drop((q, out));
        }
        result
    }
}

impl Drop for AsyncQueue {
    fn drop(&mut self) {
        // The last clone stops the reaper; the queue pair and buffers go
        // back to the device when `Shared` (and its handle) drops.
        if Arc::strong_count(&self.reaper) == 1 {
            self.reaper.abort();
        }
    }
}

/// The reaper: completions to their futures; sleeps on the interrupt, and
/// while commands are in flight looks at the ring itself now and then to
/// catch interrupts that never come.
async fn reap(shared: Arc<Shared>, fd: AsyncFd<OwnedFd>) {
    let irq = shared.irq;
    let mut missed = MissedInterrupts::default();
    let mut polling = false;
    let idle_permits = shared.lock().queue().entries() as usize - 1;
    loop {
        match deliver_locked(&shared) {
            Err(()) => return,
            Ok(n) if n > 0 => continue,
            Ok(_) => {}
        }
        let in_flight = shared.permits.available_permits() < idle_permits;
        if polling {
            if in_flight {
                tokio::time::sleep(POLL_PERIOD).await;
            } else {
                shared.submitted.notified().await;
            }
            continue;
        }
        // Nothing new: unmask, look once more, then sleep on the vector.
        shared.lock().queue().set_masked(false);
        match deliver_locked(&shared) {
            Err(()) => return,
            Ok(0) => {}
            Ok(_) => {
                shared.lock().queue().set_masked(true);
                continue;
            }
        }
        let rung = if in_flight {
            match wait_readable(&fd, MissedInterrupts::check_interval(&irq)).await {
                Err(()) => return,
                Ok(true) => true,
                // Still unmasked: a completion posted by now has its
                // interrupt on the way; none within the grace is a miss.
                Ok(false) => match deliver_locked(&shared) {
                    Err(()) => return,
                    Ok(0) => true,
                    Ok(_) => {
                        let late = wait_readable(&fd, MissedInterrupts::grace(&irq)).await;
                        let qid = shared.lock().queue().qid;
                        polling = missed.record(late != Ok(true), qid, irq.vector);
                        true
                    }
                },
            }
        } else {
            tokio::select! {
                r = wait_readable(&fd, Duration::MAX) => r.is_ok(),
                () = shared.submitted.notified() => true,
            }
        };
        if !rung {
            return;
        }
        shared.lock().queue().set_masked(true);
    }
}

/// Delivers what the ring holds; Err after logging a broken protocol.
fn deliver_locked(shared: &Shared) -> std::result::Result<usize, ()> {
    let mut state = shared.lock();
    deliver(&mut state).map_err(|e| {
        tracing::error!(error = %e, "async queue: device broke the protocol; stopping");
    })
}

/// Waits (at most `bound`) for the interrupt eventfd and consumes its
/// count: Ok(true) if it was rung, Err after logging a failed wait.
async fn wait_readable(fd: &AsyncFd<OwnedFd>, bound: Duration) -> std::result::Result<bool, ()> {
    let wait = async {
        let mut guard = fd.readable().await?;
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(guard.get_inner(), &mut buf);
        guard.clear_ready();
        Ok::<_, std::io::Error>(())
    };
    let outcome = if bound == Duration::MAX {
        Ok(wait.await)
    } else {
        tokio::time::timeout(bound, wait).await
    };
    match outcome {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "async queue: waiting on the interrupt");
            Err(())
        }
        Err(_) => Ok(false),
    }
}

/// Reaps the ring and answers every waiter whose command completed.
fn deliver(state: &mut State) -> Result<usize> {
    let queue = state.queue();
    let mut cids = queue.reaped.take().unwrap_or_default();
    cids.clear();
    queue.reaped = Some(cids);
    let reaped = queue.reap();
    let cids = queue.reaped.take().expect("set above");
    let n = cids.len();
    for &cid in &cids {
        if let Some(c) = state.queue().take(cid)
            && let Some(w) = state.waiters[usize::from(cid)].take()
        {
            // A cancelled future has dropped its receiver: fine.
            let _ = w.reply.send(c);
        }
    }
    state.queue().reaped = Some(cids);
    reaped.map(|_| n)
}

impl Drop for Shared {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut mailbox = self.device.mailbox_client();
        if let Some(queue) = state.queue.take()
            && let Err(e) = queue.delete(&mut mailbox)
        {
            tracing::warn!(error = %e, "deleting the async queue pair");
        }
        state.pool.release(&mut mailbox);
    }
}
