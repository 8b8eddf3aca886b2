//! A real Kubernetes control plane for the end-to-end tests, on 127.0.0.1 only (or a real
//! node's bridge address): etcd, kube-apiserver, kube-controller-manager and kube-scheduler
//! built from the official Go modules by scripts/control-plane.sh, and kwok, which plays the
//! kubelet of fake Nodes so that pods get scheduled, go Running, and (Job pods) Succeeded; no
//! container runs there. [`node::RealNode`] joins a real kubelet with containerd instead.
//!
//! Everything lives in a temporary folder: certificates (made with `openssl`), etcd's data, the
//! admin kubeconfig and one log file per component (stdout and stderr). Every process is killed
//! when the [`ControlPlane`] is dropped, and also if the test process dies (PR_SET_PDEATHSIG).
//! The folder is removed on drop, unless a step failed, the test panicked or `KZC_KEEP_CLUSTER`
//! is set: then its path is printed and it stays for the logs.
//!
//! `KZC_CONTROL_PLANE_BIN` names a folder with the binaries instead of running the script.

pub mod certs;
pub mod existing;
pub mod host;
pub mod kwok;
pub mod node;
pub mod process;
pub mod real;
mod test_cluster;

use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use certs::{Pki, SERVICE_CIDR};
pub use existing::ExistingCluster;
pub use kwok::POD_CIDR;
pub use process::tail;
use process::{terminate, Process, Spawner};
pub use test_cluster::TestCluster;

/// Names a folder holding the binaries; scripts/control-plane.sh is not run then.
pub const BIN_ENV: &str = "KZC_CONTROL_PLANE_BIN";
/// Keeps the temporary folder (logs, kubeconfig) after the control plane is dropped.
pub const KEEP_ENV: &str = "KZC_KEEP_CLUSTER";

const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many fake Nodes, named kwok-node-0, kwok-node-1, ...
    pub nodes: usize,
    /// kwok's stages (one multi-document YAML file).
    pub stages: PathBuf,
    /// Where kube-apiserver listens and what it advertises: 127.0.0.1, or for a real node an
    /// address its pods reach (the node's bridge), so that the "kubernetes" Service works.
    pub address: Ipv4Addr,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 2,
            stages: crate::repo().join("tests/cluster/kwok-stages.yaml"),
            address: Ipv4Addr::LOCALHOST,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
    kwok: u16,
}

/// The control plane; see the module's documentation.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bin: PathBuf,
    ports: Ports,
    options: Options,
    spawner: Spawner,
    processes: Vec<Process>,
    apiserver: Option<Process>,
    keep: bool,
    startup: Duration,
}

impl ControlPlane {
    /// Starts a control plane with two fake Nodes; returns once they are Ready and the
    /// controllers run.
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<ControlPlane> {
        let began = Instant::now();
        // The first run builds the binaries (many minutes): off the async workers.
        let bin = tokio::task::spawn_blocking(bin_dir).await??;
        let dir = tempfile::Builder::new()
            .prefix("kzc-control-plane-")
            .tempdir()
            .context("creating the control plane's folder")?;
        let path = dir.path().to_owned();
        let ports = Ports {
            etcd_client: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
            kwok: free_port()?,
        };
        let mut cp = ControlPlane {
            dir: Some(dir),
            path,
            bin,
            ports,
            options,
            spawner: Spawner::new()?,
            processes: Vec::new(),
            apiserver: None,
            keep: false,
            startup: Duration::ZERO,
        };
        if let Err(e) = cp.boot().await {
            cp.keep = true;
            return Err(e.context(format!(
                "starting the control plane (its files and logs: {})",
                cp.path.display()
            )));
        }
        cp.startup = began.elapsed();
        Ok(cp)
    }

    async fn boot(&mut self) -> Result<()> {
        self.make_certificates()?;
        self.write_kubeconfig()?;

        let etcd = self.spawn("etcd", self.etcd_command(), false)?;
        self.processes.push(etcd);
        self.wait_for_port("etcd", self.ports.etcd_client).await?;

        self.start_apiserver().await?;

        let kcm = self.spawn(
            "kube-controller-manager",
            self.controller_manager_command(),
            false,
        )?;
        self.processes.push(kcm);
        let sched = self.spawn("kube-scheduler", self.scheduler_command(), false)?;
        self.processes.push(sched);
        let mut waits = vec![
            ("kube-controller-manager", self.ports.controller_manager),
            ("kube-scheduler", self.ports.scheduler),
        ];
        if self.options.nodes > 0 {
            let kwok = self.spawn("kwok", self.kwok_command(), false)?;
            self.processes.push(kwok);
            waits.push(("kwok", self.ports.kwok));
        }
        for (name, port) in waits {
            self.wait_for_port(name, port).await?;
        }

        let client = self.client().await?;
        if self.options.nodes > 0 {
            kwok::create_nodes(&client, &self.node_names()).await?;
            self.wait_for_nodes(&client).await?;
        }
        // The service-account controller has run: pods can be admitted in new namespaces.
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        self.wait_until(
            "kube-controller-manager",
            "the default ServiceAccount",
            || {
                let accounts = accounts.clone();
                async move { Ok(accounts.get_opt("default").await?.is_some()) }
            },
        )
        .await
    }

    /// The folder with kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok, helm.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The temporary folder: certificates, etcd's data, kubeconfig, logs (`<component>.log`).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A component's log file (stdout and stderr), e.g. `log_path("kube-apiserver")`.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.path.join(format!("{component}.log"))
    }

    /// The admin kubeconfig (client certificate in group system:masters).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.path.join("kubeconfig")
    }

    /// https://<address>:<port>
    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{}", self.options.address, self.ports.apiserver)
    }

    /// The certificates; a real node issues its own client certificates from them.
    pub fn pki(&self) -> Pki {
        Pki::open(&self.path)
    }

    /// The thread that starts the components: a real node's components started from it also
    /// die with the test process.
    pub fn spawner(&self) -> &Spawner {
        &self.spawner
    }

    /// Keeps the folder (logs) when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// How long `start` took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The fake Nodes' names.
    pub fn node_names(&self) -> Vec<String> {
        kwok::node_names(self.options.nodes)
    }

    /// An admin client, from the kubeconfig.
    pub async fn client(&self) -> Result<Client> {
        client_of(&self.kubeconfig_path()).await
    }

    /// `helm` on this cluster; see [`helm_command`].
    pub fn helm(&self) -> Command {
        helm_command(&self.bin, &self.kubeconfig_path(), &self.path)
    }

    /// Whether the apiserver process runs.
    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// Stops kube-apiserver: SIGTERM (it stops listening at once), then SIGKILL after 3 s,
    /// since its graceful shutdown can otherwise wait a minute for watch connections. The
    /// other components keep running and retry.
    pub async fn stop_apiserver(&mut self) -> Result<()> {
        if let Some(p) = self.apiserver.take() {
            terminate(p, Duration::from_secs(3)).await?;
        }
        Ok(())
    }

    /// Starts kube-apiserver (again, on the same port and storage) and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let p = self.spawn("kube-apiserver", self.apiserver_command(), true)?;
        self.apiserver = Some(p);
        let client = self.client().await?;
        self.wait_until("kube-apiserver", "/readyz", || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client.request_text(req).await.is_ok_and(|t| t == "ok"))
            }
        })
        .await
    }

    // ---- commands ----

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn etcd_command(&self) -> Command {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer);
        let mut cmd = Command::new(self.bin.join("etcd"));
        cmd.arg("--name=default")
            .arg(flag("data-dir", self.file("etcd")))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--unsafe-no-fsync=true")
            .arg("--log-level=warn");
        cmd
    }

    fn apiserver_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kube-apiserver"));
        let address = self.options.address;
        cmd.arg(format!("--advertise-address={address}"))
            .arg(format!("--bind-address={address}"))
            .arg(format!("--secure-port={}", self.ports.apiserver))
            .arg(flag("cert-dir", self.file("apiserver")))
            .arg(flag("tls-cert-file", self.file("apiserver.crt")))
            .arg(flag("tls-private-key-file", self.file("apiserver.key")))
            .arg(flag("client-ca-file", self.file("ca.crt")))
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.ports.etcd_client
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(flag("service-account-key-file", self.file("sa.pub")))
            .arg(flag(
                "service-account-signing-key-file",
                self.file("sa.key"),
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--allow-privileged=true")
            // The aggregation layer's front proxy (kubeadm's set): the controller-manager and
            // the scheduler read this CA from kube-system/extension-apiserver-authentication.
            .arg(flag("requestheader-client-ca-file", self.file("ca.crt")))
            .arg("--requestheader-allowed-names=front-proxy-client")
            .arg("--requestheader-username-headers=X-Remote-User")
            .arg("--requestheader-group-headers=X-Remote-Group")
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            .arg(flag(
                "proxy-client-cert-file",
                self.file("front-proxy-client.crt"),
            ))
            .arg(flag(
                "proxy-client-key-file",
                self.file("front-proxy-client.key"),
            ))
            .arg(flag(
                "kubelet-client-certificate",
                self.file("apiserver-kubelet-client.crt"),
            ))
            .arg(flag(
                "kubelet-client-key",
                self.file("apiserver-kubelet-client.key"),
            ))
            // A real node's kubelet listens on its InternalIP; nothing resolves its name.
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--v=1");
        if address.is_loopback() {
            // The "kubernetes" Service's endpoints would be 127.0.0.1, which Endpoints reject;
            // no pod runs to use them.
            cmd.arg("--endpoint-reconciler-type=none");
        }
        cmd
    }

    /// kube-controller-manager or kube-scheduler: the flags both take, as one instance
    /// serving on 127.0.0.1 with the admin kubeconfig.
    fn component_command(&self, name: &str, port: u16) -> Command {
        let kubeconfig = self.kubeconfig_path();
        let mut cmd = Command::new(self.bin.join(name));
        cmd.arg(flag("kubeconfig", &kubeconfig))
            .arg(flag("authentication-kubeconfig", &kubeconfig))
            .arg(flag("authorization-kubeconfig", &kubeconfig))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(flag("cert-dir", self.file(name)))
            .arg("--leader-elect=false")
            .arg("--v=1");
        cmd
    }

    fn controller_manager_command(&self) -> Command {
        let mut cmd =
            self.component_command("kube-controller-manager", self.ports.controller_manager);
        cmd.arg("--controllers=*")
            .arg(flag(
                "service-account-private-key-file",
                self.file("sa.key"),
            ))
            .arg(flag("root-ca-file", self.file("ca.crt")))
            .arg(flag("cluster-signing-cert-file", self.file("ca.crt")))
            .arg(flag("cluster-signing-key-file", self.file("ca.key")))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"));
        cmd
    }

    fn scheduler_command(&self) -> Command {
        self.component_command("kube-scheduler", self.ports.scheduler)
    }

    fn kwok_command(&self) -> Command {
        kwok::command(
            &self.bin,
            &self.kubeconfig_path(),
            &self.options.stages,
            self.ports.kwok,
            &self.path,
        )
    }

    // ---- files ----

    fn make_certificates(&self) -> Result<()> {
        let pki = Pki::create(&self.path, self.options.address)?;
        for (name, subject) in [
            ("admin", "/O=system:masters/CN=kube-zerocopy-admin"),
            ("front-proxy-client", "/CN=front-proxy-client"),
            // The apiserver's identity towards kubelets (logs, exec).
            (
                "apiserver-kubelet-client",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
            ),
        ] {
            pki.issue_client(name, subject)?;
        }
        Ok(())
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let text = certs::kubeconfig(&self.pki(), &self.apiserver_url(), "admin");
        std::fs::write(self.kubeconfig_path(), text)?;
        Ok(())
    }

    // ---- nodes ----

    async fn wait_for_nodes(&mut self, client: &Client) -> Result<()> {
        let names = self.node_names();
        self.wait_until("kwok", "the fake Nodes to be Ready", || {
            kwok::nodes_ready(client, &names)
        })
        .await
    }

    // ---- processes ----

    fn spawn(&self, name: &'static str, cmd: Command, append: bool) -> Result<Process> {
        self.spawner
            .spawn_logged(name, cmd, &self.log_path(name), append)
    }

    /// The running process called `name` (apiserver included).
    fn process_mut(&mut self, name: &str) -> Option<&mut Process> {
        self.apiserver
            .iter_mut()
            .chain(self.processes.iter_mut())
            .find(|p| p.name == name)
    }

    /// Fails with the component's log when it has exited.
    fn check_alive(&mut self, name: &str) -> Result<()> {
        match self.process_mut(name) {
            Some(p) => p.check_alive(),
            None => Ok(()),
        }
    }

    async fn wait_for_port(&mut self, name: &str, port: u16) -> Result<()> {
        self.wait_until(name, &format!("port {port}"), || async move {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
        .await
    }

    /// Polls `ready` every 200 ms until it is true, `component` exits or STEP_TIMEOUT passes.
    async fn wait_until<F, Fut>(&mut self, component: &str, what: &str, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let start = Instant::now();
        let mut last_error = None;
        loop {
            self.check_alive(component)?;
            match tokio::time::timeout(Duration::from_secs(10), ready()).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => last_error = Some(anyhow!("a check took over 10 s")),
            }
            if start.elapsed() > STEP_TIMEOUT {
                let log = self.log_path(component);
                bail!(
                    "waited {:?} for {what} ({component}); last error: {}; its log {}:\n{}",
                    STEP_TIMEOUT,
                    last_error.map_or("none".into(), |e| format!("{e:#}")),
                    log.display(),
                    tail(&log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Reverse order of start: kwok, scheduler, controller-manager, apiserver, etcd.
        let mut all: Vec<Process> = self.processes.drain(..).collect();
        if let Some(p) = self.apiserver.take() {
            all.insert(1.min(all.len()), p);
        }
        for p in all.into_iter().rev() {
            p.kill();
        }
        let keep = self.keep || std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some();
        if let Some(dir) = self.dir.take() {
            if keep {
                eprintln!(
                    "control plane files and logs kept in {}",
                    dir.keep().display()
                );
            }
        }
    }
}

/// Runs scripts/control-plane.sh (building what is missing; its log goes to stderr), unless
/// KZC_CONTROL_PLANE_BIN names the folder.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let dir = run_script("control-plane.sh", &[])?.trim().to_owned();
    if dir.is_empty() {
        bail!("scripts/control-plane.sh printed no folder");
    }
    Ok(PathBuf::from(dir))
}

/// Runs scripts/<name> and returns what it printed on stdout (its log goes to stderr).
pub fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let script = crate::repo().join("scripts").join(name);
    let mut cmd = Command::new("bash");
    // A script that runs cargo (images.sh) must see the environment `make` gave, not the one
    // cargo gives a test (CARGO_PKG_*, ...), or cargo would rebuild what is up to date.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        if var.starts_with("CARGO_") && var != "CARGO_HOME" && var != "CARGO_TARGET_DIR" {
            cmd.env_remove(var.as_ref());
        }
    }
    let out = cmd
        .arg(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed with {}", script.display(), out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A client with the credentials of a kubeconfig file.
pub async fn client_of(kubeconfig: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// `helm` from the bin folder, on `kubeconfig`'s cluster, with its cache, config and data in
/// `dir` (none of the user's).
pub fn helm_command(bin: &Path, kubeconfig: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(bin.join("helm"));
    cmd.env("KUBECONFIG", kubeconfig);
    for (var, sub) in [
        ("HELM_CACHE_HOME", "helm/cache"),
        ("HELM_CONFIG_HOME", "helm/config"),
        ("HELM_DATA_HOME", "helm/data"),
    ] {
        cmd.env(var, dir.join(sub));
    }
    cmd
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn flag(name: &str, value: impl AsRef<Path>) -> OsString {
    let mut s = OsString::from(format!("--{name}="));
    s.push(value.as_ref());
    s
}
