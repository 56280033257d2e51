//! KV tiering, evict instead of drop: the hot tokens in host memory
//! (standing in for GPU HBM), the rest evicted into a device set, and one
//! decode step's attention over both.
//!
//! A sequence's tokens are in three places:
//! - **sinks**: the first `sinks` tokens, kept in host memory for good
//!   (attention sinks: nearly every query attends to them);
//! - **evicted**: tokens `sinks..window_start`, in the device set;
//! - **hot window**: the newest tokens, `window_start..tokens`, in host
//!   memory. When the window holds `hot_window + evict_batch` tokens, its
//!   oldest `evict_batch` go to the device set in one append.
//!
//! [`TieredKv::attend`] computes a decode step's attention for one (layer,
//! KV head): exact over the sinks and the hot window, plus the device
//! set's exact Top-K rows of the evicted part (the GQA group's queries
//! scored next to the device DRAM, k rows back), under **one softmax**
//! over all of them: what full attention gives when the evicted tokens
//! outside the Top-K carry no weight. With k at least the evicted tokens it
//! is full attention.

use std::borrow::Borrow;

use crate::error::{Error, Result};
use crate::kv::{KvShape, Query};
use crate::set::{DeviceSet, SetTopK, SetTopkRequest, ShardedSequence};
use pnm_protocol::Dtype;

/// How a [`TieredKv`] splits a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TieredOptions {
    /// Newest tokens kept in host memory (at least this many once the
    /// sequence is longer than `sinks + hot_window`).
    pub hot_window: u64,
    /// Leading tokens kept in host memory for good.
    pub sinks: u64,
    /// Tokens evicted per append to the device set (0: one page's worth,
    /// the set's stripe, so every eviction fills whole pages).
    pub evict_batch: u64,
    /// Rows the device set returns per (layer, KV head) each step.
    pub k: u32,
}

/// One (layer, KV head)'s tokens in host memory, as stored (for eviction)
/// and as f32 (for attention).
#[derive(Debug, Default, Clone)]
struct HostRows {
    raw_keys: Vec<u8>,
    raw_values: Vec<u8>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl HostRows {
    fn push(&mut self, dtype: Dtype, keys: &[u8], values: &[u8]) {
        self.raw_keys.extend_from_slice(keys);
        self.raw_values.extend_from_slice(values);
        decode_into(dtype, keys, &mut self.keys);
        decode_into(dtype, values, &mut self.values);
    }

    /// Removes the first `n` rows of `row_bytes` (`head_dim` elements).
    fn drain_front(&mut self, n: usize, row_bytes: usize, head_dim: usize) {
        self.raw_keys.drain(..n * row_bytes);
        self.raw_values.drain(..n * row_bytes);
        self.keys.drain(..n * head_dim);
        self.values.drain(..n * head_dim);
    }
}

/// What one [`TieredKv::attend`] did.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AttendStats {
    /// Tokens attended in host memory (sinks and hot window).
    pub host_tokens: u64,
    /// Evicted tokens (scored by the device set).
    pub evicted_tokens: u64,
    /// Global indices of the evicted tokens the device selected, best first.
    pub selected: Vec<u32>,
    /// Bytes over the links: queries to every device, each device's k
    /// best back, the selected rows, and the command entries.
    pub link_bytes: u64,
    /// The device set's answer (None when nothing is evicted yet).
    pub topk: Option<SetTopK>,
}

/// A sequence tiered between host memory and a device set.
///
/// `S` is how it holds the set: borrowed (`&DeviceSet`), owned, or shared
/// (`Arc<DeviceSet>`, or any owner that lends one, as the Python binding's).
#[derive(Debug)]
pub struct TieredKv<S: Borrow<DeviceSet>> {
    set: S,
    seq: ShardedSequence,
    options: TieredOptions,
    tokens: u64,
    /// First token of the hot window (sinks..window_start are evicted).
    window_start: u64,
    /// Per (layer, head): the sinks and the hot window.
    sinks: Vec<HostRows>,
    window: Vec<HostRows>,
    /// Bytes written to the device set by evictions so far.
    evicted_bytes: u64,
}

/// Bytes of a submission and a completion entry: what every command costs
/// on the link besides its data.
const COMMAND_BYTES: u64 = 64 + 32;

impl<S: Borrow<DeviceSet>> TieredKv<S> {
    /// An empty tiered sequence of `shape`, its evicted part on `set`.
    pub fn new(set: S, shape: KvShape, options: TieredOptions) -> Result<Self> {
        if options.k == 0 {
            return Err(Error::Invalid("a tiered sequence needs k of at least 1".into()));
        }
        let seq = set.borrow().kv_create(shape)?;
        let mut options = options;
        if options.evict_batch == 0 {
            options.evict_batch = seq.striping.stripe;
        }
        let streams = usize::from(shape.layers) * usize::from(shape.heads);
        Ok(Self {
            set,
            seq,
            options,
            tokens: 0,
            window_start: 0,
            sinks: vec![HostRows::default(); streams],
            window: vec![HostRows::default(); streams],
            evicted_bytes: 0,
        })
    }

    pub fn shape(&self) -> KvShape {
        self.seq.shape
    }

    pub fn options(&self) -> TieredOptions {
        self.options
    }

    /// Tokens in the sequence.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Tokens in the device set.
    pub fn evicted(&self) -> u64 {
        self.window_start.saturating_sub(self.options.sinks)
    }

    /// Tokens in host memory (sinks and hot window).
    pub fn host_tokens(&self) -> u64 {
        self.tokens - self.evicted()
    }

    /// Bytes written into the device set by evictions so far.
    pub fn evicted_bytes(&self) -> u64 {
        self.evicted_bytes
    }

    /// The evicted part as the device set holds it.
    pub fn device_sequence(&self) -> &ShardedSequence {
        &self.seq
    }

    /// Appends `tokens` tokens (K and V laid out `[layers][heads][tokens]
    /// [head_dim]` in the sequence's dtype) and evicts what no longer fits
    /// the hot window. If the eviction fails, the tokens it could not
    /// move stay in host memory (the tokens are appended either way) and
    /// the next append or [`retry_eviction`](Self::retry_eviction) moves them.
    pub fn append(&mut self, keys: &[u8], values: &[u8], tokens: u64) -> Result<()> {
        let shape = self.seq.shape;
        shape.check_rows(keys, values, tokens)?;
        let row = shape.row_bytes() as usize;
        let to_sinks = self.options.sinks.saturating_sub(self.tokens).min(tokens) as usize;
        for (s, (sink, hot)) in self.sinks.iter_mut().zip(&mut self.window).enumerate() {
            let run = s * tokens as usize * row..(s + 1) * tokens as usize * row;
            let (k, v) = (&keys[run.clone()], &values[run]);
            sink.push(shape.dtype, &k[..to_sinks * row], &v[..to_sinks * row]);
            hot.push(shape.dtype, &k[to_sinks * row..], &v[to_sinks * row..]);
        }
        self.tokens += tokens;
        if self.window_start < self.options.sinks {
            self.window_start = self.tokens.min(self.options.sinks);
        }
        let window = self.tokens - self.window_start;
        if window >= self.options.hot_window + self.options.evict_batch || !self.seq.is_consistent()
        {
            self.evict(window.saturating_sub(self.options.hot_window))?;
        }
        Ok(())
    }

    /// Moves the oldest `n` hot tokens into the device set. If the set's
    /// append fails midway (one device refused after others committed),
    /// the tokens every shard now holds leave the window, the rest stay,
    /// and [`retry_eviction`](Self::retry_eviction) (or the next append)
    /// writes only what is missing.
    fn evict(&mut self, n: u64) -> Result<()> {
        let shape = self.seq.shape;
        let row = shape.row_bytes() as usize;
        let len = n as usize * row;
        let mut keys = Vec::with_capacity(self.window.len() * len);
        let mut values = Vec::with_capacity(self.window.len() * len);
        for hot in &self.window {
            keys.extend_from_slice(&hot.raw_keys[..len]);
            values.extend_from_slice(&hot.raw_values[..len]);
        }
        match self.set.borrow().kv_append(&self.seq, &keys, &values, n) {
            Ok(seq) => {
                self.seq = seq;
                self.leave_window(n);
                Ok(())
            }
            Err(e) => {
                match self.set.borrow().kv_resync(&self.seq) {
                    Ok(resynced) => {
                        let held = resynced.tokens.saturating_sub(self.seq.tokens).min(n);
                        self.seq = resynced;
                        self.leave_window(held);
                    }
                    Err(resync) => {
                        tracing::warn!(error = %resync, "could not read the device set back")
                    }
                }
                Err(e)
            }
        }
    }

    /// The oldest `n` window tokens are in the device set now.
    fn leave_window(&mut self, n: u64) {
        let shape = self.seq.shape;
        let (row, d) = (shape.row_bytes() as usize, usize::from(shape.head_dim));
        for hot in &mut self.window {
            hot.drain_front(n as usize, row, d);
        }
        self.window_start += n;
        self.evicted_bytes += 2 * shape.bytes(n);
    }

    /// Completes an eviction that failed midway (see [`append`](Self::append)):
    /// evicts whatever the window holds beyond `hot_window`.
    pub fn retry_eviction(&mut self) -> Result<()> {
        let window = self.tokens - self.window_start;
        if window > self.options.hot_window || !self.seq.is_consistent() {
            self.evict(window.saturating_sub(self.options.hot_window))?;
        }
        Ok(())
    }

    /// One decode step's attention for (layer, head): `queries` holds the
    /// GQA group's G queries of `head_dim` f32 each, `out` receives G
    /// outputs. Exact over the host tokens, plus the device set's Top-K
    /// rows of the evicted tokens (selected by the group's max score),
    /// under one softmax with scale 1/sqrt(head_dim).
    pub fn attend(
        &self,
        layer: u16,
        head: u16,
        queries: &[f32],
        out: &mut [f32],
    ) -> Result<AttendStats> {
        let shape = self.seq.shape;
        let d = usize::from(shape.head_dim);
        if layer >= shape.layers || head >= shape.heads {
            return Err(Error::Invalid(format!("layer {layer} / head {head} of {shape}")));
        }
        if queries.is_empty() || !queries.len().is_multiple_of(d) || out.len() != queries.len() {
            return Err(Error::Invalid(format!(
                "{} query and {} output elements for head_dim {d}",
                queries.len(),
                out.len()
            )));
        }
        let stream = usize::from(layer) * usize::from(shape.heads) + usize::from(head);
        let (sink, hot) = (&self.sinks[stream], &self.window[stream]);
        let evicted = self.evicted();
        if !self.seq.is_consistent() {
            return Err(Error::Invalid(
                "an eviction failed midway and the device set holds part of it: \
                 retry_eviction (or the next append) completes it"
                    .into(),
            ));
        }
        let mut stats = AttendStats {
            host_tokens: self.host_tokens(),
            evicted_tokens: evicted,
            selected: Vec::new(),
            link_bytes: 0,
            topk: None,
        };
        let mut device_rows = (Vec::new(), Vec::new());
        if evicted > 0 {
            let query = Query::f32(queries, d);
            let request = SetTopkRequest::new(&self.seq, layer, head, &query, self.options.k);
            let (top, rows) = self.set.borrow().topk_gather(&request)?;
            decode_into(shape.dtype, &rows.keys, &mut device_rows.0);
            decode_into(shape.dtype, &rows.values, &mut device_rows.1);
            let n = top.top.indices.len() as u64;
            let live = self.seq.shards.iter().filter(|s| s.tokens > 0);
            stats.link_bytes = live
                .map(|s| {
                    COMMAND_BYTES
                        + query.data.len() as u64
                        + 8 * u64::from(self.options.k).min(s.tokens)
                })
                .sum::<u64>()
                + gathers(&self.seq, &top.top.indices) * COMMAND_BYTES
                + 4 * n
                + 2 * n * shape.row_bytes();
            // Device indices count from the first evicted token.
            stats.selected =
                top.top.indices.iter().map(|&i| i + self.options.sinks as u32).collect();
            stats.topk = Some(top);
        }
        let parts: [(&[f32], &[f32]); 3] = [
            (&sink.keys, &sink.values),
            (&hot.keys, &hot.values),
            (&device_rows.0, &device_rows.1),
        ];
        for (q, o) in queries.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            attend_one(q, &parts, d, o);
        }
        Ok(stats)
    }

    /// K and V rows of tokens `from..to` of (layer, head), wherever they
    /// are: host memory, or gathered back from the device set.
    pub fn recall(&self, layer: u16, head: u16, from: u64, to: u64) -> Result<(Vec<u8>, Vec<u8>)> {
        let shape = self.seq.shape;
        if from > to || to > self.tokens || layer >= shape.layers || head >= shape.heads {
            return Err(Error::Invalid(format!(
                "tokens {from}..{to} of layer {layer} head {head}: the sequence holds {} tokens of {shape}",
                self.tokens
            )));
        }
        let row = shape.row_bytes() as usize;
        let stream = usize::from(layer) * usize::from(shape.heads) + usize::from(head);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let sinks = self.options.sinks.min(self.window_start);
        // Sinks, then evicted, then the window: each a contiguous run.
        let push_host = |keys: &mut Vec<u8>,
                         values: &mut Vec<u8>,
                         rows: &HostRows,
                         first: u64,
                         lo: u64,
                         hi: u64| {
            if lo < hi {
                let at = (lo - first) as usize * row..(hi - first) as usize * row;
                keys.extend_from_slice(&rows.raw_keys[at.clone()]);
                values.extend_from_slice(&rows.raw_values[at]);
            }
        };
        push_host(&mut keys, &mut values, &self.sinks[stream], 0, from.min(sinks), to.min(sinks));
        let (lo, hi) = (from.max(sinks), to.min(self.window_start));
        if lo < hi {
            // In chunks, so each gather's DMA buffer stays modest.
            let mut at = lo;
            while at < hi {
                let end = (at + 4096).min(hi);
                let indices: Vec<u32> = (at - sinks..end - sinks).map(|t| t as u32).collect();
                let rows = self.set.borrow().gather(&self.seq, layer, head, &indices)?;
                keys.extend_from_slice(&rows.keys);
                values.extend_from_slice(&rows.values);
                at = end;
            }
        }
        let start = self.window_start;
        push_host(&mut keys, &mut values, &self.window[stream], start, from.max(start), to);
        Ok((keys, values))
    }

    /// Frees the evicted part on the device set.
    pub fn free(self) -> Result<()> {
        self.set.borrow().kv_free(&self.seq)
    }
}

/// Devices holding at least one of `indices` (each gets one GATHER).
fn gathers(seq: &ShardedSequence, indices: &[u32]) -> u64 {
    let mut holders = vec![false; seq.shards.len()];
    for &t in indices {
        holders[seq.striping.locate(u64::from(t)).0] = true;
    }
    holders.iter().filter(|&&h| h).count() as u64
}

/// Softmax attention of one query over every (keys, values) part at once:
/// each logit computed once (f32 products, f64 sums), then one softmax.
fn attend_one(q: &[f32], parts: &[(&[f32], &[f32])], d: usize, out: &mut [f32]) {
    let scale = 1.0 / (d as f64).sqrt();
    let logits: Vec<f64> = parts
        .iter()
        .flat_map(|(keys, _)| keys.chunks_exact(d))
        .map(|k| f64::from(q.iter().zip(k).map(|(&a, &b)| a * b).sum::<f32>()) * scale)
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut acc = vec![0f64; d];
    let mut total = 0f64;
    let values = parts.iter().flat_map(|(_, values)| values.chunks_exact(d));
    for (&logit, v) in logits.iter().zip(values) {
        let w = (logit - max).exp();
        total += w;
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += w * f64::from(x);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = if total > 0.0 { (a / total) as f32 } else { 0.0 };
    }
}

/// Appends `bytes` of `dtype` elements, as f32, to `out`.
fn decode_into(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => {
            out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        }
        Dtype::F16 => {
            out.extend(bytes.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))))
        }
        // bf16 is the top half of an f32.
        Dtype::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
    }
}

/// IEEE half to f32, exactly (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1F);
    let mant = u32::from(h & 0x3FF);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        // Subnormal: value = mant x 2^-24, exact in f32.
        (0, m) => {
            let v = m as f32 / 16_777_216.0;
            return if sign != 0 { -v } else { v };
        }
        (0x1F, m) => sign | 0x7F80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;

    #[test]
    fn every_half_converts_exactly() {
        for h in 0..=u16::MAX {
            let got = f16_to_f32(h);
            // Reference: the half's value from its fields, in f64.
            let (sign, exp, mant) = (h >> 15, (h >> 10) & 0x1F, f64::from(h & 0x3FF));
            let magnitude = match exp {
                0 => mant * 2f64.powi(-24),
                0x1F if mant == 0.0 => f64::INFINITY,
                0x1F => f64::NAN,
                e => (1.0 + mant / 1024.0) * 2f64.powi(i32::from(e) - 15),
            };
            let want = if sign == 1 { -magnitude } else { magnitude };
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(f64::from(got), want, "{h:#06x}");
                assert_eq!(got.is_sign_negative(), sign == 1, "{h:#06x}");
            }
        }
    }
}
