//! Pipelines held back: `spec.suspend`, and admission by a real Kueue (its own controller
//! against this API server, a ClusterQueue with quota for one pipeline's pods at a time).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::ResourceExt;
use kube_zerocopy::crd::{InferencePipeline, InferencePipelineStatus, Phase};
use kube_zerocopy::queue::QUEUE_LABEL;
use kube_zerocopy_test_env::wait::{eventually, eventually_seen};
use serde_json::json;

use crate::support::{actor_pipeline, task_pipeline, wait_phase, Env, MINUTE};

fn progressing(status: &InferencePipelineStatus) -> (String, String) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .expect("a Progressing condition");
    (c.reason.clone(), c.message.clone())
}

async fn set_suspend(pipelines: &Api<InferencePipeline>, name: &str, suspend: bool) {
    pipelines
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": suspend}})),
        )
        .await
        .unwrap();
}

/// A Task pipeline created suspended makes no Job; resumed, it runs; suspended mid-run, its
/// Job stops its pods and keeps the shards done; resumed, the same Job finishes. An Actor
/// pipeline created suspended has no replicas until resumed.
pub async fn a_suspended_pipeline_runs_only_while_resumed(env: Arc<Env>) {
    let ns = env.namespace("suspend").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut held = task_pipeline("held", &ns, 20);
    held.spec.task.as_mut().unwrap().parallelism = Some(1);
    held.spec.suspend = Some(true);
    pipelines
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    let status = wait_phase(&pipelines, "held", Phase::Suspended, None, MINUTE).await;
    assert_eq!(
        progressing(&status),
        (
            "Suspended".into(),
            "spec.suspend is true: no Job is created; set it to false to go on".into()
        )
    );
    assert!(jobs.get_opt("held-zerocopy").await.unwrap().is_none());

    set_suspend(&pipelines, "held", false).await;
    let running = eventually("two shards done", 2 * MINUTE, || async {
        let job = jobs.get_opt("held-zerocopy").await.unwrap()?;
        let done = job.status.as_ref()?.succeeded.unwrap_or(0);
        (done >= 2).then_some(job)
    })
    .await;
    set_suspend(&pipelines, "held", true).await;
    let status = wait_phase(&pipelines, "held", Phase::Suspended, None, MINUTE).await;
    assert_eq!(
        progressing(&status).1,
        "spec.suspend is true: the Job is suspended and its pods stopped (the shards done stay \
         done); set it to false to go on"
    );
    let stopped = eventually("the Job suspended, no pod left", MINUTE, || async {
        let job = jobs.get("held-zerocopy").await.unwrap();
        let status = job.status.clone()?;
        let suspended = job.spec.as_ref()?.suspend == Some(true);
        (suspended && status.active.unwrap_or(0) == 0).then_some(job)
    })
    .await;
    let done_when_held = stopped.status.as_ref().unwrap().succeeded.unwrap_or(0);
    assert!(
        done_when_held < 20,
        "every shard ran before the pipeline was suspended: nothing was held"
    );
    // Held means held: no pod of the pipeline runs, and no shard is done meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods: Api<Pod> = env.api(&ns);
    let running_pods = pods
        .list(&ListParams::default().labels("kube-zerocopy.io/pipeline=held"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            matches!(phase, Some("Pending" | "Running"))
        })
        .count();
    assert_eq!(running_pods, 0, "pods of a suspended pipeline run");
    let later = jobs.get("held-zerocopy").await.unwrap();
    assert_eq!(
        later.status.as_ref().unwrap().succeeded.unwrap_or(0),
        done_when_held
    );

    set_suspend(&pipelines, "held", false).await;
    wait_phase(
        &pipelines,
        "held",
        Phase::Succeeded,
        Some("20/20"),
        3 * MINUTE,
    )
    .await;
    let finished = jobs.get("held-zerocopy").await.unwrap();
    assert_eq!(finished.uid(), running.uid(), "the Job was made anew");

    let deployments: Api<Deployment> = env.api(&ns);
    let mut server = actor_pipeline("server", &ns, 2, "file:///models/a.safetensors");
    server.spec.suspend = Some(true);
    pipelines
        .create(&PostParams::default(), &server)
        .await
        .unwrap();
    let status = wait_phase(&pipelines, "server", Phase::Suspended, None, MINUTE).await;
    assert_eq!(
        progressing(&status).1,
        "spec.suspend is true: the replicas are scaled to 0; set it to false to go on"
    );
    let replicas = deployments
        .get("server-zerocopy")
        .await
        .unwrap()
        .spec
        .unwrap()
        .replicas;
    assert_eq!(replicas, Some(0));
    set_suspend(&pipelines, "server", false).await;
    wait_phase(&pipelines, "server", Phase::Ready, Some("2/2"), 3 * MINUTE).await;
}

fn kueue_api(env: &Env, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind);
    let resource = ApiResource::from_gvk(&gvk);
    match ns {
        Some(ns) => Api::namespaced_with(env.admin.clone(), ns, &resource),
        None => Api::all_with(env.admin.clone(), &resource),
    }
}

async fn create_kueue(env: &Env, kind: &str, ns: Option<&str>, object: serde_json::Value) {
    let mut object: DynamicObject = serde_json::from_value(object).unwrap();
    object.types = Some(kube::api::TypeMeta {
        api_version: "kueue.x-k8s.io/v1beta2".into(),
        kind: kind.into(),
    });
    kueue_api(env, kind, ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating the {kind}: {e}"));
}

/// A pipeline of `shards` shards, one pod at a time, each pod asking for one cpu, queued in
/// LocalQueue "team".
fn queued(name: &str, ns: &str, shards: i32) -> InferencePipeline {
    let mut pipeline = kube_zerocopy_test_env::task_pipeline(name, ns, shards, 1);
    pipeline
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(QUEUE_LABEL.into(), "team".into());
    pipeline.spec.template.as_mut().unwrap().resources =
        Some(serde_json::from_value(json!({"requests": {"cpu": "1"}})).unwrap());
    pipeline
}

/// Two pipelines in a queue whose quota holds one of them: the second waits (Queued, in
/// Kueue's words) until the first is done, then runs; suspending it meanwhile deactivates
/// its Workload, and resuming it queues it again. The operator creates the Jobs suspended
/// once and leaves their suspend to Kueue.
pub async fn queued_pipelines_wait_for_quota_and_run_in_turn(env: Arc<Env>) {
    let ns = env.namespace("queue").await;
    println!("Kueue's log: {}", env.kueue.log.display());
    let flavor = format!("{ns}-flavor");
    create_kueue(
        &env,
        "ResourceFlavor",
        None,
        json!({"metadata": {"name": flavor}}),
    )
    .await;
    create_kueue(
        &env,
        "ClusterQueue",
        None,
        json!({
            "metadata": {"name": ns},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "resourceGroups": [{
                    "coveredResources": ["cpu", "memory"],
                    "flavors": [{"name": flavor, "resources": [
                        {"name": "cpu", "nominalQuota": "1"},
                        {"name": "memory", "nominalQuota": "64Gi"},
                    ]}],
                }],
            },
        }),
    )
    .await;
    create_kueue(
        &env,
        "LocalQueue",
        Some(&ns),
        json!({"metadata": {"name": "team", "namespace": ns}, "spec": {"clusterQueue": ns}}),
    )
    .await;

    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    pipelines
        // Long enough (kwok runs a shard in about a second) that the operator looks at the
        // second pipeline (every 15 s while it is queued) while the first still holds the quota.
        .create(&PostParams::default(), &queued("first", &ns, 60))
        .await
        .unwrap();
    wait_phase(&pipelines, "first", Phase::Running, None, 2 * MINUTE).await;
    pipelines
        .create(&PostParams::default(), &queued("second", &ns, 3))
        .await
        .unwrap();
    let status = eventually_seen("second waiting in Kueue's words", MINUTE, || async {
        let Some(status) = pipelines.get("second").await?.status else {
            return Ok((None, "no status".into()));
        };
        let seen = format!("{:?}: {:?}", status.phase, progressing(&status));
        let (_, message) = progressing(&status);
        let queued = status.phase == Some(Phase::Queued) && message.contains("quota");
        Ok((queued.then_some(status), seen))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (reason, message) = progressing(&status);
    assert_eq!(reason, "WaitingForAdmission");
    assert!(
        message.starts_with("waiting for Kueue to admit the Job in LocalQueue team: "),
        "{message}"
    );
    println!("second, queued: {message}");
    let waiting = jobs.get("second-zerocopy").await.unwrap();
    assert_eq!(
        waiting.labels().get(QUEUE_LABEL).map(String::as_str),
        Some("team")
    );
    assert_eq!(waiting.spec.as_ref().unwrap().suspend, Some(true));
    let pods: Api<Pod> = env.api(&ns);
    let second_pods = pods
        .list(&ListParams::default().labels("kube-zerocopy.io/pipeline=second"))
        .await
        .unwrap();
    assert!(second_pods.items.is_empty(), "a queued pipeline has pods");

    // Suspended while queued: its Workload is deactivated; resumed: active again.
    let workloads = kueue_api(&env, "Workload", Some(&ns));
    let of_second = ListParams::default().labels(&format!(
        "kueue.x-k8s.io/job-uid={}",
        waiting.uid().unwrap()
    ));
    let workload_active = |active: bool| {
        let (workloads, of_second) = (workloads.clone(), of_second.clone());
        async move {
            let list = workloads.list(&of_second).await.unwrap();
            let w = list.items.first()?;
            (w.data["spec"]["active"].as_bool().unwrap_or(true) == active).then_some(())
        }
    };
    set_suspend(&pipelines, "second", true).await;
    wait_phase(&pipelines, "second", Phase::Suspended, None, MINUTE).await;
    eventually("second's Workload deactivated", MINUTE, || {
        workload_active(false)
    })
    .await;
    set_suspend(&pipelines, "second", false).await;
    eventually("second's Workload active again", MINUTE, || {
        workload_active(true)
    })
    .await;

    wait_phase(
        &pipelines,
        "first",
        Phase::Succeeded,
        Some("60/60"),
        4 * MINUTE,
    )
    .await;
    wait_phase(
        &pipelines,
        "second",
        Phase::Succeeded,
        Some("3/3"),
        3 * MINUTE,
    )
    .await;
    let first = jobs.get("first-zerocopy").await.unwrap();
    let second = jobs.get("second-zerocopy").await.unwrap();
    // Kueue admitted both (its labels on the pod template), the operator did not suspend
    // them again, and the second started only once the first had finished.
    for job in [&first, &second] {
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.suspend, Some(false));
        let template_labels = spec.template.metadata.as_ref().unwrap().labels.clone();
        assert!(
            template_labels
                .unwrap_or_default()
                .contains_key("kueue.x-k8s.io/podset"),
            "{:?} was not admitted by Kueue",
            job.metadata.name
        );
    }
    let first_done = first.status.unwrap().completion_time.unwrap().0;
    let second_started = second.status.unwrap().start_time.unwrap().0;
    assert!(
        second_started >= first_done,
        "second started at {second_started}, before first finished at {first_done}"
    );
}

/// Where Kueue manages Jobs without its queue label too, it suspends an unlabelled pipeline's
/// Job when it is made and resumes it once admitted. The operator used to resume such a Job at
/// its next look, starting pods Kueue had not admitted. Here another controller suspends the
/// Job as Kueue would: it stays suspended, the pipeline is Queued and says by whom; resumed by
/// that controller, it runs to the end.
pub async fn a_job_another_controller_suspended_is_not_resumed_by_the_operator(env: Arc<Env>) {
    let ns = env.namespace("held-elsewhere").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut managed = task_pipeline("managed", &ns, 30);
    managed.spec.task.as_mut().unwrap().parallelism = Some(1);
    pipelines
        .create(&PostParams::default(), &managed)
        .await
        .unwrap();
    eventually("the Job", MINUTE, || async {
        jobs.get_opt("managed-zerocopy").await.unwrap()
    })
    .await;
    let admission = |suspend: bool| {
        let jobs = jobs.clone();
        async move {
            let as_kueue = PatchParams {
                field_manager: Some("kueue-admission".into()),
                ..Default::default()
            };
            let patch = json!({"spec": {"suspend": suspend}});
            jobs.patch("managed-zerocopy", &as_kueue, &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    admission(true).await;
    let status = eventually(
        "the pipeline Queued, by another controller",
        MINUTE,
        || async {
            let s = pipelines.get("managed").await.unwrap().status?;
            (s.phase == Some(Phase::Queued) && progressing(&s).1.contains("another controller"))
                .then_some(s)
        },
    )
    .await;
    println!("held elsewhere: {}", progressing(&status).1);
    // Looked at again (the status was written after the suspension): still suspended.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let job = jobs.get("managed-zerocopy").await.unwrap();
    assert_eq!(
        job.spec.unwrap().suspend,
        Some(true),
        "the operator resumed it"
    );

    admission(false).await;
    wait_phase(&pipelines, "managed", Phase::Succeeded, None, 3 * MINUTE).await;
}
