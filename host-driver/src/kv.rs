//! The KV data path: sequences in device DRAM, rows written straight into
//! their frames, and Top-K / gather through the command queue.

use std::time::Duration;

use pnm_protocol::queue::{
    CommitMode, Gather, GatherLayout, HostBuffer, KV_FRAME_SIZE, KeyLayout, KvAppend, KvCommit,
    KvCreate, KvFree, KvList, PageMapEntry, QueueCommand, SequenceInfo as WireSequenceInfo, Stream,
    SubmissionEntry, Topk, TopkLayout,
};
use pnm_protocol::{Dtype, ReturnCode, SharedMemory};
use zerocopy::FromBytes;

use crate::device::Device;
use crate::dma::DmaBuf;
use crate::error::{Error, Result};
use crate::queue::Completion;
use crate::session::{SessionGuard, check_limit};

/// Tokens reserved and committed per KV_APPEND while loading.
const APPEND_CHUNK: u64 = 8192;

/// The shape of a sequence's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct KvShape {
    #[cfg_attr(feature = "serde", serde(serialize_with = "dtype_name"))]
    pub dtype: Dtype,
    pub layers: u16,
    pub heads: u16,
    pub head_dim: u16,
}

#[cfg(feature = "serde")]
fn dtype_name<S: serde::Serializer>(d: &Dtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

impl std::fmt::Display for KvShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layers x {} KV heads x {} dims of {}",
            self.layers,
            self.heads,
            self.head_dim,
            self.dtype.name()
        )
    }
}

impl KvShape {
    pub fn row_bytes(&self) -> u64 {
        u64::from(self.head_dim) * self.dtype.size() as u64
    }

    /// Bytes of K (or of V) for `tokens` tokens of every layer and head.
    pub fn bytes(&self, tokens: u64) -> u64 {
        u64::from(self.layers) * u64::from(self.heads) * tokens * self.row_bytes()
    }

    /// Checks that `keys` and `values` hold `tokens` tokens of this shape.
    pub(crate) fn check_rows(&self, keys: &[u8], values: &[u8], tokens: u64) -> Result<()> {
        let expected = self.bytes(tokens);
        if keys.len() as u64 != expected || values.len() as u64 != expected {
            return Err(Error::Invalid(format!(
                "{tokens} tokens of {self} need {expected} bytes each of K and V; got {} and {}",
                keys.len(),
                values.len()
            )));
        }
        Ok(())
    }
}

/// A sequence as the device lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Sequence {
    pub id: u32,
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub shape: KvShape,
    pub tokens: u64,
    pub reserved_tokens: u64,
    pub tokens_per_page: u32,
}

/// Queries for a Top-K: `group` rows of `head_dim` elements of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub dtype: Dtype,
    pub group: u32,
    pub data: Vec<u8>,
}

impl Query {
    /// f32 queries, `values.len() / head_dim` of them.
    pub fn f32(values: &[f32], head_dim: usize) -> Self {
        Self {
            dtype: Dtype::F32,
            group: (values.len() / head_dim.max(1)) as u32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

pub use pnm_protocol::queue::Aggregation;

/// A Top-K answer: token indices and scores, best first.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TopK {
    pub indices: Vec<u32>,
    pub scores: Vec<f32>,
    /// Tokens in the sequence.
    pub tokens: u64,
    /// Tokens the device scored (fewer than `tokens` with page selection,
    /// or with tokens skipped).
    pub tokens_scored: u64,
    /// Tokens left out because their rows lie on bad media (a request
    /// that skips bad rows; 0 otherwise).
    pub skipped: u64,
    /// Nanoseconds the device spent on the command.
    pub device_ns: u64,
    /// Nanoseconds the modelled hardware would take (the device's profile).
    pub model_ns: u64,
}

pub use pnm_protocol::queue::PageSelection;

/// Gathered rows, in the sequence's dtype: row i of `keys` and of `values`
/// belongs to the i-th requested token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    pub row_bytes: u64,
    pub keys: Vec<u8>,
    pub values: Vec<u8>,
}

impl Rows {
    /// Copies `n` K rows from `keys_at` and `n` V rows from `values_at` (a
    /// DMA buffer the device filled) into these buffers, resizing them.
    pub(crate) fn read_from(
        &mut self,
        mem: SharedMemory,
        keys_at: u64,
        values_at: u64,
        n: u64,
        row_bytes: u64,
    ) {
        let len = (n * row_bytes) as usize;
        self.row_bytes = row_bytes;
        self.keys.resize(len, 0);
        self.values.resize(len, 0);
        mem.read_bytes(keys_at, &mut self.keys).expect("DMA buffer in the region");
        mem.read_bytes(values_at, &mut self.values).expect("DMA buffer in the region");
    }
}

/// The result of [`Device::topk_gather_view`]: the Top-K, and its K and V
/// rows still in the DMA buffer the device wrote them to (which frees
/// itself when the view is dropped).
///
/// The view holds only its buffer, not the handle: other commands may run
/// on the same handle meanwhile.
#[derive(Debug)]
pub struct GatheredView<'a> {
    device: &'a Device,
    out: DmaBuf,
    layout: TopkLayout,
    pub top: TopK,
}

impl GatheredView<'_> {
    /// Bytes of one K or V row.
    pub fn row_bytes(&self) -> usize {
        self.layout.row_bytes as usize
    }

    /// Rows in the view (one per selected token, best first).
    pub fn len(&self) -> usize {
        self.top.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.top.indices.is_empty()
    }

    /// Copies K row `i` (of the i-th selected token) into `out`, which must
    /// hold [`row_bytes`](Self::row_bytes).
    pub fn key_row(&self, i: usize, out: &mut [u8]) {
        self.read_row(self.layout.key_rows(), i, out);
    }

    /// Copies V row `i` into `out`, like [`key_row`](Self::key_row).
    pub fn value_row(&self, i: usize, out: &mut [u8]) {
        self.read_row(self.layout.value_rows(), i, out);
    }

    fn read_row(&self, block: u64, i: usize, out: &mut [u8]) {
        assert!(i < self.len(), "row {i} of {}", self.len());
        assert_eq!(out.len(), self.row_bytes(), "one row");
        let at = self.out.addr + block + i as u64 * self.layout.row_bytes;
        self.device.region().read_bytes(at, out).expect("DMA buffer in the region");
    }

    /// Copies every row into `rows` (resizing its buffers).
    pub fn copy_into(&self, rows: &mut Rows) {
        let (keys, values) =
            (self.out.addr + self.layout.key_rows(), self.out.addr + self.layout.value_rows());
        let n = self.len() as u64;
        rows.read_from(self.device.region(), keys, values, n, self.layout.row_bytes);
    }
}

/// A Top-K, as every call takes it (`topk`, `topk_batch`, `topk_gather`,
/// `topk_gather_into`, `topk_gather_view`, and the async API's): which
/// stream, which queries, how many tokens, how the group's scores combine,
/// and which pages to score. Borrows the sequence and the queries, so a
/// decode loop builds one per step without copying either.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopkRequest<'a> {
    pub seq: &'a Sequence,
    pub layer: u16,
    pub head: u16,
    pub query: &'a Query,
    pub k: u32,
    pub aggregation: Aggregation,
    /// Score only the pages page selection picks (None: every token, the
    /// exact Top-K).
    pub selection: Option<PageSelection>,
    /// Leave out (and count) tokens whose rows lie on bad media, instead
    /// of failing with [`Error::MediaError`].
    pub skip_bad_rows: bool,
}

impl<'a> TopkRequest<'a> {
    /// The exact Top-K of `k` tokens of (seq, layer, head), a GQA group's
    /// scores combined by their max.
    pub fn new(seq: &'a Sequence, layer: u16, head: u16, query: &'a Query, k: u32) -> Self {
        Self {
            seq,
            layer,
            head,
            query,
            k,
            aggregation: Aggregation::Max,
            selection: None,
            skip_bad_rows: false,
        }
    }

    /// Scores every token whose rows are readable and reports how many
    /// were left out ([`TopK::skipped`]), instead of failing on bad media.
    pub fn skipping_bad_rows(self) -> Self {
        Self { skip_bad_rows: true, ..self }
    }

    pub fn with_aggregation(self, aggregation: Aggregation) -> Self {
        Self { aggregation, ..self }
    }

    /// Scores only the pages `selection` picks.
    pub fn with_selection(self, selection: PageSelection) -> Self {
        Self { selection: Some(selection), ..self }
    }

    /// Where the results (and rows, `with_rows`) land in the output buffer.
    fn layout(&self, with_rows: bool) -> TopkLayout {
        TopkLayout {
            k: u64::from(self.k),
            row_bytes: if with_rows { self.seq.shape.row_bytes() } else { 0 },
        }
    }
}

/// The first `len` bytes of `buf`, as a command names them.
/// One command of a Top-K batch: the answer, and its rows for a gather.
type Answer = (TopK, Option<Rows>);

pub(crate) fn host_buffer(buf: &DmaBuf, len: u64) -> HostBuffer {
    HostBuffer { addr: buf.addr, len: len.min(u64::from(u32::MAX)) as u32 }
}

/// Bytes of one sequence list entry and of one page map entry.
const SEQUENCE_INFO: u64 = size_of::<WireSequenceInfo>() as u64;
const PAGE_MAP_ENTRY: u64 = size_of::<PageMapEntry>() as u64;

fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Device {
    /// NOP through the queue: the command path's round trip.
    pub fn nop(&self) -> Result<Completion> {
        self.recovering(|| self.nop_once())
    }

    fn nop_once(&self) -> Result<Completion> {
        self.session()?.run(&QueueCommand::Nop)
    }

    /// Creates an empty sequence.
    pub fn kv_create(&self, shape: KvShape) -> Result<Sequence> {
        self.unrepeatable(|| self.kv_create_once(shape))
    }

    fn kv_create_once(&self, shape: KvShape) -> Result<Sequence> {
        let mut s = self.session()?;
        check_limit("head_dim", u32::from(shape.head_dim), s.session().limits.max_head_dim)?;
        if shape.layers == 0 || shape.heads == 0 {
            return Err(Error::Invalid(format!("a sequence of {shape} holds nothing")));
        }
        let c = s.run(&QueueCommand::KvCreate(KvCreate {
            layers: shape.layers,
            heads: shape.heads,
            head_dim: shape.head_dim,
            dtype: shape.dtype,
        }))?;
        drop(s);
        let expected = pnm_protocol::queue::tokens_per_page(u32::from(shape.head_dim), shape.dtype);
        if c.result1 != expected {
            return Err(Error::Protocol(format!(
                "{} tokens per page for {shape}, expected {expected}",
                c.result1
            )));
        }
        Ok(Sequence {
            id: c.result0,
            shape,
            tokens: 0,
            reserved_tokens: 0,
            tokens_per_page: expected,
        })
    }

    /// Every sequence on the device.
    pub fn kv_list(&self) -> Result<Vec<Sequence>> {
        self.recovering(|| self.kv_list_once())
    }

    fn kv_list_once(&self) -> Result<Vec<Sequence>> {
        let mut s = self.session()?;
        let mut room = 64u32;
        loop {
            let len = u64::from(room) * SEQUENCE_INFO;
            let buf = s.alloc(len)?;
            let c = s.run(&QueueCommand::KvList(KvList {
                max_entries: room,
                out: host_buffer(&buf, len),
            }));
            let mut raw = vec![0u8; len as usize];
            s.mem().read_bytes(buf.addr, &mut raw).expect("DMA buffer in the region");
            drop(buf);
            let c = c?;
            if c.result1 > room || c.result1 > c.result0 {
                return Err(Error::Protocol(format!(
                    "KV_LIST wrote {} of {} entries into room for {room}",
                    c.result1, c.result0
                )));
            }
            if c.result0 > room {
                room = c.result0;
                continue;
            }
            let entries = <[WireSequenceInfo]>::ref_from_bytes(
                &raw[..c.result1 as usize * SEQUENCE_INFO as usize],
            )
            .expect("whole entries");
            return entries.iter().map(sequence_from_wire).collect();
        }
    }

    /// One sequence.
    pub fn kv_sequence(&self, id: u32) -> Result<Sequence> {
        self.kv_list()?.into_iter().find(|s| s.id == id).ok_or(Error::Queue {
            command: "KV_LIST",
            code: pnm_protocol::ReturnCode::INVALID_HANDLE,
        })
    }

    /// Frees a sequence and its device DRAM.
    pub fn kv_free(&self, id: u32) -> Result<()> {
        self.unrepeatable(|| {
            self.session()?.run(&QueueCommand::KvFree(KvFree { seq: id })).map(drop)
        })
    }

    /// Appends `tokens` tokens of K and V rows, each laid out
    /// `[layers][heads][tokens][head_dim]` in the sequence's dtype. Rows are
    /// written straight into device DRAM, chunk by chunk; each chunk's keys
    /// are folded into the page bounds as it lands, and the last commit
    /// makes every row valid at once: the append is atomic. If it fails (or
    /// this process dies) midway, the device rolls the reservation back and
    /// the sequence keeps exactly the tokens it had. Another writer's append
    /// to the same sequence in progress: `Queue` with Busy. `progress` is
    /// told the tokens written so far.
    pub fn kv_append(
        &self,
        seq: &Sequence,
        keys: &[u8],
        values: &[u8],
        tokens: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Sequence> {
        let shape = seq.shape;
        shape.check_rows(keys, values, tokens)?;
        let mut s = self.session()?;
        let (frames_offset, frame_count) = (s.session().frames_offset, s.session().frame_count);
        let dram = self.layout().dram_offset;
        let tpp = u64::from(seq.tokens_per_page);
        let streams = u64::from(shape.layers) * u64::from(shape.heads);
        let row = shape.row_bytes();
        let key_layout = KeyLayout::new(u32::from(shape.head_dim), shape.dtype);
        let mut tile = Vec::new();
        let map_room = (APPEND_CHUNK / tpp + 2) * streams * PAGE_MAP_ENTRY;
        let map_buf = s.alloc(map_room)?;
        let mut map_raw = vec![0u8; map_room as usize];
        let mut done = 0;
        let mut current = *seq;
        let mut reserved_any = false;
        // Another writer's append in progress (Busy): wait for it, bounded.
        let deadline = std::time::Instant::now() + self.command_timeout();
        let result = loop {
            let attempt = (|| {
                // Pipelined: the next chunk's KV_APPEND goes in ahead of this
                // chunk's KV_COMMIT, so the host copies chunk i+1 into device
                // DRAM while the device folds chunk i's keys into its bounds.
                let append = |s: &mut SessionGuard<'_>, n: u64| -> Result<u16> {
                    s.push(&QueueCommand::KvAppend(KvAppend {
                        seq: seq.id,
                        tokens: n as u32,
                        page_map: host_buffer(&map_buf, map_room),
                    }))
                };
                let mut next_append = Some(append(&mut s, APPEND_CHUNK.min(tokens))?);
                let mut pending_commit: Option<u16> = None;
                s.ring();
                while let Some(append_cid) = next_append.take() {
                    let n = APPEND_CHUNK.min(tokens - done);
                    let appended = s.wait(append_cid);
                    let c = match appended {
                        Ok(c) => c,
                        Err(e) => {
                            // Let the chunk before land, then report; unless
                            // the device stopped answering (a second wait).
                            if let Some(cid) = pending_commit.take()
                                && !e.device_unresponsive()
                            {
                                s.wait(cid)?;
                            }
                            return Err(e);
                        }
                    };
                    reserved_any = true;
                    let (first, first_page, pages) =
                        (u64::from(c.result0), u64::from(c.result1), c.result2);
                    if done == 0 {
                        // Where this append starts: the caller's view of the
                        // sequence may be older than another writer's append.
                        current.tokens = first;
                    }
                    if first_page != first / tpp || pages != (first + n).div_ceil(tpp) - first_page
                    {
                        return Err(Error::Protocol(format!(
                            "KV_APPEND mapped pages {first_page}+{pages} for tokens {first}+{n}"
                        )));
                    }
                    let map_len = (pages * streams * PAGE_MAP_ENTRY) as usize;
                    s.mem()
                        .read_bytes(map_buf.addr, &mut map_raw[..map_len])
                        .expect("DMA buffer in the region");
                    let map = <[PageMapEntry]>::ref_from_bytes(&map_raw[..map_len])
                        .expect("whole entries");
                    for (i, entry) in map.iter().enumerate() {
                        let page = first_page + i as u64 / streams;
                        let stream = i as u64 % streams;
                        let lo = (page * tpp).max(first);
                        let hi = ((page + 1) * tpp).min(first + n);
                        let len = (hi - lo) * row;
                        let src = ((stream * tokens + (lo - first + done)) * row) as usize;
                        let span = src..src + len as usize;
                        let frame_at = |frame: u32| {
                            if frame >= frame_count {
                                return Err(Error::Protocol(format!(
                                    "page map names frame {frame} of {frame_count}"
                                )));
                            }
                            Ok(dram + frames_offset + u64::from(frame) * u64::from(KV_FRAME_SIZE))
                        };
                        let key_frame = frame_at(entry.key_frame.get())?;
                        let value_frame = frame_at(entry.value_frame.get())?;
                        let write = |at: u64, bytes: &[u8]| {
                            s.mem()
                                .write_bytes(at, bytes)
                                .map_err(|e| Error::Protocol(e.to_string()))
                        };
                        // Keys in the frame's key layout (rows, or tiles).
                        key_layout.write_rows(
                            lo % tpp,
                            &keys[span.clone()],
                            &mut tile,
                            |at, b| write(key_frame + at, b),
                        )?;
                        write(value_frame + (lo % tpp) * row, &values[span])?;
                    }
                    if let Some(cid) = pending_commit.take() {
                        s.wait(cid)?;
                        progress(done);
                    }
                    done += n;
                    if done < tokens {
                        next_append = Some(append(&mut s, APPEND_CHUNK.min(tokens - done))?);
                    }
                    let commit = KvCommit {
                        seq: seq.id,
                        valid_tokens: (first + n) as u32,
                        mode: if done < tokens { CommitMode::Defer } else { CommitMode::Publish },
                    };
                    pending_commit = Some(s.push(&QueueCommand::KvCommit(commit))?);
                    s.ring();
                }
                let start = current.tokens;
                if let Some(cid) = pending_commit {
                    current.tokens = u64::from(s.wait(cid)?.result0);
                }
                if current.tokens != start + tokens {
                    return Err(Error::Protocol(format!(
                        "KV_COMMIT left {} tokens valid after appending {tokens} at {start}",
                        current.tokens
                    )));
                }
                current.reserved_tokens = current.tokens;
                progress(done);
                Ok(current)
            })();
            match attempt {
                Err(Error::Queue { code: ReturnCode::BUSY, .. })
                    if !reserved_any && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => break other,
            }
        };
        drop(map_buf);
        match &result {
            Err(e) if reserved_any && e.device_unresponsive() => {
                // An abort would wait out another timeout: delete the queue
                // instead (that rolls the reservation back as well).
                s.discard_queue();
            }
            Err(_) if reserved_any => {
                // Give the reservation up now rather than when this queue
                // goes: a later append on it must not commit these rows.
                let abort = KvCommit { seq: seq.id, valid_tokens: 0, mode: CommitMode::Abort };
                if let Err(e) = s.run(&QueueCommand::KvCommit(abort)) {
                    tracing::warn!(error = %e, seq = seq.id, "could not abort a failed append");
                    s.discard_queue();
                }
            }
            _ => {}
        }
        result
    }

    fn topk_entry(
        s: &mut SessionGuard<'_>,
        r: &TopkRequest<'_>,
        out: &DmaBuf,
        layout: TopkLayout,
        with_rows: bool,
    ) -> Result<(QueueCommand, DmaBuf)> {
        let limits = s.session().limits;
        check_limit("k", r.k, limits.max_k)?;
        check_limit("GQA group (queries per KV head)", r.query.group, limits.max_group)?;
        let q = s.alloc(r.query.data.len() as u64)?;
        s.mem().write_bytes(q.addr, &r.query.data).expect("DMA buffer in the region");
        let topk = Topk {
            stream: Stream { seq: r.seq.id, layer: r.layer, head: r.head },
            k: r.k,
            group: r.query.group,
            query_dtype: r.query.dtype,
            aggregation: r.aggregation,
            selection: r.selection,
            skip_bad_rows: r.skip_bad_rows,
            queries: host_buffer(&q, r.query.data.len() as u64),
            results: host_buffer(out, layout.len()),
        };
        Ok((if with_rows { QueueCommand::TopkGather(topk) } else { QueueCommand::Topk(topk) }, q))
    }

    pub(crate) fn read_topk(
        mem: SharedMemory,
        c: &Completion,
        k: u32,
        out: u64,
        layout: TopkLayout,
    ) -> Result<TopK> {
        let n = c.result0;
        // R2: [31:0] tokens in the sequence, [63:32] tokens skipped.
        let (tokens, skipped) = (c.result2 & 0xFFFF_FFFF, c.result2 >> 32);
        if n > k || u64::from(n) > tokens || skipped > tokens {
            return Err(Error::Protocol(format!(
                "TOPK returned {n} results for k {k} over {tokens} tokens"
            )));
        }
        let mut raw = vec![0u8; 8 * n as usize];
        let (idx, sc) = raw.split_at_mut(4 * n as usize);
        mem.read_bytes(out + layout.indices(), idx).expect("DMA buffer in the region");
        mem.read_bytes(out + layout.scores(), sc).expect("DMA buffer in the region");
        let indices = read_u32s(idx);
        if let Some(bad) = indices.iter().find(|&&i| u64::from(i) >= tokens) {
            return Err(Error::Protocol(format!("TOPK returned token {bad} of {tokens}")));
        }
        if let Some(twice) = first_repeat(&indices, tokens) {
            return Err(Error::Protocol(format!("TOPK returned token {twice} twice")));
        }
        let tokens_scored = u64::from(c.result1);
        if tokens_scored > tokens {
            return Err(Error::Protocol(format!("TOPK scored {tokens_scored} of {tokens} tokens")));
        }
        Ok(TopK {
            indices,
            scores: read_f32s(sc),
            tokens,
            tokens_scored,
            skipped,
            device_ns: c.exec_ns,
            model_ns: c.model_ns,
        })
    }

    /// One Top-K: the selected tokens and their scores.
    pub fn topk(&self, request: &TopkRequest<'_>) -> Result<TopK> {
        self.topk_batch(std::slice::from_ref(request))?.pop().expect("one request, one answer")
    }

    /// Many Top-Ks in flight at once on the queue; answers in request order.
    /// A batch that timed out is run again once on a new queue pair (a
    /// Top-K changes nothing on the device).
    pub fn topk_batch(&self, requests: &[TopkRequest<'_>]) -> Result<Vec<Result<TopK>>> {
        let answers = self.recovering(|| self.topk_batch_once(requests, false))?;
        Ok(answers.into_iter().map(|a| a.map(|(top, _)| top)).collect())
    }

    /// Many TOPK_GATHERs in flight at once on the queue, which the device
    /// runs side by side on its compute units (a decode step's every
    /// (layer, KV head) at once); answers in request order, each with its
    /// rows. A batch that timed out is run again once on a new queue pair.
    pub fn topk_gather_batch(
        &self,
        requests: &[TopkRequest<'_>],
    ) -> Result<Vec<Result<(TopK, Rows)>>> {
        let answers = self.recovering(|| self.topk_batch_once(requests, true))?;
        Ok(answers
            .into_iter()
            .map(|a| a.map(|(top, rows)| (top, rows.expect("a gather answers with rows"))))
            .collect())
    }

    /// A batch of TOPK (or, `with_rows`, TOPK_GATHER) commands.
    fn topk_batch_once(
        &self,
        requests: &[TopkRequest<'_>],
        with_rows: bool,
    ) -> Result<Vec<Result<Answer>>> {
        let mut s = self.session()?;
        let mut entries = Vec::with_capacity(requests.len());
        let mut bufs = Vec::new();
        let mut outs = Vec::new();
        let built = (|| {
            for r in requests {
                let layout = r.layout(with_rows);
                let out = s.alloc(layout.len())?;
                let (command, q) = Self::topk_entry(&mut s, r, &out, layout, with_rows)?;
                entries.push(command.encode(0));
                outs.push((out.addr, layout));
                bufs.push(out);
                bufs.push(q);
            }
            let timeout = self.command_timeout();
            s.session().queue.execute_all(&entries, timeout)
        })();
        let answers = built.map(|completions| {
            completions
                .iter()
                .zip(requests)
                .zip(&outs)
                .map(|((c, r), &(out, layout))| {
                    let top = Self::read_topk(s.mem(), &c.ok()?, r.k, out, layout)?;
                    let rows = with_rows.then(|| {
                        let mut rows = Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
                        let n = top.indices.len() as u64;
                        let (keys, values) = (out + layout.key_rows(), out + layout.value_rows());
                        rows.read_from(s.mem(), keys, values, n, layout.row_bytes);
                        rows
                    });
                    Ok((top, rows))
                })
                .collect()
        });
        drop(bufs);
        answers
    }

    /// The K and V rows of `indices` in (sequence, layer, head).
    pub fn gather(&self, seq: &Sequence, layer: u16, head: u16, indices: &[u32]) -> Result<Rows> {
        self.gather_timed(seq, layer, head, indices).map(|(rows, ..)| rows)
    }

    /// [`gather`](Self::gather), with the nanoseconds the device spent and
    /// the nanoseconds its modelled hardware would take.
    pub fn gather_timed(
        &self,
        seq: &Sequence,
        layer: u16,
        head: u16,
        indices: &[u32],
    ) -> Result<(Rows, u64, u64)> {
        self.recovering(|| self.gather_once(seq, layer, head, indices))
    }

    fn gather_once(
        &self,
        seq: &Sequence,
        layer: u16,
        head: u16,
        indices: &[u32],
    ) -> Result<(Rows, u64, u64)> {
        if indices.is_empty() {
            return Err(Error::Invalid("no token indices to gather".into()));
        }
        let mut s = self.session()?;
        let layout = GatherLayout { n: indices.len() as u64, row_bytes: seq.shape.row_bytes() };
        let idx = s.alloc(size_of_val(indices) as u64)?;
        let out = s.alloc(layout.len())?;
        let raw: Vec<u8> = indices.iter().flat_map(|i| i.to_le_bytes()).collect();
        s.mem().write_bytes(idx.addr, &raw).expect("DMA buffer in the region");
        let c = s.run(&QueueCommand::Gather(Gather {
            stream: Stream { seq: seq.id, layer, head },
            rows: indices.len() as u32,
            indices: host_buffer(&idx, raw.len() as u64),
            out: host_buffer(&out, layout.len()),
        }))?;
        if c.result0 as usize != indices.len() {
            return Err(Error::Protocol(format!(
                "GATHER moved {} of {} rows",
                c.result0,
                indices.len()
            )));
        }
        let mut rows = Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
        let (keys_at, values_at) = (out.addr + layout.key_rows(), out.addr + layout.value_rows());
        rows.read_from(s.mem(), keys_at, values_at, layout.n, layout.row_bytes);
        Ok((rows, c.exec_ns, c.model_ns))
    }

    /// Top-K and the selected rows in one command.
    pub fn topk_gather(&self, request: &TopkRequest<'_>) -> Result<(TopK, Rows)> {
        let mut rows = Rows { row_bytes: 0, keys: Vec::new(), values: Vec::new() };
        let top = self.topk_gather_into(request, &mut rows)?;
        Ok((top, rows))
    }

    /// [`topk_gather`](Self::topk_gather) into caller-owned row buffers,
    /// which are resized (not reallocated once large enough): a decode loop
    /// that reuses them pays no allocation or page faults per step.
    pub fn topk_gather_into(&self, request: &TopkRequest<'_>, rows: &mut Rows) -> Result<TopK> {
        let view = self.topk_gather_view(request)?;
        view.copy_into(rows);
        Ok(view.top.clone())
    }

    /// TOPK_GATHER whose rows stay where the device wrote them, in this
    /// handle's DMA window, until the view is dropped: nothing is copied
    /// unless the caller asks (`key_row`, `copy_into`), and a consumer that
    /// reads rows once (an attention kernel, a DMA to a GPU) reads them
    /// there. Other commands may run on the handle while a view lives.
    pub fn topk_gather_view(&self, request: &TopkRequest<'_>) -> Result<GatheredView<'_>> {
        self.recovering(|| self.topk_gather_view_once(request))
    }

    fn topk_gather_view_once(&self, request: &TopkRequest<'_>) -> Result<GatheredView<'_>> {
        let mut s = self.session()?;
        let layout = request.layout(true);
        let out = s.alloc(layout.len())?;
        let (command, q) = Self::topk_entry(&mut s, request, &out, layout, true)?;
        let k = request.k;
        let top = s.run(&command).and_then(|c| Self::read_topk(s.mem(), &c, k, out.addr, layout));
        drop(q);
        Ok(GatheredView { device: self, out, layout, top: top? })
    }

    /// Runs raw descriptors (command ids are assigned here) on the driver's
    /// queue and returns their completions in order: for tests and tools
    /// that need to send what the typed API would refuse.
    pub fn submit_raw(&self, entries: &[SubmissionEntry]) -> Result<Vec<Completion>> {
        let mut s = self.session()?;
        let timeout = self.command_timeout();
        s.session().queue.execute_all(entries, timeout)
    }

    /// A DMA buffer for [`submit_raw`](Self::submit_raw), filled with `data`
    /// and `extra` zero bytes after it.
    pub fn dma_buffer(&self, data: &[u8], extra: u64) -> Result<DmaBuf> {
        let mut s = self.session()?;
        let buf = s.alloc(data.len() as u64 + extra)?;
        s.mem().fill(buf.addr, buf.len, 0).expect("DMA buffer in the region");
        s.mem().write_bytes(buf.addr, data).expect("DMA buffer in the region");
        Ok(buf)
    }

    /// Reads a DMA buffer.
    pub fn read_dma(&self, buf: &DmaBuf) -> Vec<u8> {
        let mut out = vec![0; buf.len as usize];
        self.region().read_bytes(buf.addr, &mut out).expect("DMA buffer in the region");
        out
    }

    pub(crate) fn command_timeout_default() -> Duration {
        Duration::from_secs(10)
    }
}

fn sequence_from_wire(w: &WireSequenceInfo) -> Result<Sequence> {
    let dtype = Dtype::from_code(u32::from(w.dtype.get())).ok_or_else(|| {
        Error::Protocol(format!("sequence {} has dtype code {}", w.seq.get(), w.dtype.get()))
    })?;
    let shape =
        KvShape { dtype, layers: w.layers.get(), heads: w.heads.get(), head_dim: w.head_dim.get() };
    let tpp = pnm_protocol::queue::tokens_per_page(u32::from(shape.head_dim.max(1)), dtype);
    if shape.head_dim == 0
        || w.tokens_per_page.get() != tpp
        || w.tokens.get() > w.reserved_tokens.get()
    {
        return Err(Error::Protocol(format!(
            "sequence {} is described inconsistently",
            w.seq.get()
        )));
    }
    Ok(Sequence {
        id: w.seq.get(),
        shape,
        tokens: w.tokens.get(),
        reserved_tokens: w.reserved_tokens.get(),
        tokens_per_page: tpp,
    })
}

/// An index that occurs twice in `indices` (each already checked to be
/// below `tokens`), if any. A bitmap over the tokens when it is small next
/// to the indices (at k 2048 of 32K tokens: 4 KiB, against sorting 2048
/// numbers), else a sorted copy; both cheaper than hashing.
fn first_repeat(indices: &[u32], tokens: u64) -> Option<u32> {
    let words = tokens.div_ceil(64);
    if words <= 4 * indices.len() as u64 {
        let mut seen = vec![0u64; words as usize];
        for &i in indices {
            let (word, bit) = (i as usize / 64, 1u64 << (i % 64));
            if seen[word] & bit != 0 {
                return Some(i);
            }
            seen[word] |= bit;
        }
        None
    } else {
        let mut sorted = indices.to_vec();
        sorted.sort_unstable();
        sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }
}

/// A Top-K result is what the device hands back: random completions and
/// result buffers either decode into a result that keeps every promise
/// (at most k tokens, each inside the sequence, none twice) or are refused
/// as a protocol error, never a panic.
#[cfg(test)]
mod rogue_topk_results {
    use pnm_protocol::ReturnCode;
    use pnm_protocol::queue::TopkLayout;
    use proptest::prelude::*;

    use super::*;
    use crate::queue::Completion;

    fn completion(n: u32, scored: u32, tokens: u64) -> Completion {
        Completion {
            command_id: 0,
            opcode: pnm_protocol::queue::QueueOpcode::TOPK,
            code: ReturnCode::SUCCESS,
            result0: n,
            result1: scored,
            result2: tokens,
            exec_ns: 0,
            model_ns: 0,
        }
    }

    /// Decodes `indices` (and arbitrary score bits) as the device's answer.
    fn decode(k: u32, c: &Completion, indices: &[u32], scores: &[u32]) -> Result<TopK> {
        let map = memmap2::MmapOptions::new().len(1 << 16).map_anon().expect("anonymous memory");
        let mapping = crate::sys::Mapping::new(map.into());
        let mem = mapping.view();
        let layout = TopkLayout { k: u64::from(k), row_bytes: 0 };
        let out = 4096;
        let bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        mem.write_bytes(out + layout.indices(), &bytes(&indices[..k as usize])).unwrap();
        mem.write_bytes(out + layout.scores(), &bytes(&scores[..k as usize])).unwrap();
        Device::read_topk(mem, c, k, out, layout)
    }

    proptest! {
        #[test]
        fn garbage_is_refused_and_what_passes_keeps_its_promises(
            k in 1u32..64,
            n in prop_oneof![0u32..70, any::<u32>()],
            scored in prop_oneof![0u32..300, any::<u32>()],
            tokens in prop_oneof![0u64..300, any::<u64>()],
            indices in prop::collection::vec(prop_oneof![0u32..300, any::<u32>()], 64),
            scores in prop::collection::vec(any::<u32>(), 64),
        ) {
            match decode(k, &completion(n, scored, tokens), &indices, &scores) {
                Ok(top) => {
                    prop_assert_eq!(top.indices.len() as u32, n);
                    prop_assert!(n <= k && u64::from(n) <= tokens);
                    prop_assert!(top.indices.iter().all(|&i| u64::from(i) < tokens));
                    let mut sorted = top.indices.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), top.indices.len(), "repeats passed");
                    prop_assert!(top.tokens_scored <= tokens);
                }
                Err(e) => prop_assert!(matches!(e, Error::Protocol(_)), "{e}"),
            }
        }

        #[test]
        fn a_token_returned_twice_is_refused(
            k in 2u32..64,
            picks in prop::collection::btree_set(0u32..500, 64),
            // Few tokens: the bitmap check; many: the sorted one.
            tokens in prop_oneof![500u64..600, 1u64 << 40..1u64 << 41],
            from in 0usize..64,
            to in 0usize..64,
        ) {
            let (from, to) = (from % k as usize, to % k as usize);
            prop_assume!(from != to);
            let mut indices: Vec<u32> = picks.into_iter().collect();
            indices[to] = indices[from];
            let c = completion(k, 0, tokens);
            let refused = decode(k, &c, &indices, &[0; 64]);
            prop_assert!(matches!(refused, Err(Error::Protocol(_))), "{refused:?}");
        }

        #[test]
        fn a_well_formed_answer_is_accepted_as_is(
            k in 1u32..64,
            picks in prop::collection::btree_set(0u32..500, 64),
            scores in prop::collection::vec(any::<u32>(), 64),
        ) {
            let indices: Vec<u32> = picks.into_iter().collect();
            let c = completion(k, 500, 500);
            let top = decode(k, &c, &indices, &scores).expect("a valid answer");
            prop_assert_eq!(&top.indices[..], &indices[..k as usize]);
            let bits: Vec<u32> = top.scores.iter().map(|s| s.to_bits()).collect();
            prop_assert_eq!(&bits[..], &scores[..k as usize]);
        }
    }
}
