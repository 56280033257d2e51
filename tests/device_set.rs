//! A device set against one device holding everything: randomized shapes,
//! dtypes, group sizes, k and append chunking, values with many exact ties;
//! a torn append (one device out of DRAM) resynced and retried; a device
//! that dies mid-fan-out named in the error while the others still answer.

mod common;

use std::time::Duration;

use common::{DeviceProcess, Rng, TempRegion};
use pnm_device::RunningDevice;
use pnm_host::{
    Aggregation, Device, DeviceOptions, DeviceSet, Dtype, Error, KvShape, Query, SetTopkRequest,
    TopkRequest,
};
use pnm_protocol::ReturnCode;

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

fn embedded(size: u64) -> (RunningDevice, Device) {
    let running = RunningDevice::embedded(size, Some(2)).unwrap();
    let device = open_embedded(&running);
    (running, device)
}

fn open_embedded(running: &RunningDevice) -> Device {
    let options = DeviceOptions { socket: running.socket().map(Into::into), ..Default::default() };
    Device::open_with(&running.region().path, &options).unwrap()
}

/// K or V of `tokens` tokens, `[layers][heads][tokens][head_dim]`: coarse
/// values (many exact ties between tokens) or fine ones.
fn rows(rng: &mut Rng, shape: &KvShape, tokens: u64, coarse: bool) -> Vec<f32> {
    let n = shape.layers as u64 * shape.heads as u64 * tokens * shape.head_dim as u64;
    (0..n).map(|_| if coarse { (rng.below(3) as f32 - 1.0) * 0.5 } else { rng.unit() }).collect()
}

/// The tokens `from..to` of every stream of `all` (laid out for `total`).
fn slice_tokens(all: &[u8], shape: &KvShape, total: u64, from: u64, to: u64) -> Vec<u8> {
    let row = shape.row_bytes() as usize;
    let streams = shape.layers as usize * shape.heads as usize;
    let mut out = Vec::with_capacity(streams * (to - from) as usize * row);
    for s in 0..streams {
        let base = s * total as usize;
        out.extend_from_slice(&all[(base + from as usize) * row..(base + to as usize) * row]);
    }
    out
}

#[test]
fn sharded_topk_equals_one_device_holding_everything() {
    let (_reference_device, reference) = embedded(256 << 20);
    let members: Vec<RunningDevice> =
        (0..4).map(|_| RunningDevice::embedded(128 << 20, Some(1)).unwrap()).collect();
    let mut rng = Rng(0x5EED_0F5E);
    for case in 0..64 {
        let devices = 1 + rng.below(4) as usize;
        let dtype = [Dtype::F32, Dtype::F16, Dtype::Bf16][rng.below(3) as usize];
        // Head dims whose pages hold 64..512 tokens, so shards span stripes.
        let head_dim = [64u16, 128, 256][rng.below(3) as usize];
        let shape = KvShape { dtype, layers: 1 + rng.below(2) as u16, heads: 2, head_dim };
        let tpp = pnm_protocol::queue::tokens_per_page(u32::from(head_dim), dtype) as u64;
        let tokens = 1 + rng.below(tpp * devices as u64 * 3);
        let coarse = rng.below(2) == 0;
        let keys = encode(dtype, &rows(&mut rng, &shape, tokens, coarse));
        let values = encode(dtype, &rows(&mut rng, &shape, tokens, false));

        let set = DeviceSet::new(members[..devices].iter().map(open_embedded).collect()).unwrap();
        let mut seq = set.kv_create(shape).unwrap();
        let one = reference.kv_create(shape).unwrap();
        let one = reference.kv_append(&one, &keys, &values, tokens, &mut |_| {}).unwrap();
        // The set loads in random chunks (decode appends one token at a time).
        let mut done = 0;
        while done < tokens {
            let n = (1 + rng.below(tpp * 2)).min(tokens - done);
            let (k, v) = (
                slice_tokens(&keys, &shape, tokens, done, done + n),
                slice_tokens(&values, &shape, tokens, done, done + n),
            );
            seq = set.kv_append(&seq, &k, &v, n).unwrap();
            done += n;
        }
        assert_eq!(seq.tokens, tokens);
        assert!(seq.is_consistent());
        assert_eq!(set.kv_resync(&seq).unwrap(), seq, "the devices agree with the host's view");

        for _ in 0..4 {
            let group = 1 + rng.below(4) as usize;
            let q: Vec<f32> = (0..group * head_dim as usize)
                .map(|_| if coarse { (rng.below(3) as f32 - 1.0) * 0.5 } else { rng.unit() })
                .collect();
            let query = Query::f32(&q, head_dim as usize);
            let k = 1 + rng.below(tokens + 8) as u32;
            let (layer, head) = (rng.below(shape.layers as u64) as u16, rng.below(2) as u16);
            let aggregation = [Aggregation::Max, Aggregation::Mean][rng.below(2) as usize];
            let want = reference
                .topk(&TopkRequest::new(&one, layer, head, &query, k).with_aggregation(aggregation))
                .unwrap();
            let request =
                SetTopkRequest::new(&seq, layer, head, &query, k).with_aggregation(aggregation);
            let (got, rows) = set.topk_gather(&request).unwrap();
            let ctx = format!("case {case}: {devices} devices, {shape}, {tokens} tokens, k {k}");
            assert_eq!(got.top.indices, want.indices, "{ctx}");
            let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.top.scores), bits(&want.scores), "{ctx}");
            assert_eq!(got.top.tokens, tokens);
            assert_eq!(got.top.tokens_scored, tokens, "{ctx}: every token scored once");
            assert_eq!(got.devices.len(), devices);
            // The rows are the written rows of the selected tokens.
            let row = shape.row_bytes() as usize;
            let stream = layer as usize * 2 + head as usize;
            for (i, &t) in got.top.indices.iter().enumerate() {
                let at = (stream * tokens as usize + t as usize) * row;
                assert_eq!(&rows.keys[i * row..][..row], &keys[at..at + row], "{ctx}: K of {t}");
                assert_eq!(&rows.values[i * row..][..row], &values[at..at + row], "{ctx}");
            }
        }
        set.kv_free(&seq).unwrap();
        reference.kv_free(one.id).unwrap();
    }
}

#[test]
fn a_torn_append_is_resynced_and_retried_without_duplicates() {
    let (_a, device_a) = embedded(128 << 20);
    let (_b, device_b) = embedded(64 << 20);
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 128 };
    let tpp = pnm_protocol::queue::tokens_per_page(128, Dtype::F32) as u64;
    // Fill device b's DRAM with another sequence, one page at a time.
    let filler = device_b.kv_create(shape).unwrap();
    let page = vec![0u8; shape.bytes(tpp) as usize];
    let mut filler_seq = filler;
    loop {
        match device_b.kv_append(&filler_seq, &page, &page, tpp, &mut |_| {}) {
            Ok(s) => filler_seq = s,
            Err(Error::Queue { code: ReturnCode::RESOURCES_EXHAUSTED, .. }) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let set = DeviceSet::new(vec![device_a, device_b]).unwrap();
    let seq = set.kv_create(shape).unwrap();
    let mut rng = Rng(7);
    let tokens = tpp * 3 + 5;
    let keys = encode(Dtype::F32, &rows(&mut rng, &shape, tokens, false));
    let values = encode(Dtype::F32, &rows(&mut rng, &shape, tokens, false));

    // Device 1 has no room: the append fails naming it; device 0 committed.
    let err = set.kv_append(&seq, &keys, &values, tokens).unwrap_err();
    match &err {
        Error::Member { device: 1, error, .. } => assert!(
            matches!(**error, Error::Queue { code: ReturnCode::RESOURCES_EXHAUSTED, .. }),
            "{err}"
        ),
        other => panic!("expected device 1's error, got {other}"),
    }
    assert_eq!(err.return_code(), Some(ReturnCode::RESOURCES_EXHAUSTED));
    // The old view no longer matches device 0: Top-K refuses, naming it.
    let query = Query::f32(&[0.5; 128], 128);
    let before = set.kv_resync(&seq).unwrap();
    assert!(!before.is_consistent(), "torn: device 0 holds its part, device 1 nothing");
    assert_eq!(before.tokens, tpp, "stripe 0 is held; stripe 1 (device 1) is not");
    assert_eq!(before.shards[0].tokens, tpp * 2, "device 0 holds stripes 0 and 2");

    // Room again; appending from the resynced end writes only what is
    // missing (device 0 already holds stripe 2).
    set.devices()[1].kv_free(filler_seq.id).unwrap();
    let rest = |all: &[u8]| slice_tokens(all, &shape, tokens, tpp, tokens);
    let seq = set.kv_append(&before, &rest(&keys), &rest(&values), tokens - tpp).unwrap();
    assert!(seq.is_consistent());
    assert_eq!(seq.tokens, tokens);
    assert_eq!(seq.shards[0].tokens, tpp * 2, "nothing appended twice on device 0");
    assert_eq!(seq.shards[1].tokens, tpp + 5);
    let all: Vec<u32> = (0..tokens as u32).collect();
    let rows = set.gather(&seq, 0, 0, &all).unwrap();
    assert_eq!(rows.keys, keys, "every row where it belongs, once");
    assert_eq!(rows.values, values);
    let top = set.topk(&SetTopkRequest::new(&seq, 0, 0, &query, 16)).unwrap();
    assert_eq!(top.top.indices.len(), 16);
}

#[test]
fn a_device_dying_mid_fan_out_is_named_and_the_others_still_answer() {
    let regions = [TempRegion::new("set0"), TempRegion::new("set1")];
    let mut processes: Vec<DeviceProcess> =
        regions.iter().map(|r| DeviceProcess::start(r.path(), &["--size", "64M"])).collect();
    let options = DeviceOptions { command_timeout: Duration::from_secs(1), ..Default::default() };
    let paths: Vec<_> = regions.iter().map(|r| r.path().to_path_buf()).collect();
    let set = DeviceSet::open(&paths, &options).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 2, heads: 2, head_dim: 128 };
    let mut rng = Rng(99);
    let tokens = 3000;
    let keys = encode(Dtype::F16, &rows(&mut rng, &shape, tokens, false));
    let values = encode(Dtype::F16, &rows(&mut rng, &shape, tokens, false));
    let seq = set.kv_create(shape).unwrap();
    let seq = set.kv_append(&seq, &keys, &values, tokens).unwrap();
    let query = Query::f32(&[0.25; 128], 128);
    set.topk(&SetTopkRequest::new(&seq, 1, 1, &query, 64)).unwrap();

    processes[1].freeze();
    let started = std::time::Instant::now();
    let err = set.topk(&SetTopkRequest::new(&seq, 1, 1, &query, 64)).unwrap_err();
    let waited = started.elapsed();
    match &err {
        Error::Member { device: 1, path, error } => {
            assert_eq!(path, &paths[1]);
            assert!(error.device_unresponsive(), "{err}");
        }
        other => panic!("expected device 1 to be named, got {other}"),
    }
    assert!(err.to_string().contains("device 1 of the set"), "{err}");
    assert!(waited < Duration::from_secs(5), "bounded: {waited:?}");
    // Device 0 is untouched: its shard answers, rows intact.
    let d0 = &set.devices()[0];
    let top = d0.topk(&TopkRequest::new(&seq.shards[0], 1, 1, &query, 64)).unwrap();
    assert_eq!(top.tokens, seq.shards[0].tokens);
    processes[1].signal(nix::sys::signal::Signal::SIGKILL);
    let _ = processes[1].wait(Duration::from_secs(5));
}

/// Runs the main job with `args` and its `--json` report.
fn main_job(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxl-pnm"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_main_job_on_a_set_and_tiered_is_exact_and_no_worse_than_top_k_alone() {
    let base = ["--layers", "1", "--kv-heads", "2", "--tokens", "6000", "--steps", "2"];
    let small = [&base[..], &["-k", "256"]].concat();
    // One device: the step's Top-Ks in one batch, timed against the units'
    // busy time (Unit Busy).
    let one = main_job(&small);
    for step in one["steps"].as_array().unwrap() {
        let (step_ms, share) =
            (step["step_ms"].as_f64().unwrap(), step["kernel_share_ms"].as_f64().unwrap());
        assert!(share > 0.0 && step_ms > 0.0, "{step}");
    }
    assert!(one["step_x_kernel_share"].as_f64().unwrap() > 0.0, "{one}");
    assert_eq!(one["mean_recall"], 1.0);
    let set = main_job(&[&small[..], &["--devices", "2"]].concat());
    assert_eq!(set["devices"], 2);
    assert_eq!(set["mean_recall"], 1.0, "exact Top-K across the set");
    let tiered = main_job(&[&small[..], &["--devices", "2", "--hot-window", "512"]].concat());
    assert_eq!(tiered["mean_recall"], 1.0, "the set's Top-K of the evicted part is exact");
    assert_eq!(
        tiered["host_tokens"],
        tiered["context_tokens"].as_u64().unwrap() - tiered["evicted_tokens"].as_u64().unwrap()
    );
    let (err, alone) = (
        tiered["mean_attention_error"].as_f64().unwrap(),
        tiered["mean_topk_only_error"].as_f64().unwrap(),
    );
    assert!(err <= alone, "tiered {err} vs Top-K alone {alone} at the same k");
    assert!(tiered["link_reduction"].as_f64().unwrap() > 1.0);
    // k covering the whole evicted part: tiered attention is full attention.
    let whole = main_job(&[&base[..], &["--hot-window", "512", "-k", "6000"]].concat());
    assert!(whole["mean_attention_error"].as_f64().unwrap() < 1e-5, "{whole}");
    assert!(whole["mean_attention_rel_error"].as_f64().unwrap() < 1e-5, "{whole}");
}

#[test]
fn the_set_benchmark_reports_every_configuration_against_the_roofline() {
    let out = common::run("pnmctl", &["bench", "set", "--tokens", "4096", "--reps", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["machine"]["memory_read_gb_per_s"].as_f64().unwrap() > 0.0);
    let configs = v["configs"].as_array().unwrap();
    assert_eq!(configs.len(), 3);
    for c in configs {
        assert!(c["step_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["fraction_of_one_core_roofline"].as_f64().unwrap() > 0.0, "{c}");
    }
    assert!(v["set_speedup_vs_one_unit"].as_f64().unwrap() > 0.0);
    // Two modules scan half the keys each (at 4096 tokens the fixed
    // per-command costs keep the ratio well below 2).
    assert!(v["modelled_speedup"].as_f64().unwrap() > 1.0, "{v}");
    assert!(v["merge_ns_per_candidate"].as_f64().unwrap() > 0.0);
}
