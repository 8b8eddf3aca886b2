//! One real cluster for the real-node tests: the host prepared, the control plane listening on
//! the pods' bridge, one real node with the project's images imported, and the operator
//! installed by its Helm chart as a pod under the chart's ServiceAccount.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use super::host::{Host, GATEWAY};
use super::node::RealNode;
use super::{run_script, ControlPlane, Options};

/// The namespace and release name of the operator, as in the README.
pub const OPERATOR_NAMESPACE: &str = "kube-zerocopy";
pub const RELEASE: &str = "kzc";

/// The node store's memory on the real node (the chart's nodeStore.capacityMiB): room for the
/// scenarios' models and the replica benchmark's.
pub const NODE_STORE_MIB: u64 = 2048;

/// The archives scripts/images.sh built, by image name.
#[derive(Clone, Debug)]
pub struct Images {
    pub operator: (String, PathBuf),
    pub runtime: (String, PathBuf),
    pub pause: (String, PathBuf),
}

impl Images {
    /// The archives as scripts/images.sh prints them: `NAME PATH` per line.
    pub fn list(&self) -> String {
        [&self.operator, &self.runtime, &self.pause]
            .map(|(name, path)| format!("{name} {}\n", path.display()))
            .concat()
    }

    /// Runs scripts/images.sh (building what changed; its log goes to stderr).
    pub fn build() -> Result<Images> {
        let lines = run_script("images.sh", &[])?;
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
        let bin = tokio::task::spawn_blocking(|| run_script("node.sh", &[]))
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
    /// operator's pod is ready. On failure the error shows the operator's pods and events.
    pub async fn install_operator(&mut self) -> Result<()> {
        self.install_operator_with(&[]).await
    }

    /// The same with more `--set` values.
    pub async fn install_operator_with(&mut self, values: &[&str]) -> Result<()> {
        let mut helm = self.helm_install()?;
        for value in values {
            helm.args(["--set", value]);
        }
        let installed = tokio::task::spawn_blocking(move || {
            let out = helm.output().context("running helm")?;
            if !out.status.success() {
                bail!(
                    "helm install: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        })
        .await?;
        if let Err(e) = installed {
            self.keep_files();
            let client = self.control_plane.client().await?;
            let seen = describe_namespace(&client, OPERATOR_NAMESPACE).await?;
            bail!("{e:#}\n{seen}");
        }
        Ok(())
    }

    /// The `helm install` command (README: "On Kubernetes").
    fn helm_install(&self) -> Result<std::process::Command> {
        let (operator, _) = &self.images.operator;
        let (repository, tag) = operator
            .rsplit_once(':')
            .context("an image name with a tag")?;
        let mut cmd = self.control_plane.helm();
        cmd.args(["install", RELEASE])
            .arg(crate::repo().join("charts/kube-zerocopy"))
            .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
            .args(["--set", &format!("image.repository={repository}")])
            .args(["--set", &format!("image.tag={tag}")])
            .args(["--set", &format!("runtimeImage={}", self.images.runtime.0)])
            .args(["--set", "nodeStore.enabled=true"])
            .args(["--set", &format!("nodeStore.capacityMiB={NODE_STORE_MIB}")])
            // The test's model server, on the pods' gateway (a private address).
            .args(["--set", &format!("nodeStore.sourceNetworks={GATEWAY}/32")])
            .arg("--set")
            .arg(format!(
                "nodeStore.kubeletDir={}",
                self.node.kubelet_dir().display()
            ))
            .arg("--set")
            .arg(format!(
                "nodeStore.hostDir={}",
                self.node.agent_dir().display()
            ))
            .args(["--wait", "--timeout", "3m"])
            .stdin(Stdio::null());
        Ok(cmd)
    }
}

/// The pods of a namespace (phase, each container's state) and its events, for an error.
pub async fn describe_namespace(client: &kube::Client, ns: &str) -> Result<String> {
    use k8s_openapi::api::core::v1::{Event, Pod};
    use kube::api::{Api, ListParams};
    let mut text = String::new();
    for pod in Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        let status = pod.status.unwrap_or_default();
        text += &format!(
            "pod {}: {}\n",
            pod.metadata.name.unwrap_or_default(),
            status.phase.unwrap_or_default()
        );
        let containers = status.init_container_statuses.into_iter().flatten();
        for c in containers.chain(status.container_statuses.into_iter().flatten()) {
            text += &format!(
                "  {}: ready {}, restarts {}, state {}, last {}\n",
                c.name,
                c.ready,
                c.restart_count,
                serde_json::to_string(&c.state).unwrap_or_default(),
                serde_json::to_string(&c.last_state).unwrap_or_default()
            );
        }
    }
    for e in Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        text += &format!(
            "event {} {}: {}\n",
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.message.unwrap_or_default()
        );
    }
    Ok(text)
}

/// Serves the files of `dir` (no subfolders) over http on the pods' bridge address, from a
/// thread, for the life of the process; returns the base URL.
pub fn serve_folder(dir: &Path) -> Result<String> {
    serve_folder_on(GATEWAY, dir)
}

/// [`serve_folder`] on another address of this machine (a port of its own).
pub fn serve_folder_on(address: std::net::Ipv4Addr, dir: &Path) -> Result<String> {
    let server = tiny_http::Server::http((address, 0))
        .map_err(|e| anyhow::anyhow!("starting the model server: {e}"))?;
    let port = server
        .server_addr()
        .to_ip()
        .context("an IP address")?
        .port();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let dir = dir.clone();
            // Each on its own thread: a weight server asks for several ranges at once.
            std::thread::spawn(move || serve_file(request, &dir));
        }
    });
    Ok(format!("http://{address}:{port}"))
}

/// Answers one request for a file of `dir` as file and object servers do: with its
/// Content-Length and a strong ETag, one byte range when asked (206), and 412 when If-Match
/// names another ETag.
fn serve_file(request: tiny_http::Request, dir: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let header = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_owned())
    };
    let name = request.url().trim_start_matches('/').to_owned();
    let file = (!name.contains('/') && !name.contains(".."))
        .then(|| std::fs::File::open(dir.join(&name)).ok())
        .flatten();
    let Some((mut file, meta)) = file.and_then(|f| {
        let meta = f.metadata().ok()?;
        Some((f, meta))
    }) else {
        let _ = request.respond(tiny_http::Response::from_string("no").with_status_code(404));
        return;
    };
    let len = meta.len();
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let etag = format!("\"{len:x}-{:x}\"", modified.as_nanos());
    let h = |name: &str, value: &str| tiny_http::Header::from_bytes(name, value).unwrap();
    let mut headers = vec![h("ETag", &etag), h("Accept-Ranges", "bytes")];
    let range = header("Range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let start: u64 = a.parse().ok()?;
        let end: u64 = if b.is_empty() {
            len
        } else {
            b.parse::<u64>().ok()? + 1
        };
        (start < end && end <= len).then_some((start, end))
    });
    if range.is_some() && header("If-Match").is_some_and(|m| m != etag) {
        let _ = request.respond(tiny_http::Response::empty(412));
        return;
    }
    let (status, start, end) = match range {
        Some((start, end)) => {
            headers.push(h(
                "Content-Range",
                &format!("bytes {start}-{}/{len}", end - 1),
            ));
            (206, start, end)
        }
        None => (200, 0, len),
    };
    if file.seek(SeekFrom::Start(start)).is_err() {
        return;
    }
    let body = file.take(end - start);
    // With its Content-Length, as file servers send it (tiny_http would chunk large files).
    let response = tiny_http::Response::new(
        tiny_http::StatusCode(status),
        headers,
        body,
        Some((end - start) as usize),
        None,
    )
    .with_chunked_threshold(usize::MAX);
    let _ = request.respond(response);
}
