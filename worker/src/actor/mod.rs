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

mod batcher;
mod drain;
mod http;
pub mod metrics;

use std::sync::atomic::Ordering;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::StatusCode;
use tokio::sync::oneshot;
use tracing::info;

use crate::model::{Module, Pipeline};
use crate::oip::{self, ModelMetadata, TensorSpec};
use kube_zerocopy_batch::client_token::{ClientToken, Unauthorized};
use kube_zerocopy_contract::pod;

use batcher::run_jobs;
use drain::{drain_on_terminate, Ended, State};
use http::{accept, Server};
use metrics::ActorMetrics;

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
mod tests;
