//! Faults injected into a running device (Inject Device Fault, C007h):
//! what is pending or in force, shared by the engine, the queues and the
//! compute units, read on their paths with one atomic load when nothing is
//! injected.

use std::sync::Mutex;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use pnm_protocol::faults::{DeviceFault, InjectDeviceFaultInput};

use crate::refusal::{Reason, Refusal};

/// Most compute units a fault can name.
pub const MAX_UNITS: usize = 64;

/// Until when something stops: a deadline, or for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Until(Instant),
    ForGood,
}

impl Stop {
    fn after(micros: u32) -> Self {
        if micros == 0 {
            Self::ForGood
        } else {
            Self::Until(Instant::now() + Duration::from_micros(micros.into()))
        }
    }

    /// True while in force at `now`.
    pub fn holds(self, now: Instant) -> bool {
        match self {
            Self::Until(t) => now < t,
            Self::ForGood => true,
        }
    }
}

/// Every injected fault. `armed` is the fast path: zero while nothing is
/// pending, so the hot paths pay one load.
#[derive(Debug, Default)]
pub struct Faults {
    armed: AtomicU32,
    drop_doorbells: AtomicU32,
    drop_completions: AtomicU32,
    delay_completions: AtomicU32,
    delay_micros: AtomicU32,
    duplicate_completions: AtomicU32,
    corrupt_completions: AtomicU32,
    abort: AtomicBool,
    /// Percent of normal speed device DRAM runs at (0: never set = 100).
    slow_percent: AtomicU32,
    engine_hang: Mutex<Option<Stop>>,
    heartbeat_stop: Mutex<Option<Stop>>,
    unit_hang: Mutex<Vec<Option<Stop>>>,
    /// Bit u: unit u is to die after its current job.
    kill_units: AtomicU64,
    /// Faults injected since the device started, for its log and health.
    pub injected: AtomicU64,
    units_died: AtomicU32,
}

/// Decrements `counter` if it is positive; true if it was.
fn take(counter: &AtomicU32) -> bool {
    counter.fetch_update(AcqRel, Acquire, |n| n.checked_sub(1)).is_ok()
}

impl Faults {
    /// Applies an Inject Device Fault. `units` is how many compute units
    /// the device has.
    pub fn inject(&self, input: &InjectDeviceFaultInput, units: u32) -> Result<(), Refusal> {
        let kind = DeviceFault::from_code(input.kind)
            .ok_or(Refusal::invalid(Reason::UnknownFaultKind(input.kind)))?;
        if input.reserved != [0; 3] {
            return Err(Refusal::invalid(Reason::ReservedNotZero));
        }
        let (count, micros, target) = (input.count.get(), input.micros.get(), input.target.get());
        let counted = matches!(
            kind,
            DeviceFault::DropDoorbells
                | DeviceFault::DropCompletions
                | DeviceFault::DelayCompletions
                | DeviceFault::DuplicateCompletions
                | DeviceFault::CorruptCompletions
        );
        if counted && count == 0 {
            return Err(Refusal::invalid(Reason::FaultField { kind: kind.name(), field: "count" }));
        }
        let unit_fault = matches!(kind, DeviceFault::HangUnit | DeviceFault::KillUnit);
        if unit_fault && (target >= units || target as usize >= MAX_UNITS) {
            return Err(Refusal::invalid(Reason::FaultField {
                kind: kind.name(),
                field: "target",
            }));
        }
        if kind == DeviceFault::DelayCompletions && micros == 0 {
            return Err(Refusal::invalid(Reason::FaultField {
                kind: kind.name(),
                field: "micros",
            }));
        }
        if kind == DeviceFault::SlowMemory && !(100..=100_000).contains(&target) {
            return Err(Refusal::invalid(Reason::FaultField {
                kind: kind.name(),
                field: "target",
            }));
        }
        let lock = |m: &Mutex<Option<Stop>>| {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(Stop::after(micros))
        };
        match kind {
            DeviceFault::DropDoorbells => self.drop_doorbells.store(count, Release),
            DeviceFault::DropCompletions => self.drop_completions.store(count, Release),
            DeviceFault::DelayCompletions => {
                self.delay_micros.store(micros, Release);
                self.delay_completions.store(count, Release);
            }
            DeviceFault::DuplicateCompletions => self.duplicate_completions.store(count, Release),
            DeviceFault::CorruptCompletions => self.corrupt_completions.store(count, Release),
            DeviceFault::HangEngine => lock(&self.engine_hang),
            DeviceFault::StopHeartbeat => lock(&self.heartbeat_stop),
            DeviceFault::HangUnit => {
                let mut hangs = self.unit_hang.lock().unwrap_or_else(|e| e.into_inner());
                hangs.resize(MAX_UNITS, None);
                hangs[target as usize] = Some(Stop::after(micros));
            }
            DeviceFault::KillUnit => {
                self.kill_units.fetch_or(1 << target, AcqRel);
            }
            DeviceFault::Abort => self.abort.store(true, Release),
            DeviceFault::SlowMemory => self.slow_percent.store(target, Release),
            DeviceFault::ClearAll => {
                self.clear();
                return Ok(());
            }
        }
        self.armed.store(1, Release);
        self.injected.fetch_add(1, Relaxed);
        tracing::warn!(fault = kind.name(), count, micros, target, "device fault injected");
        Ok(())
    }

    fn clear(&self) {
        for c in [
            &self.drop_doorbells,
            &self.drop_completions,
            &self.delay_completions,
            &self.duplicate_completions,
            &self.corrupt_completions,
            &self.delay_micros,
            &self.slow_percent,
        ] {
            c.store(0, Release);
        }
        self.abort.store(false, Release);
        self.kill_units.store(0, Release);
        for m in [&self.engine_hang, &self.heartbeat_stop] {
            *m.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.unit_hang.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.armed.store(0, Release);
        tracing::warn!("device faults cleared");
    }

    fn armed(&self) -> bool {
        self.armed.load(Acquire) != 0
    }

    /// Whether a delay was injected (completions may be held back).
    pub fn delays_pending(&self) -> bool {
        self.armed() && self.delay_micros.load(Acquire) != 0
    }

    /// A new SQ doorbell: true if it is to be ignored.
    pub fn drop_doorbell(&self) -> bool {
        self.armed() && take(&self.drop_doorbells)
    }

    /// What to do with the next completion.
    pub fn completion(&self) -> CompletionFault {
        if !self.armed() {
            return CompletionFault::None;
        }
        if take(&self.drop_completions) {
            CompletionFault::Drop
        } else if take(&self.corrupt_completions) {
            CompletionFault::Corrupt
        } else if take(&self.duplicate_completions) {
            CompletionFault::Duplicate
        } else if take(&self.delay_completions) {
            CompletionFault::Delay(Duration::from_micros(self.delay_micros.load(Acquire).into()))
        } else {
            CompletionFault::None
        }
    }

    /// True once if the process is to abort now.
    pub fn abort_now(&self) -> bool {
        self.armed() && self.abort.swap(false, AcqRel)
    }

    fn stop_of(m: &Mutex<Option<Stop>>, now: Instant) -> Option<Stop> {
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            Some(stop) if stop.holds(now) => Some(stop),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }

    /// Whether the engine is hung at `now`.
    pub fn engine_hung(&self, now: Instant) -> bool {
        self.armed() && Self::stop_of(&self.engine_hang, now).is_some()
    }

    /// Whether the heartbeat is stopped at `now`.
    pub fn heartbeat_stopped(&self, now: Instant) -> bool {
        self.armed() && Self::stop_of(&self.heartbeat_stop, now).is_some()
    }

    /// Whether unit `unit` is hung at `now`.
    pub fn unit_hung(&self, unit: usize, now: Instant) -> bool {
        if !self.armed() {
            return false;
        }
        let mut hangs = self.unit_hang.lock().unwrap_or_else(|e| e.into_inner());
        match hangs.get(unit).copied().flatten() {
            Some(stop) if stop.holds(now) => true,
            Some(_) => {
                hangs[unit] = None;
                false
            }
            None => false,
        }
    }

    /// True once if unit `unit` is to die now.
    pub fn unit_dies(&self, unit: usize) -> bool {
        let bit = 1u64 << unit;
        self.armed() && self.kill_units.fetch_and(!bit, AcqRel) & bit != 0
    }

    /// With slow memory injected: makes a command that took `took` take
    /// as much longer as memory is slower, so hosts see it too. Returns the
    /// time added.
    pub fn stretch(&self, took: Duration) -> Duration {
        let slowdown = self.slowdown();
        if slowdown <= 1.0 {
            return Duration::ZERO;
        }
        let extra = took.mul_f64(slowdown - 1.0);
        let until = Instant::now() + extra;
        if extra > Duration::from_micros(100) {
            std::thread::sleep(extra);
        }
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        extra
    }

    /// A compute unit died (of an injected fault).
    pub fn unit_died(&self) {
        self.units_died.fetch_add(1, AcqRel);
    }

    /// Compute units that died since the device started.
    pub fn units_dead(&self) -> u32 {
        self.units_died.load(Acquire)
    }

    /// How much slower device DRAM runs than normal (1.0: not slowed).
    pub fn slowdown(&self) -> f64 {
        match self.slow_percent.load(Acquire) {
            0 => 1.0,
            p => f64::from(p) / 100.0,
        }
    }
}

/// What happens to one completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionFault {
    None,
    Drop,
    Delay(Duration),
    Duplicate,
    Corrupt,
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    fn input(kind: DeviceFault, count: u32, micros: u32, target: u32) -> InjectDeviceFaultInput {
        let mut i = InjectDeviceFaultInput::new_zeroed();
        i.kind = kind.code();
        i.count = count.into();
        i.micros = micros.into();
        i.target = target.into();
        i
    }

    #[test]
    fn counted_faults_fire_exactly_count_times_and_clear_ends_all() {
        let f = Faults::default();
        assert_eq!(f.completion(), CompletionFault::None);
        f.inject(&input(DeviceFault::DropCompletions, 2, 0, 0), 2).unwrap();
        f.inject(&input(DeviceFault::DuplicateCompletions, 1, 0, 0), 2).unwrap();
        assert_eq!(f.completion(), CompletionFault::Drop);
        assert_eq!(f.completion(), CompletionFault::Drop);
        assert_eq!(f.completion(), CompletionFault::Duplicate);
        assert_eq!(f.completion(), CompletionFault::None);
        f.inject(&input(DeviceFault::DropDoorbells, 1, 0, 0), 2).unwrap();
        assert!(f.drop_doorbell() && !f.drop_doorbell());
        f.inject(&input(DeviceFault::HangEngine, 0, 0, 0), 2).unwrap();
        f.inject(&input(DeviceFault::KillUnit, 0, 0, 1), 2).unwrap();
        assert!(f.engine_hung(Instant::now()));
        f.inject(&input(DeviceFault::ClearAll, 0, 0, 0), 2).unwrap();
        assert!(!f.engine_hung(Instant::now()) && !f.unit_dies(1));
        // Bad fields are refused, and change nothing.
        for bad in [
            input(DeviceFault::DropCompletions, 0, 0, 0),
            input(DeviceFault::KillUnit, 0, 0, 2),
            input(DeviceFault::DelayCompletions, 1, 0, 0),
            input(DeviceFault::SlowMemory, 0, 0, 99),
        ] {
            assert!(f.inject(&bad, 2).is_err());
        }
        let mut unknown = input(DeviceFault::Abort, 0, 0, 0);
        unknown.kind = 0x42;
        assert!(f.inject(&unknown, 2).is_err());
        assert!(!f.abort_now());
    }

    #[test]
    fn hangs_end_at_their_deadline() {
        let f = Faults::default();
        f.inject(&input(DeviceFault::HangUnit, 0, 20_000, 0), 1).unwrap();
        assert!(f.unit_hung(0, Instant::now()));
        assert!(!f.unit_hung(0, Instant::now() + Duration::from_millis(30)));
        f.inject(&input(DeviceFault::SlowMemory, 0, 0, 250), 1).unwrap();
        assert_eq!(f.slowdown(), 2.5);
    }
}
