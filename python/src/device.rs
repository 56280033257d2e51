//! `Device`, `DeviceSet` and `Sequence`: a device (or a set of them), and a
//! KV sequence in its DRAM with Top-K and gather.

use std::borrow::Borrow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use numpy::PyArray1;
use pnm_device::RunningDevice;
use pnm_host::{
    Aggregation, DeviceOptions, Dtype, KvShape, PageSelection, QueueOptions, SetTopkRequest,
    ShardedSequence, TopkRequest,
};
use pyo3::prelude::*;

use crate::arrays;
use crate::errors::{IntoPy, invalid};

/// One device: the driver's handle, and the device itself when it runs
/// embedded in this process. Fields drop in order: the handle gives its
/// queue back while the device still serves.
#[derive(Debug)]
pub struct Backend {
    pub device: pnm_host::Device,
    embedded: Option<RunningDevice>,
}

/// A device set, and the devices whose handles it holds (kept alive, and
/// running if embedded, as long as the set or a sequence on it lives).
#[derive(Debug)]
pub struct SetBackend {
    pub set: pnm_host::DeviceSet,
    _members: Vec<Arc<Backend>>,
}

/// A shared set, as `TieredKv` holds it.
#[derive(Debug, Clone)]
pub struct SharedSet(pub Arc<SetBackend>);

impl Borrow<pnm_host::DeviceSet> for SharedSet {
    fn borrow(&self) -> &pnm_host::DeviceSet {
        &self.0.set
    }
}

pub fn parse_dtype(py: Python<'_>, name: &str) -> PyResult<Dtype> {
    match name {
        "f32" | "float32" => Ok(Dtype::F32),
        "f16" | "float16" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::Bf16),
        _ => Err(invalid(py, format!("dtype {name:?}: one of f32, f16, bf16"))),
    }
}

fn parse_aggregation(py: Python<'_>, name: &str) -> PyResult<Aggregation> {
    match name {
        "max" => Ok(Aggregation::Max),
        "mean" => Ok(Aggregation::Mean),
        _ => Err(invalid(py, format!("aggregation {name:?}: max or mean"))),
    }
}

fn size_arg(py: Python<'_>, size: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(bytes) = size.extract::<u64>() {
        return Ok(bytes);
    }
    let text: String = size.extract()?;
    pnm_protocol::layout::parse_size(&text).map_err(|e| invalid(py, e))
}

/// Timeouts in seconds, as Python gives them.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    command: f64,
    mailbox: f64,
}

fn seconds(py: Python<'_>, what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| invalid(py, format!("{what} of {value} s: a positive number of seconds")))
}

fn options(py: Python<'_>, bounds: Bounds, interrupts: bool) -> PyResult<DeviceOptions> {
    Ok(DeviceOptions {
        command_timeout: seconds(py, "command_timeout", bounds.command)?,
        mailbox_timeout: seconds(py, "mailbox_timeout", bounds.mailbox)?,
        interrupts,
        ..DeviceOptions::default()
    })
}

fn to_json<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| invalid(py, e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

pub fn embedded_backend(
    py: Python<'_>,
    size: u64,
    compute_units: Option<u32>,
    command_timeout: f64,
) -> PyResult<Arc<Backend>> {
    let running = py
        .detach(|| RunningDevice::embedded(size, compute_units))
        .map_err(|e| invalid(py, format!("starting an embedded device: {e}")))?;
    let bounds = Bounds { command: command_timeout, mailbox: 2.0 };
    let options =
        DeviceOptions { socket: running.socket().map(Into::into), ..options(py, bounds, false)? };
    let device =
        py.detach(|| pnm_host::Device::open_with(&running.region().path, &options)).py_err(py)?;
    Ok(Arc::new(Backend { device, embedded: Some(running) }))
}

/// A cxl-pnm device: a running `pnm-device` (its region file, or `vfio:BDF`
/// for the device as a PCI function bound to vfio-pci), or one embedded in
/// this process (`Device.embedded()`).
#[pyclass(frozen, module = "cxl_pnm._native")]
#[derive(Debug)]
pub struct Device {
    pub backend: Arc<Backend>,
}

#[pymethods]
impl Device {
    /// Opens the device at `path`: a region file (`/dev/shm/cxl-pnm0`) or
    /// `vfio:0000:00:03.0`. A queue command waits `command_timeout` seconds,
    /// a mailbox command `mailbox_timeout`, then raises DeviceTimeoutError
    /// (a timed-out Top-K or gather is retried once on a new queue pair, so
    /// a call is bounded by about command_timeout + 2 x mailbox_timeout +
    /// command_timeout). `interrupts` waits on the device's interrupts
    /// instead of polling.
    #[new]
    #[pyo3(signature = (path, *, command_timeout = 10.0, mailbox_timeout = 2.0, interrupts = false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        command_timeout: f64,
        mailbox_timeout: f64,
        interrupts: bool,
    ) -> PyResult<Self> {
        let bounds = Bounds { command: command_timeout, mailbox: mailbox_timeout };
        let options = options(py, bounds, interrupts)?;
        let device = py.detach(|| pnm_host::Device::open_with(&path, &options)).py_err(py)?;
        Ok(Self { backend: Arc::new(Backend { device, embedded: None }) })
    }

    /// A device embedded in this process (its region in memory, its engine
    /// on threads of its own), serving until the last object using it goes.
    /// `size` in bytes or as text ("1GiB"): the region, device DRAM being
    /// most of it.
    #[staticmethod]
    #[pyo3(signature = (size = None, *, compute_units = None, command_timeout = 10.0))]
    fn embedded(
        py: Python<'_>,
        size: Option<&Bound<'_, PyAny>>,
        compute_units: Option<u32>,
        command_timeout: f64,
    ) -> PyResult<Self> {
        let size = size.map(|s| size_arg(py, s)).transpose()?.unwrap_or(1 << 30);
        Ok(Self { backend: embedded_backend(py, size, compute_units, command_timeout)? })
    }

    /// The region path (or `vfio:BDF`) the device was opened by.
    #[getter]
    fn path(&self) -> String {
        self.backend.device.path().display().to_string()
    }

    /// True for a device embedded in this process.
    #[getter]
    fn is_embedded(&self) -> bool {
        self.backend.embedded.is_some()
    }

    /// Identify Memory Device (spec 4000h), as a dict.
    fn identify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let identify = py.detach(|| self.backend.device.identify()).py_err(py)?;
        to_json(py, &identify)
    }

    /// Get Health Info (spec 4200h), as a dict.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let health = py.detach(|| self.backend.device.health_info()).py_err(py)?;
        to_json(py, &health)
    }

    /// Identify PNM (vendor C000h): layout, compute units, dtypes and
    /// limits (max_k, max_group, max_head_dim), as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let info = py.detach(|| self.backend.device.identify_pnm()).py_err(py)?;
        to_json(py, &info)
    }

    /// Poisons the 64-byte line at `dpa` (Inject Poison, spec 4301h; the
    /// device must run with --allow-injection): reads of it then fail with
    /// MediaError. `Sequence.row_ranges` tells where a token's rows are.
    fn inject_poison(&self, py: Python<'_>, dpa: u64) -> PyResult<()> {
        py.detach(|| self.backend.device.inject_poison(dpa)).py_err(py)
    }

    /// Clears the poison at `dpa`, writing `data` (64 bytes) to the line
    /// (Clear Poison, spec 4302h).
    fn clear_poison(&self, py: Python<'_>, dpa: u64, data: [u8; 64]) -> PyResult<()> {
        py.detach(|| self.backend.device.clear_poison(dpa, &data)).py_err(py)
    }

    /// The device's poison list (Get Poison List, spec 4300h), as a dict.
    fn poison_list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let list = py.detach(|| self.backend.device.poison_list()).py_err(py)?;
        to_json(py, &list)
    }

    /// Creates an empty KV sequence of `layers` x `heads` (KV heads) x
    /// `head_dim`, stored as `dtype` ("f32", "f16" or "bf16").
    #[pyo3(signature = (layers, heads, head_dim, dtype = "f16"))]
    fn kv_create(
        &self,
        py: Python<'_>,
        layers: u16,
        heads: u16,
        head_dim: u16,
        dtype: &str,
    ) -> PyResult<Sequence> {
        let shape = KvShape { dtype: parse_dtype(py, dtype)?, layers, heads, head_dim };
        let seq = py.detach(|| self.backend.device.kv_create(shape)).py_err(py)?;
        Ok(Sequence::single(self.backend.clone(), seq))
    }

    /// Every sequence on the device (any host's).
    fn kv_list(&self, py: Python<'_>) -> PyResult<Vec<Sequence>> {
        let list = py.detach(|| self.backend.device.kv_list()).py_err(py)?;
        Ok(list.into_iter().map(|s| Sequence::single(self.backend.clone(), s)).collect())
    }

    /// The sequence with id `id` (one this or another host created).
    fn sequence(&self, py: Python<'_>, id: u32) -> PyResult<Sequence> {
        let seq = py.detach(|| self.backend.device.kv_sequence(id)).py_err(py)?;
        Ok(Sequence::single(self.backend.clone(), seq))
    }

    fn __repr__(&self) -> String {
        if self.is_embedded() {
            "Device(embedded)".into()
        } else {
            format!("Device({:?})", self.path())
        }
    }
}

/// N devices serving one KV store: a sequence's pages go round robin over
/// them, a Top-K fans out to all in parallel and is merged exactly, rows
/// come from the devices holding them.
#[pyclass(frozen, module = "cxl_pnm._native")]
#[derive(Debug)]
pub struct DeviceSet {
    pub backend: Arc<SetBackend>,
}

impl DeviceSet {
    fn from_backends(py: Python<'_>, members: Vec<Arc<Backend>>) -> PyResult<Self> {
        let handles = members
            .iter()
            .map(|m| m.device.handle(QueueOptions::default()))
            .collect::<pnm_host::Result<Vec<_>>>()
            .py_err(py)?;
        let set = pnm_host::DeviceSet::new(handles).py_err(py)?;
        Ok(Self { backend: Arc::new(SetBackend { set, _members: members }) })
    }

    /// A one-device set over `device` (what a tiered KV on one device uses).
    pub fn of_one(py: Python<'_>, device: &Device) -> PyResult<Self> {
        Self::from_backends(py, vec![device.backend.clone()])
    }
}

#[pymethods]
impl DeviceSet {
    /// A set of devices already open (each gets a queue pair of the set's).
    #[new]
    fn new(py: Python<'_>, devices: Vec<PyRef<'_, Device>>) -> PyResult<Self> {
        Self::from_backends(py, devices.iter().map(|d| d.backend.clone()).collect())
    }

    /// Opens a set of running devices by path.
    #[staticmethod]
    #[pyo3(signature = (paths, *, command_timeout = 10.0, mailbox_timeout = 2.0, interrupts = false))]
    fn open(
        py: Python<'_>,
        paths: Vec<PathBuf>,
        command_timeout: f64,
        mailbox_timeout: f64,
        interrupts: bool,
    ) -> PyResult<Self> {
        let bounds = Bounds { command: command_timeout, mailbox: mailbox_timeout };
        let options = options(py, bounds, interrupts)?;
        let members = paths
            .iter()
            .map(|p| {
                let device = py.detach(|| pnm_host::Device::open_with(p, &options)).py_err(py)?;
                Ok(Arc::new(Backend { device, embedded: None }))
            })
            .collect::<PyResult<Vec<_>>>()?;
        Self::from_backends(py, members)
    }

    /// `count` devices embedded in this process, each of `size`.
    #[staticmethod]
    #[pyo3(signature = (count, size = None, *, compute_units = None, command_timeout = 10.0))]
    fn embedded(
        py: Python<'_>,
        count: usize,
        size: Option<&Bound<'_, PyAny>>,
        compute_units: Option<u32>,
        command_timeout: f64,
    ) -> PyResult<Self> {
        let size = size.map(|s| size_arg(py, s)).transpose()?.unwrap_or(1 << 30);
        let members = (0..count)
            .map(|_| embedded_backend(py, size, compute_units, command_timeout))
            .collect::<PyResult<Vec<_>>>()?;
        Self::from_backends(py, members)
    }

    fn __len__(&self) -> usize {
        self.backend.set.len()
    }

    /// Creates an empty sequence sharded over every device of the set.
    #[pyo3(signature = (layers, heads, head_dim, dtype = "f16"))]
    fn kv_create(
        &self,
        py: Python<'_>,
        layers: u16,
        heads: u16,
        head_dim: u16,
        dtype: &str,
    ) -> PyResult<Sequence> {
        let shape = KvShape { dtype: parse_dtype(py, dtype)?, layers, heads, head_dim };
        let seq = py.detach(|| self.backend.set.kv_create(shape)).py_err(py)?;
        Ok(Sequence::sharded(self.backend.clone(), seq))
    }

    /// The sharded sequence whose shard on device i has id `ids[i]`.
    fn sequence(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<Sequence> {
        let seq = py.detach(|| self.backend.set.kv_sequence(&ids)).py_err(py)?;
        Ok(Sequence::sharded(self.backend.clone(), seq))
    }

    fn __repr__(&self) -> String {
        format!("DeviceSet({} devices)", self.backend.set.len())
    }
}

/// Where a sequence lives.
#[derive(Debug, Clone)]
enum Store {
    Single { backend: Arc<Backend>, seq: pnm_host::Sequence },
    Sharded { set: Arc<SetBackend>, seq: ShardedSequence },
}

impl Store {
    fn shape(&self) -> KvShape {
        match self {
            Self::Single { seq, .. } => seq.shape,
            Self::Sharded { seq, .. } => seq.shape,
        }
    }

    fn tokens(&self) -> u64 {
        match self {
            Self::Single { seq, .. } => seq.tokens,
            Self::Sharded { seq, .. } => seq.tokens,
        }
    }
}

/// A KV sequence in device DRAM (on one device, or sharded over a set).
///
/// K and V are `[layers, heads, tokens, head_dim]` arrays of the sequence's
/// dtype; `append` writes them straight into device DRAM. `topk` and
/// `topk_gather` score a GQA group's queries against every key next to the
/// memory and return the best `k` tokens (and their rows).
#[pyclass(frozen, module = "cxl_pnm._native")]
#[derive(Debug)]
pub struct Sequence {
    store: Mutex<Store>,
}

/// A Top-K's answer: `indices` (uint32, best first) and `scores` (float32);
/// from `topk_gather` also the selected tokens' `keys` and `values`
/// (`[n, head_dim]`, the sequence's dtype; bf16 as uint16 bits).
#[pyclass(frozen, module = "cxl_pnm._native", name = "TopK")]
#[derive(Debug)]
pub struct TopKResult {
    #[pyo3(get)]
    indices: Py<PyAny>,
    #[pyo3(get)]
    scores: Py<PyAny>,
    #[pyo3(get)]
    keys: Option<Py<PyAny>>,
    #[pyo3(get)]
    values: Option<Py<PyAny>>,
    /// Tokens in the sequence.
    #[pyo3(get)]
    tokens: u64,
    /// Tokens scored (fewer with page selection or skipped bad rows).
    #[pyo3(get)]
    tokens_scored: u64,
    /// Tokens left out because they lie on bad media (skip_bad_rows).
    #[pyo3(get)]
    skipped: u64,
    /// Nanoseconds the device spent (a set: its slowest device plus the
    /// host's merge).
    #[pyo3(get)]
    device_ns: u64,
    /// Nanoseconds the modelled hardware would take.
    #[pyo3(get)]
    model_ns: u64,
}

#[pymethods]
impl TopKResult {
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.indices.bind(py).len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "TopK({} of {} tokens, {} scored{})",
            self.__len__(py)?,
            self.tokens,
            self.tokens_scored,
            if self.keys.is_some() { ", with rows" } else { "" }
        ))
    }
}

/// A Top-K request's options, as Python passes them.
struct TopkOptions {
    k: u32,
    aggregation: Aggregation,
    selection: Option<PageSelection>,
    skip_bad_rows: bool,
}

impl Sequence {
    pub fn single(backend: Arc<Backend>, seq: pnm_host::Sequence) -> Self {
        Self { store: Mutex::new(Store::Single { backend, seq }) }
    }

    pub fn sharded(set: Arc<SetBackend>, seq: ShardedSequence) -> Self {
        Self { store: Mutex::new(Store::Sharded { set, seq }) }
    }

    /// Refuses a (layer, head) outside the sequence before the device
    /// does, naming the shape (the device would answer Invalid Input).
    fn check_stream(py: Python<'_>, shape: KvShape, layer: u16, head: u16) -> PyResult<()> {
        if layer >= shape.layers || head >= shape.heads {
            return Err(invalid(
                py,
                format!("layer {layer}, KV head {head}: the sequence holds {shape}"),
            ));
        }
        Ok(())
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sequence as of now. Calls work on a snapshot and never hold the
    /// lock while the GIL is released: another Python thread waiting for
    /// the lock would hold the GIL this thread needs back.
    fn snapshot(&self) -> Store {
        self.store().clone()
    }

    /// Takes an append's or refresh's answer, unless another thread's
    /// later one already landed.
    fn update(&self, newer: Store) {
        let mut store = self.store();
        if newer.tokens() >= store.tokens() {
            *store = newer;
        }
    }

    /// Runs a Top-K (with rows if `rows`) and builds its answer.
    fn run_topk(
        &self,
        py: Python<'_>,
        layer: u16,
        head: u16,
        queries: &Bound<'_, PyAny>,
        options: TopkOptions,
        rows: bool,
    ) -> PyResult<TopKResult> {
        let store = self.snapshot();
        let shape = store.shape();
        Self::check_stream(py, shape, layer, head)?;
        let query = arrays::query(queries, shape.head_dim)?;
        let (top, gathered) = match &store {
            Store::Single { backend, seq } => {
                let mut request = TopkRequest::new(seq, layer, head, &query, options.k)
                    .with_aggregation(options.aggregation);
                request.selection = options.selection;
                request.skip_bad_rows = options.skip_bad_rows;
                let device = &backend.device;
                py.detach(|| {
                    if rows {
                        device.topk_gather(&request).map(|(t, r)| (t, Some(r)))
                    } else {
                        device.topk(&request).map(|t| (t, None))
                    }
                })
                .py_err(py)?
            }
            Store::Sharded { set, seq } => {
                if options.selection.is_some() {
                    return Err(invalid(
                        py,
                        "page selection (budget) picks pages per device and is not offered on a \
                         device set: a set's Top-K is exact",
                    ));
                }
                let mut request = SetTopkRequest::new(seq, layer, head, &query, options.k)
                    .with_aggregation(options.aggregation);
                request.skip_bad_rows = options.skip_bad_rows;
                let set = &set.set;
                py.detach(|| {
                    if rows {
                        set.topk_gather(&request).map(|(t, r)| (t.top, Some(r)))
                    } else {
                        set.topk(&request).map(|t| (t.top, None))
                    }
                })
                .py_err(py)?
            }
        };
        let (keys, values) = match gathered {
            Some(r) => (
                Some(arrays::rows_out(py, r.keys, shape.dtype, shape.head_dim)?.unbind()),
                Some(arrays::rows_out(py, r.values, shape.dtype, shape.head_dim)?.unbind()),
            ),
            None => (None, None),
        };
        Ok(TopKResult {
            indices: PyArray1::from_vec(py, top.indices).into_any().unbind(),
            scores: PyArray1::from_vec(py, top.scores).into_any().unbind(),
            keys,
            values,
            tokens: top.tokens,
            tokens_scored: top.tokens_scored,
            skipped: top.skipped,
            device_ns: top.device_ns,
            model_ns: top.model_ns,
        })
    }

    fn topk_options(
        py: Python<'_>,
        k: u32,
        aggregation: &str,
        budget: Option<u32>,
        sink_pages: u8,
        recent_pages: u8,
        skip_bad_rows: bool,
    ) -> PyResult<TopkOptions> {
        Ok(TopkOptions {
            k,
            aggregation: parse_aggregation(py, aggregation)?,
            selection: budget.map(|budget_tokens| PageSelection {
                budget_tokens,
                sink_pages,
                recent_pages,
            }),
            skip_bad_rows,
        })
    }
}

#[pymethods]
impl Sequence {
    /// The sequence id (on a set: the id on each device, see `ids`).
    #[getter]
    fn ids(&self) -> Vec<u32> {
        match &*self.store() {
            Store::Single { seq, .. } => vec![seq.id],
            Store::Sharded { seq, .. } => seq.shards.iter().map(|s| s.id).collect(),
        }
    }

    /// The id on its one device; on a set, ValueError (see `ids`).
    #[getter]
    fn id(&self, py: Python<'_>) -> PyResult<u32> {
        match &*self.store() {
            Store::Single { seq, .. } => Ok(seq.id),
            Store::Sharded { .. } => Err(invalid(py, "a sharded sequence has one id per device")),
        }
    }

    #[getter]
    fn layers(&self) -> u16 {
        self.store().shape().layers
    }

    /// KV heads.
    #[getter]
    fn heads(&self) -> u16 {
        self.store().shape().heads
    }

    #[getter]
    fn head_dim(&self) -> u16 {
        self.store().shape().head_dim
    }

    /// "f32", "f16" or "bf16".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.store().shape().dtype.name()
    }

    /// Tokens stored (as of this handle's last append or refresh).
    #[getter]
    fn tokens(&self) -> u64 {
        self.store().tokens()
    }

    fn __len__(&self) -> usize {
        self.store().tokens() as usize
    }

    /// Devices holding the sequence.
    #[getter]
    fn devices(&self) -> usize {
        match &*self.store() {
            Store::Single { .. } => 1,
            Store::Sharded { seq, .. } => seq.shards.len(),
        }
    }

    /// Appends tokens: `keys` and `values` shaped `[layers, heads, tokens,
    /// head_dim]` in the sequence's dtype (f32: float32; f16: float16 or
    /// its uint16 bits; bf16: uint16 bits). A C-contiguous array goes
    /// into device DRAM with no other copy (keys of 16-token tiles through
    /// one tile-sized buffer, transposed); other float arrays are
    /// converted first (one copy). Atomic: on an error the
    /// sequence keeps the tokens it had (on a set, `refresh` then append
    /// the same rows again completes a torn append).
    fn append(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut store = self.snapshot();
        let (k, v, tokens) = arrays::kv_rows(keys, values, store.shape())?;
        if tokens == 0 {
            return Ok(());
        }
        let (kb, vb) = (k.bytes(), v.bytes());
        match &mut store {
            Store::Single { backend, seq } => {
                let device = &backend.device;
                let current = *seq;
                *seq = py
                    .detach(|| device.kv_append(&current, kb, vb, tokens, &mut |_| {}))
                    .py_err(py)?;
            }
            Store::Sharded { set, seq } => {
                let set = &set.set;
                let current = seq.clone();
                *seq = py.detach(|| set.kv_append(&current, kb, vb, tokens)).py_err(py)?;
            }
        }
        self.update(store);
        Ok(())
    }

    /// The best `k` tokens of (layer, head) for `queries` (`[G, head_dim]`
    /// float32/float16, a GQA group; `[head_dim]` for one), scores
    /// combined by `aggregation` ("max" or "mean"). `budget` switches to
    /// page selection: only the pages whose key bounds promise the most
    /// are scored, up to `budget` tokens, plus `sink_pages` first and
    /// `recent_pages` last pages (one device only). `skip_bad_rows` scores
    /// around bad media instead of raising MediaError.
    #[pyo3(signature = (layer, head, queries, k, *, aggregation = "max", budget = None,
                        sink_pages = 1, recent_pages = 1, skip_bad_rows = false))]
    #[allow(clippy::too_many_arguments)]
    fn topk(
        &self,
        py: Python<'_>,
        layer: u16,
        head: u16,
        queries: &Bound<'_, PyAny>,
        k: u32,
        aggregation: &str,
        budget: Option<u32>,
        sink_pages: u8,
        recent_pages: u8,
        skip_bad_rows: bool,
    ) -> PyResult<TopKResult> {
        let options = Self::topk_options(
            py,
            k,
            aggregation,
            budget,
            sink_pages,
            recent_pages,
            skip_bad_rows,
        )?;
        self.run_topk(py, layer, head, queries, options, false)
    }

    /// `topk`, and the selected tokens' K and V rows in the same command
    /// (TOPK_GATHER; on a set, gathered from the devices holding them).
    #[pyo3(signature = (layer, head, queries, k, *, aggregation = "max", budget = None,
                        sink_pages = 1, recent_pages = 1, skip_bad_rows = false))]
    #[allow(clippy::too_many_arguments)]
    fn topk_gather(
        &self,
        py: Python<'_>,
        layer: u16,
        head: u16,
        queries: &Bound<'_, PyAny>,
        k: u32,
        aggregation: &str,
        budget: Option<u32>,
        sink_pages: u8,
        recent_pages: u8,
        skip_bad_rows: bool,
    ) -> PyResult<TopKResult> {
        let options = Self::topk_options(
            py,
            k,
            aggregation,
            budget,
            sink_pages,
            recent_pages,
            skip_bad_rows,
        )?;
        self.run_topk(py, layer, head, queries, options, true)
    }

    /// The K and V rows (`[n, head_dim]` each) of tokens `indices` of
    /// (layer, head), in that order.
    fn gather<'py>(
        &self,
        py: Python<'py>,
        layer: u16,
        head: u16,
        indices: Vec<u32>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let store = self.snapshot();
        let shape = store.shape();
        Self::check_stream(py, shape, layer, head)?;
        let rows = match &store {
            Store::Single { backend, seq } => {
                let device = &backend.device;
                py.detach(|| device.gather(seq, layer, head, &indices)).py_err(py)?
            }
            Store::Sharded { set, seq } => {
                let set = &set.set;
                py.detach(|| set.gather(seq, layer, head, &indices)).py_err(py)?
            }
        };
        Ok((
            arrays::rows_out(py, rows.keys, shape.dtype, shape.head_dim)?,
            arrays::rows_out(py, rows.values, shape.dtype, shape.head_dim)?,
        ))
    }

    /// Where the K (or, `value`, V) rows of tokens `start..stop` of (layer,
    /// head) lie in device memory: `[(dpa, lines)]`, one range of 64-byte
    /// lines per page (one device only). Keys of power-of-two head_dims lie
    /// in tiles of 16 tokens: their ranges span whole tiles, and a bad line
    /// there affects the tile's 16 tokens. For fault injection.
    #[pyo3(signature = (layer, head, start, stop, *, value = false))]
    fn row_ranges(
        &self,
        py: Python<'_>,
        layer: u16,
        head: u16,
        start: u64,
        stop: u64,
        value: bool,
    ) -> PyResult<Vec<(u64, u64)>> {
        let Store::Single { backend, seq } = self.snapshot() else {
            return Err(invalid(py, "row_ranges names one device's memory: not on a set"));
        };
        py.detach(|| backend.device.row_ranges(&seq, layer, head, start..stop, value)).py_err(py)
    }

    /// Reads the sequence back from the device(s): its tokens after
    /// another host's appends, or a set's shards after a torn append.
    fn refresh(&self, py: Python<'_>) -> PyResult<()> {
        let mut store = self.snapshot();
        match &mut store {
            Store::Single { backend, seq } => {
                let device = &backend.device;
                let id = seq.id;
                *seq = py.detach(|| device.kv_sequence(id)).py_err(py)?;
            }
            Store::Sharded { set, seq } => {
                let set = &set.set;
                let current = seq.clone();
                *seq = py.detach(|| set.kv_resync(&current)).py_err(py)?;
            }
        }
        // A refresh is the device's word: it replaces whatever this handle had.
        *self.store() = store;
        Ok(())
    }

    /// Frees the sequence and its device DRAM.
    fn free(&self, py: Python<'_>) -> PyResult<()> {
        match &self.snapshot() {
            Store::Single { backend, seq } => {
                let device = &backend.device;
                py.detach(|| device.kv_free(seq.id)).py_err(py)
            }
            Store::Sharded { set, seq } => {
                let set = &set.set;
                py.detach(|| set.kv_free(seq)).py_err(py)
            }
        }
    }

    fn __repr__(&self) -> String {
        let store = self.store();
        format!(
            "Sequence(ids={:?}, {}, {} tokens)",
            match &*store {
                Store::Single { seq, .. } => vec![seq.id],
                Store::Sharded { seq, .. } => seq.shards.iter().map(|s| s.id).collect(),
            },
            store.shape(),
            store.tokens()
        )
    }
}

impl Sequence {
    /// Seconds per `topk_gather` of each of `reps` calls made from Rust
    /// (the driver's `topk_gather`, answer in vectors), the figure the
    /// binding's overhead is measured against.
    pub fn bench_rust_topk_gather(
        &self,
        py: Python<'_>,
        layer: u16,
        head: u16,
        queries: &Bound<'_, PyAny>,
        k: u32,
        reps: usize,
    ) -> PyResult<Vec<f64>> {
        let store = self.snapshot();
        let query = arrays::query(queries, store.shape().head_dim)?;
        let Store::Single { backend, seq } = &store else {
            return Err(invalid(py, "the benchmark runs on a one-device sequence"));
        };
        let request = TopkRequest::new(seq, layer, head, &query, k);
        let device = &backend.device;
        py.detach(|| {
            (0..reps)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let answer = device.topk_gather(&request)?;
                    std::hint::black_box(answer);
                    Ok(start.elapsed().as_secs_f64())
                })
                .collect::<pnm_host::Result<Vec<_>>>()
        })
        .py_err(py)
    }

    /// Seconds for the driver's `kv_append` of `keys`/`values` (as
    /// `append` takes them) called from Rust, the append bandwidth the
    /// binding's is measured against.
    pub fn bench_rust_append(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<f64> {
        let store = self.snapshot();
        let (k, v, tokens) = arrays::kv_rows(keys, values, store.shape())?;
        let Store::Single { backend, seq } = &store else {
            return Err(invalid(py, "the benchmark runs on a one-device sequence"));
        };
        let (kb, vb) = (k.bytes(), v.bytes());
        let device = &backend.device;
        let start = std::time::Instant::now();
        let appended =
            py.detach(|| device.kv_append(seq, kb, vb, tokens, &mut |_| {})).py_err(py)?;
        let seconds = start.elapsed().as_secs_f64();
        self.update(Store::Single { backend: backend.clone(), seq: appended });
        Ok(seconds)
    }
}
