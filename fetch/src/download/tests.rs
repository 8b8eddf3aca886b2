//! Downloads from real HTTP servers on 127.0.0.1 that misbehave on purpose: each test server
//! answers its connections one after another with scripted replies, and records what it was
//! asked. The TLS tests use `openssl s_server`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use super::*;

/// What a scripted server does with one request: it gets the request's head and the stream.
type Reply = Box<dyn FnOnce(&str, &mut TcpStream) + Send>;

struct Server {
    uri: String,
    /// The head of every request received, lowercased.
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves `replies` in order, one connection each, then stops accepting.
fn serve(replies: Vec<Reply>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}/model.bin", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    thread::spawn(move || {
        for reply in replies {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut head = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line.to_ascii_lowercase());
            }
            seen.lock().unwrap().push(head.clone());
            // Its own thread: a reply that hangs must not hold up the client's next attempt.
            thread::spawn(move || reply(&head, &mut stream));
        }
    });
    Server { uri, requests }
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A reply with `status` and `headers` that sends `body` (the whole of it, or only its first
/// `send` bytes before hanging for `hang` and closing).
fn reply(status: &str, headers: &[String], body: Vec<u8>, send: usize, hang: Duration) -> Reply {
    let status = status.to_owned();
    let headers = headers.to_vec();
    Box::new(move |_, stream| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for h in &headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&body[..send.min(body.len())]);
        let _ = stream.flush();
        thread::sleep(hang);
    })
}

fn whole(body: &[u8], extra: &[&str]) -> Reply {
    let mut headers = vec![format!("Content-Length: {}", body.len())];
    headers.extend(extra.iter().map(|s| s.to_string()));
    reply(
        "200 OK",
        &headers,
        body.to_vec(),
        body.len(),
        Duration::ZERO,
    )
}

fn quick() -> Policy {
    Policy {
        stall: Duration::from_millis(300),
        first_pause: Duration::from_millis(10),
        ..Policy::default()
    }
}

fn fetch(uri: &str, policy: &Policy) -> (Result<Downloaded>, Vec<u8>) {
    let mut file = tempfile::tempfile().unwrap();
    let result = download(uri, &mut file, policy, &|_, _| {});
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut bytes).unwrap();
    (result, bytes)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn a_stalled_transfer_resumes_from_its_last_byte() {
    let body = content(3 << 20, 1);
    let first = 1 << 20;
    let server = serve(vec![
        // 1 MiB, then nothing for ten times the stall timeout.
        reply(
            "200 OK",
            &[
                format!("Content-Length: {}", body.len()),
                "ETag: \"v1\"".into(),
            ],
            body.clone(),
            first,
            Duration::from_secs(3),
        ),
        reply(
            "206 Partial Content",
            &[
                format!(
                    "Content-Range: bytes {first}-{}/{}",
                    body.len() - 1,
                    body.len()
                ),
                format!("Content-Length: {}", body.len() - first),
            ],
            body[first..].to_vec(),
            body.len(),
            Duration::ZERO,
        ),
    ]);
    let (result, written) = fetch(&server.uri, &quick());
    let done = result.unwrap();
    assert_eq!(done.sha256, sha(&body));
    assert_eq!(done.bytes, body.len() as u64);
    assert!(
        written == body,
        "the file holds other bytes than the source"
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(!requests[0].contains("range:"), "{}", requests[0]);
    assert!(
        requests[1].contains(&format!("range: bytes={first}-")),
        "{}",
        requests[1]
    );
    assert!(requests[1].contains("if-range: \"v1\""), "{}", requests[1]);
    assert!(
        requests[0].contains("accept-encoding: identity"),
        "{}",
        requests[0]
    );
}

/// A reply of `body` in pieces of `piece` bytes, 150 ms apart.
fn in_pieces(body: Vec<u8>, piece: usize) -> Reply {
    Box::new(move |_, stream| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        for piece in body.chunks(piece) {
            if stream
                .write_all(piece)
                .and_then(|()| stream.flush())
                .is_err()
            {
                return;
            }
            thread::sleep(Duration::from_millis(150));
        }
    })
}

/// A stall timeout of 500 ms, and a minimum rate of 1000 bytes a second over 1 s.
fn at_least_1000_bytes_a_second() -> Policy {
    Policy {
        stall: Duration::from_millis(500),
        min_bytes_per_second: Some(1000),
        rate_window: Duration::from_secs(1),
        ..quick()
    }
}

#[test]
fn a_slow_but_steady_transfer_is_never_cut_off() {
    // 20 pieces, 150 ms apart: six times the stall timeout in all, never a stall.
    let body = content(20 << 10, 2);
    let server = serve(vec![in_pieces(body.clone(), 1 << 10)]);
    // About 6.8 KB a second, above the minimum rate.
    let policy = at_least_1000_bytes_a_second();
    let (result, written) = fetch(&server.uri, &policy);
    assert_eq!(result.unwrap().sha256, sha(&body));
    assert!(written == body);
    assert_eq!(server.requests().len(), 1, "the transfer was restarted");
}

/// A source that sends a byte just before each stall timeout would hold its model's lock for
/// as long as it likes: below the minimum rate over a window it fails, and is not tried again.
#[test]
fn a_source_that_trickles_below_the_minimum_rate_fails_without_retrying() {
    let server = serve(vec![in_pieces(content(1 << 10, 5), 1)]);
    let policy = at_least_1000_bytes_a_second();
    let (result, _) = fetch(&server.uri, &policy);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("slower than the 1000 bytes a second"), "{err}");
    assert_eq!(
        server.requests().len(),
        1,
        "a trickling source was tried again"
    );
}

#[test]
fn a_file_that_changed_on_the_server_is_fetched_again_from_the_start() {
    let old = content(1 << 20, 3);
    let new = content(1 << 20, 4);
    let server = serve(vec![
        // Half of the old file, then the connection closes early.
        reply(
            "200 OK",
            &[
                format!("Content-Length: {}", old.len()),
                "ETag: \"old\"".into(),
            ],
            old.clone(),
            old.len() / 2,
            Duration::ZERO,
        ),
        // If-Range no longer matches: the whole new file.
        whole(&new, &["ETag: \"new\""]),
    ]);
    let (result, written) = fetch(&server.uri, &quick());
    let done = result.unwrap();
    assert_eq!(
        done.sha256,
        sha(&new),
        "the hash mixes the old file's bytes in"
    );
    assert!(written == new, "the file splices the old and the new");
    let requests = server.requests();
    assert!(requests[1].contains("if-range: \"old\""), "{}", requests[1]);
}

#[test]
fn a_server_without_validators_is_asked_for_the_whole_file_again() {
    let body = content(1 << 20, 5);
    let server = serve(vec![
        reply(
            "200 OK",
            &[format!("Content-Length: {}", body.len())],
            body.clone(),
            1000,
            Duration::ZERO,
        ),
        whole(&body, &[]),
    ]);
    let (result, written) = fetch(&server.uri, &quick());
    assert_eq!(result.unwrap().sha256, sha(&body));
    assert!(written == body);
    let requests = server.requests();
    assert!(
        !requests[1].contains("range:"),
        "resumed without a validator: {}",
        requests[1]
    );
}

#[test]
fn a_file_larger_than_its_declared_size_is_refused_without_retrying() {
    let body = content(4000, 6);
    let policy = Policy {
        max_bytes: Some(1000),
        ..quick()
    };
    // Announced in advance.
    let server = serve(vec![whole(&body, &[])]);
    let error = format!("{:#}", fetch(&server.uri, &policy).0.unwrap_err());
    assert!(
        error.contains("is 4000 bytes, more than the model's declared size (1000"),
        "{error}"
    );
    assert_eq!(server.requests().len(), 1);
    // Not announced: the body runs until the connection closes.
    let server = serve(vec![reply(
        "200 OK",
        &[],
        body.clone(),
        body.len(),
        Duration::ZERO,
    )]);
    let (result, written) = fetch(&server.uri, &policy);
    let error = format!("{:#}", result.unwrap_err());
    assert!(
        error.contains("sent more, more than the model's declared size"),
        "{error}"
    );
    assert!(written.len() <= 1000, "{} bytes written", written.len());
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn client_errors_end_the_download_and_server_errors_are_retried() {
    let server = serve(vec![reply(
        "404 Not Found",
        &["Content-Length: 0".into()],
        vec![],
        0,
        Duration::ZERO,
    )]);
    let error = format!("{:#}", fetch(&server.uri, &quick()).0.unwrap_err());
    assert!(error.contains("answered HTTP 404"), "{error}");
    assert_eq!(server.requests().len(), 1);

    let body = content(5000, 7);
    let unavailable = || {
        reply(
            "503 Service Unavailable",
            &["Content-Length: 0".into()],
            vec![],
            0,
            Duration::ZERO,
        )
    };
    let server = serve(vec![unavailable(), unavailable(), whole(&body, &[])]);
    assert_eq!(fetch(&server.uri, &quick()).0.unwrap().sha256, sha(&body));
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn a_dead_source_is_given_up_after_the_attempts_without_progress() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = format!(
        "{:#}",
        fetch(&format!("http://127.0.0.1:{port}/model.bin"), &quick())
            .0
            .unwrap_err()
    );
    assert!(
        error.contains("after 4 attempts in a row without progress"),
        "{error}"
    );
    assert!(error.contains("unreachable"), "{error}");
}

#[test]
fn the_bearer_token_comes_from_its_file_and_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let body = content(100, 8);
    let server = serve(vec![whole(&body, &[])]);
    let policy = Policy {
        bearer_token_file: Some(token),
        ..quick()
    };
    assert_eq!(fetch(&server.uri, &policy).0.unwrap().sha256, sha(&body));
    assert!(server.requests()[0].contains("authorization: bearer s3cret-token\r\n"));

    let server = serve(vec![reply(
        "401 Unauthorized",
        &["Content-Length: 0".into()],
        vec![],
        0,
        Duration::ZERO,
    )]);
    let error = format!("{:#}", fetch(&server.uri, &quick()).0.unwrap_err());
    assert!(
        error.contains("HTTP 401") && error.contains("bearerTokenSecret"),
        "{error}"
    );
    assert!(!server.requests()[0].contains("authorization"));
}

/// `openssl s_server -HTTP` on 127.0.0.1 with a certificate from a CA of its own: it answers
/// `GET /name` with the file `name` of its folder, a complete HTTP response.
struct TlsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_server(files: &[(&str, Vec<u8>)]) -> TlsServer {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=kzc test CA",
            "-days",
            "1",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    for (name, response) in files {
        std::fs::write(d.join(name), response).unwrap();
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-HTTP",
            "-cert",
            "server.crt",
            "-key",
            "server.key",
        ])
        .args(["-accept", &format!("127.0.0.1:{port}")])
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "openssl s_server does not listen"
        );
        thread::sleep(Duration::from_millis(50));
    }
    TlsServer { child, port, dir }
}

#[test]
fn https_trusts_the_configured_ca_and_refuses_a_downgrade_to_http() {
    let body = content(10_000, 9);
    let mut response =
        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    response.extend_from_slice(&body);
    // The plain http server the redirect points to would serve the file.
    let plain = serve(vec![whole(&body, &[])]);
    let redirect = format!(
        "HTTP/1.0 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\n\r\n",
        plain.uri
    );
    let server = tls_server(&[
        ("model.bin", response),
        ("moved.bin", redirect.into_bytes()),
    ]);
    let uri = |name: &str| format!("https://127.0.0.1:{}/{name}", server.port);
    let ca = server.dir.path().join("ca.crt");

    // The system's CAs alone do not know the server's.
    let error = format!("{:#}", fetch(&uri("model.bin"), &quick()).0.unwrap_err());
    assert!(
        error.contains("TLS failed") && error.contains("caConfigMap"),
        "{error}"
    );

    let trusting = Policy {
        ca_file: Some(ca),
        ..quick()
    };
    let (result, written) = fetch(&uri("model.bin"), &trusting);
    assert_eq!(result.unwrap().sha256, sha(&body));
    assert!(written == body);

    let error = format!("{:#}", fetch(&uri("moved.bin"), &trusting).0.unwrap_err());
    assert!(
        error.contains("redirected to a plain http address"),
        "{error}"
    );
    assert!(
        plain.requests().is_empty(),
        "the plain http server was asked"
    );
}

#[test]
fn a_ca_file_without_certificates_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("ca.crt");
    std::fs::write(&empty, "not a certificate").unwrap();
    let error = format!("{:#}", trusted_roots(Some(&empty)).err().unwrap());
    assert!(error.contains("holds no PEM certificate"), "{error}");
}

#[test]
fn content_ranges_and_validators_parse_as_http_defines_them() {
    assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
    assert_eq!(content_range("bytes 100-199/*"), Some((100, None)));
    assert_eq!(content_range("bytes */200"), None);
    assert_eq!(content_range("items 1-2/3"), None);
    assert_eq!(validator(Some("\"a\""), Some("Tue")), Some("\"a\"".into()));
    assert_eq!(validator(Some("W/\"a\""), Some("Tue")), Some("Tue".into()));
    assert_eq!(validator(Some("W/\"a\""), None), None);
}
