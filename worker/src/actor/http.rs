//! The HTTP side: the Open Inference Protocol's routes, the answers and refusals, and the
//! accept loop.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
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
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::batcher::Job;
use super::drain::{InFlight, State};
use super::metrics::ActorMetrics;
use super::{Refusal, Settings};
use crate::oip;

/// What the HTTP side shares.
pub(super) struct Server {
    pub(super) jobs: SyncSender<Job>,
    /// A permit per request between admission and answer (see
    /// [`Limits::queued_batches`](super::Limits::queued_batches)).
    pub(super) admitted: Arc<tokio::sync::Semaphore>,
    pub(super) metrics: Arc<ActorMetrics>,
    pub(super) state: Arc<State>,
    pub(super) settings: Settings,
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
pub(super) enum ModelRoute {
    Metadata,
    Ready,
    Infer,
}

/// `{name}[/versions/{v}][/ready|/infer]` as (route, name, version), or None for any other
/// path.
pub(super) fn model_route(rest: &str) -> Option<(ModelRoute, &str, Option<&str>)> {
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

pub(super) async fn accept(listener: tokio::net::TcpListener, server: Arc<Server>) -> Result<()> {
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
