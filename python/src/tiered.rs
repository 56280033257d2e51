//! `TieredKv`: the hot window in host memory, the rest evicted to a device
//! set, and the decode step's attention over both (the hook an inference
//! engine calls in place of its attention).

use std::sync::Mutex;

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pnm_host::{KvShape, TieredOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays;
use crate::device::{Device, DeviceSet, SharedSet, parse_dtype};
use crate::errors::{IntoPy, invalid};

type Inner = pnm_host::TieredKv<SharedSet>;

/// A KV sequence tiered between host memory and a device (or device set):
/// the first `sinks` tokens and the newest `hot_window` stay in host
/// memory; older tokens are evicted to the device a page at a time.
/// `attend` computes a decode step's attention exactly over the host tokens
/// plus the device's Top-`k` rows of the evicted part, under one softmax.
///
/// Frees its device part when it goes (or on `free()`).
#[pyclass(frozen, module = "cxl_pnm._native")]
#[derive(Debug)]
pub struct TieredKv {
    inner: Mutex<Option<Inner>>,
}

impl TieredKv {
    /// Runs `f` on the tiered sequence with the GIL released; the lock is
    /// taken on the released side, so a thread waiting for it never holds
    /// the GIL this one needs back.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner) -> pnm_host::Result<T> + Send,
    ) -> PyResult<T> {
        let result = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_mut().map(f)
        });
        match result {
            Some(r) => r.py_err(py),
            None => Err(invalid(py, "this tiered KV was freed")),
        }
    }

    fn read<T>(&self, py: Python<'_>, f: impl FnOnce(&Inner) -> T) -> PyResult<T> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(f).ok_or_else(|| invalid(py, "this tiered KV was freed"))
    }
}

fn stats_dict<'py>(py: Python<'py>, stats: &pnm_host::AttendStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("host_tokens", stats.host_tokens)?;
    d.set_item("evicted_tokens", stats.evicted_tokens)?;
    d.set_item("selected", PyArray1::from_slice(py, &stats.selected))?;
    d.set_item("link_bytes", stats.link_bytes)?;
    if let Some(top) = &stats.topk {
        d.set_item("device_ns", top.top.device_ns)?;
        d.set_item("model_ns", top.top.model_ns)?;
    }
    Ok(d)
}

#[pymethods]
impl TieredKv {
    /// An empty tiered sequence of `layers` x `heads` (KV heads) x
    /// `head_dim`, stored as `dtype`, its evicted part on `devices` (a
    /// Device or a DeviceSet). `evict_batch` tokens go per eviction (0: one
    /// page of the set's striping, so every eviction fills whole pages).
    #[new]
    #[pyo3(signature = (devices, layers, heads, head_dim, *, dtype = "f32", hot_window, k,
                        sinks = 4, evict_batch = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        devices: &Bound<'_, PyAny>,
        layers: u16,
        heads: u16,
        head_dim: u16,
        dtype: &str,
        hot_window: u64,
        k: u32,
        sinks: u64,
        evict_batch: u64,
    ) -> PyResult<Self> {
        let set = if let Ok(set) = devices.cast::<DeviceSet>() {
            set.get().backend.clone()
        } else if let Ok(device) = devices.cast::<Device>() {
            DeviceSet::of_one(py, device.get())?.backend
        } else {
            return Err(invalid(py, "devices: a Device or a DeviceSet"));
        };
        let shape = KvShape { dtype: parse_dtype(py, dtype)?, layers, heads, head_dim };
        let options = TieredOptions { hot_window, sinks, evict_batch, k };
        let inner =
            py.detach(|| pnm_host::TieredKv::new(SharedSet(set), shape, options)).py_err(py)?;
        Ok(Self { inner: Mutex::new(Some(inner)) })
    }

    /// Appends tokens (`[layers, heads, tokens, head_dim]` K and V, as for
    /// `Sequence.append`) and evicts what no longer fits the hot window.
    /// If an eviction fails, the error is raised with the tokens appended
    /// and kept in host memory; the next append or `retry_eviction` moves
    /// them.
    fn append(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let shape = self.read(py, |t| t.shape())?;
        let (k, v, tokens) = arrays::kv_rows(keys, values, shape)?;
        let (kb, vb) = (k.bytes(), v.bytes());
        self.with(py, |t| t.append(kb, vb, tokens))
    }

    /// Moves whatever a failed eviction left in the hot window.
    fn retry_eviction(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |t| t.retry_eviction())
    }

    /// One decode step's attention for (layer, head): `queries` `[G,
    /// head_dim]` float32 (the GQA group's query heads), scale
    /// 1/sqrt(head_dim). Returns the outputs `[G, head_dim]` and a dict:
    /// host_tokens, evicted_tokens, selected (the evicted tokens the device
    /// picked, global indices, best first), link_bytes, device_ns,
    /// model_ns.
    fn attend<'py>(
        &self,
        py: Python<'py>,
        layer: u16,
        head: u16,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let queries = queries
            .cast::<PyArrayDyn<f32>>()
            .map_err(|_| invalid(py, "queries must be a numpy float32 array [G, head_dim]"))?;
        let shape = queries.shape().to_vec();
        let readonly = queries.readonly();
        let q = readonly.as_slice().map_err(|_| invalid(py, "queries must be C-contiguous"))?;
        let mut out = vec![0f32; q.len()];
        let stats = self.with(py, |t| t.attend(layer, head, q, &mut out))?;
        let out = PyArray1::from_vec(py, out).reshape(shape)?.into_any();
        Ok((out, stats_dict(py, &stats)?))
    }

    /// Every KV head of `layer` at once: `queries` `[heads, G, head_dim]`
    /// float32, outputs the same shape. Returns (outputs, link bytes of
    /// the step's device traffic for this layer).
    fn attend_layer<'py>(
        &self,
        py: Python<'py>,
        layer: u16,
        queries: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyAny>, u64)> {
        let (heads, d) =
            self.read(py, |t| (usize::from(t.shape().heads), usize::from(t.shape().head_dim)))?;
        let queries = queries.cast::<PyArrayDyn<f32>>().map_err(|_| {
            invalid(py, "queries must be a numpy float32 array [heads, G, head_dim]")
        })?;
        let shape = queries.shape().to_vec();
        if shape.len() != 3 || shape[0] != heads || shape[1] == 0 || shape[2] != d {
            return Err(invalid(
                py,
                format!("queries of shape {shape:?}; expected [{heads}, G, {d}] with G >= 1"),
            ));
        }
        let readonly = queries.readonly();
        let q = readonly.as_slice().map_err(|_| invalid(py, "queries must be C-contiguous"))?;
        let mut out = vec![0f32; q.len()];
        let per_head = q.len() / heads;
        let link_bytes = self.with(py, |t| {
            let mut bytes = 0;
            for (h, (q, o)) in
                q.chunks_exact(per_head).zip(out.chunks_exact_mut(per_head)).enumerate()
            {
                bytes += t.attend(layer, h as u16, q, o)?.link_bytes;
            }
            Ok(bytes)
        })?;
        let out = PyArray1::from_vec(py, out).reshape(shape)?.into_any();
        Ok((out, link_bytes))
    }

    /// K and V rows of tokens `start..stop` of (layer, head), wherever they
    /// are (host memory, or gathered back from the devices).
    fn recall<'py>(
        &self,
        py: Python<'py>,
        layer: u16,
        head: u16,
        start: u64,
        stop: u64,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let shape = self.read(py, |t| t.shape())?;
        let (k, v) = self.with(py, |t| t.recall(layer, head, start, stop))?;
        Ok((
            arrays::rows_out(py, k, shape.dtype, shape.head_dim)?,
            arrays::rows_out(py, v, shape.dtype, shape.head_dim)?,
        ))
    }

    /// Tokens in the sequence.
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |t| t.tokens())
    }

    /// Tokens in the device(s).
    #[getter]
    fn evicted(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |t| t.evicted())
    }

    /// Tokens in host memory (sinks and hot window).
    #[getter]
    fn host_tokens(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |t| t.host_tokens())
    }

    /// Bytes written to the device(s) by evictions so far.
    #[getter]
    fn evicted_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.read(py, |t| t.evicted_bytes())
    }

    #[getter]
    fn k(&self, py: Python<'_>) -> PyResult<u32> {
        self.read(py, |t| t.options().k)
    }

    /// Frees the device part now (the object is unusable afterwards).
    fn free(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        match inner {
            Some(t) => py.detach(|| t.free()).py_err(py),
            None => Ok(()),
        }
    }

    fn __repr__(&self) -> String {
        match &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(t) => format!(
                "TieredKv({}, {} tokens: {} in host memory, {} evicted, k {})",
                t.shape(),
                t.tokens(),
                t.host_tokens(),
                t.evicted(),
                t.options().k
            ),
            None => "TieredKv(freed)".into(),
        }
    }
}

impl Drop for TieredKv {
    fn drop(&mut self) {
        if let Some(t) = self.inner.get_mut().unwrap_or_else(|e| e.into_inner()).take()
            && let Err(e) = t.free()
        {
            tracing::warn!(error = %e, "could not free a tiered KV's device part");
        }
    }
}
