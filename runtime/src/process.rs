//! What every kube-zerocopy binary does around its work: logs to stderr (JSON with
//! `KZC_LOG_FORMAT=json`, filtered by `RUST_LOG`, colours only on a terminal), on error a
//! one-line message, the container's termination message (what Kubernetes shows) and exit code
//! 1 (3 when retrying cannot help), and for the long-running servers a clean exit on SIGTERM.

use kube_zerocopy_contract::settings::{LOG_FORMAT_ENV, TERMINATION_LOG_ENV};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A container's log (and its termination message) is a file: no colour codes there.
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var(LOG_FORMAT_ENV).is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// An error that no retry can fix (a Task's input folder disagrees with its pipeline): the
/// process exits with [`EXIT_PERMANENT`], which the Job's pod failure policy turns into a
/// failed Job at once instead of retries.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

pub const EXIT_PERMANENT: i32 = 3;

/// An error that no retry of this one shard can fix, though other shards may run (the model
/// cannot run on this shard's input): the process exits with [`EXIT_SHARD_FAILED`], which the
/// Job's pod failure policy turns into a failed index at once, counted against the Job's
/// failed shards, instead of retries.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ShardFailed(pub String);

pub const EXIT_SHARD_FAILED: i32 = 4;

/// Ends the process on an error, reporting it where a user and Kubernetes look: exit code 1,
/// [`EXIT_PERMANENT`] for a [`Permanent`] error, [`EXIT_SHARD_FAILED`] for a [`ShardFailed`].
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        let message = crate::redact::uris_in(&format!("{e:#}")).into_owned();
        eprintln!("error: {message}");
        write_termination_message(&message);
        let code = if e.chain().any(|c| c.is::<Permanent>()) {
            EXIT_PERMANENT
        } else if e.chain().any(|c| c.is::<ShardFailed>()) {
            EXIT_SHARD_FAILED
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// The command line and environment as `T`, or the process ends: help and version as clap
/// prints them; a mistake as a [`Permanent`] error through [`exit_on_error`], so that it is
/// the termination message too and a URI's query in a value is not shown.
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let said = e.to_string();
            let said = said.trim().trim_start_matches("error: ");
            exit_on_error(Err(Permanent(said.to_owned()).into()));
            unreachable!("exit_on_error ends the process on an error")
        }
    }
}

/// Where Kubernetes reads a container's termination message (its terminationMessagePath);
/// `KZC_TERMINATION_LOG` names another file.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Writes `message` as the termination message, only into a file that exists: Kubernetes
/// mounts it in a pod; outside one, nothing is created (not even in /dev, as root).
pub fn write_termination_message(message: &str) {
    let path = std::env::var(TERMINATION_LOG_ENV).unwrap_or_else(|_| TERMINATION_LOG.into());
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
    {
        let _ = std::io::Write::write_all(&mut file, message.as_bytes());
    }
}

/// Exits with 0 on SIGTERM or SIGINT. A server in a container is its PID 1, which ignores
/// SIGTERM unless it handles it: Kubernetes would kill it only after the grace period, and the
/// exit code 137 would read as a failure (a Job's weight server is stopped when its worker is
/// done). Nothing to flush: the store's locks go with the process.
pub fn exit_on_terminate() -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                tracing::info!(signal, "terminating");
                std::process::exit(0);
            }
        })?;
    Ok(())
}

/// The most connections the endpoints serve at once; more are closed as they arrive, so that
/// no number of clients exhausts the process's memory (its cgroup may also hold a store).
pub const MAX_ENDPOINT_CONNECTIONS: usize = 1024;

/// The most connections one peer address may have open at once: one client (a pod) cannot
/// take the whole of [`MAX_ENDPOINT_CONNECTIONS`] from the others (the kubelet's probes, the
/// metrics scraper).
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// The connections open per peer address, each counted until its [`PeerSlot`] drops.
#[derive(Clone, Default)]
struct Peers(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of a peer.
struct PeerSlot {
    peers: Peers,
    address: IpAddr,
}

impl Peers {
    /// A slot for `address`, unless it has [`MAX_CONNECTIONS_PER_PEER`] open already.
    fn take(&self, address: IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap();
        let count = open.entry(address).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            address,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.0.lock().unwrap();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// How long a connection may take to send a request's headers, or stay idle between
/// requests, before it is closed.
pub const ENDPOINT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves plain-text endpoints (/livez, /readyz, /metrics) on `listen` from a thread of its
/// own, one task per connection (hyper, on a runtime of one thread): `answer` gives each
/// path's status code and body. Returns the address it listens on.
pub fn serve_endpoints(
    listen: &str,
    answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = Arc::new(answer);
    std::thread::Builder::new()
        .name("endpoints".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a listening socket");
                let open = Arc::new(Semaphore::new(MAX_ENDPOINT_CONNECTIONS));
                let peers = Peers::default();
                loop {
                    let (stream, peer) = match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Some(slot) = peers.take(peer.ip()) else {
                        continue;
                    };
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        continue;
                    };
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request: Request<Incoming>| {
                            let (code, body) = answer(request.uri().path());
                            let response = Response::builder()
                                .status(code)
                                .header("content-type", "text/plain; charset=utf-8")
                                .body(Full::new(Bytes::from(body)));
                            async move { response }
                        });
                        let _ = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(ENDPOINT_HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        drop((permit, slot));
                    });
                }
            })
        })?;
    Ok(address)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn threads() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// A connection to `address` from `peer`, another loopback address of this machine.
    fn connect_from(peer: [u8; 4], address: SocketAddr) -> TcpStream {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((peer, 0))).unwrap();
            socket.connect(address).await.unwrap()
        });
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    }

    /// One peer's idle connections fill its own share only: past it, its connections are
    /// closed as they arrive, and another peer is served meanwhile.
    #[test]
    fn one_peer_cannot_take_the_connections_of_the_others() {
        let address = serve_endpoints("127.0.0.1:0", |_| (200, "ok".into())).unwrap();
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| connect_from([127, 0, 0, 3], address))
            .collect();
        // One more asks for /livez: closed unanswered (it would be answered within its share).
        let mut over = connect_from([127, 0, 0, 3], address);
        over.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = write!(
            over,
            "GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut answer = String::new();
        let _ = over.read_to_string(&mut answer);
        assert!(
            answer.is_empty(),
            "a peer past its share was answered: {answer}"
        );
        let answer = get(address, "/livez");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(idle);
    }

    /// A thread per connection (tiny_http's) let a few thousand idle connections from any pod
    /// exhaust the agent's threads and memory, its liveness failing with every mount. Now an
    /// idle connection is a task, closed after the header timeout; beyond the cap a connection
    /// is closed as it arrives.
    #[test]
    fn a_flood_of_idle_connections_costs_no_threads_and_health_still_answers() {
        let address = serve_endpoints("127.0.0.1:0", |path| match path {
            "/livez" => (200, "ok".into()),
            _ => (404, "no".into()),
        })
        .unwrap();
        let before = threads();
        // From many peers (loopback addresses), each within its own share.
        let peer = |i: usize| [127, 0, 1 + (i / MAX_CONNECTIONS_PER_PEER) as u8, 1];
        let mut idle: Vec<TcpStream> = (0..MAX_ENDPOINT_CONNECTIONS - 24)
            .map(|i| connect_from(peer(i), address))
            .collect();
        let answer = get(address, "/livez");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        let grown = threads().saturating_sub(before);
        // Other tests of this binary start threads meanwhile; a thread per connection is 1000.
        assert!(
            grown < 100,
            "{} idle connections cost {grown} threads",
            idle.len()
        );
        // Past the cap: closed at once, nothing kept for it.
        idle.extend((0..100).map(|i| connect_from(peer(MAX_ENDPOINT_CONNECTIONS + i), address)));
        let mut last = idle.pop().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let closed = last.read(&mut [0u8; 1]);
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // An idle connection is closed once its headers are overdue, and room comes back.
        idle[0]
            .set_read_timeout(Some(ENDPOINT_HEADER_TIMEOUT * 6))
            .unwrap();
        let ended = idle[0].read(&mut [0u8; 1]);
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        drop(idle);
        assert!(get(address, "/other").starts_with("HTTP/1.1 404"));
    }
}
