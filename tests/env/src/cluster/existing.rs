//! A cluster someone else runs (kind, k3d, a cloud's), named by a kubeconfig. The operator's
//! scenarios run there as they do on the control plane built here: kwok, a process on this
//! machine, plays the kubelet of two fake Nodes, on which the scenarios' pods land.
//!
//! The cluster must be fresh (no earlier run's namespaces) and its own Nodes must not take the
//! scenarios' pods: cordon them (`kubectl cordon kind-control-plane`). Both are checked first,
//! with what to do in the error. What such a cluster cannot give, the scenarios that need it
//! skip: this harness cannot stop its API server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::config::Kubeconfig;
use kube::Client;

use super::process::{Process, Spawner};
use super::{bin_dir, client_of, free_port, helm_command, kwok, tail, KEEP_ENV};

/// Names the kubeconfig of a cluster to run the scenarios on, instead of the one built here.
pub const KUBECONFIG_ENV: &str = "KZC_TEST_KUBECONFIG";
/// How long kwok's Nodes may take to be Ready.
const NODES_TIMEOUT: Duration = Duration::from_secs(90);

/// A cluster of someone else's with kwok's fake Nodes; kwok is killed on drop.
pub struct ExistingCluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    nodes: Vec<String>,
    kwok: Option<Process>,
    spawner: Spawner,
    keep: bool,
}

impl ExistingCluster {
    /// Checks that `kubeconfig`'s cluster can take the scenarios, starts kwok there and
    /// returns once its `nodes` fake Nodes are Ready.
    pub async fn connect(kubeconfig: &Path, nodes: usize) -> Result<ExistingCluster> {
        let bin = tokio::task::spawn_blocking(bin_dir).await??;
        let dir = tempfile::Builder::new()
            .prefix("kzc-existing-cluster-")
            .tempdir()
            .context("creating the test cluster's folder")?;
        let path = dir.path().to_owned();
        write_current_context(kubeconfig, &path.join("kubeconfig"))?;
        let mut cluster = ExistingCluster {
            dir: Some(dir),
            path,
            bin,
            nodes: kwok::node_names(nodes),
            kwok: None,
            spawner: Spawner::new()?,
            keep: false,
        };
        let client = cluster.client().await?;
        refuse_nodes_that_take_pods(&client).await?;
        let port = free_port()?;
        let stages = crate::repo().join("tests/cluster/kwok-stages.yaml");
        let command = kwok::command(
            &cluster.bin,
            &cluster.kubeconfig_path(),
            &stages,
            port,
            &cluster.path,
        );
        let log = cluster.path.join("kwok.log");
        cluster.kwok = Some(cluster.spawner.spawn_logged("kwok", command, &log, false)?);
        kwok::create_nodes(&client, &cluster.nodes).await?;
        let began = Instant::now();
        while !kwok::nodes_ready(&client, &cluster.nodes).await? {
            if let Some(kwok) = cluster.kwok.as_mut() {
                kwok.check_alive()?;
            }
            if began.elapsed() > NODES_TIMEOUT {
                bail!(
                    "kwok's Nodes were not Ready after {NODES_TIMEOUT:?}; its log {}:\n{}",
                    log.display(),
                    tail(&log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    /// The folder of this run: the kubeconfig of the cluster's current context, logs.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The kubeconfig given, cut to its current context.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.path.join("kubeconfig")
    }

    /// kwok's fake Nodes, where the scenarios' pods land.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.clone()
    }

    pub async fn client(&self) -> Result<Client> {
        client_of(&self.kubeconfig_path()).await
    }

    pub fn helm(&self) -> std::process::Command {
        helm_command(&self.bin, &self.kubeconfig_path(), &self.path)
    }

    /// Keeps the folder (logs) when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for ExistingCluster {
    fn drop(&mut self) {
        if let Some(kwok) = self.kwok.take() {
            kwok.kill();
        }
        let keep = self.keep || std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some();
        if let (true, Some(dir)) = (keep, self.dir.take()) {
            eprintln!(
                "test cluster files and logs kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// Writes `from`'s current context alone (its cluster and user) to `to`: the scenarios copy the
/// server and its CA from the first cluster of the file, as they do from the one built here.
fn write_current_context(from: &Path, to: &Path) -> Result<()> {
    let config = Kubeconfig::read_from(from)
        .with_context(|| format!("reading the kubeconfig {}", from.display()))?;
    let Some(current) = config.current_context.clone() else {
        bail!(
            "{} names no current-context: set one (kubectl config use-context)",
            from.display()
        );
    };
    let context = config
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.clone())
        .with_context(|| format!("{} has no context {current}", from.display()))?;
    let cut = Kubeconfig {
        clusters: config
            .clusters
            .into_iter()
            .filter(|c| c.name == context.cluster)
            .collect(),
        auth_infos: config
            .auth_infos
            .into_iter()
            .filter(|u| Some(&u.name) == context.user.as_ref())
            .collect(),
        contexts: config
            .contexts
            .into_iter()
            .filter(|c| c.name == current)
            .collect(),
        current_context: Some(current),
        ..Default::default()
    };
    std::fs::write(to, serde_yaml::to_string(&cut)?)?;
    Ok(())
}

/// Fails when a Node kwok does not play would take the scenarios' pods: they would run there
/// for real, from images the cluster does not hold.
async fn refuse_nodes_that_take_pods(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .context("listing the cluster's Nodes")?;
    let taking: Vec<String> = nodes
        .items
        .iter()
        .filter(|n| !kwok::is_fake(n) && takes_pods(n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    if !taking.is_empty() {
        bail!(
            "the cluster's Nodes {taking:?} would run the scenarios' pods (kwok's fake Nodes \
             must take them all): cordon them first (kubectl cordon {})",
            taking.join(" ")
        );
    }
    Ok(())
}

/// Whether the scheduler may place an ordinary pod on the Node.
fn takes_pods(node: &Node) -> bool {
    let Some(spec) = &node.spec else { return true };
    let blocked = spec.unschedulable == Some(true)
        || spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
    !blocked
}
