//! `make bench-operator`: how fast the operator brings pipelines to their first applied state,
//! against one client server-side applying the same rendered objects directly, in one run on
//! one real control plane.
//!
//! 200 Task pipelines are created while no operator runs; the operator is started and timed
//! until every pipeline's Job exists. Then the same 200 pipelines' rendered Jobs (another
//! namespace) are applied by one client, one after the other, and timed. The last line is
//! `reconcile-efficiency operator/raw_apply = X`: the operator's rate over the raw rate.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::CustomResourceExt;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::render::{render, Rendered, Settings};
use kube_zerocopy_e2e::bin;
use kube_zerocopy_e2e::cluster::ControlPlane;

const PIPELINES: usize = 200;

fn pipeline(ns: &str, i: usize) -> InferencePipeline {
    kube_zerocopy_e2e::task_pipeline(&format!("p{i:03}"), ns, 1, 1)
}

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?,
    )
    .await?;
    Ok(())
}

async fn count_jobs(jobs: &Api<Job>) -> Result<usize> {
    Ok(jobs.list(&ListParams::default()).await?.items.len())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    println!(
        "bench-operator: control plane up in {:.1} s",
        cp.startup_time().as_secs_f64()
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &InferencePipeline::crd())
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    namespace(&client, "through-operator").await?;
    namespace(&client, "raw-apply").await?;

    // Through the operator: pipelines first, then the operator, timed to the last Job.
    let pipelines: Api<InferencePipeline> = Api::namespaced(client.clone(), "through-operator");
    for i in 0..PIPELINES {
        pipelines
            .create(&PostParams::default(), &pipeline("through-operator", i))
            .await?;
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), "through-operator");
    let started = Instant::now();
    let mut operator = std::process::Command::new(bin("kube-zerocopy"))
        .arg("operator")
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("KZC_METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the operator")?;
    while count_jobs(&jobs).await? < PIPELINES {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the operator did not apply every Job in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let operator_secs = started.elapsed().as_secs_f64();
    let _ = operator.kill();
    let _ = operator.wait();

    // One client applying the same rendered objects directly.
    let raw_jobs: Api<Job> = Api::namespaced(client.clone(), "raw-apply");
    let settings = Settings::default();
    let rendered: Vec<Job> = (0..PIPELINES)
        .map(|i| match render(&pipeline("raw-apply", i), &settings) {
            Ok(Rendered::Task { job }) => *job,
            _ => unreachable!("a Task pipeline renders a Job"),
        })
        .collect();
    let started = Instant::now();
    let apply = PatchParams::apply("bench-raw").force();
    for job in &rendered {
        raw_jobs
            .patch(
                job.metadata.name.as_deref().unwrap(),
                &apply,
                &Patch::Apply(job),
            )
            .await?;
    }
    let raw_secs = started.elapsed().as_secs_f64();

    let operator_rate = PIPELINES as f64 / operator_secs;
    let raw_rate = PIPELINES as f64 / raw_secs;
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("operator:  {PIPELINES} pipelines to their first applied Job in {operator_secs:.2} s ({operator_rate:.1}/s), from operator start");
    println!("raw apply: {PIPELINES} rendered Jobs server-side applied by one client in {raw_secs:.2} s ({raw_rate:.1}/s)");
    println!(
        "reconcile-efficiency operator/raw_apply = {:.2}",
        operator_rate / raw_rate
    );
    Ok(())
}
