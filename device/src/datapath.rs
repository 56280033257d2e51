//! Executes queue commands against the KV store, with every field of the
//! descriptor validated before anything is read or written.

use pnm_firmware::LIMITS;
use pnm_firmware::kernels::{self, Aggregation, Scored};
use pnm_firmware::kv::{
    CommitMode, Dram, KvError, KvStore, PageSelection, SequenceShape, TopkQuery, TopkScratch,
    Writer,
};
use pnm_firmware::simd::Rows;
use pnm_firmware::timing::{self, HardwareProfile, Work};
use pnm_protocol::queue::{
    self as queue, FLAG_PAGE_SELECTION, GatherLayout, PageMapEntry, SubmissionEntry, TopkLayout,
    decode_page_selection, opcode,
};
use pnm_protocol::{Dtype, RegionLayout, ReturnCode, SharedMemory};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use zerocopy::IntoBytes;

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
    fn with_rows<R>(
        &self,
        offset: u64,
        len: u64,
        dtype: Dtype,
        score: impl FnOnce(Rows<'_>) -> R,
    ) -> Result<R, KvError> {
        crate::sys::with_rows(self.mem, offset, len, dtype, score)
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

    fn error(code: ReturnCode) -> Self {
        Self { code, ..Self::ok(0, 0, 0) }
    }

    fn with_work(self, work: Work) -> Self {
        Self { work, ..self }
    }
}

/// A refusal: the return code and why (for the log).
pub type Refusal = (ReturnCode, String);

/// A checked TOPK/TOPK_GATHER: its fields, queries and result buffer.
/// Made once per command: the queries are read from the host's buffer and
/// converted once, so a host that rewrites the buffer mid-command cannot
/// have a split command's shares scored against different queries.
#[derive(Debug)]
pub struct TopkPlan {
    shape: SequenceShape,
    k: u32,
    group: u32,
    how: Aggregation,
    queries: Vec<f32>,
    out: u64,
    result: TopkLayout,
    with_rows: bool,
}

impl TopkPlan {
    /// The Top-K `sqe` asks for, as the KV store takes it.
    fn query<'a>(&'a self, sqe: &SubmissionEntry) -> TopkQuery<'a> {
        TopkQuery {
            seq: sqe.seq.get(),
            layer: sqe.layer.get(),
            head: sqe.head.get(),
            queries: &self.queries,
            how: self.how,
            k: self.k,
        }
    }
}

fn kv_error(e: KvError) -> Refusal {
    let code = match &e {
        KvError::NoSuchSequence(_) => ReturnCode::INVALID_HANDLE,
        KvError::Invalid(_) | KvError::SequenceTooLong { .. } => ReturnCode::INVALID_INPUT,
        KvError::DramExhausted { .. } | KvError::TooManySequences(_) => {
            ReturnCode::RESOURCES_EXHAUSTED
        }
        KvError::OutOfRange { .. } | KvError::TooSmall(_) | KvError::Damaged(_) => {
            ReturnCode::INTERNAL_ERROR
        }
        // Another queue's append is between its KV_APPEND and KV_COMMIT.
        KvError::AppendInProgress { .. } => ReturnCode::BUSY,
        KvError::NotTheWriter { .. } => ReturnCode::INVALID_INPUT,
    };
    (code, e.to_string())
}

fn invalid(reason: impl Into<String>) -> Refusal {
    (ReturnCode::INVALID_INPUT, reason.into())
}

/// The engine's data-path executor.
/// The KV store, shared by the engine and the compute units: Top-K and
/// gather read it concurrently; KV_CREATE/APPEND/COMMIT/FREE change it
/// alone (so a sequence is never freed under a running Top-K).
pub type SharedStore = Arc<RwLock<KvStore<DramView>>>;

/// An executor of queue commands; each thread has its own.
#[derive(Debug)]
pub struct DataPath {
    /// The whole region (host buffers are addressed from its start).
    pub mem: SharedMemory,
    pub layout: RegionLayout,
    pub kv: SharedStore,
    /// The timing model's hardware: every completion carries its time.
    pub profile: Arc<HardwareProfile>,
    scratch: Vec<u8>,
    topk: TopkScratch,
}

impl Clone for DataPath {
    fn clone(&self) -> Self {
        Self::with_store(self.mem, self.layout, self.kv.clone(), self.profile.clone())
    }
}

/// Top-Ks shorter than this run on one unit: below it the hand-off to a
/// second unit costs more than it saves.
const SPLIT_MIN_TOKENS: u64 = 16384;

/// A single query's Top-K is split only if each share has at least this
/// many tokens per selected one: every share keeps its own best k, so a
/// share close to k in length does the selection's work twice over. (At
/// 32K tokens and k 2048, two shares of 8 tokens per selected one measured
/// 0.7-1.0x the unsplit latency in quiet spells, 1.3x in a noisy one.)
const SPLIT_TOKENS_PER_K: u64 = 8;

/// Shares per compute unit when each stays long next to k (see
/// [`DataPath::split_plan`]).
const SHARES_PER_UNIT: u32 = 4;

/// Tokens per selected one a share needs before a Top-K is cut into
/// [`SHARES_PER_UNIT`] shares per unit: then the merge of all the shares'
/// best k stays small next to the scan.
const FINE_SHARE_TOKENS_PER_K: u64 = 64;

/// True for commands that only read the store and may take long: the
/// engine hands them to a compute unit.
pub fn is_compute(opcode: u8) -> bool {
    matches!(opcode, opcode::TOPK | opcode::GATHER | opcode::TOPK_GATHER)
}

impl DataPath {
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
        Self { mem, layout, kv, profile, scratch: Vec::new(), topk: TopkScratch::default() }
    }

    fn read(&self) -> RwLockReadGuard<'_, KvStore<DramView>> {
        self.kv.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `[addr, addr + len)` is a host buffer of at least `need`
    /// bytes inside the host DMA window.
    fn buffer(&self, which: &str, addr: u64, len: u32, need: u64) -> Result<u64, Refusal> {
        let len = u64::from(len);
        if len < need {
            return Err((
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                format!("{which} holds {len} bytes, needs {need}"),
            ));
        }
        let window = self.layout.dma_window_offset
            ..self.layout.dma_window_offset + self.layout.dma_window_size;
        match addr.checked_add(len) {
            Some(end) if window.contains(&addr) && end <= window.end => Ok(addr),
            _ => Err((
                ReturnCode::INVALID_PHYSICAL_ADDRESS,
                format!("{which} {addr:#x}+{len:#x} is not inside the host DMA window"),
            )),
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), Refusal> {
        self.mem.write_bytes(addr, bytes).map_err(|e| (ReturnCode::INTERNAL_ERROR, e.to_string()))
    }

    /// Executes one descriptor that arrived on the queue `writer` names
    /// (its reservations are that queue's).
    pub fn execute(&mut self, sqe: &SubmissionEntry, writer: Writer) -> Outcome {
        let outcome = self.dispatch(sqe, writer);
        self.modelled(sqe, outcome)
    }

    /// The completion of a command: its outcome or refusal, with the
    /// modelled hardware time.
    fn modelled(&self, sqe: &SubmissionEntry, outcome: Result<Outcome, Refusal>) -> Outcome {
        let outcome = outcome.unwrap_or_else(|(code, reason)| {
            tracing::debug!(opcode = sqe.opcode, cid = sqe.command_id.get(), %code, %reason, "command refused");
            Outcome::error(code)
        });
        let model_ns = timing::command_ns(&self.profile, outcome.work);
        Outcome { model_ns: model_ns.min(f64::from(u32::MAX)) as u32, ..outcome }
    }

    fn dispatch(&mut self, sqe: &SubmissionEntry, from: Writer) -> Result<Outcome, Refusal> {
        let seq = sqe.seq.get();
        let store = self.kv.clone();
        let writer = || store.write().unwrap_or_else(|e| e.into_inner());
        match sqe.opcode {
            opcode::NOP => Ok(Outcome::ok(0, 0, 0)),
            opcode::KV_CREATE => {
                let head_dim =
                    u16::try_from(sqe.arg0.get()).map_err(|_| invalid("head_dim too large"))?;
                let dtype =
                    Dtype::from_code(sqe.arg1.get()).ok_or_else(|| invalid("unknown dtype"))?;
                let shape = SequenceShape {
                    dtype,
                    layers: sqe.layer.get(),
                    heads: sqe.head.get(),
                    head_dim,
                };
                let id = writer().create(shape).map_err(kv_error)?;
                Ok(Outcome::ok(id, shape.tokens_per_page() as u32, 0))
            }
            opcode::KV_APPEND => {
                let count = u64::from(sqe.count.get());
                let mut kv = writer();
                let shape = kv.shape(seq).map_err(kv_error)?;
                kv.check_append(seq, from).map_err(kv_error)?;
                let reserved = kv.reserved(seq).map_err(kv_error)?;
                let tpp = shape.tokens_per_page();
                let pages = (reserved + count).div_ceil(tpp) - reserved / tpp;
                let need = pages * u64::from(shape.layers) * u64::from(shape.heads) * 8;
                let out =
                    self.buffer("page map buffer", sqe.buf0_addr.get(), sqe.buf0_len.get(), need)?;
                let appended = kv.append_as(seq, count, from).map_err(kv_error)?;
                self.write(out, appended.map.as_bytes())?;
                let first = u32::try_from(appended.first_token)
                    .map_err(|_| invalid("token index over 2^32"))?;
                Ok(Outcome::ok(first, appended.first_page as u32, pages))
            }
            opcode::KV_COMMIT => {
                let mode = match sqe.flags {
                    0 => CommitMode::Publish,
                    queue::KV_COMMIT_DEFER => CommitMode::Defer,
                    queue::KV_COMMIT_ABORT => {
                        let tokens = writer().abort_append(seq, from).map_err(kv_error)?;
                        return Ok(Outcome::ok(tokens as u32, 0, tokens));
                    }
                    other => return Err(invalid(format!("KV_COMMIT flags {other:#x}"))),
                };
                let tokens = writer()
                    .commit_as(seq, u64::from(sqe.count.get()), from, mode)
                    .map_err(kv_error)?;
                Ok(Outcome::ok(tokens as u32, 0, tokens))
            }
            opcode::KV_FREE => {
                writer().free(seq).map_err(kv_error)?;
                Ok(Outcome::ok(0, 0, 0))
            }
            opcode::KV_LIST => {
                let list = self.read().list();
                let room = u64::from(sqe.buf0_len.get()) / 32;
                let n = (list.len() as u64).min(u64::from(sqe.count.get())).min(room);
                let out =
                    self.buffer("list buffer", sqe.buf0_addr.get(), sqe.buf0_len.get(), n * 32)?;
                self.write(out, list[..n as usize].as_bytes())?;
                Ok(Outcome::ok(list.len() as u32, n as u32, 0))
            }
            opcode::KV_MAP => {
                let (first, count) = (u64::from(sqe.arg0.get()), u64::from(sqe.count.get()));
                let map: Vec<PageMapEntry> =
                    self.read().page_map(seq, first, count).map_err(kv_error)?;
                let out = self.buffer(
                    "page map buffer",
                    sqe.buf0_addr.get(),
                    sqe.buf0_len.get(),
                    map.as_bytes().len() as u64,
                )?;
                self.write(out, map.as_bytes())?;
                Ok(Outcome::ok(count as u32, 0, 0))
            }
            opcode::TOPK | opcode::TOPK_GATHER => {
                let kv = store.read().unwrap_or_else(|e| e.into_inner());
                self.topk(&kv, sqe, sqe.opcode == opcode::TOPK_GATHER)
            }
            opcode::GATHER => {
                let kv = store.read().unwrap_or_else(|e| e.into_inner());
                self.gather(&kv, sqe)
            }
            other => Err((ReturnCode::UNSUPPORTED, format!("opcode {other:#04x}"))),
        }
    }

    fn topk(
        &mut self,
        kv: &KvStore<DramView>,
        sqe: &SubmissionEntry,
        with_rows: bool,
    ) -> Result<Outcome, Refusal> {
        let plan = self.plan_topk(kv, sqe, with_rows)?;
        let (top, scored): (Vec<Scored>, u64) = match sqe.flags {
            0 => {
                let top = kv.top_k_with(&mut self.topk, plan.query(sqe)).map_err(kv_error)?;
                (top, kv.tokens(sqe.seq.get()).unwrap_or(0))
            }
            FLAG_PAGE_SELECTION => {
                let (budget, sinks, recent) = decode_page_selection(sqe.selection.get());
                let selection = PageSelection {
                    budget_tokens: u64::from(budget),
                    sink_pages: u32::from(sinks),
                    recent_pages: u32::from(recent),
                };
                let s = kv
                    .top_k_selected(&mut self.topk, plan.query(sqe), selection)
                    .map_err(kv_error)?;
                (s.top, s.tokens_scored)
            }
            other => return Err(invalid(format!("unknown TOPK flags {other:#04x}"))),
        };
        self.finish_topk(kv, sqe, &plan, &top, scored)
    }

    /// Checks a TOPK/TOPK_GATHER descriptor and reads its queries.
    fn plan_topk(
        &mut self,
        kv: &KvStore<DramView>,
        sqe: &SubmissionEntry,
        with_rows: bool,
    ) -> Result<TopkPlan, Refusal> {
        let seq = sqe.seq.get();
        let shape = kv.shape(seq).map_err(kv_error)?;
        let (k, group) = (sqe.count.get(), sqe.arg0.get());
        if k == 0 || k > LIMITS.max_k {
            return Err(invalid(format!("k {k} not in 1..={}", LIMITS.max_k)));
        }
        if group == 0 || group > LIMITS.max_group {
            return Err(invalid(format!("group {group} not in 1..={}", LIMITS.max_group)));
        }
        let arg1 = sqe.arg1.get();
        let query_dtype =
            Dtype::from_code(arg1 & 0xFF).ok_or_else(|| invalid("unknown query dtype"))?;
        let how = Aggregation::from_code((arg1 >> 8) as u8)
            .filter(|_| arg1 >> 16 == 0)
            .ok_or_else(|| invalid("unknown aggregation"))?;
        let query_bytes = u64::from(group) * u64::from(shape.head_dim) * query_dtype.size() as u64;
        if u64::from(sqe.buf0_len.get()) != query_bytes {
            return Err((
                ReturnCode::INVALID_PAYLOAD_LENGTH,
                format!(
                    "query buffer holds {} bytes, {group} queries need {query_bytes}",
                    sqe.buf0_len.get()
                ),
            ));
        }
        let query_at =
            self.buffer("query buffer", sqe.buf0_addr.get(), sqe.buf0_len.get(), query_bytes)?;
        let result = TopkLayout {
            k: u64::from(k),
            row_bytes: if with_rows { shape.row_bytes() } else { 0 },
        };
        let out =
            self.buffer("result buffer", sqe.buf1_addr.get(), sqe.buf1_len.get(), result.len())?;
        self.scratch.resize(query_bytes as usize, 0);
        self.mem
            .read_bytes(query_at, &mut self.scratch)
            .map_err(|e| (ReturnCode::INTERNAL_ERROR, e.to_string()))?;
        let mut queries = Vec::new();
        kernels::to_f32(query_dtype, &self.scratch, &mut queries);
        Ok(TopkPlan { shape, k, group, how, queries, out, result, with_rows })
    }

    /// Writes a Top-K's results (and rows) to the host and describes its work.
    fn finish_topk(
        &mut self,
        kv: &KvStore<DramView>,
        sqe: &SubmissionEntry,
        plan: &TopkPlan,
        top: &[Scored],
        scored: u64,
    ) -> Result<Outcome, Refusal> {
        let indices: Vec<u32> = top.iter().map(|s| s.index).collect();
        let scores: Vec<f32> = top.iter().map(|s| s.score).collect();
        self.write(plan.out + plan.result.indices(), indices.as_bytes())?;
        self.write(plan.out + plan.result.scores(), scores.as_bytes())?;
        if plan.with_rows {
            let (keys, values) = (plan.result.key_rows(), plan.result.value_rows());
            self.copy_rows(kv, sqe, &indices, plan.out + keys, plan.out + values)?;
        }
        let work = Work::TopK {
            tokens: scored,
            head_dim: u64::from(plan.shape.head_dim),
            elem_bytes: plan.shape.dtype.size() as u64,
            group: u64::from(plan.group),
            k: top.len() as u64,
            gathered: if plan.with_rows { top.len() as u64 } else { 0 },
        };
        let scored = scored.min(u64::from(u32::MAX)) as u32;
        let tokens = kv.tokens(sqe.seq.get()).unwrap_or(0);
        Ok(Outcome::ok(top.len() as u32, scored, tokens).with_work(work))
    }

    /// How to split an exact TOPK/TOPK_GATHER across `units` compute units:
    /// the tokens every share scans and the number of shares, or None to run
    /// it whole (page-selected Top-Ks always are). Every share keeps its own
    /// best k and the last merges them, so for a single query (a short,
    /// memory-bound scan) a share must be long next to k; a GQA group's scan
    /// is compute-bound and pays regardless. Where shares stay long next to
    /// k there are several per unit, taken in turn from the job queue: a
    /// unit that starts late (woken from sleep, or on a busier CPU) then
    /// scans fewer of them instead of holding up the merge.
    pub fn split_plan(&self, sqe: &SubmissionEntry, units: u32) -> Option<(u64, u32)> {
        let exact_topk = matches!(sqe.opcode, opcode::TOPK | opcode::TOPK_GATHER) && sqe.flags == 0;
        if !exact_topk || units < 2 {
            return None;
        }
        let (tokens, shape) = {
            let kv = self.read();
            (kv.tokens(sqe.seq.get()).ok()?, kv.shape(sqe.seq.get()).ok()?)
        };
        let k = u64::from(sqe.count.get()).max(1);
        let share = |parts: u32| tokens / u64::from(parts);
        let long_shares = sqe.arg0.get() >= 2 || share(units) >= SPLIT_TOKENS_PER_K * k;
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
    pub fn plan_split(&mut self, sqe: &SubmissionEntry) -> Result<TopkPlan, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        self.plan_topk(&kv, sqe, sqe.opcode == opcode::TOPK_GATHER)
    }

    /// One compute unit's part of a split Top-K: the best k of its share of
    /// the first `tokens` tokens.
    pub fn topk_part(
        &mut self,
        sqe: &SubmissionEntry,
        plan: &TopkPlan,
        tokens: u64,
        part: (u32, u32),
    ) -> Result<Vec<Scored>, Refusal> {
        let store = self.kv.clone();
        let kv = store.read().unwrap_or_else(|e| e.into_inner());
        kv.top_k_part(&mut self.topk, plan.query(sqe), tokens, part).map_err(kv_error)
    }

    /// Completes a split Top-K from its parts: merges them exactly and
    /// writes the results like an unsplit command.
    pub fn finish_split(
        &mut self,
        sqe: &SubmissionEntry,
        plan: &TopkPlan,
        tokens: u64,
        parts: Vec<Result<Vec<Scored>, Refusal>>,
    ) -> Outcome {
        let outcome = (|| {
            let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
            let store = self.kv.clone();
            let kv = store.read().unwrap_or_else(|e| e.into_inner());
            let top = kernels::merge_top_k(&parts, plan.k as usize);
            self.finish_topk(&kv, sqe, plan, &top, tokens)
        })();
        self.modelled(sqe, outcome)
    }

    fn gather(
        &mut self,
        kv: &KvStore<DramView>,
        sqe: &SubmissionEntry,
    ) -> Result<Outcome, Refusal> {
        let seq = sqe.seq.get();
        let shape = kv.shape(seq).map_err(kv_error)?;
        let n = sqe.count.get();
        if n == 0 {
            return Err(invalid("gathering 0 rows"));
        }
        let index_bytes = u64::from(n) * 4;
        let at =
            self.buffer("index buffer", sqe.buf0_addr.get(), sqe.buf0_len.get(), index_bytes)?;
        let rows = GatherLayout { n: u64::from(n), row_bytes: shape.row_bytes() };
        let out = self.buffer("row buffer", sqe.buf1_addr.get(), sqe.buf1_len.get(), rows.len())?;
        self.scratch.resize(index_bytes as usize, 0);
        self.mem
            .read_bytes(at, &mut self.scratch)
            .map_err(|e| (ReturnCode::INTERNAL_ERROR, e.to_string()))?;
        let indices: Vec<u32> = self
            .scratch
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.copy_rows(kv, sqe, &indices, out + rows.key_rows(), out + rows.value_rows())?;
        let work = Work::Gather {
            rows: u64::from(n),
            head_dim: u64::from(shape.head_dim),
            elem_bytes: shape.dtype.size() as u64,
        };
        Ok(Outcome::ok(n, 0, 0).with_work(work))
    }

    /// DMAs the K and V rows of `indices` to consecutive rows at `keys_at`
    /// and `values_at`. Every index is checked before any row moves.
    fn copy_rows(
        &self,
        kv: &KvStore<DramView>,
        sqe: &SubmissionEntry,
        indices: &[u32],
        keys_at: u64,
        values_at: u64,
    ) -> Result<(), Refusal> {
        let seq = sqe.seq.get();
        let row = kv.shape(seq).map_err(kv_error)?.row_bytes();
        let locations =
            kv.row_locations(seq, sqe.layer.get(), sqe.head.get(), indices).map_err(kv_error)?;
        let dram = self.layout.dram_offset;
        for (i, loc) in locations.iter().enumerate() {
            kv.prefetch_gather(&locations, i, row);
            let i = i as u64;
            let moved = self
                .mem
                .copy_within(dram + loc.key, keys_at + i * row, row)
                .and_then(|()| self.mem.copy_within(dram + loc.value, values_at + i * row, row));
            moved.map_err(|e| (ReturnCode::INTERNAL_ERROR, e.to_string()))?;
        }
        Ok(())
    }
}

/// For tests: a data path over a fresh embedded region of `size` bytes
/// holding one sequence of `tokens` tokens with `rows` as both its keys and
/// its values. The region must outlive the data path.
#[cfg(test)]
fn loaded_datapath(
    size: u64,
    shape: pnm_firmware::kv::SequenceShape,
    rows: &[u8],
    tokens: u64,
) -> (crate::region::Region, DataPath, u32) {
    let region = crate::region::Region::embedded(size, None).expect("memfd region");
    let (mem, layout) = (region.regs(), region.layout);
    let (kv, _) = KvStore::open(DramView::new(mem, &layout)).expect("fresh store");
    let datapath = DataPath::new(mem, layout, kv, crate::engine::default_profile());
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
        let (_region, datapath, seq) = loaded_datapath(32 << 20, shape, &rows, tokens);
        let mut sqe = SubmissionEntry { opcode: opcode::TOPK_GATHER, flags, ..Default::default() };
        sqe.seq = seq.into();
        sqe.count = k.into();
        sqe.arg0 = group.into();
        datapath.split_plan(&sqe, units)
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
        assert_eq!(plan(40_000, 4, 64, FLAG_PAGE_SELECTION, 2), None);
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
        let (region, mut datapath, seq) = loaded_datapath(64 << 20, shape, &rows, tokens);
        let mem = region.regs();
        let window = region.layout.dma_window_offset;
        let (query_at, out_at) = (window, window + 4096);
        let query = |sign: f32| -> Vec<u8> {
            (0..16).flat_map(|i| (sign * (i as f32 * 0.37).sin()).to_le_bytes()).collect()
        };
        let mut sqe = SubmissionEntry { opcode: opcode::TOPK, ..Default::default() };
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
        assert_eq!(datapath.execute(&sqe, Writer(1)).code, ReturnCode::SUCCESS);
        let want = read_result();
        mem.fill(out_at, 8 * 64, 0).unwrap();

        let (tokens, parts) = datapath.split_plan(&sqe, 2).expect("long enough to split");
        let plan = datapath.plan_split(&sqe).unwrap();
        // The host overwrites its queries after the command was taken.
        mem.write_bytes(query_at, &query(-1.0)).unwrap();
        let shares =
            (0..parts).map(|p| datapath.topk_part(&sqe, &plan, tokens, (p, parts))).collect();
        assert_eq!(datapath.finish_split(&sqe, &plan, tokens, shares).code, ReturnCode::SUCCESS);
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
        datapath: DataPath,
        seq: u32,
    }

    fn fixture() -> Fixture {
        // 2 layers x 2 heads: four streams of rows.
        let shape = SequenceShape { dtype: Dtype::F32, layers: 2, heads: 2, head_dim: 16 };
        let bytes: Vec<u8> =
            (0..TOKENS * shape.row_bytes() * 4).map(|i| (i * 7 % 251) as u8).collect();
        let (region, datapath, seq) = loaded_datapath(8 << 20, shape, &bytes, TOKENS);
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
            Just(opcode::NOP),
            Just(opcode::KV_CREATE),
            Just(opcode::KV_APPEND),
            Just(opcode::KV_COMMIT),
            Just(opcode::KV_FREE),
            Just(opcode::KV_LIST),
            Just(opcode::KV_MAP),
            Just(opcode::TOPK),
            Just(opcode::GATHER),
            Just(opcode::TOPK_GATHER),
            any::<u8>(),
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
        let ops = prop_oneof![Just(opcode::TOPK), Just(opcode::TOPK_GATHER), Just(opcode::GATHER)];
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
                e.buf0_len = if op == opcode::GATHER { 4 * k } else { 64 * group }.into();
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
                let outcome = datapath.execute(&sqe, Writer(1));
                prop_assert!(
                    ReturnCode::ALL.iter().any(|(c, _)| *c == outcome.code),
                    "{:#04x} gave a code outside the spec: {:?}", sqe.opcode, outcome.code
                );
                prop_assert!(
                    outcome.code != ReturnCode::INTERNAL_ERROR,
                    "{:#04x} hit an internal error", sqe.opcode
                );
                if outcome.code.is_success() {
                    let mutates = matches!(
                        sqe.opcode,
                        opcode::KV_CREATE | opcode::KV_APPEND | opcode::KV_COMMIT | opcode::KV_FREE
                    );
                    let layout = region.layout;
                    let mut after = outside(mem, &buffers);
                    let mut before = before;
                    if mutates {
                        // The store lives in device DRAM: compare up to it.
                        after.truncate(layout.dram_offset as usize);
                        before.truncate(layout.dram_offset as usize);
                    }
                    prop_assert!(after == before, "{:#04x} wrote outside its buffers", sqe.opcode);
                } else {
                    prop_assert!(
                        outside(mem, &[]) == before_all,
                        "refused {:#04x} ({:?}) changed memory", sqe.opcode, outcome.code
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
