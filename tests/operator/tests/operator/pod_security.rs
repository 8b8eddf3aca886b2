//! Node sharing in a namespace that enforces Pod Security "restricted": its pods mount their
//! models through the node agent's CSI volume (no hostPath), so the real admission lets them
//! in and the operator creates the pipeline's objects as anywhere else. So do a Task's on S3
//! prefixes: its planning pod, and its workers that mount the data's credentials; and GPU
//! pods, one GPU, several or a MIG slice.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodTemplateSpec};
use kube::api::{Api, PostParams};
use kube_zerocopy::crd::{InferencePipeline, PlannedInput, Sharing};
use kube_zerocopy::render::{self, Rendered};
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;

use crate::support::{actor_pipeline, task_pipeline, Env, MINUTE};

pub async fn node_sharing_pods_pass_restricted(env: Arc<Env>) {
    let (admin, settings) = (&env.admin, &env.settings);
    const PSA_NS: &str = "restricted-pipelines";
    let restricted: Namespace = serde_json::from_value(json!({"metadata": {
        "name": PSA_NS, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
    .unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &restricted)
        .await
        .unwrap();
    let mut task = task_pipeline("node-task", PSA_NS, 2);
    task.spec.sharing = Sharing::Node;
    let mut actor = actor_pipeline(
        "node-actor",
        PSA_NS,
        2,
        "http://models.internal/mlp.safetensors",
    );
    actor.spec.sharing = Sharing::Node;
    // A Task on S3 prefixes whose shards are planned: its planning pod and, once planned, its
    // workers with the data's credentials.
    let mut on_s3 = kube_zerocopy::local::load_pipeline(
        &kube_zerocopy_test_env::repo().join("examples/task-s3.yaml"),
    )
    .unwrap();
    on_s3.metadata.namespace = Some(PSA_NS.into());
    let plan = PlannedInput {
        shards: 3,
        input_digest: "0".repeat(64),
    };

    // GPU pods: the example (one GPU), two GPUs, and a MIG slice, each asked of the template's
    // limits alone; the API server refuses an extended resource requested other than limited.
    let gpus = |name: &str, limits: serde_json::Value| {
        let mut p = kube_zerocopy::local::load_pipeline(
            &kube_zerocopy_test_env::repo().join("examples/task-safetensors.yaml"),
        )
        .unwrap();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some(PSA_NS.into());
        if !limits.is_null() {
            let template = p.spec.template.as_mut().unwrap();
            template.resources = Some(serde_json::from_value(json!({"limits": limits})).unwrap());
        }
        p
    };
    let one_gpu = gpus("one-gpu", serde_json::Value::Null);
    let two_gpus = gpus("two-gpus", json!({"nvidia.com/gpu": "2"}));
    let mig = gpus("mig-slice", json!({"nvidia.com/mig-1g.10gb": "1"}));

    // The API server's own admission takes each rendered pod (a dry run creates nothing).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), PSA_NS);
    let rendered = [
        (&task, None),
        (&actor, None),
        (&on_s3, None),
        (&on_s3, Some(&plan)),
        (&one_gpu, None),
        (&two_gpus, None),
        (&mig, None),
    ];
    for (pipeline, plan) in rendered {
        let template: PodTemplateSpec =
            match render::render_planned(pipeline, settings, plan).unwrap() {
                Rendered::Task { job } | Rendered::Plan { job } => job.spec.unwrap().template,
                Rendered::Actor { deployment, .. } => deployment.spec.unwrap().template,
            };
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("admission-probe".into()),
                ..Default::default()
            },
            spec: template.spec,
            ..Default::default()
        };
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        if let Err(e) = pods.create(&dry_run, &pod).await {
            panic!(
                "{}: restricted admission refused the pod: {e}",
                pipeline.metadata.name.as_deref().unwrap()
            );
        }
    }

    // And the operator makes their objects there.
    let pipelines: Api<InferencePipeline> = Api::namespaced(admin.clone(), PSA_NS);
    for pipeline in [&task, &actor, &on_s3] {
        pipelines
            .create(&PostParams::default(), pipeline)
            .await
            .unwrap();
    }
    let jobs: Api<Job> = Api::namespaced(admin.clone(), PSA_NS);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), PSA_NS);
    eventually("the Node-sharing Job", MINUTE, || async {
        jobs.get_opt("node-task-zerocopy").await.unwrap()
    })
    .await;
    eventually("the S3 Task's planning Job", MINUTE, || async {
        jobs.get_opt("embed-s3-plan").await.unwrap()
    })
    .await;
    eventually("the Node-sharing Deployment", MINUTE, || async {
        deployments.get_opt("node-actor-zerocopy").await.unwrap()
    })
    .await;
}
