//! The Open Inference Protocol (v2, REST) as the actor speaks it: the request and answer
//! bodies, and tensors in and out of them, with JSON data or the binary tensor data extension.
//!
//! A request's tensors are JSON arrays (flat in row-major order, or nested) or, with the
//! extension, raw little-endian bytes after a JSON header whose length the header
//! `Inference-Header-Content-Length` gives (`parameters.binary_data_size` per tensor). An
//! answer carries its output as bytes when the request asks for it (`binary_data_output`, or
//! `binary_data` on the requested output), as Triton's and KServe's clients do by default.
//! Everything here is pure: no I/O, no libtorch call beyond building tensors.

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use kube_zerocopy_batch::protocol::json_data;
use kube_zerocopy_batch::protocol::request::{self, elements, Data};
pub use kube_zerocopy_batch::protocol::{TensorSpec, HEADER_LENGTH, INPUT, OUTPUT};

/// `GET /v2/models/{name}`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// An inference request, decoded.
pub struct InferRequest {
    pub id: Option<String>,
    pub input: Tensor,
    /// Whether the output goes back as bytes (the extension) or as JSON.
    pub binary_output: bool,
}

/// The protocol's name of a tensor kind; None for kinds it cannot carry.
pub fn datatype(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Bool => "BOOL",
        Kind::Uint8 => "UINT8",
        Kind::Int8 => "INT8",
        Kind::Int16 => "INT16",
        Kind::Int => "INT32",
        Kind::Int64 => "INT64",
        Kind::Half => "FP16",
        Kind::BFloat16 => "BF16",
        Kind::Float => "FP32",
        Kind::Double => "FP64",
        _ => return None,
    })
}

fn kind(datatype: &str) -> Result<Kind> {
    Ok(match datatype {
        "BOOL" => Kind::Bool,
        "UINT8" => Kind::Uint8,
        "INT8" => Kind::Int8,
        "INT16" => Kind::Int16,
        "INT32" => Kind::Int,
        "INT64" => Kind::Int64,
        "FP16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "FP32" => Kind::Float,
        "FP64" => Kind::Double,
        "UINT16" | "UINT32" | "UINT64" | "BYTES" => {
            bail!("datatype {datatype} is not supported here")
        }
        other => bail!("{other:?} is not a datatype of the protocol"),
    })
}

/// Reads a request body: all JSON, or `json_length` bytes of JSON and then the tensors' bytes.
/// Errors are the client's and say what to change.
pub fn decode_request(body: &[u8], json_length: Option<usize>) -> Result<InferRequest> {
    let request = request::parse(body, json_length)?;
    let (shape, datatype) = (&request.shape[..], &request.datatype[..]);
    let input = match &request.data {
        Data::Bytes(bytes) => from_bytes(bytes, shape, datatype)?,
        Data::Json(data) => from_json(data, shape, datatype)?,
    };
    Ok(InferRequest {
        id: request.id,
        input,
        binary_output: request.binary_output,
    })
}

fn from_bytes(bytes: &[u8], shape: &[i64], datatype: &str) -> Result<Tensor> {
    let kind = kind(datatype)?;
    let expected = elements(shape)?
        .checked_mul(kind.elt_size_in_bytes())
        .ok_or_else(|| anyhow!("shape {shape:?} is too large"))?;
    ensure!(
        bytes.len() == expected,
        "input {INPUT:?} of shape {shape:?} and datatype {datatype} takes {expected} bytes, \
         not {}",
        bytes.len()
    );
    tensor(
        Tensor::f_from_data_size(bytes, shape, kind),
        shape,
        datatype,
    )
}

fn from_json(data: &RawValue, shape: &[i64], datatype: &str) -> Result<Tensor> {
    let kind = kind(datatype)?;
    let expected = elements(shape)?;
    let what = format!("input {INPUT:?} of shape {shape:?}");
    let flat = match kind {
        Kind::Bool => {
            Tensor::from_slice(&json_data::read::<bool>(data, expected, &what, datatype)?)
        }
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
            let v = json_data::read::<f64>(data, expected, &what, datatype)?;
            tensor(Tensor::from_slice(&v).f_to_kind(kind), shape, datatype)?
        }
        _ => {
            let v = json_data::read::<i64>(data, expected, &what, datatype)?;
            let (min, max) = integer_range(kind);
            if let Some(out) = v.iter().find(|i| !(min..=max).contains(*i)) {
                bail!("{out} is not a value of datatype {datatype}");
            }
            tensor(Tensor::from_slice(&v).f_to_kind(kind), shape, datatype)?
        }
    };
    tensor(flat.f_reshape(shape), shape, datatype)
}

/// libtorch's refusal in one line for the client; its whole message (a backtrace with memory
/// addresses and build paths) stays in the log.
fn tensor<T>(made: Result<T, tch::TchError>, shape: &[i64], datatype: &str) -> Result<T> {
    made.map_err(|e| {
        tracing::warn!(error = %e, ?shape, datatype, "libtorch refused a request's tensor");
        anyhow!("input {INPUT:?} cannot be a tensor of shape {shape:?} and datatype {datatype}")
    })
}

fn integer_range(kind: Kind) -> (i64, i64) {
    match kind {
        Kind::Uint8 => (0, u8::MAX.into()),
        Kind::Int8 => (i8::MIN.into(), i8::MAX.into()),
        Kind::Int16 => (i16::MIN.into(), i16::MAX.into()),
        Kind::Int => (i32::MIN.into(), i32::MAX.into()),
        _ => (i64::MIN, i64::MAX),
    }
}

/// An answer: its body, and the JSON part's length when tensor bytes follow it.
pub struct Answer {
    pub body: Vec<u8>,
    pub json_length: Option<usize>,
}

/// The answer to `request` for the model `model`, holding `output` (moved to the host).
pub fn encode_answer(
    model: &str,
    id: Option<&str>,
    output: &Tensor,
    binary: bool,
) -> Result<Answer> {
    let output = output.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
    let datatype = datatype(output.kind())
        .with_context(|| format!("the models answered a {:?} tensor", output.kind()))?;
    let mut tensor = Map::new();
    tensor.insert("name".into(), OUTPUT.into());
    tensor.insert("datatype".into(), datatype.into());
    tensor.insert("shape".into(), output.size().into());
    let mut bytes = Vec::new();
    if binary {
        let numel = output.numel();
        bytes = vec![0u8; numel * output.kind().elt_size_in_bytes()];
        output.f_copy_data_u8(&mut bytes, numel)?;
        tensor.insert(
            "parameters".into(),
            serde_json::json!({ "binary_data_size": bytes.len() }),
        );
    } else {
        tensor.insert("data".into(), json_data(&output)?);
    }
    let mut answer = Map::new();
    answer.insert("model_name".into(), model.into());
    answer.insert("model_version".into(), "1".into());
    if let Some(id) = id {
        answer.insert("id".into(), id.into());
    }
    answer.insert("outputs".into(), Value::Array(vec![Value::Object(tensor)]));
    let mut body = serde_json::to_vec(&answer)?;
    let json_length = binary.then_some(body.len());
    body.extend_from_slice(&bytes);
    Ok(Answer { body, json_length })
}

/// A tensor's values as a flat JSON array in row-major order.
fn json_data(t: &Tensor) -> Result<Value> {
    let flat = t.f_flatten(0, -1)?;
    Ok(match t.kind() {
        Kind::Bool => Vec::<bool>::try_from(&flat)?.into(),
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
            Vec::<f64>::try_from(&flat.f_to_kind(Kind::Double)?)?.into()
        }
        _ => Vec::<i64>::try_from(&flat.f_to_kind(Kind::Int64)?)?.into(),
    })
}

/// The body of an error answer, as clients of the protocol read it.
pub fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": message })).expect("a string serialises")
}

/// A decoded answer (for the driver and tests): its output tensor.
pub fn decode_answer(body: &[u8], json_length: Option<usize>) -> Result<Tensor> {
    let (json, binary) = match json_length {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => bail!(
            "the answer's JSON length {n} exceeds its {} bytes",
            body.len()
        ),
        None => (body, &[][..]),
    };
    let answer: Value = serde_json::from_slice(json).context("the answer is not JSON")?;
    let output = answer["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == OUTPUT))
        .with_context(|| format!("the answer has no output {OUTPUT:?}: {answer}"))?;
    let spec: TensorSpec = serde_json::from_value(output.clone())?;
    match output["parameters"]["binary_data_size"].as_u64() {
        Some(size) => {
            ensure!(
                size as usize == binary.len(),
                "the answer's binary part is cut"
            );
            from_bytes(binary, &spec.shape, &spec.datatype)
        }
        None => {
            let data = serde_json::value::to_raw_value(&output["data"])?;
            from_json(&data, &spec.shape, &spec.datatype)
        }
    }
}

/// An inference request for `input` with its data as bytes (the extension), asking for the
/// output as bytes: the body and the JSON part's length.
pub fn encode_request(input: &Tensor) -> Result<(Vec<u8>, usize)> {
    let input = input.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
    let datatype = datatype(input.kind())
        .with_context(|| format!("a {:?} tensor cannot be sent", input.kind()))?;
    let numel = input.numel();
    let mut bytes = vec![0u8; numel * input.kind().elt_size_in_bytes()];
    input.f_copy_data_u8(&mut bytes, numel)?;
    let header = serde_json::json!({
        "inputs": [{
            "name": INPUT,
            "datatype": datatype,
            "shape": input.size(),
            "parameters": { "binary_data_size": bytes.len() },
        }],
        "outputs": [{ "name": OUTPUT, "parameters": { "binary_data": true } }],
    });
    let mut body = serde_json::to_vec(&header)?;
    let json_length = body.len();
    body.extend_from_slice(&bytes);
    Ok((body, json_length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_zerocopy_batch::protocol::{file_from_answers, requests_from_file};
    use safetensors::{Dtype, SafeTensors};

    fn json_request(shape: &str, datatype: &str, data: &str) -> Vec<u8> {
        format!(
            r#"{{"inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn json_tensors_flat_or_nested_become_the_same_tensor() {
        let flat = decode_request(&json_request("[2,3]", "FP32", "[1,2,3,4,5,6]"), None).unwrap();
        let nested =
            decode_request(&json_request("[2,3]", "FP32", "[[1,2,3],[4,5,6]]"), None).unwrap();
        assert_eq!(flat.input.size(), [2, 3]);
        assert_eq!(flat.input.kind(), Kind::Float);
        assert!(flat.input.equal(&nested.input));
        assert_eq!(flat.input.double_value(&[1, 2]), 6.0);
        assert!(!flat.binary_output);
    }

    #[test]
    fn a_binary_request_round_trips_with_its_answer() {
        let input = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
        let (body, json_length) = encode_request(&input).unwrap();
        let request = decode_request(&body, Some(json_length)).unwrap();
        assert!(request.input.equal(&input));
        assert!(request.binary_output);
        let answer = encode_answer("m", Some("7"), &request.input, true).unwrap();
        let json: Value =
            serde_json::from_slice(&answer.body[..answer.json_length.unwrap()]).unwrap();
        assert_eq!(json["id"], "7");
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 48);
        let output = decode_answer(&answer.body, answer.json_length).unwrap();
        assert!(output.equal(&input));
        let as_json = encode_answer("m", None, &input.to_kind(Kind::Int64), false).unwrap();
        assert!(as_json.json_length.is_none());
        let output = decode_answer(&as_json.body, None).unwrap();
        assert!(output.equal(&input.to_kind(Kind::Int64)));
    }

    /// A file larger than a request is sent in row ranges, and the answers' rows, joined, are
    /// the file's output.
    #[test]
    fn a_large_file_is_sent_in_row_ranges_and_its_answers_joined() {
        let input = Tensor::arange(15, (Kind::Float, tch::Device::Cpu)).reshape([5, 3]);
        let data: Vec<u8> = Vec::<f32>::try_from(input.flatten(0, -1))
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![5, 3], &data).unwrap();
        let file = safetensors::serialize([(INPUT, view)], None).unwrap();
        // Two rows of 12 bytes fit in 30 bytes: rows 0-1, 2-3 and 4.
        let requests = requests_from_file(&file, 30).unwrap();
        let parts: Vec<Tensor> = requests
            .iter()
            .map(|(body, json_length)| decode_request(body, Some(*json_length)).unwrap().input)
            .collect();
        let rows: Vec<i64> = parts.iter().map(|p| p.size()[0]).collect();
        assert_eq!(rows, [2, 2, 1]);
        assert!(Tensor::cat(&parts, 0).equal(&input));
        assert_eq!(requests_from_file(&file, 1 << 20).unwrap().len(), 1);
        // The models double each row: the joined file holds the doubled rows in order.
        let answers: Vec<Answer> = parts
            .iter()
            .map(|p| encode_answer("m", None, &(p * 2), true).unwrap())
            .collect();
        let bodies: Vec<(&[u8], Option<usize>)> = answers
            .iter()
            .map(|a| (&a.body[..], a.json_length))
            .collect();
        let joined = file_from_answers(&bodies).unwrap();
        let output = SafeTensors::deserialize(&joined).unwrap();
        let output = output.tensor(OUTPUT).unwrap();
        assert_eq!(output.shape(), [5, 3]);
        let doubled: Vec<u8> = (0..15)
            .flat_map(|v| (2.0 * v as f32).to_le_bytes())
            .collect();
        assert_eq!(output.data(), &doubled[..]);
        // Answers that do not fit together are refused, not joined.
        let other =
            encode_answer("m", None, &Tensor::ones([1, 4], tch::kind::FLOAT_CPU), true).unwrap();
        let mismatched = [bodies[0], (&other.body[..], other.json_length)];
        let refused = file_from_answers(&mismatched).unwrap_err().to_string();
        assert!(refused.contains("differ in datatype or shape"), "{refused}");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let error = |body: &[u8], json_length| match decode_request(body, json_length) {
            Ok(_) => panic!("accepted {}", String::from_utf8_lossy(body)),
            Err(e) => format!("{e:#}"),
        };
        assert!(error(b"{", None).contains("not an inference request"));
        assert!(error(&json_request("[2,3]", "FP32", "[1,2]"), None).contains("takes 6 values"));
        assert!(error(&json_request("[2]", "INT8", "[1,300]"), None).contains("300 is not"));
        assert!(error(&json_request("[2]", "BYTES", "[1,2]"), None).contains("not supported"));
        assert!(error(&json_request("[2]", "FLOAT", "[1,2]"), None).contains("not a datatype"));
        assert!(error(&json_request("[-1]", "FP32", "[1]"), None).contains("negative"));
        assert!(error(&json_request("[2]", "FP32", r#"[1,"a"]"#), None).contains("\"a\""));
        let other_name = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        assert!(error(other_name, None).contains("no input \"x\""));
        assert!(error(&json_request("[]", "FP32", "[1]"), None).contains("has shape []"));
        let huge = br#"{"inputs":[{"name":"input","shape":[4611686018427387904,2],"datatype":"FP64","parameters":{"binary_data_size":0}}]}"#;
        assert!(error(huge, Some(huge.len())).contains("too large"));
        let (body, json_length) =
            encode_request(&Tensor::ones([2, 2], tch::kind::FLOAT_CPU)).unwrap();
        assert!(error(&body[..body.len() - 1], Some(json_length)).contains("declares 16 bytes"));
        assert!(error(&body, Some(body.len() + 1)).contains("holds only"));
        let mut longer = body.clone();
        longer.push(0);
        assert!(error(&longer, Some(json_length)).contains("1 bytes follow"));
        let wrong_output = br#"{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"y"}]}"#;
        assert!(error(wrong_output, None).contains("no output \"y\""));
    }
}
