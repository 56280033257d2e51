//! `pnmctl drill`: fault-injection drills against a running device started
//! with `--allow-injection` (the engine of `tests/faults/`). Loads KV whose
//! every row the drill remembers, runs mixed load (Top-Ks checked against a
//! reference, gathers and appends checked byte for byte) on several
//! handles, injects one fault class (or, soaking, random ones), and checks
//! what the device says (event records, health) and that nothing was lost.
//! Prints a JSON report; exits 1 on any wrong answer, lost row or broken
//! expectation.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pnm_host::commands::EventKind;
use pnm_host::{
    Device, DeviceOptions, Dtype, Error, EventLog, KvShape, MediaFault, Query, Sequence,
    TopkRequest,
};
use pnm_protocol::faults::DeviceFault;
use pnm_protocol::queue::KeyLayout;
use serde::Serialize;

use crate::CliError;

const D: usize = 64;
const TOKENS: u64 = 24_576;
const K: u32 = 128;
const QUERIES: usize = 8;

/// `pnmctl drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// The fault: a device fault (drop-doorbells, drop-completions,
    /// delay-completions, duplicate-completions, corrupt-completions,
    /// hang-engine, hang-unit, kill-unit, stop-heartbeat, slow-memory,
    /// abort), a media fault (poison, corrupt), or soak (random faults).
    #[arg(long)]
    scenario: String,
    /// Soak: how long, in minutes (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Bound on each queue command, in ms (recoveries happen within 2x).
    #[arg(long, default_value_t = 500)]
    command_timeout_ms: u64,
    /// Handles running load at once.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Seed of the data, queries and (soak) fault choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    commands: u64,
    answers_checked: u64,
    wrong_answers: u64,
    /// Typed errors the load saw (timeouts, unconfirmed, media errors).
    typed_errors: u64,
    faults: u64,
    recoveries: u64,
    rows_checked: u64,
    rows_lost: u64,
    /// Per fault: milliseconds from the fault's settling time (2 command
    /// timeouts after it) to the next good answer.
    recovery_ms: Vec<f64>,
    /// Per restart: milliseconds from the new device being ready to a good
    /// answer on a handle opened before it.
    reconnect_ms: Vec<f64>,
    /// The longest any one command took, answer or typed error (recovery
    /// included): the bound a caller waits at most.
    max_command_ms: f64,
    /// What was expected of the device and not seen.
    broken_expectations: Vec<String>,
}

struct Data {
    keys: Vec<f32>,
    references: Vec<(Vec<f32>, Vec<u32>)>,
}

use pnm_tools::testdata::random_f32s as values;

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The exact Top-K of `query` over the tokens not in `skip` (f64, ties by index).
fn reference(keys: &[f32], query: &[f32], skip: &BTreeSet<u64>) -> Vec<u32> {
    let mut scored: Vec<(u32, f64)> = (0..keys.len() / D)
        .filter(|t| !skip.contains(&(*t as u64)))
        .map(|t| {
            let key = &keys[t * D..(t + 1) * D];
            (t as u32, query.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum())
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().take(K as usize).map(|(t, _)| t).collect()
}

fn open(path: &std::path::Path, timeout: Duration) -> Result<Device, Error> {
    let options = DeviceOptions {
        command_timeout: timeout,
        mailbox_timeout: Duration::from_secs(2),
        wait_ready: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    Device::open_with(path, &options)
}

/// What the load clients share with the drill.
struct Shared {
    data: Data,
    counts: Mutex<Counts>,
    stop: AtomicBool,
    /// Microseconds from `epoch` of the last good answer.
    last_good: AtomicU64,
    epoch: Instant,
}

/// Load on one handle until `stop`: Top-Ks against the references, and
/// gathers against the written rows. Counts everything in `counts`.
fn load(device: &Device, seq: &Sequence, shared: &Shared, seed: u64) {
    let Shared { data, counts, stop, last_good, epoch } = shared;
    let mut pick = values(seed, 1 << 16).into_iter().map(|v| ((v + 1.0) * 1e6) as usize).cycle();
    let value_rows = bytes(&data.keys);
    let row = D * 4;
    while !stop.load(Relaxed) {
        let which = pick.next().unwrap_or(0);
        let (query, want) = &data.references[which % QUERIES];
        let q = Query::f32(query, D);
        let started = Instant::now();
        let result = if which % 3 == 0 {
            let tokens: Vec<u32> =
                (0..32).map(|i| ((which * 31 + i * 977) % TOKENS as usize) as u32).collect();
            device.gather(seq, 0, 0, &tokens).map(|rows| {
                tokens.iter().enumerate().all(|(i, &t)| {
                    let at = t as usize * row;
                    rows.keys[i * row..(i + 1) * row] == value_rows[at..at + row]
                        && rows.values[i * row..(i + 1) * row] == value_rows[at..at + row]
                })
            })
        } else {
            device.topk(&TopkRequest::new(seq, 0, 0, &q, K)).map(|top| top.indices == *want)
        };
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        c.commands += 1;
        c.max_command_ms = c.max_command_ms.max(started.elapsed().as_secs_f64() * 1e3);
        match result {
            Ok(true) => {
                c.answers_checked += 1;
                last_good.store(epoch.elapsed().as_micros() as u64, Relaxed);
            }
            Ok(false) => c.wrong_answers += 1,
            Err(e) => {
                c.typed_errors += 1;
                tracing::info!(error = %e, "drill: typed error under fault");
                drop(c);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Injects `fault` and says what the device should then show.
fn inject(device: &Device, scenario: &str, seq: &Sequence) -> Result<Expect, Error> {
    let f = |kind, count, micros, target| device.inject_device_fault(kind, count, micros, target);
    Ok(match scenario {
        "drop-doorbells" => f(DeviceFault::DropDoorbells, 2, 0, 0).map(|()| Expect::Nothing)?,
        "drop-completions" => f(DeviceFault::DropCompletions, 3, 0, 0).map(|()| Expect::Nothing)?,
        "delay-completions" => {
            f(DeviceFault::DelayCompletions, 5, 100_000, 0).map(|()| Expect::Nothing)?
        }
        "duplicate-completions" => {
            f(DeviceFault::DuplicateCompletions, 10, 0, 0).map(|()| Expect::Nothing)?
        }
        "corrupt-completions" => {
            f(DeviceFault::CorruptCompletions, 3, 0, 0).map(|()| Expect::Nothing)?
        }
        "hang-engine" => f(DeviceFault::HangEngine, 0, 300_000, 0).map(|()| Expect::Nothing)?,
        "hang-unit" => f(DeviceFault::HangUnit, 0, 300_000, 0).map(|()| Expect::Nothing)?,
        "kill-unit" => f(DeviceFault::KillUnit, 0, 0, 0).map(|()| Expect::UnitDeath)?,
        "stop-heartbeat" => {
            f(DeviceFault::StopHeartbeat, 0, 300_000, 0).map(|()| Expect::Nothing)?
        }
        "slow-memory" => f(DeviceFault::SlowMemory, 0, 0, 300).map(|()| Expect::Degraded)?,
        "abort" => {
            let pid = device.status().device_pid;
            f(DeviceFault::Abort, 0, 0, 0)?;
            Expect::Restart { pid }
        }
        "poison" | "corrupt" => {
            let t = 4321u64;
            let ranges = device.row_ranges(seq, 0, 0, t..t + 2, false)?;
            let fault = if scenario == "poison" {
                MediaFault::Poison
            } else {
                MediaFault::Corrupt { pattern: 0x10 }
            };
            for &(dpa, lines) in &ranges {
                device.inject_media_fault(dpa, lines, fault)?;
            }
            // Every token with a key element on those lines: the two rows,
            // or the tiles holding them.
            let layout = KeyLayout::new(D as u32, Dtype::F32);
            let block = layout.block_tokens();
            let tokens = (t / block * block..(t + 2).div_ceil(block) * block).collect();
            Expect::Media { tokens, ranges }
        }
        other => {
            return Err(Error::Invalid(format!("no scenario '{other}'")));
        }
    })
}

/// What the device should show after a fault.
enum Expect {
    Nothing,
    UnitDeath,
    Degraded,
    Media {
        tokens: BTreeSet<u64>,
        ranges: Vec<(u64, u64)>,
    },
    /// The device process aborts; whoever runs it starts it again.
    Restart {
        pid: u32,
    },
}

pub fn drill(path: &std::path::Path, args: &DrillArgs) -> Result<(), CliError> {
    let timeout = Duration::from_millis(args.command_timeout_ms);
    let control = open(path, timeout)?;
    let keys = values(args.seed, TOKENS as usize * D);
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: D as u16 };
    let seq = control.kv_create(shape)?;
    let seq = control.kv_append(&seq, &bytes(&keys), &bytes(&keys), TOKENS, &mut |_| {})?;
    let references: Vec<(Vec<f32>, Vec<u32>)> = (0..QUERIES)
        .map(|i| {
            let q = values(args.seed * 1000 + i as u64 + 7, D);
            let want = reference(&keys, &q, &BTreeSet::new());
            (q, want)
        })
        .collect();
    let shared = Arc::new(Shared {
        data: Data { keys, references },
        counts: Mutex::new(Counts::default()),
        stop: AtomicBool::new(false),
        last_good: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let (data, counts, stop, last_good, epoch) =
        (&shared.data, &shared.counts, &shared.stop, &shared.last_good, shared.epoch);
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let shared = shared.clone();
            let (path, seq, seed) = (path.to_path_buf(), seq, args.seed + i as u64 * 101);
            std::thread::spawn(move || {
                let device = open(&path, timeout).expect("a load client opens the device");
                load(&device, &seq, &shared, seed);
                device.recoveries()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let scenarios: Vec<&str> = if args.scenario == "soak" {
        vec![
            "drop-doorbells",
            "drop-completions",
            "delay-completions",
            "duplicate-completions",
            "corrupt-completions",
            "hang-engine",
            "hang-unit",
            "stop-heartbeat",
            "slow-memory",
            "poison",
            "corrupt",
        ]
    } else {
        vec![args.scenario.as_str()]
    };
    let soak_until = epoch + Duration::from_secs_f64(args.minutes * 60.0);
    let mut choice = values(args.seed ^ 0x5EED, 4096).into_iter().cycle();
    loop {
        let scenario = if args.scenario == "soak" {
            let v = choice.next().unwrap_or(0.0);
            scenarios[(((v + 1.0) / 2.0) * scenarios.len() as f32) as usize % scenarios.len()]
        } else {
            scenarios[0]
        };
        let expect = inject(&control, scenario, &seq)?;
        counts.lock().unwrap_or_else(|e| e.into_inner()).faults += 1;
        check(&control, &seq, data, expect, counts, scenario)?;
        // Let the fault act on the load (a counted fault takes the next
        // completions; a hang lasts 300 ms), then see that answers are
        // good again.
        std::thread::sleep(2 * timeout);
        let settled = epoch.elapsed().as_micros() as u64;
        let bound = Instant::now() + 4 * timeout + Duration::from_secs(2);
        while last_good.load(Relaxed) <= settled && Instant::now() < bound {
            std::thread::sleep(Duration::from_millis(2));
        }
        let good = last_good.load(Relaxed);
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        if good > settled {
            c.recovery_ms.push((good - settled) as f64 / 1000.0);
        } else {
            c.broken_expectations.push(format!("{scenario}: no good answer after it"));
        }
        drop(c);
        control.inject_device_fault(DeviceFault::ClearAll, 0, 0, 0)?;
        if args.scenario != "soak" || Instant::now() >= soak_until {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Relaxed);
    let mut recoveries = control.recoveries();
    for c in clients {
        recoveries += c.join().map_err(|_| CliError::Usage("a load client panicked".into()))?;
    }
    // Nothing lost: every committed row, read back, is as written.
    let seq_now = control.kv_sequence(seq.id)?;
    let all: Vec<u32> = (0..TOKENS as u32).collect();
    let rows = control.gather(&seq_now, 0, 0, &all)?;
    let written = bytes(&data.keys);
    let row = D * 4;
    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
    c.recoveries = recoveries;
    c.rows_checked = TOKENS;
    c.rows_lost = (0..TOKENS as usize)
        .filter(|&t| {
            rows.keys[t * row..(t + 1) * row] != written[t * row..(t + 1) * row]
                || rows.values[t * row..(t + 1) * row] != written[t * row..(t + 1) * row]
        })
        .count() as u64
        + (TOKENS - seq_now.tokens.min(TOKENS));
    control.kv_free(seq.id)?;
    #[derive(Serialize)]
    struct Report<'a> {
        drill: &'a str,
        #[serde(flatten)]
        counts: &'a Counts,
        ok: bool,
    }
    let ok = c.wrong_answers == 0 && c.rows_lost == 0 && c.broken_expectations.is_empty();
    println!(
        "{}",
        serde_json::to_string_pretty(&Report { drill: &args.scenario, counts: &c, ok })
            .expect("plain data")
    );
    println!("DRILL {} {}", if ok { "ok" } else { "FAIL" }, args.scenario);
    if ok { Ok(()) } else { Err(CliError::Usage(format!("drill {} failed", args.scenario))) }
}

/// Checks what the device shows after a fault, then heals media faults.
fn check(
    device: &Device,
    seq: &Sequence,
    data: &Data,
    expect: Expect,
    counts: &Mutex<Counts>,
    scenario: &str,
) -> Result<(), Error> {
    let mut broken = Vec::new();
    match expect {
        Expect::Nothing => {}
        Expect::Restart { pid } => {
            // The load sees typed errors until a new device is ready (the
            // script restarts it); then every handle reconnects by itself.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let status = device.status();
                if status.device_pid != pid && status.mailbox_ready {
                    break;
                }
                if Instant::now() > deadline {
                    broken.push(format!("{scenario}: no new device within 60 s"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let back = Instant::now();
            let (query, want) = &data.references[0];
            let q = Query::f32(query, D);
            let bound = back + Duration::from_secs(1);
            loop {
                match device.topk(&TopkRequest::new(seq, 0, 0, &q, K)) {
                    Ok(top) if top.indices == *want => break,
                    Ok(_) => counts.lock().unwrap_or_else(|e| e.into_inner()).wrong_answers += 1,
                    Err(_) if Instant::now() < bound => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => {
                        broken.push(format!("{scenario}: not reconnected 1 s after: {e}"));
                        break;
                    }
                }
            }
            let ms = back.elapsed().as_secs_f64() * 1e3;
            counts.lock().unwrap_or_else(|e| e.into_inner()).reconnect_ms.push(ms);
        }
        Expect::Degraded => {
            if !device.health_info()?.performance_degraded {
                broken.push(format!("{scenario}: health does not say performance degraded"));
            }
        }
        Expect::UnitDeath => {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let records = device.get_event_records(EventLog::Warning)?;
                if records.records.iter().any(|e| matches!(e.kind, EventKind::MemoryModule { .. }))
                {
                    break;
                }
                if Instant::now() > deadline {
                    broken.push(format!("{scenario}: no Memory Module record"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !device.health_info()?.performance_degraded {
                broken.push(format!("{scenario}: health does not say performance degraded"));
            }
        }
        Expect::Media { tokens, ranges } => {
            // A Top-K that may not skip fails, typed, naming the tokens;
            // one that skips equals the reference without them.
            let (query, _) = &data.references[0];
            let q = Query::f32(query, D);
            let request = TopkRequest::new(seq, 0, 0, &q, K);
            match device.topk(&request) {
                Err(Error::MediaError { first_token, tokens: n, .. })
                    if first_token == *tokens.first().unwrap_or(&0) && n == tokens.len() as u64 => {
                }
                other => broken.push(format!("{scenario}: expected a media error, got {other:?}")),
            }
            let skipped = device.topk(&request.skipping_bad_rows())?;
            if skipped.indices != reference(&data.keys, query, &tokens) {
                counts.lock().unwrap_or_else(|e| e.into_inner()).wrong_answers += 1;
            }
            let affected: BTreeSet<u64> =
                device.media_errors(seq)?.into_iter().flat_map(|a| a.tokens).collect();
            if affected != tokens {
                broken.push(format!("{scenario}: poison list maps to {affected:?}"));
            }
            let failures = device.get_event_records(EventLog::Failure)?;
            let logged = failures.records.iter().any(|e| {
                matches!(e.kind, EventKind::GeneralMedia { dpa, .. } if ranges.iter().any(|&(d, n)| (d..d + 64 * n).contains(&dpa)))
            });
            if !logged {
                broken.push(format!("{scenario}: no General Media record"));
            }
            if !device.health_info()?.maintenance_needed {
                broken.push(format!("{scenario}: health does not say maintenance needed"));
            }
            // Heal with the keys as written: Clear Poison line by line, each
            // with the bytes the device stored for the row or key tile.
            let written = bytes(&data.keys);
            let layout = KeyLayout::new(D as u32, Dtype::F32);
            let tpp = layout.tokens_per_page();
            for &t in &tokens {
                let first = t / layout.block_tokens() * layout.block_tokens();
                let stored = layout.block_bytes(t % tpp, &written[first as usize * D * 4..]);
                for (dpa, lines) in device.row_ranges(seq, 0, 0, t..t + 1, false)? {
                    for line in 0..lines {
                        let at = (64 * line) as usize;
                        let replacement: [u8; 64] =
                            stored[at..at + 64].try_into().expect("whole lines");
                        device.clear_poison(dpa + at as u64, &replacement)?;
                    }
                }
            }
            device.clear_all_event_records(EventLog::Failure)?;
        }
    }
    counts.lock().unwrap_or_else(|e| e.into_inner()).broken_expectations.extend(broken);
    Ok(())
}
