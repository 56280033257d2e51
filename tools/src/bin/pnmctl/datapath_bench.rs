//! `pnmctl bench datapath`: the data path end to end, printed as JSON.
//!
//! Every figure comes with this machine's roofline measured in the same run
//! (memory read bandwidth and memcpy bandwidth), so ratios survive a noisy
//! or different machine. Needs `pnm-device` next to `pnmctl` (build both:
//! `cargo build --release --workspace`).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pnm_device::RunningDevice;
use pnm_firmware::kernels::Aggregation;
use pnm_firmware::kv::{Dram, KvStore, MemDram, SequenceShape, TopkQuery, TopkScratch};
use pnm_host::{Device, DeviceOptions, Dtype, KvShape, Query, TopkRequest};
use pnm_tools::tensorfile::{self, Tensor};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct DatapathArgs {
    /// Tokens in the Top-K benchmark's sequence.
    #[arg(long, default_value_t = 32768)]
    tokens: u64,
    /// k of the Top-K benchmark.
    #[arg(short, long, default_value_t = 2048)]
    k: u32,
    /// Repetitions per timed figure (the median is reported).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// MiB of K (and of V) in the load benchmark.
    #[arg(long, default_value_t = 256)]
    load_mib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    median(
        (0..reps)
            .map(|_| {
                let start = Instant::now();
                black_box(f());
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// memcpy bandwidth (GB/s of bytes copied) between two large buffers.
fn copy_bandwidth() -> f64 {
    let len = 256usize << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let secs = time(5, || dst.copy_from_slice(black_box(&src)));
    len as f64 / secs / 1e9
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Small finite f16/bf16/f32 patterns: keep exponents moderate.
        out.extend_from_slice(&(state & 0x3BFF_3BFF_3BFF_3BFF).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A `/proc/PID/status` field in KiB (0 if unreadable).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// RssAnon of a process in bytes: its private memory, not the shared region.
fn rss_anon(pid: u32) -> u64 {
    proc_status_kib(pid, "RssAnon:") * 1024
}

pub fn run(args: &DatapathArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.tokens > 0 && args.k > 0 && args.reps > 0 && args.load_mib > 0,
        "--tokens, -k, --reps and --load-mib must be at least 1"
    );
    let exe_dir = std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default();
    let device_exe = exe_dir.join("pnm-device");
    anyhow::ensure!(
        device_exe.exists(),
        "{} is missing: build it beside pnmctl (cargo build --release --workspace)",
        device_exe.display()
    );
    let read_gbs = pnm_tools::roofline::Roofline::new(512 << 20)?.read_gb_per_s(5);
    let copy_gbs = copy_bandwidth();

    // KV load: rows stored straight into device DRAM, timed on a region
    // whose pages are already faulted in (a first load, freed, warms it).
    let device = RunningDevice::embedded(1 << 30, None)?;
    let options = DeviceOptions { socket: device.socket().map(Into::into), ..Default::default() };
    let dev = Device::open_with(&device.region().path, &options)?;
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 8, head_dim: 128 };
    let load_tokens = (args.load_mib << 20) / (8 * 256);
    let keys = random_bytes(shape.bytes(load_tokens) as usize, 1);
    let values = random_bytes(shape.bytes(load_tokens) as usize, 2);
    let load = |_: ()| -> anyhow::Result<f64> {
        let seq = dev.kv_create(shape)?;
        let start = Instant::now();
        dev.kv_append(&seq, &keys, &values, load_tokens, &mut |_| {})?;
        let secs = start.elapsed().as_secs_f64();
        dev.kv_free(seq.id)?;
        Ok(secs)
    };
    let cold = load(())?;
    let warm = median((0..3).map(|_| load(())).collect::<Result<_, _>>()?);
    let load_bytes = 2.0 * shape.bytes(load_tokens) as f64;

    // Top-K + gather at `tokens`: the firmware kernel called in-process on
    // the same data, and the same through the device's command path.
    let one = KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 128 };
    let k_rows = random_bytes(one.bytes(args.tokens) as usize, 3);
    let v_rows = random_bytes(one.bytes(args.tokens) as usize, 4);
    let seq = dev.kv_create(one)?;
    let seq = dev.kv_append(&seq, &k_rows, &v_rows, args.tokens, &mut |_| {})?;
    let query: Vec<f32> = (0..128).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    // Both sides reuse their output buffers across repetitions, as a
    // decode loop would.
    let mut rows = pnm_host::Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
    let mut through_device = || {
        let q = Query::f32(&query, 128);
        dev.topk_gather_into(&TopkRequest::new(&seq, 0, 0, &q, args.k), &mut rows).expect("topk")
    };

    let dram = MemDram::new((64 << 20) + one.bytes(args.tokens) as usize * 3);
    let (mut store, _) = KvStore::open(&dram)?;
    let fshape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 128 };
    let id = store.create_with_rows(fshape, &k_rows, &v_rows, args.tokens)?;
    let mut out = vec![0u8; args.k as usize * 512];
    let mut scratch = TopkScratch::default();
    let mut in_process = || {
        let top = store
            .top_k_with(
                &mut scratch,
                TopkQuery {
                    seq: id,
                    layer: 0,
                    head: 0,
                    queries: &query,
                    how: Aggregation::Max,
                    k: args.k,
                },
            )
            .expect("topk");
        let indices: Vec<u32> = top.iter().map(|s| s.index).collect();
        let rows = store.row_locations(id, 0, 0, &indices).expect("rows");
        let (keys, values) = out.split_at_mut(args.k as usize * 256);
        store.read_keys(&rows, 256, &mut keys[..rows.len() * 256]).expect("read");
        for (i, r) in rows.iter().enumerate() {
            (&dram).read(r.value, &mut values[i * 256..(i + 1) * 256]).expect("read");
        }
        top.len()
    };
    // Alternate the two, so drift in a noisy machine's speed hits both alike.
    let (mut device_times, mut local_times) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        device_times.push(time(1, &mut through_device));
        local_times.push(time(1, &mut in_process));
    }
    let (through_device, in_process) = (median(device_times), median(local_times));
    let key_bytes = one.bytes(args.tokens) as f64;
    drop(dev);
    drop(device);

    // Memory beyond the region: a separate pnm-device process and this
    // process's driver, after a load and Top-Ks.
    let region = PathBuf::from(format!("/dev/shm/cxl-pnm-bench-{}", std::process::id()));
    let mut child = Command::new(&device_exe)
        .args(["--path".as_ref(), region.as_os_str(), "--size".as_ref(), "1GiB".as_ref()])
        .env("RUST_LOG", "warn,pnm_device::region=error")
        .stdout(Stdio::null())
        .spawn()?;
    let options = DeviceOptions { wait_ready: Some(Duration::from_secs(10)), ..Default::default() };
    let start = Instant::now();
    let dev = loop {
        match Device::open_with(&region, &options) {
            Ok(dev) if dev.status().device_pid == child.id() => break dev,
            _ if start.elapsed() > Duration::from_secs(10) => {
                anyhow::bail!("pnm-device did not start")
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    // Idle CPU: the device with a host attached but nothing to do.
    std::thread::sleep(Duration::from_secs(1));
    let cpu_ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        // utime and stime are fields 14 and 15: 12 and 13 after the command name.
        fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    let ticks_per_second = 100.0;
    let idle_seconds = 5.0;
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs_f64(idle_seconds));
    let idle_cpu_percent =
        (cpu_ticks(child.id()) - before) as f64 / ticks_per_second / idle_seconds * 100.0;

    let seq = dev.kv_create(shape)?;
    let seq = dev.kv_append(&seq, &keys, &values, load_tokens, &mut |_| {})?;
    for head in 0..8 {
        dev.topk_gather(&TopkRequest::new(&seq, 0, head, &Query::f32(&query, 128), args.k))?;
    }
    let device_rss = rss_anon(child.id());
    // The driver in a process of its own: pnmctl running a Top-K. Its peak
    // RSS counts every page it touches, shared ones included.
    let query_file = std::env::temp_dir().join(format!("pnm-bench-q-{}.npy", std::process::id()));
    let q_bytes: Vec<u8> = query.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensorfile::write_npy(
        &query_file,
        &Tensor { dtype: Dtype::F32, shape: vec![128], data: q_bytes },
    )?;
    let mut ctl = Command::new(exe_dir.join("pnmctl"))
        .arg("--device")
        .arg(&region)
        .args(["--json", "topk", "--seq", &seq.id.to_string(), "--layer", "0", "--head", "0", "-k"])
        .arg(args.k.to_string())
        .arg("--query")
        .arg(&query_file)
        .stdout(Stdio::null())
        .spawn()?;
    // VmHWM is the process's peak RSS so far; the last reading before it
    // exits is its peak.
    let mut pnmctl_max_rss = 0;
    let status = loop {
        if let Some(status) = ctl.try_wait()? {
            break status;
        }
        pnmctl_max_rss = pnmctl_max_rss.max(proc_status_kib(ctl.id(), "VmHWM:") * 1024);
        std::thread::sleep(Duration::from_micros(200));
    };
    let _ = std::fs::remove_file(&query_file);
    anyhow::ensure!(status.success(), "pnmctl topk failed");
    drop(dev);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    child.wait()?;
    let _ = std::fs::remove_file(&region);

    let report = json!({
        "machine": {
            "memory_read_gb_per_s": read_gbs,
            "memcpy_gb_per_s": copy_gbs,
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        "kv_load": {
            "bytes": load_bytes,
            "cold_seconds": cold,
            "warm_seconds": warm,
            "warm_gb_per_s": load_bytes / warm / 1e9,
            "ratio_to_memcpy": load_bytes / warm / 1e9 / copy_gbs,
            "note": "K+V rows written into device DRAM frames plus KV_APPEND/KV_COMMIT; cold includes first-touch page faults of the region",
        },
        "topk_gather": {
            "tokens": args.tokens,
            "head_dim": 128,
            "dtype": "f16",
            "k": args.k,
            "in_process_ms": in_process * 1e3,
            "through_device_ms": through_device * 1e3,
            "command_path_overhead_ratio": through_device / in_process,
            "key_gb_per_s_in_process": key_bytes / in_process / 1e9,
            "ratio_to_read_roofline": (key_bytes / read_gbs / 1e9) / in_process,
        },
        "idle_device": {
            "cpu_percent_of_one_core": idle_cpu_percent,
            "seconds": idle_seconds,
        },
        "memory_beyond_region": {
            "device_process_rss_anon_mib": device_rss as f64 / (1 << 20) as f64,
            "pnmctl_topk_max_rss_mib": pnmctl_max_rss as f64 / (1 << 20) as f64,
            "note": format!(
                "device: private memory (RssAnon) after a {} MiB load and Top-Ks; pnmctl: peak \
                 RSS (VmHWM) of a whole topk run, binary and libraries included",
                2 * args.load_mib
            ),
        },
    });
    Ok(report)
}
