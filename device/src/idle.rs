//! How the engine spends idle time: spin, yield, or sleep on its wake
//! vector. A pure state machine over an injected [`Clock`], so its phases
//! and the adaptive polling budget are unit-tested without sleeping.

use std::time::{Duration, Instant};

/// Where the engine reads the time.
pub trait Clock {
    fn now(&self) -> Instant;
}

/// The monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Idle time the engine spins (then yields, up to its adaptive polling
/// budget) before it sleeps: a host that sends commands back to back never
/// pays a wake-up.
const SPIN_TIME: Duration = Duration::from_micros(100);
/// Bounds of the adaptive polling budget, and where it starts.
const MIN_POLL_TIME: Duration = Duration::from_micros(100);
const MAX_POLL_TIME: Duration = Duration::from_millis(2);
const INITIAL_POLL_TIME: Duration = Duration::from_millis(1);

/// How long the engine keeps polling after its last work before it sleeps,
/// adapted to the gaps between bursts of work: a gap that a sleep had to
/// cover but that polling up to [`MAX_POLL_TIME`] would have caught raises
/// the budget to cover such gaps (the host stops paying wake-ups); a gap
/// far longer halves it (an idle device sleeps sooner and uses less CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdlePolicy {
    budget: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self { budget: INITIAL_POLL_TIME }
    }
}

impl IdlePolicy {
    /// Work came `gap` after the engine went idle; `slept` if it slept.
    fn observe(&mut self, gap: Duration, slept: bool) {
        if !slept {
            return; // polling caught it: the budget works
        }
        self.budget = if gap <= MAX_POLL_TIME {
            (gap * 5 / 4).clamp(MIN_POLL_TIME, MAX_POLL_TIME).max(self.budget)
        } else {
            (self.budget / 2).max(MIN_POLL_TIME)
        };
    }
}
/// Idle time before the engine sleeps while compute units are busy: long
/// enough for a burst of submissions, short against any Top-K.
const BUSY_UNITS_SPIN_TIME: Duration = Duration::from_micros(5);

/// The clock costs more than a poll: a spin reads it (and yields) only
/// once per this many polls.
const POLLS_PER_CLOCK_READ: u32 = 64;

/// What the engine does on a pass that found no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleStep {
    /// Poll again at once (a spin-loop hint).
    Spin,
    /// Step aside for a host or compute unit sharing this CPU, then poll.
    Yield,
    /// Sleep on the wake vector: idle past the polling budget.
    Sleep,
    /// Sleep on the wake vector while the compute units run commands.
    SleepWhileUnitsRun,
}

/// The engine's idle state between two pieces of work.
#[derive(Debug)]
pub struct Idle<C: Clock> {
    clock: C,
    /// When the engine last found work, if it has been idle since.
    since: Option<Instant>,
    polls: u32,
    spinning: bool,
    slept: bool,
    policy: IdlePolicy,
}

impl<C: Clock> Idle<C> {
    pub fn new(clock: C) -> Self {
        Self {
            clock,
            since: None,
            polls: 0,
            spinning: true,
            slept: false,
            policy: IdlePolicy::default(),
        }
    }

    /// A pass found work: the gap since the last tunes the polling budget.
    pub fn work_found(&mut self) {
        if let Some(since) = self.since.take() {
            self.policy.observe(self.clock.now().saturating_duration_since(since), self.slept);
        }
        self.slept = false;
        self.spinning = true;
        self.polls = 0;
    }

    /// What to do on a pass that found no work.
    pub fn next_step(&mut self, units_busy: bool) -> IdleStep {
        self.polls = self.polls.wrapping_add(1);
        let since = *self.since.get_or_insert_with(|| self.clock.now());
        if units_busy && self.clock.now().saturating_duration_since(since) >= BUSY_UNITS_SPIN_TIME {
            return IdleStep::SleepWhileUnitsRun;
        }
        if self.spinning && !self.polls.is_multiple_of(POLLS_PER_CLOCK_READ) {
            return IdleStep::Spin;
        }
        let idle_for = self.clock.now().saturating_duration_since(since);
        self.spinning = idle_for < SPIN_TIME.min(self.policy.budget);
        if idle_for < self.policy.budget {
            // A spin yields every 64 polls, past it every poll: a host or
            // compute unit sharing this CPU gets it back soon, not after the
            // whole spin (docs/PERFORMANCE.md, "Command path").
            IdleStep::Yield
        } else {
            // Still idle after a timed-out sleep: sleep again at once
            // (`since` stays put); work found resets it.
            IdleStep::Sleep
        }
    }

    /// Back from a [`IdleStep::Sleep`].
    pub fn slept(&mut self) {
        self.slept = true;
    }

    /// Back from a [`IdleStep::SleepWhileUnitsRun`].
    pub fn woke_after_units(&mut self, units_busy: bool) {
        if !units_busy {
            // The units' last completion is work the host answers: the
            // polling budget runs from it, not from the hand-off.
            self.since = Some(self.clock.now());
        }
        // Awake again: the next pass reads the clock rather than spin 64
        // polls blind while a host sharing this CPU waits for the completion.
        self.spinning = false;
    }

    #[cfg(test)]
    fn budget(&self) -> Duration {
        self.policy.budget
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

    #[test]
    fn an_idle_engine_spins_then_yields_then_sleeps() {
        let t0 = Instant::now();
        let now = Cell::new(t0);
        let mut idle = Idle::new(TestClock(&now));
        // Just idle: spins, reading the clock (and yielding) every 64 polls.
        let first: Vec<IdleStep> = (0..64).map(|_| idle.next_step(false)).collect();
        assert!(first[..63].iter().all(|&s| s == IdleStep::Spin));
        assert_eq!(first[63], IdleStep::Yield);
        // Past the spin time: yields on every pass, up to the budget.
        now.set(t0 + SPIN_TIME);
        let yields: Vec<IdleStep> = (0..64).map(|_| idle.next_step(false)).collect();
        assert_eq!(yields[63], IdleStep::Yield);
        assert_eq!(idle.next_step(false), IdleStep::Yield);
        // Past the budget: sleeps, and again at once on the next idle pass.
        now.set(t0 + INITIAL_POLL_TIME);
        assert_eq!(idle.next_step(false), IdleStep::Sleep);
        idle.slept();
        assert_eq!(idle.next_step(false), IdleStep::Sleep);
        // Work 1.5 ms after going idle, after a sleep: the budget grows to
        // poll through such gaps next time.
        now.set(t0 + Duration::from_micros(1500));
        idle.work_found();
        assert_eq!(idle.budget(), Duration::from_micros(1875));
    }

    #[test]
    fn busy_units_get_the_cpu_and_the_budget_runs_from_their_last_completion() {
        let t0 = Instant::now();
        let now = Cell::new(t0);
        let mut idle = Idle::new(TestClock(&now));
        assert_eq!(idle.next_step(true), IdleStep::Spin, "a burst of submissions may follow");
        now.set(t0 + BUSY_UNITS_SPIN_TIME);
        assert_eq!(idle.next_step(true), IdleStep::SleepWhileUnitsRun);
        // The units finished 3 ms later: polling starts from there.
        now.set(t0 + Duration::from_millis(3));
        idle.woke_after_units(false);
        assert_eq!(idle.next_step(false), IdleStep::Yield, "reads the clock at once after a wake");
        now.set(t0 + Duration::from_millis(3) + INITIAL_POLL_TIME);
        // Spinning again until the next clock read, which finds the budget spent.
        let next = (0..64).map(|_| idle.next_step(false)).find(|&s| s != IdleStep::Spin);
        assert_eq!(next, Some(IdleStep::Sleep));
    }

    #[test]
    fn the_polling_budget_follows_the_gaps_between_bursts() {
        let us = Duration::from_micros;
        let mut p = IdlePolicy::default();
        assert_eq!(p.budget, INITIAL_POLL_TIME);
        // Gaps polling caught change nothing.
        p.observe(us(900), false);
        assert_eq!(p.budget, INITIAL_POLL_TIME);
        // A 1.5 ms gap that needed a wake-up: next time poll through it.
        p.observe(us(1500), true);
        assert_eq!(p.budget, us(1875));
        // Never past the cap.
        p.observe(us(1990), true);
        assert_eq!(p.budget, MAX_POLL_TIME);
        // Long quiet spells halve it, down to the floor.
        for _ in 0..10 {
            p.observe(Duration::from_millis(50), true);
        }
        assert_eq!(p.budget, MIN_POLL_TIME);
        // A short gap after a sleep brings it back up only as far as needed.
        p.observe(us(400), true);
        assert_eq!(p.budget, us(500));
    }
}
