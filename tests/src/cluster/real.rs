//! One real cluster for the real-node tests: the host prepared, the control plane listening on
//! the pods' bridge, one real node with the project's images imported, and the operator
//! installed by its Helm chart as a pod under the chart's ServiceAccount.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use super::host::{Host, GATEWAY};
use super::node::RealNode;
use super::{run_script, ControlPlane, Options};

/// The namespace and release name of the operator, as in the README.
pub const OPERATOR_NAMESPACE: &str = "kube-zerocopy";
pub const RELEASE: &str = "kzc";

/// The archives scripts/images.sh built, by image name.
#[derive(Clone, Debug)]
pub struct Images {
    pub operator: (String, PathBuf),
    pub runtime: (String, PathBuf),
    pub pause: (String, PathBuf),
}

impl Images {
    /// Runs scripts/images.sh (building what changed; its log goes to stderr).
    pub fn build() -> Result<Images> {
        let lines = run_script("images.sh")?;
        let find = |what: &str| -> Result<(String, PathBuf)> {
            lines
                .lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(name, _)| name.contains(&format!("/{what}:")))
                .map(|(name, path)| (name.to_owned(), PathBuf::from(path)))
                .with_context(|| format!("scripts/images.sh printed no {what} image: {lines}"))
        };
        Ok(Images {
            operator: find("operator")?,
            runtime: find("runtime")?,
            pause: find("pause")?,
        })
    }
}

/// Fields drop in order: the node, then the control plane, then the host's changes.
pub struct RealCluster {
    pub node: RealNode,
    pub control_plane: ControlPlane,
    pub images: Images,
    _host: Host,
}

impl RealCluster {
    pub async fn start() -> Result<RealCluster> {
        let images = tokio::task::spawn_blocking(Images::build).await??;
        let bin = tokio::task::spawn_blocking(|| run_script("node.sh"))
            .await??
            .trim()
            .to_owned();
        let bin = PathBuf::from(bin);
        let host = Host::prepare(&bin)?;
        let control_plane = ControlPlane::start_with(Options {
            nodes: 0,
            address: GATEWAY,
            ..Options::default()
        })
        .await?;
        let archives = [&images.operator, &images.runtime, &images.pause].map(|(_, p)| p.clone());
        let node = RealNode::start(&control_plane, &bin, &archives, &images.pause.0).await?;
        Ok(RealCluster {
            node,
            control_plane,
            images,
            _host: host,
        })
    }

    /// Keeps the node's and the control plane's folders (logs) when dropped.
    pub fn keep_files(&mut self) {
        self.node.keep();
        self.control_plane.keep();
    }

    /// `helm install` of the chart with the built images, as the README says; waits until the
    /// operator's pod is ready.
    pub fn install_operator(&self) -> Result<()> {
        let (operator, _) = &self.images.operator;
        let (repository, tag) = operator
            .rsplit_once(':')
            .context("an image name with a tag")?;
        let out = self
            .control_plane
            .helm()
            .args(["install", RELEASE])
            .arg(crate::repo().join("charts/kube-zerocopy"))
            .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
            .args(["--set", &format!("image.repository={repository}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--set", &format!("runtimeImage={}", self.images.runtime.0)])
            .args(["--wait", "--timeout", "3m"])
            .stdin(Stdio::null())
            .output()
            .context("running helm")?;
        if !out.status.success() {
            bail!(
                "helm install: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}
