//! Reading and writing tensors: NumPy `.npy` (v1-v3) and safetensors.
//!
//! Element types: f32, f16, bf16 (safetensors only: NumPy has no bf16), and
//! f64, which is converted to f32 on read. Data is kept little-endian.

use std::collections::BTreeMap;
use std::path::Path;

use pnm_protocol::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Little-endian elements.
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::Bf16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }
}

fn format_err(path: &Path, reason: impl Into<String>) -> TensorError {
    TensorError::Format { path: path.display().to_string(), reason: reason.into() }
}

fn read(path: &Path) -> Result<Vec<u8>, TensorError> {
    std::fs::read(path).map_err(|error| TensorError::Io { path: path.display().to_string(), error })
}

/// Converts raw elements to our little-endian dtypes.
fn decode(
    path: &Path,
    kind: &str,
    big_endian: bool,
    raw: &[u8],
) -> Result<(Dtype, Vec<u8>), TensorError> {
    let swap = |width: usize| -> Vec<u8> {
        if big_endian {
            raw.chunks_exact(width).flat_map(|c| c.iter().rev().copied()).collect()
        } else {
            raw.to_vec()
        }
    };
    Ok(match kind {
        "f4" => (Dtype::F32, swap(4)),
        "f2" => (Dtype::F16, swap(2)),
        "bf16" => (Dtype::Bf16, swap(2)),
        "f8" => {
            let le = swap(8);
            let data = le
                .chunks_exact(8)
                .flat_map(|c| {
                    (f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).to_le_bytes()
                })
                .collect();
            (Dtype::F32, data)
        }
        other => {
            return Err(format_err(
                path,
                format!("unsupported element type '{other}' (use float16, float32 or float64)"),
            ));
        }
    })
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor, TensorError> {
    let bytes = read(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format_err(path, "not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format_err(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| format_err(path, "truncated header"))?;
    let field = |name: &str| -> Option<&str> {
        let at = header.find(&format!("'{name}'"))? + name.len() + 2;
        Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr")
        .and_then(|v| v.strip_prefix('\'')?.split('\'').next())
        .ok_or_else(|| format_err(path, "no descr in header"))?;
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(format_err(
            path,
            "Fortran-ordered arrays are not supported (save np.ascontiguousarray(a))",
        ));
    }
    let shape_text = field("shape")
        .and_then(|v| v.strip_prefix('(')?.split(')').next())
        .ok_or_else(|| format_err(path, "no shape in header"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>().map_err(|_| format_err(path, format!("bad shape '{shape_text}'")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (order, kind) = descr.split_at(1);
    let big_endian = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format_err(path, format!("unsupported descr '{descr}'"))),
    };
    let width: usize = kind.get(1..).and_then(|w| w.parse().ok()).unwrap_or(0);
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    if width == 0 || data.len() != count * width {
        return Err(format_err(
            path,
            format!("{} data bytes for shape {shape:?} of '{descr}'", data.len()),
        ));
    }
    let (dtype, data) = decode(path, kind, big_endian, data)?;
    Ok(Tensor { dtype, shape, data })
}

/// Writes a `.npy` file (f32 or f16; bf16 is widened to f32, exactly).
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<(), TensorError> {
    let (descr, data) = match tensor.dtype {
        Dtype::F32 => ("<f4", tensor.data.clone()),
        Dtype::F16 => ("<f2", tensor.data.clone()),
        Dtype::Bf16 => ("<f4", tensor.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect()),
    };
    let shape = match tensor.shape.as_slice() {
        [one] => format!("({one},)"),
        dims => format!("({})", dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts 64-byte aligned, header ending in a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out)
        .map_err(|error| TensorError::Io { path: path.display().to_string(), error })
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>, TensorError> {
    let bytes = read(path)?;
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| format_err(path, "not a safetensors file"))?;
    let header: serde_json::Value = bytes
        .get(8..8usize.saturating_add(n))
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| format_err(path, "bad safetensors header"))?;
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in
        header.as_object().ok_or_else(|| format_err(path, "header is not an object"))?
    {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format_err(path, format!("tensor '{name}': {what}"));
        let kind = match info["dtype"].as_str() {
            Some("F32") => "f4",
            Some("F16") => "f2",
            Some("BF16") => "bf16",
            Some("F64") => "f8",
            Some(other) => return Err(bad(&format!("unsupported dtype {other}"))),
            None => return Err(bad("no dtype")),
        };
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(|| bad("bad shape")))
            .collect::<Result<_, _>>()?;
        let offsets = info["data_offsets"].as_array().ok_or_else(|| bad("no data_offsets"))?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (b.as_u64().unwrap_or(u64::MAX) as usize, e.as_u64().unwrap_or(0) as usize),
            _ => return Err(bad("bad data_offsets")),
        };
        let raw = data.get(begin..end).ok_or_else(|| bad("data out of range"))?;
        let width = if kind == "f8" {
            8
        } else if kind == "f4" {
            4
        } else {
            2
        };
        if raw.len() != shape.iter().product::<usize>() * width {
            return Err(bad("data length does not match shape"));
        }
        let (dtype, data) = decode(path, kind, false, raw)?;
        out.insert(name.clone(), Tensor { dtype, shape, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips() {
        let dir = std::env::temp_dir().join(format!("pnm-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let t = Tensor { dtype: Dtype::F16, shape: vec![2, 3], data: (0..12).collect() };
        write_npy(&path, &t).unwrap();
        assert_eq!(read_npy(&path).unwrap(), t);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!((10 + u16::from_le_bytes([raw[8], raw[9]]) as usize) % 64, 0);
        let one = Tensor {
            dtype: Dtype::F32,
            shape: vec![2],
            data: [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        write_npy(&path, &one).unwrap();
        assert_eq!(read_npy(&path).unwrap().to_f32(), [1.5, -2.0]);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read_npy(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn safetensors_parse() {
        let dir = std::env::temp_dir().join(format!("pnm-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.safetensors");
        let header = br#"{"k":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},"__metadata__":{"a":"b"}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0x80, 0x3F, 0x00, 0xC0]); // 1.0, -2.0 in bf16
        std::fs::write(&path, &file).unwrap();
        let tensors = read_safetensors(&path).unwrap();
        assert_eq!(tensors["k"].dtype, Dtype::Bf16);
        assert_eq!(tensors["k"].to_f32(), [1.0, -2.0]);
        file[8 + 50] = b'X';
        std::fs::write(&path, &file).unwrap();
        assert!(read_safetensors(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
