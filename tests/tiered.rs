//! Tiered KV against host references: with k covering every evicted token
//! the step's attention is full attention; with a smaller k it is the one
//! softmax over the host tokens and exactly the Top-K of the evicted ones;
//! recall returns every written row, wherever it lives.

mod common;

use common::Rng;
use pnm_device::RunningDevice;
use pnm_host::{Device, DeviceOptions, DeviceSet, Dtype, KvShape, TieredKv, TieredOptions};

fn set_of(devices: &[RunningDevice]) -> DeviceSet {
    DeviceSet::new(
        devices
            .iter()
            .map(|d| {
                let options =
                    DeviceOptions { socket: d.socket().map(Into::into), ..Default::default() };
                Device::open_with(&d.region().path, &options).unwrap()
            })
            .collect(),
    )
    .unwrap()
}

/// Reference attention in f64 over explicit rows.
fn attention(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
    let scale = 1.0 / (q.len() as f64).sqrt();
    let logits: Vec<f64> = keys
        .iter()
        .map(|k| q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale)
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut out = vec![0.0; q.len()];
    for (w, v) in w.iter().zip(values) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w / total * f64::from(x);
        }
    }
    out
}

/// Rows of every token, per stream, as f32 (the test keeps the truth).
struct Truth {
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
}

fn append_random(
    tiered: &mut TieredKv<&DeviceSet>,
    truth: &mut Truth,
    rng: &mut Rng,
    tokens: usize,
    coarse: bool,
) {
    let shape = tiered.shape();
    let d = usize::from(shape.head_dim);
    let (mut k_bytes, mut v_bytes) = (Vec::new(), Vec::new());
    for s in 0..truth.keys.len() {
        for _ in 0..tokens {
            let k: Vec<f32> =
                (0..d).map(|_| if coarse { rng.coarse() } else { rng.unit() }).collect();
            let v: Vec<f32> = (0..d).map(|_| rng.unit()).collect();
            k_bytes.extend(k.iter().flat_map(|x| x.to_le_bytes()));
            v_bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            truth.keys[s].push(k);
            truth.values[s].push(v);
        }
    }
    tiered.append(&k_bytes, &v_bytes, tokens as u64).unwrap();
}

#[test]
fn with_k_covering_the_evicted_tokens_a_step_is_full_attention() {
    let devices: Vec<RunningDevice> =
        (0..2).map(|_| RunningDevice::embedded(64 << 20, Some(1)).unwrap()).collect();
    let set = set_of(&devices);
    let shape = KvShape { dtype: Dtype::F32, layers: 2, heads: 2, head_dim: 64 };
    let options = TieredOptions { hot_window: 100, sinks: 4, evict_batch: 50, k: 4096 };
    let mut tiered = TieredKv::new(&set, shape, options).unwrap();
    let mut truth = Truth { keys: vec![Vec::new(); 4], values: vec![Vec::new(); 4] };
    let mut rng = Rng(11);
    append_random(&mut tiered, &mut truth, &mut rng, 1000, false);
    assert_eq!(tiered.tokens(), 1000);
    assert_eq!(tiered.evicted(), 1000 - 4 - 100, "everything past the window and sinks");
    for step in 0..60 {
        append_random(&mut tiered, &mut truth, &mut rng, 1, false);
        // The window stays within [hot_window, hot_window + evict_batch).
        let hot = tiered.host_tokens() - 4;
        assert!((100..150).contains(&hot), "step {step}: {hot} hot tokens");
        let q: Vec<f32> = (0..2 * 64).map(|_| rng.unit() * 3.0).collect();
        let (layer, head) = (step % 2, (step / 2) % 2);
        let stream = usize::from(layer) * 2 + usize::from(head);
        let mut out = vec![0f32; q.len()];
        let stats = tiered.attend(layer, head, &q, &mut out).unwrap();
        assert_eq!(stats.evicted_tokens + stats.host_tokens, tiered.tokens());
        assert_eq!(stats.selected.len() as u64, stats.evicted_tokens, "k covers them all");
        for (g, o) in q.chunks_exact(64).zip(out.chunks_exact(64)) {
            let full = attention(g, &truth.keys[stream], &truth.values[stream]);
            for (a, b) in full.iter().zip(o) {
                assert!((a - f64::from(*b)).abs() < 1e-5, "step {step}: {a} vs {b}");
            }
        }
    }
    tiered.free().unwrap();
}

#[test]
fn with_a_small_k_a_step_is_one_softmax_over_host_tokens_and_the_exact_top_k() {
    let devices: Vec<RunningDevice> =
        (0..3).map(|_| RunningDevice::embedded(64 << 20, Some(1)).unwrap()).collect();
    let set = set_of(&devices);
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 2, head_dim: 32 };
    let options = TieredOptions { hot_window: 64, sinks: 2, evict_batch: 0, k: 40 };
    let mut tiered = TieredKv::new(&set, shape, options).unwrap();
    let mut truth = Truth { keys: vec![Vec::new(); 2], values: vec![Vec::new(); 2] };
    let mut rng = Rng(5);
    append_random(&mut tiered, &mut truth, &mut rng, 3000, true);
    let (sinks, evicted) = (2usize, tiered.evicted() as usize);
    assert!(evicted > 2000);
    for step in 0..20 {
        let q: Vec<f32> = (0..3 * 32).map(|_| rng.coarse()).collect();
        let head = (step % 2) as u16;
        let s = usize::from(head);
        let mut out = vec![0f32; q.len()];
        let stats = tiered.attend(0, head, &q, &mut out).unwrap();
        // The exact Top-K of the evicted tokens by the group's max score,
        // ties to the lower index (scores are exact: multiples of 0.25).
        let mut scored: Vec<(f32, u32)> = (sinks..sinks + evicted)
            .map(|t| {
                let best = q
                    .chunks_exact(32)
                    .map(|g| g.iter().zip(&truth.keys[s][t]).map(|(a, b)| a * b).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max);
                (best, t as u32)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let want: Vec<u32> = scored[..40].iter().map(|x| x.1).collect();
        assert_eq!(stats.selected, want, "step {step}");
        // One softmax over sinks, window and the selected rows.
        let mut rows: Vec<usize> = (0..sinks).collect();
        rows.extend(want.iter().map(|&t| t as usize));
        rows.extend(sinks + evicted..tiered.tokens() as usize);
        let keys: Vec<Vec<f32>> = rows.iter().map(|&t| truth.keys[s][t].clone()).collect();
        let values: Vec<Vec<f32>> = rows.iter().map(|&t| truth.values[s][t].clone()).collect();
        for (g, o) in q.chunks_exact(32).zip(out.chunks_exact(32)) {
            let want = attention(g, &keys, &values);
            for (a, b) in want.iter().zip(o) {
                assert!((a - f64::from(*b)).abs() < 1e-5, "step {step}: {a} vs {b}");
            }
        }
        assert!(stats.link_bytes < 2 * 40 * 128 + 3 * 2048, "k rows, not the evicted part");
    }
    // Recall: every range, across sinks, evicted and window, bit for bit.
    let total = tiered.tokens();
    for (from, to) in [(0, total), (0, 1), (1, 3), (2, 900), (1500, total), (total - 10, total)] {
        for head in 0..2u16 {
            let (k, v) = tiered.recall(0, head, from, to).unwrap();
            let s = usize::from(head);
            let want_k: Vec<u8> = (from..to)
                .flat_map(|t| truth.keys[s][t as usize].iter().flat_map(|x| x.to_le_bytes()))
                .collect();
            let want_v: Vec<u8> = (from..to)
                .flat_map(|t| truth.values[s][t as usize].iter().flat_map(|x| x.to_le_bytes()))
                .collect();
            assert!(k == want_k && v == want_v, "recall {from}..{to} head {head}");
        }
    }
    assert!(tiered.recall(0, 0, 5, total + 1).is_err());
    assert!(tiered.attend(1, 0, &[0.0; 32], &mut [0.0; 32]).is_err());
    tiered.free().unwrap();
}

#[test]
fn an_eviction_that_fails_midway_loses_nothing_and_completes_on_retry() {
    let devices: Vec<RunningDevice> = vec![
        RunningDevice::embedded(64 << 20, Some(1)).unwrap(),
        RunningDevice::embedded(64 << 20, Some(1)).unwrap(),
    ];
    let set = set_of(&devices);
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 128 };
    // Fill device 1 with another sequence so the eviction fails there.
    let d1 = &set.devices()[1];
    let filler = d1.kv_create(shape).unwrap();
    let page = vec![0u8; shape.bytes(128) as usize];
    let mut filler_seq = filler;
    while let Ok(s) = d1.kv_append(&filler_seq, &page, &page, 128, &mut |_| {}) {
        filler_seq = s;
    }
    let options = TieredOptions { hot_window: 64, sinks: 0, evict_batch: 0, k: 8192 };
    let mut tiered = TieredKv::new(&set, shape, options).unwrap();
    let mut truth = Truth { keys: vec![Vec::new()], values: vec![Vec::new()] };
    let mut rng = Rng(3);
    // 600 tokens: evicting 536 needs pages on both devices; device 1 refuses.
    let (mut k_bytes, mut v_bytes) = (Vec::new(), Vec::new());
    for _ in 0..600 {
        let k: Vec<f32> = (0..128).map(|_| rng.unit()).collect();
        let v: Vec<f32> = (0..128).map(|_| rng.unit()).collect();
        k_bytes.extend(k.iter().flat_map(|x| x.to_le_bytes()));
        v_bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        truth.keys[0].push(k);
        truth.values[0].push(v);
    }
    assert!(tiered.append(&k_bytes, &v_bytes, 600).is_err(), "device 1 is full");
    assert_eq!(tiered.tokens(), 600, "the tokens are held either way");
    assert!(tiered.evicted() < 536, "only what every shard holds left the window");
    let q: Vec<f32> = (0..128).map(|_| rng.unit()).collect();
    let mut out = vec![0f32; 128];
    assert!(tiered.attend(0, 0, &q, &mut out).is_err(), "no answer from a torn eviction");
    // Every row is still readable, from wherever it is.
    let (k, _) = tiered.recall(0, 0, 0, 600).unwrap();
    assert_eq!(k, k_bytes);

    set.devices()[1].kv_free(filler_seq.id).unwrap();
    tiered.retry_eviction().unwrap();
    assert_eq!(tiered.evicted(), 536);
    let stats = tiered.attend(0, 0, &q, &mut out).unwrap();
    assert_eq!(stats.selected.len(), 536);
    let full = attention(&q, &truth.keys[0], &truth.values[0]);
    for (a, b) in full.iter().zip(&out) {
        assert!((a - f64::from(*b)).abs() < 1e-5, "{a} vs {b}: nothing lost, nothing twice");
    }
    let (k, v) = tiered.recall(0, 0, 0, 600).unwrap();
    assert!(k == k_bytes && v == v_bytes);
    tiered.free().unwrap();
}
