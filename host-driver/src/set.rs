//! A device set: N PNM devices serving one KV store.
//!
//! A sequence is sharded across the devices **by pages, round robin**:
//! global token `t` lives in stripe `t / S` (S = the sequence's tokens per
//! page), on device `stripe % N`, at local token
//! `(stripe / N) * S + t % S` of that device's shard. Why pages in round
//! robin rather than contiguous ranges:
//! - scoring is balanced at every length (shards differ by at most one
//!   page), so a fan-out waits for no straggler; with contiguous ranges a
//!   growing sequence fills one device after another and the first
//!   devices score everything until the last ones catch up;
//! - a decode loop's appends and its most attended recent tokens spread
//!   over every device instead of landing on the last one;
//! - whole pages keep each device's page bounds (page selection) and
//!   frames full, and the map is monotonic within a shard, so a device's
//!   tie order (lower index first) is the set's.
//!
//! A Top-K fans out to every device in parallel (one thread per device
//! beyond the first), each device returns its shard's k best (in rank
//! order, which the host checks), and the host merges the sorted answers
//! (k-way) by the protocol's [`rank`]: the k best of the union contain
//! the k best of the whole, so the answer equals one device holding every
//! token, ties included. [`DeviceSet::topk_gather`] then gathers the k
//! selected rows from the devices that hold them (k rows over the links in
//! all, not N x k). An error on one device names it
//! ([`Error::Member`]); the other devices are not touched by it.
//!
//! Appends go to the devices whose shards the new tokens extend, each one
//! atomic on its device. If one fails after others committed, the sequence
//! is torn: [`DeviceSet::kv_resync`] reads each shard back and finds the
//! longest prefix every shard holds; appending the caller's rows from that
//! token on writes only what is missing (a shard already ahead skips the
//! rows it holds).

use std::path::PathBuf;
use std::time::Instant;

use pnm_protocol::queue::rank;

use crate::device::{Device, DeviceOptions};
use crate::error::{Error, Result};
use crate::kv::{Aggregation, KvShape, Query, Rows, Sequence, TopK, TopkRequest};

/// How a sharded sequence's tokens map onto the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Striping {
    /// Tokens per stripe (the sequence's tokens per page).
    pub stripe: u64,
    pub devices: u64,
}

impl Striping {
    /// The device and local token of global token `t`.
    pub fn locate(&self, t: u64) -> (usize, u64) {
        let stripe = t / self.stripe;
        ((stripe % self.devices) as usize, (stripe / self.devices) * self.stripe + t % self.stripe)
    }

    /// The global token of `device`'s local token `local`.
    pub fn global(&self, device: usize, local: u64) -> u64 {
        let round = local / self.stripe;
        (round * self.devices + device as u64) * self.stripe + local % self.stripe
    }

    /// Tokens `device` holds when the sequence holds `total`.
    pub fn shard_tokens(&self, device: usize, total: u64) -> u64 {
        let round = self.stripe * self.devices;
        let tail = (total % round).saturating_sub(device as u64 * self.stripe).min(self.stripe);
        total / round * self.stripe + tail
    }
}

/// A sequence sharded across a device set: one shard per device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ShardedSequence {
    pub shape: KvShape,
    /// Tokens of the whole sequence (every shard agrees with it unless an
    /// append was torn).
    pub tokens: u64,
    pub striping: Striping,
    /// Shard i lives on device i.
    pub shards: Vec<Sequence>,
}

impl ShardedSequence {
    /// True if every shard holds exactly its share of `tokens`.
    pub fn is_consistent(&self) -> bool {
        self.shards
            .iter()
            .enumerate()
            .all(|(d, s)| s.tokens == self.striping.shard_tokens(d, self.tokens))
    }
}

/// A Top-K over a sharded sequence (exact: page selection picks pages per
/// device and is not offered across a set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetTopkRequest<'a> {
    pub seq: &'a ShardedSequence,
    pub layer: u16,
    pub head: u16,
    pub query: &'a Query,
    pub k: u32,
    pub aggregation: Aggregation,
    pub skip_bad_rows: bool,
}

impl<'a> SetTopkRequest<'a> {
    pub fn new(seq: &'a ShardedSequence, layer: u16, head: u16, query: &'a Query, k: u32) -> Self {
        Self { seq, layer, head, query, k, aggregation: Aggregation::Max, skip_bad_rows: false }
    }

    pub fn with_aggregation(self, aggregation: Aggregation) -> Self {
        Self { aggregation, ..self }
    }

    pub fn skipping_bad_rows(self) -> Self {
        Self { skip_bad_rows: true, ..self }
    }

    fn on_shard(&self, device: usize) -> TopkRequest<'a> {
        TopkRequest {
            aggregation: self.aggregation,
            skip_bad_rows: self.skip_bad_rows,
            ..TopkRequest::new(&self.seq.shards[device], self.layer, self.head, self.query, self.k)
        }
    }
}

/// What one device did for a fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ShardTime {
    pub tokens_scored: u64,
    /// Nanoseconds the device spent (TOPK, plus GATHER for a gather).
    pub device_ns: u64,
    /// Nanoseconds its modelled hardware would take.
    pub model_ns: u64,
}

/// A set's Top-K: the merged answer and how the fan-out went.
///
/// In `top`, `device_ns` and `model_ns` are the fan-out's: the slowest
/// device's (they run in parallel, each on its own link) plus the host's
/// merge, which is real work on this host and counted as measured
/// (`merge_ns`).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SetTopK {
    pub top: TopK,
    pub devices: Vec<ShardTime>,
    pub merge_ns: u64,
}

/// N devices serving one KV store.
#[derive(Debug)]
pub struct DeviceSet {
    devices: Vec<Device>,
}

/// Wraps a device's error with which device it was.
fn member(device: usize, d: &Device) -> impl FnOnce(Error) -> Error + '_ {
    move |e| Error::Member { device, path: d.path().to_path_buf(), error: Box::new(e) }
}

impl DeviceSet {
    /// A set of open devices; device i holds shard i of every sequence.
    pub fn new(devices: Vec<Device>) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::Invalid("a device set needs at least one device".into()));
        }
        Ok(Self { devices })
    }

    /// Opens every path (in order) with the same options.
    pub fn open(paths: &[PathBuf], options: &DeviceOptions) -> Result<Self> {
        let devices = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Device::open_with(p, options).map_err(|e| Error::Member {
                    device: i,
                    path: p.clone(),
                    error: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(devices)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Runs `f` on every device at once (the first on this thread) and
    /// returns the answers in device order.
    fn on_each<T: Send>(&self, f: impl Fn(usize, &Device) -> T + Sync) -> Vec<T> {
        if self.devices.len() == 1 {
            return vec![f(0, &self.devices[0])];
        }
        std::thread::scope(|scope| {
            let f = &f;
            let others: Vec<_> = self.devices[1..]
                .iter()
                .enumerate()
                .map(|(i, d)| scope.spawn(move || f(i + 1, d)))
                .collect();
            let mut answers = vec![f(0, &self.devices[0])];
            answers.extend(others.into_iter().map(|h| h.join().expect("device thread panicked")));
            answers
        })
    }

    /// Creates an empty sequence with a shard on every device. If one
    /// device refuses, the shards already created are freed.
    pub fn kv_create(&self, shape: KvShape) -> Result<ShardedSequence> {
        let created = self.on_each(|i, d| d.kv_create(shape).map_err(member(i, d)));
        if created.iter().any(Result::is_err) {
            for (i, s) in created.iter().enumerate() {
                if let Ok(s) = s
                    && let Err(e) = self.devices[i].kv_free(s.id)
                {
                    tracing::warn!(device = i, seq = s.id, error = %e, "could not free a shard");
                }
            }
            return Err(created.into_iter().find_map(Result::err).expect("one failed"));
        }
        let shards: Vec<Sequence> = created.into_iter().map(|s| s.expect("all created")).collect();
        let stripe = u64::from(shards[0].tokens_per_page);
        Ok(ShardedSequence {
            shape,
            tokens: 0,
            striping: Striping { stripe, devices: self.devices.len() as u64 },
            shards,
        })
    }

    /// The sharded sequence whose shard on device i is `ids[i]`, read back
    /// from the devices (for a tool that names it by its shard ids): the
    /// shards must share one shape; `tokens` is as [`kv_resync`](Self::kv_resync)
    /// finds it.
    pub fn kv_sequence(&self, ids: &[u32]) -> Result<ShardedSequence> {
        if ids.len() != self.devices.len() {
            return Err(Error::Invalid(format!(
                "{} shard ids for a set of {} devices",
                ids.len(),
                self.devices.len()
            )));
        }
        let read = self.on_each(|i, d| d.kv_sequence(ids[i]).map_err(member(i, d)));
        let shards = read.into_iter().collect::<Result<Vec<_>>>()?;
        let shape = shards[0].shape;
        if let Some(i) = shards.iter().position(|s| s.shape != shape) {
            return Err(Error::Invalid(format!(
                "shard {} on device {i} is {}; shard {} on device 0 is {shape}",
                ids[i], shards[i].shape, ids[0]
            )));
        }
        let stripe = u64::from(shards[0].tokens_per_page);
        let striping = Striping { stripe, devices: self.devices.len() as u64 };
        let tokens = held_prefix(striping, &shards);
        Ok(ShardedSequence { shape, tokens, striping, shards })
    }

    /// Frees every shard; all are tried, the first error is returned.
    pub fn kv_free(&self, seq: &ShardedSequence) -> Result<()> {
        self.check_shape(seq)?;
        let freed = self.on_each(|i, d| d.kv_free(seq.shards[i].id).map_err(member(i, d)));
        freed.into_iter().collect::<Result<Vec<()>>>().map(drop)
    }

    /// The sequence as the devices hold it now: every shard read back, and
    /// `tokens` the longest prefix that every shard holds in full. After a
    /// torn append, append the rows from its `tokens` on again (see
    /// [`kv_append`](Self::kv_append)).
    pub fn kv_resync(&self, seq: &ShardedSequence) -> Result<ShardedSequence> {
        self.check_shape(seq)?;
        let read = self.on_each(|i, d| d.kv_sequence(seq.shards[i].id).map_err(member(i, d)));
        let shards = read.into_iter().collect::<Result<Vec<_>>>()?;
        let tokens = held_prefix(seq.striping, &shards);
        Ok(ShardedSequence { tokens, shards, ..seq.clone() })
    }

    /// Appends `tokens` tokens (K and V laid out `[layers][heads][tokens]
    /// [head_dim]`, as [`Device::kv_append`] takes them) at the end of the
    /// sequence. Each device's part is one atomic append on it; a shard
    /// that already holds some of its part (a torn earlier attempt, after
    /// [`kv_resync`](Self::kv_resync)) gets only the rest: the caller
    /// retries with the same rows, from the resynced `tokens` on.
    pub fn kv_append(
        &self,
        seq: &ShardedSequence,
        keys: &[u8],
        values: &[u8],
        tokens: u64,
    ) -> Result<ShardedSequence> {
        self.check_shape(seq)?;
        let shape = seq.shape;
        shape.check_rows(keys, values, tokens)?;
        let st = seq.striping;
        let (start, end) = (seq.tokens, seq.tokens + tokens);
        if end > u64::from(u32::MAX) {
            // Top-K answers name tokens as u32, across the whole set too.
            return Err(Error::Invalid(format!(
                "a sharded sequence holds at most {} tokens; this append would make {end}",
                u32::MAX
            )));
        }
        // Each device's part, from its shard's current end.
        let parts: Vec<(u64, u64)> = (0..self.devices.len())
            .map(|d| {
                let (from, to) = (st.shard_tokens(d, start), st.shard_tokens(d, end));
                let held = seq.shards[d].tokens;
                if held < from || held > to {
                    return Err(Error::Invalid(format!(
                        "shard {d} holds {held} tokens; appending tokens {start}..{end} needs it \
                         to hold {from}..={to}: resync the sequence (kv_resync)"
                    )));
                }
                Ok((held, to))
            })
            .collect::<Result<_>>()?;
        let appended = self.on_each(|d, device| {
            let (from, to) = parts[d];
            let shard = &seq.shards[d];
            if from == to {
                return Ok(*shard);
            }
            let result = if self.devices.len() == 1 {
                device.kv_append(shard, keys, values, tokens, &mut |_| {})
            } else {
                let (k, v) = shard_rows(&shape, st, d, start, tokens, from..to, keys, values);
                device.kv_append(shard, &k, &v, to - from, &mut |_| {})
            };
            result.map_err(member(d, device))
        });
        let mut shards = Vec::with_capacity(appended.len());
        let mut first_error = None;
        for (d, r) in appended.into_iter().enumerate() {
            match r {
                Ok(s) => shards.push(s),
                Err(e) => {
                    shards.push(seq.shards[d]);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(ShardedSequence { tokens: end, shards, ..seq.clone() }),
        }
    }

    /// The exact Top-K over the whole sequence.
    pub fn topk(&self, request: &SetTopkRequest<'_>) -> Result<SetTopK> {
        self.topk_batch(std::slice::from_ref(request))?.pop().expect("one request, one answer")
    }

    /// Many Top-Ks: each device runs its part of every request as one
    /// batch on its queue, then each request's answers are merged.
    pub fn topk_batch(&self, requests: &[SetTopkRequest<'_>]) -> Result<Vec<Result<SetTopK>>> {
        for r in requests {
            self.check_shape(r.seq)?;
            if !r.seq.is_consistent() {
                return Err(Error::Invalid(format!(
                    "sequence of {} tokens has shards that disagree with it (a torn append): \
                     kv_resync and retry the append",
                    r.seq.tokens
                )));
            }
        }
        let answers = self.on_each(|d, device| {
            // A shard with no tokens has nothing to score.
            let live: Vec<usize> =
                (0..requests.len()).filter(|&r| requests[r].seq.shards[d].tokens > 0).collect();
            let shard_requests: Vec<TopkRequest<'_>> =
                live.iter().map(|&r| requests[r].on_shard(d)).collect();
            let mut out: Vec<Option<Result<TopK>>> = (0..requests.len()).map(|_| None).collect();
            match device.topk_batch(&shard_requests) {
                Ok(results) => {
                    for (r, result) in live.into_iter().zip(results) {
                        out[r] = Some(result.map_err(member(d, device)));
                    }
                    Ok(out)
                }
                Err(e) => Err(member(d, device)(e)),
            }
        });
        let per_device = answers.into_iter().collect::<Result<Vec<_>>>()?;
        let mut per_device: Vec<std::vec::IntoIter<Option<Result<TopK>>>> =
            per_device.into_iter().map(Vec::into_iter).collect();
        Ok(requests
            .iter()
            .map(|r| {
                let parts: Vec<Option<Result<TopK>>> =
                    per_device.iter_mut().map(|it| it.next().expect("one per request")).collect();
                self.merge(r, parts)
            })
            .collect())
    }

    /// Merges each device's Top-K of its shard into the Top-K of the whole.
    fn merge(&self, r: &SetTopkRequest<'_>, parts: Vec<Option<Result<TopK>>>) -> Result<SetTopK> {
        let st = r.seq.striping;
        let mut devices = Vec::with_capacity(parts.len());
        // Each device's answer, best first, in global token numbers.
        let mut lists: Vec<Vec<(f32, u32)>> = Vec::with_capacity(parts.len());
        let (mut scored, mut skipped) = (0, 0);
        let start = Instant::now();
        for (d, part) in parts.into_iter().enumerate() {
            let Some(part) = part else {
                devices.push(ShardTime::default());
                continue;
            };
            let top = part?;
            let held = r.seq.shards[d].tokens;
            if top.tokens != held {
                return Err(member(d, &self.devices[d])(Error::Invalid(format!(
                    "its shard holds {} tokens, the set expects {held}: another writer appended \
                     to it, or an append was torn (kv_resync)",
                    top.tokens
                ))));
            }
            scored += top.tokens_scored;
            skipped += top.skipped;
            devices.push(ShardTime {
                tokens_scored: top.tokens_scored,
                device_ns: top.device_ns,
                model_ns: top.model_ns,
            });
            let list: Vec<(f32, u32)> = top
                .indices
                .iter()
                .zip(&top.scores)
                .map(|(&i, &s)| (s, st.global(d, u64::from(i)) as u32))
                .collect();
            // The merge relies on each answer's order and completeness: a
            // device that broke either is named, not trusted.
            if list.windows(2).any(|w| rank(w[0], w[1]) != std::cmp::Ordering::Less) {
                return Err(member(d, &self.devices[d])(Error::Protocol(
                    "TOPK results are not in rank order".into(),
                )));
            }
            let expected = u64::from(r.k).min(top.tokens_scored);
            if list.len() as u64 != expected {
                return Err(member(d, &self.devices[d])(Error::Protocol(format!(
                    "TOPK returned {} results of k {} over {} scored tokens",
                    list.len(),
                    r.k,
                    top.tokens_scored
                ))));
            }
            lists.push(list);
        }
        // A k-way merge of sorted answers: k picks among N heads, so its
        // cost follows k, not N x k.
        let k = (r.k as usize).min(lists.iter().map(Vec::len).sum());
        let mut heads = vec![0usize; lists.len()];
        let mut candidates = Vec::with_capacity(k);
        while candidates.len() < k {
            let best = (0..lists.len())
                .filter(|&d| heads[d] < lists[d].len())
                .min_by(|&a, &b| rank(lists[a][heads[a]], lists[b][heads[b]]))
                .expect("k is at most the candidates");
            candidates.push(lists[best][heads[best]]);
            heads[best] += 1;
        }
        let merge_ns = start.elapsed().as_nanos() as u64;
        let slowest = |f: fn(&ShardTime) -> u64| devices.iter().map(f).max().unwrap_or(0);
        let top = TopK {
            indices: candidates.iter().map(|c| c.1).collect(),
            scores: candidates.iter().map(|c| c.0).collect(),
            tokens: r.seq.tokens,
            tokens_scored: scored,
            skipped,
            device_ns: slowest(|t| t.device_ns) + merge_ns,
            model_ns: slowest(|t| t.model_ns) + merge_ns,
        };
        Ok(SetTopK { top, devices, merge_ns })
    }

    /// The K and V rows of global tokens `indices` of (layer, head), in
    /// that order, each gathered from the device that holds it.
    pub fn gather(
        &self,
        seq: &ShardedSequence,
        layer: u16,
        head: u16,
        indices: &[u32],
    ) -> Result<Rows> {
        Ok(self.gather_timed(seq, layer, head, indices)?.0)
    }

    /// [`gather`](Self::gather), and each device's device and model time.
    fn gather_timed(
        &self,
        seq: &ShardedSequence,
        layer: u16,
        head: u16,
        indices: &[u32],
    ) -> Result<(Rows, Vec<ShardTime>)> {
        self.check_shape(seq)?;
        if indices.is_empty() {
            return Err(Error::Invalid("no token indices to gather".into()));
        }
        let st = seq.striping;
        // Per device: local indices and where each row goes in the answer.
        let mut wanted: Vec<(Vec<u32>, Vec<usize>)> = vec![Default::default(); self.len()];
        for (at, &t) in indices.iter().enumerate() {
            if u64::from(t) >= seq.tokens {
                return Err(Error::Invalid(format!("token {t} of {}", seq.tokens)));
            }
            let (d, local) = st.locate(u64::from(t));
            wanted[d].0.push(local as u32);
            wanted[d].1.push(at);
        }
        let gathered = self.on_each(|d, device| {
            let local = &wanted[d].0;
            if local.is_empty() {
                return Ok(None);
            }
            let (rows, device_ns, model_ns) = device
                .gather_timed(&seq.shards[d], layer, head, local)
                .map_err(member(d, device))?;
            let time = ShardTime { tokens_scored: 0, device_ns, model_ns };
            Ok(Some((rows, time)))
        });
        let row = seq.shape.row_bytes() as usize;
        let mut out = Rows {
            row_bytes: row as u64,
            keys: vec![0; indices.len() * row],
            values: vec![0; indices.len() * row],
        };
        let mut times = vec![ShardTime::default(); self.len()];
        for (d, g) in gathered.into_iter().enumerate() {
            let Some((rows, time)) = g? else { continue };
            times[d] = time;
            for (i, &at) in wanted[d].1.iter().enumerate() {
                out.keys[at * row..][..row].copy_from_slice(&rows.keys[i * row..][..row]);
                out.values[at * row..][..row].copy_from_slice(&rows.values[i * row..][..row]);
            }
        }
        Ok((out, times))
    }

    /// The exact Top-K and its K and V rows: the Top-K fans out, then only
    /// the k selected rows come back, each from the device holding it.
    /// `device_ns`/`model_ns` add the gather's slowest device to the
    /// Top-K's.
    pub fn topk_gather(&self, request: &SetTopkRequest<'_>) -> Result<(SetTopK, Rows)> {
        let mut top = self.topk(request)?;
        if top.top.indices.is_empty() {
            let row_bytes = request.seq.shape.row_bytes();
            return Ok((top, Rows { row_bytes, keys: Vec::new(), values: Vec::new() }));
        }
        let (rows, times) =
            self.gather_timed(request.seq, request.layer, request.head, &top.top.indices)?;
        let slowest = |f: fn(&ShardTime) -> u64| times.iter().map(f).max().unwrap_or(0);
        top.top.device_ns += slowest(|t| t.device_ns);
        top.top.model_ns += slowest(|t| t.model_ns);
        for (d, t) in top.devices.iter_mut().zip(&times) {
            d.device_ns += t.device_ns;
            d.model_ns += t.model_ns;
        }
        Ok((top, rows))
    }

    fn check_shape(&self, seq: &ShardedSequence) -> Result<()> {
        if seq.shards.len() != self.devices.len()
            || seq.striping.devices != self.devices.len() as u64
        {
            return Err(Error::Invalid(format!(
                "a sequence of {} shards on a set of {} devices",
                seq.shards.len(),
                self.devices.len()
            )));
        }
        Ok(())
    }
}

/// The longest prefix of the sequence every shard holds in full: shard d
/// holding h tokens holds its share of any total up to `global(d, h)`, the
/// place of its next token.
fn held_prefix(striping: Striping, shards: &[Sequence]) -> u64 {
    shards
        .iter()
        .enumerate()
        .map(|(d, s)| striping.global(d, s.tokens))
        .min()
        .expect("at least one shard")
}

/// Device `d`'s rows of an append of `tokens` tokens at global `start`, for
/// its local tokens `range`, in the `[layers][heads][tokens][head_dim]`
/// layout the device's append takes.
#[allow(clippy::too_many_arguments)]
fn shard_rows(
    shape: &KvShape,
    st: Striping,
    d: usize,
    start: u64,
    tokens: u64,
    range: std::ops::Range<u64>,
    keys: &[u8],
    values: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let row = shape.row_bytes() as usize;
    let streams = usize::from(shape.layers) * usize::from(shape.heads);
    let n = (range.end - range.start) as usize;
    let (mut k, mut v) =
        (Vec::with_capacity(streams * n * row), Vec::with_capacity(streams * n * row));
    for stream in 0..streams {
        let base = stream * tokens as usize;
        // Local tokens run in stripes: copy a run of them at a time.
        let mut local = range.start;
        while local < range.end {
            let run = (st.stripe - local % st.stripe).min(range.end - local);
            let at = (base + (st.global(d, local) - start) as usize) * row;
            let len = run as usize * row;
            k.extend_from_slice(&keys[at..at + len]);
            v.extend_from_slice(&values[at..at + len]);
            local += run;
        }
    }
    (k, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn striping_is_a_bijection(stripe in 1u64..9, devices in 1u64..6, total in 0u64..400) {
            let st = Striping { stripe, devices };
            let mut seen = vec![0u64; devices as usize];
            for t in 0..total {
                let (d, local) = st.locate(t);
                prop_assert_eq!(st.global(d, local), t);
                // Shards fill in order: each device's next local token.
                prop_assert_eq!(local, seen[d]);
                seen[d] += 1;
            }
            for (d, &held) in seen.iter().enumerate() {
                prop_assert_eq!(st.shard_tokens(d, total), held);
            }
            let most = seen.iter().max().unwrap();
            let least = seen.iter().min().unwrap();
            prop_assert!(most - least <= stripe, "shards differ by at most a stripe");
        }
    }
}
