//! A scripted API server for the apply steps' tests: kube's client over `tower-test`, as
//! kube's own tests do. Each request must be the next one the script expects.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

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
