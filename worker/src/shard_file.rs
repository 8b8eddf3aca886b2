//! The files of batch data: a safetensors file holding tensor `input` (an input shard), or
//! tensor `output` (what the models made of it).

use anyhow::{bail, Result};
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use kube_zerocopy_batch::shards::no_tensor;

use crate::task::{INPUT_TENSOR, OUTPUT_TENSOR};

fn kind(d: Dtype) -> Result<Kind> {
    Ok(match d {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("dtype {other:?} is not supported"),
    })
}

fn dtype(k: Kind) -> Result<Dtype> {
    Ok(match k {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("output kind {other:?} is not supported"),
    })
}

/// The tensor `input` of a safetensors body.
pub fn decode(body: &[u8]) -> Result<Tensor> {
    decode_named(body, INPUT_TENSOR)
}

/// The tensor `output` of an answer (for clients).
pub fn decode_output(body: &[u8]) -> Result<Tensor> {
    decode_named(body, OUTPUT_TENSOR)
}

fn decode_named(body: &[u8], name: &str) -> Result<Tensor> {
    let file = SafeTensors::deserialize(body)
        .map_err(|e| anyhow::anyhow!("not a safetensors file: {e}"))?;
    let view = file
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}", no_tensor(&file, name)))?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(
        view.data(),
        &shape,
        kind(view.dtype())?,
    )?)
}

/// `t` as a safetensors body with tensor `output`.
pub fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let view = safetensors::tensor::TensorView::new(dtype(t.kind())?, shape, &bytes)?;
    Ok(safetensors::serialize([(OUTPUT_TENSOR, view)], None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard whose tensor is misnamed says which tensors it has.
    #[test]
    fn a_missing_tensor_is_refused_with_the_names_there_are() {
        let bytes = [0u8; 8];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
        let body =
            safetensors::serialize([("inputs", view.clone()), ("mask", view)], None).unwrap();
        let refused = decode(&body).unwrap_err().to_string();
        assert_eq!(
            refused,
            r#"it has no tensor "input"; it has "inputs", "mask""#
        );
    }
}
