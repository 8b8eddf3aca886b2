//! What every kube-zerocopy binary does around its work: logs to stderr (JSON with
//! `KZC_LOG_FORMAT=json`, filtered by `RUST_LOG`, colours only on a terminal), on error a
//! one-line message, the container's termination message (what Kubernetes shows) and exit code
//! 1 (3 when retrying cannot help), and for the long-running servers a clean exit on SIGTERM.

use std::io::IsTerminal;

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
    if std::env::var("KZC_LOG_FORMAT").is_ok_and(|f| f == "json") {
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

/// Ends the process on an error, reporting it where a user and Kubernetes look: exit code 1,
/// or [`EXIT_PERMANENT`] for a [`Permanent`] error.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        let message = crate::redact::uris_in(&format!("{e:#}")).into_owned();
        eprintln!("error: {message}");
        write_termination_message(&message);
        let permanent = e.chain().any(|c| c.is::<Permanent>());
        std::process::exit(if permanent { EXIT_PERMANENT } else { 1 });
    }
}

/// Where Kubernetes reads a container's termination message (its terminationMessagePath);
/// `KZC_TERMINATION_LOG` names another file.
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Writes `message` as the termination message, only into a file that exists: Kubernetes
/// mounts it in a pod; outside one, nothing is created (not even in /dev, as root).
pub fn write_termination_message(message: &str) {
    let path = std::env::var("KZC_TERMINATION_LOG").unwrap_or_else(|_| TERMINATION_LOG.into());
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

/// Serves plain-text endpoints (/livez, /readyz, /metrics) on `listen` from a thread of its
/// own: `answer` gives each path's status code and body.
pub fn serve_endpoints(
    listen: &str,
    answer: impl Fn(&str) -> (u16, String) + Send + 'static,
) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    std::thread::Builder::new()
        .name("endpoints".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (code, body) = answer(request.url());
                let response = tiny_http::Response::from_string(body).with_status_code(code);
                let _ = request.respond(response);
            }
        })?;
    Ok(())
}
