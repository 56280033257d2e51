//! The async host API against a separate pnm-device: many tasks with many
//! commands in flight, backpressure, cancellation.

mod common;

use std::time::Duration;

use common::{DeviceProcess, TempRegion};
use pnm_host::{AsyncQueue, Device, Dtype, Error, InterruptConfig, KvShape, Query, TopkRequest};
use pnm_protocol::queue::{QueueOpcode, SubmissionEntry};

fn nop() -> SubmissionEntry {
    SubmissionEntry { opcode: QueueOpcode::NOP, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_many_commands_each_answered_once() {
    let region = TempRegion::new("async");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 64 };
    let tokens = 2000u64;
    let raw: Vec<u8> = (0..shape.bytes(tokens) / 2)
        .flat_map(|i| half_bits((((i * 2654435761) % 2000) as f32 / 1000.0) - 1.0).to_le_bytes())
        .collect();
    let seq = dev.kv_create(shape).unwrap();
    let seq = dev.kv_append(&seq, &raw, &raw, tokens, &mut |_| {}).unwrap();
    let queries: Vec<Vec<f32>> =
        (0..8).map(|j| (0..64).map(|i| ((i * 7 + j * 13) as f32).sin()).collect()).collect();
    let want: Vec<Vec<u32>> = queries
        .iter()
        .enumerate()
        .map(|(j, q)| {
            dev.topk(&TopkRequest::new(&seq, 0, (j % 2) as u16, &Query::f32(q, 64), 40))
                .unwrap()
                .indices
        })
        .collect();

    let queue = AsyncQueue::new(&dev, 32, InterruptConfig::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16usize {
        let (queue, queries, want) = (queue.clone(), queries.clone(), want.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..60usize {
                let j = (t + i) % 8;
                let (head, query) = ((j % 2) as u16, Query::f32(&queries[j], 64));
                if i % 3 == 0 {
                    let (top, rows) = queue
                        .topk_gather(&TopkRequest::new(&seq, 0, head, &query, 40))
                        .await
                        .unwrap();
                    assert_eq!(top.indices, want[j], "task {t} command {i}");
                    assert_eq!((rows.keys.len(), rows.values.len()), (40 * 128, 40 * 128));
                } else {
                    let top =
                        queue.topk(&TopkRequest::new(&seq, 0, head, &query, 40)).await.unwrap();
                    assert_eq!(top.indices, want[j], "task {t} command {i}");
                }
                queue.nop().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// f32 -> f16 bits for values in [-1, 1] (round to nearest even).
fn half_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = v.abs();
    if a < 6.103_515_6e-5 {
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    let exp = ((b >> 23) & 0xFF) as i32 - 112;
    let mant = b & 0x7F_FFFF;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1FFF;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_try_submit_busy_and_submit_wait() {
    let region = TempRegion::new("async-full");
    let device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let queue = AsyncQueue::new(&dev, 8, InterruptConfig::default()).unwrap();
    queue.nop().await.unwrap();
    // With the device stopped nothing completes: 7 fit, the 8th is Busy.
    device.freeze();
    let mut pending = Vec::new();
    for _ in 0..7 {
        pending.push(tokio::spawn(queue.try_submit(nop()).unwrap()));
    }
    assert!(matches!(queue.try_submit(nop()), Err(Error::QueueFull(7))));
    // `submit` waits for room instead.
    let waiting = tokio::spawn({
        let queue = queue.clone();
        async move { queue.submit(nop()).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    // A cancelled command still completes on the device; nothing is lost.
    let cancelled = tokio::spawn({
        let queue = queue.clone();
        async move { queue.submit(nop()).await }
    });
    cancelled.abort();
    device.signal(nix::sys::signal::Signal::SIGCONT);
    for p in pending {
        assert!(p.await.unwrap().unwrap().code.is_success());
    }
    let done =
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("room freed").unwrap();
    assert!(done.unwrap().code.is_success());
    for _ in 0..100 {
        queue.nop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_interrupts_neither_stall_nor_fail_async_commands() {
    let region = TempRegion::new("async-lost-irq");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = common::LostInterrupts::open(region.path(), Duration::from_secs(10));
    let queue = AsyncQueue::new(&dev, 16, InterruptConfig::default()).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..20 {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let q = queue.clone();
                tokio::spawn(async move { q.nop().await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
    // Waiting out each command's 10 s timeout would take minutes.
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_device_never_answers_times_out() {
    let region = TempRegion::new("async-timeout");
    let device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let options = pnm_host::DeviceOptions {
        command_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let dev = Device::open_with(region.path(), &options).unwrap();
    let queue = AsyncQueue::new(&dev, 16, InterruptConfig::default()).unwrap();
    queue.nop().await.unwrap();
    device.freeze();
    match queue.nop().await {
        Err(Error::QueueTimeout { command: "NOP", waited, .. }) => {
            assert!(waited >= Duration::from_millis(300))
        }
        other => panic!("expected a queue timeout, got {other:?}"),
    }
    device.signal(nix::sys::signal::Signal::SIGCONT);
}

#[test]
fn pnmctl_bench_nop_drives_the_async_api() {
    let region = TempRegion::new("async-bench");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let path = region.path().to_str().unwrap();
    let out = common::run(
        "pnmctl",
        &["--device", path, "bench", "nop", "--async-tasks", "4", "--seconds", "0.2"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["benchmark"], "nop_async");
    assert_eq!(report["tasks"], 4);
    assert!(report["commands"].as_u64().unwrap() > 0, "{report}");
    assert!(report["latency_us"]["p50"].as_f64().unwrap() > 0.0, "{report}");
}
