//! `kube-zerocopy-sidecar`: the weight server. It runs as a native sidecar: it publishes every
//! model of `KZC_MODELS` into the shared store, binds them for this pod, then stays up serving
//! its readiness endpoint until the pod ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kube_zerocopy_sidecar::config::models_from_env;
use kube_zerocopy_sidecar::layout::PodPaths;
use kube_zerocopy_sidecar::publish::Publisher;

#[derive(Parser)]
#[command(name = "kube-zerocopy-sidecar", version, about)]
struct Cli {
    #[command(flatten)]
    paths: PodPaths,
    /// Where http(s) sources are downloaded before they are laid out.
    #[arg(long, env = "KZC_DOWNLOAD_DIR", global = true, default_value_os_t = std::env::temp_dir())]
    download_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Publish every model, then serve readiness until terminated (the default).
    Serve {
        /// Address of the HTTP endpoints /readyz and /livez.
        #[arg(long, env = "KZC_LISTEN", default_value = "0.0.0.0:8471")]
        listen: String,
    },
    /// Publish every model and exit.
    Publish,
    /// Exit 0 only when every model is published and bound (the startup probe).
    Probe,
}

fn main() {
    kube_zerocopy_sidecar::process::init_logs();
    kube_zerocopy_sidecar::process::exit_on_error(run(Cli::parse()));
}

fn run(cli: Cli) -> Result<()> {
    let models = models_from_env()?;
    let publisher = Publisher {
        store: cli.paths.store(),
        bindings: cli.paths.bindings(),
        download_dir: cli.download_dir,
    };
    match cli.command.unwrap_or(Command::Serve {
        listen: "0.0.0.0:8471".into(),
    }) {
        Command::Probe => publisher.check_ready(&models),
        Command::Publish => publisher.publish_all(&models).map(|_| ()),
        Command::Serve { listen } => {
            let ready = Arc::new(AtomicBool::new(false));
            let server = tiny_http::Server::http(&listen)
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            let flag = ready.clone();
            std::thread::spawn(move || serve_health(server, flag));
            publisher.publish_all(&models)?;
            ready.store(true, Ordering::SeqCst);
            // Stay up as the pod's sidecar; Kubernetes ends it with the pod.
            loop {
                std::thread::park();
            }
        }
    }
}

fn serve_health(server: tiny_http::Server, ready: Arc<AtomicBool>) {
    for request in server.incoming_requests() {
        let (code, body) = match request.url() {
            "/livez" => (200, "ok"),
            "/readyz" if ready.load(Ordering::SeqCst) => (200, "ready"),
            "/readyz" => (503, "publishing"),
            _ => (404, "not found"),
        };
        let _ = request.respond(tiny_http::Response::from_string(body).with_status_code(code));
    }
}
