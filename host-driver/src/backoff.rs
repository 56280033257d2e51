//! How a host waits for a device: the polling policy of every bounded wait
//! (mailbox doorbell, Mailbox Lock, completions, readiness). A policy is a
//! pure function of the time waited, read from an injected [`Clock`], so
//! its phases are unit-tested without sleeping.

use std::time::{Duration, Instant};

/// Where a wait reads the time.
pub(crate) trait Clock {
    fn now(&self) -> Instant;
}

/// The monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// What a wait does before its next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Stay on the CPU (a spin-loop hint).
    Spin,
    /// Step aside for any runnable thread, staying runnable.
    Yield,
    /// Sleep this long.
    Sleep(Duration),
}

/// A wait spins this long before it yields.
const SPIN: Duration = Duration::from_micros(20);
/// A wait yields until this long, then sleeps.
const YIELD_UNTIL: Duration = Duration::from_millis(5);
/// How long a wait past [`YIELD_UNTIL`] sleeps between polls.
const SLEEP: Duration = Duration::from_micros(50);
/// The clock is read once per this many polls: it costs more than a poll.
const POLLS_PER_CLOCK_READ: u32 = 64;

/// Waits between polls: spins for the first 20 us (yielding every 64
/// polls), yields until 5 ms, then sleeps 50 us at a time. Time-based, so a
/// short wait stays on the CPU (a sleeping thread's wake-up costs far more
/// than a NOP) and a long one does not burn a core.
#[derive(Debug)]
pub(crate) struct Backoff<C: Clock = SystemClock> {
    clock: C,
    start: Instant,
    polls: u32,
    step: Step,
    /// How long the wait spins before it yields.
    spin: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self::with_clock(SystemClock, SPIN)
    }

    /// Yields from the first poll: for a wait known to be long, whose CPU a
    /// thread that must run first (on a small machine, the device's) may need.
    pub(crate) fn yielding() -> Self {
        Self::with_clock(SystemClock, Duration::ZERO)
    }
}

impl<C: Clock> Backoff<C> {
    fn with_clock(clock: C, spin: Duration) -> Self {
        let start = clock.now();
        let step = if spin.is_zero() { Step::Yield } else { Step::Spin };
        Self { clock, start, polls: 0, step, spin }
    }

    /// What to do before the next poll.
    pub(crate) fn next_step(&mut self) -> Step {
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(POLLS_PER_CLOCK_READ) {
            let waited = self.clock.now().saturating_duration_since(self.start);
            self.step = if waited < self.spin {
                // A spin steps aside now and then: the device's engine may
                // share this CPU, and a VM's scheduler may pack busy threads
                // onto one vCPU (docs/PERFORMANCE.md, "Command path").
                return Step::Yield;
            } else if waited < YIELD_UNTIL {
                // Yielding keeps the thread runnable: on a virtual machine a
                // halted CPU takes 100-400 us to wake, longer than most
                // commands; a yield costs nothing when nobody else runs.
                Step::Yield
            } else {
                Step::Sleep(SLEEP)
            };
        }
        self.step
    }

    /// Waits before the next poll.
    pub(crate) fn wait(&mut self) {
        match self.next_step() {
            Step::Spin => std::hint::spin_loop(),
            Step::Yield => std::thread::yield_now(),
            Step::Sleep(d) => std::thread::sleep(d),
        }
    }
}

/// The last few Execution Times of one opcode, and how a polled wait for
/// its next command starts from them. The typical time is their minimum:
/// one slow outlier (a first scan faulting its pages in, a vCPU stall)
/// must not make the next waits nap past their completions, while a
/// command that really got longer is known as such after
/// [`RecentExec::LEN`] runs (docs/PERFORMANCE.md, "Command path").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecentExec {
    ns: [u32; RecentExec::LEN],
    next: u8,
    /// How many times were recorded, up to LEN.
    filled: u8,
}

/// A polled wait naps first when the command's typical execution time is
/// at least this long (hybrid polling, as Linux block devices do): its CPU
/// goes to the device's compute units meanwhile, which on a machine with
/// few cores is what lets them run at full speed. Below it, waking from a
/// nap (100-400 us for a halted virtual CPU) would cost more than it gives.
const NAP_MIN_EXEC: Duration = Duration::from_millis(2);

/// A polled wait yields from its first poll, instead of spinning first,
/// when the command's typical execution time is at least this long: on a
/// machine with few cores, the compute unit that must start the command,
/// or post its completion, may be waiting for this CPU.
const YIELD_MIN_EXEC: Duration = Duration::from_micros(50);

impl RecentExec {
    const LEN: usize = 4;

    pub(crate) fn record(&mut self, ns: u32) {
        self.ns[usize::from(self.next)] = ns;
        self.next = ((usize::from(self.next) + 1) % Self::LEN) as u8;
        self.filled = (self.filled + 1).min(Self::LEN as u8);
    }

    /// The shortest recent time (zero before any was recorded).
    fn typical(&self) -> Duration {
        let recorded = &self.ns[..usize::from(self.filled)];
        Duration::from_nanos(recorded.iter().copied().min().map_or(0, u64::from))
    }

    /// How long a polled wait naps before its first poll, if at all: half
    /// the typical time, so a command quicker than usual, or a slow wake
    /// from the nap, costs little.
    pub(crate) fn nap(&self) -> Option<Duration> {
        let typical = self.typical();
        (typical >= NAP_MIN_EXEC).then_some(typical / 2)
    }

    /// How a wait polls.
    pub(crate) fn backoff(&self) -> Backoff {
        if self.typical() >= YIELD_MIN_EXEC { Backoff::yielding() } else { Backoff::new() }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A clock the test moves.
    struct TestClock<'a>(&'a Cell<Instant>);

    impl Clock for TestClock<'_> {
        fn now(&self) -> Instant {
            self.0.get()
        }
    }

    /// The steps of `n` polls.
    fn steps(backoff: &mut Backoff<TestClock<'_>>, n: u32) -> Vec<Step> {
        (0..n).map(|_| backoff.next_step()).collect()
    }

    #[test]
    fn spins_then_yields_then_sleeps_by_the_time_waited() {
        let t0 = Instant::now();
        let now = Cell::new(t0);
        let mut b = Backoff::with_clock(TestClock(&now), SPIN);
        // Within the spin time: spins, stepping aside once per clock read.
        let first = steps(&mut b, POLLS_PER_CLOCK_READ);
        assert!(first[..63].iter().all(|&s| s == Step::Spin));
        assert_eq!(first[63], Step::Yield);
        // Past it: yields, whatever the poll count.
        now.set(t0 + Duration::from_micros(25));
        let yielding = steps(&mut b, POLLS_PER_CLOCK_READ);
        assert_eq!(yielding[63], Step::Yield);
        assert!(steps(&mut b, 10).iter().all(|&s| s == Step::Yield));
        // Past 5 ms: sleeps, bounded by its period.
        now.set(t0 + YIELD_UNTIL);
        let sleeping = steps(&mut b, POLLS_PER_CLOCK_READ);
        assert_eq!(sleeping[sleeping.len() - 1 - 10..], [Step::Sleep(SLEEP); 11]);
    }

    #[test]
    fn a_yielding_wait_never_spins() {
        let now = Cell::new(Instant::now());
        let mut b = Backoff::with_clock(TestClock(&now), Duration::ZERO);
        assert!(steps(&mut b, 200).iter().all(|&s| s == Step::Yield));
    }

    #[test]
    fn a_slow_outlier_does_not_raise_the_typical_time_but_a_lasting_change_does() {
        let mut recent = RecentExec::default();
        assert_eq!(recent.typical(), Duration::ZERO, "nothing recorded: no nap");
        assert_eq!(recent.nap(), None);
        recent.record(10_000_000); // a cold first scan
        assert_eq!(recent.nap(), Some(Duration::from_millis(5)));
        recent.record(200_000);
        assert_eq!(recent.typical(), Duration::from_micros(200), "one fast run is enough");
        assert_eq!(recent.nap(), None, "too short to nap before");
        for _ in 0..3 {
            recent.record(5_000_000);
        }
        assert_eq!(recent.typical(), Duration::from_micros(200), "still within the window");
        recent.record(5_000_000);
        assert_eq!(recent.typical(), Duration::from_millis(5), "known after LEN runs");
        assert_eq!(recent.nap(), Some(Duration::from_micros(2500)));
    }
}
