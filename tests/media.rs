//! Poison and corruption that bite, through a separate `pnm-device`
//! process started with `--allow-injection`: a Top-K or gather that touches
//! a bad line never returns its data; the error names the tokens; skipping
//! scores the rest exactly; the event log, the poison list and Scan Media
//! say what happened; Clear Poison heals; poison outlives a restart; and an
//! independent client written from the CXL spec reads all of it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{DeviceProcess, TempRegion};
use pnm_host::commands::EventKind;
use pnm_host::{
    Device, Dtype, Error, EventLog, KvShape, MediaFault, PoisonSource, Query, Sequence, TopkRequest,
};

const D: usize = 32;
const TOKENS: u64 = 3000;

struct Loaded {
    seq: Sequence,
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// One stream of f32 rows (128 bytes: two lines each), deterministic.
fn load(device: &Device) -> Loaded {
    let shape = KvShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: D as u16 };
    let both = common::random_f32s(0x9E37_79B9_7F4A_7C15, 2 * TOKENS as usize * D);
    let (keys, values) = both.split_at(TOKENS as usize * D);
    let (keys, values) = (keys.to_vec(), values.to_vec());
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let seq = device.kv_create(shape).unwrap();
    let seq = device.kv_append(&seq, &bytes(&keys), &bytes(&values), TOKENS, &mut |_| {}).unwrap();
    Loaded { seq, keys, values }
}

/// The reference Top-K over the tokens not in `skip` (f64 dot products;
/// ties by lower index).
fn reference(l: &Loaded, query: &[f32], k: usize, skip: &BTreeSet<u64>) -> Vec<u32> {
    let mut scored: Vec<(u32, f64)> = (0..TOKENS)
        .filter(|t| !skip.contains(t))
        .map(|t| {
            let key = &l.keys[t as usize * D..(t as usize + 1) * D];
            (t as u32, query.iter().zip(key).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum())
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().take(k).map(|(t, _)| t).collect()
}

fn row_bytes(values: &[f32], t: u64) -> Vec<u8> {
    values[t as usize * D..(t as usize + 1) * D].iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Tokens per key tile: f32 keys of 32 elements fill whole tiles per page,
/// so the device stores them in tiles (docs/PROTOCOL.md, "Key tiles").
const TILE: u64 = pnm_protocol::queue::KEY_TILE_TOKENS;

/// The bytes of token `t`'s key tile as the device stores them (the 16
/// keys dimension-major), from the rows.
fn key_tile_bytes(keys: &[f32], t: u64) -> Vec<u8> {
    let layout = pnm_protocol::queue::KeyLayout::new(D as u32, Dtype::F32);
    assert!(layout.tiled);
    let first = t / TILE * TILE;
    let rows: Vec<u8> = (first..first + TILE).flat_map(|t| row_bytes(keys, t)).collect();
    layout.block_bytes(t % layout.tokens_per_page(), &rows)
}

/// Every token of the key tiles holding `tokens`.
fn tiles_of(tokens: &[u64]) -> BTreeSet<u64> {
    tokens
        .iter()
        .flat_map(|&t| t / TILE * TILE..(t / TILE + 1) * TILE)
        .filter(|&t| t < TOKENS)
        .collect()
}

#[test]
fn bad_media_never_returns_data_and_heals() {
    let region = TempRegion::new("media");
    let mut process = DeviceProcess::start(region.path(), &["--size", "1GiB", "--allow-injection"]);
    let device = common::open(region.path(), Duration::from_secs(10));
    let l = load(&device);
    let query: Vec<f32> = (0..D).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    let q = Query::f32(&query, D);
    let k = 64u32;
    let request = TopkRequest::new(&l.seq, 0, 0, &q, k);
    let clean = device.topk(&request).unwrap();
    assert_eq!(clean.indices, reference(&l, &query, k as usize, &BTreeSet::new()));

    // Corrupt a line of the K rows of three tokens that are in the clean
    // answer (in three key tiles), behind the device's back: nothing is
    // listed, yet no read returns them. A line of a tile holds one
    // dimension of its 16 keys, so every token of the three tiles is
    // affected.
    let mut victims: Vec<u64> = Vec::new();
    for t in clean.indices.iter().map(|&t| u64::from(t)) {
        if victims.len() < 3 && victims.iter().all(|v| v / TILE != t / TILE) {
            victims.push(t);
        }
    }
    for &t in &victims {
        let (dpa, _) = device.row_ranges(&l.seq, 0, 0, t..t + 1, false).unwrap()[0];
        device.inject_media_fault(dpa, 1, MediaFault::Corrupt { pattern: 0x20 }).unwrap();
    }
    assert!(device.poison_list().unwrap().records.is_empty(), "corruption is silent");
    let bad = tiles_of(&victims);
    assert_eq!(bad.len(), 48);
    match device.topk(&request) {
        Err(Error::MediaError { first_token, tokens, .. }) => {
            assert_eq!(tokens, 48);
            assert_eq!(first_token, *bad.first().unwrap());
        }
        other => panic!("expected a media error, got {other:?}"),
    }
    let skipped = device.topk(&request.skipping_bad_rows()).unwrap();
    assert_eq!(skipped.skipped, 48);
    assert_eq!(skipped.tokens_scored, TOKENS - 48);
    assert_eq!(skipped.indices, reference(&l, &query, k as usize, &bad));
    let victim_indices: Vec<u32> = victims.iter().map(|&t| t as u32).collect();
    assert!(matches!(
        device.gather(&l.seq, 0, 0, &victim_indices),
        Err(Error::MediaError { tokens: 3, .. })
    ));

    // The device found them: on the poison list as internal, mapped to
    // exactly those tokens' K rows, and logged in the failure log.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let affected = device.media_errors(&l.seq).unwrap();
        if affected.iter().map(|a| a.tokens.end - a.tokens.start).sum::<u64>() >= 3
            || std::time::Instant::now() > deadline
        {
            break affected;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let listed_tokens: BTreeSet<u64> = listed.iter().flat_map(|a| a.tokens.clone()).collect();
    assert_eq!(listed_tokens, bad);
    assert!(listed.iter().all(|a| !a.value && a.source == PoisonSource::Internal));
    let failures = device.get_event_records(EventLog::Failure).unwrap();
    let logged: BTreeSet<u64> = failures
        .records
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::GeneralMedia { dpa, descriptor, .. } if descriptor & 1 != 0 => Some(dpa),
            _ => None,
        })
        .collect();
    for a in &listed {
        assert!(logged.contains(&a.dpa), "no General Media record for {:#x}", a.dpa);
    }

    // Poison the V row of a token the Top-K selects: TOPK (keys) is
    // unaffected, TOPK_GATHER fails, or with skipping drops that token.
    let v_victim = u64::from(skipped.indices[0]);
    let v_ranges = device.row_ranges(&l.seq, 0, 0, v_victim..v_victim + 1, true).unwrap();
    for &(dpa, lines) in &v_ranges {
        device.inject_media_fault(dpa, lines, MediaFault::Poison).unwrap();
    }
    let skip_request = request.skipping_bad_rows();
    assert_eq!(device.topk(&skip_request).unwrap().indices, skipped.indices);
    assert!(matches!(device.topk_gather(&request), Err(Error::MediaError { .. })));
    let (top, rows) = device.topk_gather(&skip_request).unwrap();
    assert_eq!(top.skipped, 49);
    assert!(!top.indices.contains(&(v_victim as u32)));
    for (i, &t) in top.indices.iter().enumerate() {
        let got = &rows.values[i * rows.row_bytes as usize..(i + 1) * rows.row_bytes as usize];
        assert_eq!(got, row_bytes(&l.values, u64::from(t)), "token {t}'s V row");
    }

    // Clear Poison heals: the poisoned V lines with the bytes they hold,
    // the corrupted K lines with the bytes the writer wrote.
    for &(dpa, lines) in &v_ranges {
        for line in 0..lines {
            let mut data = [0u8; 64];
            device.read_dram(dpa + 64 * line, &mut data).unwrap();
            device.clear_poison(dpa + 64 * line, &data).unwrap();
        }
    }
    for &t in &victims {
        let original: Vec<u8> = key_tile_bytes(&l.keys, t);
        let (dpa, lines) = device.row_ranges(&l.seq, 0, 0, t..t + 1, false).unwrap()[0];
        assert_eq!(lines, 32, "a tile of 16 keys of 128 bytes is 32 lines");
        let data: [u8; 64] = original[..64].try_into().unwrap();
        device.clear_poison(dpa, &data).unwrap();
    }
    assert!(device.poison_list().unwrap().records.is_empty());
    assert_eq!(device.topk(&request).unwrap().indices, clean.indices);
    let all: Vec<u32> = (0..TOKENS as u32).collect();
    let rows = device.gather(&l.seq, 0, 0, &all).unwrap();
    assert_eq!(rows.keys, l.keys.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    assert_eq!(rows.values, l.values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());

    // Latent corruption, found by Scan Media without any read.
    let t = 1234u64;
    let (dpa, _) = device.row_ranges(&l.seq, 0, 0, t..t + 1, true).unwrap()[0];
    device.inject_media_fault(dpa, 1, MediaFault::Corrupt { pattern: 0x01 }).unwrap();
    let scan = device.scan_media(0, device.layout().dram_size / 64, true, Duration::from_secs(60));
    let scan = scan.unwrap();
    assert_eq!(scan.records.len(), 1);
    assert_eq!((scan.records[0].dpa, scan.records[0].source), (dpa, PoisonSource::Internal));
    // And poison injected for the spec client to find, kept over a restart.
    let poison_at = device.row_ranges(&l.seq, 0, 0, 10..11, false).unwrap()[0].0;
    device.inject_poison(poison_at).unwrap();
    let before = device.poison_list().unwrap().records;
    drop(device);
    process.stop();
    let _process = DeviceProcess::start(region.path(), &["--allow-injection"]);
    let device = common::open(region.path(), Duration::from_secs(10));
    assert_eq!(device.poison_list().unwrap().records, before, "poison outlives a restart");
    // Token 10's first line holds dimension 0 of its tile's 16 keys.
    assert!(matches!(
        device.topk(&request),
        Err(Error::MediaError { first_token: 0, tokens: 16, .. })
    ));
    drop(device);

    // An independent client written from the CXL spec reads what the
    // injections put there, and its own scan finds the corrupted line.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spec_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(region.path())
        .arg(format!("poison={poison_at:#x}:1:3"))
        .arg(format!("scan={dpa:#x}"))
        .output()
        .expect("python3 runs the spec client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}
