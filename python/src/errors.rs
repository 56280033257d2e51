//! Driver errors as Python exceptions.
//!
//! The exception classes live in Python (`cxl_pnm/errors.py`) so they can
//! inherit from the built-in ones an engine already catches (`TimeoutError`,
//! `ValueError`, `OSError`); this module picks the class for each
//! [`pnm_host::Error`] and fills in what the device said: the spec return
//! code, and for media errors the token range and the DPA.

use pnm_host::Error;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The Python class for `error` (a member of a device set: its cause's).
fn class_name(error: &Error) -> &'static str {
    match error {
        Error::Member { error, .. } => class_name(error),
        Error::Open { .. }
        | Error::NotADevice { .. }
        | Error::AbiMismatch { .. }
        | Error::NotReady { .. }
        | Error::Vfio { .. } => "DeviceOpenError",
        Error::MediaError { .. } => "MediaError",
        Error::Command { .. } | Error::Queue { .. } => "CommandError",
        Error::Protocol(_) | Error::MalformedOutput { .. } | Error::MailboxLockLost { .. } => {
            "ProtocolError"
        }
        Error::Invalid(_) | Error::InputTooLarge { .. } => "InvalidRequestError",
        e if e.device_unresponsive() => "DeviceTimeoutError",
        Error::ResetTimeout(_) => "DeviceTimeoutError",
        _ => "PnmError",
    }
}

/// The exception for a driver error.
pub fn to_py(py: Python<'_>, error: Error) -> PyErr {
    build(py, &error).unwrap_or_else(|failed| failed)
}

fn build(py: Python<'_>, error: &Error) -> PyResult<PyErr> {
    let errors = py.import("cxl_pnm.errors")?;
    let details = PyDict::new(py);
    if let Some(code) = error.return_code() {
        details.set_item("return_code", code.0)?;
        details.set_item("return_code_name", code.to_string())?;
    }
    let mut cause = error;
    if let Error::Member { device, path, error } = error {
        details.set_item("device", *device)?;
        details.set_item("device_path", path)?;
        cause = error;
    }
    if let Error::MediaError { first_token, tokens, dpa, .. } = cause {
        details.set_item("first_token", *first_token)?;
        details.set_item("tokens", *tokens)?;
        details.set_item("dpa", *dpa)?;
    }
    let class = errors.getattr(class_name(error))?;
    let instance = class.call((error.to_string(),), Some(&details))?;
    Ok(PyErr::from_value(instance))
}

/// `Result<T, pnm_host::Error>` into a Python result.
pub trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for pnm_host::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// A request the binding refuses before it reaches the driver.
pub fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    to_py(py, Error::Invalid(message.into()))
}
