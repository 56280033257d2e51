use proptest::prelude::*;

use super::*;
use crate::kernels::{Aggregation, Scored};
use crate::simd::Rows;

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::Bf16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// What the stored (rounded) value of `v` is.
fn stored(dtype: Dtype, v: f32) -> f32 {
    let mut out = Vec::new();
    kernels::to_f32(dtype, &encode(dtype, &[v]), &mut out);
    out[0]
}

/// Writes stored key bytes `row` as page token `t`'s key into K frame
/// `frame`, in the shape's key layout, as the host driver does.
fn write_key<D: Dram>(store: &KvStore<D>, frame: u32, t: u64, row: &[u8]) {
    let seq = store.sequences.values().find(|s| s.map.iter().any(|e| e.key_frame.get() == frame));
    let shape = seq.expect("a frame of some sequence").shape;
    let at = store.layout.frame_offset(frame);
    shape
        .key_layout()
        .write_rows(t, row, &mut Vec::new(), |within, bytes| store.dram.write(at + within, bytes))
        .unwrap();
}

/// Writes rows the way the host driver does: straight into the frames the
/// page map names. `keys`/`values` are [layers][heads][tokens][d].
fn load<D: Dram>(
    store: &mut KvStore<D>,
    shape: SequenceShape,
    keys: &[f32],
    values: &[f32],
    tokens: u64,
    chunk: u64,
) -> u32 {
    let id = store.create(shape).unwrap();
    let (l, h, d) = (u64::from(shape.layers), u64::from(shape.heads), u64::from(shape.head_dim));
    let tpp = shape.tokens_per_page();
    let row = shape.row_bytes();
    let mut done = 0;
    while done < tokens {
        let n = chunk.min(tokens - done);
        let a = store.append(id, n).unwrap();
        assert_eq!(a.first_token, done);
        for t in done..done + n {
            let page = t / tpp;
            for layer in 0..l {
                for head in 0..h {
                    let e = a.map[((page - a.first_page) * l * h + layer * h + head) as usize];
                    let src = (((layer * h + head) * tokens + t) * d) as usize;
                    let within = (t % tpp) * row;
                    let k = encode(shape.dtype, &keys[src..src + d as usize]);
                    let v = encode(shape.dtype, &values[src..src + d as usize]);
                    write_key(store, e.key_frame.get(), t % tpp, &k);
                    store
                        .dram
                        .write(store.layout.frame_offset(e.value_frame.get()) + within, &v)
                        .unwrap();
                }
            }
        }
        done += n;
        assert_eq!(store.commit(id, done).unwrap(), done);
    }
    id
}

fn naive_top_k(
    shape: SequenceShape,
    keys: &[f32],
    tokens: u64,
    layer: u16,
    head: u16,
    queries: &[f32],
    k: usize,
) -> Vec<(u32, f32)> {
    let d = usize::from(shape.head_dim);
    let base =
        (usize::from(layer) * usize::from(shape.heads) + usize::from(head)) * tokens as usize * d;
    let mut scored: Vec<(u32, f64)> = (0..tokens as usize)
        .map(|t| {
            let key: Vec<f32> = keys[base + t * d..base + (t + 1) * d]
                .iter()
                .map(|&v| stored(shape.dtype, v))
                .collect();
            let best = queries
                .chunks(d)
                .map(|q| {
                    q.iter().zip(&key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>()
                })
                .fold(f64::NEG_INFINITY, f64::max);
            (t as u32, best)
        })
        .collect();
    scored.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored.into_iter().map(|(i, s)| (i, s as f32)).collect()
}

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const DRAM: usize = 48 << 20;

#[test]
fn layout_fits_and_formats() {
    let dram = MemDram::new(DRAM);
    let (store, report) = KvStore::open(&dram).unwrap();
    assert!(report.formatted);
    let l = store.layout();
    assert_eq!(l.frames_offset % u64::from(KV_FRAME_SIZE), 0);
    assert!(l.frame_offset(l.frame_count) <= DRAM as u64);
    assert!(l.bounds_offset + u64::from(l.frame_count) * BOUNDS_SLOT <= l.frames_offset);
    assert_eq!(store.free_frames(), u64::from(l.frame_count));
    assert!(matches!(KvStore::open(&MemDram::new(512 << 10)), Err(KvError::TooSmall(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn top_k_matches_the_naive_reference(
        dtype_i in 0usize..3,
        head_dim in prop_oneof![Just(4u16), Just(16), Just(33), Just(128)],
        layers in 1u16..3,
        heads in 1u16..3,
        tokens in 1u64..700,
        group in 1usize..=8,
        k in 1u32..80,
        chunk in 1u64..300,
        seed in any::<u64>(),
    ) {
        let dtype = Dtype::ALL[dtype_i];
        let shape = SequenceShape { dtype, layers, heads, head_dim };
        let n = usize::from(layers) * usize::from(heads) * tokens as usize * usize::from(head_dim);
        let mut rng = lcg(seed);
        let keys: Vec<f32> = (0..n).map(|_| rng()).collect();
        let values: Vec<f32> = (0..n).map(|_| rng()).collect();
        let queries: Vec<f32> = (0..group * usize::from(head_dim)).map(|_| rng()).collect();
        let dram = MemDram::new(DRAM);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = load(&mut store, shape, &keys, &values, tokens, chunk);
        let layer = layers - 1;
        let head = heads / 2;
        let got = store.top_k(TopkQuery { seq: id, layer, head, queries: &queries, how: Aggregation::Max, k }).unwrap();
        let want = naive_top_k(shape, &keys, tokens, layer, head, &queries, k as usize);
        prop_assert_eq!(got.len(), want.len());
        prop_assert_eq!(got.len() as u64, u64::from(k).min(tokens));
        for (g, w) in got.iter().zip(&want) {
            // f32 accumulation against an f64 reference: equal up to rounding;
            // a swap is only allowed between near-equal scores.
            prop_assert!((g.score - w.1).abs() <= 1e-4 * (1.0 + w.1.abs()), "{:?} vs {:?}", g, w);
        }
        let got_set: std::collections::BTreeSet<u32> = got.iter().map(|s| s.index).collect();
        let kth = want.last().unwrap().1;
        for w in &want {
            prop_assert!(got_set.contains(&w.0) || (w.1 - kth).abs() <= 1e-4 * (1.0 + kth.abs()));
        }

        // Gather returns exactly the stored rows.
        let indices: Vec<u32> = got.iter().map(|s| s.index).collect();
        let rows = store.row_locations(id, layer, head, &indices).unwrap();
        let d = usize::from(head_dim);
        let base = (usize::from(layer) * usize::from(heads) + usize::from(head)) * tokens as usize * d;
        // All keys at once (eight interleaved at a time) equal the rows too.
        let row = shape.row_bytes() as usize;
        let mut all_keys = vec![0u8; rows.len() * row];
        store.read_keys(&rows, row, &mut all_keys).unwrap();
        for (got, &t) in all_keys.chunks_exact(row).zip(&indices) {
            let at = base + t as usize * d;
            prop_assert_eq!(got, &encode(dtype, &keys[at..at + d])[..]);
        }
        for (loc, &t) in rows.iter().zip(&indices) {
            let mut k_row = vec![0u8; shape.row_bytes() as usize];
            let mut v_row = vec![0u8; shape.row_bytes() as usize];
            store.read_key(loc, &mut k_row).unwrap();
            store.dram.read(loc.value, &mut v_row).unwrap();
            let at = base + t as usize * d;
            prop_assert_eq!(k_row, encode(dtype, &keys[at..at + d]));
            prop_assert_eq!(v_row, encode(dtype, &values[at..at + d]));
        }

        // Page bounds are the element-wise min and max of the page's keys.
        let tpp = shape.tokens_per_page();
        let (mins, maxs) = store.page_bounds(id, layer, head, 0).unwrap();
        for i in 0..d {
            let column = (0..tpp.min(tokens) as usize).map(|t| stored(dtype, keys[base + t * d + i]));
            prop_assert_eq!(mins[i], column.clone().fold(f32::INFINITY, f32::min));
            prop_assert_eq!(maxs[i], column.fold(f32::NEG_INFINITY, f32::max));
        }
    }
}

#[test]
fn store_persists_across_reopen_and_rolls_back_uncommitted_tokens() {
    let dram = MemDram::new(DRAM);
    let shape = SequenceShape { dtype: Dtype::F16, layers: 2, heads: 2, head_dim: 64 };
    let mut rng = lcg(7);
    let n = 2 * 2 * 1000 * 64;
    let keys: Vec<f32> = (0..n).map(|_| rng()).collect();
    let q: Vec<f32> = (0..64).map(|_| rng()).collect();
    let (id, before, listed, free) = {
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = load(&mut store, shape, &keys, &keys, 1000, 333);
        store.append(id, 10).unwrap(); // reserved, never committed
        let before = store
            .top_k(TopkQuery {
                seq: id,
                layer: 1,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 50,
            })
            .unwrap();
        (id, before, store.list(), store.free_frames())
    };
    let (mut store, report) = KvStore::open(&dram).unwrap();
    assert!(!report.formatted);
    assert_eq!(report.sequences, 1);
    assert!(report.dropped.is_empty());
    assert_eq!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 1,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 50
            })
            .unwrap(),
        before
    );
    assert_eq!(store.free_frames(), free);
    let after = store.list();
    assert_eq!(after[0].tokens, listed[0].tokens);
    assert_eq!(after[0].reserved_tokens.get(), 1000, "reservations roll back to committed");
    // New ids never reuse an old one.
    let second = store.create(shape).unwrap();
    assert!(second > id);
}

#[test]
fn exhaustion_changes_nothing_and_freed_frames_are_reused() {
    let dram = MemDram::new(8 << 20);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 256 };
    let total = store.free_frames();
    let id = store.create(shape).unwrap();
    // 64 tokens per page, two frames per page, plus one page-table frame.
    let fits = (total - 1) / 2 * 64;
    store.append(id, fits).unwrap();
    store.commit(id, fits).unwrap();
    let list = store.list();
    let err = store.append(id, 64).unwrap_err();
    assert!(matches!(err, KvError::DramExhausted { .. }), "{err}");
    assert_eq!(store.list(), list, "a failed append changes nothing");
    let other = store.create(shape).unwrap();
    assert!(matches!(store.append(other, 1), Err(KvError::DramExhausted { .. })));
    store.free(id).unwrap();
    assert_eq!(store.free_frames(), total);
    store.append(other, fits).unwrap();
    assert!(matches!(
        store.top_k(TopkQuery {
            seq: id,
            layer: 0,
            head: 0,
            queries: &[0.0; 256],
            how: Aggregation::Max,
            k: 1
        }),
        Err(KvError::NoSuchSequence(_))
    ));
}

#[test]
fn bad_arguments_are_refused() {
    let dram = MemDram::new(DRAM);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let bad = |dtype, layers, heads, head_dim| SequenceShape { dtype, layers, heads, head_dim };
    for shape in [
        bad(Dtype::F16, 0, 1, 64),
        bad(Dtype::F16, 1, 0, 64),
        bad(Dtype::F16, 1, 1, 0),
        bad(Dtype::F16, 1, 1, 257),
    ] {
        assert!(
            matches!(
                store.create(shape),
                Err(KvError::OutOfLimit { .. } | KvError::UnsupportedDtype(_))
            ),
            "{shape:?}"
        );
    }
    let shape = bad(Dtype::Bf16, 2, 2, 8);
    let id = store.create(shape).unwrap();
    assert!(store.append(id, 0).is_err());
    store.append(id, 10).unwrap();
    assert!(store.commit(id, 11).is_err(), "beyond reserved");
    store.commit(id, 5).unwrap();
    assert!(store.commit(id, 4).is_err(), "backwards");
    let q = [0.5f32; 8];
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 2,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 1
            })
            .is_err(),
        "layer"
    );
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 2,
                queries: &q,
                how: Aggregation::Max,
                k: 1
            })
            .is_err(),
        "head"
    );
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &q[..7],
                how: Aggregation::Max,
                k: 1
            })
            .is_err(),
        "head_dim"
    );
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &[0.5; 72],
                how: Aggregation::Max,
                k: 1
            })
            .is_err(),
        "group of 9"
    );
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 0
            })
            .is_err(),
        "k = 0"
    );
    assert!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: LIMITS.max_k + 1
            })
            .is_err()
    );
    assert_eq!(
        store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 100
            })
            .unwrap()
            .len(),
        5,
        "k > tokens"
    );
    assert!(store.row_locations(id, 0, 0, &[5]).is_err(), "uncommitted token");
    assert!(store.row_locations(id, 0, 0, &[4]).is_ok());
    assert!(store.page_map(id, 0, 2).is_err());
    assert!(matches!(store.free(999), Err(KvError::NoSuchSequence(999))));
}

#[test]
fn corrupt_descriptors_are_dropped_at_load() {
    let dram = MemDram::new(DRAM);
    let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 16 };
    let (good, bad_slot_offset) = {
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let good = store.create(shape).unwrap();
        store.append(good, 100).unwrap();
        store.commit(good, 100).unwrap();
        let bad = store.create(shape).unwrap();
        store.append(bad, 100).unwrap();
        (good, store.layout().descriptor(store.sequence(bad).unwrap().slot))
    };
    // Point the second sequence's page-table frame at a frame the first owns.
    let mut d = Descriptor::new_zeroed();
    (&dram).read(bad_slot_offset, d.as_mut_bytes()).unwrap();
    d.pt_frames[0] = 0.into();
    (&dram).write(bad_slot_offset, d.as_bytes()).unwrap();
    let (store, report) = KvStore::open(&dram).unwrap();
    assert_eq!(report.sequences, 1);
    assert_eq!(report.dropped.len(), 1, "{:?}", report.dropped);
    assert_eq!(store.list()[0].seq.get(), good);
}

#[test]
fn nan_and_infinite_keys_have_the_documented_order() {
    let dram = MemDram::new(DRAM);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 2 };
    let keys =
        [1.0, 0.0, f32::NAN, 0.0, f32::INFINITY, 0.0, 2.0, 0.0, f32::NEG_INFINITY, 0.0, 2.0, 0.0];
    let id = load(&mut store, shape, &keys, &keys, 6, 6);
    let got = store
        .top_k(TopkQuery {
            seq: id,
            layer: 0,
            head: 0,
            queries: &[1.0, 1.0],
            how: Aggregation::Max,
            k: 6,
        })
        .unwrap();
    let order: Vec<u32> = got.iter().map(|s| s.index).collect();
    // +inf first, ties (2.0) by index, -inf, then the NaN key last.
    assert_eq!(order, [2, 3, 5, 0, 4, 1]);
    assert!(got[5].score.is_nan());
    let (mins, maxs) = store.page_bounds(id, 0, 0, 0).unwrap();
    assert_eq!((mins[0], maxs[0]), (f32::NEG_INFINITY, f32::INFINITY), "NaN ignored in bounds");
}

#[test]
fn page_selection_with_a_full_budget_is_exact_and_bounds_are_sound() {
    let dram = MemDram::new(DRAM);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    let tokens = 5000u64;
    let mut rng = lcg(31);
    let mut keys: Vec<f32> = (0..tokens as usize * 64).map(|_| rng()).collect();
    // A few strong tokens, as real caches have.
    for t in [3usize, 700, 2500, 4990] {
        keys[t * 64..(t + 1) * 64].iter_mut().for_each(|v| *v *= 8.0);
    }
    let id = load(&mut store, shape, &keys, &keys, tokens, 999);
    let mut scratch = TopkScratch::default();
    for group in [1usize, 4] {
        let q: Vec<f32> = (0..64 * group).map(|_| rng()).collect();
        let exact = store
            .top_k(TopkQuery {
                seq: id,
                layer: 0,
                head: 0,
                queries: &q,
                how: Aggregation::Max,
                k: 50,
            })
            .unwrap();
        let all = PageSelection { budget_tokens: tokens, sink_pages: 1, recent_pages: 1 };
        let full = store
            .top_k_selected(
                &mut scratch,
                TopkQuery { seq: id, layer: 0, head: 0, queries: &q, how: Aggregation::Max, k: 50 },
                all,
            )
            .unwrap();
        assert_eq!(full.top, exact);
        assert_eq!(full.tokens_scored, tokens);
        // Each page's bound is at least every score in it (stored values).
        let tpp = shape.tokens_per_page();
        for p in 0..tokens.div_ceil(tpp) {
            let (mins, maxs) = store.page_bounds(id, 0, 0, p).unwrap();
            let bound = q
                .chunks(64)
                .map(|qq| {
                    qq.iter()
                        .zip(mins.iter().zip(&maxs))
                        .map(|(&a, (&lo, &hi))| (a * lo).max(a * hi))
                        .sum::<f32>()
                })
                .fold(f32::NEG_INFINITY, f32::max);
            for t in p * tpp..(p * tpp + tpp).min(tokens) {
                let key: Vec<f32> = keys[t as usize * 64..(t as usize + 1) * 64]
                    .iter()
                    .map(|&v| stored(Dtype::F16, v))
                    .collect();
                let score = q
                    .chunks(64)
                    .map(|qq| qq.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max);
                assert!(score <= bound + 1e-3, "page {p} token {t}: {score} > bound {bound}");
            }
        }
        // A budget of a quarter reads about a quarter, keeps sinks and recent pages.
        let quarter = PageSelection { budget_tokens: tokens / 4, sink_pages: 1, recent_pages: 1 };
        let some = store
            .top_k_selected(
                &mut scratch,
                TopkQuery { seq: id, layer: 0, head: 0, queries: &q, how: Aggregation::Max, k: 50 },
                quarter,
            )
            .unwrap();
        assert!(some.tokens_scored <= tokens / 4 && some.tokens_scored >= tokens / 4 - tpp);
        assert_eq!(some.top.len(), 50);
        assert!(
            some.top
                .iter()
                .all(|s| exact.iter().any(|e| e.index == s.index) || s.score <= exact[49].score)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Compute units each take a part; the merged parts are the single
    /// thread's answer, exactly (same indices, same scores, same order).
    #[test]
    fn merged_parts_equal_the_single_thread_top_k(
        dtype_i in 0usize..3,
        tokens in 1u64..3000,
        prefix_per_mille in 0u64..=1000,
        parts in 1u32..7,
        group in 1usize..=8,
        k in 1u32..600,
        seed in any::<u64>(),
    ) {
        let dtype = Dtype::ALL[dtype_i];
        let shape = SequenceShape { dtype, layers: 1, heads: 1, head_dim: 64 };
        let n = tokens as usize * 64;
        let mut rng = lcg(seed);
        // Coarse values, so ties between parts are common.
        let keys: Vec<f32> = (0..n).map(|_| (rng() * 8.0).round() / 8.0).collect();
        let queries: Vec<f32> = (0..group * 64).map(|_| (rng() * 4.0).round()).collect();
        let dram = MemDram::new(DRAM);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = load(&mut store, shape, &keys, &keys, tokens, 700);
        let snapshot = (tokens * prefix_per_mille / 1000).max(1);
        let mut scratch = TopkScratch::default();
        let bits = |v: &[Scored]| -> Vec<(u32, u32)> {
            v.iter().map(|s| (s.index, s.score.to_bits())).collect()
        };
        let whole = store
            .top_k_part(&mut scratch, TopkQuery { seq: id, layer: 0, head: 0, queries: &queries, how: Aggregation::Max, k }, snapshot, (0, 1))
            .unwrap();
        let split: Vec<Vec<Scored>> = (0..parts)
            .map(|p| {
                store
                    .top_k_part(&mut scratch, TopkQuery { seq: id, layer: 0, head: 0, queries: &queries, how: Aggregation::Max, k }, snapshot, (p, parts))
                    .unwrap()
            })
            .collect();
        prop_assert_eq!(bits(&kernels::merge_top_k(&split, k as usize)), bits(&whole));
        if snapshot == tokens {
            let exact = store.top_k(TopkQuery { seq: id, layer: 0, head: 0, queries: &queries, how: Aggregation::Max, k }).unwrap();
            prop_assert_eq!(bits(&whole), bits(&exact));
        }
        let refused = store
            .top_k_part(&mut scratch, TopkQuery { seq: id, layer: 0, head: 0, queries: &queries, how: Aggregation::Max, k }, tokens + 1, (0, 1))
            .is_err();
        prop_assert!(refused);
        let refused = store
            .top_k_part(&mut scratch, TopkQuery { seq: id, layer: 0, head: 0, queries: &queries, how: Aggregation::Max, k }, tokens, (parts, parts))
            .is_err();
        prop_assert!(refused);
    }
}

/// The one-call loader stores every row where the token-by-token appends
/// put it, for every (layer, head), and refuses buffers of the wrong size.
#[test]
fn create_with_rows_stores_what_appends_store() {
    let shape = SequenceShape { dtype: Dtype::F16, layers: 2, heads: 3, head_dim: 32 };
    let tokens = 1500; // several pages, the last one partial
    let n = 6 * tokens as usize * 32;
    let mut rng = lcg(77);
    let keys: Vec<f32> = (0..n).map(|_| rng()).collect();
    let values: Vec<f32> = (0..n).map(|_| rng()).collect();
    let dram = MemDram::new(DRAM);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let reference = load(&mut store, shape, &keys, &values, tokens, 97);
    let (k_bytes, v_bytes) = (encode(shape.dtype, &keys), encode(shape.dtype, &values));
    let loaded = store.create_with_rows(shape, &k_bytes, &v_bytes, tokens).unwrap();
    assert_eq!(store.tokens(loaded).unwrap(), tokens);
    let all: Vec<u32> = (0..tokens as u32).collect();
    let row = shape.row_bytes() as usize;
    let read = |at: u64| {
        let mut out = vec![0u8; row];
        store.dram().read(at, &mut out).unwrap();
        out
    };
    let read_key = |at: &RowLocation| {
        let mut out = vec![0u8; row];
        store.read_key(at, &mut out).unwrap();
        out
    };
    for layer in 0..2 {
        for head in 0..3 {
            let want = store.row_locations(reference, layer, head, &all).unwrap();
            let got = store.row_locations(loaded, layer, head, &all).unwrap();
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(read_key(w), read_key(g));
                assert_eq!(read(w.value), read(g.value));
            }
        }
    }
    assert!(store.create_with_rows(shape, &k_bytes[2..], &v_bytes, tokens).is_err());
}

/// Writes rows `first..first + n` of a one-stream sequence (`keys` and
/// `values` are [tokens][d]) where the append's page map says.
fn write_stream_rows<D: Dram>(
    store: &KvStore<D>,
    shape: SequenceShape,
    a: &Appended,
    keys: &[f32],
    values: &[f32],
    n: u64,
) {
    let (d, tpp, row) = (usize::from(shape.head_dim), shape.tokens_per_page(), shape.row_bytes());
    for t in a.first_token..a.first_token + n {
        let e = a.map[(t / tpp - a.first_page) as usize];
        let src = t as usize * d;
        let within = (t % tpp) * row;
        let k = encode(shape.dtype, &keys[src..src + d]);
        let v = encode(shape.dtype, &values[src..src + d]);
        write_key(store, e.key_frame.get(), t % tpp, &k);
        store.dram.write(store.layout.frame_offset(e.value_frame.get()) + within, &v).unwrap();
    }
}

/// A store holding only the first `tokens` rows, loaded the ordinary way:
/// what a rolled-back store must equal.
fn reference(shape: SequenceShape, keys: &[f32], tokens: u64) -> (KvStore<&'static MemDram>, u32) {
    let (mut store, _) = KvStore::open(fresh_dram()).unwrap();
    let d = usize::from(shape.head_dim);
    let rows = &keys[..tokens as usize * d];
    let id = load(&mut store, shape, rows, rows, tokens, 1000);
    (store, id)
}

fn all_bounds<D: Dram>(store: &KvStore<D>, id: u32) -> Vec<(Vec<f32>, Vec<f32>)> {
    let pages = store.sequence(id).unwrap().pages();
    (0..pages).map(|p| store.page_bounds(id, 0, 0, p).unwrap()).collect()
}

#[test]
fn reservations_belong_to_their_writer_and_roll_back_exactly() {
    let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    let mut rng = lcg(11);
    let keys: Vec<f32> = (0..3000 * 64).map(|_| rng() * 4.0).collect();
    let (a, b) = (Writer(1), Writer(2));
    let (mut store, _) = KvStore::open(fresh_dram()).unwrap();
    let id = store.create(shape).unwrap();
    let empty_free = store.free_frames();

    let first = store.append_as(id, 700, a).unwrap();
    write_stream_rows(&store, shape, &first, &keys, &keys, 700);
    assert_eq!(store.commit_as(id, 700, a, CommitMode::Publish).unwrap(), 700);

    // A's next append, folded but not yet published.
    let second = store.append_as(id, 600, a).unwrap();
    assert_eq!(second.first_token, 700);
    write_stream_rows(&store, shape, &second, &keys, &keys, 600);
    assert_eq!(store.commit_as(id, 1300, a, CommitMode::Defer).unwrap(), 700, "not valid yet");
    assert_eq!(store.tokens(id).unwrap(), 700);
    // Another writer can neither append nor commit into A's reservation.
    assert!(matches!(
        store.append_as(id, 10, b),
        Err(KvError::AppendInProgress { tokens: 700, reserved: 1300, .. })
    ));
    assert_eq!(
        store.commit_as(id, 1300, b, CommitMode::Publish),
        Err(KvError::NotTheWriter { seq: id })
    );

    // A's queue goes: exactly the committed rows stay, with the frames and
    // bounds of a store that never saw the rest.
    assert_eq!(store.abandon(a).unwrap(), vec![(id, 600)]);
    assert_eq!(store.abandon(a).unwrap(), vec![], "nothing left to roll back");
    let (reference700, ref_id) = reference(shape, &keys, 700);
    assert_eq!(store.tokens(id).unwrap(), 700);
    assert_eq!(store.reserved(id).unwrap(), 700);
    assert_eq!(empty_free - store.free_frames(), frames_used(&reference700));
    assert_eq!(all_bounds(&store, id), all_bounds(&reference700, ref_id));

    // B appends now, from where the committed rows end.
    let third = store.append_as(id, 300, b).unwrap();
    assert_eq!(third.first_token, 700);
    write_stream_rows(&store, shape, &third, &keys, &keys, 300);
    assert_eq!(store.commit_as(id, 1000, b, CommitMode::Publish).unwrap(), 1000);
    let q: Vec<f32> = (0..64).map(|_| rng()).collect();
    let query = TopkQuery { seq: id, layer: 0, head: 0, queries: &q, how: Aggregation::Max, k: 40 };
    let got: Vec<(u32, f32)> =
        store.top_k(query).unwrap().iter().map(|s| (s.index, s.score)).collect();
    let want = naive_top_k(shape, &keys[..1000 * 64], 1000, 0, 0, &q, 40);
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        want.iter().map(|w| w.0).collect::<Vec<_>>()
    );

    // A failed append given up explicitly.
    let fourth = store.append_as(id, 100, b).unwrap();
    write_stream_rows(&store, shape, &fourth, &keys, &keys, 100);
    store.commit_as(id, 1050, b, CommitMode::Defer).unwrap();
    assert_eq!(store.abort_append(id, a), Err(KvError::NotTheWriter { seq: id }));
    assert_eq!(store.abort_append(id, b).unwrap(), 1000);
    let (reference1000, ref_id) = reference(shape, &keys, 1000);
    assert_eq!(all_bounds(&store, id), all_bounds(&reference1000, ref_id));
}

/// Frames a store uses.
fn frames_used(store: &KvStore<&'static MemDram>) -> u64 {
    let (empty, _) = KvStore::open(fresh_dram()).unwrap();
    empty.free_frames() - store.free_frames()
}

/// Test DRAM that lives as long as the test process.
fn fresh_dram() -> &'static MemDram {
    Box::leak(Box::new(MemDram::new(DRAM)))
}

#[test]
fn a_writer_that_died_with_the_device_is_rolled_back_at_open() {
    let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 32 };
    let tpp = shape.tokens_per_page();
    let mut rng = lcg(5);
    let total = 3 * tpp + 100;
    let keys: Vec<f32> = (0..total as usize * 32).map(|_| rng()).collect();
    let dram = MemDram::new(DRAM);
    let committed = tpp + 10;
    let (id, free_before) = {
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = store.create(shape).unwrap();
        let a = store.append_as(id, committed, Writer(3)).unwrap();
        write_stream_rows(&store, shape, &a, &keys, &keys, committed);
        store.commit_as(id, committed, Writer(3), CommitMode::Publish).unwrap();
        let free_before = store.free_frames();
        // Into the last page and two more, folded, never published.
        let rest = total - committed;
        let b = store.append_as(id, rest, Writer(3)).unwrap();
        write_stream_rows(&store, shape, &b, &keys, &keys, rest);
        store.commit_as(id, total, Writer(3), CommitMode::Defer).unwrap();
        (id, free_before)
        // The device dies here: nothing is rolled back in DRAM.
    };
    let (store, report) = KvStore::open(&dram).unwrap();
    assert_eq!(report.rolled_back, 1);
    assert_eq!(store.tokens(id).unwrap(), committed);
    assert_eq!(store.reserved(id).unwrap(), committed);
    assert_eq!(store.free_frames(), free_before, "the dead writer's pages are free again");
    let (reference, ref_id) = reference(shape, &keys, committed);
    assert_eq!(all_bounds(&store, id), all_bounds(&reference, ref_id));
}

/// Rows as the model keeps them: (key, value).
type ModelRows = Vec<(Vec<f32>, Vec<f32>)>;

/// One step of the reservation model test.
#[derive(Debug, Clone)]
enum WriterOp {
    /// Writer `w` reserves `n` tokens and writes their rows.
    Append(u64, u64),
    /// Writer `w` commits everything it reserved; deferred or published.
    Commit(u64, bool),
    Abort(u64),
    /// Writer `w`'s queue goes away.
    Abandon(u64),
    /// The device restarts on the same DRAM.
    Reopen,
}

fn writer_op() -> impl Strategy<Value = WriterOp> {
    prop_oneof![
        4 => (1u64..4, 1u64..1500).prop_map(|(w, n)| WriterOp::Append(w, n)),
        3 => (1u64..4, any::<bool>()).prop_map(|(w, d)| WriterOp::Commit(w, d)),
        1 => (1u64..4).prop_map(WriterOp::Abort),
        1 => (1u64..4).prop_map(WriterOp::Abandon),
        1 => Just(WriterOp::Reopen),
    ]
}

/// A key or value row only (writer, token, nonce) writes. Each step's rows
/// lie in a band of their own, so bounds folded from rows that were never
/// published show.
fn model_row(w: u64, token: u64, nonce: u64, value: bool) -> Vec<f32> {
    let band = if nonce.is_multiple_of(2) { nonce as f32 * 40.0 } else { nonce as f32 * -40.0 };
    (0..16u64)
        .map(|d| {
            let x = (w * 7919 + token * 31 + d * 17 + u64::from(value)) % 2003;
            band + x as f32 / 100.0
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Appends by three writers, interleaved with commits (deferred or
    /// published), aborts, abandoned queues and restarts, against a model:
    /// the committed rows are exactly those of published appends, in order;
    /// the frames in use are exactly the committed pages'; the page bounds
    /// are exactly the committed keys' minima and maxima.
    #[test]
    fn reservations_keep_exactly_the_published_rows(ops in prop::collection::vec(writer_op(), 1..24)) {
        let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 16 };
        let tpp = shape.tokens_per_page();
        let dram = MemDram::new(16 << 20);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let empty = store.free_frames();
        let id = store.create(shape).unwrap();
        // Committed (key, value) rows; the open reservation: (writer, rows).
        let mut committed: ModelRows = Vec::new();
        let mut open: Option<(u64, ModelRows)> = None;
        for (nonce, op) in ops.into_iter().enumerate() {
            let nonce = nonce as u64;
            match op {
                WriterOp::Append(w, n) => {
                    let result = store.append_as(id, n, Writer(w));
                    if open.as_ref().is_some_and(|(holder, _)| *holder != w) {
                        prop_assert!(matches!(result, Err(KvError::AppendInProgress { .. })), "{result:?}");
                        continue;
                    }
                    let a = result.unwrap();
                    let pending = open.get_or_insert_with(|| (w, Vec::new()));
                    prop_assert_eq!(a.first_token, (committed.len() + pending.1.len()) as u64);
                    for t in a.first_token..a.first_token + n {
                        let e = a.map[(t / tpp - a.first_page) as usize];
                        let (k, v) = (model_row(w, t, nonce, false), model_row(w, t, nonce, true));
                        let at = (t % tpp) * shape.row_bytes();
                        write_key(&store, e.key_frame.get(), t % tpp, &encode(Dtype::F32, &k));
                        store.dram().write(store.layout().frame_offset(e.value_frame.get()) + at, &encode(Dtype::F32, &v)).unwrap();
                        pending.1.push((k, v));
                    }
                }
                WriterOp::Commit(w, defer) => {
                    let reserved = store.reserved(id).unwrap();
                    let mode = if defer { CommitMode::Defer } else { CommitMode::Publish };
                    let result = store.commit_as(id, reserved, Writer(w), mode);
                    match &open {
                        Some((holder, _)) if *holder != w => {
                            prop_assert_eq!(result, Err(KvError::NotTheWriter { seq: id }));
                        }
                        _ => {
                            let tokens = result.unwrap();
                            if !defer && let Some((_, rows)) = open.take() {
                                committed.extend(rows);
                            }
                            prop_assert_eq!(tokens, committed.len() as u64);
                        }
                    }
                }
                WriterOp::Abort(w) => {
                    let result = store.abort_append(id, Writer(w));
                    match &open {
                        Some((holder, _)) if *holder != w => {
                            prop_assert_eq!(result, Err(KvError::NotTheWriter { seq: id }));
                        }
                        _ => {
                            prop_assert_eq!(result.unwrap(), committed.len() as u64);
                            open = None;
                        }
                    }
                }
                WriterOp::Abandon(w) => {
                    store.abandon(Writer(w)).unwrap();
                    if open.as_ref().is_some_and(|(holder, _)| *holder == w) {
                        open = None;
                    }
                }
                WriterOp::Reopen => {
                    drop(store);
                    store = KvStore::open(&dram).unwrap().0;
                    open = None;
                }
            }
            // Committed rows, exactly.
            let tokens = committed.len() as u64;
            prop_assert_eq!(store.tokens(id).unwrap(), tokens);
            if tokens > 0 {
                let indices: Vec<u32> = (0..tokens as u32).collect();
                let locations = store.row_locations(id, 0, 0, &indices).unwrap();
                for (t, loc) in locations.iter().enumerate() {
                    let mut raw = vec![0u8; shape.row_bytes() as usize];
                    store.read_key(loc, &mut raw).unwrap();
                    prop_assert_eq!(&raw, &encode(Dtype::F32, &committed[t].0), "key row {}", t);
                    store.dram().read(loc.value, &mut raw).unwrap();
                    prop_assert_eq!(&raw, &encode(Dtype::F32, &committed[t].1), "value row {}", t);
                }
            }
            if open.is_none() {
                // Frames: two per committed page, one page-table frame.
                let pages = tokens.div_ceil(tpp);
                prop_assert_eq!(empty - store.free_frames(), 2 * pages + u64::from(pages > 0));
                // Bounds: exactly the committed keys'.
                for page in 0..pages {
                    let rows = &committed[(page * tpp) as usize..((page + 1) * tpp).min(tokens) as usize];
                    let mins: Vec<f32> = (0..16).map(|d| rows.iter().map(|r| r.0[d]).fold(f32::INFINITY, f32::min)).collect();
                    let maxs: Vec<f32> = (0..16).map(|d| rows.iter().map(|r| r.0[d]).fold(f32::NEG_INFINITY, f32::max)).collect();
                    let (got_min, got_max) = store.page_bounds(id, 0, 0, page).unwrap();
                    prop_assert_eq!(&got_min[..16], &mins[..], "page {} minima", page);
                    prop_assert_eq!(&got_max[..16], &maxs[..], "page {} maxima", page);
                }
            }
        }
    }
}

/// DRAM that dies after `budget` writes: every later write is lost, as
/// when the device process is killed (its earlier stores stay in the
/// shared file). A word store is one write; a byte copy is split into
/// 8-byte pieces, each of which may be the last.
struct DyingDram<'a> {
    inner: &'a MemDram,
    budget: std::cell::Cell<u64>,
}

impl DyingDram<'_> {
    fn take(&self) -> bool {
        let left = self.budget.get();
        self.budget.set(left.saturating_sub(1));
        left > 0
    }
}

impl Dram for &DyingDram<'_> {
    fn len(&self) -> u64 {
        (&self.inner).len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), KvError> {
        (&self.inner).read(offset, out)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), KvError> {
        for (i, piece) in data.chunks(8).enumerate() {
            if self.take() {
                (&self.inner).write(offset + 8 * i as u64, piece)?;
            }
        }
        Ok(())
    }
    fn store_u64(&self, offset: u64, value: u64) -> Result<(), KvError> {
        if self.take() {
            (&self.inner).write(offset, &value.to_le_bytes())?;
        }
        Ok(())
    }
    fn with_rows_then<R>(
        &self,
        offset: u64,
        len: u64,
        next: (u64, u64),
        dtype: Dtype,
        score: impl FnOnce(Rows<'_>) -> R,
    ) -> Result<R, KvError> {
        (&self.inner).with_rows_then(offset, len, next, dtype, score)
    }
}

/// A device killed at every write of an append, a commit, a rollback and a
/// create leaves a store that opens with every sequence it had: the
/// committed rows of the one appended to are the old ones or the new ones,
/// never a mix, and nothing is dropped as inconsistent.
#[test]
fn a_device_killed_at_any_write_leaves_a_consistent_store() {
    let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 2, head_dim: 16 };
    let tpp = shape.tokens_per_page();
    let keys: Vec<f32> = (0..2 * 3000 * 16).map(|i| (i % 97) as f32 - 40.0).collect();
    let first = tpp + 5;
    let prepare = || {
        let dram = MemDram::new(16 << 20);
        {
            let (mut store, _) = KvStore::open(&dram).unwrap();
            let rows = |n: u64| -> Vec<f32> {
                (0..2).flat_map(|h| keys[h * 3000 * 16..][..n as usize * 16].to_vec()).collect()
            };
            let k = rows(first);
            load(&mut store, shape, &k, &k, first, first);
        }
        dram
    };
    // What the writes under test do, on a store in `dram`.
    let work = |dram: &DyingDram<'_>| -> Result<(), KvError> {
        let (mut store, _) = KvStore::open(dram)?;
        let id = 1;
        let a = store.append_as(id, 2 * tpp, Writer(9))?;
        let _ = a;
        store.commit_as(id, first + tpp, Writer(9), CommitMode::Defer)?;
        store.abandon(Writer(9))?;
        let b = store.append_as(id, 100, Writer(10))?;
        let _ = b;
        store.commit_as(id, first + 100, Writer(10), CommitMode::Publish)?;
        store.create(shape)?;
        Ok(())
    };
    // How many writes the whole work takes.
    let total = {
        let dram = prepare();
        let counting = DyingDram { inner: &dram, budget: std::cell::Cell::new(u64::MAX) };
        work(&counting).unwrap();
        u64::MAX - counting.budget.get()
    };
    assert!(total > 100, "{total} writes");
    for budget in 0..=total {
        let dram = prepare();
        let dying = DyingDram { inner: &dram, budget: std::cell::Cell::new(budget) };
        let _ = work(&dying);
        let (store, report) = KvStore::open(&dram).unwrap();
        assert!(report.dropped.is_empty(), "killed after {budget} writes: {:?}", report.dropped);
        let tokens = store.tokens(1).unwrap();
        assert!(tokens == first || tokens == first + 100, "killed after {budget}: {tokens} tokens");
        assert_eq!(store.reserved(1).unwrap(), tokens);
        // The old rows are intact either way.
        let locations =
            store.row_locations(1, 0, 1, &(0..first as u32).collect::<Vec<_>>()).unwrap();
        for (t, loc) in locations.iter().enumerate() {
            let mut raw = [0u8; 64];
            store.read_key(loc, &mut raw).unwrap();
            assert_eq!(
                raw.to_vec(),
                encode(Dtype::F32, &keys[3000 * 16 + t * 16..][..16]),
                "row {t}"
            );
        }
    }
}

/// Integrity and poison: what a read of bad media does.
mod media {
    use super::*;
    use crate::integrity::LINE_BYTES;
    use pnm_protocol::media::PoisonSource;
    use std::collections::BTreeSet;

    /// DPAs of token `t`'s K and V rows in every stream, from the page map
    /// of the append that reserved it.
    fn reserved_rows<D: Dram>(store: &KvStore<D>, id: u32, t: u64, a: &Appended) -> Vec<u64> {
        let shape = store.shape(id).unwrap();
        let streams = shape.streams();
        let page = t / shape.tokens_per_page();
        let within = (t % shape.tokens_per_page()) * shape.row_bytes();
        (0..streams)
            .flat_map(|s| {
                let e = a.map[((page - a.first_page) * streams + s) as usize];
                [e.key_frame.get(), e.value_frame.get()]
            })
            .map(|f| store.layout().frame_offset(f) + within)
            .collect()
    }

    fn query(id: u32, queries: &[f32], k: u32) -> TopkQuery<'_> {
        TopkQuery { seq: id, layer: 0, head: 0, queries, how: Aggregation::Max, k }
    }

    /// DPA of byte `byte` of token `t`'s key (or value) row in stream (0,
    /// 0), wherever the key's elements lie (rows or tiles).
    fn row_dpa<D: Dram>(store: &KvStore<D>, id: u32, t: u64, byte: u64, value: bool) -> u64 {
        let loc = store.row_locations(id, 0, 0, &[t as u32]).unwrap()[0];
        if value {
            return loc.value + byte;
        }
        let size = loc.element_bytes;
        loc.key + byte / size * loc.key_stride + byte % size
    }

    /// Tokens whose rows share a line with a byte at `dpas` (the reference,
    /// from row geometry alone).
    fn tokens_on_lines<D: Dram>(
        store: &KvStore<D>,
        id: u32,
        tokens: u64,
        dpas: &[u64],
    ) -> BTreeSet<u64> {
        let row = store.shape(id).unwrap().row_bytes();
        let lines: BTreeSet<u64> = dpas.iter().map(|d| d / LINE_BYTES).collect();
        (0..tokens)
            .filter(|&t| {
                (0..row).any(|b| lines.contains(&(row_dpa(store, id, t, b, false) / LINE_BYTES)))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Corrupted key bytes never reach a result: a Top-K that may not
        /// skip fails naming exactly the tokens on the bad lines; one that
        /// skips equals the reference Top-K over the other tokens.
        #[test]
        fn corrupted_keys_fail_or_are_skipped_exactly(
            head_dim in prop::sample::select(vec![16u16, 24, 40, 64]),
            tokens in 1u64..1300,
            chunk in 1u64..700,
            hits in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..), 1..4),
            k in 1u32..40,
            seed in any::<u64>(),
        ) {
            let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim };
            let d = usize::from(head_dim);
            let mut next = lcg(seed);
            let keys: Vec<f32> = (0..tokens as usize * d).map(|_| next()).collect();
            let values: Vec<f32> = (0..tokens as usize * d).map(|_| next()).collect();
            let queries: Vec<f32> = (0..d).map(|_| next()).collect();
            let dram = MemDram::new(DRAM);
            let (mut store, _) = KvStore::open(&dram).unwrap();
            let id = load(&mut store, shape, &keys, &values, tokens, chunk);
            let mut dpas = Vec::new();
            for (t, byte, pattern) in hits {
                let t = t.index(tokens as usize) as u64;
                let at = row_dpa(&store, id, t, byte.index(shape.row_bytes() as usize) as u64, false);
                store.corrupt(at, 1, pattern).unwrap();
                dpas.push(at);
            }
            let affected = tokens_on_lines(&store, id, tokens, &dpas);
            let mut scratch = TopkScratch::default();
            match store.top_k_with(&mut scratch, query(id, &queries, k)) {
                Err(KvError::MediaError { first_token, tokens: n, dpa }) => {
                    prop_assert_eq!(first_token, *affected.first().unwrap());
                    prop_assert_eq!(n, affected.len() as u64);
                    prop_assert_eq!(dpa / LINE_BYTES, dpas.iter().min().unwrap() / LINE_BYTES);
                }
                other => prop_assert!(false, "expected a media error, got {other:?}"),
            }
            scratch.bad_rows = BadRows::Skip;
            let got = store.top_k_with(&mut scratch, query(id, &queries, k)).unwrap();
            let want: Vec<u32> = naive_top_k(shape, &keys, tokens, 0, 0, &queries, tokens as usize)
                .into_iter()
                .filter(|(i, _)| !affected.contains(&u64::from(*i)))
                .take(k as usize)
                .map(|(i, _)| i)
                .collect();
            // Ties between equal scores may order differently: compare sets.
            let got_set: BTreeSet<u32> = got.iter().map(|s| s.index).collect();
            prop_assert_eq!(got_set, want.iter().copied().collect::<BTreeSet<u32>>());
            prop_assert_eq!(scratch.media.token_count(), affected.len() as u64);
            // Every affected token's row also fails a gather check.
            let mut findings = MediaFindings::default();
            let all: Vec<u32> = (0..tokens as u32).collect();
            store.verify_rows(id, 0, 0, &all, &mut findings).unwrap();
            findings.normalize();
            let found: BTreeSet<u64> = findings.tokens.iter().flat_map(|r| r.clone()).collect();
            prop_assert_eq!(found, affected.clone());
            // The scrub finds the same lines.
            let bad = store.scrub(0..DRAM as u64 / LINE_BYTES).unwrap();
            let lines: BTreeSet<u64> = dpas.iter().map(|d| d / LINE_BYTES).collect();
            prop_assert_eq!(bad.iter().map(|b| b.line).collect::<BTreeSet<_>>(), lines.clone());
            prop_assert!(bad.iter().all(|b| b.fault == LineFault::Corrupt));
            // Scanned in steps (as Scan Media runs), the same lines.
            let total = DRAM as u64 / LINE_BYTES;
            let mut stepped = BTreeSet::new();
            let mut at = 0;
            while at < total {
                let end = (at + 777 + at % 1000).min(total);
                stepped.extend(store.scrub(at..end).unwrap().into_iter().map(|b| b.line));
                at = end;
            }
            prop_assert_eq!(stepped, lines);
        }
    }

    /// A scan verifies pages in batches after scoring them: bad lines in
    /// the first and last page of a batch, on both sides of a batch
    /// boundary and in the last (partial) batch are found, their tokens
    /// named or left out exactly, for tiled keys (verified in batches) and
    /// rows that straddle lines (verified page by page).
    #[test]
    fn scans_longer_than_a_verify_batch_find_every_bad_line() {
        for (head_dim, pages) in [(8u16, 41u64), (24, 35)] {
            let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim };
            let tpp = shape.tokens_per_page();
            let tokens = pages * tpp - tpp / 3;
            let d = usize::from(head_dim);
            let mut next = lcg(u64::from(head_dim));
            let keys: Vec<f32> = (0..tokens as usize * d).map(|_| next()).collect();
            let values: Vec<f32> = (0..tokens as usize * d).map(|_| next()).collect();
            let queries: Vec<f32> = (0..d).map(|_| next()).collect();
            let dram = MemDram::new(DRAM);
            let (mut store, _) = KvStore::open(&dram).unwrap();
            let id = load(&mut store, shape, &keys, &values, tokens, tpp * 7);
            let batch = super::topk::VERIFY_BATCH_PAGES as u64;
            let hit_pages = [0, 3, batch - 1, batch, pages - 1];
            let mut dpas = Vec::new();
            let mut affected = BTreeSet::new();
            for (i, &page) in hit_pages.iter().enumerate() {
                let t = (page * tpp + 17 * i as u64 + 5).min(tokens - 1);
                let at = row_dpa(&store, id, t, 3, false);
                store.corrupt(at, 1, 0x5A).unwrap();
                dpas.push(at);
                // The reference: tokens of that page whose key bytes share the line.
                let line = at / LINE_BYTES;
                let row = shape.row_bytes();
                for u in page * tpp..((page + 1) * tpp).min(tokens) {
                    if (0..row).any(|b| row_dpa(&store, id, u, b, false) / LINE_BYTES == line) {
                        affected.insert(u);
                    }
                }
            }
            let k = 50;
            let mut scratch = TopkScratch::default();
            match store.top_k_with(&mut scratch, query(id, &queries, k)) {
                Err(KvError::MediaError { first_token, tokens: n, .. }) => {
                    assert_eq!(first_token, *affected.first().unwrap(), "head_dim {head_dim}");
                    assert_eq!(n, affected.len() as u64, "head_dim {head_dim}");
                }
                other => panic!("head_dim {head_dim}: expected a media error, got {other:?}"),
            }
            scratch.bad_rows = BadRows::Skip;
            let got = store.top_k_with(&mut scratch, query(id, &queries, k)).unwrap();
            let want: BTreeSet<u32> =
                naive_top_k(shape, &keys, tokens, 0, 0, &queries, tokens as usize)
                    .into_iter()
                    .filter(|(i, _)| !affected.contains(&u64::from(*i)))
                    .take(k as usize)
                    .map(|(i, _)| i)
                    .collect();
            assert_eq!(got.iter().map(|s| s.index).collect::<BTreeSet<u32>>(), want);
            assert_eq!(scratch.media.token_count(), affected.len() as u64);
        }
    }

    #[test]
    fn rows_written_past_the_committed_end_do_not_disturb_committed_checks() {
        // 48-byte rows: lines straddle rows, and the committed end.
        let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 24 };
        let dram = MemDram::new(DRAM);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = store.create(shape).unwrap();
        let mut next = lcg(3);
        let mut write_rows = |store: &mut KvStore<&MemDram>, from: u64, n: u64| {
            let a = store.append(id, n).unwrap();
            for t in from..from + n {
                let locs = reserved_rows(store, id, t, &a);
                for at in locs {
                    let row: Vec<f32> = (0..24).map(|_| next()).collect();
                    store.dram.write(at, &encode(Dtype::F16, &row)).unwrap();
                }
            }
        };
        write_rows(&mut store, 0, 5);
        store.commit(id, 5).unwrap();
        // The next rows are written (sharing line 3 with token 4) but not
        // committed: reads of the committed rows stay clean.
        write_rows(&mut store, 5, 3);
        let q = vec![0.5f32; 24];
        let mut scratch = TopkScratch::default();
        assert_eq!(store.top_k_with(&mut scratch, query(id, &q, 5)).unwrap().len(), 5);
        store.commit(id, 8).unwrap();
        assert_eq!(store.top_k_with(&mut scratch, query(id, &q, 8)).unwrap().len(), 8);
        assert!(store.scrub(0..DRAM as u64 / LINE_BYTES).unwrap().is_empty());
    }

    #[test]
    fn poison_fails_reads_survives_a_restart_and_clear_poison_heals() {
        let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 32 };
        let tokens = 300u64;
        let mut next = lcg(9);
        let keys: Vec<f32> = (0..tokens as usize * 32).map(|_| next()).collect();
        let values: Vec<f32> = (0..tokens as usize * 32).map(|_| next()).collect();
        let dram = MemDram::new(DRAM);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = load(&mut store, shape, &keys, &values, tokens, 77);
        // Token 7's value row (128 bytes, two lines): poison its second line.
        let line = row_dpa(&store, id, 7, 64, true) / LINE_BYTES;
        store.add_poison(line..line + 1, PoisonSource::Injected).unwrap().unwrap();
        let owner = store.line_owner(line).unwrap();
        assert_eq!((owner.seq, owner.value, owner.tokens.clone()), (id, true, 7..8));
        // Keys are clean: Top-K is unaffected; a gather of token 7 is not.
        let q: Vec<f32> = (0..32).map(|_| next()).collect();
        assert!(store.top_k(query(id, &q, 10)).is_ok());
        let mut findings = MediaFindings::default();
        store.verify_rows(id, 0, 0, &[6, 7, 8], &mut findings).unwrap();
        assert_eq!(findings.tokens, vec![7..8u64]);
        assert_eq!(
            findings.lines,
            [BadLine { line, fault: LineFault::Poisoned(PoisonSource::Injected) }]
        );
        // A restarted store still has it.
        drop(store);
        let (mut store, report) = KvStore::open(&dram).unwrap();
        assert_eq!(report.poison_table, None);
        assert!(store.poison().touches(line..line + 1));
        // Clear Poison with the original bytes heals the line; with other
        // bytes, the line holds them and checks clean.
        let mut original = [0u8; 64];
        store.dram().read(line * LINE_BYTES, &mut original).unwrap();
        assert!(store.clear_poison(line, &original, 1).unwrap());
        let mut findings = MediaFindings::default();
        store.verify_rows(id, 0, 0, &[7], &mut findings).unwrap();
        assert!(findings.is_empty());
        store.corrupt(line * LINE_BYTES, 64, 0x40).unwrap();
        store.verify_rows(id, 0, 0, &[7], &mut findings).unwrap();
        assert_eq!(findings.lines[0].fault, LineFault::Corrupt);
        let replacement = [0x3Fu8; 64];
        assert!(!store.clear_poison(line, &replacement, 2).unwrap());
        let mut findings = MediaFindings::default();
        store.verify_rows(id, 0, 0, &[7], &mut findings).unwrap();
        assert!(findings.is_empty());
        let mut now = [0u8; 64];
        store.dram().read(line * LINE_BYTES, &mut now).unwrap();
        assert_eq!(now, replacement);
    }

    #[test]
    fn a_line_left_half_sealed_by_a_killed_commit_is_resealed_at_load() {
        // 48-byte rows: token 4's row ends mid-line.
        let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 24 };
        let tokens = 5u64;
        let mut next = lcg(5);
        let keys: Vec<f32> = (0..tokens as usize * 24).map(|_| next()).collect();
        let dram = MemDram::new(DRAM);
        let (mut store, _) = KvStore::open(&dram).unwrap();
        let id = load(&mut store, shape, &keys, &keys, tokens, 5);
        // What a device killed between sealing 6 rows and publishing them
        // leaves: line 3 of each frame sealed over 6 rows, 5 committed.
        let a = store.append(id, 1).unwrap();
        let locs = reserved_rows(&store, id, 5, &a);
        for at in &locs {
            store.dram.write(*at, &[0x11; 48]).unwrap();
        }
        store.seal_rows(id, 5, 6).unwrap();
        let q = vec![1.0f32; 24];
        assert!(matches!(store.top_k(query(id, &q, 5)), Err(KvError::MediaError { .. })));
        drop(store);
        let (store, _) = KvStore::open(&dram).unwrap();
        assert_eq!(store.top_k(query(id, &q, 5)).unwrap().len(), 5);
    }
}

/// Keys in tiles: a tile partly committed keeps its checks while a writer
/// fills the tile's other lanes (uncommitted tokens), and a Top-K, gather
/// checks and the scrub see exactly the committed tokens, before the
/// commit, after it, and after an aborted append left garbage in the lanes.
#[test]
fn a_partly_committed_key_tile_is_checked_over_its_committed_lanes() {
    let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 64 };
    assert!(shape.key_layout().tiled);
    let d = 64;
    let mut next = lcg(17);
    let keys: Vec<f32> = (0..40 * d).map(|_| next()).collect();
    let queries: Vec<f32> = (0..2 * d).map(|_| next()).collect();
    let dram = MemDram::new(DRAM);
    let (mut store, _) = KvStore::open(&dram).unwrap();
    let id = load(&mut store, shape, &keys[..20 * d], &keys[..20 * d], 20, 7);
    let check = |store: &KvStore<&MemDram>, tokens: u64| {
        let query = TopkQuery {
            seq: id,
            layer: 0,
            head: 0,
            queries: &queries,
            how: Aggregation::Max,
            k: tokens as u32,
        };
        let got: Vec<u32> = store.top_k(query).unwrap().iter().map(|s| s.index).collect();
        let want: Vec<u32> = naive_top_k(
            shape,
            &keys[..tokens as usize * d],
            tokens,
            0,
            0,
            &queries,
            tokens as usize,
        )
        .into_iter()
        .map(|(i, _)| i)
        .collect();
        assert_eq!(got.len(), want.len());
        assert_eq!(got.iter().collect::<std::collections::BTreeSet<_>>(), want.iter().collect());
        let all: Vec<u32> = (0..tokens as u32).collect();
        let mut findings = MediaFindings::default();
        store.verify_rows(id, 0, 0, &all, &mut findings).unwrap();
        assert!(findings.is_empty(), "{findings:?}");
        assert!(store.scrub(0..DRAM as u64 / 64).unwrap().is_empty());
        let locations = store.row_locations(id, 0, 0, &all).unwrap();
        for (t, at) in locations.iter().enumerate() {
            let mut row = vec![0u8; 128];
            store.read_key(at, &mut row).unwrap();
            assert_eq!(row, encode(Dtype::F16, &keys[t * d..(t + 1) * d]), "token {t}");
        }
    };
    check(&store, 20);
    // Tokens 20..30 land in lanes 4..14 of tile 1, beside committed lanes.
    let a = store.append(id, 10).unwrap();
    write_stream_rows(&store, shape, &a, &keys, &keys, 10);
    check(&store, 20);
    store.commit(id, 30).unwrap();
    check(&store, 30);
    // Garbage in lanes 14..16 and beyond, then the append given up.
    let a = store.append(id, 5).unwrap();
    let garbage: Vec<f32> = (0..40 * d).map(|i| if i % 3 == 0 { f32::NAN } else { 1e4 }).collect();
    write_stream_rows(&store, shape, &a, &garbage, &garbage, 5);
    check(&store, 30);
    store.abort_append(id, Writer::LOCAL).unwrap();
    check(&store, 30);
    // A reopened store (as after a restart) agrees.
    drop(store);
    let (store, _) = KvStore::open(&dram).unwrap();
    check(&store, 30);
}

#[test]
fn rows_handed_with_a_continuation_read_as_without_it() {
    let dram = MemDram::new(1 << 16);
    let values: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5 - 100.0).collect();
    let bytes = encode(Dtype::F32, &values);
    (&dram).write(8192, &bytes).unwrap();
    let read = |next: (u64, u64)| {
        let mut out = Vec::new();
        (&dram).with_rows_then(8192, 4096, next, Dtype::F32, |r| r.to_f32(&mut out)).unwrap();
        out
    };
    // A continuation inside DRAM, past its end, or overflowing: the rows
    // are the same, and none is an error (it is only a prefetch hint).
    for next in [(0, 4096), (60 << 10, 8192), (u64::MAX - 8, 1024), (0, 0)] {
        assert_eq!(read(next), values, "next {next:?}");
    }
    // Dropping the buffer from the caches changes none of it.
    dram.evict_from_caches();
    assert_eq!(read((0, 0)), values);
    assert!((&dram).with_rows_then(u64::MAX - 8, 16, (0, 64), Dtype::F32, |_| ()).is_err());
}
