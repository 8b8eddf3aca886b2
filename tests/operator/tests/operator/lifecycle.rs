//! The operator's own life: killed mid-reconcile, upgraded, through an API server outage, as
//! replicas with a leader, and when pipelines are deleted. These stop the operator or the API
//! server, so they run last and one at a time, in this order.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy_test_env::metric_value;
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;
use tokio::sync::OnceCell;

use crate::support::{
    actor_pipeline, task_pipeline, wait_phase, Env, Operator, MINUTE, OPERATOR_NS,
    UPGRADED_RUNTIME_IMAGE,
};

const NS: &str = "lifecycle";

/// A finished Task pipeline ("batch") and a Ready Actor pipeline ("online") in this file's
/// namespace, made once for all its scenarios.
async fn settled_pipelines(env: &Env) {
    static SETTLED: OnceCell<()> = OnceCell::const_new();
    SETTLED
        .get_or_init(|| async {
            env.namespace(NS).await;
            let pipelines: Api<InferencePipeline> = env.api(NS);
            pipelines
                .create(&PostParams::default(), &task_pipeline("batch", NS, 2))
                .await
                .unwrap();
            pipelines
                .create(
                    &PostParams::default(),
                    &actor_pipeline("online", NS, 1, "file:///models/a.safetensors"),
                )
                .await
                .unwrap();
            wait_phase(&pipelines, "batch", Phase::Succeeded, None, 3 * MINUTE).await;
            wait_phase(&pipelines, "online", Phase::Ready, Some("1/1"), 3 * MINUTE).await;
        })
        .await;
}

/// A pipeline created in `ns` of `client`'s cluster gets its Job within a minute.
async fn reconciled(client: &Client, name: &str) {
    let pipelines: Api<InferencePipeline> = Api::namespaced(client.clone(), NS);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    pipelines
        .create(&PostParams::default(), &task_pipeline(name, NS, 1))
        .await
        .unwrap();
    eventually(&format!("pipeline {name} reconciled"), MINUTE, || async {
        jobs.get_opt(&format!("{name}-zerocopy"))
            .await
            .ok()
            .flatten()
    })
    .await;
}

/// Killed in the middle of reconciling (a pipeline just created) and restarted, the operator
/// converges to the same objects.
pub async fn an_operator_killed_mid_reconcile_converges_when_restarted(env: Arc<Env>) {
    settled_pipelines(&env).await;
    let jobs: Api<Job> = env.api(NS);
    let deployments: Api<Deployment> = env.api(NS);
    let job_before = jobs.get("batch-zerocopy").await.unwrap();
    let deployment_before = deployments.get("online-zerocopy").await.unwrap();
    env.api::<InferencePipeline>(NS)
        .create(
            &PostParams::default(),
            &task_pipeline("after-restart", NS, 1),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut operator = env.operator.lock().await;
    operator.restart();
    operator.leading().await;
    eventually(
        "a new pipeline reconciled after the restart",
        MINUTE,
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
}

/// An upgraded operator renders every object differently (here: its default runtime image).
/// The Deployment rolls to it; the finished Task pipeline's Job is left alone: a pipeline runs
/// again only when its own spec changes, never because the operator did.
pub async fn an_upgraded_operator_leaves_finished_jobs_alone(env: Arc<Env>) {
    settled_pipelines(&env).await;
    let jobs: Api<Job> = env.api(NS);
    let deployments: Api<Deployment> = env.api(NS);
    let finished = jobs.get("batch-zerocopy").await.unwrap();
    let mut operator = env.operator.lock().await;
    operator.upgrade(UPGRADED_RUNTIME_IMAGE);
    operator.leading().await;
    eventually(
        "the upgraded operator to roll the Deployment to its image",
        MINUTE,
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
    let batch = env.api::<InferencePipeline>(NS).get("batch").await.unwrap();
    assert_eq!(batch.status.unwrap().phase, Some(Phase::Succeeded));
}

/// The API server stopped for a few seconds: the operator recovers on its own. One that
/// starts while the API server is away waits for it instead of exiting (a pod's operator
/// would otherwise crash-loop through a control-plane upgrade).
pub async fn the_operator_rides_out_an_api_server_outage(env: Arc<Env>) {
    settled_pipelines(&env).await;
    let mut cluster = env.cluster.lock().await;
    let cp = cluster
        .control_plane()
        .expect("run only where the harness runs the API server");
    let mut operator = env.operator.lock().await;
    cp.stop_apiserver().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cp.start_apiserver().await.unwrap();
    let admin = cp.client().await.unwrap();
    reconciled(&admin, "after-outage").await;
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator exited during the outage"
    );

    cp.stop_apiserver().await.unwrap();
    operator.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator exited while the API server was away"
    );
    cp.start_apiserver().await.unwrap();
    operator.leading().await;
}

/// Two replicas: the second stands by and reconciles nothing while the first leads; a leader
/// that shuts down hands over; one that crashes is replaced once its lease lapses; one whose
/// lease another holder takes exits, so that it never reconciles beside the new leader.
pub async fn replicas_elect_one_leader_and_hand_over(env: Arc<Env>) {
    settled_pipelines(&env).await;
    let admin = env.cluster.lock().await.client().await.unwrap();
    let mut operator = env.operator.lock().await;
    let mut standby = Operator::start(&env.kubeconfig, &env.log, "operator-1");
    standby.standing_by().await;
    reconciled(&admin, "two-replicas").await;
    let standby_metrics = standby.get("/metrics").unwrap();
    assert!(
        kube_zerocopy_test_env::metric_value(&standby_metrics, "kube_zerocopy_reconciles_total")
            == Some(0.0),
        "the standby reconciled: {standby_metrics}"
    );
    // The leader counted its reconciles (the pipeline just reconciled among them), with their
    // durations: the counter the standby's 0 is compared with does move.
    let leader_metrics = operator.get("/metrics").unwrap();
    let count = |name: &str| {
        metric_value(&leader_metrics, name)
            .unwrap_or_else(|| panic!("no {name} in the leader's metrics: {leader_metrics}"))
    };
    assert!(count("kube_zerocopy_reconciles_total") >= 1.0);
    assert!(count(r#"kube_zerocopy_reconcile_duration_seconds_count{outcome="success"}"#) >= 1.0);

    // A clean shutdown (SIGTERM, a rolling update): exit 0 and the lease handed back.
    let status = operator.terminate();
    assert!(status.success(), "the leader's shutdown: {status}");
    standby.leading().await;
    reconciled(&admin, "after-handover").await;

    // The new leader crashes (SIGKILL: no hand-back): the restarted first replica, standing
    // by meanwhile, takes over once the lease lapses.
    *operator = Operator::start(&env.kubeconfig, &env.log, "operator-0");
    operator.standing_by().await;
    standby.kill();
    operator.leading().await;
    reconciled(&admin, "after-takeover").await;
    drop(standby);

    // Another holder takes the lease (as a replica would after this one stalled past its
    // lease): the operator sees it at its next renewal and exits.
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
    let status = eventually("the operator to exit", MINUTE, || {
        let exited = operator.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(
        !status.success(),
        "exit status after losing the lease: {status}"
    );
    let logged = std::fs::read_to_string(&env.log).unwrap();
    assert!(
        logged.contains(
            "lost the leader lease kube-zerocopy/kube-zerocopy-operator to another replica"
        ),
        "the operator's log does not say why it exited"
    );
    // The lease freed, a new operator leads at once, for the scenarios after this one.
    leases
        .delete("kube-zerocopy-operator", &DeleteParams::default())
        .await
        .unwrap();
    *operator = Operator::start(&env.kubeconfig, &env.log, "operator-0");
    operator.leading().await;
}

/// Deleting every pipeline of every scenario removes what each owned, and the operator says
/// nothing alarming about objects that are simply gone.
pub async fn deleting_pipelines_removes_their_objects_without_warnings(env: Arc<Env>) {
    let admin = env.cluster.lock().await.client().await.unwrap();
    let mut operator = env.operator.lock().await;
    operator.leading().await;
    let logged_before = std::fs::read_to_string(&env.log).unwrap().len();
    let all: Api<InferencePipeline> = Api::all(admin.clone());
    let pipelines = all.list(&ListParams::default()).await.unwrap();
    assert!(
        pipelines.items.len() >= 8,
        "{} pipelines",
        pipelines.items.len()
    );
    for p in &pipelines.items {
        let api: Api<InferencePipeline> = Api::namespaced(admin.clone(), &p.namespace().unwrap());
        api.delete(&p.name_any(), &DeleteParams::foreground())
            .await
            .unwrap();
    }
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=kube-zerocopy");
    let (jobs, deployments, services): (Api<Job>, Api<Deployment>, Api<Service>) = (
        Api::all(admin.clone()),
        Api::all(admin.clone()),
        Api::all(admin.clone()),
    );
    eventually("every owned object to be deleted", 2 * MINUTE, || async {
        let left = jobs.list(&managed).await.ok()?.items.len()
            + deployments.list(&managed).await.ok()?.items.len()
            + services.list(&managed).await.ok()?.items.len();
        (left == 0).then_some(())
    })
    .await;
    // Deletion events of the owned objects arrive after their pipeline's: give them time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let logged = std::fs::read_to_string(&env.log).unwrap();
    let alarming: Vec<_> = logged[logged_before..]
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        alarming.is_empty(),
        "deleting {} pipelines made the operator log {} warnings, e.g. {:?}",
        pipelines.items.len(),
        alarming.len(),
        alarming.first()
    );
}
