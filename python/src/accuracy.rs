//! The accuracy report from Python (`cxl_pnm.accuracy`): the same sweep as
//! `pnmctl accuracy` (`pnm_tools::accuracy`), on NumPy arrays or a
//! synthetic cache.

use std::path::PathBuf;

use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pnm_host::{Dtype, KvShape};
use pnm_tools::accuracy::{self, Sweep, Synthetic, Workload};
use pyo3::prelude::*;

use crate::arrays;
use crate::device::{Backend, Device, embedded_backend, parse_dtype};
use crate::errors::invalid;

/// The dtype of K and V arrays: as given, else what NumPy says.
fn kv_dtype(py: Python<'_>, keys: &Bound<'_, PyAny>, dtype: Option<&str>) -> PyResult<Dtype> {
    if let Some(name) = dtype {
        return parse_dtype(py, name);
    }
    let name = keys.getattr("dtype")?.getattr("name")?.extract::<String>()?;
    match name.as_str() {
        "float32" => Ok(Dtype::F32),
        "float16" => Ok(Dtype::F16),
        _ => Err(invalid(
            py,
            format!("keys of numpy {name}: give dtype= (\"bf16\" for bfloat16 bits as uint16)"),
        )),
    }
}

/// Runs the sweep and returns the report as a dict, with `text` (the
/// table) and, with `plot_dir`, `charts` (the files written).
fn run<'py>(
    py: Python<'py>,
    workload: Workload,
    sweep: Sweep,
    device: Option<&Device>,
    plot_dir: Option<PathBuf>,
    per_head: bool,
) -> PyResult<Bound<'py, PyAny>> {
    workload.check().map_err(|e| invalid(py, e))?;
    if sweep.ks.is_empty() || sweep.ks.contains(&0) {
        return Err(invalid(py, "ks: at least one k, each at least 1"));
    }
    let backend: std::sync::Arc<Backend> = match device {
        Some(d) => d.backend.clone(),
        None => {
            let bytes = workload.shape.bytes(workload.tokens) * 2;
            let size = ((bytes as f64 * 1.1) as u64 + (192 << 20)).next_power_of_two();
            embedded_backend(py, size, None, 10.0)?
        }
    };
    let report = py
        .detach(|| accuracy::run(&backend.device, &workload, &sweep, &mut |_, _| {}))
        .map_err(|e| invalid(py, e))?;
    let mut value = serde_json::to_value(&report).map_err(|e| invalid(py, e.to_string()))?;
    value["text"] = report.to_text(per_head).into();
    if let Some(dir) = plot_dir {
        let (written, note) =
            pnm_tools::plot::write_all(&dir, &report.charts()).map_err(|e| invalid(py, e))?;
        value["charts"] = serde_json::json!(written);
        value["charts_note"] = serde_json::json!(note);
    }
    py.import("json")?.call_method1("loads", (value.to_string(),))
}

/// The accuracy report on your KV cache: `keys`, `values` `[layers,
/// kv_heads, tokens, head_dim]` (float32, float16, or uint16 bits with
/// `dtype`), `queries` `[layers, kv_heads, G, head_dim]` or `[layers,
/// kv_heads, samples, G, head_dim]` (None: the newest key with noise,
/// `samples` groups of `group`). Sweeps `ks` with exact Top-K and with
/// page selection at each of `budgets`, on `device` (None: an embedded one).
#[pyfunction]
#[pyo3(signature = (keys, values, queries = None, *, dtype = None,
                    ks = vec![16, 64, 256, 1024, 4096], budgets = vec![2048, 8192],
                    group = 4, samples = 4, sink_pages = 1, recent_pages = 1, seed = 1,
                    device = None, plot_dir = None, per_head = false))]
#[allow(clippy::too_many_arguments)]
pub fn accuracy_report<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    values: &Bound<'py, PyAny>,
    queries: Option<&Bound<'py, PyAny>>,
    dtype: Option<&str>,
    ks: Vec<u32>,
    budgets: Vec<u32>,
    group: usize,
    samples: usize,
    sink_pages: u8,
    recent_pages: u8,
    seed: u64,
    device: Option<PyRef<'py, Device>>,
    plot_dir: Option<PathBuf>,
    per_head: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let dtype = kv_dtype(py, keys, dtype)?;
    let shape_of = |a: &Bound<'_, PyAny>| -> PyResult<Vec<usize>> { a.getattr("shape")?.extract() };
    let [layers, heads, _, d] = shape_of(keys)?[..] else {
        return Err(invalid(py, "keys: [layers, kv_heads, tokens, head_dim]"));
    };
    let narrow = |n: usize| u16::try_from(n).map_err(|_| invalid(py, format!("{n} is too large")));
    let shape =
        KvShape { dtype, layers: narrow(layers)?, heads: narrow(heads)?, head_dim: narrow(d)? };
    let (k, v, tokens) = arrays::kv_rows(keys, values, shape)?;
    let mut workload = Workload {
        shape,
        tokens,
        keys: k.bytes().to_vec(),
        values: v.bytes().to_vec(),
        queries: Vec::new(),
        group: 0,
        samples: 0,
        source: "arrays from Python".into(),
    };
    match queries {
        None => workload.queries_from_keys(group, samples, seed),
        Some(q) => {
            let q = q
                .cast::<PyArrayDyn<f32>>()
                .map_err(|_| invalid(py, "queries must be a numpy float32 array"))?;
            let (s, g) = match q.shape()[..] {
                [l, h, g, n] if [l, h, n] == [layers, heads, d] => (1, g),
                [l, h, s, g, n] if [l, h, n] == [layers, heads, d] => (s, g),
                ref other => {
                    return Err(invalid(
                        py,
                        format!(
                            "queries of shape {other:?}; expected [{layers}, {heads}, G, {d}] \
                             or [{layers}, {heads}, samples, G, {d}]"
                        ),
                    ));
                }
            };
            workload.queries = q.to_vec().map_err(|e| invalid(py, e.to_string()))?;
            (workload.samples, workload.group) = (s, g);
        }
    }
    let sweep = Sweep { ks, budgets, sink_pages, recent_pages };
    run(py, workload, sweep, device.as_deref(), plot_dir, per_head)
}

/// The accuracy report on a synthetic cache: `kind` "structured" (sinks,
/// heavy hitters, recency: peaked attention, as in real models) or
/// "random" (N(0,1) keys, values and queries: diffuse attention).
#[pyfunction]
#[pyo3(signature = (kind = "structured", *, layers = 2, heads = 4, head_dim = 128,
                    tokens = 32768, dtype = "f16", ks = vec![16, 64, 256, 1024, 4096],
                    budgets = vec![2048, 8192], group = 4, samples = 4, sink_pages = 1,
                    recent_pages = 1, seed = 1, device = None, plot_dir = None,
                    per_head = false))]
#[allow(clippy::too_many_arguments)]
pub fn synthetic_accuracy_report<'py>(
    py: Python<'py>,
    kind: &str,
    layers: u16,
    heads: u16,
    head_dim: u16,
    tokens: u64,
    dtype: &str,
    ks: Vec<u32>,
    budgets: Vec<u32>,
    group: usize,
    samples: usize,
    sink_pages: u8,
    recent_pages: u8,
    seed: u64,
    device: Option<PyRef<'py, Device>>,
    plot_dir: Option<PathBuf>,
    per_head: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = match kind {
        "structured" => Synthetic::Structured,
        "random" => Synthetic::Random,
        _ => return Err(invalid(py, format!("kind {kind:?}: structured or random"))),
    };
    let shape = KvShape { dtype: parse_dtype(py, dtype)?, layers, heads, head_dim };
    let workload = Workload::synthetic(kind, shape, tokens, group, samples, seed);
    let sweep = Sweep { ks, budgets, sink_pages, recent_pages };
    run(py, workload, sweep, device.as_deref(), plot_dir, per_head)
}
