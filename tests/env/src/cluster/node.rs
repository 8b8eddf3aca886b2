//! A real node joined to the test control plane: containerd 2 with runc and the CNI bridge,
//! the kubelet and kube-proxy of the control plane's release (scripts/node.sh builds them).
//! Images are imported from OCI archives into containerd: nothing is pulled. The node's
//! InternalIP is the pods' bridge address ([`host::GATEWAY`]), where kube-apiserver listens
//! too; kube-proxy (nftables mode) gives pods the "kubernetes" Service and the host every
//! Service's ClusterIP.
//!
//! Everything lives in a temporary folder (`kzc-real-node-*`): containerd's root and state,
//! kubelet's root, certificates, configuration and one log per component. Dropping the node
//! stops the components, kills the containers and unmounts what they mounted; [`host::Host`]
//! undoes the rest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::Client;

use super::certs::kubeconfig;
use super::host::{self, GATEWAY, NODE_DIR_PREFIX, POD_SUBNET};
use super::process::{Process, Spawner};
use super::{flag, free_port, ControlPlane, KEEP_ENV, POD_CIDR};
use crate::wait::eventually_seen;

/// The node's name (and its kubelet's client certificate's user, system:node:<name>).
pub const NODE_NAME: &str = "kzc-node";

pub struct RealNode {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    processes: Vec<Process>,
    keep: bool,
}

impl RealNode {
    /// Starts containerd, imports `images` (OCI archives), starts kubelet and kube-proxy with
    /// client certificates from the control plane's CA, and waits until the Node is Ready.
    /// `sandbox_image` is the pause image among them (containerd pins it).
    pub async fn start(
        control_plane: &ControlPlane,
        bin: &Path,
        images: &[PathBuf],
        sandbox_image: &str,
    ) -> Result<RealNode> {
        let dir = tempfile::Builder::new()
            .prefix(NODE_DIR_PREFIX)
            .tempdir()
            .context("creating the node's folder")?;
        let mut node = RealNode {
            path: dir.path().to_owned(),
            dir: Some(dir),
            bin: bin.to_owned(),
            processes: Vec::new(),
            keep: false,
        };
        if let Err(e) = node.boot(control_plane, images, sandbox_image).await {
            node.keep = true;
            return Err(e.context(format!(
                "starting the real node (its files and logs: {})",
                node.path.display()
            )));
        }
        Ok(node)
    }

    async fn boot(
        &mut self,
        control_plane: &ControlPlane,
        images: &[PathBuf],
        sandbox_image: &str,
    ) -> Result<()> {
        let pki = control_plane.pki();
        pki.issue_client(
            "node",
            &format!("/O=system:nodes/CN=system:node:{NODE_NAME}"),
        )?;
        // kube-proxy's user has the built-in ClusterRole system:node-proxier.
        pki.issue_client("kube-proxy", "/CN=system:kube-proxy")?;
        let server = control_plane.apiserver_url();
        std::fs::write(
            self.file("kubelet.kubeconfig"),
            kubeconfig(&pki, &server, "node"),
        )?;
        std::fs::write(
            self.file("kube-proxy.kubeconfig"),
            kubeconfig(&pki, &server, "kube-proxy"),
        )?;

        // The node agent mounts into the kubelet's pod folders and its own folder from inside
        // its container (Bidirectional propagation), which runc allows only on a shared
        // mount, as / is on a systemd host; this machine's / is private.
        let folder = self.path.to_string_lossy().into_owned();
        host::run("mount", &["--bind", &folder, &folder])?;
        host::run("mount", &["--make-rshared", &folder])?;
        self.write_containerd_config(sandbox_image)?;
        self.write_cni_config()?;
        let containerd = self.spawn(
            control_plane.spawner(),
            "containerd",
            self.containerd_command(),
        )?;
        self.processes.push(containerd);
        let socket = self.containerd_socket();
        eventually_seen("containerd's socket", Duration::from_secs(60), || {
            let found = socket.exists().then_some(());
            async move { Ok((found, "no socket yet".into())) }
        })
        .await?;
        for image in images {
            self.import(image)?;
        }

        let kubelet_port = free_port()?;
        self.write_kubelet_config(&pki.path("ca.crt"), kubelet_port)?;
        let kubelet = self.spawn(control_plane.spawner(), "kubelet", self.kubelet_command())?;
        self.processes.push(kubelet);
        let client = control_plane.client().await?;
        self.wait_ready(&client).await?;

        self.write_kube_proxy_config()?;
        let proxy = self.spawn(
            control_plane.spawner(),
            "kube-proxy",
            self.kube_proxy_command(),
        )?;
        self.processes.push(proxy);
        Ok(())
    }

    /// The folder: logs are `<component>.log`.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn log_path(&self, component: &str) -> PathBuf {
        self.file(&format!("{component}.log"))
    }

    /// The kubelet's root folder (its --root-dir).
    pub fn kubelet_dir(&self) -> PathBuf {
        self.file("kubelet")
    }

    /// The node agent's folder (the chart's nodeStore.hostDir): its store is `store/`.
    pub fn agent_dir(&self) -> PathBuf {
        self.file("kube-zerocopy")
    }

    /// `ctr` on this node's containerd, in the Kubernetes namespace.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// Fails with a component's log when one has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.processes {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Keeps the folder (logs) when the node is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn containerd_socket(&self) -> PathBuf {
        self.file("containerd/containerd.sock")
    }

    fn spawn(&self, spawner: &Spawner, name: &'static str, cmd: Command) -> Result<Process> {
        spawner.spawn_logged(name, cmd, &self.log_path(name), false)
    }

    fn import(&self, archive: &Path) -> Result<()> {
        let out = self
            .ctr()
            .args(["images", "import"])
            .arg(archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "importing {} into containerd: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn write_containerd_config(&self, sandbox_image: &str) -> Result<()> {
        let d = |sub: &str| self.file(sub).display().to_string();
        let runc = which("runc")?;
        let text = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
# NRI would create /var/run/nri; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # Nothing can be pulled: the sandbox image is one of the imported images.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"

[plugins."io.containerd.cri.v1.runtime"]
  # The VM's capability bounding set lacks CAP_SYS_RESOURCE: runc cannot lower
  # oom_score_adj, and without this every sandbox fails to start.
  restrict_oom_score_adj = true
  # Network namespaces under the node's folder, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "{runc}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
"#,
            root = d("containerd/root"),
            state = d("containerd/state"),
            socket = d("containerd/containerd.sock"),
            opt = d("containerd/opt"),
            runc = runc.display(),
            cni_bin = self.bin.display(),
            cni_conf = d("cni/net.d"),
        );
        std::fs::create_dir_all(self.file("containerd"))?;
        std::fs::write(self.file("containerd/config.toml"), text)?;
        Ok(())
    }

    /// A bridge network on [`host::BRIDGE`], which the host prepared with the gateway address.
    /// No masquerading and no portmap: both need iptables rules, and all traffic stays on
    /// this machine.
    fn write_cni_config(&self) -> Result<()> {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "kzc",
            "plugins": [{
                "type": "bridge",
                "bridge": host::BRIDGE,
                "isGateway": true,
                // The pods' default route: Services (10.96.0.0/12) are reached through it.
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_SUBNET, "gateway": GATEWAY.to_string() }]],
                    "dataDir": self.file("cni/ipam"),
                },
            }],
        });
        std::fs::create_dir_all(self.file("cni/net.d"))?;
        std::fs::write(
            self.file("cni/net.d/10-kzc.conflist"),
            serde_json::to_string_pretty(&conf)?,
        )?;
        Ok(())
    }

    fn containerd_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("containerd"));
        cmd.arg("--config")
            .arg(self.file("containerd/config.toml"))
            // containerd finds its shim on PATH.
            .env("PATH", path_with(&self.bin));
        cmd
    }

    fn write_kubelet_config(&self, ca: &Path, port: u16) -> Result<()> {
        let endpoint = format!("unix://{}", self.containerd_socket().display());
        let text = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# These VMs have cgroup v1 (kubelet 1.35+ refuses it unless told).
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
address: "{GATEWAY}"
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
containerRuntimeEndpoint: "{endpoint}"
imageServiceEndpoint: "{endpoint}"
podLogsDir: "{logs}"
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# Imported images cannot be pulled again: never collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
serializeImagePulls: false
"#,
            logs = self.file("pod-logs").display(),
            ca = ca.display(),
        );
        std::fs::write(self.file("kubelet.yaml"), text)?;
        Ok(())
    }

    fn kubelet_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubelet"));
        cmd.arg(flag("config", self.file("kubelet.yaml")))
            .arg(flag("kubeconfig", self.file("kubelet.kubeconfig")))
            .arg(flag("root-dir", self.kubelet_dir()))
            .arg(flag("cert-dir", self.file("kubelet-pki")))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={GATEWAY}"))
            .arg("--v=1")
            .env("PATH", path_with(&self.bin));
        cmd
    }

    fn write_kube_proxy_config(&self) -> Result<()> {
        let text = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {{kubeconfig: "{kubeconfig}"}}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
# NodePorts only on the bridge address, not on the machine's own interfaces.
nodePortAddresses: ["{GATEWAY}/32"]
# Zero: leave the host's conntrack settings as they are.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
            kubeconfig = self.file("kube-proxy.kubeconfig").display(),
            healthz = free_port()?,
            metrics = free_port()?,
        );
        std::fs::write(self.file("kube-proxy.yaml"), text)?;
        Ok(())
    }

    fn kube_proxy_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kube-proxy"));
        cmd.arg(flag("config", self.file("kube-proxy.yaml")))
            .arg("--v=1");
        cmd
    }

    async fn wait_ready(&mut self, client: &Client) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let kubelet_log = self.log_path("kubelet");
        let result = eventually_seen(
            "the real node to be Ready",
            Duration::from_secs(120),
            || {
                let nodes = nodes.clone();
                async move {
                    let Some(node) = nodes.get_opt(NODE_NAME).await? else {
                        return Ok((None, "not registered".into()));
                    };
                    let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                    let ready = conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()));
                    Ok(match ready {
                        Some((s, _)) if s == "True" => (Some(()), String::new()),
                        Some((s, m)) => (None, format!("Ready={s}: {m}")),
                        None => (None, "no Ready condition".into()),
                    })
                }
            },
        )
        .await;
        if let Err(e) = result {
            self.check_alive()?;
            bail!(
                "{e:#}; kubelet's log {}:\n{}",
                kubelet_log.display(),
                super::tail(&kubelet_log, 30)
            );
        }
        Ok(())
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        // kubelet first, so that it restarts nothing; then the containers and their shims.
        for p in self.processes.drain(..).rev() {
            p.kill();
        }
        host::kill_pods();
        host::kill_started_from(&self.bin);
        // Unmount before removing: a hostPath volume is a bind mount of a host folder.
        host::unmount_node_folders();
        let keep = self.keep || std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some();
        if let Some(dir) = self.dir.take() {
            if keep {
                eprintln!("real node files and logs kept in {}", dir.keep().display());
            }
        }
    }
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{program} is not installed (scripts/host-packages.sh installs it)")
        })
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_owned()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    paths.extend(["/usr/sbin".into(), "/sbin".into()]);
    std::env::join_paths(paths).expect("no ':' in the bin folder")
}
