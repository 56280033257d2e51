//! An exhaustive model check of the sleep/wake handshake (docs/PROTOCOL.md
//! §6.2), used twice in cxl-pnm:
//!
//! | role        | device sleep          | host interrupt wait        |
//! |-------------|-----------------------|----------------------------|
//! | sleeper     | engine                | host waiting for completions |
//! | flag        | Device Sleeping = 1   | Interrupt Mask = 0          |
//! | work        | a doorbell            | a completion entry          |
//! | signaller   | host ringing          | device posting completions  |
//! | signal      | device's wake vector  | host's interrupt vector     |
//!
//! Sleeper, for up to [`ROUNDS`] sleeps: `flag := armed; fence; if work
//! { done } else { block until the eventfd counter > 0; take one; flag :=
//! clear }`. Signaller: `work := 1; fence; if flag == armed { counter += 1 }`.
//!
//! The device's sleep has a third party: the compute unit that finishes the
//! last running command while the engine sleeps. It clears Device Sleeping
//! (a SeqCst store), so a host that reads its completion and rings at once
//! does not also ring the wake vector, and then rings the vector itself:
//! `if flag == armed { flag := clear; fence; counter += 1 }`.
//!
//! Each thread's stores go through a store buffer that drains in order at
//! any moment (x86-TSO, and what Release/Acquire alone allow here); a fence
//! drains it. Every interleaving of steps and drains is explored. A lost
//! wake-up is a run that ends with the sleeper blocked, the work never seen
//! and the counter zero. With the fences, and with the unit clearing before
//! it rings, there is none; the checker does find one without the fences,
//! and with a unit that rings before it clears (the engine wakes, sleeps
//! again, and the late clear hides that sleep from the host), so the model
//! sees the failures the protocol prevents.

use std::collections::HashSet;

/// Sleeps the sleeper may go through in one run.
const ROUNDS: u8 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// No compute unit (the host's interrupt wait; a device with no job).
    Absent,
    /// Clears the flag, fences, then rings: the device's order.
    ClearThenRing,
    /// Rings, then clears the flag: the order the protocol forbids.
    RingThenClear,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct State {
    /// Memory: flag, work, counter.
    mem: [u8; 3],
    /// Store buffers: (variable, value), oldest first.
    buf: [Vec<(usize, u8)>; 3],
    /// Program counters.
    pc: [u8; 3],
    /// Sleeps the sleeper has woken from.
    rounds: u8,
}

const FLAG: usize = 0;
const WORK: usize = 1;
const COUNTER: usize = 2;

const SLEEPER: usize = 0;
const SIGNALLER: usize = 1;
const UNIT: usize = 2;

/// The sleeper's program counter while it blocks on the eventfd.
const BLOCKED: u8 = 3;
/// Any thread's program counter once it has finished.
const DONE: u8 = 9;

fn load(s: &State, t: usize, var: usize) -> u8 {
    // A thread sees its own latest buffered store first.
    s.buf[t].iter().rev().find(|(v, _)| *v == var).map_or(s.mem[var], |&(_, val)| val)
}

/// The state after one step of thread `t`, if it can take one.
fn step(s: &State, t: usize, fences: bool, unit: Unit) -> Option<State> {
    let mut n = s.clone();
    let fence_blocks = fences && !s.buf[t].is_empty();
    n.pc[t] = match (t, s.pc[t]) {
        (SLEEPER, 0) => {
            n.buf[t].push((FLAG, 1));
            1
        }
        (SLEEPER, 1) if fence_blocks => return None,
        (SLEEPER, 1) => 2,
        (SLEEPER, 2) if load(s, t, WORK) == 1 => DONE,
        (SLEEPER, 2) => BLOCKED,
        (SLEEPER, BLOCKED) => {
            // Reading the eventfd: a syscall, it waits for the counter.
            if s.mem[COUNTER] == 0 {
                return None;
            }
            n.mem[COUNTER] -= 1;
            n.buf[t].push((FLAG, 0));
            n.rounds += 1;
            if n.rounds == ROUNDS { DONE } else { 0 }
        }
        (SIGNALLER, 0) => {
            n.buf[t].push((WORK, 1));
            1
        }
        (SIGNALLER, 1) if fence_blocks => return None,
        (SIGNALLER, 1) => 2,
        (SIGNALLER, 2) => {
            if load(s, t, FLAG) == 1 {
                // eventfd write: a syscall, not buffered.
                n.mem[COUNTER] += 1;
            }
            DONE
        }
        (UNIT, 0) if unit == Unit::Absent || load(s, t, FLAG) == 0 => DONE,
        (UNIT, 0) => 1,
        (UNIT, 1) => match unit {
            Unit::ClearThenRing => {
                n.buf[t].push((FLAG, 0));
                2
            }
            _ => {
                n.mem[COUNTER] += 1;
                2
            }
        },
        (UNIT, 2) => match unit {
            Unit::ClearThenRing if !s.buf[t].is_empty() => return None, // SeqCst store
            Unit::ClearThenRing => {
                n.mem[COUNTER] += 1;
                DONE
            }
            _ => {
                n.buf[t].push((FLAG, 0));
                DONE
            }
        },
        _ => return None,
    };
    Some(n)
}

/// Explores every interleaving; returns the number of lost wake-ups found.
fn check(fences: bool, unit: Unit) -> usize {
    let start = State { mem: [0; 3], buf: Default::default(), pc: [0; 3], rounds: 0 };
    let mut seen = HashSet::new();
    let mut stack = vec![start];
    let mut lost = 0;
    while let Some(s) = stack.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        let mut moved = false;
        for t in 0..3 {
            if let Some(n) = step(&s, t, fences, unit) {
                stack.push(n);
                moved = true;
            }
            if !s.buf[t].is_empty() {
                let mut n = s.clone();
                let (var, val) = n.buf[t].remove(0);
                n.mem[var] = val;
                stack.push(n);
                moved = true;
            }
        }
        if !moved && s.pc[SLEEPER] == BLOCKED && s.mem[WORK] == 1 {
            lost += 1;
        }
    }
    lost
}

#[test]
fn with_fences_no_wake_up_is_lost() {
    assert_eq!(check(true, Unit::Absent), 0);
}

#[test]
fn without_fences_the_model_finds_the_lost_wake_up() {
    assert!(check(false, Unit::Absent) > 0);
}

#[test]
fn a_unit_that_clears_device_sleeping_and_then_rings_loses_no_wake_up() {
    assert_eq!(check(true, Unit::ClearThenRing), 0);
}

#[test]
fn a_unit_that_rings_before_it_clears_would_lose_one() {
    assert!(check(true, Unit::RingThenClear) > 0);
}
