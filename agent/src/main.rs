//! `kube-zerocopy-agent`: the node agent (see the library). Serves the CSI services on a unix
//! socket until terminated.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use kube_zerocopy_agent::csi::{Agent, Service};
use kube_zerocopy_agent::proto::csi::{identity_server::IdentityServer, node_server::NodeServer};
use kube_zerocopy_agent::tenants::Shares;
use kube_zerocopy_agent::{metrics, report, store_memory};
use kube_zerocopy_contract::settings::NodeAgent;
use kube_zerocopy_fetch::networks::SourceNetworks;
use kube_zerocopy_fetch::source::{DownloadSlots, SourceLimits};
use kube_zerocopy_fetch::Store;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "kube-zerocopy-agent", version, about)]
struct Cli {
    #[command(flatten)]
    settings: NodeAgent,
}

fn main() {
    kube_zerocopy_runtime::process::init_logs();
    let cli: Cli = kube_zerocopy_runtime::process::parse_args();
    kube_zerocopy_runtime::process::exit_on_error(run(cli.settings));
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

fn run(cli: NodeAgent) -> Result<()> {
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
    // What a killed agent left behind: it is their only writer on this node.
    kube_zerocopy_agent::volume_secret::VolumeSecret::remove_left(store.private_root())
        .context("removing the volumes' Secrets an earlier run left")?;
    let removed = kube_zerocopy_fetch::source::remove_left_downloads(&cli.download_dir)?;
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
            networks: Some(Arc::new(
                SourceNetworks::parse(&cli.source_networks)
                    .context("the source networks (nodeStore.sourceNetworks)")?,
            )),
            min_bytes_per_second: Some(cli.min_source_bytes_per_second),
            max_source_bytes: Some(capacity),
            downloads: Some(DownloadSlots::new(cli.max_downloads)),
        },
        Shares {
            store_bytes: capacity / 100 * cli.namespace_share_percent.min(100),
            publications: cli.namespace_publications.max(1),
            node_publications: cli.max_publications.max(1),
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
