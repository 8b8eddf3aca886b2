//! Actor mode: the pipeline is mapped once, then serves many batches over HTTP.
//!
//! `POST /infer` with a safetensors body holding tensor `input` answers a safetensors body
//! holding tensor `output`. `GET /readyz` answers 200 while the inference thread runs (the
//! server only listens once the models are loaded), `GET /livez` while the process serves,
//! `GET /metrics` Prometheus metrics: batches, rows and time, and memory read from /proc at each
//! scrape, the process's PSS/USS and the PSS of its models' shared mappings, so that the sharing
//! shows in production.
//!
//! Serving is hyper on a small tokio runtime, so health and metrics never wait behind a batch
//! or a slow client. Batches run one at a time on one inference thread that owns the pipeline
//! (libtorch parallelises within a batch, and tch's tensors may not be shared between threads);
//! up to [`Limits::queued_batches`] more wait, and beyond that a request gets 503 with
//! Retry-After. A body must arrive within [`Limits::body_timeout`] (else 408) and hold at most
//! [`Limits::max_body_bytes`] (else 413), checked while it arrives. A batch the models refuse
//! gets 422 naming what was sent; a panic inside a model is caught at the batch boundary (500)
//! and the replica goes on. Answers never carry internal details; the worker's log has them.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode as encode_metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::memory::MemoryStats;
use crate::model::Pipeline;
use crate::nn::WrongInput;
use crate::task::{INPUT_TENSOR, OUTPUT_TENSOR};

/// What a replica accepts from its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request body (a batch, not a dataset).
    pub max_body_bytes: u64,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// How long a request's headers may take to arrive.
    pub header_timeout: Duration,
    /// Batches that may wait while one runs.
    pub queued_batches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 20,
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            queued_batches: 8,
        }
    }
}

/// Why a batch got no answer, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the request body did not arrive within {0} s")]
    SlowBody(u64),
    #[error("{0} batches are waiting already; retry shortly")]
    Busy(usize),
    #[error("{0}")]
    ModelRefused(String),
    #[error("the batch failed inside the worker; its log says why")]
    Internal,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::ModelRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

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
    /// The models' shared mappings, whose PSS each scrape reads.
    mappings: Vec<PathBuf>,
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
        let mappings = pipeline
            .models
            .iter()
            .filter_map(|m| m.shared.as_ref())
            .map(|s| s.mapping_path().to_owned())
            .collect();
        ActorMetrics {
            batches,
            failed,
            rows,
            seconds,
            process_pss,
            process_uss,
            weights_pss,
            mappings,
            registry,
        }
    }

    /// The text format, with the memory gauges read from /proc now.
    fn render(&self) -> Result<String> {
        let process = MemoryStats::of_process("self")?;
        self.process_pss.set(process.pss_kib as i64 * 1024);
        self.process_uss.set(process.uss_kib as i64 * 1024);
        let mappings: Vec<&std::path::Path> = self.mappings.iter().map(PathBuf::as_path).collect();
        let mapped = MemoryStats::of_mappings("self", &mappings)?;
        self.weights_pss.set(mapped.pss_kib as i64 * 1024);
        let mut out = String::new();
        encode_metrics(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A batch on its way to the inference thread, and where its answer goes.
struct Batch {
    body: Bytes,
    reply: oneshot::Sender<Result<Vec<u8>, Refusal>>,
}

/// One batch through the models. Errors are the client's (400, 422) or the worker's (500).
fn run_batch(pipeline: &Pipeline, body: &[u8], metrics: &ActorMetrics) -> Result<Vec<u8>, Refusal> {
    let started = Instant::now();
    let input = decode(body).map_err(|e| Refusal::BadRequest(format!("{e:#}")))?;
    let forward =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.forward(&input)));
    let output = match forward {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), shape = ?input.size(), "the models refused a batch");
            // Our own checks word the reason for the client; libtorch's words stay in the log.
            let reason = e
                .chain()
                .find_map(|c| c.downcast_ref::<WrongInput>())
                .map_or_else(
                    || {
                        format!(
                            "the models cannot run a batch of shape {:?} and dtype {:?}",
                            input.size(),
                            input.kind()
                        )
                    },
                    WrongInput::to_string,
                );
            return Err(Refusal::ModelRefused(reason));
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            error!(panic = message, shape = ?input.size(), "a batch panicked inside the models");
            return Err(Refusal::Internal);
        }
    };
    let answer = encode(&output).map_err(|e| {
        error!(error = %format!("{e:#}"), "cannot encode an answer");
        Refusal::Internal
    })?;
    metrics.batches.inc();
    metrics
        .rows
        .inc_by(input.size().first().copied().unwrap_or(1) as u64);
    metrics.seconds.observe(started.elapsed().as_secs_f64());
    Ok(answer)
}

/// Runs the batches in arrival order; ends when the server is gone.
fn run_batches(pipeline: Pipeline, mut batches: mpsc::Receiver<Batch>, metrics: &ActorMetrics) {
    while let Some(batch) = batches.blocking_recv() {
        let _ = batch.reply.send(run_batch(&pipeline, &batch.body, metrics));
    }
}

/// What the HTTP side shares.
struct Server {
    batches: mpsc::Sender<Batch>,
    metrics: Arc<ActorMetrics>,
    /// Cleared if the inference thread ends: the replica is no longer ready.
    inferring: Arc<AtomicBool>,
    limits: Limits,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, "text/plain; charset=utf-8".parse().unwrap());
    response
}

impl Server {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/livez") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/readyz") if self.inferring.load(Ordering::Relaxed) => {
                text(StatusCode::OK, "ok")
            }
            (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not inferring"),
            (&Method::GET, "/metrics") => match self.metrics.render() {
                Ok(metrics) => text(StatusCode::OK, metrics),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot render the metrics");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the metrics")
                }
            },
            (&Method::POST, "/infer") => match self.infer(request).await {
                Ok(answer) => {
                    let mut response = Response::new(Full::new(Bytes::from(answer)));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, "application/octet-stream".parse().unwrap());
                    response
                }
                Err(refusal) => {
                    self.metrics.failed.inc();
                    debug!(%refusal, "batch refused");
                    let mut response = text(refusal.status(), format!("{refusal}\n"));
                    if matches!(refusal, Refusal::Busy(_)) {
                        response
                            .headers_mut()
                            .insert(RETRY_AFTER, "1".parse().unwrap());
                    }
                    response
                }
            },
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    async fn infer(&self, request: Request<Incoming>) -> Result<Vec<u8>, Refusal> {
        let max = self.limits.max_body_bytes;
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(Refusal::TooLarge(max));
        }
        let body = Limited::new(
            request.into_body(),
            usize::try_from(max).unwrap_or(usize::MAX),
        );
        let body = tokio::time::timeout(self.limits.body_timeout, body.collect())
            .await
            .map_err(|_| Refusal::SlowBody(self.limits.body_timeout.as_secs()))?
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    Refusal::TooLarge(max)
                } else {
                    Refusal::BadRequest(format!("reading the request body: {e}"))
                }
            })?
            .to_bytes();
        let (reply, answer) = oneshot::channel();
        self.batches
            .try_send(Batch { body, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Refusal::Busy(self.limits.queued_batches),
                mpsc::error::TrySendError::Closed(_) => Refusal::Internal,
            })?;
        answer.await.map_err(|_| Refusal::Internal)?
    }
}

async fn accept(listen: &str, server: Arc<Server>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(%listen, "serving batches");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let header_timeout = server.limits.header_timeout;
            let service = service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Serves batches until the process is stopped. The pipeline moves to the inference thread.
pub fn serve(pipeline: Pipeline, listen: &str, limits: Limits) -> Result<()> {
    let metrics = Arc::new(ActorMetrics::new(&pipeline));
    let (batches, queue) = mpsc::channel(limits.queued_batches.max(1));
    let inferring = Arc::new(AtomicBool::new(true));
    {
        let (metrics, inferring) = (metrics.clone(), inferring.clone());
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                run_batches(pipeline, queue, &metrics);
                inferring.store(false, Ordering::Relaxed);
            })
            .context("starting the inference thread")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let server = Arc::new(Server {
        batches,
        metrics,
        inferring,
        limits,
    });
    runtime.block_on(accept(listen, server))
}
