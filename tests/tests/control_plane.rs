//! Smoke test of the real control plane (tests/src/cluster.rs): a Deployment's pods go
//! Running and Ready on kwok's fake Nodes, an Indexed Job's pods Succeed, and helm runs.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube_zerocopy_e2e::cluster::ControlPlane;
use kube_zerocopy_e2e::wait::eventually_seen;
use serde_json::json;

const NAMESPACE: &str = "smoke";
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn deployment_and_job_run_on_fake_nodes() -> Result<()> {
    let cp = ControlPlane::start().await?;
    eprintln!(
        "control plane up in {:.1?} (files: {})",
        cp.startup_time(),
        cp.dir().display()
    );
    let client = cp.client().await?;
    let pp = PostParams::default();

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &pp,
            &serde_json::from_value(json!({ "metadata": { "name": NAMESPACE } }))?,
        )
        .await?;

    let began = Instant::now();
    let labels = json!({ "app": "smoke-server" });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    deployments
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": { "name": "smoke-server" },
                "spec": {
                    "replicas": 2,
                    "selector": { "matchLabels": labels },
                    "template": {
                        "metadata": { "labels": labels },
                        "spec": { "containers": [{ "name": "server", "image": "example/worker:1" }] },
                    },
                },
            }))?,
        )
        .await?;

    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    jobs.create(
        &pp,
        &serde_json::from_value(json!({
            "metadata": { "name": "smoke-job" },
            "spec": {
                "completions": 3,
                "parallelism": 3,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{ "name": "worker", "image": "example/worker:1" }],
                    },
                },
            },
        }))?,
    )
    .await?;

    deployment_available(&deployments, 2).await?;
    eprintln!("Deployment available after {:.1?}", began.elapsed());

    eventually_seen("the Job to have 3 succeeded pods", TIMEOUT, || {
        let jobs = jobs.clone();
        async move {
            let j = jobs.get("smoke-job").await?;
            let succeeded = j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0);
            Ok(((succeeded == 3).then_some(()), format!("{:?}", j.status)))
        }
    })
    .await?;
    eprintln!("Job succeeded after {:.1?}", began.elapsed());

    let out = cp.helm().arg("version").output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm version: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(version.contains("v3."), "helm version printed {version}");
    eprintln!("helm version: {}", version.trim());

    // The apiserver goes away and comes back on the same port and data; the controllers,
    // scheduler and kwok reconnect: a scale-up still completes.
    let mut cp = cp;
    let stopped = Instant::now();
    cp.stop_apiserver().await?;
    assert!(deployments.get("smoke-server").await.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_apiserver().await?;
    eprintln!("apiserver back after {:.1?}", stopped.elapsed());
    deployments
        .patch(
            "smoke-server",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "replicas": 3 } })),
        )
        .await?;
    deployment_available(&deployments, 3).await?;
    eprintln!("scaled to 3 after the restart in {:.1?}", stopped.elapsed());
    Ok(())
}

/// Waits until the smoke Deployment has `replicas` available.
async fn deployment_available(deployments: &Api<Deployment>, replicas: i32) -> Result<()> {
    eventually_seen(
        &format!("the Deployment to have {replicas} available replicas"),
        TIMEOUT,
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get("smoke-server").await?;
                let available = d
                    .status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                Ok((
                    (available == replicas).then_some(()),
                    format!("{:?}", d.status),
                ))
            }
        },
    )
    .await
}
