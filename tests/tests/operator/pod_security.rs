//! Node sharing in a namespace that enforces Pod Security "restricted": its hostPath volume
//! would be refused, so no Job, and the pipeline says why; relabelled privileged, it runs.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_zerocopy::crd::{InferencePipeline, Phase, Sharing};
use kube_zerocopy::pod_security::ENFORCE_LABEL;
use kube_zerocopy::render::{self, Rendered};
use kube_zerocopy::status::Reason;
use kube_zerocopy_e2e::wait::eventually;
use serde_json::json;

use crate::support::{degraded_with, wait_warning, Env, MINUTE};

pub async fn node_sharing_waits_with_a_reason_until_the_namespace_allows_it(env: Arc<Env>) {
    let (admin, settings) = (&env.admin, &env.settings);
    const PSA_NS: &str = "restricted-pipelines";
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
        MINUTE,
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
    wait_warning(
        &env,
        PSA_NS,
        "node-shared",
        Reason::PodSecurityForbidsNodeSharing,
        "",
    )
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
    eventually("the Job once the namespace allows it", MINUTE, || async {
        jobs.get_opt("node-shared-zerocopy").await.unwrap()
    })
    .await;
    println!("Job created {:?} after the relabel", relabelled.elapsed());
    let (phase, cleared) = eventually("the condition to clear", MINUTE, || {
        degraded_with(&pipelines, "node-shared", "AsExpected")
    })
    .await;
    assert_eq!(cleared.status, "False");
    assert_ne!(phase, Some(Phase::Blocked));
}
