//! A scripted API server for the apply steps' tests: kube's client over `tower-test`, as
//! kube's own tests do. Each request must be the next one the script expects.

use std::sync::Arc;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::api::batch::v1::Job;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use kube::Client;
use kube_zerocopy_contract::names;
use serde_json::{json, Value};

use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::render::Settings;

/// A reconcile's context on `client`, its Job cache holding `jobs` (as the watch would).
pub(super) fn context(client: Client, jobs: Vec<Job>) -> Context {
    let reporter = Reporter {
        controller: names::MANAGER.into(),
        instance: None,
    };
    let (cache, mut writer) = reflector::store::<Job>();
    for job in jobs {
        writer.apply_watcher_event(&watcher::Event::Apply(job));
    }
    Context {
        client: client.clone(),
        settings: Settings::default(),
        recorder: Recorder::new(client, reporter),
        metrics: Arc::new(Metrics::default()),
        jobs: cache,
        pods: reflector::store().0,
        failures: Default::default(),
    }
}

/// One answer of the scripted API server, to a request of this method and path.
pub(super) struct Answer {
    method: Method,
    path: &'static str,
    status: u16,
    body: Value,
}

pub(super) fn answer(method: Method, path: &'static str, status: u16, body: Value) -> Answer {
    Answer {
        method,
        path,
        status,
        body,
    }
}

/// A request the server saw: its method, URI and body.
pub(super) struct Seen {
    pub method: Method,
    pub uri: String,
    pub body: Value,
}

/// A client of an API server that answers each request with the next of `answers` (after
/// checking its method and path) and, once the client is dropped, says what it saw. A
/// request beyond the script gets a 500, and is seen.
pub(super) fn api_server(answers: Vec<Answer>) -> (Client, tokio::task::JoinHandle<Vec<Seen>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut answers = answers.into_iter();
        let mut seen = vec![];
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, reply) = match answers.next() {
                Some(a) => {
                    assert_eq!((&a.method, uri.split('?').next()), (&method, Some(a.path)));
                    (a.status, a.body)
                }
                None => (500, json!({"kind": "Status", "code": 500})),
            };
            seen.push(Seen { method, uri, body });
            let reply = Body::from(serde_json::to_vec(&reply).unwrap());
            send.send_response(Response::builder().status(status).body(reply).unwrap());
        }
        seen
    });
    (Client::new(service, "tenant"), server)
}

pub(super) fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}
