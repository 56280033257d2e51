//! Bad media as a KV user sees it: where a sequence's rows lie in device
//! DRAM (from its page map), which of its tokens the poison list covers,
//! and the DPA ranges of chosen rows (for fault injection scripts).

use std::ops::Range;

use pnm_protocol::media::LINE;
use pnm_protocol::queue::{KV_FRAME_SIZE, KeyLayout, KvMap, PageMapEntry, QueueCommand};
use zerocopy::FromBytes;

use crate::Device;
use crate::commands::PoisonSource;
use crate::error::{Error, Result};
use crate::kv::{Sequence, host_buffer};

/// Tokens of one stream whose K or V rows lie on a poisoned range.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AffectedRows {
    pub layer: u16,
    pub head: u16,
    /// The V rows (else the K rows).
    pub value: bool,
    pub tokens: Range<u64>,
    /// DPA of the first poisoned line among them.
    pub dpa: u64,
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::commands::source_name"))]
    pub source: PoisonSource,
}

/// Bytes of one page map entry.
const ENTRY: u64 = size_of::<PageMapEntry>() as u64;

impl Device {
    /// The page map of `seq`'s pages `[first, first + count)` (KV_MAP):
    /// per page, per (layer, head), its K and V frames.
    pub fn kv_page_map(&self, seq: &Sequence, first: u32, count: u32) -> Result<Vec<PageMapEntry>> {
        let streams = u64::from(seq.shape.layers) * u64::from(seq.shape.heads);
        let len = u64::from(count) * streams * ENTRY;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut s = self.session()?;
        let frame_count = s.session().frame_count;
        let buf = s.alloc(len)?;
        let c = s.run(&QueueCommand::KvMap(KvMap {
            seq: seq.id,
            first_page: first,
            pages: count,
            out: host_buffer(&buf, len),
        }));
        let mut raw = vec![0u8; len as usize];
        s.mem().read_bytes(buf.addr, &mut raw).expect("DMA buffer in the region");
        drop(buf);
        let c = c?;
        if c.result0 != count {
            return Err(Error::Protocol(format!("KV_MAP wrote {} of {count} pages", c.result0)));
        }
        let map = <[PageMapEntry]>::ref_from_bytes(&raw).expect("whole entries").to_vec();
        if let Some(bad) = map
            .iter()
            .flat_map(|e| [e.key_frame.get(), e.value_frame.get()])
            .find(|&f| f >= frame_count)
        {
            return Err(Error::Protocol(format!("KV_MAP names frame {bad} of {frame_count}")));
        }
        Ok(map)
    }

    /// Reads device DRAM at `dpa` (a load through the region, as CXL.mem
    /// would; poison is not checked on this path): for Clear Poison with
    /// the bytes a line already holds.
    pub fn read_dram(&self, dpa: u64, out: &mut [u8]) -> Result<()> {
        let layout = self.layout();
        let end = dpa.checked_add(out.len() as u64);
        if end.is_none_or(|e| e > layout.dram_size) {
            return Err(Error::Invalid(format!(
                "DPA {dpa:#x}+{:#x} is outside the {}-byte device DRAM",
                out.len(),
                layout.dram_size
            )));
        }
        self.region()
            .read_bytes(layout.dram_offset + dpa, out)
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    /// The DPA of each frame's start: `frames_offset + frame x frame size`.
    fn frame_dpas(&self) -> Result<impl Fn(u32) -> u64> {
        let frames_offset = self.session()?.session().frames_offset;
        Ok(move |frame: u32| frames_offset + u64::from(frame) * u64::from(KV_FRAME_SIZE))
    }

    /// The DPA ranges (start, 64-byte lines) holding the K (or, `value`, V)
    /// rows of tokens `tokens` of (seq, layer, head): one range per page.
    /// Keys in tiles (PROTOCOL.md §7) span their whole tiles: every line of
    /// a tile holds elements of each of its 16 tokens. What `pnmctl inject`
    /// uses to poison or corrupt chosen rows.
    pub fn row_ranges(
        &self,
        seq: &Sequence,
        layer: u16,
        head: u16,
        tokens: Range<u64>,
        value: bool,
    ) -> Result<Vec<(u64, u64)>> {
        let shape = seq.shape;
        if layer >= shape.layers || head >= shape.heads {
            return Err(Error::Invalid(format!(
                "layer {layer} / head {head} outside {} layers x {} heads",
                shape.layers, shape.heads
            )));
        }
        if tokens.is_empty() || tokens.end > seq.tokens {
            return Err(Error::Invalid(format!(
                "tokens {tokens:?} are not within the sequence's {} committed tokens",
                seq.tokens
            )));
        }
        let tpp = u64::from(seq.tokens_per_page);
        let row = shape.row_bytes();
        let keys = KeyLayout::new(u32::from(shape.head_dim), shape.dtype);
        let (first_page, last_page) = (tokens.start / tpp, (tokens.end - 1) / tpp);
        let map = self.kv_page_map(seq, first_page as u32, (last_page - first_page + 1) as u32)?;
        let frame_dpa = self.frame_dpas()?;
        let streams = u64::from(shape.layers) * u64::from(shape.heads);
        let stream = u64::from(layer) * u64::from(shape.heads) + u64::from(head);
        let mut ranges = Vec::new();
        for page in first_page..=last_page {
            let e = map[((page - first_page) * streams + stream) as usize];
            let frame = if value { e.value_frame.get() } else { e.key_frame.get() };
            let in_page = tokens.start.max(page * tpp) - page * tpp
                ..tokens.end.min((page + 1) * tpp) - page * tpp;
            // A key in a tile has elements all over the tile.
            let (lo, hi) = if value {
                (in_page.start * row, in_page.end * row)
            } else {
                let bytes = keys.bytes_of(in_page);
                (bytes.start, bytes.end)
            };
            let base = frame_dpa(frame);
            let first_line = (base + lo) / LINE;
            let end_line = (base + hi).div_ceil(LINE);
            ranges.push((first_line * LINE, end_line - first_line));
        }
        Ok(ranges)
    }

    /// Which of `seq`'s rows the device's poison list covers: per stream,
    /// K or V, the token ranges on poisoned lines. The device fails (or,
    /// asked to, skips) reads of exactly these; Clear Poison with the
    /// rows' data heals them.
    pub fn media_errors(&self, seq: &Sequence) -> Result<Vec<AffectedRows>> {
        let list = self.poison_list()?;
        if list.records.is_empty() || seq.tokens == 0 {
            return Ok(Vec::new());
        }
        let shape = seq.shape;
        let tpp = u64::from(seq.tokens_per_page);
        let row = shape.row_bytes();
        let keys = KeyLayout::new(u32::from(shape.head_dim), shape.dtype);
        let pages = seq.tokens.div_ceil(tpp);
        let map = self.kv_page_map(seq, 0, pages as u32)?;
        let frame_dpa = self.frame_dpas()?;
        let streams = u64::from(shape.layers) * u64::from(shape.heads);
        let frame_bytes = u64::from(KV_FRAME_SIZE);
        let mut affected = Vec::new();
        for (i, e) in map.iter().enumerate() {
            let (page, stream) = (i as u64 / streams, i as u64 % streams);
            let committed = (seq.tokens - page * tpp).min(tpp);
            for (frame, value) in [(e.key_frame.get(), false), (e.value_frame.get(), true)] {
                let base = frame_dpa(frame);
                // A partly committed key tile's bytes hold committed keys.
                let end = if value { committed * row } else { keys.bytes_of(0..committed).end };
                for r in &list.records {
                    let (start, stop) = (r.dpa, r.dpa + u64::from(r.lines) * LINE);
                    let lo = start.max(base);
                    let hi = stop.min(base + end.min(frame_bytes));
                    if lo >= hi {
                        continue;
                    }
                    let in_page = if value {
                        (lo - base) / row..(hi - base - 1) / row + 1
                    } else {
                        keys.tokens_of(lo - base..hi - base)
                    };
                    let in_page = in_page.start..in_page.end.min(committed);
                    affected.push(AffectedRows {
                        layer: (stream / u64::from(shape.heads)) as u16,
                        head: (stream % u64::from(shape.heads)) as u16,
                        value,
                        tokens: page * tpp + in_page.start..page * tpp + in_page.end,
                        dpa: lo - lo % LINE,
                        source: r.source,
                    });
                }
            }
        }
        affected.sort_by_key(|a| (a.layer, a.head, a.value, a.tokens.start));
        Ok(affected)
    }
}
