//! The KV Top-K data path through a separate `pnm-device` process:
//! results against an independent reference, many commands in flight,
//! malformed descriptors, DRAM exhaustion, freeing and reuse, restarts.

mod common;

use std::collections::BTreeSet;

use common::{DeviceProcess, TempRegion};
use pnm_host::{Device, Dtype, Error, KvShape, Query, Sequence, TopkRequest};
use pnm_protocol::ReturnCode;
use pnm_protocol::queue::{QueueOpcode, SubmissionEntry, TopkLayout};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| half_bits_f16(v).to_le_bytes()).collect(),
        Dtype::Bf16 => values
            .iter()
            .map(|&v| ((v.to_bits() + 0x7FFF + ((v.to_bits() >> 16) & 1)) >> 16) as u16)
            .flat_map(|b| b.to_le_bytes())
            .collect(),
    }
}

/// f32 -> IEEE half, round to nearest even (finite inputs in [-1, 1]).
fn half_bits_f16(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = v.abs();
    if a < 6.103_515_6e-5 {
        // Subnormal half: units of 2^-24.
        return sign | (a * 16_777_216.0).round_ties_even() as u16;
    }
    let exp = ((bits >> 23) & 0xFF) as i32 - 127 + 15;
    let mant = bits & 0x7F_FFFF;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1FFF;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        }
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| {
                let h = u16::from_le_bytes([c[0], c[1]]);
                let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
                let exp = i32::from((h >> 10) & 0x1F);
                let mant = f32::from(h & 0x3FF);
                sign * if exp == 0 {
                    mant * 2f32.powi(-24)
                } else {
                    (1.0 + mant / 1024.0) * 2f32.powi(exp - 15)
                }
            })
            .collect(),
    }
}

/// A loaded sequence and its rows as stored, [layers][heads][tokens][d].
struct Loaded {
    seq: Sequence,
    keys: Vec<u8>,
    values: Vec<u8>,
}

fn load(dev: &Device, shape: KvShape, tokens: u64, seed: u64) -> Loaded {
    let mut rng = Rng(seed | 1);
    let n = shape.bytes(tokens) as usize / shape.dtype.size();
    let k: Vec<f32> = (0..n).map(|_| rng.next()).collect();
    let v: Vec<f32> = (0..n).map(|_| rng.next()).collect();
    let (keys, values) = (encode(shape.dtype, &k), encode(shape.dtype, &v));
    let seq = dev.kv_create(shape).unwrap();
    let seq = dev.kv_append(&seq, &keys, &values, tokens, &mut |_| {}).unwrap();
    assert_eq!(seq.tokens, tokens);
    Loaded { seq, keys, values }
}

fn rows(l: &Loaded, layer: u16, head: u16) -> (Vec<f32>, usize) {
    let s = l.seq.shape;
    let row = s.row_bytes() as usize;
    let stream = (usize::from(layer) * usize::from(s.heads) + usize::from(head))
        * l.seq.tokens as usize
        * row;
    (
        decode(s.dtype, &l.keys[stream..stream + l.seq.tokens as usize * row]),
        usize::from(s.head_dim),
    )
}

/// Exact Top-K by the documented order (max over the group), in f64.
fn reference(l: &Loaded, layer: u16, head: u16, queries: &[f32], k: usize) -> Vec<(u32, f64)> {
    let (keys, d) = rows(l, layer, head);
    let mut scored: Vec<(u32, f64)> = keys
        .chunks(d)
        .enumerate()
        .map(|(t, key)| {
            let best = queries
                .chunks(d)
                .map(|q| q.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>())
                .fold(f64::NEG_INFINITY, f64::max);
            (t as u32, best)
        })
        .collect();
    scored.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

fn assert_topk_matches(got: &pnm_host::TopK, want: &[(u32, f64)]) {
    assert_eq!(got.indices.len(), want.len());
    let kth = want.last().unwrap().1;
    let got_set: BTreeSet<u32> = got.indices.iter().copied().collect();
    for (i, (&idx, &score)) in got.indices.iter().zip(&got.scores).enumerate() {
        assert!(
            (f64::from(score) - want[i].1).abs() < 1e-4,
            "rank {i}: {idx} {score} vs {:?}",
            want[i]
        );
    }
    for w in want {
        assert!(got_set.contains(&w.0) || (w.1 - kth).abs() < 1e-4, "missing {w:?}");
    }
}

#[test]
fn topk_and_gather_match_the_reference_for_every_dtype_and_group() {
    let region = TempRegion::new("dp");
    let _device = DeviceProcess::start(region.path(), &["--size", "256MiB"]);
    let dev = Device::open(region.path()).unwrap();
    for (i, dtype) in Dtype::ALL.into_iter().enumerate() {
        let shape = KvShape { dtype, layers: 2, heads: 3, head_dim: 64 };
        let loaded = load(&dev, shape, 3000 + 77 * i as u64, 11 + i as u64);
        let mut rng = Rng(99 + i as u64);
        for group in [1u32, 2, 4, 8] {
            let q: Vec<f32> = (0..group as usize * 64).map(|_| rng.next()).collect();
            for k in [1u32, 17, 256] {
                let (layer, head) = ((group % 2) as u16, (k % 3) as u16);
                let got = dev
                    .topk(&TopkRequest::new(&loaded.seq, layer, head, &Query::f32(&q, 64), k))
                    .unwrap();
                assert_eq!(got.tokens, loaded.seq.tokens);
                assert_topk_matches(&got, &reference(&loaded, layer, head, &q, k as usize));

                let (fused, rows) = dev
                    .topk_gather(&TopkRequest::new(
                        &loaded.seq,
                        layer,
                        head,
                        &Query::f32(&q, 64),
                        k,
                    ))
                    .unwrap();
                assert_eq!(fused.indices, got.indices, "fused TOPK selects the same tokens");
                let gathered = dev.gather(&loaded.seq, layer, head, &got.indices).unwrap();
                assert_eq!(gathered.keys, rows.keys);
                assert_eq!(gathered.values, rows.values);
                let row = shape.row_bytes() as usize;
                let stream =
                    (usize::from(layer) * 3 + usize::from(head)) * loaded.seq.tokens as usize * row;
                for (j, &t) in got.indices.iter().enumerate() {
                    let at = stream + t as usize * row;
                    assert_eq!(&rows.keys[j * row..(j + 1) * row], &loaded.keys[at..at + row]);
                    assert_eq!(&rows.values[j * row..(j + 1) * row], &loaded.values[at..at + row]);
                }
            }
        }
        // k larger than the sequence: every token, best first.
        let q: Vec<f32> = (0..64).map(|_| rng.next()).collect();
        let all =
            dev.topk(&TopkRequest::new(&loaded.seq, 1, 2, &Query::f32(&q, 64), 8192)).unwrap();
        assert_eq!(all.indices.len() as u64, loaded.seq.tokens);
        dev.kv_free(loaded.seq.id).unwrap();
    }
}

/// A decode step's every (layer, KV head) Top-K+gather in one batch: each
/// answer is the reference's, with the stored rows; a bad request fails
/// alone; the units' busy time (Unit Busy) grows by the batch's work.
#[test]
fn a_gather_batch_answers_every_request_and_the_units_count_their_work() {
    let region = TempRegion::new("dpbatch");
    let _device =
        DeviceProcess::start(region.path(), &["--size", "256MiB", "--compute-units", "2"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 2, heads: 4, head_dim: 128 };
    let loaded = load(&dev, shape, 20_000, 5);
    let mut rng = Rng(21);
    let queries: Vec<Vec<f32>> =
        (0..8).map(|_| (0..4 * 128).map(|_| rng.next()).collect()).collect();
    let wire: Vec<Query> = queries.iter().map(|q| Query::f32(q, 128)).collect();
    let mut requests: Vec<TopkRequest<'_>> = (0..8)
        .map(|i| {
            TopkRequest::new(&loaded.seq, (i / 4) as u16, (i % 4) as u16, &wire[i], 64 + i as u32)
        })
        .collect();
    // One request out of range: it alone fails.
    requests.push(TopkRequest::new(&loaded.seq, 7, 0, &wire[0], 8));
    let busy_before = dev.status().unit_busy_ns;
    let start = std::time::Instant::now();
    let answers = dev.topk_gather_batch(&requests).unwrap();
    let wall = start.elapsed().as_nanos() as u64;
    let busy = dev.status().unit_busy_ns - busy_before;
    assert_eq!(answers.len(), 9);
    let row = shape.row_bytes() as usize;
    for (i, answer) in answers.iter().take(8).enumerate() {
        let (top, rows) = answer.as_ref().unwrap();
        let (layer, head) = ((i / 4) as u16, (i % 4) as u16);
        assert_topk_matches(top, &reference(&loaded, layer, head, &queries[i], 64 + i));
        let stream = (usize::from(layer) * 4 + usize::from(head)) * 20_000 * row;
        for (j, &t) in top.indices.iter().enumerate() {
            let at = stream + t as usize * row;
            assert_eq!(&rows.keys[j * row..(j + 1) * row], &loaded.keys[at..at + row]);
            assert_eq!(&rows.values[j * row..(j + 1) * row], &loaded.values[at..at + row]);
        }
    }
    assert!(answers[8].is_err(), "layer 7 of 2");
    // Two units cannot be busy for longer than twice the batch took.
    assert!(busy > 0 && busy <= 2 * wall, "units busy {busy} ns in a batch of {wall} ns");
    // One command alone: its units' time is its wall time on each of the
    // (at most two) units it ran on, as the device counts it.
    let busy_before = dev.status().unit_busy_ns;
    let (top, _) = dev.topk_gather(&requests[0]).unwrap();
    let busy = dev.status().unit_busy_ns - busy_before;
    let wall = top.device_ns;
    assert!(
        busy >= wall / 2 && busy <= 2 * wall + 200_000,
        "units busy {busy} ns, command {wall} ns"
    );
    dev.kv_free(loaded.seq.id).unwrap();
}

#[test]
fn many_commands_in_flight_each_completion_matched_once() {
    let region = TempRegion::new("flight");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 32 };
    let loaded = load(&dev, shape, 1500, 5);
    let mut rng = Rng(1234);
    // More requests than the queue has entries, some of them malformed.
    let queries: Vec<Query> = (0..700)
        .map(|_| Query::f32(&(0..32).map(|_| rng.next()).collect::<Vec<f32>>(), 32))
        .collect();
    let requests: Vec<TopkRequest> = queries
        .iter()
        .enumerate()
        .map(|(i, query)| TopkRequest {
            layer: if i % 97 == 0 { 5 } else { 0 },
            ..TopkRequest::new(&loaded.seq, 0, (i % 2) as u16, query, 1 + (i % 40) as u32)
        })
        .collect();
    let answers = dev.topk_batch(&requests).unwrap();
    assert_eq!(answers.len(), requests.len());
    for (r, a) in requests.iter().zip(&answers) {
        let q: Vec<f32> =
            r.query.data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        match a {
            Ok(top) => {
                assert_topk_matches(top, &reference(&loaded, r.layer, r.head, &q, r.k as usize))
            }
            Err(e) => {
                assert_eq!(r.layer, 5, "only the bad-layer requests fail: {e}");
                assert_eq!(e.return_code(), Some(ReturnCode::INVALID_INPUT));
            }
        }
    }
}

#[test]
fn malformed_descriptors_get_error_statuses_and_the_device_keeps_serving() {
    let region = TempRegion::new("malformed");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 16 };
    let loaded = load(&dev, shape, 100, 3);
    let layout = dev.layout();
    let query = dev.dma_buffer(&[0u8; 64], 0).unwrap();
    let out = dev.dma_buffer(&[], TopkLayout { k: 8, row_bytes: 64 }.len()).unwrap();
    let sentinel = dev.dma_buffer(&[0xA5; 4096], 0).unwrap();
    let topk = |f: &dyn Fn(&mut SubmissionEntry)| {
        let mut e = SubmissionEntry { opcode: QueueOpcode::TOPK_GATHER, ..Default::default() };
        e.seq = loaded.seq.id.into();
        e.count = 8.into();
        e.arg0 = 1.into();
        e.buf0_addr = query.addr.into();
        e.buf0_len = 64.into();
        e.buf1_addr = out.addr.into();
        e.buf1_len = (out.len as u32).into();
        f(&mut e);
        e
    };
    let cases: Vec<(SubmissionEntry, ReturnCode)> = vec![
        (topk(&|_| {}), ReturnCode::SUCCESS),
        (topk(&|e| e.opcode = QueueOpcode(0x7F)), ReturnCode::UNSUPPORTED),
        (topk(&|e| e.seq = 424242.into()), ReturnCode::INVALID_HANDLE),
        (topk(&|e| e.layer = 1.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.head = 9.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.count = 0.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.count = 100_000.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.arg0 = 0.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.arg0 = 9.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.arg1 = 7.into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.arg1 = (3 << 8).into()), ReturnCode::INVALID_INPUT),
        (topk(&|e| e.buf0_len = 60.into()), ReturnCode::INVALID_PAYLOAD_LENGTH),
        (topk(&|e| e.buf1_len = 100.into()), ReturnCode::INVALID_PAYLOAD_LENGTH),
        // Buffers outside the host DMA window: registers, device DRAM, past the end, wrapping.
        (topk(&|e| e.buf0_addr = 0x1000.into()), ReturnCode::INVALID_PHYSICAL_ADDRESS),
        (topk(&|e| e.buf1_addr = layout.dram_offset.into()), ReturnCode::INVALID_PHYSICAL_ADDRESS),
        (
            topk(&|e| e.buf1_addr = (layout.dram_offset - 64).into()),
            ReturnCode::INVALID_PHYSICAL_ADDRESS,
        ),
        (topk(&|e| e.buf1_addr = (u64::MAX - 8).into()), ReturnCode::INVALID_PHYSICAL_ADDRESS),
        (
            {
                let mut e = SubmissionEntry { opcode: QueueOpcode::GATHER, ..Default::default() };
                e.seq = loaded.seq.id.into();
                e.count = 1.into();
                e.buf0_addr = query.addr.into(); // index 0: fine
                e.buf0_len = 4.into();
                e.buf1_addr = out.addr.into();
                e.buf1_len = 16.into(); // needs 2 rows of 64 bytes
                e
            },
            ReturnCode::INVALID_PAYLOAD_LENGTH,
        ),
        (
            {
                let mut e =
                    SubmissionEntry { opcode: QueueOpcode::KV_CREATE, ..Default::default() };
                e.layer = 1.into();
                e.head = 1.into();
                e.arg0 = 300.into();
                e
            },
            ReturnCode::INVALID_INPUT,
        ),
        (
            {
                let mut e =
                    SubmissionEntry { opcode: QueueOpcode::KV_COMMIT, ..Default::default() };
                e.seq = loaded.seq.id.into();
                e.count = 101.into();
                e
            },
            ReturnCode::INVALID_INPUT,
        ),
        (SubmissionEntry { opcode: QueueOpcode::NOP, ..Default::default() }, ReturnCode::SUCCESS),
    ];
    let entries: Vec<SubmissionEntry> = cases.iter().map(|(e, _)| *e).collect();
    let completions = dev.submit_raw(&entries).unwrap();
    for (i, ((_, want), got)) in cases.iter().zip(&completions).enumerate() {
        assert_eq!(got.code, *want, "case {i}");
    }
    // An index beyond the sequence: refused before any row moves.
    let bad_index = dev.dma_buffer(&[0, 0, 0, 0, 200, 0, 0, 0], 0).unwrap();
    let before = dev.read_dma(&out);
    let mut e = SubmissionEntry { opcode: QueueOpcode::GATHER, ..Default::default() };
    e.seq = loaded.seq.id.into();
    e.count = 2.into();
    e.buf0_addr = bad_index.addr.into();
    e.buf0_len = 8.into();
    e.buf1_addr = out.addr.into();
    e.buf1_len = (out.len as u32).into();
    assert_eq!(dev.submit_raw(&[e]).unwrap()[0].code, ReturnCode::INVALID_INPUT);
    assert_eq!(dev.read_dma(&out), before, "nothing written on refusal");
    assert!(dev.read_dma(&sentinel).iter().all(|&b| b == 0xA5), "neighbouring buffer untouched");
    assert_eq!(dev.kv_sequence(loaded.seq.id).unwrap().tokens, 100, "store unchanged");
    assert!(dev.nop().is_ok());
    assert!(dev.identify().is_ok());
}

#[test]
fn dram_exhaustion_is_an_error_that_overwrites_nothing_and_freed_pages_are_reused() {
    let region = TempRegion::new("full");
    let _device = DeviceProcess::start(region.path(), &["--size", "16MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 256 };
    let first = load(&dev, shape, 2000, 21);
    let q: Vec<f32> = (0..256).map(|i| (i as f32).sin()).collect();
    let before = dev.topk(&TopkRequest::new(&first.seq, 0, 0, &Query::f32(&q, 256), 50)).unwrap();

    let big = 100_000u64;
    let zeros = vec![0u8; shape.bytes(big) as usize];
    let seq = dev.kv_create(shape).unwrap();
    match dev.kv_append(&seq, &zeros, &zeros, big, &mut |_| {}) {
        Err(e) => assert_eq!(e.return_code(), Some(ReturnCode::RESOURCES_EXHAUSTED), "{e}"),
        Ok(_) => panic!("a 16 MiB device cannot hold 200 MB of KV"),
    }
    let after = dev.topk(&TopkRequest::new(&first.seq, 0, 0, &Query::f32(&q, 256), 50)).unwrap();
    assert_eq!(after.indices, before.indices, "existing data intact");
    assert_eq!(after.scores, before.scores);

    // Free the partial sequence and the first; the space comes back.
    let partial = dev.kv_sequence(seq.id).unwrap();
    assert!(partial.tokens < big, "only whole committed chunks count");
    dev.kv_free(seq.id).unwrap();
    dev.kv_free(first.seq.id).unwrap();
    assert!(matches!(
        dev.kv_free(first.seq.id),
        Err(Error::Queue { code: ReturnCode::INVALID_HANDLE, .. })
    ));
    let again = load(&dev, shape, 5000, 22);
    assert_eq!(dev.kv_list().unwrap().iter().map(|s| s.id).collect::<Vec<_>>(), [again.seq.id]);
}

#[test]
fn the_store_outlives_the_host_and_the_device_process() {
    let region = TempRegion::new("persist");
    let mut device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let shape = KvShape { dtype: Dtype::Bf16, layers: 2, heads: 2, head_dim: 128 };
    let q: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).cos()).collect();
    let (id, before) = {
        let dev = Device::open(region.path()).unwrap();
        let loaded = load(&dev, shape, 1234, 8);
        (
            loaded.seq.id,
            dev.topk(&TopkRequest::new(&loaded.seq, 1, 1, &Query::f32(&q, 128), 33)).unwrap(),
        )
    };
    // Another host process's view: a new driver instance.
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.kv_sequence(id).unwrap().tokens, 1234);
    drop(dev);
    assert_eq!(device.stop(), Some(0));
    let _device = DeviceProcess::start(region.path(), &[]);
    let dev = Device::open(region.path()).unwrap();
    let seq = dev.kv_sequence(id).unwrap();
    assert_eq!((seq.tokens, seq.shape), (1234, shape));
    let after = dev.topk(&TopkRequest::new(&seq, 1, 1, &Query::f32(&q, 128), 33)).unwrap();
    assert_eq!((after.indices, after.scores), (before.indices, before.scores));
}

#[test]
fn long_appends_pipeline_in_chunks_and_sequences_grow_a_token_at_a_time() {
    let region = TempRegion::new("grow");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 32 };
    // Several KV_APPEND chunks in one call.
    let mut loaded = load(&dev, shape, 20_000, 77);
    // Then single tokens, as decode appends them.
    let mut rng = Rng(4242);
    for _ in 0..5 {
        let t = loaded.seq.tokens as usize;
        let row = shape.row_bytes() as usize;
        let (k, v): (Vec<f32>, Vec<f32>) = (0..64).map(|_| (rng.next() * 3.0, rng.next())).unzip();
        let (k, v) = (encode(Dtype::F16, &k), encode(Dtype::F16, &v));
        loaded.seq = dev.kv_append(&loaded.seq, &k, &v, 1, &mut |_| {}).unwrap();
        // Rebuild the [heads][tokens][d] host copy with the new token.
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for h in 0..2 {
            keys.extend_from_slice(&loaded.keys[h * t * row..(h + 1) * t * row]);
            keys.extend_from_slice(&k[h * row..(h + 1) * row]);
            values.extend_from_slice(&loaded.values[h * t * row..(h + 1) * t * row]);
            values.extend_from_slice(&v[h * row..(h + 1) * row]);
        }
        loaded.keys = keys;
        loaded.values = values;
    }
    assert_eq!(loaded.seq.tokens, 20_005);
    let q: Vec<f32> = (0..32).map(|_| rng.next()).collect();
    for head in 0..2 {
        let got =
            dev.topk(&TopkRequest::new(&loaded.seq, 0, head, &Query::f32(&q, 32), 300)).unwrap();
        assert_topk_matches(&got, &reference(&loaded, 0, head, &q, 300));
        let last = dev.gather(&loaded.seq, 0, head, &[20_004, 0, 8191, 8192]).unwrap();
        let row = shape.row_bytes() as usize;
        let stream = usize::from(head) * 20_005 * row;
        for (j, t) in [20_004usize, 0, 8191, 8192].into_iter().enumerate() {
            assert_eq!(
                &last.keys[j * row..(j + 1) * row],
                &loaded.keys[stream + t * row..stream + (t + 1) * row]
            );
            assert_eq!(
                &last.values[j * row..(j + 1) * row],
                &loaded.values[stream + t * row..stream + (t + 1) * row]
            );
        }
    }
}

#[test]
fn page_selection_through_the_device() {
    let region = TempRegion::new("quest");
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    let loaded = load(&dev, shape, 6000, 17);
    let q: Vec<f32> = (0..64).map(|i| ((i * 5) as f32).cos()).collect();
    let query = Query::f32(&q, 64);
    let mut rows = pnm_host::Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
    let exact = dev.topk(&TopkRequest::new(&loaded.seq, 0, 0, &query, 40)).unwrap();
    assert_eq!(exact.tokens_scored, 6000);
    let run = |budget: u32, rows: &mut pnm_host::Rows| {
        let sel = pnm_host::PageSelection { budget_tokens: budget, sink_pages: 1, recent_pages: 1 };
        dev.topk_gather_into(
            &TopkRequest::new(&loaded.seq, 0, 0, &query, 40).with_selection(sel),
            rows,
        )
    };
    // A budget covering the sequence is the exact answer.
    let full = run(6000, &mut rows).unwrap();
    assert_eq!((full.indices, full.tokens_scored), (exact.indices.clone(), 6000));
    // A small budget scores at most that many tokens, in whole pages.
    let some = run(1500, &mut rows).unwrap();
    let tpp = u64::from(loaded.seq.tokens_per_page);
    assert!(some.tokens_scored <= 1500 && some.tokens_scored % tpp <= 6000 % tpp);
    assert_eq!(rows.keys.len(), 40 * 128);
    // Unknown flags are refused.
    let buf = dev.dma_buffer(&[0u8; 256], 0).unwrap();
    let out = dev.dma_buffer(&[], 40 * 8).unwrap();
    let mut e = SubmissionEntry { opcode: QueueOpcode::TOPK, flags: 0x80, ..Default::default() };
    e.seq = loaded.seq.id.into();
    e.count = 40.into();
    e.arg0 = 1.into();
    e.buf0_addr = buf.addr.into();
    e.buf0_len = 256.into();
    e.buf1_addr = out.addr.into();
    e.buf1_len = (out.len as u32).into();
    assert_eq!(dev.submit_raw(&[e]).unwrap()[0].code, ReturnCode::INVALID_INPUT);
}

/// Every completion carries the time the device's timing profile gives for
/// exactly that command (checked against the firmware model's arithmetic),
/// and a device refuses a profile it cannot use.
#[test]
fn completions_carry_the_modelled_time_of_the_devices_profile() {
    use pnm_firmware::timing::{HardwareProfile, Work, command_ns};
    let region = TempRegion::new("model");
    let profile_path = region.path().with_extension("toml");
    let profile_text = r#"
        name = "round"
        description = "round numbers for the test"
        internal_bandwidth_gb_per_s = 100.0
        compute_gflop_per_s = 50.0
        compute_units = 2
        link_bandwidth_gb_per_s = 10.0
        link_latency_ns = 300.0
        command_overhead_ns = 700.0
    "#;
    std::fs::write(&profile_path, profile_text).unwrap();
    let profile = HardwareProfile::from_toml(profile_text).unwrap();
    let _device = DeviceProcess::start(
        region.path(),
        &["--size", "64MiB", "--profile", profile_path.to_str().unwrap()],
    );
    let dev = Device::open(region.path()).unwrap();
    assert_eq!(dev.nop().unwrap().model_ns, 700);
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    let l = load(&dev, shape, 5000, 11);
    let queries: Vec<f32> = (0..2 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
    let query = Query::f32(&queries, 64);
    let want = |tokens: u64, gathered: u64| {
        let work = Work::TopK { tokens, head_dim: 64, elem_bytes: 2, group: 2, k: 10, gathered };
        command_ns(&profile, work) as u64
    };
    let top = dev.topk(&TopkRequest::new(&l.seq, 0, 0, &query, 10)).unwrap();
    assert_eq!(top.model_ns, want(5000, 0));
    let mut rows = pnm_host::Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
    let selection = pnm_host::PageSelection { budget_tokens: 1024, sink_pages: 1, recent_pages: 1 };
    let top = dev
        .topk_gather_into(
            &TopkRequest::new(&l.seq, 0, 0, &query, 10).with_selection(selection),
            &mut rows,
        )
        .unwrap();
    assert!(top.tokens_scored < 5000);
    assert_eq!(top.model_ns, want(top.tokens_scored, 10), "the model charges only the keys read");
    drop(dev);
    std::fs::remove_file(&profile_path).unwrap();

    // A profile the device cannot use stops it at start, with the reason.
    let out =
        common::run("pnm-device", &["--path", "/dev/shm/never-created", "--profile", "warp-drive"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warp-drive"));
}

/// A long sequence is split across compute units; the merged answer must be
/// the single unit's, token for token and score for score, including fused
/// rows, and with many split commands in flight at once.
#[test]
fn topk_split_across_compute_units_equals_one_unit() {
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 64 };
    let tokens = 40_000;
    let answers = |units: &str| {
        let region = TempRegion::new(&format!("split{units}"));
        let _device =
            DeviceProcess::start(region.path(), &["--size", "128MiB", "--compute-units", units]);
        let dev = Device::open(region.path()).unwrap();
        let loaded = load(&dev, shape, tokens, 5);
        let mut rng = Rng(17);
        let mut out = Vec::new();
        let mut wanted = Vec::new();
        for (group, k) in [(1u32, 1u32), (1, 64), (4, 2048), (8, 8192), (2, 777)] {
            let q: Vec<f32> = (0..group as usize * 64).map(|_| rng.next()).collect();
            let (fused, rows) = dev
                .topk_gather(&TopkRequest::new(&loaded.seq, 0, 1, &Query::f32(&q, 64), k))
                .unwrap();
            assert_topk_matches(&fused, &reference(&loaded, 0, 1, &q, k as usize));
            out.push((
                fused.indices,
                fused.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                rows,
            ));
            wanted.push((Query::f32(&q, 64), k));
        }
        let requests: Vec<TopkRequest> = wanted
            .iter()
            .map(|(query, k)| TopkRequest::new(&loaded.seq, 0, 0, query, *k))
            .collect();
        // Many in flight: every answer is the one a lone command gets.
        let batch: Vec<_> = requests.iter().cycle().take(40).copied().collect();
        for (r, got) in batch.iter().zip(dev.topk_batch(&batch).unwrap()) {
            let alone = dev.topk(r).unwrap();
            assert_eq!(got.unwrap().indices, alone.indices);
        }
        out
    };
    assert_eq!(answers("1"), answers("3"));
}

/// A high-priority queue's Top-K overtakes a flood of Top-Ks already
/// waiting from a normal queue, and the flood still completes in full.
#[test]
fn high_priority_queue_overtakes_a_queued_flood() {
    let region = TempRegion::new("prio");
    let _device =
        DeviceProcess::start(region.path(), &["--size", "128MiB", "--compute-units", "1"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 128 };
    let loaded = load(&dev, shape, 32768, 23);
    let q: Vec<f32> = (0..128).map(|i| (i % 5) as f32 - 2.0).collect();
    // Long next to the head start below even on a fast machine (a 16 MiB
    // scan from cache takes 0.3 ms here).
    let query = Query::f32(&q, 128);
    let flood = vec![TopkRequest::new(&loaded.seq, 0, 0, &query, 64); 160];
    let normal = dev.handle(pnm_host::QueueOptions::default()).unwrap();
    let high =
        dev.handle(pnm_host::QueueOptions { high_priority: true, ..Default::default() }).unwrap();
    let alone = high.topk(&TopkRequest::new(&loaded.seq, 0, 0, &Query::f32(&q, 128), 64)).unwrap();
    let start = std::time::Instant::now();
    let (flood_done, high_done) = std::thread::scope(|s| {
        let flooding = s.spawn(|| {
            let answers = normal.topk_batch(&flood).unwrap();
            assert!(answers.iter().all(|a| a.as_ref().unwrap().indices == alone.indices));
            start.elapsed()
        });
        // Let the flood reach the device's compute-unit queue first.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let got =
            high.topk(&TopkRequest::new(&loaded.seq, 0, 0, &Query::f32(&q, 128), 64)).unwrap();
        assert_eq!(got.indices, alone.indices);
        let high_done = start.elapsed();
        (flooding.join().unwrap(), high_done)
    });
    // Served after at most the job running and a few more, not the 160.
    assert!(
        high_done.as_secs_f64() < 0.5 * flood_done.as_secs_f64(),
        "high priority done at {high_done:?}, the flood at {flood_done:?}"
    );
}

/// TOPK_GATHER read in place: the same rows as the copying form, and each
/// view's DMA buffer returns to the pool when it is dropped.
#[test]
fn gathered_rows_read_in_place_match_and_views_free_their_buffers() {
    let region = TempRegion::new("view");
    // A 64 MiB region has an 8 MiB DMA window: leaked 1 MiB result buffers
    // would run it dry within a few dozen views.
    let _device = DeviceProcess::start(region.path(), &["--size", "64MiB"]);
    let dev = Device::open(region.path()).unwrap();
    let shape = KvShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 128 };
    let loaded = load(&dev, shape, 4096, 31);
    let q: Vec<f32> = (0..128).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
    let query = Query::f32(&q, 128);
    let (fused, rows) =
        dev.topk_gather(&TopkRequest::new(&loaded.seq, 0, 0, &query, 2048)).unwrap();
    for _ in 0..200 {
        let view =
            dev.topk_gather_view(&TopkRequest::new(&loaded.seq, 0, 0, &query, 2048)).unwrap();
        assert_eq!(view.top.indices, fused.indices);
        assert_eq!(view.len(), 2048);
        let row = view.row_bytes();
        let (mut k, mut v) = (vec![0u8; row], vec![0u8; row]);
        // The handle keeps working while a view lives (it holds only its buffer).
        assert_eq!(
            dev.topk(&TopkRequest::new(&loaded.seq, 0, 0, &query, 3)).unwrap().indices[..],
            fused.indices[..3]
        );
        for i in [0, 1, 1000, 2047] {
            view.key_row(i, &mut k);
            view.value_row(i, &mut v);
            assert_eq!(k, rows.keys[i * row..(i + 1) * row]);
            assert_eq!(v, rows.values[i * row..(i + 1) * row]);
        }
    }
}
