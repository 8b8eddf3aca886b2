//! The cluster the operator's scenarios run against, behind one interface: the control plane
//! built here from source (the default), or a cluster of someone else's named by
//! `KZC_TEST_KUBECONFIG` (kind, k3d: as linkerd2's policy tests run). Both give kwok's two fake
//! Nodes; only the first lets a scenario stop its API server.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use kube::Client;

use super::existing::KUBECONFIG_ENV;
use super::{ControlPlane, ExistingCluster};

/// How many fake Nodes the scenarios get.
const NODES: usize = 2;

/// See the module's documentation.
pub enum TestCluster {
    /// etcd, kube-apiserver, the controller-manager, the scheduler and kwok, run here.
    FromSource(ControlPlane),
    /// A cluster named by a kubeconfig, with kwok run here beside it.
    Existing(ExistingCluster),
}

impl TestCluster {
    /// The cluster `KZC_TEST_KUBECONFIG` names, or else a control plane built here.
    pub async fn start() -> Result<TestCluster> {
        match std::env::var_os(KUBECONFIG_ENV) {
            Some(kubeconfig) => Ok(TestCluster::Existing(
                ExistingCluster::connect(Path::new(&kubeconfig), NODES).await?,
            )),
            None => Ok(TestCluster::FromSource(ControlPlane::start().await?)),
        }
    }

    /// An admin's kubeconfig.
    pub fn kubeconfig_path(&self) -> PathBuf {
        match self {
            TestCluster::FromSource(cp) => cp.kubeconfig_path(),
            TestCluster::Existing(cluster) => cluster.kubeconfig_path(),
        }
    }

    /// This run's folder, where the logs go.
    pub fn dir(&self) -> &Path {
        match self {
            TestCluster::FromSource(cp) => cp.dir(),
            TestCluster::Existing(cluster) => cluster.dir(),
        }
    }

    /// kwok's fake Nodes.
    pub fn node_names(&self) -> Vec<String> {
        match self {
            TestCluster::FromSource(cp) => cp.node_names(),
            TestCluster::Existing(cluster) => cluster.node_names(),
        }
    }

    /// An admin client.
    pub async fn client(&self) -> Result<Client> {
        match self {
            TestCluster::FromSource(cp) => cp.client().await,
            TestCluster::Existing(cluster) => cluster.client().await,
        }
    }

    /// `helm` on this cluster, with its files in this run's folder.
    pub fn helm(&self) -> Command {
        match self {
            TestCluster::FromSource(cp) => cp.helm(),
            TestCluster::Existing(cluster) => cluster.helm(),
        }
    }

    /// Keeps this run's folder (logs) when dropped.
    pub fn keep(&mut self) {
        match self {
            TestCluster::FromSource(cp) => cp.keep(),
            TestCluster::Existing(cluster) => cluster.keep(),
        }
    }

    /// The control plane, where this harness runs the API server and may stop it.
    pub fn control_plane(&mut self) -> Option<&mut ControlPlane> {
        match self {
            TestCluster::FromSource(cp) => Some(cp),
            TestCluster::Existing(_) => None,
        }
    }

    /// Whether a scenario may stop and start the API server.
    pub fn can_stop_api_server(&self) -> bool {
        matches!(self, TestCluster::FromSource(_))
    }
}
