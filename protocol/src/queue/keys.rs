//! Where a key's elements lie in its K frame.
//!
//! Value frames always hold rows: token `t` of a page is row `t`, its
//! elements in order. Key frames hold rows too, unless a page's tokens fill
//! whole tiles of [`KEY_TILE_TOKENS`] (`tokens_per_page` a multiple of 16,
//! which every power-of-two head_dim gives). Then they hold **tiles**: tile
//! `t / 16` spans the same bytes as those 16 rows would, and stores them
//! dimension-major, element `j` of token `t` at element
//! `(t / 16) * 16 * head_dim + j * 16 + t % 16`.
//!
//! One vector load of a tile is one dimension of 16 tokens, so a GQA group
//! scores 16 tokens with one FMA per query per dimension and no horizontal
//! reduction: the layout that lets scoring run at the compute limit
//! (docs/PERFORMANCE.md, "Key tiles"). The host writes keys in this layout
//! through the page map; [`KeyLayout::write_rows`] does it.

use std::ops::Range;

use super::{Dtype, KV_FRAME_SIZE, tokens_per_page};

/// Tokens of one key tile: a 64-byte line holds one dimension of a tile's
/// f32 keys, or two dimensions of its 16-bit ones.
pub const KEY_TILE_TOKENS: u64 = 16;

/// How keys of one shape lie in their K frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLayout {
    /// Elements per key.
    pub head_dim: u64,
    /// Bytes per element.
    pub element_bytes: u64,
    /// Tiles (true) or rows.
    pub tiled: bool,
}

impl KeyLayout {
    /// The key layout of `head_dim` elements of `dtype` (0, which no valid
    /// sequence has, is taken as 1 rather than dividing by it).
    pub const fn new(head_dim: u32, dtype: Dtype) -> Self {
        let head_dim = if head_dim == 0 { 1 } else { head_dim };
        let tpp = tokens_per_page(head_dim, dtype) as u64;
        Self {
            head_dim: head_dim as u64,
            element_bytes: dtype.size() as u64,
            tiled: tpp.is_multiple_of(KEY_TILE_TOKENS) && tpp > 0,
        }
    }

    /// Bytes of one key.
    pub const fn row_bytes(&self) -> u64 {
        self.head_dim * self.element_bytes
    }

    /// Tokens of one page.
    pub const fn tokens_per_page(&self) -> u64 {
        KV_FRAME_SIZE as u64 / self.row_bytes()
    }

    /// Tokens whose elements are interleaved with each other: a tile's 16,
    /// or 1 for rows.
    pub const fn block_tokens(&self) -> u64 {
        if self.tiled { KEY_TILE_TOKENS } else { 1 }
    }

    /// Frame bytes holding page tokens `tokens` (ends clipped to whole
    /// blocks, so it may hold other tokens too).
    pub fn bytes_of(&self, tokens: Range<u64>) -> Range<u64> {
        if tokens.is_empty() {
            return 0..0;
        }
        let block = self.block_tokens();
        let first = tokens.start / block * block;
        let end = tokens.end.div_ceil(block) * block;
        first * self.row_bytes()..end * self.row_bytes()
    }

    /// Page tokens with an element in frame bytes `bytes`.
    pub fn tokens_of(&self, bytes: Range<u64>) -> Range<u64> {
        if bytes.is_empty() {
            return 0..0;
        }
        let block_bytes = self.block_tokens() * self.row_bytes();
        let block = self.block_tokens();
        (bytes.start / block_bytes * block)..((bytes.end - 1) / block_bytes + 1) * block
    }

    /// Frame byte offset of element `dim` of page token `token`.
    pub const fn element_offset(&self, token: u64, dim: u64) -> u64 {
        let element = if self.tiled {
            let tile = token / KEY_TILE_TOKENS;
            tile * KEY_TILE_TOKENS * self.head_dim + dim * KEY_TILE_TOKENS + token % KEY_TILE_TOKENS
        } else {
            token * self.head_dim + dim
        };
        element * self.element_bytes
    }

    /// Writes `rows` (keys of page tokens `first..`, one row after another)
    /// into the frame through `write(frame offset, bytes)`: rows as they
    /// are; for tiles, whole tiles assembled in `scratch` and written at
    /// once, parts of tiles one dimension's run of tokens at a time. Writes
    /// nothing outside the bytes of those tokens' elements.
    pub fn write_rows<E>(
        &self,
        first: u64,
        rows: &[u8],
        scratch: &mut Vec<u8>,
        mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let row = self.row_bytes() as usize;
        let count = (rows.len() / row) as u64;
        if !self.tiled {
            return write(first * row as u64, &rows[..count as usize * row]);
        }
        let (size, d) = (self.element_bytes as usize, self.head_dim as usize);
        let tile = KEY_TILE_TOKENS as usize;
        let mut token = first;
        let end = first + count;
        while token < end {
            let tile_start = token / KEY_TILE_TOKENS * KEY_TILE_TOKENS;
            let run_end = (tile_start + KEY_TILE_TOKENS).min(end);
            let lanes = (token - tile_start) as usize..(run_end - tile_start) as usize;
            // The run's rows in `rows`, from lane `lanes.start`.
            let src = &rows[(token - first) as usize * row..(run_end - first) as usize * row];
            let tile_offset = tile_start * row as u64;
            scratch.clear();
            if lanes.len() == tile {
                scratch.resize(tile * row, 0);
                transpose(size, src, d, scratch);
                write(tile_offset, scratch)?;
            } else {
                // Each dimension's run of lanes is contiguous in the tile.
                scratch.resize(d * lanes.len() * size, 0);
                transpose(size, src, d, scratch);
                for (j, run) in scratch.chunks_exact(lanes.len() * size).enumerate() {
                    write(tile_offset + ((j * tile + lanes.start) * size) as u64, run)?;
                }
            }
            token = run_end;
        }
        Ok(())
    }

    /// The stored bytes of the block (a row, or a tile) holding page token
    /// `token`, given `rows`: the keys of the block's tokens, one row after
    /// another from its first (fewer for a partly filled tile: the lanes of
    /// the missing ones read as zero). What Clear Poison must be handed to
    /// heal a key line with its data.
    pub fn block_bytes(&self, token: u64, rows: &[u8]) -> Vec<u8> {
        let span = self.bytes_of(token..token + 1);
        let first = token / self.block_tokens() * self.block_tokens();
        let mut out = vec![0u8; (span.end - span.start) as usize];
        let limit = (self.block_tokens() * self.row_bytes()) as usize;
        let written =
            self.write_rows(first, &rows[..rows.len().min(limit)], &mut Vec::new(), |at, b| {
                let at = (at - span.start) as usize;
                out[at..at + b.len()].copy_from_slice(b);
                Ok::<(), std::convert::Infallible>(())
            });
        let Ok(()) = written;
        out
    }
}

/// `rows` (n rows of `d` elements of `size` bytes) dimension-major into
/// `out`: element `j` of row `t` to element `j * n + t`.
fn transpose(size: usize, rows: &[u8], d: usize, out: &mut [u8]) {
    match size {
        2 => transpose_as::<2>(rows, d, out),
        4 => transpose_as::<4>(rows, d, out),
        _ => {
            let n = rows.len() / (d * size).max(1);
            for t in 0..n {
                for j in 0..d {
                    let (from, to) = ((t * d + j) * size, (j * n + t) * size);
                    out[to..to + size].copy_from_slice(&rows[from..from + size]);
                }
            }
        }
    }
}

/// [`transpose`] with the element size known: element moves are single
/// loads and stores (a runtime-sized copy is a call per element). Rows are
/// read in order, their elements written `n` apart.
fn transpose_as<const S: usize>(rows: &[u8], d: usize, out: &mut [u8]) {
    let (src, _) = rows.as_chunks::<S>();
    let (dst, _) = out.as_chunks_mut::<S>();
    let n = src.len() / d.max(1);
    let dst = &mut dst[..n * d];
    for (t, row) in src.chunks_exact(d.max(1)).take(n).enumerate() {
        for (j, &element) in row.iter().enumerate() {
            dst[j * n + t] = element;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> Vec<KeyLayout> {
        let mut all = Vec::new();
        for dtype in Dtype::ALL {
            for d in [1, 2, 3, 8, 64, 96, 128, 256] {
                all.push(KeyLayout::new(d, dtype));
            }
        }
        all
    }

    #[test]
    fn power_of_two_head_dims_are_tiled_and_others_are_rows() {
        assert!(KeyLayout::new(128, Dtype::F16).tiled);
        assert!(KeyLayout::new(256, Dtype::F32).tiled);
        assert!(KeyLayout::new(64, Dtype::Bf16).tiled);
        assert!(!KeyLayout::new(96, Dtype::F16).tiled, "341 tokens a page");
        assert!(!KeyLayout::new(3, Dtype::F32).tiled);
        // A head_dim of 0 (never valid) does not divide by zero.
        assert_eq!(KeyLayout::new(0, Dtype::F16), KeyLayout::new(1, Dtype::F16));
    }

    /// Every element lands once, inside its token's bytes, and
    /// `write_rows` of any split of a page reads back as the rows,
    /// touching no byte of another token.
    #[test]
    fn written_rows_read_back_and_stay_within_their_tokens() {
        for layout in layouts() {
            let (row, tpp) = (layout.row_bytes() as usize, layout.tokens_per_page());
            let n = tpp.min(40);
            let rows: Vec<u8> = (0..n as usize * row).map(|i| (i * 7 + 3) as u8).collect();
            for split in [0, 1, 5, 16, 17, 33] {
                let split = split.min(n);
                let mut frame = vec![0xEEu8; KV_FRAME_SIZE as usize];
                let mut scratch = Vec::new();
                let mut parts = vec![(0, split), (split, n)];
                parts.retain(|(a, b)| a < b);
                for (a, b) in parts {
                    let src = &rows[a as usize * row..b as usize * row];
                    layout
                        .write_rows::<()>(a, src, &mut scratch, |at, bytes| {
                            let at = at as usize;
                            let span = layout.bytes_of(a..b);
                            assert!(span.contains(&(at as u64)), "{layout:?} wrote outside");
                            frame[at..at + bytes.len()].copy_from_slice(bytes);
                            Ok(())
                        })
                        .unwrap();
                }
                let size = layout.element_bytes as usize;
                for t in 0..n {
                    for j in 0..layout.head_dim {
                        let at = layout.element_offset(t, j) as usize;
                        let want = &rows[t as usize * row + j as usize * size..][..size];
                        assert_eq!(&frame[at..at + size], want, "{layout:?} token {t} dim {j}");
                    }
                }
                // Bytes of tokens never written keep their contents.
                let written = layout.bytes_of(0..n);
                if layout.tiled {
                    // A partial last tile leaves its other lanes alone.
                    let tile = layout.bytes_of(n - 1..n);
                    let lane_free = (tile.start..tile.end)
                        .filter(|&b| {
                            let e = (b - tile.start) / layout.element_bytes;
                            e % KEY_TILE_TOKENS >= n % KEY_TILE_TOKENS
                                && !n.is_multiple_of(KEY_TILE_TOKENS)
                        })
                        .all(|b| frame[b as usize] == 0xEE);
                    assert!(lane_free, "{layout:?}");
                }
                assert!(frame[written.end as usize..].iter().all(|&b| b == 0xEE));
            }
        }
    }

    #[test]
    fn a_blocks_bytes_are_its_tokens_rows_as_stored() {
        for layout in layouts() {
            let row = layout.row_bytes() as usize;
            let block = layout.block_tokens();
            let rows: Vec<u8> = (0..3 * block as usize * row).map(|i| (i * 13 + 1) as u8).collect();
            let mut frame = vec![0u8; KV_FRAME_SIZE as usize];
            layout
                .write_rows::<()>(0, &rows, &mut Vec::new(), |at, b| {
                    frame[at as usize..at as usize + b.len()].copy_from_slice(b);
                    Ok(())
                })
                .unwrap();
            let token = block + 1.min(block - 1);
            let first = (token / block * block) as usize;
            let span = layout.bytes_of(token..token + 1);
            let got = layout.block_bytes(token, &rows[first * row..]);
            assert_eq!(got, frame[span.start as usize..span.end as usize], "{layout:?}");
        }
    }

    #[test]
    fn tokens_and_bytes_map_onto_each_other() {
        for layout in layouts() {
            let tpp = layout.tokens_per_page();
            for t in [0, 1, 15, 16, 17, tpp - 1] {
                let t = t.min(tpp - 1);
                let bytes = layout.bytes_of(t..t + 1);
                for j in 0..layout.head_dim {
                    assert!(bytes.contains(&layout.element_offset(t, j)));
                }
                assert!(layout.tokens_of(bytes.clone()).contains(&t));
                let line = bytes.start / 64 * 64..bytes.start / 64 * 64 + 64;
                let tokens = layout.tokens_of(line.clone());
                for b in line.clone().step_by(layout.element_bytes as usize) {
                    if b >= KV_FRAME_SIZE as u64 {
                        break;
                    }
                    // Every element in the line belongs to a token in range.
                    let token = if layout.tiled {
                        let tile_bytes = KEY_TILE_TOKENS * layout.row_bytes();
                        b / tile_bytes * KEY_TILE_TOKENS
                            + (b % tile_bytes / layout.element_bytes) % KEY_TILE_TOKENS
                    } else {
                        b / layout.row_bytes()
                    };
                    assert!(tokens.contains(&token), "{layout:?} line {line:?} byte {b}");
                }
            }
        }
    }
}
