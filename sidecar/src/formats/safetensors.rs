//! safetensors: the header names each tensor's dtype, shape and byte range; the `safetensors`
//! crate validates it (JSON, offsets in bounds, no gaps or overlaps, lengths matching shapes).

use anyhow::{bail, Result};
use safetensors::{Dtype, SafeTensors};

use super::LaidOut;
use crate::layout::{plan, DType, Staging};

fn dtype(d: Dtype) -> Result<DType> {
    Ok(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        other => bail!("dtype {other:?} is not supported"),
    })
}

pub fn lay_out(source: &[u8], staging: &Staging) -> Result<LaidOut> {
    let file = SafeTensors::deserialize(source)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file: {e}"))?;
    let mut views = file.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut wanted = Vec::with_capacity(views.len());
    for (name, view) in &views {
        let dtype = dtype(view.dtype()).map_err(|e| anyhow::anyhow!("tensor {name:?}: {e}"))?;
        wanted.push((
            name.clone(),
            dtype,
            view.shape().iter().map(|&d| d as u64).collect(),
        ));
    }
    let (tensors, tensors_bytes) = plan(wanted);
    let out = staging.create_tensors_file(tensors_bytes)?;
    for (entry, (_, view)) in tensors.iter().zip(&views) {
        out.write_at(entry.offset, view.data())?;
    }
    Ok(LaidOut {
        tensors,
        tensors_bytes,
        skeleton: None,
    })
}
