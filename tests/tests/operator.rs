//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler built from the official modules, kwok nodes): the chart installed with helm,
//! the operator running under the chart's ServiceAccount token (so its RBAC is proven
//! sufficient), Task and Actor pipelines reconciled, invalid ones rejected by the API server,
//! a Node-sharing pipeline held back by a namespace's Pod Security level, and recovery from a
//! killed operator and a stopped API server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use kube_zerocopy::crd::{InferencePipeline, Phase, PodOverrides, Sharing};
use kube_zerocopy::pod_security::ENFORCE_LABEL;
use kube_zerocopy::render::{self, Rendered, Settings};
use kube_zerocopy::status::Reason;
use kube_zerocopy::validation;
use kube_zerocopy_e2e::cluster::ControlPlane;
use kube_zerocopy_e2e::invalid::invalid_pipelines;
use kube_zerocopy_e2e::wait::eventually;
use kube_zerocopy_e2e::{bin, repo};
use serde_json::json;

const OPERATOR_NS: &str = "kube-zerocopy";
const RELEASE: &str = "kzc";
const NS: &str = "pipelines";
const RUNTIME_IMAGE: &str = "kube-zerocopy/runtime:e2e";
const UPGRADED_RUNTIME_IMAGE: &str = "kube-zerocopy/runtime:e2e-upgraded";

fn pipeline(yaml: &str) -> InferencePipeline {
    serde_yaml::from_str(yaml).unwrap()
}

fn task_pipeline(name: &str, shards: i32) -> InferencePipeline {
    kube_zerocopy_e2e::task_pipeline(name, NS, shards, 2)
}

fn actor_pipeline(name: &str, replicas: i32, uri: &str) -> InferencePipeline {
    pipeline(&format!(
        r#"apiVersion: kube-zerocopy.io/v1alpha1
kind: InferencePipeline
metadata: {{name: {name}, namespace: {NS}}}
spec:
  mode: Actor
  models:
    - {{name: mlp, format: Safetensors, architecture: Mlp, source: {{uri: "{uri}", size: 32Mi}}}}
  actor: {{replicas: {replicas}}}
"#
    ))
}

/// The operator as a process, authenticated with the chart's ServiceAccount token, in the
/// chart's namespace (where its leader lease lives) under a pod-like name.
struct Operator {
    child: Child,
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
    fn start(kubeconfig: &Path, log: &Path, identity: &'static str) -> Operator {
        Operator::start_with(kubeconfig, log, identity, RUNTIME_IMAGE)
    }

    fn start_with(
        kubeconfig: &Path,
        log: &Path,
        identity: &'static str,
        runtime_image: &str,
    ) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
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
    fn get(&mut self, path: &str) -> Option<String> {
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
    async fn ready(&mut self) {
        eventually("the operator to be ready", Duration::from_secs(60), || {
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
    async fn standing_by(&mut self) {
        self.ready().await;
        assert_eq!(self.is_leading(), Some(false), "two replicas lead at once");
    }

    /// Waits until it leads.
    async fn leading(&mut self) {
        eventually("the operator to lead", Duration::from_secs(60), || {
            let leading = self.is_leading() == Some(true);
            async move { leading.then_some(()) }
        })
        .await;
    }

    /// SIGTERM: a clean shutdown, which hands the leader lease back.
    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Killed and started again: a crashed container that its pod restarts, same name.
    fn restart(&mut self) {
        let image = self.runtime_image.clone();
        self.upgrade(&image);
    }

    /// Killed and started with another default runtime image, as a new release would be.
    fn upgrade(&mut self, runtime_image: &str) {
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
async fn service_account_kubeconfig(cp: &ControlPlane, admin: &Client, dir: &Path) -> PathBuf {
    let sa_name = format!("{RELEASE}-kube-zerocopy");
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), OPERATOR_NS);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", &sa_name, &PostParams::default(), &request)
        .await
        .expect("a token for the chart's ServiceAccount");
    let token = token.status.expect("token status").token;
    let admin_config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig_path()).unwrap()).unwrap();
    let cluster = admin_config["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": "operator"}}],
        "current-context": "operator",
    });
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

fn helm_install(cp: &ControlPlane) {
    let out = Command::new(cp.bin_dir().join("helm"))
        .args(["install", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"))
        .args([
            "--namespace",
            OPERATOR_NS,
            "--create-namespace",
            "--wait=false",
        ])
        .args(["--set", &format!("runtimeImage={RUNTIME_IMAGE}")])
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two operator replicas without leader election would race: the chart refuses to render.
fn chart_refuses_replicas_without_a_leader(cp: &ControlPlane) {
    let out = cp
        .helm()
        .args(["template", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"))
        .args([
            "--set",
            "replicas=2",
            "--set",
            "leaderElection.enabled=false",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("replicas > 1 needs leaderElection.enabled=true"),
        "helm template with 2 replicas and no leader election: {stderr}"
    );
}

/// With watchNamespace set, the operator may list and watch that one namespace and no other
/// (namespaces are cluster-scoped: a ClusterRole, limited by name).
fn chart_limits_namespaces_to_the_watched_one(cp: &ControlPlane) {
    let out = cp
        .helm()
        .args(["template", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"))
        .args(["--set", &format!("watchNamespace={NS}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let named = |kind: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"]
                        == format!("{RELEASE}-kube-zerocopy-namespaces").as_str()
            })
            .unwrap_or_else(|| panic!("no {kind} for namespaces"))
            .clone()
    };
    let role = named("ClusterRole");
    let rules: Vec<serde_json::Value> =
        serde_json::from_value(serde_json::to_value(&role["rules"]).unwrap()).unwrap();
    assert_eq!(
        rules,
        [
            json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"], "resourceNames": [NS]})
        ]
    );
    named("ClusterRoleBinding");
}

/// The pipeline's phase and its Degraded condition, once that condition has `reason`.
async fn degraded_with(
    pipelines: &Api<InferencePipeline>,
    name: &str,
    reason: &str,
) -> Option<(Option<Phase>, Condition)> {
    let s = pipelines.get(name).await.unwrap().status?;
    let c = s.conditions.into_iter().find(|c| c.type_ == "Degraded")?;
    (c.reason == reason).then_some((s.phase, c))
}

/// A Service of the pipeline's object name that someone else made: the pipeline is Blocked
/// with ObjectNotOwned and the Service is left as it was (server-side apply with force used to
/// take it over, and deleting the pipeline then deleted it); once it is gone, the pipeline runs.
async fn a_foreign_object_is_not_taken_over(admin: &Client) {
    let minute = Duration::from_secs(60);
    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), NS);
    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "squatted-zerocopy", "labels": {"team": "other"}},
        "spec": {"ports": [{"port": 1234}]}
    }))
    .unwrap();
    let before = services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    pipelines
        .create(
            &PostParams::default(),
            &actor_pipeline("squatted", 1, "file:///models/a.safetensors"),
        )
        .await
        .unwrap();
    let (phase, degraded) =
        eventually("the pipeline to refuse the foreign Service", minute, || {
            degraded_with(&pipelines, "squatted", Reason::ObjectNotOwned.as_str())
        })
        .await;
    println!("not owned: {}", degraded.message);
    assert_eq!(phase, Some(Phase::Blocked));
    assert!(
        degraded.message.contains("Service named squatted-zerocopy"),
        "{}",
        degraded.message
    );
    let after = services.get("squatted-zerocopy").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert!(after.owner_references().is_empty());
    assert!(deployments
        .get_opt("squatted-zerocopy")
        .await
        .unwrap()
        .is_none());
    // Theirs deleted: the pipeline makes its own, at its next look (a Blocked pipeline is
    // looked at every minute; no watch brings the deletion of an object it does not own).
    services
        .delete("squatted-zerocopy", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the pipeline's own Deployment", 2 * minute, || async {
        deployments.get_opt("squatted-zerocopy").await.unwrap()
    })
    .await;
    let own = services.get("squatted-zerocopy").await.unwrap();
    assert_eq!(own.owner_references()[0].name, "squatted");
    pipelines
        .delete("squatted", &DeleteParams::default())
        .await
        .unwrap();
}

/// A pipeline the schema lets through but whose Job the API server refuses (a nodeSelector key
/// that is no label key) is Blocked with the API server's reason, in its status and in a
/// Warning event; fixed, it runs. A malformed resource quantity, which the API server does not
/// check inside a pipeline, is Blocked by the operator with its reason; so is a template that
/// the operator's default policy forbids (a hostPath volume).
async fn a_pipeline_whose_job_is_refused_says_why_until_fixed(admin: &Client) {
    let minute = Duration::from_secs(60);
    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), NS);

    let mut forbidden = task_pipeline("forbidden", 1);
    forbidden.spec.template = Some(
        serde_json::from_value(json!({
            "volumes": [{"name": "node", "hostPath": {"path": "/etc"}}],
            "volumeMounts": [{"name": "node", "mountPath": "/node"}],
        }))
        .unwrap(),
    );
    pipelines
        .create(&PostParams::default(), &forbidden)
        .await
        .unwrap();
    let (phase, degraded) = eventually("the forbidden pipeline to say why", minute, || {
        degraded_with(&pipelines, "forbidden", Reason::ForbiddenByPolicy.as_str())
    })
    .await;
    println!("forbidden: {}", degraded.message);
    assert_eq!(phase, Some(Phase::Blocked));
    assert!(
        degraded.message.contains("pipelinePolicy.allowHostPath"),
        "{}",
        degraded.message
    );
    assert!(jobs.get_opt("forbidden-zerocopy").await.unwrap().is_none());
    pipelines
        .delete("forbidden", &DeleteParams::default())
        .await
        .unwrap();

    let mut p = task_pipeline("refused", 2);
    p.spec.template = Some(PodOverrides {
        node_selector: Some([("not a label key".to_string(), "x".to_string())].into()),
        ..Default::default()
    });
    pipelines.create(&PostParams::default(), &p).await.unwrap();
    let (phase, degraded) = eventually("the refused pipeline to say why", minute, || {
        degraded_with(&pipelines, "refused", Reason::ObjectsRefused.as_str())
    })
    .await;
    println!("refused: {}", degraded.message);
    assert_eq!(phase, Some(Phase::Blocked));
    assert!(
        degraded.message.contains("nodeSelector") && degraded.message.contains("not a label key"),
        "{}",
        degraded.message
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    eventually(
        "a Warning event with the API server's reason",
        minute,
        || async {
            let list = events.list(&ListParams::default()).await.unwrap();
            list.items
                .iter()
                .any(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("refused")
                        && e.reason.as_deref() == Some(Reason::ObjectsRefused.as_str())
                        && e.type_.as_deref() == Some("Warning")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("not a label key"))
                })
                .then_some(())
        },
    )
    .await;
    // `kubectl get ipl` shows the reason; `-o wide` adds what it runs.
    let table: serde_json::Value = admin
        .request(
            http::Request::get(format!(
                "/apis/kube-zerocopy.io/v1alpha1/namespaces/{NS}/inferencepipelines?includeObject=None"
            ))
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(vec![])
            .unwrap(),
        )
        .await
        .unwrap();
    let columns: Vec<(&str, i64)> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    for wide in ["Device", "Sharing", "Models"] {
        assert!(columns.contains(&(wide, 1)), "{columns:?}");
    }
    let reason = columns
        .iter()
        .position(|c| c.0 == "Reason")
        .expect("a Reason column");
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "refused")
        .expect("the refused pipeline's row");
    assert_eq!(
        row["cells"][reason],
        Reason::ObjectsRefused.as_str(),
        "{row}"
    );

    // Fixed: the Job is created and the pipeline is no longer Blocked.
    pipelines
        .patch(
            "refused",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"nodeSelector": null}}})),
        )
        .await
        .unwrap();
    eventually("the fixed pipeline's Job", minute, || async {
        jobs.get_opt("refused-zerocopy").await.unwrap()
    })
    .await;
    eventually("the fixed pipeline to leave Blocked", minute, || async {
        let s = pipelines.get("refused").await.unwrap().status?;
        (s.phase != Some(Phase::Blocked)).then_some(())
    })
    .await;
    pipelines
        .delete("refused", &DeleteParams::default())
        .await
        .unwrap();

    // A quantity the API server does not check inside a pipeline: the operator does.
    let mut p = task_pipeline("bad-resources", 2);
    p.spec.template =
        Some(serde_json::from_value(json!({"resources": {"limits": {"memory": "lots"}}})).unwrap());
    pipelines.create(&PostParams::default(), &p).await.unwrap();
    let (phase, degraded) = eventually(
        "the pipeline with a bad quantity to say why",
        minute,
        || {
            degraded_with(
                &pipelines,
                "bad-resources",
                Reason::InvalidPipeline.as_str(),
            )
        },
    )
    .await;
    println!("invalid: {}", degraded.message);
    assert_eq!(phase, Some(Phase::Blocked));
    assert!(
        degraded
            .message
            .contains("template.resources.limits.memory")
            && degraded.message.contains("\"lots\""),
        "{}",
        degraded.message
    );
    assert!(jobs
        .get_opt("bad-resources-zerocopy")
        .await
        .unwrap()
        .is_none());
    pipelines
        .delete("bad-resources", &DeleteParams::default())
        .await
        .unwrap();
}

async fn pod_security_holds_back_node_sharing(admin: &Client, settings: &Settings) {
    const PSA_NS: &str = "restricted-pipelines";
    let minute = Duration::from_secs(60);
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let labelled = |level: &str| {
        serde_json::from_value::<Namespace>(json!({"metadata": {
            "name": PSA_NS, "labels": {ENFORCE_LABEL: level}}}))
        .unwrap()
    };
    namespaces
        .create(&PostParams::default(), &labelled("restricted"))
        .await
        .unwrap();
    let mut shared = kube_zerocopy_e2e::task_pipeline("node-shared", PSA_NS, 2, 2);
    shared.spec.sharing = Sharing::Node;

    // The premise: the API server refuses these pods there (its hostPath volume).
    let Rendered::Task { job } = render::render(&shared, settings).unwrap() else {
        panic!("task")
    };
    let pod = Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("node-shared-probe".into()),
            ..Default::default()
        },
        spec: job.spec.unwrap().template.spec,
        ..Default::default()
    };
    let refused = Api::<Pod>::namespaced(admin.clone(), PSA_NS)
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &pod,
        )
        .await
        .expect_err("a hostPath pod in a restricted namespace")
        .to_string();
    assert!(refused.contains("hostPath"), "{refused}");

    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), PSA_NS);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), PSA_NS);
    pipelines
        .create(&PostParams::default(), &shared)
        .await
        .unwrap();
    let (phase, blocked) = eventually(
        "the Node-sharing pipeline to be blocked with a reason",
        minute,
        || {
            degraded_with(
                &pipelines,
                "node-shared",
                Reason::PodSecurityForbidsNodeSharing.as_str(),
            )
        },
    )
    .await;
    println!("blocked: {}", blocked.message);
    assert_eq!(
        (phase, blocked.status.as_str()),
        (Some(Phase::Blocked), "True")
    );
    for part in [
        PSA_NS,
        "\"restricted\"",
        "hostPath",
        "sharing: Pod",
        "privileged",
    ] {
        assert!(
            blocked.message.contains(part),
            "{part:?} not in {}",
            blocked.message
        );
    }
    assert!(
        jobs.get_opt("node-shared-zerocopy")
            .await
            .unwrap()
            .is_none(),
        "a Job was created in a namespace that forbids its pods"
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), PSA_NS);
    eventually("a Warning event with the reason", minute, || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(Reason::PodSecurityForbidsNodeSharing.as_str())
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;

    // Relabelled privileged: the namespace watch requeues the pipeline, which now runs.
    let relabelled = std::time::Instant::now();
    namespaces
        .patch(
            PSA_NS,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {ENFORCE_LABEL: "privileged"}}})),
        )
        .await
        .unwrap();
    eventually("the Job once the namespace allows it", minute, || async {
        jobs.get_opt("node-shared-zerocopy").await.unwrap()
    })
    .await;
    println!("Job created {:?} after the relabel", relabelled.elapsed());
    let (phase, cleared) = eventually("the condition to clear", minute, || {
        degraded_with(&pipelines, "node-shared", "AsExpected")
    })
    .await;
    assert_eq!(cleared.status, "False");
    assert_ne!(phase, Some(Phase::Blocked));
    pipelines
        .delete("node-shared", &DeleteParams::foreground())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_end_to_end_against_a_real_control_plane() {
    let work = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start()
        .await
        .expect("the control plane starts");
    let admin = cp.client().await.unwrap();
    helm_install(&cp);
    chart_refuses_replicas_without_a_leader(&cp);
    chart_limits_namespaces_to_the_watched_one(&cp);
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await
        .unwrap();
    let kubeconfig = service_account_kubeconfig(&cp, &admin, work.path()).await;
    // Next to the control plane's logs, which are kept when the test fails.
    let log = cp.dir().join("operator.log");
    let mut operator = Operator::start(&kubeconfig, &log, "operator-0");
    operator.leading().await;

    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    let settings = Settings {
        runtime_image: RUNTIME_IMAGE.into(),
        ..Default::default()
    };
    let minute = Duration::from_secs(60);

    // Invalid pipelines: rejected by the API server's schema and CEL rules, with the message.
    // Sent as raw objects: some (an unknown mode) cannot even be held by the Rust types.
    let raw: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        NS,
        &ApiResource::erase::<InferencePipeline>(&()),
    );
    let mut worded_otherwise = Vec::new();
    for (what, yaml, message) in invalid_pipelines(NS) {
        let bad: DynamicObject = serde_yaml::from_str(&yaml).unwrap();
        let err = raw
            .create(&PostParams::default(), &bad)
            .await
            .expect_err(what);
        let text = err.to_string();
        println!("rejected {what}: {text}");
        assert!(
            text.contains(message),
            "{what}: expected {message:?} in {text}"
        );
        // What `kube-zerocopy render` answers for the same pipeline, word for word.
        let cli = validation::validate(&serde_yaml::from_str(&yaml).unwrap())
            .expect_err("the CLI accepts what the API server refuses");
        for reason in cli.errors {
            if !text.contains(reason.as_str()) {
                worded_otherwise.push(format!(
                    "{what}: the CLI says {reason:?}, the API server {text}"
                ));
            }
        }
    }
    assert!(worded_otherwise.is_empty(), "{worded_otherwise:#?}");

    // Task: an Indexed Job with the rendered pod template, run to completion by kwok.
    let task = pipelines
        .create(&PostParams::default(), &task_pipeline("batch", 3))
        .await
        .unwrap();
    let job = eventually("the Job", minute, || async {
        jobs.get_opt("batch-zerocopy").await.unwrap()
    })
    .await;
    let Rendered::Task { job: expected } = render::render(&task, &settings).unwrap() else {
        panic!("task")
    };
    let (got, want) = (job.spec.clone().unwrap(), expected.spec.clone().unwrap());
    assert_eq!(
        (
            got.completions,
            got.parallelism,
            got.completion_mode.as_deref()
        ),
        (Some(3), Some(2), Some("Indexed"))
    );
    let (got_pod, want_pod) = (got.template.spec.unwrap(), want.template.spec.unwrap());
    assert_eq!(
        got_pod.init_containers.as_ref().unwrap()[0].command,
        want_pod.init_containers.as_ref().unwrap()[0].command
    );
    assert_eq!(
        got_pod.init_containers.as_ref().unwrap()[0]
            .restart_policy
            .as_deref(),
        Some("Always")
    );
    assert_eq!(got_pod.containers[0].env, want_pod.containers[0].env);
    assert_eq!(job.owner_references()[0].uid, task.uid().unwrap());
    let done = eventually("the Task pipeline to succeed", 3 * minute, || async {
        let p = pipelines.get("batch").await.unwrap();
        let s = p.status.clone()?;
        (s.phase == Some(Phase::Succeeded)).then_some(s)
    })
    .await;
    assert_eq!(done.progress.as_deref(), Some("3/3"));
    assert_eq!(done.observed_generation, task.metadata.generation);
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    // One event per transition, each with its own words: (reason, note, times sent).
    let recorded = eventually("events for the pipeline", minute, || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        let recorded: Vec<(String, String, i32)> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("batch"))
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.note.clone().unwrap_or_default(),
                    e.series.as_ref().map_or(1, |s| s.count),
                )
            })
            .collect();
        recorded
            .iter()
            .any(|e| e.0 == "Succeeded")
            .then_some(recorded)
    })
    .await;
    println!("events of the Task pipeline: {recorded:?}");
    for phase in ["Pending", "Running", "Succeeded"] {
        let sent: i32 = recorded.iter().filter(|e| e.0 == phase).map(|e| e.2).sum();
        assert!(sent <= 1, "{phase} announced {sent} times: {recorded:?}");
    }
    let succeeded = recorded.iter().find(|e| e.0 == "Succeeded").unwrap();
    assert_eq!(succeeded.1, "3/3 shards succeeded", "{recorded:?}");
    assert!(
        recorded
            .iter()
            .filter(|e| e.0 != "Succeeded")
            .all(|e| e.1 != succeeded.1),
        "another phase's event says the same as Succeeded's: {recorded:?}"
    );

    // A Task pipeline changed while its Job runs: refused with a condition (a Job cannot
    // change), then carried out once that Job has finished. 30 shards one at a time keep the
    // Job running long enough on kwok.
    pipelines
        .create(
            &PostParams::default(),
            &kube_zerocopy_e2e::task_pipeline("long", NS, 30, 1),
        )
        .await
        .unwrap();
    eventually("the long Job to run", minute, || async {
        let j = jobs.get_opt("long-zerocopy").await.unwrap()?;
        (j.status?.active? > 0).then_some(())
    })
    .await;
    // More shards at once: the running Job takes it in place (same Job, no refusal).
    let long_uid = jobs.get("long-zerocopy").await.unwrap().uid();
    pipelines
        .patch(
            "long",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"task": {"parallelism": 2}}})),
        )
        .await
        .unwrap();
    eventually(
        "the running Job to run 2 shards at once",
        minute,
        || async {
            let j = jobs.get("long-zerocopy").await.unwrap();
            (j.spec.as_ref()?.parallelism == Some(2)).then_some(())
        },
    )
    .await;
    assert_eq!(jobs.get("long-zerocopy").await.unwrap().uid(), long_uid);
    let status = pipelines.get("long").await.unwrap().status.unwrap();
    assert!(
        !status
            .conditions
            .iter()
            .any(|c| c.reason == "SpecChangeRefused" && c.status == "True"),
        "{:?}",
        status.conditions
    );
    let new_model = json!({"spec": {"models": [{"name": "encoder", "format": "TorchScript",
        "source": {"uri": "file:///models/encoder-v2.pt", "size": "64Mi"}}]}});
    pipelines
        .patch("long", &PatchParams::default(), &Patch::Merge(new_model))
        .await
        .unwrap();
    let refused = eventually(
        "the change to be refused with a condition",
        minute,
        || async {
            let s = pipelines.get("long").await.unwrap().status?;
            s.conditions.into_iter().find(|c| {
                c.type_ == "Degraded" && c.status == "True" && c.reason == "SpecChangeRefused"
            })
        },
    )
    .await;
    println!("refused: {}", refused.message);
    assert!(refused.message.contains("running Job cannot change"));
    let running = jobs.get("long-zerocopy").await.unwrap();
    assert!(
        !format!("{:?}", running.spec).contains("encoder-v2"),
        "a running Job was changed"
    );
    eventually(
        "the finished Job to be replaced by one with the new model",
        3 * minute,
        || async {
            let j = jobs.get_opt("long-zerocopy").await.unwrap()?;
            format!("{:?}", j.spec).contains("encoder-v2").then_some(())
        },
    )
    .await;
    let rerun = eventually("an event saying the shards run again", minute, || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items.into_iter().find(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("long")
                && e.reason.as_deref() == Some("Rerun")
        })
    })
    .await;
    assert!(
        rerun
            .note
            .as_deref()
            .is_some_and(|n| n.contains("all 30 shards run again")),
        "{rerun:?}"
    );

    // Actor: a Deployment and a Service; replicas become available; changes roll out.
    pipelines
        .create(
            &PostParams::default(),
            &actor_pipeline("online", 2, "file:///models/a.safetensors"),
        )
        .await
        .unwrap();
    eventually("the Service", minute, || async {
        services.get_opt("online-zerocopy").await.unwrap()
    })
    .await;
    let ready = |replicas: &'static str| {
        let pipelines = pipelines.clone();
        async move {
            eventually(
                &format!("the Actor pipeline Ready with {replicas}"),
                3 * minute,
                || async {
                    let s = pipelines.get("online").await.unwrap().status?;
                    (s.phase == Some(Phase::Ready) && s.progress.as_deref() == Some(replicas))
                        .then_some(())
                },
            )
            .await
        }
    };
    ready("2/2").await;
    pipelines
        .patch(
            "online",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"actor": {"replicas": 3}}})),
        )
        .await
        .unwrap();
    ready("3/3").await;
    let before = deployments.get("online-zerocopy").await.unwrap();
    pipelines
        .patch(
            "online",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"models": [{"name": "mlp", "format": "Safetensors", "architecture": "Mlp", "source": {"uri": "file:///models/b.safetensors", "size": "32Mi"}}]}})),
        )
        .await
        .unwrap();
    let rolled = eventually(
        "the Deployment to roll out the new model",
        minute,
        || async {
            let d = deployments.get("online-zerocopy").await.unwrap();
            let env = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .env
                .clone()?;
            env.iter()
                .any(|e| {
                    e.value
                        .as_deref()
                        .is_some_and(|v| v.contains("b.safetensors"))
                })
                .then_some(d)
        },
    )
    .await;
    assert!(rolled.metadata.generation > before.metadata.generation);
    ready("3/3").await;

    // Node sharing in a namespace that enforces Pod Security "restricted": its hostPath volume
    // would be refused, so no Job, and the pipeline says why; relabelled privileged, it runs.
    pod_security_holds_back_node_sharing(&admin, &settings).await;

    a_pipeline_whose_job_is_refused_says_why_until_fixed(&admin).await;
    a_foreign_object_is_not_taken_over(&admin).await;

    // The operator killed in the middle of reconciling (a pipeline just created, a change to
    // another just made) and restarted converges to the same objects.
    let job_before = jobs.get("batch-zerocopy").await.unwrap();
    let deployment_before = deployments.get("online-zerocopy").await.unwrap();
    pipelines
        .create(&PostParams::default(), &task_pipeline("after-restart", 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    operator.restart();
    operator.leading().await;
    eventually(
        "a new pipeline reconciled after the restart",
        minute,
        || async { jobs.get_opt("after-restart-zerocopy").await.unwrap() },
    )
    .await;
    let job_after = jobs.get("batch-zerocopy").await.unwrap();
    let deployment_after = deployments.get("online-zerocopy").await.unwrap();
    assert_eq!(job_after.spec, job_before.spec);
    assert_eq!(deployment_after.spec, deployment_before.spec);
    assert_eq!(
        deployment_after.metadata.generation,
        deployment_before.metadata.generation
    );

    // An upgraded operator renders every object differently (here: its default runtime
    // image). The Deployment rolls to it; the finished Task pipeline's Job is left alone: a
    // pipeline runs again only when its own spec changes, never because the operator did.
    let finished = jobs.get("batch-zerocopy").await.unwrap();
    operator.upgrade(UPGRADED_RUNTIME_IMAGE);
    operator.leading().await;
    eventually(
        "the upgraded operator to roll the Deployment to its image",
        minute,
        || async {
            let d = deployments.get("online-zerocopy").await.unwrap();
            let image = d.spec?.template.spec?.containers[0].image.clone()?;
            (image == UPGRADED_RUNTIME_IMAGE).then_some(())
        },
    )
    .await;
    let kept = jobs.get("batch-zerocopy").await.unwrap();
    assert_eq!(kept.uid(), finished.uid(), "the finished Job was replaced");
    assert_eq!(kept.spec, finished.spec);
    let batch = pipelines.get("batch").await.unwrap().status.unwrap();
    assert_eq!(batch.phase, Some(Phase::Succeeded));

    // The API server stopped for a few seconds: the operator recovers on its own.
    cp.stop_apiserver().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cp.start_apiserver().await.unwrap();
    let admin = cp.client().await.unwrap();
    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), NS);
    pipelines
        .create(&PostParams::default(), &task_pipeline("after-outage", 1))
        .await
        .unwrap();
    eventually(
        "a pipeline reconciled after the API server came back",
        2 * minute,
        || async { jobs.get_opt("after-outage-zerocopy").await.ok().flatten() },
    )
    .await;
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator exited during the outage"
    );

    // An operator that starts while the API server is away waits for it instead of exiting
    // (a pod's operator would otherwise crash-loop through a control-plane upgrade).
    cp.stop_apiserver().await.unwrap();
    operator.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator exited while the API server was away"
    );
    cp.start_apiserver().await.unwrap();
    operator.leading().await;

    // Two replicas: the second stands by and reconciles nothing while the first leads.
    let mut standby = Operator::start(&kubeconfig, &log, "operator-1");
    standby.standing_by().await;
    let reconciled = |name: &'static str| {
        let (pipelines, jobs) = (pipelines.clone(), jobs.clone());
        async move {
            pipelines
                .create(&PostParams::default(), &task_pipeline(name, 1))
                .await
                .unwrap();
            eventually(&format!("pipeline {name} reconciled"), minute, || async {
                jobs.get_opt(&format!("{name}-zerocopy"))
                    .await
                    .ok()
                    .flatten()
            })
            .await
        }
    };
    reconciled("two-replicas").await;
    let standby_metrics = standby.get("/metrics").unwrap();
    assert!(
        standby_metrics.contains("kube_zerocopy_reconciles_total 0"),
        "the standby reconciled: {standby_metrics}"
    );

    // The leader shuts down cleanly (SIGTERM, a rolling update): it exits 0 and hands the
    // lease back; the standby takes over and reconciles.
    let status = operator.terminate();
    assert!(status.success(), "the leader's shutdown: {status}");
    standby.leading().await;
    reconciled("after-handover").await;

    // The new leader crashes (SIGKILL: no hand-back): the restarted first replica, standing
    // by meanwhile, takes over once the lease lapses.
    let mut operator = Operator::start(&kubeconfig, &log, "operator-0");
    operator.standing_by().await;
    standby.kill();
    operator.leading().await;
    reconciled("after-takeover").await;
    drop(standby);

    // Another holder takes the lease (as a replica would after this one stalled past its
    // lease): the operator sees it at its next renewal and exits, so that it never reconciles
    // beside the new leader.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), OPERATOR_NS);
    leases
        .patch(
            "kube-zerocopy-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": "another-replica",
                "renewTime": MicroTime(Timestamp::now()),
                "leaseDurationSeconds": 60,
            }})),
        )
        .await
        .unwrap();
    let status = eventually("the operator to exit", minute, || {
        let exited = operator.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(
        !status.success(),
        "exit status after losing the lease: {status}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(
            "lost the leader lease kube-zerocopy/kube-zerocopy-operator to another replica"
        ),
        "the operator's log does not say why it exited"
    );

    // Deleting a pipeline removes what it owned, and the operator says nothing alarming about
    // objects that are simply gone. (The lease is freed so that a new operator leads at once.)
    leases
        .delete("kube-zerocopy-operator", &DeleteParams::default())
        .await
        .unwrap();
    let mut operator = Operator::start(&kubeconfig, &log, "operator-0");
    operator.leading().await;
    let logged_before = std::fs::read_to_string(&log).unwrap().len();
    for name in [
        "batch",
        "long",
        "online",
        "after-restart",
        "after-outage",
        "two-replicas",
        "after-handover",
        "after-takeover",
    ] {
        pipelines
            .delete(name, &DeleteParams::foreground())
            .await
            .unwrap();
    }
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let services: Api<Service> = Api::namespaced(admin.clone(), NS);
    eventually("every owned object to be deleted", 2 * minute, || async {
        let left = jobs.list(&ListParams::default()).await.ok()?.items.len()
            + deployments
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .len()
            + services
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .len();
        (left == 0).then_some(())
    })
    .await;
    // Deletion events of the owned objects arrive after their pipeline's: give them time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let alarming: Vec<_> = logged[logged_before..]
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        alarming.is_empty(),
        "deleting pipelines made the operator log {} warnings, e.g. {:?}",
        alarming.len(),
        alarming.first()
    );
    drop(operator);
    println!("operator log: {}", log.display());
}
