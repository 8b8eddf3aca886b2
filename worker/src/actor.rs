//! Actor mode: the pipeline is mapped once, then serves many batches over HTTP with the Open
//! Inference Protocol (v2, REST; see [`crate::oip`]).
//!
//! - `GET /v2/health/live`, `/v2/health/ready` (ready once the models are mapped, not while the
//!   replica drains), `GET /v2` (server metadata), `GET /v2/models/{name}` (inputs and outputs
//!   with names, datatypes and shapes), `/v2/models/{name}/ready`, and
//!   `POST /v2/models/{name}/infer` (also under `/versions/1`). The pipeline is one model,
//!   named after it, taking tensor `input` and answering tensor `output`.
//! - `GET /metrics`: requests, rows, forward passes and time, and memory read from /proc at
//!   each scrape (the process's PSS/USS, the PSS of the models' shared mappings).
//!
//! Serving is hyper on a small tokio runtime, so health and metrics never wait behind a batch
//! or a slow client; the server listens before the models are mapped (live, not ready). Batches
//! run on one inference thread that owns the pipeline (libtorch parallelises within a batch,
//! and tch's tensors may not be shared between threads). With dynamic batching, requests that
//! arrive within `max_delay` of each other and fit together run as one forward pass of at most
//! `max_rows` rows, each answered with its own rows; a pass waits only while other requests are
//! on their way. Up to [`Limits::queued_batches`] requests wait, and twice as many are admitted
//! at once (their bodies read, then decoded off the serving threads); beyond that 503 with
//! Retry-After, before the body is read. A body must arrive within [`Limits::body_timeout`]
//! (else 408) and hold at most [`Limits::max_body_bytes`] (else 413); at most
//! [`Limits::max_connections`] connections are open. A request the protocol or
//! the models refuse gets a 4xx in the protocol's shape (`{"error": ...}`) naming what was sent;
//! a panic inside a model is caught at the batch boundary (500) and the replica goes on.
//!
//! On SIGTERM the replica drains: it answers not-ready at once, so that its endpoint is taken
//! out, goes on answering what still comes, and exits once nothing has been in flight for a
//! second (or when the drain time is up).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode as encode_metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tch::Tensor;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::client_token::{ClientToken, Unauthorized};
use crate::memory::MemoryStats;
use crate::model::{Module, Pipeline};
use crate::nn::WrongInput;
use crate::oip::{self, ModelMetadata, TensorSpec};
use kube_zerocopy_contract::pod;

/// What a replica accepts from its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest request body (a batch, not a dataset).
    pub max_body_bytes: u64,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// How long a request's headers may take to arrive.
    pub header_timeout: Duration,
    /// Requests that may wait while a batch runs. Twice as many are admitted at once (their
    /// bodies read and decoded meanwhile); beyond that a request is answered 503 before its
    /// body is read.
    pub queued_batches: usize,
    /// Open connections at most; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: pod::DEFAULT_MAX_BODY_BYTES,
            body_timeout: Duration::from_secs(pod::DEFAULT_BODY_TIMEOUT_SECONDS),
            header_timeout: Duration::from_secs(10),
            queued_batches: pod::DEFAULT_QUEUED_BATCHES,
            max_connections: 1024,
        }
    }
}

/// Dynamic batching: requests merged into one forward pass.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// The most rows of one forward pass (a larger request still runs, alone).
    pub max_rows: i64,
    /// How long the first request of a pass waits for others.
    pub max_delay: Duration,
}

/// How a replica serves.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The model's name in the protocol's paths (the pipeline's name).
    pub model: String,
    pub limits: Limits,
    pub batching: Option<Batching>,
    /// The longest drain after SIGTERM.
    pub drain: Duration,
    /// The token clients must send to reach the model's paths; health, metrics and the
    /// server's metadata stay open (the kubelet's probes, Prometheus).
    pub client_token: Option<Arc<ClientToken>>,
}

/// Why a request got no answer, as the client is told.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the request body did not arrive within {0} s")]
    SlowBody(u64),
    #[error("{0} requests are waiting already; retry shortly")]
    Busy(usize),
    #[error("the models are not mapped yet; retry shortly")]
    NotReady,
    #[error("{0}")]
    ModelRefused(String),
    #[error("the batch failed inside the worker; its log says why")]
    Internal,
    #[error(transparent)]
    Unauthorized(#[from] Unauthorized),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            Refusal::Busy(_) | Refusal::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::ModelRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The actor's metrics, prefixed `kube_zerocopy_worker_`.
struct ActorMetrics {
    batches: Counter,
    failed: Counter,
    rows: Counter,
    executions: Counter,
    seconds: Histogram,
    in_flight: Gauge,
    weights: Gauge,
    process_pss: Gauge,
    process_uss: Gauge,
    weights_pss: Gauge,
    /// The models' shared mappings, whose PSS each scrape reads (once they are mapped).
    mappings: OnceLock<Vec<PathBuf>>,
    registry: Registry,
}

impl ActorMetrics {
    fn new() -> Self {
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
        let batches = counter(&mut registry, "batches", "Inference requests answered");
        let failed = counter(&mut registry, "batch_errors", "Inference requests refused");
        let rows = counter(&mut registry, "rows", "Rows of the requests answered");
        let executions = counter(
            &mut registry,
            "executions",
            "Forward passes (fewer than requests when dynamic batching merges them)",
        );
        let seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "batch_duration",
            "Time per answered request, waiting included",
            Unit::Seconds,
            seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Inference requests admitted and not yet answered (their bodies read, queued or running)",
            in_flight.clone(),
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
        ActorMetrics {
            batches,
            failed,
            rows,
            executions,
            seconds,
            in_flight,
            weights,
            process_pss,
            process_uss,
            weights_pss,
            mappings: OnceLock::new(),
            registry,
        }
    }

    fn set_models(&self, pipeline: &Pipeline) {
        let shared = || pipeline.models.iter().filter_map(|m| m.shared.as_ref());
        let total: u64 = shared().map(|s| s.manifest.tensors_bytes).sum();
        self.weights.set(total as i64);
        let _ = self
            .mappings
            .set(shared().map(|s| s.mapping_path().to_owned()).collect());
    }

    /// The text format, with the memory gauges read from /proc now.
    fn render(&self, in_flight: usize) -> Result<String> {
        self.in_flight.set(in_flight as i64);
        let process = MemoryStats::of_process("self")?;
        self.process_pss.set(process.pss_kib as i64 * 1024);
        self.process_uss.set(process.uss_kib as i64 * 1024);
        if let Some(mappings) = self.mappings.get() {
            let mappings: Vec<&std::path::Path> = mappings.iter().map(PathBuf::as_path).collect();
            let mapped = MemoryStats::of_mappings("self", &mappings)?;
            self.weights_pss.set(mapped.pss_kib as i64 * 1024);
        }
        let mut out = String::new();
        encode_metrics(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The protocol's description of the pipeline: what its first model takes and its last one
/// answers. An Mlp's widths and dtype are known from its weights; a TorchScript module's are
/// not (-1, and FP32, the usual case).
pub fn metadata(pipeline: &Pipeline, name: &str) -> ModelMetadata {
    let widths = |m: Option<&crate::LoadedModel>| match m.map(|m| &m.module) {
        Some(Module::Mlp(mlp)) => {
            let sizes = mlp.sizes();
            let datatype = oip::datatype(mlp.layers[0].ws.kind()).unwrap_or("FP32");
            (sizes[0], sizes[sizes.len() - 1], datatype)
        }
        _ => (-1, -1, "FP32"),
    };
    let (input, _, input_type) = widths(pipeline.models.first());
    let (_, output, output_type) = widths(pipeline.models.last());
    let spec = |name: &str, width: i64, datatype: &str| TensorSpec {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![-1, width],
    };
    ModelMetadata {
        name: name.into(),
        versions: vec!["1".into()],
        platform: "kube-zerocopy".into(),
        inputs: vec![spec(oip::INPUT, input, input_type)],
        outputs: vec![spec(oip::OUTPUT, output, output_type)],
    }
}

/// A request on its way to the inference thread, and where its output goes.
struct Job {
    input: Tensor,
    reply: oneshot::Sender<Result<Tensor, Refusal>>,
}

impl Job {
    /// Rows, if the request can be merged with others along its first dimension.
    fn rows(&self) -> Option<i64> {
        self.input.size().first().copied()
    }

    /// Whether `other` can join this job's pass: both have rows, of one datatype and shape.
    fn fits_with(&self, other: &Job) -> bool {
        let (a, b) = (self.input.size(), other.input.size());
        let rows_of_one_shape = matches!(
            (a.split_first(), b.split_first()),
            (Some((_, a)), Some((_, b))) if a == b
        );
        self.input.kind() == other.input.kind() && rows_of_one_shape
    }
}

/// One forward pass. Errors are the client's (422) or the worker's (500).
fn forward(pipeline: &Pipeline, input: &Tensor) -> Result<Tensor, Refusal> {
    let forward =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pipeline.forward(input)));
    match forward {
        Ok(Ok(output)) => Ok(output),
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
            Err(Refusal::ModelRefused(reason))
        }
        Err(panic) => {
            error!(panic = panic_message(&*panic), shape = ?input.size(), "a batch panicked inside the models");
            Err(Refusal::Internal)
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// Runs `group` as one forward pass and answers each job with its own rows; if the pass fails
/// or its output does not keep the rows apart, each job runs alone, so that only a bad request
/// gets its refusal.
fn run_group(pipeline: &Pipeline, group: Vec<Job>, metrics: &ActorMetrics) {
    if let [_] = &group[..] {
        let job = group.into_iter().next().expect("one job");
        metrics.executions.inc();
        let _ = job.reply.send(forward(pipeline, &job.input));
        return;
    }
    let rows: Vec<i64> = group.iter().filter_map(Job::rows).collect();
    let total: i64 = rows.iter().sum();
    let inputs: Vec<&Tensor> = group.iter().map(|j| &j.input).collect();
    metrics.executions.inc();
    let merged = Tensor::f_cat(&inputs, 0)
        .map_err(|_| Refusal::Internal)
        .and_then(|merged| forward(pipeline, &merged));
    match merged {
        Ok(output) if output.size().first() == Some(&total) => {
            let mut start = 0;
            for (job, n) in group.into_iter().zip(rows) {
                let _ = job.reply.send(Ok(output.narrow(0, start, n)));
                start += n;
            }
        }
        _ => {
            debug!(
                requests = group.len(),
                "a merged batch failed; running its requests one by one"
            );
            for job in group {
                metrics.executions.inc();
                let _ = job.reply.send(forward(pipeline, &job.input));
            }
        }
    }
}

/// Runs the requests in arrival order, merging them with `batching`; ends with the server. A
/// pass waits for more requests only while others are on their way (`in_flight`, requests
/// being read or run, counts more than it holds): a lone client never waits the delay.
fn run_jobs(
    pipeline: &Pipeline,
    queue: Receiver<Job>,
    batching: Option<Batching>,
    in_flight: &AtomicUsize,
    metrics: &ActorMetrics,
) {
    let mut next: Option<Job> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        // A panic while merging or answering fails the requests of this pass alone (their
        // replies are dropped: 500), never the thread that serves every other request.
        let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let group = gather(first, &queue, &mut next, batching, in_flight);
            run_group(pipeline, group, metrics);
        }));
        if let Err(panic) = pass {
            error!(
                panic = panic_message(&*panic),
                "a pass panicked; its requests were failed"
            );
        }
    }
}

/// The requests of one pass: `first`, then as many that fit as arrive within the delay while
/// others are on their way. One that does not fit is left in `next` for the next pass.
fn gather(
    first: Job,
    queue: &Receiver<Job>,
    next: &mut Option<Job>,
    batching: Option<Batching>,
    in_flight: &AtomicUsize,
) -> Vec<Job> {
    let mut group = vec![first];
    if let (Some(batching), Some(mut rows)) = (batching, group[0].rows()) {
        let deadline = Instant::now() + batching.max_delay;
        while rows < batching.max_rows && in_flight.load(Ordering::SeqCst) > group.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match queue.recv_timeout(left) {
                Ok(job)
                    if group[0].fits_with(&job)
                        && job.rows().is_some_and(|n| rows + n <= batching.max_rows) =>
                {
                    rows += job.rows().unwrap_or(0);
                    group.push(job);
                }
                Ok(job) => {
                    *next = Some(job);
                    break;
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    group
}

/// What the inference thread and the HTTP side share.
#[derive(Default)]
struct State {
    /// Set once the models are mapped.
    metadata: OnceLock<ModelMetadata>,
    /// Cleared if the inference thread ends: the replica is no longer ready.
    inferring: AtomicBool,
    /// Set if the inference thread ends (however it ends): the replica is no longer live.
    ended: AtomicBool,
    /// Set on SIGTERM.
    draining: AtomicBool,
    /// Inference requests being read, run or answered.
    in_flight: AtomicUsize,
}

impl State {
    fn ready(&self) -> bool {
        self.metadata.get().is_some()
            && self.inferring.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }
}

/// Marks the inference thread ended when it ends, a panic included.
struct Ended<'a>(&'a State);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.inferring.store(false, Ordering::Relaxed);
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the HTTP side shares.
struct Server {
    jobs: SyncSender<Job>,
    /// A permit per request between admission and answer (see [`Limits::queued_batches`]).
    admitted: Arc<tokio::sync::Semaphore>,
    metrics: Arc<ActorMetrics>,
    state: Arc<State>,
    settings: Settings,
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: serde_json::Value) -> Answer {
    answer(status, "application/json", body.to_string())
}

fn refused(refusal: &Refusal) -> Answer {
    let mut response = answer(
        refusal.status(),
        "application/json",
        oip::error_body(&refusal.to_string()),
    );
    if matches!(refusal, Refusal::Busy(_) | Refusal::NotReady) {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if matches!(refusal, Refusal::Unauthorized(_)) {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// What a path under /v2/models/{name} asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ModelRoute {
    Metadata,
    Ready,
    Infer,
}

/// `{name}[/versions/{v}][/ready|/infer]` as (route, name, version), or None for any other
/// path.
fn model_route(rest: &str) -> Option<(ModelRoute, &str, Option<&str>)> {
    let (rest, route) = if let Some(r) = rest.strip_suffix("/infer") {
        (r, ModelRoute::Infer)
    } else if let Some(r) = rest.strip_suffix("/ready") {
        (r, ModelRoute::Ready)
    } else {
        (rest, ModelRoute::Metadata)
    };
    let (name, version) = match rest.split_once("/versions/") {
        Some((name, version)) => (name, Some(version)),
        None => (rest, None),
    };
    (!name.is_empty() && !name.contains('/') && !version.is_some_and(|v| v.contains('/')))
        .then_some((route, name, version))
}

impl Server {
    async fn handle(&self, request: Request<Incoming>) -> Answer {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/v2/health/live") => {
                // The protocol answers false with a 4xx; the kubelet then restarts the replica.
                let live = !self.state.ended.load(Ordering::Relaxed);
                let status = if live {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                };
                json(status, serde_json::json!({ "live": live }))
            }
            (&Method::GET, "/v2/health/ready") => self.readiness(),
            (&Method::GET, "/v2") => json(
                StatusCode::OK,
                serde_json::json!({
                    "name": "kube-zerocopy",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": ["binary_tensor_data"],
                }),
            ),
            (&Method::GET, "/metrics") => match self
                .metrics
                .render(self.state.in_flight.load(Ordering::SeqCst))
            {
                Ok(metrics) => answer(StatusCode::OK, "text/plain; charset=utf-8", metrics),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot render the metrics");
                    refused(&Refusal::Internal)
                }
            },
            (_, p) => match p.strip_prefix("/v2/models/").and_then(model_route) {
                Some((route, name, version)) => {
                    let outcome = match self
                        .check_client(&request)
                        .and_then(|()| self.check_model(route, name, version))
                    {
                        Err(refusal) => Err(refusal),
                        Ok(()) => match (&method, route) {
                            (&Method::GET, ModelRoute::Metadata) => Ok(json(
                                StatusCode::OK,
                                serde_json::to_value(self.state.metadata.get()).unwrap_or_default(),
                            )),
                            (&Method::GET, ModelRoute::Ready) => Ok(self.readiness()),
                            (&Method::POST, ModelRoute::Infer) => self.infer(request).await,
                            _ => Err(Refusal::NotFound(format!("{method} {p} is not served"))),
                        },
                    };
                    outcome.unwrap_or_else(|refusal| {
                        self.metrics.failed.inc();
                        debug!(%refusal, path = p, "request refused");
                        refused(&refusal)
                    })
                }
                None => refused(&Refusal::NotFound(format!("{method} {p} is not served"))),
            },
        }
    }

    /// The protocol answers readiness with 200, and with a 4xx when not ready.
    fn readiness(&self) -> Answer {
        let ready = self.state.ready();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        json(status, serde_json::json!({ "ready": ready }))
    }

    /// The client sent the token, when the replica has one.
    fn check_client(&self, request: &Request<Incoming>) -> Result<(), Refusal> {
        let Some(token) = &self.settings.client_token else {
            return Ok(());
        };
        let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        Ok(token.admits(authorization)?)
    }

    /// The model and version asked for are the ones served, and mapped.
    fn check_model(
        &self,
        route: ModelRoute,
        name: &str,
        version: Option<&str>,
    ) -> Result<(), Refusal> {
        let served = &self.settings.model;
        if name != served {
            return Err(Refusal::NotFound(format!(
                "model {name:?} is not served here; this replica serves {served:?}"
            )));
        }
        if version.is_some_and(|v| v != "1") {
            return Err(Refusal::NotFound(format!(
                "model {served:?} has version 1 only"
            )));
        }
        if self.state.metadata.get().is_none() && route != ModelRoute::Ready {
            return Err(Refusal::NotReady);
        }
        Ok(())
    }

    async fn infer(&self, request: Request<Incoming>) -> Result<Answer, Refusal> {
        // Admitted before the body is read: a burst of large bodies cannot hold more memory
        // than the admitted requests' limits.
        let _admitted = self
            .admitted
            .try_acquire()
            .map_err(|_| Refusal::Busy(self.settings.limits.queued_batches))?;
        let _in_flight = InFlight::new(&self.state.in_flight);
        let started = Instant::now();
        let json_length = match request.headers().get(oip::HEADER_LENGTH) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Refusal::BadRequest(format!("{} is not a length", oip::HEADER_LENGTH))
                    })?,
            ),
        };
        let body = self.read_body(request).await?;
        // Off the serving threads, which also answer health and metrics.
        let request = tokio::task::spawn_blocking(move || oip::decode_request(&body, json_length))
            .await
            .map_err(|_| Refusal::Internal)?
            .map_err(|e| Refusal::BadRequest(format!("{e:#}")))?;
        let rows = request.input.size().first().copied().unwrap_or(1);
        let (reply, output) = oneshot::channel();
        self.jobs
            .try_send(Job {
                input: request.input,
                reply,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => Refusal::Busy(self.settings.limits.queued_batches),
                TrySendError::Disconnected(_) => Refusal::Internal,
            })?;
        let output = output.await.map_err(|_| Refusal::Internal)??;
        let encoded = oip::encode_answer(
            &self.settings.model,
            request.id.as_deref(),
            &output,
            request.binary_output,
        )
        .map_err(|e| {
            error!(error = %format!("{e:#}"), "cannot encode an answer");
            Refusal::Internal
        })?;
        self.metrics.batches.inc();
        self.metrics.rows.inc_by(rows.max(0) as u64);
        self.metrics
            .seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(match encoded.json_length {
            Some(n) => {
                let mut response = answer(StatusCode::OK, "application/octet-stream", encoded.body);
                response.headers_mut().insert(oip::HEADER_LENGTH, n.into());
                response
            }
            None => answer(StatusCode::OK, "application/json", encoded.body),
        })
    }

    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, Refusal> {
        let limits = &self.settings.limits;
        let max = limits.max_body_bytes;
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
        Ok(tokio::time::timeout(limits.body_timeout, body.collect())
            .await
            .map_err(|_| Refusal::SlowBody(limits.body_timeout.as_secs()))?
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    Refusal::TooLarge(max)
                } else {
                    Refusal::BadRequest(format!("reading the request body: {e}"))
                }
            })?
            .to_bytes())
    }
}

async fn accept(listener: tokio::net::TcpListener, server: Arc<Server>) -> Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(
        server.settings.limits.max_connections.max(1),
    ));
    loop {
        let open = connections
            .clone()
            .acquire_owned()
            .await
            .context("the connection limit was closed")?;
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
            let _open = open;
            let header_timeout = server.settings.limits.header_timeout;
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

/// Waits for SIGTERM or SIGINT, then drains: not ready at once, and done once nothing has
/// been in flight for a second, or after `longest`.
async fn drain_on_terminate(state: &State, longest: Duration) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    state.draining.store(true, Ordering::Relaxed);
    info!(
        in_flight = state.in_flight.load(Ordering::SeqCst),
        "draining"
    );
    let started = Instant::now();
    let mut idle_since = Instant::now();
    while started.elapsed() < longest {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if state.in_flight.load(Ordering::SeqCst) > 0 {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= Duration::from_secs(1) {
            info!("drained");
            return Ok(());
        }
    }
    warn!(
        in_flight = state.in_flight.load(Ordering::SeqCst),
        "the drain time is up"
    );
    Ok(())
}

/// Listens on `listen`, maps the models with `load` on the inference thread, and serves until
/// SIGTERM (then drains). A failed load ends the process with its error.
pub fn serve(
    load: impl FnOnce() -> Result<Pipeline> + Send + 'static,
    listen: &str,
    settings: Settings,
) -> Result<()> {
    let metrics = Arc::new(ActorMetrics::new());
    let state = Arc::new(State::default());
    let (jobs, queue) = sync_channel(settings.limits.queued_batches.max(1));
    let (load_failed, failed_load) = oneshot::channel::<anyhow::Error>();
    {
        let (metrics, state, settings) = (metrics.clone(), state.clone(), settings.clone());
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let _ended = Ended(&state);
                let pipeline = match load() {
                    Ok(pipeline) => pipeline,
                    Err(e) => {
                        let _ = load_failed.send(e);
                        return;
                    }
                };
                metrics.set_models(&pipeline);
                state.inferring.store(true, Ordering::Relaxed);
                let _ = state.metadata.set(metadata(&pipeline, &settings.model));
                info!(model = %settings.model, "models mapped; ready");
                run_jobs(
                    &pipeline,
                    queue,
                    settings.batching,
                    &state.in_flight,
                    &metrics,
                );
            })
            .context("starting the inference thread")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let drain = settings.drain;
    let server = Arc::new(Server {
        jobs,
        admitted: Arc::new(tokio::sync::Semaphore::new(
            2 * settings.limits.queued_batches.max(1),
        )),
        metrics,
        state: state.clone(),
        settings,
    });
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        info!(%listen, "serving the Open Inference Protocol");
        tokio::select! {
            served = accept(listener, server) => served,
            drained = drain_on_terminate(&state, drain) => drained,
            failed = failed_load => Err(failed.unwrap_or_else(|_| anyhow::anyhow!("the inference thread ended"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_with_rows_of_one_shape_and_datatype_are_merged() {
        let job = |shape: &[i64], kind| Job {
            input: Tensor::zeros(shape, (kind, tch::Device::Cpu)),
            reply: oneshot::channel().0,
        };
        let float = tch::Kind::Float;
        assert!(job(&[2, 4], float).fits_with(&job(&[3, 4], float)));
        assert!(!job(&[2, 4], float).fits_with(&job(&[], float)));
        assert!(!job(&[], float).fits_with(&job(&[2, 4], float)));
        assert!(!job(&[2, 4], float).fits_with(&job(&[2, 5], float)));
        assert!(!job(&[2, 4], float).fits_with(&job(&[2, 4], tch::Kind::Double)));
    }

    #[test]
    fn model_paths_are_routed_with_or_without_a_version() {
        use ModelRoute::*;
        assert_eq!(model_route("net"), Some((Metadata, "net", None)));
        assert_eq!(model_route("net/ready"), Some((Ready, "net", None)));
        assert_eq!(model_route("net/infer"), Some((Infer, "net", None)));
        assert_eq!(
            model_route("net/versions/1/infer"),
            Some((Infer, "net", Some("1")))
        );
        assert_eq!(
            model_route("net/versions/2"),
            Some((Metadata, "net", Some("2")))
        );
        assert_eq!(model_route("a/b/infer"), None);
        assert_eq!(model_route("/infer"), None);
    }
}
