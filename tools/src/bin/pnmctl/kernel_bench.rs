//! `pnmctl bench kernel`: the scoring + Top-K kernel over a grid of shapes,
//! in-process (the firmware model called directly) and through the device,
//! each figure next to this machine's memory read roofline measured in the
//! same run, and optionally numpy and faiss-cpu on the same shapes.

use std::time::Instant;

use pnm_firmware::kernels::Aggregation;
use pnm_firmware::kv::{Dram, KvStore, MemDram, SequenceShape, TopkQuery, TopkScratch};
use pnm_host::{Device, Dtype, KvShape, Query, TopkRequest};
use pnm_protocol::queue::KeyLayout;
use pnm_tools::roofline::Roofline;
use serde_json::{Value, json};

/// The grid and how to run it.
#[derive(Debug, Clone)]
pub struct KernelGrid {
    pub tokens: Vec<u64>,
    pub dtypes: Vec<Dtype>,
    pub groups: Vec<u32>,
    pub ks: Vec<u32>,
    pub head_dim: u16,
    pub reps: usize,
    /// Also time numpy and faiss-cpu (through python3) on the same shapes.
    pub reference: bool,
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
        Dtype::F32 => "f32",
    }
}

/// Keys with values in about [-1, 1), stored as `dtype`.
fn keys(dtype: Dtype, elements: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(elements * dtype.size());
    for _ in 0..elements {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        match dtype {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            Dtype::Bf16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// Keys of the L2 size the kernel scans in cache: small enough for any
/// x86 core's L2 of the last decade.
const IN_CACHE_BYTES: usize = 512 << 10;

/// The first [`IN_CACHE_BYTES`] of `rows` (stored rows of `d` elements) in
/// key tiles, written as the store writes them ([`KeyLayout::write_rows`]),
/// or None if the keys are fewer than a tile or the store keeps keys of
/// this shape as rows (no tile kernel to time).
fn tiles_in_cache(rows: &[u8], dtype: Dtype, d: usize) -> Option<Vec<u8>> {
    let layout = KeyLayout::new(u32::try_from(d).ok()?, dtype);
    let row = layout.row_bytes() as usize;
    let tokens = IN_CACHE_BYTES.min(rows.len()) / row / 16 * 16;
    if !layout.tiled || tokens == 0 {
        return None;
    }
    let mut tiled = vec![0u8; tokens * row];
    let written = layout.write_rows(0, &rows[..tokens * row], &mut Vec::new(), |at, bytes| {
        tiled[at as usize..][..bytes.len()].copy_from_slice(bytes);
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(()) = written;
    Some(tiled)
}

/// The best of many scans of `tiles` held in cache: (tokens, seconds). The
/// kernel's compute rate with memory out of the way, against the compute
/// roofline of the same run.
fn in_cache_scan_s(tiles: &[u8], dtype: Dtype, d: usize, queries: &[f32]) -> (usize, f64) {
    let rows = pnm_firmware::simd::Rows::from_bytes(tiles, dtype);
    let (mut scratch, mut out) = (Vec::new(), Vec::with_capacity(tiles.len()));
    let mut best = f64::INFINITY;
    for _ in 0..IN_CACHE_SCANS {
        out.clear();
        let start = Instant::now();
        std::hint::black_box(pnm_firmware::kernels::score_stored_tiles(
            rows,
            d,
            queries,
            Aggregation::Max,
            &mut scratch,
            &mut out,
        ));
        best = best.min(start.elapsed().as_secs_f64());
    }
    (tiles.len() / (d * dtype.size()), best)
}

/// Scans of [`in_cache_scan_s`] (each 10-100 us; the best of many, as a
/// vCPU of a shared machine is often interrupted).
const IN_CACHE_SCANS: usize = 1000;

/// What [`interleaved`] asks of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Once per round, untimed: wake the device, refill the TLB.
    Untimed,
    /// Before each timed run, untimed: drop the keys from the caches, as a
    /// decode step finds them (every other layer's and head's keys passed
    /// through the caches since this head's were last read).
    Prepare,
    /// The timed run.
    Timed,
}

/// (min, median) of `reps` timings of each of `runs`, in seconds, taken in
/// rounds so that a quiet or a noisy spell of a shared machine falls on all
/// of them alike and their ratios hold. In a round each run goes once
/// untimed ([`Run::Untimed`]), then [`TIMED_PER_ROUND`] times back to back,
/// each time prepared untimed ([`Run::Prepare`]) and then timed
/// ([`Run::Timed`]).
fn interleaved(reps: usize, runs: &mut [&mut dyn FnMut(Run)]) -> Vec<(f64, f64)> {
    let rounds = reps.max(1).div_ceil(TIMED_PER_ROUND);
    let mut times = vec![Vec::with_capacity(rounds * TIMED_PER_ROUND); runs.len()];
    for _ in 0..rounds {
        for (run, t) in runs.iter_mut().zip(&mut times) {
            run(Run::Untimed);
            for _ in 0..TIMED_PER_ROUND {
                run(Run::Prepare);
                let start = Instant::now();
                run(Run::Timed);
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[0], t[t.len() / 2])
        })
        .collect()
}

/// Timed runs of each kind in a row within one round of [`interleaved`].
const TIMED_PER_ROUND: usize = 3;

/// Rounds of the compute roofline's FMA loop per measurement (16 chains x
/// 16 lanes x 2 FLOPs each: about 0.13 GFLOP, 1-3 ms on one core).
const COMPUTE_ROUNDS: usize = 1 << 18;

/// Runs the grid; `device` adds the through-the-device figures.
pub fn run(grid: &KernelGrid, device: Option<&Device>) -> pnm_host::Result<Value> {
    let roofline = Roofline::new(64 << 20).map_err(memory_error)?;
    let d = usize::from(grid.head_dim);
    let mut cases = Vec::new();
    for &tokens in &grid.tokens {
        for &dtype in &grid.dtypes {
            let key_bytes = keys(dtype, tokens as usize * d, 0x9E37_79B9_7F4A_7C15 ^ tokens);
            // The firmware's store in process memory holding exactly these
            // keys: advised to huge pages (the kernel's best case), and in
            // plain 4 KiB pages like a device region on default tmpfs.
            let shape = SequenceShape { dtype, layers: 1, heads: 1, head_dim: grid.head_dim };
            let dram_bytes = (16 << 20) + 2 * key_bytes.len() + (1 << 20);
            let huge = MemDram::from_buffer(
                pnm_tools::roofline::huge_page_buffer(dram_bytes).map_err(memory_error)?,
            );
            let plain = MemDram::new(dram_bytes);
            let (store, id) = store_with(&huge, shape, &key_bytes, tokens)?;
            let (plain_store, plain_id) = store_with(&plain, shape, &key_bytes, tokens)?;
            // The same keys in the device (values are not read by TOPK).
            let on_device = match device {
                Some(dev) => {
                    let wire = KvShape { dtype, layers: 1, heads: 1, head_dim: grid.head_dim };
                    let seq = dev.kv_create(wire)?;
                    Some(dev.kv_append(&seq, &key_bytes, &key_bytes, tokens, &mut |_| {})?)
                }
                None => None,
            };
            let cached_tiles = tiles_in_cache(&key_bytes, dtype, d);
            for &group in &grid.groups {
                let queries: Vec<f32> =
                    (0..group as usize * d).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
                let in_cache_s =
                    cached_tiles.as_ref().map(|t| in_cache_scan_s(t, dtype, d, &queries));
                for &k in &grid.ks {
                    let mut read_gbs = 0f64;
                    let mut fma_gflops = 0f64;
                    let mut scratch = TopkScratch::default();
                    let mut selected = 0;
                    let query_of = |seq| TopkQuery {
                        seq,
                        layer: 0,
                        head: 0,
                        queries: &queries,
                        how: Aggregation::Max,
                        k,
                    };
                    let mut kernel_ns = Vec::new();
                    let mut model_ns = 0;
                    // Each read starts from memory (the roofline evicts
                    // its buffer itself).
                    let mut roof = |run| {
                        if run == Run::Prepare {
                            return;
                        }
                        read_gbs = read_gbs.max(roofline.read_gb_per_s(1));
                        // A few ms of FMAs: the compute roofline beside it.
                        let peak = pnm_firmware::simd::fma_gflops(COMPUTE_ROUNDS).unwrap_or(0.0);
                        fma_gflops = fma_gflops.max(peak);
                    };
                    let mut local = |run| {
                        if run == Run::Prepare {
                            huge.evict_from_caches();
                            return;
                        }
                        let top = store
                            .top_k_with(&mut scratch, query_of(id))
                            .expect("the benchmark's own arguments are valid");
                        selected = top.len();
                    };
                    // The same, back to back with its keys left in the
                    // caches: what a loop over one head's keys measures
                    // (the keys fit a large last-level cache).
                    let mut warm_scratch = TopkScratch::default();
                    let mut warm = |run| {
                        if run != Run::Prepare {
                            store
                                .top_k_with(&mut warm_scratch, query_of(id))
                                .expect("the benchmark's own arguments are valid");
                        }
                    };
                    // TOPK_GATHER in-process: the same Top-K, then its K and
                    // V rows copied out (keys assembled from their tiles).
                    let mut gather_scratch = TopkScratch::default();
                    let (mut gathered_keys, mut gathered_values) = (Vec::new(), Vec::new());
                    let mut gathered = |run| {
                        if run == Run::Prepare {
                            huge.evict_from_caches();
                            return;
                        }
                        topk_gather_in_process(
                            &store,
                            &mut gather_scratch,
                            id,
                            &queries,
                            k,
                            &mut gathered_keys,
                            &mut gathered_values,
                        )
                        .expect("the benchmark's own arguments are valid");
                    };
                    let mut plain_scratch = TopkScratch::default();
                    let mut small_pages = |run| {
                        if run == Run::Prepare {
                            plain.evict_from_caches();
                            return;
                        }
                        plain_store
                            .top_k_with(&mut plain_scratch, query_of(plain_id))
                            .expect("the benchmark's own arguments are valid");
                    };
                    let wire_query = Query::f32(&queries, d);
                    // The device's region is another process's memory (or,
                    // embedded, a mapping this code does not see): it
                    // runs as the device finds it.
                    let mut through_device = |run| {
                        let timed = run == Run::Timed;
                        if let (Some(dev), Some(seq)) = (device, &on_device) {
                            let top = dev
                                .topk(&TopkRequest::new(seq, 0, 0, &wire_query, k))
                                .expect("the benchmark's own arguments are valid");
                            if timed {
                                kernel_ns.push(top.device_ns as f64);
                            }
                            model_ns = top.model_ns;
                        }
                    };
                    let timings = interleaved(
                        grid.reps,
                        &mut [
                            &mut roof,
                            &mut local,
                            &mut warm,
                            &mut gathered,
                            &mut small_pages,
                            &mut through_device,
                        ],
                    );
                    let [
                        _,
                        (local_min, local_median),
                        (warm_min, _),
                        (gather_min, _),
                        (plain_min, _),
                        (host_min, host_median),
                    ] = timings[..]
                    else {
                        unreachable!("six runs, six timings")
                    };
                    let floor = key_bytes.len() as f64 / (read_gbs * 1e9);
                    // Scoring's FLOPs: a multiply and an add per element
                    // per query of the group.
                    let flops = 2.0 * tokens as f64 * d as f64 * f64::from(group);
                    let compute_floor =
                        if fma_gflops > 0.0 { flops / (fma_gflops * 1e9) } else { 0.0 };
                    let binding = floor.max(compute_floor);
                    let mut case = json!({
                        "tokens": tokens,
                        "head_dim": d,
                        "dtype": dtype_name(dtype),
                        "group": group,
                        "k": k,
                        "key_bytes": key_bytes.len(),
                        "roofline": {
                            "memory_read_gb_per_s": read_gbs,
                            "floor_ms": floor * 1e3,
                            "fma_gflop_per_s": fma_gflops,
                            "compute_floor_ms": compute_floor * 1e3,
                            "binding": if compute_floor > floor { "compute" } else { "memory" },
                        },
                        "in_process": {
                            "min_ms": local_min * 1e3,
                            "median_ms": local_median * 1e3,
                            "key_gb_per_s": key_bytes.len() as f64 / local_min / 1e9,
                            "x_roofline_time": local_min / floor,
                            "gflop_per_s": flops / local_min / 1e9,
                            "in_cache": in_cache_s.map(|(tokens, secs)| {
                                let gflops = 2.0 * tokens as f64 * d as f64 * f64::from(group) / secs / 1e9;
                                json!({
                                    "tokens": tokens,
                                    "gflop_per_s": gflops,
                                    "x_compute_roofline": if fma_gflops > 0.0 { gflops / fma_gflops } else { 0.0 },
                                })
                            }),
                            "x_binding_time": local_min / binding,
                            "selected": selected,
                            "warm_min_ms": warm_min * 1e3,
                            "topk_gather_min_ms": gather_min * 1e3,
                            "small_pages_min_ms": plain_min * 1e3,
                            "small_pages_x_roofline_time": plain_min / floor,
                        },
                    });
                    if device.is_some() {
                        kernel_ns.sort_by(f64::total_cmp);
                        let kernel_min = kernel_ns[0] / 1e9;
                        case["through_device"] = json!({
                            "host_min_ms": host_min * 1e3,
                            "host_median_ms": host_median * 1e3,
                            "device_kernel_min_ms": kernel_min * 1e3,
                            "device_kernel_median_ms": kernel_ns[kernel_ns.len() / 2] / 1e6,
                            "x_in_process": host_min / local_min,
                            "x_in_process_small_pages": host_min / plain_min,
                            "x_roofline_time": host_min / floor,
                            "modelled_hardware_ms": model_ns as f64 / 1e6,
                        });
                    }
                    cases.push(case);
                }
            }
            if let (Some(dev), Some(seq)) = (device, on_device) {
                dev.kv_free(seq.id)?;
            }
        }
    }
    let reference = if grid.reference { python_reference(grid) } else { Value::Null };
    // Asked for and not there (no python3 or numpy): a failure, not a
    // report that silently lacks it.
    if let Some(error) = reference.get("error") {
        return Err(pnm_host::Error::Invalid(format!(
            "--reference needs python3 with numpy (faiss-cpu adds its figures when installed): {}",
            error.as_str().unwrap_or("unknown error")
        )));
    }
    Ok(json!({
        "benchmark": "kernel",
        "threads": 1,
        "cases": cases,
        "reference": reference,
        "note": "in_cache: the kernel alone on the first 512 KiB of the keys in tiles, held in cache, best of 1000 scans (its compute rate against the compute roofline); each case runs in rounds (roofline read, in-process on huge pages, the same warm (warm_min_ms), the same with its K and V rows gathered (topk_gather_min_ms: keys in tiles are assembled from them), in-process on 4 KiB pages, through the device; each once untimed, then 3 timed runs) so machine noise falls on all alike; every in-process run but the warm one, and every roofline read, starts with its buffer evicted from the caches (as a decode step finds a head's keys); min over rounds (interference only slows a run down); the memory roofline is the fastest of a plain read and reads with software prefetch; x_roofline_time = time / (key bytes / best memory read bandwidth over the rounds); the compute roofline is one core's f32 FMA rate in the kernels' vector set (16 independent chains), measured in the same rounds; compute_floor = 2 x tokens x head_dim x G FLOPs at that rate; x_binding_time = time / the larger of the two floors",
    }))
}

/// numpy and faiss-cpu on the same shapes, single-threaded, or why not.
fn python_reference(grid: &KernelGrid) -> Value {
    let spec = json!({
        "tokens": grid.tokens,
        "dtypes": grid.dtypes.iter().map(|&d| dtype_name(d)).collect::<Vec<_>>(),
        "groups": grid.groups,
        "ks": grid.ks,
        "head_dim": grid.head_dim,
        "reps": grid.reps,
    });
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(include_str!("kernel_reference.py"))
        .arg(spec.to_string())
        // One thread, like the firmware kernel it is compared with.
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .output();
    match output {
        Ok(out) if out.status.success() => serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| json!({ "error": format!("unreadable reference output: {e}") })),
        Ok(out) => json!({ "error": String::from_utf8_lossy(&out.stderr).trim().to_string() }),
        Err(e) => json!({ "error": format!("python3: {e}") }),
    }
}

/// A firmware store in `dram` holding one (layer, head) of `keys` (values
/// are not read by a Top-K; the keys stand in for them).
pub fn store_with<'d, B: AsRef<[u8]> + AsMut<[u8]>>(
    dram: &'d MemDram<B>,
    shape: SequenceShape,
    keys: &[u8],
    tokens: u64,
) -> pnm_host::Result<(KvStore<&'d MemDram<B>>, u32)> {
    let (mut store, _) = KvStore::open(dram).map_err(firmware_error)?;
    let id = store.create_with_rows(shape, keys, keys, tokens).map_err(firmware_error)?;
    Ok((store, id))
}

/// The firmware's TOPK_GATHER called in-process: the best `k` of (seq,
/// 0, 0) for `queries`, their K and V rows copied into `keys` and `values`
/// as the device copies them into a host buffer.
pub fn topk_gather_in_process<B: AsRef<[u8]> + AsMut<[u8]>>(
    store: &KvStore<&MemDram<B>>,
    scratch: &mut TopkScratch,
    seq: u32,
    queries: &[f32],
    k: u32,
    keys: &mut Vec<u8>,
    values: &mut Vec<u8>,
) -> pnm_host::Result<usize> {
    let query = TopkQuery { seq, layer: 0, head: 0, queries, how: Aggregation::Max, k };
    let top = store.top_k_with(scratch, query).map_err(firmware_error)?;
    let indices: Vec<u32> = top.iter().map(|s| s.index).collect();
    let row = store.shape(seq).map_err(firmware_error)?.row_bytes() as usize;
    keys.resize(indices.len() * row, 0);
    values.resize(indices.len() * row, 0);
    let locations = store.row_locations(seq, 0, 0, &indices).map_err(firmware_error)?;
    store.read_keys(&locations, row, keys).map_err(firmware_error)?;
    for (i, at) in locations.iter().enumerate() {
        store.prefetch_gather(&locations, i, row as u64);
        store.dram().read(at.value, &mut values[i * row..][..row]).map_err(firmware_error)?;
    }
    Ok(top.len())
}

/// No memory for a benchmark buffer.
pub fn memory_error(e: std::io::Error) -> pnm_host::Error {
    pnm_host::Error::Invalid(format!("benchmark buffer: {e}"))
}

/// A firmware-model error while building the in-process store.
fn firmware_error(e: pnm_firmware::kv::KvError) -> pnm_host::Error {
    pnm_host::Error::Invalid(format!("in-process store: {e}"))
}
