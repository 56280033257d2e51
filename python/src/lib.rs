//! `cxl_pnm._native`: the Python binding of cxl-pnm (PyO3).
//!
//! The classes (`Device`, `DeviceSet`, `Sequence`, `TopK`, `TieredKv`) wrap
//! the host driver; `cxl_pnm/__init__.py` re-exports them with the pure
//! Python parts (exceptions, the Hugging Face attention hook, the accuracy
//! report's charts). Every call that waits on a device releases the GIL.

mod accuracy;
mod arrays;
mod device;
mod errors;
mod tiered;

use pyo3::prelude::*;

use device::Sequence;

/// This machine's memory read bandwidth in GB/s (best of `reps` reads of
/// `bytes`): the roofline benchmark figures are divided by.
#[pyfunction]
#[pyo3(signature = (bytes = 256 << 20, reps = 5))]
fn memory_read_gbps(py: Python<'_>, bytes: usize, reps: usize) -> PyResult<f64> {
    let roofline = pnm_tools::roofline::Roofline::new(bytes)
        .map_err(|e| errors::invalid(py, format!("allocating {bytes} bytes: {e}")))?;
    Ok(py.detach(|| roofline.read_gb_per_s(reps)))
}

/// Benchmark helper: seconds per `topk_gather` called from Rust.
#[pyfunction]
fn _bench_rust_topk_gather(
    py: Python<'_>,
    seq: &Sequence,
    layer: u16,
    head: u16,
    queries: &Bound<'_, PyAny>,
    k: u32,
    reps: usize,
) -> PyResult<Vec<f64>> {
    seq.bench_rust_topk_gather(py, layer, head, queries, k, reps)
}

/// Benchmark helper: seconds for an append called from Rust.
#[pyfunction]
fn _bench_rust_append(
    py: Python<'_>,
    seq: &Sequence,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
) -> PyResult<f64> {
    seq.bench_rust_append(py, keys, values)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Logs to stderr, filtered by RUST_LOG (warnings by default), as the
    // binaries do; a host program that set up tracing first keeps its own.
    pnm_logging::try_init("warn");
    m.add_class::<device::Device>()?;
    m.add_class::<device::DeviceSet>()?;
    m.add_class::<device::Sequence>()?;
    m.add_class::<device::TopKResult>()?;
    m.add_class::<tiered::TieredKv>()?;
    m.add_function(wrap_pyfunction!(memory_read_gbps, m)?)?;
    m.add_function(wrap_pyfunction!(accuracy::accuracy_report, m)?)?;
    m.add_function(wrap_pyfunction!(accuracy::synthetic_accuracy_report, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_rust_topk_gather, m)?)?;
    m.add_function(wrap_pyfunction!(_bench_rust_append, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
