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
//! Sleeper: `flag := armed; fence; if work { no sleep } else { block until
//! the eventfd counter > 0 }`. Signaller: `work := 1; fence; if flag ==
//! armed { counter += 1 }`.
//!
//! Each thread's stores go through a store buffer that drains in order at
//! any moment (x86-TSO, and what Release/Acquire alone allow here); a fence
//! drains it. Every interleaving of steps and drains is explored. With the
//! fences no run ends with the sleeper blocked, work pending and the counter
//! zero (a lost wake-up); without them the checker finds one, so the model
//! does see the failure the fences prevent.

use std::collections::HashSet;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct State {
    /// Memory: flag, work, counter.
    mem: [u8; 3],
    /// Store buffers: (variable, value), oldest first.
    buf: [Vec<(usize, u8)>; 2],
    /// Program counters.
    pc: [u8; 2],
    /// The sleeper's verdict: 0 undecided, 1 saw work, 2 blocked.
    sleeper: u8,
}

const FLAG: usize = 0;
const WORK: usize = 1;
const COUNTER: usize = 2;

fn load(s: &State, t: usize, var: usize) -> u8 {
    // A thread sees its own latest buffered store first.
    s.buf[t].iter().rev().find(|(v, _)| *v == var).map_or(s.mem[var], |&(_, val)| val)
}

/// Successor states of one step of thread `t`.
fn step(s: &State, t: usize, fences: bool) -> Option<State> {
    let mut n = s.clone();
    match (t, s.pc[t]) {
        // Sleeper.
        (0, 0) => n.buf[0].push((FLAG, 1)),
        (0, 1) => {
            // The fence waits for the store buffer to drain.
            if fences && !n.buf[0].is_empty() {
                return None;
            }
        }
        (0, 2) => {
            n.sleeper = if load(s, 0, WORK) == 1 { 1 } else { 2 };
        }
        // Signaller.
        (1, 0) => n.buf[1].push((WORK, 1)),
        (1, 1) => {
            if fences && !n.buf[1].is_empty() {
                return None;
            }
        }
        (1, 2) => {
            if load(s, 1, FLAG) == 1 {
                // eventfd write: a syscall, not buffered.
                n.mem[COUNTER] += 1;
            }
        }
        _ => return None,
    }
    n.pc[t] += 1;
    Some(n)
}

/// Explores every interleaving; returns the number of lost wake-ups found.
fn check(fences: bool) -> usize {
    let start = State { mem: [0; 3], buf: [Vec::new(), Vec::new()], pc: [0; 2], sleeper: 0 };
    let mut seen = HashSet::new();
    let mut stack = vec![start];
    let mut lost = 0;
    while let Some(s) = stack.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        let mut moved = false;
        for t in 0..2 {
            if let Some(n) = step(&s, t, fences) {
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
        if !moved && s.sleeper == 2 && s.mem[WORK] == 1 && s.mem[COUNTER] == 0 {
            lost += 1;
        }
    }
    lost
}

#[test]
fn with_fences_no_wake_up_is_lost() {
    assert_eq!(check(true), 0);
}

#[test]
fn without_fences_the_model_finds_the_lost_wake_up() {
    assert!(check(false) > 0);
}
