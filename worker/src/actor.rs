//! Actor mode: the pipeline is mapped once, then serves many batches over HTTP.
//!
//! `POST /infer` with a safetensors body holding tensor `input` answers a safetensors body
//! holding tensor `output`. `GET /readyz` answers 200 once the models are loaded (the server
//! only listens after that), `GET /livez` while the process runs, `GET /metrics` Prometheus
//! metrics: batches, rows and time, and memory read from /proc at each scrape, the process's
//! PSS/USS and the PSS of its models' shared mappings, so that the sharing shows in production.

use std::io::Read;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use prometheus_client::encoding::text::encode as encode_metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::memory::MemoryStats;
use crate::model::Pipeline;
use crate::task::{INPUT_TENSOR, OUTPUT_TENSOR};

/// Requests larger than this are refused (a batch, not a dataset).
const MAX_BODY: u64 = 1 << 30;

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
        .map_err(|e| anyhow::anyhow!("body is not safetensors: {e}"))?;
    let view = file
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("body has no tensor {name:?}"))?;
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

/// The actor's metrics, prefixed `kube_zerocopy_worker_`.
struct ActorMetrics {
    batches: Counter,
    failed: Counter,
    rows: Counter,
    seconds: Histogram,
    process_pss: Gauge,
    process_uss: Gauge,
    weights_pss: Gauge,
    registry: Registry,
}

impl ActorMetrics {
    fn new(pipeline: &Pipeline) -> Self {
        let mut registry = Registry::with_prefix("kube_zerocopy_worker");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let bytes = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register_with_unit(name, help, Unit::Bytes, g.clone());
            g
        };
        let batches = counter(&mut registry, "batches", "Batches answered");
        let failed = counter(&mut registry, "batch_errors", "Batches refused");
        let rows = counter(&mut registry, "rows", "Rows of the batches answered");
        let seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "batch_duration",
            "Time per answered batch",
            Unit::Seconds,
            seconds.clone(),
        );
        let process_pss = bytes(
            &mut registry,
            "process_pss",
            "Proportional set size of the process (shared pages split among their users)",
        );
        let process_uss = bytes(
            &mut registry,
            "process_uss",
            "Unique set size of the process (pages no other process maps)",
        );
        let weights_pss = bytes(
            &mut registry,
            "weights_mapped_pss",
            "This process's share of the resident pages of the shared weight mappings",
        );
        let weights = bytes(&mut registry, "weights", "Bytes of weights the models use");
        let total: u64 = pipeline
            .models
            .iter()
            .filter_map(|m| m.shared.as_ref())
            .map(|s| s.manifest.tensors_bytes)
            .sum();
        weights.set(total as i64);
        ActorMetrics {
            batches,
            failed,
            rows,
            seconds,
            process_pss,
            process_uss,
            weights_pss,
            registry,
        }
    }

    /// The text format, with the memory gauges read from /proc now.
    fn render(&self, pipeline: &Pipeline) -> Result<String> {
        let process = MemoryStats::of_process("self")?;
        self.process_pss.set(process.pss_kib as i64 * 1024);
        self.process_uss.set(process.uss_kib as i64 * 1024);
        let mappings: Vec<&std::path::Path> = pipeline
            .models
            .iter()
            .filter_map(|m| m.shared.as_ref())
            .map(|s| s.mapping_path())
            .collect();
        let mapped = MemoryStats::of_mappings("self", &mappings)?;
        self.weights_pss.set(mapped.pss_kib as i64 * 1024);
        let mut out = String::new();
        encode_metrics(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn infer(
    pipeline: &Pipeline,
    request: &mut tiny_http::Request,
    metrics: &ActorMetrics,
) -> Result<Vec<u8>> {
    let started = Instant::now();
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .context("reading the request")?;
    if body.len() as u64 > MAX_BODY {
        bail!("request body is larger than {MAX_BODY} bytes");
    }
    let input = decode(&body)?;
    let answer = encode(&pipeline.forward(&input)?)?;
    metrics.batches.inc();
    metrics
        .rows
        .inc_by(input.size().first().copied().unwrap_or(1) as u64);
    metrics.seconds.observe(started.elapsed().as_secs_f64());
    Ok(answer)
}

pub fn serve(pipeline: &Pipeline, listen: &str) -> Result<()> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let metrics = ActorMetrics::new(pipeline);
    info!(%listen, "serving batches");
    for mut request in server.incoming_requests() {
        let response = match (request.method(), request.url()) {
            (tiny_http::Method::Get, "/readyz" | "/livez") => {
                tiny_http::Response::from_data(b"ok".to_vec())
            }
            (tiny_http::Method::Get, "/metrics") => match metrics.render(pipeline) {
                Ok(text) => tiny_http::Response::from_data(text.into_bytes()),
                Err(e) => tiny_http::Response::from_data(format!("{e:#}").into_bytes())
                    .with_status_code(500),
            },
            (tiny_http::Method::Post, "/infer") => match infer(pipeline, &mut request, &metrics) {
                Ok(bytes) => tiny_http::Response::from_data(bytes),
                Err(e) => {
                    metrics.failed.inc();
                    warn!(error = %format!("{e:#}"), "batch failed");
                    tiny_http::Response::from_data(format!("{e:#}").into_bytes())
                        .with_status_code(400)
                }
            },
            _ => tiny_http::Response::from_data(b"not found".to_vec()).with_status_code(404),
        };
        let _ = request.respond(response);
    }
    Ok(())
}
