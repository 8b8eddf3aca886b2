//! Actor pipelines: a Deployment and a Service; replicas become available; changes roll out.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy_e2e::wait::eventually;
use serde_json::json;

use crate::support::{actor_pipeline, wait_phase, Env, MINUTE};

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
