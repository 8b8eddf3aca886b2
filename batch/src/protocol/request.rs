//! An inference request's body read into its parts, before any tensor is built: its one
//! input's shape, datatype and data (the binary extension's bytes, or JSON left unread until
//! the shape says how much it may hold), and how the answer goes back. Pure serde, no
//! libtorch: what any client sends reaches this first, and it is fuzzed on its own.

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The header giving the length of the JSON part of a binary request or answer.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The one input and the one output of a pipeline.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "output";

#[derive(Debug, Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// Read only once the shape and datatype are known.
    data: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct RequestHeader {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<RequestInput>,
    outputs: Option<Vec<RequestedOutput>>,
}

/// A request's input as sent.
pub enum Data<'a> {
    /// The binary extension's bytes, exactly `binary_data_size` of them.
    Bytes(&'a [u8]),
    /// The JSON `data`, unread.
    Json(Box<RawValue>),
}

/// A request read into its parts.
pub struct Parsed<'a> {
    pub id: Option<String>,
    /// At least one dimension: requests are batches of rows.
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Data<'a>,
    /// Whether the output goes back as bytes (the extension) or as JSON.
    pub binary_output: bool,
}

/// Reads a request body: all JSON, or `json_length` bytes of JSON and then the tensors' bytes.
/// Errors are the client's and say what to change.
pub fn parse(body: &[u8], json_length: Option<usize>) -> Result<Parsed<'_>> {
    let (json, binary) = match json_length {
        Some(n) => {
            ensure!(
                n <= body.len(),
                "{HEADER_LENGTH} is {n} but the body holds only {} bytes",
                body.len()
            );
            body.split_at(n)
        }
        None => (body, &[][..]),
    };
    let header: RequestHeader =
        serde_json::from_slice(json).context("the request is not an inference request")?;
    let RequestHeader {
        id,
        parameters,
        inputs,
        outputs,
    } = header;
    let count = inputs.len();
    let Ok([input]) = <[RequestInput; 1]>::try_from(inputs) else {
        bail!("the request has {count} inputs; the model takes one, {INPUT:?}");
    };
    ensure!(
        input.name == INPUT,
        "the model has no input {:?}; its input is {INPUT:?}",
        input.name
    );
    // Requests are batches of rows, merged along their first dimension.
    ensure!(
        !input.shape.is_empty(),
        "input {INPUT:?} has shape []; the model takes a batch of rows, shape [rows, ...]"
    );
    let data = match (input.parameters.get("binary_data_size"), input.data) {
        (Some(size), None) => {
            let size = size
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .context("binary_data_size is not a byte count")?;
            ensure!(
                size <= binary.len(),
                "input {INPUT:?} declares {size} bytes of binary data but {} follow the header",
                binary.len()
            );
            let (bytes, rest) = binary.split_at(size);
            ensure!(
                rest.is_empty(),
                "{} bytes follow the inputs' binary data",
                rest.len()
            );
            Data::Bytes(bytes)
        }
        (None, Some(data)) => {
            ensure!(
                binary.is_empty(),
                "{} bytes follow the inputs' binary data",
                binary.len()
            );
            Data::Json(data)
        }
        (Some(_), Some(_)) => bail!("input {INPUT:?} has both data and binary_data_size"),
        (None, None) => bail!("input {INPUT:?} has neither data nor binary_data_size"),
    };
    let flag = |p: &Map<String, Value>, name: &str| p.get(name).and_then(Value::as_bool);
    let mut binary_output = flag(&parameters, "binary_data_output").unwrap_or(false);
    for output in outputs.iter().flatten() {
        ensure!(
            output.name == OUTPUT,
            "the model has no output {:?}; its output is {OUTPUT:?}",
            output.name
        );
        if let Some(binary) = flag(&output.parameters, "binary_data") {
            binary_output = binary;
        }
    }
    Ok(Parsed {
        id,
        shape: input.shape,
        datatype: input.datatype,
        data,
        binary_output,
    })
}

/// The number of elements of `shape`, which must be a tensor's shape.
pub fn elements(shape: &[i64]) -> Result<usize> {
    shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| anyhow!("shape {shape:?} has a negative size"))?;
        n.checked_mul(d)
            .ok_or_else(|| anyhow!("shape {shape:?} is too large"))
    })
}
