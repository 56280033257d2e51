//! The compute units: threads that run Top-K and gather (and the shares of
//! a split Top-K) while the engine keeps taking commands, fed from one job
//! queue in two priority classes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use pnm_firmware::kv::Writer;
use pnm_protocol::SharedMemory;
use pnm_protocol::queue::QueueCommand;
use pnm_protocol::regs::{self, pnm};

use crate::executor::{Executor, TopkPlan};
use crate::queues::{CompletionRing, Finished};
use crate::refusal::Refusal;
use pnm_protocol::commands::HIGH_PRIORITY_BURST;

/// How long an idle compute unit keeps polling for work before it sleeps.
const UNIT_SPIN: Duration = Duration::from_micros(200);

/// A command for a compute unit.
#[derive(Debug)]
pub struct Job {
    command: QueueCommand,
    command_id: u16,
    sq_head: u16,
    cq: Arc<Mutex<CompletionRing>>,
    /// From a high-priority queue: taken before normal jobs.
    high: bool,
    /// The queue's writer (compute commands reserve nothing, but every
    /// command runs as its queue).
    writer: Writer,
    /// Set when the command is split across units: this job's share.
    part: Option<(Arc<Split>, u32)>,
}

impl Job {
    /// A whole command from a queue (split into shares, if at all, by
    /// [`ComputeUnits::submit_command`]).
    pub(crate) fn new(
        command: QueueCommand,
        command_id: u16,
        sq_head: u16,
        cq: Arc<Mutex<CompletionRing>>,
        high: bool,
        writer: Writer,
    ) -> Self {
        Self { command, command_id, sq_head, cq, high, writer, part: None }
    }
}

/// Jobs waiting for a compute unit, in two classes: high-priority jobs go
/// first, but after [`HIGH_PRIORITY_BURST`] of them in a row a waiting
/// normal job gets its turn, so neither class starves.
#[derive(Debug)]
pub struct JobQueue<T> {
    high: VecDeque<T>,
    normal: VecDeque<T>,
    /// High-priority jobs taken since the last normal one.
    streak: u32,
}

impl<T> Default for JobQueue<T> {
    fn default() -> Self {
        Self { high: VecDeque::new(), normal: VecDeque::new(), streak: 0 }
    }
}

/// What the queue needs to know of a job.
pub trait Prioritized {
    fn high(&self) -> bool;
}

impl Prioritized for Job {
    fn high(&self) -> bool {
        self.high
    }
}

impl<T: Prioritized> JobQueue<T> {
    pub fn push(&mut self, job: T) {
        if job.high() { self.high.push_back(job) } else { self.normal.push_back(job) }
    }

    pub fn pop(&mut self) -> Option<T> {
        let normal_turn = self.streak >= HIGH_PRIORITY_BURST && !self.normal.is_empty();
        match (normal_turn, self.high.is_empty()) {
            (false, false) => {
                self.streak += 1;
                self.high.pop_front()
            }
            _ => {
                self.streak = 0;
                self.normal.pop_front().or_else(|| self.high.pop_front())
            }
        }
    }
}

/// One share's best k, or why the share was refused.
type PartResult = Result<crate::executor::PartResult, Refusal>;

/// A Top-K split across compute units: each scans a share of the pages,
/// the last to finish merges the shares (exactly) and completes it.
#[derive(Debug)]
pub struct Split {
    parts: u32,
    /// The sequence's committed tokens when the command was taken: every
    /// part scans the same snapshot, even if a commit lands meanwhile.
    tokens: u64,
    /// The command's checked fields and queries, read from the host once.
    plan: TopkPlan,
    results: Mutex<Vec<Option<PartResult>>>,
    remaining: AtomicUsize,
    /// When the first share started: Execution Time runs from there.
    start: std::sync::OnceLock<Instant>,
}

/// The device's compute units: threads that run Top-K and gather while the
/// engine keeps taking commands. Completions may therefore arrive out of
/// order; each names its command id.
#[derive(Debug)]
pub struct ComputeUnits {
    jobs: Arc<(Mutex<JobQueue<Job>>, Condvar)>,
    stop: Arc<AtomicBool>,
    /// Commands handed to the units and not yet completed.
    in_flight: Arc<AtomicUsize>,
    /// Units still running (an injected fault can kill one).
    alive: Arc<AtomicUsize>,
    /// Nanoseconds the units spent executing, all together (for the
    /// thermal model).
    busy_ns: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ComputeUnits {
    /// Starts `count` units (0: the engine runs everything itself). `wake`
    /// is the engine's wake vector, rung when a coalescing timer starts.
    pub fn start(count: u32, pin: bool, executor: &Executor, wake: Arc<EventFd>) -> Self {
        let jobs = Arc::new((Mutex::new(JobQueue::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicUsize::new(count as usize));
        let busy_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Each unit on its own CPU when there are enough: the parts of a
        // split Top-K then always run side by side. Left to the scheduler,
        // two units woken together from one CPU were seen sharing it for a
        // whole benchmark case (docs/PERFORMANCE.md, "Through the device").
        let cpus = allowed_cpus();
        let pinned = pin && cpus.len() >= count as usize;
        // Every unit has pinned itself before the device goes on (and
        // reports Ready): nothing runs on a unit that is still moving.
        let placed = Arc::new(std::sync::Barrier::new(count as usize + 1));
        let threads = (0..count)
            .map(|i| {
                let placed = placed.clone();
                let cpu = pinned.then(|| cpus[i as usize]);
                let unit = Unit {
                    index: i as usize,
                    jobs: jobs.clone(),
                    stop: stop.clone(),
                    in_flight: in_flight.clone(),
                    alive: alive.clone(),
                    busy_ns: busy_ns.clone(),
                    wake: wake.clone(),
                    regs: executor.mem,
                };
                let mut executor = executor.clone();
                std::thread::Builder::new()
                    .name(format!("pnm-cu{i}"))
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            pin_to(cpu);
                        }
                        placed.wait();
                        unit.run(&mut executor)
                    })
                    .expect("spawn a compute unit")
            })
            .collect();
        placed.wait();
        Self { jobs, stop, in_flight, alive, busy_ns, threads }
    }

    /// Nanoseconds the units have spent executing since they started.
    pub fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Acquire)
    }

    /// Units alive now.
    pub fn alive(&self) -> usize {
        self.alive.load(Acquire)
    }

    pub(crate) fn available(&self) -> bool {
        self.alive.load(Acquire) > 0
    }

    /// True while commands handed to the units are still running: the
    /// engine then sleeps instead of spinning, leaving the CPU to them.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Acquire) > 0
    }

    /// Hands a command to the units: an exact Top-K over a long sequence
    /// as shares (see [`Executor::split_plan`]), anything else whole.
    pub(crate) fn submit_command(&self, executor: &mut Executor, job: Job) {
        let units = self.alive.load(Acquire) as u32;
        let (queue, ready) = &*self.jobs;
        let (topk, with_rows) = match job.command {
            QueueCommand::Topk(c) => (Some(c), false),
            QueueCommand::TopkGather(c) => (Some(c), true),
            _ => (None, false),
        };
        // A command the plan refuses runs whole, to be refused as usual.
        let split = topk.and_then(|c| {
            let (tokens, parts) = executor.split_plan(&c, units)?;
            executor.plan_split(c, with_rows).ok().map(|plan| (tokens, parts, plan))
        });
        match split {
            Some((tokens, parts, plan)) => {
                let split = Arc::new(Split {
                    parts,
                    tokens,
                    plan,
                    results: Mutex::new((0..parts).map(|_| None).collect()),
                    remaining: AtomicUsize::new(parts as usize),
                    start: std::sync::OnceLock::new(),
                });
                self.in_flight.fetch_add(parts as usize, SeqCst);
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                for part in 0..parts {
                    q.push(Job { part: Some((split.clone(), part)), cq: job.cq.clone(), ..job });
                }
                drop(q);
                ready.notify_all();
            }
            _ => {
                self.in_flight.fetch_add(1, SeqCst);
                queue.lock().unwrap_or_else(|e| e.into_inner()).push(job);
                ready.notify_one();
            }
        }
    }
}

impl Drop for ComputeUnits {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.jobs.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    match sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "reading the CPU affinity");
            Vec::new()
        }
    }
}

/// Keeps the calling thread on `cpu`.
fn pin_to(cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    if let Err(e) =
        set.set(cpu).and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set))
    {
        tracing::warn!(cpu, error = %e, "pinning a compute unit");
    }
}

/// One compute-unit thread's view of the shared job queue.
struct Unit {
    index: usize,
    jobs: Arc<(Mutex<JobQueue<Job>>, Condvar)>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    alive: Arc<AtomicUsize>,
    busy_ns: Arc<std::sync::atomic::AtomicU64>,
    /// The engine's wake vector.
    wake: Arc<EventFd>,
    regs: SharedMemory,
}

impl Unit {
    fn run(&self, executor: &mut Executor) {
        let (queue, ready) = &*self.jobs;
        let mut last_job = Instant::now();
        loop {
            // Injected: this unit stops (its jobs wait for the others).
            while executor.faults.unit_hung(self.index, Instant::now()) {
                if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // Injected: this unit dies between jobs; the last one alive
            // does not (its queued jobs would wait for ever).
            if executor.faults.unit_dies(self.index) {
                if self.alive.fetch_update(SeqCst, SeqCst, |n| (n > 1).then(|| n - 1)).is_ok() {
                    tracing::error!(unit = self.index, "injected: compute unit died");
                    executor.faults.unit_died();
                    return;
                }
                tracing::warn!(
                    unit = self.index,
                    "injected unit death ignored: the last unit alive"
                );
            }
            let job = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(job) = q.pop() {
                        break job;
                    }
                    if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    if last_job.elapsed() < UNIT_SPIN {
                        // Recently busy: stay on the CPU; waking a sleeping
                        // thread costs more than the next command takes to come.
                        drop(q);
                        std::thread::yield_now();
                        q = queue.lock().unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    // Bounded, so a stop is seen even without a notification.
                    q = ready
                        .wait_timeout(q, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            tracing::trace!(cid = job.command_id, part = ?job.part.as_ref().map(|p| p.1), "compute unit starts");
            let start = Instant::now();
            let finished = match &job.part {
                None => Some((
                    executor.execute(&job.command, job.writer),
                    start.elapsed().as_nanos() as u64,
                )),
                Some((split, part)) => {
                    split.start.get_or_init(|| start);
                    let result =
                        executor.topk_part(&split.plan, split.tokens, (*part, split.parts));
                    split.results.lock().unwrap_or_else(|e| e.into_inner())[*part as usize] =
                        Some(result);
                    // The last part to finish completes the command.
                    (split.remaining.fetch_sub(1, SeqCst) == 1).then(|| {
                        let results = std::mem::take(
                            &mut *split.results.lock().unwrap_or_else(|e| e.into_inner()),
                        );
                        let parts =
                            results.into_iter().map(|r| r.expect("every part ran")).collect();
                        let outcome = executor.finish_split(&split.plan, split.tokens, parts);
                        let first = split.start.get().copied().unwrap_or(start);
                        (outcome, first.elapsed().as_nanos() as u64)
                    })
                }
            };
            last_job = Instant::now();
            // This unit's own run, a share of a split Top-K or a whole command.
            let unit_ns = last_job.duration_since(start).as_nanos() as u64;
            self.regs.fetch_add_u64(regs::PNM_OFFSET + pnm::UNIT_BUSY_NS, unit_ns);
            let Some((outcome, exec_ns)) = finished else {
                self.in_flight.fetch_sub(1, SeqCst);
                continue;
            };
            let exec_ns =
                exec_ns + executor.faults.stretch(Duration::from_nanos(exec_ns)).as_nanos() as u64;
            self.busy_ns.fetch_add(exec_ns, SeqCst);
            tracing::trace!(cid = job.command_id, exec_ns, code = %outcome.code, "compute unit done");
            // The engine slept while this ran. Clear Device Sleeping first,
            // so a host that reads this completion and rings at once does
            // not pay for waking the engine as well; post; then wake the
            // engine, off the path to the host. No lost wake-up: whoever
            // rings after the clear is seen by the engine this wake starts.
            let sleeping = regs::PNM_OFFSET + pnm::DEVICE_SLEEPING;
            let wake_engine = self.in_flight.fetch_sub(1, SeqCst) == 1
                && self.regs.load_u32(sleeping, SeqCst) != 0;
            if wake_engine {
                self.regs.store_u32(sleeping, 0, SeqCst);
            }
            let mut cq = job.cq.lock().unwrap_or_else(|e| e.into_inner());
            cq.post(Finished {
                outcome,
                exec_ns,
                sq_head: job.sq_head,
                command_id: job.command_id,
            });
            // A started coalescing timer needs the engine to keep time too.
            let timer_started = cq.maybe_signal();
            drop(cq);
            if wake_engine || timer_started {
                let _ = self.wake.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tagged(bool, u32);

    impl Prioritized for Tagged {
        fn high(&self) -> bool {
            self.0
        }
    }

    fn drain(q: &mut JobQueue<Tagged>) -> Vec<(bool, u32)> {
        std::iter::from_fn(|| q.pop().map(|t| (t.0, t.1))).collect()
    }

    #[test]
    fn high_priority_goes_first_in_bursts_and_normal_is_never_starved() {
        let mut q = JobQueue::default();
        for i in 0..3 {
            q.push(Tagged(false, i));
        }
        for i in 0..10 {
            q.push(Tagged(true, i));
        }
        let order = drain(&mut q);
        let burst = HIGH_PRIORITY_BURST as usize;
        // A burst of high, one normal, another burst, ... each class FIFO.
        assert!(order[..burst].iter().all(|j| j.0));
        assert_eq!(order[burst], (false, 0));
        assert!(order[burst + 1..2 * burst + 1].iter().all(|j| j.0));
        assert_eq!(order[2 * burst + 1], (false, 1));
        let highs: Vec<u32> = order.iter().filter(|j| j.0).map(|j| j.1).collect();
        let normals: Vec<u32> = order.iter().filter(|j| !j.0).map(|j| j.1).collect();
        assert_eq!(highs, (0..10).collect::<Vec<_>>());
        assert_eq!(normals, vec![0, 1, 2]);
        // One class alone is plain FIFO.
        for i in 0..6 {
            q.push(Tagged(false, i));
        }
        assert_eq!(drain(&mut q), (0..6).map(|i| (false, i)).collect::<Vec<_>>());
        for i in 0..6 {
            q.push(Tagged(true, i));
        }
        assert_eq!(drain(&mut q), (0..6).map(|i| (true, i)).collect::<Vec<_>>());
    }
}
