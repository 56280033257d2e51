//! NumPy arrays in and out, without copies where the data allows.
//!
//! In: a C-contiguous array is borrowed as bytes for the duration of the
//! call (its rows go straight into device DRAM); any other layout is made
//! contiguous by NumPy first, one copy. Out: rows come back in vectors the
//! driver filled from the DMA buffer (the one copy out of the device's
//! window), handed to NumPy without another copy.
//!
//! The caller must not write to an input array from another thread while a
//! call that borrowed it runs (the GIL is released while it waits on the
//! device); NumPy's borrow flag guards only against Rust-side borrows.

use numpy::{
    Element, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pnm_host::{Dtype, KvShape, Query};
use pyo3::prelude::*;

use crate::errors::invalid;

/// An array of KV rows, borrowed read-only.
pub enum Borrowed<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, half::f16>),
    U16(PyReadonlyArrayDyn<'py, u16>),
}

impl Borrowed<'_> {
    pub fn shape(&self) -> &[usize] {
        match self {
            Self::F32(a) => a.shape(),
            Self::F16(a) => a.shape(),
            Self::U16(a) => a.shape(),
        }
    }

    /// The elements' bytes (the array is C-contiguous, see [`borrow`]).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::F32(a) => bytemuck::cast_slice(a.as_slice().expect("made contiguous")),
            Self::F16(a) => bytemuck::cast_slice(a.as_slice().expect("made contiguous")),
            Self::U16(a) => bytemuck::cast_slice(a.as_slice().expect("made contiguous")),
        }
    }
}

/// `obj` made C-contiguous (the same object if it already is).
fn contiguous<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    numpy_contiguous(obj.py(), obj)
}

fn typed<'py, T: Element>(obj: &Bound<'py, PyAny>) -> Option<PyResult<PyReadonlyArrayDyn<'py, T>>> {
    let array = obj.cast::<PyArrayDyn<T>>().ok()?;
    if array.is_c_contiguous() {
        return Some(Ok(array.readonly()));
    }
    Some(contiguous(obj).and_then(|c| Ok(c.cast_into::<PyArrayDyn<T>>()?.readonly())))
}

/// True for a NumPy array of floats (float16, float32, float64).
fn is_float_array(obj: &Bound<'_, PyAny>) -> bool {
    obj.getattr("dtype")
        .and_then(|d| d.getattr("kind"))
        .and_then(|k| k.extract::<String>())
        .is_ok_and(|kind| kind == "f")
}

/// A float array of another type, converted to `dtype` (one copy): NumPy's
/// rounding for float32 and float16, round to nearest even for bfloat16
/// bits (as the tools store bf16).
fn converted<'py>(obj: &Bound<'py, PyAny>, dtype: Dtype) -> PyResult<Borrowed<'py>> {
    let py = obj.py();
    let as_type = |name: &str| numpy_contiguous(py, &obj.call_method1("astype", (name,))?);
    Ok(match dtype {
        Dtype::F32 => Borrowed::F32(as_type("float32")?.extract()?),
        Dtype::F16 => Borrowed::F16(as_type("float16")?.extract()?),
        Dtype::Bf16 => {
            let f32s: PyReadonlyArrayDyn<'py, f32> = as_type("float32")?.extract()?;
            let shape = f32s.shape().to_vec();
            let bits: Vec<u16> =
                f32s.as_slice()?.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            Borrowed::U16(PyArray1::from_vec(py, bits).reshape(shape)?.readonly())
        }
    })
}

fn numpy_contiguous<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    py.import("numpy")?.call_method1("ascontiguousarray", (obj,))
}

/// `obj` as elements of a `dtype` sequence: f32 from float32; f16 from
/// float16 or uint16 (the bits); bf16 from uint16 (the bits, as
/// `tensor.view(torch.int16)` or `array.view(np.uint16)` give them). These
/// are borrowed; any other float array is converted (one copy).
pub fn borrow<'py>(obj: &Bound<'py, PyAny>, dtype: Dtype, what: &str) -> PyResult<Borrowed<'py>> {
    let py = obj.py();
    let found = match dtype {
        Dtype::F32 => typed::<f32>(obj).map(|a| a.map(Borrowed::F32)),
        Dtype::F16 => typed::<half::f16>(obj)
            .map(|a| a.map(Borrowed::F16))
            .or_else(|| typed::<u16>(obj).map(|a| a.map(Borrowed::U16))),
        Dtype::Bf16 => typed::<u16>(obj).map(|a| a.map(Borrowed::U16)),
    };
    if found.is_none() && is_float_array(obj) {
        return converted(obj, dtype);
    }
    found.unwrap_or_else(|| {
        let got = obj
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| obj.get_type().name().map(|n| n.to_string()).unwrap_or_default());
        Err(invalid(
            py,
            format!(
                "{what}: a {} sequence takes {}; got {got}",
                dtype.name(),
                match dtype {
                    Dtype::F32 => "numpy float32 (other floats are converted)",
                    Dtype::F16 =>
                        "numpy float16 or its bits as uint16 (other floats are converted)",
                    Dtype::Bf16 =>
                        "bfloat16 bits as numpy uint16 (array.view(np.uint16)), or floats to round",
                }
            ),
        ))
    })
}

/// K and V rows for an append, borrowed: both `[layers, heads, tokens,
/// head_dim]` of `shape`. Returns them and the token count.
pub fn kv_rows<'py>(
    keys: &Bound<'py, PyAny>,
    values: &Bound<'py, PyAny>,
    shape: KvShape,
) -> PyResult<(Borrowed<'py>, Borrowed<'py>, u64)> {
    let (k, v) = (borrow(keys, shape.dtype, "keys")?, borrow(values, shape.dtype, "values")?);
    let (layers, heads, d) =
        (usize::from(shape.layers), usize::from(shape.heads), usize::from(shape.head_dim));
    match k.shape() {
        &[l, h, t, n] if k.shape() == v.shape() && [l, h, n] == [layers, heads, d] => {
            Ok((k, v, t as u64))
        }
        other => Err(invalid(
            keys.py(),
            format!(
                "keys {other:?} and values {:?}: expected both [{layers}, {heads}, tokens, {d}]",
                v.shape()
            ),
        )),
    }
}

/// Queries for a Top-K: `[G, head_dim]` (or one `[head_dim]`), float32 or
/// float16.
pub fn query(obj: &Bound<'_, PyAny>, head_dim: u16) -> PyResult<Query> {
    let py = obj.py();
    let (dtype, shape, data) = if let Some(a) = typed::<f32>(obj) {
        let a = a?;
        (Dtype::F32, a.shape().to_vec(), bytemuck::cast_slice(a.as_slice()?).to_vec())
    } else if let Some(a) = typed::<half::f16>(obj) {
        let a = a?;
        (Dtype::F16, a.shape().to_vec(), bytemuck::cast_slice(a.as_slice()?).to_vec())
    } else if is_float_array(obj) {
        return query(&obj.call_method1("astype", ("float32",))?, head_dim);
    } else {
        return Err(invalid(py, "queries must be a numpy float array"));
    };
    let d = usize::from(head_dim);
    let group = match shape[..] {
        [n] if n == d => 1,
        [g, n] if n == d && g > 0 => g,
        _ => {
            return Err(invalid(
                py,
                format!("queries of shape {shape:?}; expected [G, {d}] or [{d}]"),
            ));
        }
    };
    Ok(Query { dtype, group: group as u32, data })
}

/// Rows of `dtype` from the driver, as a NumPy array `[rows, head_dim]` of
/// float32, float16, or (bf16) uint16 bits; the vector becomes the array's
/// buffer.
pub fn rows_out<'py>(
    py: Python<'py>,
    bytes: Vec<u8>,
    dtype: Dtype,
    head_dim: u16,
) -> PyResult<Bound<'py, PyAny>> {
    let rows = bytes.len() / (usize::from(head_dim) * dtype.size()).max(1);
    let raw = PyArray1::from_vec(py, bytes);
    let view = raw.call_method1(
        "view",
        (match dtype {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "uint16",
        },),
    )?;
    view.call_method1("reshape", ((rows, usize::from(head_dim)),))
}
