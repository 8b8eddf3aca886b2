//! What every scenario shares: the control plane with the chart installed, the operator as a
//! process under the chart's ServiceAccount, a namespace per scenario, pipelines to create.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, PostParams};
use kube::Client;
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy::render::Settings;
use kube_zerocopy::status::Reason;
use kube_zerocopy_test_env::cluster::TestCluster;
use kube_zerocopy_test_env::kueue::Kueue;
use kube_zerocopy_test_env::wait::eventually;
use kube_zerocopy_test_env::{bin, repo};
use serde_json::json;
use tokio::sync::Mutex;

pub const OPERATOR_NS: &str = "kube-zerocopy";
pub const RELEASE: &str = "kzc";
pub const RUNTIME_IMAGE: &str = "kube-zerocopy/runtime:e2e";
pub const UPGRADED_RUNTIME_IMAGE: &str = "kube-zerocopy/runtime:e2e-upgraded";
pub const MINUTE: Duration = Duration::from_secs(60);

/// The cluster and the operator that every scenario runs against.
pub struct Env {
    /// Locked by the scenarios that stop and start the API server.
    pub cluster: Mutex<TestCluster>,
    pub admin: Client,
    /// Authenticates as the chart's ServiceAccount.
    pub kubeconfig: PathBuf,
    /// The operators' log, next to the control plane's (kept when a scenario fails).
    pub log: PathBuf,
    /// The leading operator; the scenarios that restart it run alone.
    pub operator: Mutex<Operator>,
    /// What the operator renders with (its default runtime image).
    pub settings: Settings,
    /// Kueue, for the pipelines that ask for a queue.
    pub kueue: Kueue,
    _work: tempfile::TempDir,
}

impl Env {
    /// Starts the cluster (see [`TestCluster::start`]), installs the chart with helm and
    /// starts the operator under the chart's ServiceAccount token (so its RBAC is proven
    /// sufficient).
    pub async fn start() -> anyhow::Result<Env> {
        let work = tempfile::tempdir()?;
        let cluster = TestCluster::start().await?;
        let admin = cluster.client().await?;
        refuse_an_earlier_run(&admin).await?;
        let kueue = Kueue::start(&cluster, &admin).await?;
        helm_install(&cluster);
        let kubeconfig = service_account_kubeconfig(&cluster, &admin, work.path()).await;
        let log = cluster.dir().join("operator.log");
        let mut operator = Operator::start(&kubeconfig, &log, "operator-0");
        operator.leading().await;
        Ok(Env {
            cluster: Mutex::new(cluster),
            admin,
            kubeconfig,
            log,
            operator: Mutex::new(operator),
            settings: Settings {
                runtime_image: RUNTIME_IMAGE.into(),
                ..Default::default()
            },
            kueue,
            _work: work,
        })
    }

    /// A new namespace of this name: a scenario's own.
    pub async fn namespace(&self, name: &str) -> String {
        Api::<Namespace>::all(self.admin.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        name.to_string()
    }

    pub fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.admin.clone(), ns)
    }
}

pub fn pipeline(yaml: &str) -> InferencePipeline {
    serde_yaml::from_str(yaml).unwrap()
}

/// A Task pipeline of `shards` shards, two at a time.
pub fn task_pipeline(name: &str, ns: &str, shards: i32) -> InferencePipeline {
    kube_zerocopy_test_env::task_pipeline(name, ns, shards, 2)
}

pub fn actor_pipeline(name: &str, ns: &str, replicas: i32, uri: &str) -> InferencePipeline {
    pipeline(&format!(
        r#"apiVersion: kube-zerocopy.io/v1alpha1
kind: InferencePipeline
metadata: {{name: {name}, namespace: {ns}}}
spec:
  mode: Actor
  models:
    - {{name: mlp, format: Safetensors, architecture: Mlp, source: {{uri: "{uri}", size: 32Mi}}}}
  actor: {{replicas: {replicas}}}
  template:
    volumes: [{{name: models, emptyDir: {{}}}}, {{name: data, emptyDir: {{}}}}]
    volumeMounts: [{{name: models, mountPath: /models}}, {{name: data, mountPath: /data}}]
"#
    ))
}

/// The pipeline's phase and its Degraded condition, once that condition has `reason`.
pub async fn degraded_with(
    pipelines: &Api<InferencePipeline>,
    name: &str,
    reason: &str,
) -> Option<(Option<Phase>, Condition)> {
    let s = pipelines.get(name).await.unwrap().status?;
    let c = s.conditions.into_iter().find(|c| c.type_ == "Degraded")?;
    (c.reason == reason).then_some((s.phase, c))
}

/// Waits until the pipeline's phase is `phase` (and its progress `progress`, if given).
pub async fn wait_phase(
    pipelines: &Api<InferencePipeline>,
    name: &str,
    phase: Phase,
    progress: Option<&str>,
    timeout: Duration,
) -> kube_zerocopy::crd::InferencePipelineStatus {
    let what = format!("pipeline {name} {phase} {}", progress.unwrap_or_default());
    eventually(&what, timeout, || async {
        let s = pipelines.get(name).await.unwrap().status?;
        (s.phase == Some(phase) && (progress.is_none() || s.progress.as_deref() == progress))
            .then_some(s)
    })
    .await
}

/// The events about pipeline `name`: (reason, type, note, times sent).
pub async fn events_of(events: &Api<Event>, name: &str) -> Vec<(String, String, String, i32)> {
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.reason.clone().unwrap_or_default(),
                e.type_.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count),
            )
        })
        .collect()
}

/// Waits for a Warning event about pipeline `name` with `reason`, whose note holds `words`.
pub async fn wait_warning(env: &Env, ns: &str, name: &str, reason: Reason, words: &str) {
    let events: Api<Event> = env.api(ns);
    let what = format!("a Warning event {} about {name}", reason.as_str());
    eventually(&what, MINUTE, || async {
        events_of(&events, name)
            .await
            .iter()
            .any(|(r, type_, note, _)| {
                r == reason.as_str() && type_ == "Warning" && note.contains(words)
            })
            .then_some(())
    })
    .await;
}

/// The operator as a process, authenticated with the chart's ServiceAccount token, in the
/// chart's namespace (where its leader lease lives) under a pod-like name.
pub struct Operator {
    pub child: Child,
    kubeconfig: PathBuf,
    log: PathBuf,
    identity: &'static str,
    /// Its default runtime image, which an upgrade changes.
    runtime_image: String,
    /// Where its /metrics, /livez and /readyz are served.
    metrics_port: u16,
}

/// Short enough that a crashed leader's lease lapses quickly in the test.
const LEASE_SECONDS: &str = "8";

impl Operator {
    pub fn start(kubeconfig: &Path, log: &Path, identity: &'static str) -> Operator {
        Operator::start_with(kubeconfig, log, identity, RUNTIME_IMAGE)
    }

    fn start_with(
        kubeconfig: &Path,
        log: &Path,
        identity: &'static str,
        runtime_image: &str,
    ) -> Operator {
        let port = kube_zerocopy_test_env::cluster::free_port().unwrap();
        let child = Command::new(bin("kube-zerocopy"))
            .arg("operator")
            .env("KUBECONFIG", kubeconfig)
            .env("KZC_RUNTIME_IMAGE", runtime_image)
            .env("KZC_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("KZC_LEASE_DURATION", LEASE_SECONDS)
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", OPERATOR_NS)
            .env("RUST_LOG", "warn,kube_zerocopy=info,kube_runtime=debug")
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        Operator {
            child,
            kubeconfig: kubeconfig.to_owned(),
            log: log.to_owned(),
            identity,
            runtime_image: runtime_image.to_owned(),
            metrics_port: port,
        }
    }

    /// Its /readyz or /metrics, once it serves them.
    pub fn get(&mut self, path: &str) -> Option<String> {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("operator {} exited ({status})", self.identity);
        }
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        ureq::get(&url)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    }

    /// Waits until /readyz answers ok: it leads with its caches synced, or stands by.
    pub async fn ready(&mut self) {
        eventually("the operator to be ready", MINUTE, || {
            let ready = self.get("/readyz").is_some();
            async move { ready.then_some(()) }
        })
        .await;
    }

    /// Whether it holds the leader lease and reconciles, from its metrics.
    fn is_leading(&mut self) -> Option<bool> {
        let metrics = self.get("/metrics")?;
        Some(metrics.lines().any(|l| l == "kube_zerocopy_leader 1"))
    }

    /// Waits until it is ready without leading: another replica holds the lease.
    pub async fn standing_by(&mut self) {
        self.ready().await;
        assert_eq!(self.is_leading(), Some(false), "two replicas lead at once");
    }

    /// Waits until it leads, and says it is ready: its controller runs, caches synced.
    pub async fn leading(&mut self) {
        eventually("the operator to lead", MINUTE, || {
            let leading = self.is_leading() == Some(true) && self.get("/readyz").is_some();
            async move { leading.then_some(()) }
        })
        .await;
    }

    /// SIGTERM: a clean shutdown, which hands the leader lease back.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Killed and started again: a crashed container that its pod restarts, same name.
    pub fn restart(&mut self) {
        let image = self.runtime_image.clone();
        self.upgrade(&image);
    }

    /// Killed and started with another default runtime image, as a new release would be.
    pub fn upgrade(&mut self, runtime_image: &str) {
        self.kill();
        *self = Operator::start_with(
            &self.kubeconfig.clone(),
            &self.log.clone(),
            self.identity,
            runtime_image,
        );
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A kubeconfig that authenticates as the chart's ServiceAccount, with a token from the
/// TokenRequest API (what a pod of the chart's Deployment would get).
async fn service_account_kubeconfig(cluster: &TestCluster, admin: &Client, dir: &Path) -> PathBuf {
    let sa_name = format!("{RELEASE}-kube-zerocopy");
    let path = dir.join("operator.kubeconfig");
    let config = token_kubeconfig(cluster, admin, &sa_name, None).await;
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// A kubeconfig (as JSON) that authenticates as the ServiceAccount `sa_name` of the chart's
/// namespace, with a token from the TokenRequest API; bound to `pod` as the kubelet binds a
/// pod's own token (the API server then adds the pod's node to the token's identity).
pub async fn token_kubeconfig(
    cluster: &TestCluster,
    admin: &Client,
    sa_name: &str,
    pod: Option<&Pod>,
) -> serde_json::Value {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), OPERATOR_NS);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", sa_name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for ServiceAccount {sa_name}: {e}"));
    let token = token.status.expect("token status").token;
    let admin_config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cluster.kubeconfig_path()).unwrap()).unwrap();
    let cluster = admin_config["clusters"][0]["cluster"].clone();
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": sa_name, "user": {"token": token}}],
        "contexts": [{"name": sa_name, "context": {"cluster": "e2e", "user": sa_name}}],
        "current-context": sa_name,
    })
}

/// Fails on a cluster where the scenarios ran before: their namespaces and the chart's release
/// would collide with this run's.
async fn refuse_an_earlier_run(admin: &Client) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    if namespaces.get_opt(OPERATOR_NS).await?.is_some() {
        anyhow::bail!(
            "the cluster already has namespace {OPERATOR_NS} (an earlier run?): the scenarios \
             need a fresh cluster"
        );
    }
    Ok(())
}

fn helm_install(cluster: &TestCluster) {
    let out = cluster
        .helm()
        .args(["install", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"))
        .args([
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--wait=false",
        ])
        .args(["--set", &format!("runtimeImage={RUNTIME_IMAGE}")])
        // Node sharing's scenarios need the agent's objects (its DaemonSet stays unscheduled
        // on kwok nodes).
        .args(["--set", "nodeStore.enabled=true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
