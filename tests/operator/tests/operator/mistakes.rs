//! A first-time user's mistakes: each is refused by the API server in the words
//! `kube-zerocopy render` uses, or becomes a Blocked or Degraded pipeline whose condition,
//! Warning event and `kubectl get` row say why, and which goes on once fixed.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy::status::Reason;
use kube_zerocopy::validation;
use kube_zerocopy_test_env::invalid::invalid_pipelines;
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;

use crate::support::{actor_pipeline, degraded_with, task_pipeline, wait_warning, Env, MINUTE};

/// Invalid pipelines are rejected by the API server's schema and CEL rules with the message,
/// and `kube-zerocopy render` refuses each with the same words. Sent as raw objects: some (an
/// unknown mode) cannot even be held by the Rust types.
pub async fn invalid_pipelines_are_rejected_in_the_cli_s_words(env: Arc<Env>) {
    let ns = env.namespace("invalid").await;
    let raw: Api<DynamicObject> = Api::namespaced_with(
        env.admin.clone(),
        &ns,
        &ApiResource::erase::<InferencePipeline>(&()),
    );
    let mut worded_otherwise = Vec::new();
    for (what, yaml, message) in invalid_pipelines(&ns) {
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
}

/// A template with a hostPath volume, which the operator's default policy forbids: Blocked
/// with ForbiddenByPolicy and the chart value that would allow it; no Job.
pub async fn a_template_with_a_host_path_is_forbidden_by_policy(env: Arc<Env>) {
    let ns = env.namespace("forbidden").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut forbidden = task_pipeline("forbidden", &ns, 1);
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
    let (phase, degraded) = eventually("the forbidden pipeline to say why", MINUTE, || {
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

    // The rest of the policy, through the chart's own settings: a network file system named
    // inline, a toleration of control-plane nodes' taint, the pod's token projected.
    for (name, template, words) in [
        (
            "nfs",
            json!({"volumes": [{"name": "share", "nfs": {"server": "10.0.0.1", "path": "/"}}]}),
            "is a volume of type nfs",
        ),
        (
            "taint",
            json!({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}),
            "pipelinePolicy.tolerationKeys: nvidia.com/gpu",
        ),
        (
            "token",
            json!({"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}]}),
            "projects the pod's ServiceAccount token",
        ),
    ] {
        let name = format!("forbidden-{name}");
        let mut p = task_pipeline(&name, &ns, 1);
        p.spec.template = Some(serde_json::from_value(template).unwrap());
        pipelines.create(&PostParams::default(), &p).await.unwrap();
        let (_, degraded) = eventually(&format!("{name} to say why"), MINUTE, || {
            degraded_with(&pipelines, &name, Reason::ForbiddenByPolicy.as_str())
        })
        .await;
        println!("forbidden: {}", degraded.message);
        assert!(degraded.message.contains(words), "{}", degraded.message);
        let job = format!("{name}-zerocopy");
        assert!(jobs.get_opt(&job).await.unwrap().is_none());
    }
}

/// A pipeline the schema lets through but whose Job the API server refuses (a nodeSelector key
/// that is no label key): Blocked with the API server's reason, in its status, in a Warning
/// event and in `kubectl get`'s Reason column; fixed, it runs.
pub async fn a_pipeline_whose_job_is_refused_says_why_until_fixed(env: Arc<Env>) {
    let ns = env.namespace("refused").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut p = task_pipeline("refused", &ns, 2);
    p.spec.template.as_mut().unwrap().node_selector =
        Some([("not a label key".to_string(), "x".to_string())].into());
    pipelines.create(&PostParams::default(), &p).await.unwrap();
    let (phase, degraded) = eventually("the refused pipeline to say why", MINUTE, || {
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
    wait_warning(
        &env,
        &ns,
        "refused",
        Reason::ObjectsRefused,
        "not a label key",
    )
    .await;
    // `kubectl get ipl` shows the reason; `-o wide` adds what it runs.
    let table: serde_json::Value = env
        .admin
        .request(
            http::Request::get(format!(
                "/apis/kube-zerocopy.io/v1alpha1/namespaces/{ns}/inferencepipelines?includeObject=None"
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
    eventually("the fixed pipeline's Job", MINUTE, || async {
        jobs.get_opt("refused-zerocopy").await.unwrap()
    })
    .await;
    eventually("the fixed pipeline to leave Blocked", MINUTE, || async {
        let s = pipelines.get("refused").await.unwrap().status?;
        (s.phase != Some(Phase::Blocked)).then_some(())
    })
    .await;
}

/// A malformed quantity in the template, which the API server does not check inside a
/// pipeline: the operator does, and the pipeline is Blocked with the field and the value.
pub async fn a_pipeline_with_a_bad_quantity_reports_why(env: Arc<Env>) {
    let ns = env.namespace("bad-quantity").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut p = task_pipeline("bad-resources", &ns, 2);
    p.spec.template =
        Some(serde_json::from_value(json!({"resources": {"limits": {"memory": "lots"}}})).unwrap());
    pipelines.create(&PostParams::default(), &p).await.unwrap();
    let (phase, degraded) = eventually(
        "the pipeline with a bad quantity to say why",
        MINUTE,
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
}

/// A Service of the pipeline's object name that someone else made: the pipeline is Blocked
/// with ObjectNotOwned and the Service is left as it was (server-side apply with force used to
/// take it over, and deleting the pipeline then deleted it); once it is gone, the pipeline runs.
pub async fn a_foreign_object_of_the_same_name_is_not_taken_over(env: Arc<Env>) {
    let ns = env.namespace("squatted").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let services: Api<Service> = env.api(&ns);
    let deployments: Api<Deployment> = env.api(&ns);
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
            &actor_pipeline("squatted", &ns, 1, "file:///models/a.safetensors"),
        )
        .await
        .unwrap();
    let (phase, degraded) =
        eventually("the pipeline to refuse the foreign Service", MINUTE, || {
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
    eventually("the pipeline's own Deployment", 2 * MINUTE, || async {
        deployments.get_opt("squatted-zerocopy").await.unwrap()
    })
    .await;
    let own = services.get("squatted-zerocopy").await.unwrap();
    assert_eq!(own.owner_references()[0].name, "squatted");
}

/// A pipeline whose pods need a claim that does not exist: the scheduler cannot place them,
/// and the pipeline says so with the scheduler's words (it read "Running, 2 running" before).
pub async fn a_pipeline_whose_pods_cannot_be_scheduled_says_why(env: Arc<Env>) {
    let ns = env.namespace("unschedulable").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let mut p = task_pipeline("no-claim", &ns, 2);
    // The data volume is a claim that does not exist.
    p.spec.template.as_mut().unwrap().volumes = Some(
        serde_json::from_value(json!([
            {"name": "models", "emptyDir": {}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "sentiment-data"}},
        ]))
        .unwrap(),
    );
    pipelines.create(&PostParams::default(), &p).await.unwrap();
    let (phase, degraded) = eventually("the pipeline to say its pods cannot run", MINUTE, || {
        degraded_with(&pipelines, "no-claim", Reason::PodsUnschedulable.as_str())
    })
    .await;
    println!("unschedulable ({phase:?}): {}", degraded.message);
    assert_eq!(degraded.status, "True");
    assert!(
        degraded.message.contains("sentiment-data") && degraded.message.contains("not found"),
        "{}",
        degraded.message
    );
    wait_warning(
        &env,
        &ns,
        "no-claim",
        Reason::PodsUnschedulable,
        "sentiment-data",
    )
    .await;
}
