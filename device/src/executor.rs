//! Executes queue commands against the KV store: one handler per command,
//! every field validated before anything is read or written.

use pnm_firmware::LIMITS;
use pnm_firmware::kernels::{self, Scored};
use pnm_firmware::kv::{
    self, BadRows, CommitMode as KvCommitMode, Dram, KvError, KvStore, MediaFindings,
    SequenceShape, TopkQuery, TopkScratch, Writer,
};
use pnm_firmware::simd::Rows;
use pnm_firmware::timing::{self, HardwareProfile, Work};
use pnm_protocol::queue::{
    CommitMode, Gather, GatherLayout, HostBuffer, KvAppend, KvCommit, KvCreate, KvFree, KvList,
    KvMap, PageMapEntry, QueueCommand, QueueOpcode, SequenceInfo, Stream, SubmissionEntry, Topk,
    TopkLayout,
};
use pnm_protocol::{Dtype, RegionLayout, ReturnCode, SharedMemory};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use zerocopy::IntoBytes;

use crate::refusal::{Buffer, Limit, Reason, Refusal};

/// Device DRAM as the firmware sees it: offsets from the DRAM start.
#[derive(Debug, Clone, Copy)]
pub struct DramView {
    mem: SharedMemory,
}

impl DramView {
    pub fn new(region: SharedMemory, layout: &RegionLayout) -> Self {
        let mem =
            region.subrange(layout.dram_offset, layout.dram_size).expect("layout fits the region");
        Self { mem }
    }
}

impl Dram for DramView {
    fn len(&self) -> u64 {
        self.mem.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), KvError> {
        self.mem
            .read_bytes(offset, out)
            .map_err(|e| KvError::OutOfRange { offset: e.offset, len: e.len })
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), KvError> {
        self.mem
            .write_bytes(offset, data)
            .map_err(|e| KvError::OutOfRange { offset: e.offset, len: e.len })
    }
    fn store_u64(&self, offset: u64, value: u64) -> Result<(), KvError> {
        self.mem
            .check(offset, 8)
            .map_err(|e| KvError::OutOfRange { offset: e.offset, len: e.len })?;
        if !offset.is_multiple_of(8) {
            return Err(KvError::OutOfRange { offset, len: 8 });
        }
        self.mem.store_u64(offset, value, std::sync::atomic::Ordering::Release);
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
        crate::sys::with_rows(self.mem, offset, len, next, dtype, score)
            .map_err(|e| KvError::OutOfRange { offset: e.offset, len: e.len })
    }
    fn prefetch(&self, offset: u64, len: u64) {
        self.mem.prefetch(offset, len);
    }
}

/// What a command produced for its completion entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub code: ReturnCode,
    pub result0: u32,
    pub result1: u32,
    pub result2: u64,
    /// What the command did, for its modelled time.
    pub work: Work,
    /// The modelled hardware's time for it (ns, saturating).
    pub model_ns: u32,
}

impl Outcome {
    fn ok(result0: u32, result1: u32, result2: u64) -> Self {
        Self {
            code: ReturnCode::SUCCESS,
            result0,
            result1,
            result2,
            work: Work::Control,
            model_ns: 0,
        }
    }

    fn error(refusal: &Refusal) -> Self {
        let (result0, result1, result2) = refusal.results;
        Self { code: refusal.code, ..Self::ok(result0, result1, result2) }
    }

    fn with_work(self, work: Work) -> Self {
        Self { work, ..self }
    }
}

/// A checked TOPK/TOPK_GATHER: the command, its queries and its result
/// buffer. Made once per command: the queries are read from the host's
/// buffer and converted once, so a host that rewrites the buffer
/// mid-command cannot have a split command's shares scored against
/// different queries.
#[derive(Debug)]
pub struct TopkPlan {
    command: Topk,
    shape: SequenceShape,
    queries: Vec<f32>,
    out: u64,
    result: TopkLayout,
    with_rows: bool,
}

impl TopkPlan {
    /// The Top-K as the KV store takes it.
    fn query(&self) -> TopkQuery<'_> {
        let Stream { seq, layer, head } = self.command.stream;
        TopkQuery {
            seq,
            layer,
            head,
            queries: &self.queries,
            how: self.command.aggregation,
            k: self.command.k,
        }
    }
}

/// Bad media that commands ran into, for the engine to log (General Media
/// records) and to put on the poison list: shared by every executor.
pub type MediaReports = Arc<std::sync::Mutex<Vec<MediaReport>>>;

/// Bad lines one command read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaReport {
    pub opcode: QueueOpcode,
    pub lines: Vec<kv::BadLine>,
}

/// One share of a split Top-K: its best k of the tokens with good keys,
/// and what it found bad.
#[derive(Debug)]
pub struct PartResult {
    top: Vec<Scored>,
    media: MediaFindings,
}

/// The KV store, shared by the engine and the compute units: Top-K and
/// gather read it concurrently; KV_CREATE/APPEND/COMMIT/FREE change it
/// alone (so a sequence is never freed under a running Top-K).
pub type SharedStore = Arc<RwLock<KvStore<DramView>>>;

/// An executor of queue commands; the engine and each compute unit have
/// their own (scratch buffers), sharing the store.
#[derive(Debug)]
pub struct Executor {
    /// The whole region (host buffers are addressed from its start).
    pub mem: SharedMemory,
    pub layout: RegionLayout,
    pub kv: SharedStore,
    /// The timing model's hardware: every completion carries its time.
    pub profile: Arc<HardwareProfile>,
    pub media: MediaReports,
    /// Injected faults (slow memory stretches the modelled times).
    pub faults: Arc<crate::faults::Faults>,
    scratch: Vec<u8>,
    topk: TopkScratch,
}

impl Clone for Executor {
    fn clone(&self) -> Self {
        let mut clone =
            Self::with_store(self.mem, self.layout, self.kv.clone(), self.profile.clone());
        clone.media = self.media.clone();
        clone.faults = self.faults.clone();
        clone
    }
}

/// Top-Ks shorter than this run on one unit: below it the hand-off to a
/// second unit costs more than it saves.
const SPLIT_MIN_TOKENS: u64 = 16384;

/// A single query's Top-K is split only if each share has at least this
/// many tokens per selected one: every share keeps its own best k, so a
/// share close to k in length does the selection's work twice over
/// (measured: docs/PERFORMANCE.md, "Through the device").
const SPLIT_TOKENS_PER_K: u64 = 8;

/// Shares per compute unit when each stays long next to k (see
/// [`Executor::split_plan`]).
const SHARES_PER_UNIT: u32 = 4;

/// Tokens per selected one a share needs before a Top-K is cut into
/// [`SHARES_PER_UNIT`] shares per unit: then the merge of all the shares'
/// best k stays small next to the scan.
const FINE_SHARE_TOKENS_PER_K: u64 = 64;

/// Bytes of one page map entry, one sequence list entry, one token index.
const PAGE_MAP_ENTRY: u64 = size_of::<PageMapEntry>() as u64;
const SEQUENCE_INFO: u64 = size_of::<SequenceInfo>() as u64;
const TOKEN_INDEX: u64 = size_of::<u32>() as u64;

fn limit(limit: Limit, value: u32, max: u32) -> Result<(), Refusal> {
    if value == 0 || value > max {
        return Err(Refusal::invalid(Reason::OutOfLimit {
            limit,
            value: value.into(),
            min: 1,
            max: max.into(),
        }));
    }
    Ok(())
}

impl Executor {
    pub fn new(
        mem: SharedMemory,
        layout: RegionLayout,
        kv: KvStore<DramView>,
        profile: HardwareProfile,
    ) -> Self {
        Self::with_store(mem, layout, Arc::new(RwLock::new(kv)), Arc::new(profile))
    }

    fn with_store(
        mem: SharedMemory,
        layout: RegionLayout,
        kv: SharedStore,
        profile: Arc<HardwareProfile>,
    ) -> Self {
        Self {
            mem,
            layout,
            kv,
            profile,
            media: MediaReports::default(),
            faults: Default::default(),
            scratch: Vec::new(),
            topk: TopkScratch::default(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, KvStore<DramView>> {
        self.kv.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_store(&self) -> RwLockWriteGuard<'_, KvStore<DramView>> {
        self.kv.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `buf` lies inside the host DMA window and holds at
    /// least `need` bytes; its address.
    fn buffer(&self, which: Buffer, buf: HostBuffer, need: u64) -> Result<u64, Refusal> {
        let len = u64::from(buf.len);
        if len < need {
            return Err(Refusal::new(
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                Reason::BufferTooShort { buffer: which, len, need },
            ));
        }
        let window = self.layout.dma_window_offset
            ..self.layout.dma_window_offset + self.layout.dma_window_size;
        match buf.addr.checked_add(len) {
            Some(end) if window.contains(&buf.addr) && end <= window.end => Ok(buf.addr),
            _ => Err(Refusal::new(
                ReturnCode::INVALID_PHYSICAL_ADDRESS,
                Reason::OutsideDmaWindow { buffer: which, addr: buf.addr, len },
            )),
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), Refusal> {
        Ok(self.mem.write_bytes(addr, bytes)?)
    }

    /// Decodes and executes one descriptor that arrived on the queue
    /// `writer` names (its reservations are that queue's).
    pub fn execute_entry(&mut self, sqe: &SubmissionEntry, writer: Writer) -> Outcome {
        let outcome = QueueCommand::decode(sqe)
            .map_err(Refusal::from)
            .and_then(|command| self.dispatch(&command, writer));
        self.modelled(sqe.opcode, outcome)
    }

    /// Executes one decoded command from the queue `writer` names.
    pub fn execute(&mut self, command: &QueueCommand, writer: Writer) -> Outcome {
        let outcome = self.dispatch(command, writer);
        self.modelled(command.opcode(), outcome)
    }

    /// The completion of a command: its outcome or refusal, with the
    /// modelled hardware time.
    fn modelled(&self, opcode: QueueOpcode, outcome: Result<Outcome, Refusal>) -> Outcome {
        let outcome = outcome.unwrap_or_else(|refusal| {
            tracing::debug!(%opcode, code = %refusal.code, reason = %refusal.reason, "command refused");
            Outcome::error(&refusal)
        });
        let model_ns = timing::command_ns(&self.profile, outcome.work) * self.faults.slowdown();
        Outcome { model_ns: model_ns.min(f64::from(u32::MAX)) as u32, ..outcome }
    }

    fn dispatch(&mut self, command: &QueueCommand, from: Writer) -> Result<Outcome, Refusal> {
        match *command {
            QueueCommand::Nop => Ok(Outcome::ok(0, 0, 0)),
            QueueCommand::KvCreate(c) => self.handle_kv_create(c),
            QueueCommand::KvAppend(c) => self.handle_kv_append(c, from),
            QueueCommand::KvCommit(c) => self.handle_kv_commit(c, from),
            QueueCommand::KvFree(c) => self.handle_kv_free(c),
            QueueCommand::KvList(c) => self.handle_kv_list(c),
            QueueCommand::KvMap(c) => self.handle_kv_map(c),
            QueueCommand::Topk(c) => self.handle_topk(c, false),
            QueueCommand::TopkGather(c) => self.handle_topk(c, true),
            QueueCommand::Gather(c) => self.handle_gather(c),
        }
    }

    fn handle_kv_create(&mut self, c: KvCreate) -> Result<Outcome, Refusal> {
        let shape = SequenceShape {
            dtype: c.dtype,
            layers: c.layers,
            heads: c.heads,
            head_dim: c.head_dim,
        };
        let id = self.write_store().create(shape)?;
        Ok(Outcome::ok(id, shape.tokens_per_page() as u32, 0))
    }

    fn handle_kv_append(&mut self, c: KvAppend, from: Writer) -> Result<Outcome, Refusal> {
        let count = u64::from(c.tokens);
        let store = self.kv.clone();
        let mut kv = store.write().unwrap_or_else(|e| e.into_inner());
        let shape = kv.shape(c.seq)?;
        kv.check_append(c.seq, from)?;
        let reserved = kv.reserved(c.seq)?;
        let tpp = shape.tokens_per_page();
        let pages = (reserved + count).div_ceil(tpp) - reserved / tpp;
        let need = pages * u64::from(shape.layers) * u64::from(shape.heads) * PAGE_MAP_ENTRY;
        let out = self.buffer(Buffer::PageMap, c.page_map, need)?;
        let appended = kv.append_as(c.seq, count, from)?;
        self.write(out, appended.map.as_bytes())?;
        let first = u32::try_from(appended.first_token)
            .map_err(|_| Refusal::invalid(Reason::TokenIndexOverflow(appended.first_token)))?;
        Ok(Outcome::ok(first, appended.first_page as u32, pages))
    }

    fn handle_kv_commit(&mut self, c: KvCommit, from: Writer) -> Result<Outcome, Refusal> {
        let mut kv = self.write_store();
        let tokens = match c.mode {
            CommitMode::Abort => kv.abort_append(c.seq, from)?,
            CommitMode::Publish => {
                kv.commit_as(c.seq, c.valid_tokens.into(), from, KvCommitMode::Publish)?
            }
            CommitMode::Defer => {
                kv.commit_as(c.seq, c.valid_tokens.into(), from, KvCommitMode::Defer)?
            }
        };
        Ok(Outcome::ok(tokens as u32, 0, tokens))
    }

    fn handle_kv_free(&mut self, c: KvFree) -> Result<Outcome, Refusal> {
        self.write_store().free(c.seq)?;
        Ok(Outcome::ok(0, 0, 0))
    }

    fn handle_kv_list(&mut self, c: KvList) -> Result<Outcome, Refusal> {
        let list = self.read().list();
        let room = u64::from(c.out.len) / SEQUENCE_INFO;
        let n = (list.len() as u64).min(u64::from(c.max_entries)).min(room);
        let out = self.buffer(Buffer::SequenceList, c.out, n * SEQUENCE_INFO)?;
        self.write(out, list[..n as usize].as_bytes())?;
        Ok(Outcome::ok(list.len() as u32, n as u32, 0))
    }

    fn handle_kv_map(&mut self, c: KvMap) -> Result<Outcome, Refusal> {
        let map: Vec<PageMapEntry> =
            self.read().page_map(c.seq, c.first_page.into(), c.pages.into())?;
        let out = self.buffer(Buffer::PageMap, c.out, map.as_bytes().len() as u64)?;
        self.write(out, map.as_bytes())?;
        Ok(Outcome::ok(c.pages, 0, 0))
    }

    fn handle_topk(&mut self, c: Topk, with_rows: bool) -> Result<Outcome, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan_topk(&kv, c, with_rows)?;
        // The scan skips bad keys and reports them; whether that fails the
        // command is decided once, with the gathered rows' findings too.
        self.topk.bad_rows = BadRows::Skip;
        let scanned = match c.selection {
            None => kv
                .top_k_with(&mut self.topk, plan.query())
                .map(|top| (top, kv.tokens(c.stream.seq).unwrap_or(0))),
            Some(selection) => {
                let selection = kv::PageSelection {
                    budget_tokens: u64::from(selection.budget_tokens),
                    sink_pages: u32::from(selection.sink_pages),
                    recent_pages: u32::from(selection.recent_pages),
                };
                kv.top_k_selected(&mut self.topk, plan.query(), selection)
                    .map(|s| (s.top, s.tokens_scored))
            }
        };
        let (top, scored) = scanned?;
        let media = std::mem::take(&mut self.topk.media);
        self.finish_topk(&kv, &plan, top, scored, media)
    }

    /// Checks a TOPK/TOPK_GATHER against the firmware's limits, the
    /// sequence and the DMA window, and reads its queries.
    fn plan_topk(
        &mut self,
        kv: &KvStore<DramView>,
        c: Topk,
        with_rows: bool,
    ) -> Result<TopkPlan, Refusal> {
        let shape = kv.shape(c.stream.seq)?;
        limit(Limit::K, c.k, LIMITS.max_k)?;
        limit(Limit::Group, c.group, LIMITS.max_group)?;
        let query_bytes =
            u64::from(c.group) * u64::from(shape.head_dim) * c.query_dtype.size() as u64;
        if u64::from(c.queries.len) != query_bytes {
            return Err(Refusal::new(
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                Reason::BufferLength {
                    buffer: Buffer::Queries,
                    len: c.queries.len.into(),
                    need: query_bytes,
                },
            ));
        }
        let query_at = self.buffer(Buffer::Queries, c.queries, query_bytes)?;
        let result = TopkLayout {
            k: u64::from(c.k),
            row_bytes: if with_rows { shape.row_bytes() } else { 0 },
        };
        let out = self.buffer(Buffer::Results, c.results, result.len())?;
        self.scratch.resize(query_bytes as usize, 0);
        self.mem.read_bytes(query_at, &mut self.scratch)?;
        let mut queries = Vec::new();
        kernels::to_f32(c.query_dtype, &self.scratch, &mut queries);
        Ok(TopkPlan { command: c, shape, queries, out, result, with_rows })
    }

    /// Writes a Top-K's results (and rows) to the host and describes its
    /// work. `media` is what the scan found bad; a TOPK_GATHER verifies the
    /// rows it returns as well. With bad rows and no Skip flag, nothing is
    /// written and the command fails with Media Error.
    fn finish_topk(
        &mut self,
        kv: &KvStore<DramView>,
        plan: &TopkPlan,
        mut top: Vec<Scored>,
        scored: u64,
        mut media: MediaFindings,
    ) -> Result<Outcome, Refusal> {
        let stream = plan.command.stream;
        if plan.with_rows {
            let indices: Vec<u32> = top.iter().map(|s| s.index).collect();
            let mut rows = MediaFindings::default();
            kv.verify_rows(stream.seq, stream.layer, stream.head, &indices, &mut rows)?;
            if !rows.is_empty() {
                rows.normalize();
                top.retain(|s| !rows.affects(u64::from(s.index)));
                media.absorb(&rows);
            }
        }
        media.normalize();
        self.report_media(plan_opcode(plan.with_rows), &media);
        if !plan.command.skip_bad_rows
            && let Some(error) = media.error()
        {
            return Err(error.into());
        }
        let skipped = media.token_count();
        let indices: Vec<u32> = top.iter().map(|s| s.index).collect();
        let scores: Vec<f32> = top.iter().map(|s| s.score).collect();
        self.write(plan.out + plan.result.indices(), indices.as_bytes())?;
        self.write(plan.out + plan.result.scores(), scores.as_bytes())?;
        if plan.with_rows {
            let (keys, values) = (plan.result.key_rows(), plan.result.value_rows());
            self.copy_rows(kv, plan.command.stream, &indices, plan.out + keys, plan.out + values)?;
        }
        let work = Work::TopK {
            tokens: scored,
            head_dim: u64::from(plan.shape.head_dim),
            elem_bytes: plan.shape.dtype.size() as u64,
            group: u64::from(plan.command.group),
            k: top.len() as u64,
            gathered: if plan.with_rows { top.len() as u64 } else { 0 },
        };
        let scored = scored.saturating_sub(skipped).min(u64::from(u32::MAX)) as u32;
        // Token counts fit 32 bits (indices are u32): R2 carries both.
        let tokens = kv.tokens(plan.command.stream.seq).unwrap_or(0).min(u64::from(u32::MAX));
        let skipped = skipped.min(u64::from(u32::MAX));
        Ok(Outcome::ok(top.len() as u32, scored, tokens | skipped << 32).with_work(work))
    }

    /// Hands what a command found bad to the engine.
    fn report_media(&self, opcode: QueueOpcode, media: &MediaFindings) {
        if !media.is_empty() {
            let report = MediaReport { opcode, lines: media.lines.clone() };
            self.media.lock().unwrap_or_else(|e| e.into_inner()).push(report);
        }
    }

    /// How to split an exact Top-K across `units` compute units: the
    /// tokens every share scans and the number of shares, or None to run
    /// it whole (page-selected Top-Ks always are). Every share keeps its own
    /// best k and the last merges them, so for a single query (a short,
    /// memory-bound scan) a share must be long next to k; a GQA group's scan
    /// is compute-bound and pays regardless. Where shares stay long next to
    /// k there are several per unit, taken in turn from the job queue: a
    /// unit that starts late (woken from sleep, or on a busier CPU) then
    /// scans fewer of them instead of holding up the merge.
    pub fn split_plan(&self, c: &Topk, units: u32) -> Option<(u64, u32)> {
        if c.selection.is_some() || units < 2 {
            return None;
        }
        let (tokens, shape) = {
            let kv = self.read();
            (kv.tokens(c.stream.seq).ok()?, kv.shape(c.stream.seq).ok()?)
        };
        let k = u64::from(c.k).max(1);
        let share = |parts: u32| tokens / u64::from(parts);
        let long_shares = c.group >= 2 || share(units) >= SPLIT_TOKENS_PER_K * k;
        if tokens < SPLIT_MIN_TOKENS || !long_shares {
            return None;
        }
        // Shares are whole pages: never more shares than pages.
        let pages = u32::try_from(tokens.div_ceil(shape.tokens_per_page())).unwrap_or(u32::MAX);
        let fine = units.saturating_mul(SHARES_PER_UNIT);
        let parts = if share(fine) >= FINE_SHARE_TOKENS_PER_K * k { fine } else { units };
        let parts = parts.min(pages);
        (parts >= 2).then_some((tokens, parts))
    }

    /// Checks a Top-K that will be split and reads its queries, once for
    /// all its shares and the merge.
    pub fn plan_split(&mut self, c: Topk, with_rows: bool) -> Result<TopkPlan, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        self.plan_topk(&kv, c, with_rows)
    }

    /// One compute unit's part of a split Top-K: the best k of its share of
    /// the first `tokens` tokens whose keys are good, and the bad ones.
    pub fn topk_part(
        &mut self,
        plan: &TopkPlan,
        tokens: u64,
        part: (u32, u32),
    ) -> Result<PartResult, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        self.topk.bad_rows = BadRows::Skip;
        let top = kv.top_k_part(&mut self.topk, plan.query(), tokens, part)?;
        Ok(PartResult { top, media: std::mem::take(&mut self.topk.media) })
    }

    /// Completes a split Top-K from its parts: merges them exactly and
    /// writes the results like an unsplit command.
    pub fn finish_split(
        &mut self,
        plan: &TopkPlan,
        tokens: u64,
        parts: Vec<Result<PartResult, Refusal>>,
    ) -> Outcome {
        let outcome = (|| {
            let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
            let store = self.kv.clone();
            let kv = store.read().unwrap_or_else(|e| e.into_inner());
            let mut media = MediaFindings::default();
            for part in &parts {
                media.absorb(&part.media);
            }
            let tops: Vec<Vec<Scored>> = parts.into_iter().map(|p| p.top).collect();
            let top = kernels::merge_top_k(&tops, plan.command.k as usize);
            self.finish_topk(&kv, plan, top, tokens, media)
        })();
        self.modelled(plan_opcode(plan.with_rows), outcome)
    }

    fn handle_gather(&mut self, c: Gather) -> Result<Outcome, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        let shape = kv.shape(c.stream.seq)?;
        limit(Limit::GatherRows, c.rows, u32::MAX)?;
        let index_bytes = u64::from(c.rows) * TOKEN_INDEX;
        let at = self.buffer(Buffer::Indices, c.indices, index_bytes)?;
        let rows = GatherLayout { n: u64::from(c.rows), row_bytes: shape.row_bytes() };
        let out = self.buffer(Buffer::Rows, c.out, rows.len())?;
        self.scratch.resize(index_bytes as usize, 0);
        self.mem.read_bytes(at, &mut self.scratch)?;
        let indices: Vec<u32> = self
            .scratch
            .chunks_exact(TOKEN_INDEX as usize)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut media = MediaFindings::default();
        kv.verify_rows(c.stream.seq, c.stream.layer, c.stream.head, &indices, &mut media)?;
        media.normalize();
        self.report_media(QueueOpcode::GATHER, &media);
        if let Some(error) = media.error() {
            return Err(error.into());
        }
        self.copy_rows(&kv, c.stream, &indices, out + rows.key_rows(), out + rows.value_rows())?;
        let work = Work::Gather {
            rows: u64::from(c.rows),
            head_dim: u64::from(shape.head_dim),
            elem_bytes: shape.dtype.size() as u64,
        };
        Ok(Outcome::ok(c.rows, 0, 0).with_work(work))
    }

    /// DMAs the K and V rows of `indices` to consecutive rows at `keys_at`
    /// and `values_at`. Every index is checked before any row moves.
    fn copy_rows(
        &self,
        kv: &KvStore<DramView>,
        stream: Stream,
        indices: &[u32],
        keys_at: u64,
        values_at: u64,
    ) -> Result<(), Refusal> {
        let row = kv.shape(stream.seq)?.row_bytes();
        let locations = kv.row_locations(stream.seq, stream.layer, stream.head, indices)?;
        let dram = self.layout.dram_offset;
        let tiled = !locations.iter().all(|l| l.key_is_row());
        if tiled {
            // Keys in tiles are assembled (eight at a time) into one buffer
            // and moved to the host in one copy.
            let mut keys = vec![0u8; locations.len() * row as usize];
            kv.read_keys(&locations, row as usize, &mut keys)?;
            self.mem.write_bytes(keys_at, &keys)?;
        }
        for (i, loc) in locations.iter().enumerate() {
            kv.prefetch_gather(&locations, i, row);
            let i = i as u64;
            if !tiled {
                self.mem.copy_within(dram + loc.key, keys_at + i * row, row)?;
            }
            self.mem.copy_within(dram + loc.value, values_at + i * row, row)?;
        }
        Ok(())
    }
}

/// The opcode of a Top-K, with rows or without.
fn plan_opcode(with_rows: bool) -> QueueOpcode {
    if with_rows { QueueOpcode::TOPK_GATHER } else { QueueOpcode::TOPK }
}

/// For tests: an executor over a fresh embedded region of `size` bytes
/// holding one sequence of `tokens` tokens with `rows` as both its keys and
/// its values. The region must outlive the executor.
#[cfg(test)]
fn loaded_executor(
    size: u64,
    shape: pnm_firmware::kv::SequenceShape,
    rows: &[u8],
    tokens: u64,
) -> (crate::region::Region, Executor, u32) {
    let region = crate::region::Region::embedded(size, None).expect("memfd region");
    let (mem, layout) = (region.regs(), region.layout);
    let (kv, _) = KvStore::open(DramView::new(mem, &layout)).expect("fresh store");
    let datapath = Executor::new(mem, layout, kv, crate::engine::default_profile());
    let seq = datapath
        .kv
        .write()
        .unwrap()
        .create_with_rows(shape, rows, rows, tokens)
        .expect("the test's sequence fits its region");
    (region, datapath, seq)
}

#[cfg(test)]
mod split_rule {
    use pnm_firmware::kv::SequenceShape;

    use super::*;

    /// The split plan for a Top-K of `group` queries and `k` over a
    /// `tokens`-token sequence on `units` units.
    fn plan(tokens: u64, group: u32, k: u32, flags: u8, units: u32) -> Option<(u64, u32)> {
        let shape = SequenceShape { dtype: Dtype::F16, layers: 1, heads: 1, head_dim: 16 };
        let rows = vec![0u8; (tokens * shape.row_bytes()) as usize];
        let (_region, datapath, seq) = loaded_executor(32 << 20, shape, &rows, tokens);
        let mut sqe =
            SubmissionEntry { opcode: QueueOpcode::TOPK_GATHER, flags, ..Default::default() };
        sqe.seq = seq.into();
        sqe.count = k.into();
        sqe.arg0 = group.into();
        let Ok(QueueCommand::TopkGather(topk)) = QueueCommand::decode(&sqe) else {
            panic!("a TOPK_GATHER")
        };
        datapath.split_plan(&topk, units)
    }

    #[test]
    fn long_topks_split_when_each_share_is_long_next_to_k() {
        // A single query on 2 units: shares of 20K tokens, 8 per selected
        // one needed; 4 shares per unit from 64 per selected one.
        assert_eq!(plan(40_000, 1, 64, 0, 2), Some((40_000, 8)));
        assert_eq!(plan(40_000, 1, 78, 0, 2), Some((40_000, 8)));
        assert_eq!(plan(40_000, 1, 79, 0, 2), Some((40_000, 2)));
        assert_eq!(plan(40_000, 1, 2500, 0, 2), Some((40_000, 2)));
        assert_eq!(plan(40_000, 1, 2501, 0, 2), None);
        assert_eq!(plan(40_000, 1, 64, 0, 3), Some((40_000, 3)));
        // A GQA group is compute-bound: split even at a large k.
        assert_eq!(plan(40_000, 4, 8192, 0, 2), Some((40_000, 2)));
        // Shares are whole pages (20 here), however many units there are.
        assert_eq!(plan(40_000, 4, 64, 0, 64), Some((40_000, 20)));
        // Too short, page-selected, or nobody to share with: whole.
        assert_eq!(plan(16_000, 4, 64, 0, 2), None);
        assert_eq!(plan(40_000, 4, 64, pnm_protocol::queue::FLAG_PAGE_SELECTION, 2), None);
        assert_eq!(plan(40_000, 4, 64, 0, 1), None);
    }

    /// A split command's queries are read once, when it is taken: a host
    /// that rewrites its query buffer while the shares run changes nothing.
    #[test]
    fn a_split_topk_scores_every_share_against_the_queries_it_was_given() {
        let shape = SequenceShape { dtype: Dtype::F32, layers: 1, heads: 1, head_dim: 16 };
        let tokens = 40_000u64;
        let rows: Vec<u8> = (0..tokens * 16)
            .flat_map(|i| ((i * 2_654_435_761 % 1000) as f32 / 500.0 - 1.0).to_le_bytes())
            .collect();
        let (region, mut datapath, seq) = loaded_executor(64 << 20, shape, &rows, tokens);
        let mem = region.regs();
        let window = region.layout.dma_window_offset;
        let (query_at, out_at) = (window, window + 4096);
        let query = |sign: f32| -> Vec<u8> {
            (0..16).flat_map(|i| (sign * (i as f32 * 0.37).sin()).to_le_bytes()).collect()
        };
        let mut sqe = SubmissionEntry { opcode: QueueOpcode::TOPK, ..Default::default() };
        sqe.seq = seq.into();
        sqe.count = 64.into();
        sqe.arg0 = 1.into();
        sqe.buf0_addr = query_at.into();
        sqe.buf0_len = 64.into();
        sqe.buf1_addr = out_at.into();
        sqe.buf1_len = (8 * 64).into();
        let read_result = || {
            let mut out = vec![0u8; 8 * 64];
            mem.read_bytes(out_at, &mut out).unwrap();
            out
        };
        // The answer to the original queries, unsplit.
        mem.write_bytes(query_at, &query(1.0)).unwrap();
        assert_eq!(datapath.execute_entry(&sqe, Writer(1)).code, ReturnCode::SUCCESS);
        let want = read_result();
        mem.fill(out_at, 8 * 64, 0).unwrap();

        let Ok(QueueCommand::Topk(topk)) = QueueCommand::decode(&sqe) else { panic!("a TOPK") };
        let (tokens, parts) = datapath.split_plan(&topk, 2).expect("long enough to split");
        let plan = datapath.plan_split(topk, false).unwrap();
        // The host overwrites its queries after the command was taken.
        mem.write_bytes(query_at, &query(-1.0)).unwrap();
        let shares = (0..parts).map(|p| datapath.topk_part(&plan, tokens, (p, parts))).collect();
        assert_eq!(datapath.finish_split(&plan, tokens, shares).code, ReturnCode::SUCCESS);
        assert_eq!(read_result(), want);
    }
}

/// Every field of a descriptor is host input: random descriptors, biased to
/// the edges (window bounds, device DRAM, wrapping addresses, the loaded
/// sequence's limits), must get a spec return code and change nothing but
/// the buffers they address; a refused one changes nothing at all.
#[cfg(test)]
mod hostile_descriptors {
    use pnm_firmware::kv::SequenceShape;
    use proptest::prelude::*;

    use super::*;
    use crate::region::Region;

    const TOKENS: u64 = 300;
    /// Stands for the fixture's loaded sequence in generated descriptors.
    const LOADED: u32 = u32::MAX - 1;

    struct Fixture {
        // Owns the mapping `datapath` works on.
        region: Region,
        datapath: Executor,
        seq: u32,
    }

    fn fixture() -> Fixture {
        // 2 layers x 2 heads: four streams of rows.
        let shape = SequenceShape { dtype: Dtype::F32, layers: 2, heads: 2, head_dim: 16 };
        let bytes: Vec<u8> =
            (0..TOKENS * shape.row_bytes() * 4).map(|i| (i * 7 % 251) as u8).collect();
        let (region, datapath, seq) = loaded_executor(8 << 20, shape, &bytes, TOKENS);
        Fixture { region, datapath, seq }
    }

    /// An address near something interesting, or anywhere.
    fn address(layout: RegionLayout) -> impl Strategy<Value = u64> {
        let window_end = layout.dma_window_offset + layout.dma_window_size;
        prop_oneof![
            4 => (0..8192u64).prop_map(move |o| layout.dma_window_offset + o),
            1 => (1..8192u64).prop_map(move |o| window_end - o),
            1 => (0..4096u64).prop_map(move |o| layout.dram_offset + o),
            1 => 0..4096u64,
            1 => (0..64u64).prop_map(|o| u64::MAX - o),
            1 => any::<u64>(),
        ]
    }

    fn length() -> impl Strategy<Value = u32> {
        prop_oneof![3 => 0..4096u32, 1 => 4096..(1u32 << 20), 1 => any::<u32>()]
    }

    fn small_or_any() -> impl Strategy<Value = u32> {
        prop_oneof![2 => 0..8u32, 2 => 0..(TOKENS as u32 + 64), 1 => any::<u32>()]
    }

    fn descriptor(layout: RegionLayout, seq: u32) -> impl Strategy<Value = SubmissionEntry> {
        let opcodes = prop_oneof![
            10 => proptest::sample::select(QueueOpcode::ALL.to_vec()),
            1 => any::<u8>().prop_map(QueueOpcode),
        ];
        let ids = prop_oneof![3 => Just(seq), 1 => 0..4u32, 1 => any::<u32>()];
        (
            (opcodes, ids, 0..4u16, 0..4u16, any::<u8>().prop_map(|f| f & 3)),
            (small_or_any(), small_or_any(), small_or_any()),
            (address(layout), length(), address(layout), length()),
        )
            .prop_map(
                |((op, seq, layer, head, flags), (count, arg0, arg1), (b0, l0, b1, l1))| {
                    let mut e = SubmissionEntry { opcode: op, flags, ..Default::default() };
                    e.seq = seq.into();
                    e.layer = layer.into();
                    e.head = head.into();
                    e.count = count.into();
                    e.arg0 = arg0.into();
                    e.arg1 = arg1.into();
                    e.buf0_addr = b0.into();
                    e.buf0_len = l0.into();
                    e.buf1_addr = b1.into();
                    e.buf1_len = l1.into();
                    e
                },
            )
    }

    /// A data-path command that would succeed, with one field (or none)
    /// taken from a hostile descriptor: the edges of each check.
    fn near_valid(layout: RegionLayout, seq: u32) -> impl Strategy<Value = SubmissionEntry> {
        let ops = prop_oneof![
            Just(QueueOpcode::TOPK),
            Just(QueueOpcode::TOPK_GATHER),
            Just(QueueOpcode::GATHER)
        ];
        (ops, 1..=64u32, 1..=4u32, 0..2u16, 0..2u16, 0..12usize, descriptor(layout, seq)).prop_map(
            move |(op, k, group, layer, head, field, hostile)| {
                let w = layout.dma_window_offset;
                let mut e = SubmissionEntry { opcode: op, ..Default::default() };
                e.seq = seq.into();
                e.layer = layer.into();
                e.head = head.into();
                e.count = k.into();
                e.arg0 = group.into();
                // Queries (f32, G x 16) or indices (zeros: token 0).
                e.buf0_addr = w.into();
                e.buf0_len = if op == QueueOpcode::GATHER { 4 * k } else { 64 * group }.into();
                e.buf1_addr = (w + 8192).into();
                e.buf1_len = (64 << 10).into();
                match field {
                    0 => e.opcode = hostile.opcode,
                    1 => e.seq = hostile.seq,
                    2 => e.layer = hostile.layer,
                    3 => e.head = hostile.head,
                    4 => e.count = hostile.count,
                    5 => e.arg0 = hostile.arg0,
                    6 => e.arg1 = hostile.arg1,
                    7 => e.flags = hostile.flags,
                    8 => e.buf0_addr = hostile.buf0_addr,
                    9 => e.buf0_len = hostile.buf0_len,
                    10 => e.buf1_addr = hostile.buf1_addr,
                    _ => e.buf1_len = hostile.buf1_len,
                }
                e
            },
        )
    }

    /// The region's bytes outside `[at, at + len)` ranges that lie in it.
    fn outside(mem: SharedMemory, keep: &[(u64, u32)]) -> Vec<u8> {
        let mut all = vec![0u8; mem.len() as usize];
        mem.read_bytes(0, &mut all).unwrap();
        for &(at, len) in keep {
            if let Some(end) = at.checked_add(u64::from(len)).filter(|&e| e <= mem.len()) {
                all[at as usize..end as usize].fill(0);
            }
        }
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn get_a_spec_code_and_touch_only_their_buffers(
            sqes in prop::collection::vec(
                prop_oneof![
                    descriptor(fixture_layout(), LOADED),
                    near_valid(fixture_layout(), LOADED),
                ],
                1..6,
            )
        ) {
            let Fixture { region, mut datapath, seq } = fixture();
            let mem = region.regs();
            for mut sqe in sqes {
                if sqe.seq.get() == LOADED {
                    sqe.seq = seq.into();
                }
                let buffers = [
                    (sqe.buf0_addr.get(), sqe.buf0_len.get()),
                    (sqe.buf1_addr.get(), sqe.buf1_len.get()),
                ];
                let before_all = outside(mem, &[]);
                let before = outside(mem, &buffers);
                let outcome = datapath.execute_entry(&sqe, Writer(1));
                prop_assert!(
                    ReturnCode::ALL.iter().any(|(c, _)| *c == outcome.code),
                    "{} gave a code outside the spec: {:?}", sqe.opcode, outcome.code
                );
                prop_assert!(
                    outcome.code != ReturnCode::INTERNAL_ERROR,
                    "{} hit an internal error", sqe.opcode
                );
                if outcome.code.is_success() {
                    let mutates = matches!(
                        sqe.opcode,
                        QueueOpcode::KV_CREATE
                            | QueueOpcode::KV_APPEND
                            | QueueOpcode::KV_COMMIT
                            | QueueOpcode::KV_FREE
                    );
                    let layout = region.layout;
                    let mut after = outside(mem, &buffers);
                    let mut before = before;
                    if mutates {
                        // The store lives in device DRAM: compare up to it.
                        after.truncate(layout.dram_offset as usize);
                        before.truncate(layout.dram_offset as usize);
                    }
                    prop_assert!(after == before, "{} wrote outside its buffers", sqe.opcode);
                } else {
                    prop_assert!(
                        outside(mem, &[]) == before_all,
                        "refused {} ({:?}) changed memory", sqe.opcode, outcome.code
                    );
                }
            }
        }
    }

    /// The layout every fixture has (all are made alike).
    fn fixture_layout() -> RegionLayout {
        RegionLayout::new(8 << 20, None).expect("8 MiB is a valid region")
    }
}
