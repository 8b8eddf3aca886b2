//! Actor pipelines: a Deployment and a Service; replicas become available; changes roll out.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy::status::Reason;
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;

use crate::support::{actor_pipeline, degraded_with, wait_phase, Env, MINUTE};

pub async fn an_actor_pipeline_scales_and_rolls_out_a_new_model(env: Arc<Env>) {
    let ns = env.namespace("actor").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let deployments: Api<Deployment> = env.api(&ns);
    let services: Api<Service> = env.api(&ns);
    pipelines
        .create(
            &PostParams::default(),
            &actor_pipeline("online", &ns, 2, "file:///models/a.safetensors"),
        )
        .await
        .unwrap();
    eventually("the Service", MINUTE, || async {
        services.get_opt("online-zerocopy").await.unwrap()
    })
    .await;
    // Only the namespace's pods reach the replicas: a policy the API server took as it is.
    let policies: Api<NetworkPolicy> = env.api(&ns);
    let policy = eventually("the NetworkPolicy", MINUTE, || async {
        policies.get_opt("online-zerocopy").await.unwrap()
    })
    .await;
    let spec = serde_json::to_value(policy.spec.unwrap()).unwrap();
    assert_eq!(
        spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "actor"
    );
    assert_eq!(spec["ingress"], json!([{"from": [{"podSelector": {}}]}]));
    let ready = |replicas: &'static str| {
        wait_phase(
            &pipelines,
            "online",
            Phase::Ready,
            Some(replicas),
            3 * MINUTE,
        )
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
        MINUTE,
        || async {
            let d = deployments.get("online-zerocopy").await.unwrap();
            let vars = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .env
                .clone()?;
            vars.iter()
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
}

/// A batch run (an Actor with an input and an output) created suspended has no replica and no
/// driver Job; resumed, its driver runs (kwok completes its pod), the pipeline Succeeds with
/// its replicas scaled to 0, and ttlSecondsAfterFinished deletes it with its objects.
pub async fn a_suspended_batch_run_runs_once_resumed_and_expires(env: Arc<Env>) {
    let ns = env.namespace("batch-run").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let deployments: Api<Deployment> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let mut run = actor_pipeline("reviews", &ns, 2, "file:///models/a.safetensors");
    run.spec.input = Some(serde_json::from_value(json!({"uri": "file:///data/in"})).unwrap());
    run.spec.output = Some(serde_json::from_value(json!({"uri": "file:///data/out"})).unwrap());
    run.spec.suspend = Some(true);
    // Long enough that a poll sees it Succeeded before it is deleted (3 s was not, once,
    // on a loaded machine).
    run.spec.ttl_seconds_after_finished = Some(15);
    pipelines
        .create(&PostParams::default(), &run)
        .await
        .unwrap();
    wait_phase(&pipelines, "reviews", Phase::Suspended, None, MINUTE).await;
    let replicas = |d: Deployment| d.spec.and_then(|s| s.replicas);
    let held = deployments.get("reviews-zerocopy").await.unwrap();
    assert_eq!(replicas(held), Some(0));
    assert!(jobs
        .get_opt("reviews-zerocopy-driver")
        .await
        .unwrap()
        .is_none());

    pipelines
        .patch(
            "reviews",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap();
    wait_phase(&pipelines, "reviews", Phase::Succeeded, None, 3 * MINUTE).await;
    let done = deployments.get("reviews-zerocopy").await.unwrap();
    assert_eq!(replicas(done), Some(0), "the replicas outlive their run");
    eventually("the finished run deleted after its ttl", MINUTE, || async {
        let gone = pipelines.get_opt("reviews").await.unwrap().is_none();
        let driver_gone = jobs
            .get_opt("reviews-zerocopy-driver")
            .await
            .unwrap()
            .is_none();
        (gone && driver_gone).then_some(())
    })
    .await;
}

/// A batch run whose driver would run under the namespace's own identity: an administrator's
/// ServiceAccount (with a cloud identity), Role (with rights to Secrets) and RoleBinding of
/// the driver's name. The operator used to apply its own over them with force, run the
/// tenant's image under that account, and its owner reference then let the garbage collector
/// delete them with the pipeline. Now the pipeline is Blocked (ObjectNotOwned) on each in
/// turn, none of them changes, no driver Job is made, and they outlive the pipeline.
pub async fn a_pipeline_named_after_an_administrators_account_cannot_take_it_over(env: Arc<Env>) {
    let ns = env.namespace("takeover").await;
    let pipelines: Api<InferencePipeline> = env.api(&ns);
    let accounts: Api<ServiceAccount> = env.api(&ns);
    let roles: Api<Role> = env.api(&ns);
    let bindings: Api<RoleBinding> = env.api(&ns);
    let jobs: Api<Job> = env.api(&ns);
    let name = "etl-zerocopy-driver";
    let cloud = "eks.amazonaws.com/role-arn";
    let account: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {cloud: "arn:aws:iam::1:role/etl-admin"}}
    }))
    .unwrap();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    }))
    .unwrap();
    let post = PostParams::default();
    let account = accounts.create(&post, &account).await.unwrap();
    let role = roles.create(&post, &role).await.unwrap();
    let binding = bindings.create(&post, &binding).await.unwrap();

    let mut run = actor_pipeline("etl", &ns, 1, "file:///models/a.safetensors");
    run.spec.input = Some(serde_json::from_value(json!({"uri": "file:///data/in"})).unwrap());
    run.spec.output = Some(serde_json::from_value(json!({"uri": "file:///data/out"})).unwrap());
    run.spec.template.as_mut().unwrap().image = Some("tenant/own:1".into());
    pipelines.create(&post, &run).await.unwrap();
    let refused = |kind: &'static str| {
        let pipelines = pipelines.clone();
        async move {
            let (phase, degraded) = eventually(
                &format!("the pipeline to refuse the administrator's {kind}"),
                2 * MINUTE,
                || async {
                    degraded_with(&pipelines, "etl", Reason::ObjectNotOwned.as_str())
                        .await
                        .filter(|(_, c)| c.message.contains(&format!("{kind} named {name}")))
                },
            )
            .await;
            println!("refused: {}", degraded.message);
            assert_eq!(phase, Some(Phase::Blocked));
        }
    };
    refused("ServiceAccount").await;
    let unchanged = |before: &kube::api::ObjectMeta, after: &kube::api::ObjectMeta| {
        assert_eq!(before.resource_version, after.resource_version);
        assert!(after.owner_references.is_none());
    };
    unchanged(
        &account.metadata,
        &accounts.get(name).await.unwrap().metadata,
    );
    assert!(
        jobs.get_opt(name).await.unwrap().is_none(),
        "no driver runs"
    );

    // Without the account, the Role is refused in turn; the account the operator then makes
    // is its own (owned by the pipeline) and binds nothing.
    accounts
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    refused("Role").await;
    unchanged(&role.metadata, &roles.get(name).await.unwrap().metadata);
    unchanged(
        &binding.metadata,
        &bindings.get(name).await.unwrap().metadata,
    );
    let own = accounts.get(name).await.unwrap();
    assert_eq!(own.owner_references()[0].name, "etl");
    assert!(own.annotations().get(cloud).is_none());
    assert!(
        jobs.get_opt(name).await.unwrap().is_none(),
        "no driver runs"
    );

    // Deleting the pipeline deletes what it owns (the garbage collector runs) and nothing else.
    pipelines
        .delete("etl", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the pipeline's own account collected",
        2 * MINUTE,
        || async {
            accounts
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    unchanged(&role.metadata, &roles.get(name).await.unwrap().metadata);
    unchanged(
        &binding.metadata,
        &bindings.get(name).await.unwrap().metadata,
    );
}
