//! `kube-zerocopy-weight-server`: the weight server. It runs as a native sidecar: it publishes every
//! model of `KZC_MODELS` into the shared store, binds them for this pod, then stays up serving
//! its readiness endpoint until the pod ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, FromArgMatches};
use clap::{Parser, Subcommand};
use kube_zerocopy_contract::pod;
use kube_zerocopy_fetch::publish::Publisher;
use kube_zerocopy_store::{Bindings, Store};
use tracing::{info, warn};

#[derive(Parser)]
#[command(name = "kube-zerocopy-weight-server", version, about)]
struct Cli {
    #[command(flatten)]
    pod: pod::PodModels,
    #[command(flatten)]
    weight_server: pod::WeightServer,
    #[command(flatten)]
    upkeep: pod::StoreUpkeep,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Publish every model, then serve readiness until terminated (the default).
    Serve {
        #[command(flatten)]
        serve: pod::Serve,
    },
    /// Publish every model and exit.
    Publish,
    /// Exit 0 only when every model is published and bound (the startup probe).
    Probe,
    /// Remove the models that no sidecar holds and none used for --keep-unused seconds.
    Gc,
}

fn main() {
    kube_zerocopy_runtime::process::init_logs();
    kube_zerocopy_runtime::process::exit_on_error(
        run(kube_zerocopy_runtime::process::parse_args()),
    );
}

fn run(cli: Cli) -> Result<()> {
    let keep_unused = Duration::from_secs(cli.upkeep.keep_unused);
    let publisher = Publisher {
        store: Store::new(&cli.pod.store)
            .with_lock_timeout(Duration::from_secs(cli.upkeep.lock_timeout)),
        bindings: Bindings::new(&cli.pod.bindings),
        download_dir: cli.weight_server.download_dir,
        limits: Default::default(),
        observer: None,
    };
    let command = match cli.command {
        Some(command) => command,
        None => Command::Serve {
            serve: pod::Serve::from_arg_matches(
                &pod::Serve::augment_args(clap::Command::new("serve")).get_matches_from(["serve"]),
            )?,
        },
    };
    let models = || cli.pod.models();
    match command {
        Command::Probe => publisher.check_ready(models()?),
        Command::Publish => publisher.publish_all(models()?).map(|_| ()),
        Command::Gc => {
            let removed = publisher.store.collect_unused(keep_unused)?;
            info!(?removed, "collected unused models");
            Ok(())
        }
        Command::Serve {
            serve: pod::Serve { listen },
        } => {
            kube_zerocopy_runtime::process::exit_on_terminate()?;
            let ready = Arc::new(AtomicBool::new(false));
            let flag = ready.clone();
            kube_zerocopy_runtime::process::serve_endpoints(&listen, move |path| {
                let (code, body) = match path {
                    "/livez" => (200, "ok"),
                    "/readyz" if flag.load(Ordering::SeqCst) => (200, "ready"),
                    "/readyz" => (503, "publishing"),
                    _ => (404, "not found"),
                };
                (code, body.to_owned())
            })?;
            let holds = publisher.publish_all(models()?)?;
            ready.store(true, Ordering::SeqCst);
            // Stay up as the pod's sidecar, holding its models, until Kubernetes ends it with
            // the pod; meanwhile keep a node's store free of models no pod uses any more.
            loop {
                match publisher.store.collect_unused(keep_unused) {
                    Ok(removed) if !removed.is_empty() => info!(?removed, "removed unused models"),
                    Ok(_) => {}
                    Err(e) => warn!(error = format!("{e:#}"), "collecting unused models"),
                }
                std::thread::sleep(Duration::from_secs(cli.upkeep.collect_every.max(1)));
                for hold in &holds {
                    if let Err(e) = hold.refresh() {
                        warn!(error = format!("{e:#}"), "marking a model as used");
                    }
                }
            }
        }
    }
}
