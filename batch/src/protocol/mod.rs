//! The Open Inference Protocol (v2, REST) on the wire, with no libtorch: a request's body read
//! into its parts ([`request`], [`json_data`]: what any client sends reaches this first, and it
//! is fuzzed on its own), and a shard file's tensor sent as it is and answered back into a
//! file (the driver's half: [`requests_from_file`], [`file_from_answers`]). The worker builds
//! tensors from the parts (`kube_zerocopy_worker::oip`).

use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod json_data;
pub mod request;

pub use request::{HEADER_LENGTH, INPUT, OUTPUT};

/// A tensor as the protocol describes it (metadata, requests, answers).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// The protocol's name of a safetensors dtype.
fn file_datatype(dtype: Dtype) -> Result<&'static str> {
    Ok(match dtype {
        Dtype::BOOL => "BOOL",
        Dtype::U8 => "UINT8",
        Dtype::I8 => "INT8",
        Dtype::I16 => "INT16",
        Dtype::I32 => "INT32",
        Dtype::I64 => "INT64",
        Dtype::F16 => "FP16",
        Dtype::BF16 => "BF16",
        Dtype::F32 => "FP32",
        Dtype::F64 => "FP64",
        other => bail!("dtype {other:?} cannot be sent"),
    })
}

fn file_dtype(datatype: &str) -> Result<Dtype> {
    Ok(match datatype {
        "BOOL" => Dtype::BOOL,
        "UINT8" => Dtype::U8,
        "INT8" => Dtype::I8,
        "INT16" => Dtype::I16,
        "INT32" => Dtype::I32,
        "INT64" => Dtype::I64,
        "FP16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "FP32" => Dtype::F32,
        "FP64" => Dtype::F64,
        other => bail!("datatype {other} cannot be written to a safetensors file"),
    })
}

/// A request for the tensor `input` of a safetensors file, its bytes sent as they are (the
/// binary extension), asking for the output as bytes: the body and the JSON part's length.
/// No tensor is built: the driver needs no libtorch.
pub fn request_from_file(file: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut requests = requests_from_file(file, usize::MAX)?;
    Ok(requests.remove(0))
}

/// [`request_from_file`], split into row ranges whose tensor bytes are at most `max_bytes`
/// each (one row at least): a shard file larger than a replica takes in one request is sent
/// in parts, in order, and [`file_from_answers`] joins their outputs.
pub fn requests_from_file(file: &[u8], max_bytes: usize) -> Result<Vec<(Vec<u8>, usize)>> {
    let file = SafeTensors::deserialize(file).context("not a safetensors file")?;
    let input = file
        .tensor(INPUT)
        .map_err(|_| anyhow!("{}", crate::shards::no_tensor(&file, INPUT)))?;
    let datatype = file_datatype(input.dtype())?;
    let (shape, data) = (input.shape(), input.data());
    let rows = shape.first().copied().unwrap_or(0);
    if data.len() <= max_bytes || rows < 2 {
        return Ok(vec![binary_request(datatype, shape, data)?]);
    }
    let row_bytes = data.len() / rows;
    let rows_per_request = (max_bytes / row_bytes.max(1)).max(1);
    data.chunks(rows_per_request * row_bytes)
        .map(|part| {
            let mut part_shape = shape.to_vec();
            part_shape[0] = part.len() / row_bytes;
            binary_request(datatype, &part_shape, part)
        })
        .collect()
}

fn binary_request(datatype: &str, shape: &[usize], data: &[u8]) -> Result<(Vec<u8>, usize)> {
    let header = serde_json::json!({
        "inputs": [{
            "name": INPUT,
            "datatype": datatype,
            "shape": shape,
            "parameters": { "binary_data_size": data.len() },
        }],
        "outputs": [{ "name": OUTPUT, "parameters": { "binary_data": true } }],
    });
    let mut body = serde_json::to_vec(&header)?;
    let json_length = body.len();
    body.extend_from_slice(data);
    Ok((body, json_length))
}

/// The output of an answer with the binary extension, as a safetensors file holding tensor
/// `output`: the same bytes as the models' output written by a Task.
pub fn file_from_answer(body: &[u8], json_length: Option<usize>) -> Result<Vec<u8>> {
    file_from_answers(&[(body, json_length)])
}

/// The outputs of the answers to a file's row ranges ([`requests_from_file`]), in order, as one
/// safetensors file holding tensor `output`: their rows one after the other.
pub fn file_from_answers(answers: &[(&[u8], Option<usize>)]) -> Result<Vec<u8>> {
    let parts = answers
        .iter()
        .map(|(body, json_length)| binary_output(body, *json_length))
        .collect::<Result<Vec<_>>>()?;
    let (dtype, mut shape, first) = parts.first().cloned().context("no answer")?;
    let mut joined = Vec::new();
    if parts.len() > 1 {
        for (part_dtype, part_shape, data) in &parts {
            ensure!(
                *part_dtype == dtype && !part_shape.is_empty() && part_shape[1..] == shape[1..],
                "the outputs of the row ranges differ in datatype or shape ({part_dtype:?} \
                 {part_shape:?}, {dtype:?} {shape:?})"
            );
            joined.extend_from_slice(data);
        }
        shape[0] = parts.iter().map(|(_, s, _)| s[0]).sum();
    }
    let data = if parts.len() > 1 { &joined[..] } else { first };
    let view = safetensors::tensor::TensorView::new(dtype, shape, data)?;
    Ok(safetensors::serialize([(OUTPUT, view)], None)?)
}

/// The one output of an answer with the binary extension: its datatype, shape and bytes.
fn binary_output(body: &[u8], json_length: Option<usize>) -> Result<(Dtype, Vec<usize>, &[u8])> {
    let json_length = json_length.context("the answer carries no binary output")?;
    ensure!(
        json_length <= body.len(),
        "the answer's JSON length {json_length} exceeds its {} bytes",
        body.len()
    );
    let (json, binary) = body.split_at(json_length);
    let answer: Value = serde_json::from_slice(json).context("the answer is not JSON")?;
    let outputs = answer["outputs"]
        .as_array()
        .context("the answer has no outputs")?;
    let [output] = &outputs[..] else {
        bail!("the answer has {} outputs, not one", outputs.len());
    };
    let spec: TensorSpec = serde_json::from_value(output.clone())?;
    ensure!(
        spec.name == OUTPUT,
        "the answer's output is {:?}",
        spec.name
    );
    ensure!(
        output["parameters"]["binary_data_size"].as_u64() == Some(binary.len() as u64),
        "the answer's binary part is not the output's size"
    );
    let shape = spec
        .shape
        .iter()
        .map(|&d| usize::try_from(d).context("a negative size"))
        .collect::<Result<Vec<_>>>()?;
    Ok((file_dtype(&spec.datatype)?, shape, binary))
}
