//! `kube-zerocopy-agent`: the node agent (see the library). Serves the CSI services on a unix
//! socket until terminated.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kube_zerocopy_agent::csi::{Agent, Service};
use kube_zerocopy_agent::proto::csi::{identity_server::IdentityServer, node_server::NodeServer};
use kube_zerocopy_agent::tenants::Shares;
use kube_zerocopy_agent::{metrics, report, store_memory};
use kube_zerocopy_sidecar::config::NODE_STORE_DRIVER;
use kube_zerocopy_sidecar::networks::SourceNetworks;
use kube_zerocopy_sidecar::source::{DownloadSlots, SourceLimits};
use kube_zerocopy_sidecar::Store;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "kube-zerocopy-agent", version, about)]
struct Cli {
    /// The socket of the CSI services (the registrar tells the kubelet where it is).
    #[arg(long, env = "KZC_CSI_SOCKET", default_value = "/csi/csi.sock")]
    socket: PathBuf,
    /// The CSI driver's name: pods' volumes and the CSIDriver object use it.
    #[arg(long, env = "KZC_CSI_DRIVER", default_value = NODE_STORE_DRIVER)]
    driver: String,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    /// The node's weight store, which only the agent writes.
    #[arg(long, env = "KZC_STORE", default_value = "/kzc/store")]
    store: PathBuf,
    /// Where the store's lock files go (the pod's own memory volume, out of the node's reach);
    /// the store's root when unset.
    #[arg(long, env = "KZC_LOCK_DIR")]
    lock_dir: Option<PathBuf>,
    /// Mount a tmpfs of this size (bytes, or with k, m, g) on the store unless one is
    /// mounted there already (an earlier run's, which keeps its models); none when unset.
    #[arg(long, env = "KZC_STORE_SIZE")]
    store_size: Option<String>,
    /// Where http(s) sources are downloaded before they are laid out.
    #[arg(long, env = "KZC_DOWNLOAD_DIR", default_value_os_t = std::env::temp_dir())]
    download_dir: PathBuf,
    /// A folder of the node whose files volumes may name as `file://` sources (a node-local
    /// model cache); volumes may name no file at all when unset.
    #[arg(long, env = "KZC_FILE_SOURCES")]
    file_sources: Option<PathBuf>,
    /// Internal networks (comma-separated, `10.20.0.0/16,fd00::/8`) that http(s) sources may
    /// be fetched from: loopback, private and link-local addresses are refused otherwise.
    #[arg(long, env = "KZC_SOURCE_NETWORKS", default_value = "", value_parser = SourceNetworks::parse)]
    source_networks: SourceNetworks,
    /// A source that sends fewer bytes a second than this, over a minute, is broken off: a
    /// fetch holds its model's lock, which a trickling source would hold for ever.
    #[arg(long, env = "KZC_MIN_SOURCE_BYTES_PER_SECOND", default_value_t = 65536)]
    min_source_bytes_per_second: u64,
    /// Sources downloaded to the download folder at once at most (from servers without byte
    /// ranges, or fetched whole before room is made): with the store's capacity as the most a
    /// source may have, the folder holds at most that many times the store.
    #[arg(long, env = "KZC_MAX_DOWNLOADS", default_value_t = 2)]
    max_downloads: usize,
    /// Seconds between two checks of every store entry against the agent's layout records.
    #[arg(long, env = "KZC_VERIFY_EVERY", default_value_t = 3600)]
    verify_every: u64,
    /// The share of the store one namespace's mounted volumes may hold, in percent.
    #[arg(long, env = "KZC_NAMESPACE_SHARE_PERCENT", default_value_t = 50)]
    namespace_share_percent: u64,
    /// Publications one namespace may have under way on the node at once.
    #[arg(long, env = "KZC_NAMESPACE_PUBLICATIONS", default_value_t = 4)]
    namespace_publications: usize,
    /// Seconds a model no pod mounts stays in the store before the collection removes it (a
    /// full store makes room at once, from the unused model used least recently).
    #[arg(long, env = "KZC_KEEP_UNUSED", default_value_t = 3600)]
    keep_unused: u64,
    /// The address of /metrics and /livez.
    #[arg(long, env = "KZC_METRICS_LISTEN", default_value = "0.0.0.0:9471")]
    metrics_listen: String,
    /// Write this node's NodeStore and its labels of held models (in a cluster: the agent's
    /// service account; the chart's admission policy confines it to its own node).
    #[arg(long, env = "KZC_REPORT")]
    report: bool,
    /// Seconds between two collections of unused models.
    #[arg(long, env = "KZC_COLLECT_EVERY", default_value_t = 60)]
    collect_every: u64,
}

fn main() {
    kube_zerocopy_runtime::process::init_logs();
    kube_zerocopy_runtime::process::exit_on_error(run(Cli::parse()));
}

/// Checks, every `period`, that every store entry is still what the agent laid out.
fn verify_periodically(agent: Arc<Agent>, period: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        match agent.verify_store() {
            Ok(0) => {}
            Ok(removed) => warn!(
                removed,
                "store entries changed since they were laid out: removed"
            ),
            Err(e) => warn!(error = format!("{e:#}"), "verifying the store"),
        }
    });
}

/// Removes, every `period`, the models that no volume has mounted for `keep_unused`.
fn collect_periodically(agent: Arc<Agent>, period: Duration, keep_unused: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        match agent.store.collect_unused(keep_unused) {
            Ok(removed) if !removed.is_empty() => {
                agent.metrics.evictions.inc_by(removed.len() as u64);
                for digest in &removed {
                    agent.activity.forget(digest);
                }
                info!(?removed, "collected unused models");
            }
            Ok(_) => {}
            Err(e) => warn!(error = format!("{e:#}"), "collecting unused models"),
        }
    });
}

fn run(cli: Cli) -> Result<()> {
    kube_zerocopy_runtime::process::exit_on_terminate()?;
    std::fs::create_dir_all(&cli.store)
        .with_context(|| format!("creating the store {}", cli.store.display()))?;
    if let Some(size) = &cli.store_size {
        store_memory::mount_tmpfs(&cli.store, size)?;
    }
    let mut store = Store::new(&cli.store);
    if let Some(dir) = &cli.lock_dir {
        store = store.with_lock_dir(dir);
    }
    // Downloads a killed agent left behind: the agent is their only writer on this node.
    let removed = kube_zerocopy_sidecar::source::remove_left_downloads(&cli.download_dir)?;
    if removed > 0 {
        tracing::info!(removed, "removed downloads left by an earlier run");
    }
    // A source larger than the whole store could never be laid out: none is fetched.
    let capacity = rustix::fs::statvfs(&cli.store)
        .map(|s| s.f_blocks * s.f_frsize)
        .with_context(|| format!("reading the size of the store {}", cli.store.display()))?;
    let agent = Agent::new(
        cli.driver,
        cli.node_id,
        store,
        cli.download_dir,
        SourceLimits {
            file_root: cli.file_sources,
            networks: Some(Arc::new(cli.source_networks)),
            min_bytes_per_second: Some(cli.min_source_bytes_per_second),
            max_source_bytes: Some(capacity),
            downloads: Some(DownloadSlots::new(cli.max_downloads)),
        },
        Shares {
            store_bytes: capacity / 100 * cli.namespace_share_percent.min(100),
            publications: cli.namespace_publications.max(1),
        },
    );
    metrics::serve(&cli.metrics_listen, agent.metrics.clone())?;
    verify_periodically(agent.clone(), Duration::from_secs(cli.verify_every.max(1)));
    collect_periodically(
        agent.clone(),
        Duration::from_secs(cli.collect_every.max(1)),
        Duration::from_secs(cli.keep_unused),
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // A socket left by an earlier run would refuse the bind.
        let _ = std::fs::remove_file(&cli.socket);
        if let Some(dir) = cli.socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = tokio::net::UnixListener::bind(&cli.socket)
            .with_context(|| format!("listening on {}", cli.socket.display()))?;
        info!(socket = %cli.socket.display(), driver = %agent.driver, "serving");
        // The report never stands in the way of mounting: without a client, none is made.
        if cli.report {
            match kube::Client::try_default().await {
                Ok(client) => {
                    tokio::spawn(report::run(
                        client,
                        agent.node_id.clone(),
                        agent.store.clone(),
                        agent.activity.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "no API client: this node's NodeStore is not written"),
            }
        }
        let service = Service(agent);
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(service.clone()))
            .add_service(NodeServer::new(service))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .context("serving gRPC")
    })
}
