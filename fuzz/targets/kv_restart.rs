//! The KV store a restarted device finds in device DRAM: a store with a
//! sequence, its page tables, integrity checks and a saved poison list,
//! patched by the input (`[offset u32][length u8][bytes]...`, offsets
//! steered at the superblock, poison table, descriptors and frames). Open
//! answers a store or a typed error; whatever it loads, Top-K, gather
//! checks, the scrub, the page maps and freeing never panic.

use pnm_firmware::kernels::Aggregation;
use pnm_firmware::kv::{Dram, KvStore, MediaFindings, MemDram, SequenceShape, TopkQuery};
use pnm_protocol::Dtype;
use pnm_protocol::media::PoisonSource;

const DRAM: usize = 3 << 20;

/// A formatted store: one sequence of 600 tokens over several pages, one
/// poisoned line, sealed rows.
fn template() -> Vec<u8> {
    let dram = MemDram::new(DRAM);
    {
        let (mut store, _) = KvStore::open(&dram).expect("a fresh store");
        let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 2, head_dim: 24 };
        let rows = 600 * 2 * 24 * 2;
        let bytes: Vec<u8> = (0..rows).map(|i| (i * 7 % 251) as u8).collect();
        let id = store.create_with_rows(shape, &bytes, &bytes, 600).expect("rows fit");
        let line = store.row_locations(id, 0, 1, &[33]).expect("token 33")[0].value / 64;
        let _ = store.add_poison(line..line + 1, PoisonSource::Injected);
    }
    let mut out = vec![0u8; DRAM];
    (&dram).read(0, &mut out).expect("whole DRAM");
    out
}

fn main() {
    let template = template();
    let frames = {
        let dram = MemDram::from_buffer(template.clone());
        KvStore::open(&dram).expect("template opens").0.layout().frames_offset as usize
    };
    afl::fuzz!(|data: &[u8]| {
        let mut bytes = template.clone();
        let mut rest = data;
        while rest.len() >= 5 {
            let raw = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let len = usize::from(rest[4]).min(rest.len() - 5);
            // Two in three patches land in the metadata, the rest anywhere.
            let at = match raw % 3 {
                0 | 1 => raw / 3 % frames,
                _ => raw / 3 % DRAM,
            };
            let end = (at + len).min(DRAM);
            bytes[at..end].copy_from_slice(&rest[5..5 + (end - at)]);
            rest = &rest[5 + len..];
        }
        let dram = MemDram::from_buffer(bytes);
        let Ok((mut store, _report)) = KvStore::open(&dram) else { return };
        let q = vec![0.25f32; 256];
        for info in store.list() {
            let (seq, d) = (info.seq.get(), usize::from(info.head_dim.get()));
            for layer in 0..info.layers.get().min(2) {
                for head in 0..info.heads.get().min(2) {
                    let query = TopkQuery {
                        seq,
                        layer,
                        head,
                        queries: &q[..d.min(256)],
                        how: Aggregation::Max,
                        k: 8,
                    };
                    let _ = store.top_k(query);
                    let tokens = info.tokens.get().min(16) as u32;
                    let indices: Vec<u32> = (0..tokens).collect();
                    let _ = store.verify_rows(
                        seq,
                        layer,
                        head,
                        &indices,
                        &mut MediaFindings::default(),
                    );
                }
            }
            let _ = store.page_map(seq, 0, 4);
        }
        let _ = store.scrub(0..DRAM as u64 / 64);
        for info in store.list() {
            let _ = store.free(info.seq.get());
        }
    });
}
