//! `pnmctl bench nop` and `pnmctl bench topk`: the command path timed
//! through a device in another process, as JSON.

use pnm_host::{Device, Error, KvShape, Query, TopkRequest};

use crate::{CliError, kernel_bench, usage};

/// The `p` quantile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e3
}

/// NOP round trips on `queues` queues: QD1 latency, throughput at `depth`,
/// wake-up from idle and NOPs paced 1.5 ms apart.
pub fn bench_nop(
    device: &Device,
    queues: u16,
    depth: u16,
    interrupts: Option<pnm_host::InterruptConfig>,
    samples: usize,
    seconds: f64,
) -> Result<serde_json::Value, CliError> {
    use pnm_protocol::queue::{QueueOpcode, SubmissionEntry};
    let entries = (u32::from(depth) + 1).next_power_of_two().clamp(64, 4096) as u16;
    // Each queue its own vector: one thread waits on each (a vector shared by
    // two waiting threads would let one consume the other's wake-up).
    let handles: Vec<Device> = (0..queues)
        .map(|i| {
            let interrupts = interrupts.map(|irq| pnm_host::InterruptConfig {
                vector: i % pnm_protocol::notify::VECTORS,
                ..irq
            });
            device.handle(pnm_host::QueueOptions { entries, interrupts, ..Default::default() })
        })
        .collect::<Result<_, _>>()?;
    // Warm up: creates each queue pair and its buffers.
    for h in &handles {
        h.nop()?;
    }
    let nop = SubmissionEntry { opcode: QueueOpcode::NOP, ..Default::default() };
    let batch = vec![nop; usize::from(depth)];
    /// Per queue: QD1 latencies (ns), commands done and seconds of the throughput run.
    type Worker = Result<(Vec<u64>, u64, f64), Error>;
    let results: Vec<Worker> = std::thread::scope(|scope| {
        let workers: Vec<_> = handles
            .iter()
            .map(|h| {
                let batch = &batch;
                scope.spawn(move || -> Worker {
                    // Warm up for 20 ms: a new thread may start on the
                    // engine's CPU, and the scheduler takes some milliseconds
                    // to spread two busy threads over two idle CPUs.
                    let warm = std::time::Instant::now();
                    while warm.elapsed() < std::time::Duration::from_millis(20) {
                        h.submit_raw(std::slice::from_ref(&nop))?;
                    }
                    let mut lat = Vec::with_capacity(samples);
                    for _ in 0..samples {
                        let start = std::time::Instant::now();
                        h.submit_raw(std::slice::from_ref(&nop))?;
                        lat.push(start.elapsed().as_nanos() as u64);
                    }
                    let start = std::time::Instant::now();
                    let mut done = 0u64;
                    while start.elapsed().as_secs_f64() < seconds {
                        h.submit_raw(batch)?;
                        done += batch.len() as u64;
                    }
                    Ok((lat, done, start.elapsed().as_secs_f64()))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("bench thread")).collect()
    });
    // Wake-up from idle: each NOP after 20 ms of quiet, when the engine has
    // gone to sleep on its wake vector.
    let mut wakes = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let start = std::time::Instant::now();
        handles[0].submit_raw(std::slice::from_ref(&nop))?;
        wakes.push(start.elapsed().as_nanos() as u64);
    }
    wakes.sort_unstable();
    // Paced: one NOP every 1.5 ms, longer than the engine's initial polling
    // budget. The first ones find it asleep; it adapts its budget to the
    // gaps and the rest find it polling.
    let mut paced = Vec::new();
    for _ in 0..60 {
        std::thread::sleep(std::time::Duration::from_micros(1500));
        let start = std::time::Instant::now();
        handles[0].submit_raw(std::slice::from_ref(&nop))?;
        paced.push(start.elapsed().as_nanos() as u64);
    }
    let (first, last) = paced.split_at(10);
    let (mut first, mut last) = (first.to_vec(), last.to_vec());
    first.sort_unstable();
    last.sort_unstable();
    let mut latencies = Vec::new();
    let mut total = 0u64;
    let mut elapsed = 0f64;
    for r in results {
        let (lat, done, secs) = r?;
        latencies.extend(lat);
        total += done;
        elapsed = elapsed.max(secs);
    }
    latencies.sort_unstable();
    // Interrupts that never came: a queue that lost several in a row
    // polls instead, and the figures above are then polled ones.
    let missed: u64 = handles.iter().map(Device::missed_interrupts).sum();
    let gave_up = handles.iter().filter(|h| interrupts.is_some() && !h.waits_on_interrupts());
    Ok(serde_json::json!({
        "benchmark": "nop",
        "machine": machine()?,
        "mode": if interrupts.is_some() { "interrupt" } else { "polled" },
        "missed_interrupts": missed,
        "queues_polling_after_missed_interrupts": gave_up.count(),
        "queues": queues,
        "queue_entries": entries,
        "latency_qd1_us": {
            "samples": latencies.len(),
            "p50": percentile_us(&latencies, 0.50),
            "p99": percentile_us(&latencies, 0.99),
            "p999": percentile_us(&latencies, 0.999),
        },
        "wake_from_idle_us": {
            "samples": wakes.len(),
            "p50": percentile_us(&wakes, 0.50),
            "max": percentile_us(&wakes, 1.0),
        },
        "paced_every_1500us": {
            "first_10_p50_us": percentile_us(&first, 0.50),
            "last_50_p50_us": percentile_us(&last, 0.50),
            "last_50_p90_us": percentile_us(&last, 0.90),
            "note": "NOPs 1.5 ms apart: the engine's polling budget adapts to the gap, so later ones find it awake",
        },
        "throughput": {
            "depth_per_queue": depth,
            "commands": total,
            "seconds": elapsed,
            "commands_per_second": total as f64 / elapsed,
        },
    }))
}

/// NOPs through the async API: one interrupt-driven queue pair shared by
/// `tasks` tokio tasks, each submitting back to back for `seconds`.
pub fn bench_nop_async(
    device: &Device,
    tasks: u16,
    seconds: f64,
) -> Result<serde_json::Value, CliError> {
    use std::time::{Duration, Instant};
    let entries = (u32::from(tasks) + 1).next_power_of_two().clamp(64, 4096) as u16;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("starting the async runtime: {e}")))?;
    let (latencies, elapsed) = runtime.block_on(async {
        let queue = pnm_host::AsyncQueue::new(device, entries, Default::default())?;
        queue.nop().await?;
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let workers: Vec<_> = (0..tasks)
            .map(|_| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        queue.nop().await?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    Ok::<_, Error>(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.map_err(|e| Error::Invalid(format!("a NOP task failed: {e}")))??);
        }
        Ok::<_, Error>((all, start.elapsed().as_secs_f64()))
    })?;
    let mut latencies = latencies;
    latencies.sort_unstable();
    Ok(serde_json::json!({
        "benchmark": "nop_async",
        "machine": machine()?,
        "mode": "interrupt",
        "tasks": tasks,
        "queue_entries": entries,
        "commands": latencies.len(),
        "commands_per_second": latencies.len() as f64 / elapsed,
        "latency_us": {
            "p50": percentile_us(&latencies, 0.50),
            "p99": percentile_us(&latencies, 0.99),
        },
        "note": "one queue pair, its completions delivered by the async API's reaper to each task's future",
    }))
}

/// This machine's memory read bandwidth, measured now (one thread, a
/// buffer of `mib` MiB, well past the caches).
fn memory_read_gb_per_s(mib: usize) -> Result<f64, Error> {
    let roofline =
        pnm_tools::roofline::Roofline::new(mib << 20).map_err(kernel_bench::memory_error)?;
    Ok(roofline.read_gb_per_s(3))
}

/// The machine as this run found it, for comparing runs on a noisy machine.
fn machine() -> Result<serde_json::Value, Error> {
    Ok(serde_json::json!({
        // Small: a NOP run is short, and in an emulated guest a large scan
        // would take longer than the run it describes.
        "memory_read_gb_per_s": memory_read_gb_per_s(64)?,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "note": "measured in this run; a NOP moves no data, so its figures are not divided by it",
    }))
}

/// Median of a sample.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// TOPK_GATHER latency through the device against the device's own kernel
/// time and against the same Top-K and row copy called in-process.
pub fn bench_topk(
    device: &Device,
    tokens: u64,
    head_dim: u16,
    k: u32,
    group: u32,
    reps: usize,
    interrupts: bool,
) -> Result<serde_json::Value, CliError> {
    if tokens == 0 || head_dim == 0 || k == 0 || group == 0 || reps == 0 {
        return Err(usage("--tokens, --head-dim, -k, --group and --reps must be at least 1"));
    }
    let irq = interrupts.then(pnm_host::InterruptConfig::default);
    let dev = device.handle(pnm_host::QueueOptions {
        entries: 64,
        interrupts: irq,
        ..Default::default()
    })?;
    let shape = KvShape { dtype: pnm_host::Dtype::F16, layers: 1, heads: 1, head_dim };
    // Keys with small random values, as f16 bit patterns.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let rows: Vec<u8> = (0..shape.bytes(tokens) / 2)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (0x3000u16 | (state as u16 & 0x83FF)).to_le_bytes()
        })
        .collect();
    // The same rows in the firmware's store in this process (huge pages):
    // the kernel a host would otherwise call itself.
    let wire = shape;
    let shape = pnm_firmware::kv::SequenceShape {
        dtype: wire.dtype,
        layers: wire.layers,
        heads: wire.heads,
        head_dim: wire.head_dim,
    };
    let dram_bytes = (16 << 20) + 2 * rows.len() + (1 << 20);
    let local = pnm_firmware::kv::MemDram::from_buffer(
        pnm_tools::roofline::huge_page_buffer(dram_bytes).map_err(kernel_bench::memory_error)?,
    );
    let (store, local_seq) = kernel_bench::store_with(&local, shape, &rows, tokens)?;
    let seq = dev.kv_create(wire)?;
    let result = (|| {
        let seq = dev.kv_append(&seq, &rows, &rows, tokens, &mut |_| {})?;
        let q: Vec<f32> = (0..group as usize * usize::from(head_dim))
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let query = Query::f32(&q, usize::from(head_dim));
        // Output buffers reused across steps, as a decode loop would.
        let mut rows = pnm_host::Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
        let mut scratch = pnm_firmware::kv::TopkScratch::default();
        let (mut local_keys, mut local_values) = (Vec::new(), Vec::new());
        let mut in_process = || {
            kernel_bench::topk_gather_in_process(
                &store,
                &mut scratch,
                local_seq,
                &q,
                k,
                &mut local_keys,
                &mut local_values,
            )
        };
        // Warm-up of each.
        dev.topk_gather_into(&TopkRequest::new(&seq, 0, 0, &query, k), &mut rows)?;
        in_process()?;
        let mut host = Vec::with_capacity(reps);
        let mut in_place = Vec::with_capacity(reps);
        let mut local = Vec::with_capacity(reps);
        let mut device_ns = Vec::with_capacity(reps);
        // Per command: host latency beyond the device's own execution time.
        let mut path_ns = Vec::with_capacity(2 * reps);
        // Alternating, so drift in the machine's speed hits all alike.
        for _ in 0..reps {
            let start = std::time::Instant::now();
            let top = dev.topk_gather_into(&TopkRequest::new(&seq, 0, 0, &query, k), &mut rows)?;
            let latency = start.elapsed();
            host.push(latency.as_secs_f64());
            device_ns.push(top.device_ns as f64 / 1e9);
            path_ns.push((latency.as_nanos() as u64).saturating_sub(top.device_ns));
            let start = std::time::Instant::now();
            let view = dev.topk_gather_view(&TopkRequest::new(&seq, 0, 0, &query, k))?;
            let latency = start.elapsed();
            in_place.push(latency.as_secs_f64());
            device_ns.push(view.top.device_ns as f64 / 1e9);
            path_ns.push((latency.as_nanos() as u64).saturating_sub(view.top.device_ns));
            drop(view);
            let start = std::time::Instant::now();
            in_process()?;
            local.push(start.elapsed().as_secs_f64());
        }
        path_ns.sort_unstable();
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let best = serde_json::json!({
            "host_latency_ms": min(&host) * 1e3,
            "host_latency_rows_in_place_ms": min(&in_place) * 1e3,
            "device_kernel_ms": min(&device_ns) * 1e3,
            "in_process_ms": min(&local) * 1e3,
            "x_in_process": min(&host) / min(&local),
            "x_in_process_rows_in_place": min(&in_place) / min(&local),
        });
        let (host, in_place, kernel, local) =
            (median(host), median(in_place), median(device_ns), median(local));
        let read_gbs = memory_read_gb_per_s(256)?;
        let key_bytes = wire.bytes(tokens) as f64;
        let floor = key_bytes / read_gbs / 1e9;
        Ok::<_, Error>(serde_json::json!({
            "benchmark": "topk_gather",
            "roofline": {
                "memory_read_gb_per_s": read_gbs,
                "key_scan_ms": floor * 1e3,
                "device_kernel_x_roofline_time": kernel / floor,
                "host_latency_x_roofline_time": host / floor,
                "note": "measured in this run: one thread reading 256 MiB; the keys' scan can go no faster",
            },
            "mode": if interrupts { "interrupt" } else { "polled" },
            "tokens": tokens,
            "head_dim": head_dim,
            "dtype": "f16",
            "k": k,
            "group": group,
            "reps": reps,
            "compute_units": device.identify_pnm()?.compute_units,
            "host_latency_ms": host * 1e3,
            "host_latency_rows_in_place_ms": in_place * 1e3,
            "device_kernel_ms": kernel * 1e3,
            "in_process_ms": local * 1e3,
            "command_path_overhead_ratio": host / kernel,
            "command_path_overhead_ratio_rows_in_place": in_place / kernel,
            "command_path_us": {
                "p50": percentile_us(&path_ns, 0.5),
                "p90": percentile_us(&path_ns, 0.9),
                "p99": percentile_us(&path_ns, 0.99),
                "note": "per command, host latency minus the device's Execution Time: submission, doorbell, hand-off to a compute unit, completion, the host's checks and copy",
            },
            "x_in_process": host / local,
            "x_in_process_rows_in_place": in_place / local,
            "best": best,
            "note": "medians (\"best\": minima, what a quiet spell of the machine allows); host latency with the rows copied into the caller's buffers (topk_gather_into) and with them read in place in the DMA buffer (topk_gather_view); device kernel = the completion's Execution Time, which includes the device writing the rows; in_process = the firmware's Top-K and row copy called in this process on one thread, on the same rows in huge pages",
            "commands_per_second": 1.0 / host,
            "key_gb_per_s": wire.bytes(tokens) as f64 / kernel / 1e9,
        }))
    })();
    let _ = dev.kv_free(seq.id);
    Ok(result?)
}
