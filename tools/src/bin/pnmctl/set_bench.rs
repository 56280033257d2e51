//! `pnmctl bench set`: a device set's fan-out against one device holding
//! everything, on real `pnm-device` processes, in one run (JSON).
//!
//! Configurations, alternated rep by rep so a noisy machine hits each
//! alike: one device with one compute unit; one device with `--devices`
//! units (the same cores as the set); the set of `--devices` devices with
//! one unit each. Each step is one Top-K per KV head of one layer (a batch
//! on each device's queue). Reported per configuration: the step's median
//! time, the keys scanned per second against this machine's memory read
//! roofline measured in the same run, and the device's modelled time; for
//! the set, the merge's cost per candidate.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pnm_host::{
    Device, DeviceOptions, DeviceSet, Dtype, KvShape, Query, SetTopkRequest, TopkRequest,
};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct SetBenchArgs {
    /// Devices in the set.
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Tokens of the sequence.
    #[arg(long, default_value_t = 131072)]
    tokens: u64,
    /// KV heads (one Top-K each per step).
    #[arg(long, default_value_t = 8)]
    heads: u16,
    #[arg(short, long, default_value_t = 2048)]
    k: u32,
    /// Steps timed per configuration (the median is reported).
    #[arg(long, default_value_t = 15)]
    reps: usize,
}

/// A pnm-device process on its own region, killed on drop.
struct Process {
    child: Child,
    region: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.region);
        let _ = std::fs::remove_file(pnm_protocol::notify::socket_path(&self.region));
    }
}

fn start(
    exe: &PathBuf,
    tag: &str,
    size_mib: u64,
    units: usize,
) -> anyhow::Result<(Process, Device)> {
    let region = PathBuf::from(format!("/dev/shm/cxl-pnm-setbench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&region);
    let child = Command::new(exe)
        .arg("--path")
        .arg(&region)
        // Regions are powers of two (an ivshmem BAR is).
        .args(["--size", &format!("{}MiB", size_mib.next_power_of_two())])
        .args(["--compute-units", &units.to_string()])
        .arg("--no-pin")
        .env("RUST_LOG", "warn,pnm_device::region=error")
        .stdout(Stdio::null())
        .spawn()?;
    let process = Process { child, region };
    let options =
        DeviceOptions { wait_ready: Some(Duration::from_millis(50)), ..Default::default() };
    let started = Instant::now();
    loop {
        match Device::open_with(&process.region, &options) {
            Ok(dev) if dev.status().device_pid == process.child.id() => return Ok((process, dev)),
            _ if started.elapsed() > Duration::from_secs(10) => {
                anyhow::bail!("pnm-device on {} did not start", process.region.display())
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_f16(len: usize, seed: u64) -> Vec<u8> {
    pnm_tools::testdata::random_f32s(seed, len)
        .into_iter()
        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

pub fn run(args: &SetBenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.devices >= 2 && args.tokens > 0 && args.heads > 0 && args.k > 0 && args.reps > 0,
        "--devices must be at least 2; --tokens, --heads, -k and --reps at least 1"
    );
    let exe_dir = std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default();
    let exe = exe_dir.join("pnm-device");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: build it beside pnmctl (cargo build --release --workspace)",
        exe.display()
    );
    let read_gbs = pnm_tools::roofline::Roofline::new(512 << 20)?.read_gb_per_s(5);
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: args.heads, head_dim: 128 };
    let kv_mib = (shape.bytes(args.tokens) * 2) >> 20;
    let n = args.devices;
    let (_one_p, one) = start(&exe, "one", kv_mib * 5 / 4 + 256, 1)?;
    let (_wide_p, wide) = start(&exe, "wide", kv_mib * 5 / 4 + 256, n)?;
    let mut members = Vec::new();
    let mut member_processes = Vec::new();
    for i in 0..n {
        let (p, d) = start(&exe, &format!("m{i}"), kv_mib * 5 / 4 / n as u64 + 256, 1)?;
        member_processes.push(p);
        members.push(d);
    }
    let set = DeviceSet::new(members)?;

    let keys = random_f16(shape.bytes(args.tokens) as usize / 2, 1);
    let values = random_f16(shape.bytes(args.tokens) as usize / 2, 2);
    let seq_one = one.kv_create(shape)?;
    let seq_one = one.kv_append(&seq_one, &keys, &values, args.tokens, &mut |_| {})?;
    let seq_wide = wide.kv_create(shape)?;
    let seq_wide = wide.kv_append(&seq_wide, &keys, &values, args.tokens, &mut |_| {})?;
    let seq_set = set.kv_create(shape)?;
    let seq_set = set.kv_append(&seq_set, &keys, &values, args.tokens)?;
    let query = Query::f32(&pnm_tools::testdata::random_f32s(3, 4 * 128), 128);

    // One step: a Top-K per head, as one batch on each device's queue.
    let single = |dev: &Device, seq| -> anyhow::Result<(f64, u64)> {
        let requests: Vec<_> =
            (0..args.heads).map(|h| TopkRequest::new(seq, 0, h, &query, args.k)).collect();
        let started = Instant::now();
        let answers = dev.topk_batch(&requests)?;
        let secs = started.elapsed().as_secs_f64();
        let mut model_ns = 0;
        for a in answers {
            model_ns += a?.model_ns;
        }
        Ok((secs, model_ns))
    };
    let fanned = || -> anyhow::Result<(f64, u64, f64)> {
        let requests: Vec<_> =
            (0..args.heads).map(|h| SetTopkRequest::new(&seq_set, 0, h, &query, args.k)).collect();
        let started = Instant::now();
        let answers = set.topk_batch(&requests)?;
        let secs = started.elapsed().as_secs_f64();
        let (mut model_ns, mut merge_ns, mut candidates) = (0, 0, 0);
        for a in answers {
            let a = a?;
            // The modelled modules run in parallel; the merge is this host's.
            model_ns += a.devices.iter().map(|d| d.model_ns).max().unwrap_or(0);
            merge_ns += a.merge_ns;
            candidates += n as u64 * u64::from(args.k).min(args.tokens / n as u64);
        }
        Ok((secs, model_ns, merge_ns as f64 / candidates.max(1) as f64))
    };
    // Warm every configuration once, then alternate.
    single(&one, &seq_one)?;
    single(&wide, &seq_wide)?;
    fanned()?;
    let (mut t_one, mut t_wide, mut t_set) = (Vec::new(), Vec::new(), Vec::new());
    let (mut m_one, mut m_set, mut merge) = (0, 0, Vec::new());
    for _ in 0..args.reps {
        let (s, m) = single(&one, &seq_one)?;
        t_one.push(s);
        m_one = m;
        t_wide.push(single(&wide, &seq_wide)?.0);
        let (s, m, per_candidate) = fanned()?;
        t_set.push(s);
        m_set = m;
        merge.push(per_candidate);
    }
    let key_bytes = shape.bytes(args.tokens) as f64;
    let config = |name: &str, secs: f64, model_ns: Option<u64>| {
        json!({
            "config": name,
            "step_ms": secs * 1e3,
            "keys_gb_per_s": key_bytes / secs / 1e9,
            "fraction_of_one_core_roofline": key_bytes / secs / 1e9 / read_gbs,
            "modelled_ms": model_ns.map(|m| m as f64 / 1e6),
        })
    };
    let (one_s, wide_s, set_s) = (median(t_one), median(t_wide), median(t_set));
    Ok(json!({
        "benchmark": "device-set fan-out: one Top-K per KV head per step",
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "memory_read_gb_per_s": read_gbs,
        },
        "shape": shape,
        "tokens": args.tokens,
        "k": args.k,
        "reps": args.reps,
        "configs": [
            config("1 device, 1 compute unit", one_s, Some(m_one)),
            config(&format!("1 device, {n} compute units"), wide_s, None),
            config(&format!("{n} devices x 1 compute unit (set)"), set_s, Some(m_set)),
        ],
        "set_speedup_vs_one_unit": one_s / set_s,
        "set_speedup_vs_same_units_one_device": wide_s / set_s,
        "modelled_speedup": m_one as f64 / m_set.max(1) as f64,
        "modelled": "each configuration's modelled device time per step (the cxl-pnm profile), commands one after another; the set's is its slowest module's per command, the merge excluded (measured on this host: merge_ns_per_candidate)",
        "merge_ns_per_candidate": median(merge),
        "note": "the machine's cores bound the emulated set: two devices with one unit each can use at most two cores, like one device with two units; speed-ups above the core count are impossible here",
    }))
}
