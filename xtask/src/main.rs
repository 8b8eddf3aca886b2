//! `cargo xtask`: the developer tasks that are more than one command.
//!
//! `cargo xtask cluster` runs the test control plane built from source (etcd, kube-apiserver,
//! the controller-manager, the scheduler, and kwok's fake Nodes) until Ctrl-C, and writes its
//! admin kubeconfig where asked: for kubectl, helm, or the operator's scenarios through
//! `KZC_TEST_KUBECONFIG`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube_zerocopy_test_env::cluster::{ControlPlane, Options};

#[derive(Parser)]
#[command(about = "kube-zerocopy's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Runs a control plane built from source here until Ctrl-C.
    Cluster {
        /// Where to write the admin kubeconfig.
        #[arg(long, default_value = "target/xtask-cluster.kubeconfig")]
        kubeconfig: PathBuf,
        /// How many fake Nodes kwok plays (0 for none, as a stand-in for someone else's
        /// cluster that the scenarios bring their own kwok to).
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Cluster { kubeconfig, nodes } => cluster(&kubeconfig, nodes).await,
    }
}

async fn cluster(kubeconfig: &std::path::Path, nodes: usize) -> Result<()> {
    let control_plane = ControlPlane::start_with(Options {
        nodes,
        ..Default::default()
    })
    .await?;
    if let Some(dir) = kubeconfig.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(control_plane.kubeconfig_path(), kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    println!(
        "a control plane with {nodes} fake Nodes is up (started in {:.0?}); its kubeconfig: {}\n\
         its logs: {}\n\
         Ctrl-C stops it",
        control_plane.startup_time(),
        kubeconfig.display(),
        control_plane.dir().display()
    );
    tokio::signal::ctrl_c().await?;
    drop(control_plane);
    let _ = std::fs::remove_file(kubeconfig);
    Ok(())
}
