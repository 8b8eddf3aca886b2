//! `make bench-operator`: how fast the operator brings pipelines to their first applied state,
//! against one client server-side applying the same rendered objects directly, side by side
//! on one real control plane.
//!
//! Each round: 200 Task pipelines are created in a fresh namespace while no operator runs; an
//! operator watching that namespace is started and timed until every pipeline's Job exists.
//! Then the same 200 pipelines' rendered Jobs (another fresh namespace) are applied by one
//! client, one after the other, and timed. Rounds: KZC_BENCH_ROUNDS (default 5). The last
//! line is `reconcile-efficiency operator/raw_apply = X`: the median operator rate over the
//! median raw rate.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::CustomResourceExt;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::local::median;
use kube_zerocopy::render::{render, Rendered, Settings};
use kube_zerocopy_e2e::bin;
use kube_zerocopy_e2e::cluster::ControlPlane;

/// Pipelines per round: 200, 10 in the smoke mode.
fn pipelines_per_round() -> usize {
    if kube_zerocopy_e2e::bench_smoke() {
        10
    } else {
        200
    }
}

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

/// Seconds for the operator to apply the Jobs of the pipelines created in `ns` before it
/// starts (its start, lease and initial lists included).
async fn through_operator(cp: &ControlPlane, client: &kube::Client, ns: &str) -> Result<f64> {
    namespace(client, ns).await?;
    let pipelines: Api<InferencePipeline> = Api::namespaced(client.clone(), ns);
    for i in 0..pipelines_per_round() {
        pipelines
            .create(&PostParams::default(), &pipeline(ns, i))
            .await?;
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    // The same replica name every round: it takes the leader lease back at once.
    let mut operator = std::process::Command::new(bin("kube-zerocopy"))
        .arg("operator")
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("KZC_WATCH_NAMESPACE", ns)
        .env("KZC_METRICS_LISTEN", "127.0.0.1:0")
        .env("POD_NAME", "bench-operator")
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the operator")?;
    while count_jobs(&jobs).await? < pipelines_per_round() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the operator did not apply every Job in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = operator.kill();
    let _ = operator.wait();
    Ok(secs)
}

/// Seconds for one client to server-side apply the same rendered Jobs into `ns`.
async fn raw_apply(client: &kube::Client, ns: &str) -> Result<f64> {
    namespace(client, ns).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let settings = Settings::default();
    let rendered: Vec<Job> = (0..pipelines_per_round())
        .map(|i| match render(&pipeline(ns, i), &settings) {
            Ok(Rendered::Task { job }) => *job,
            _ => unreachable!("a Task pipeline renders a Job"),
        })
        .collect();
    let started = Instant::now();
    let apply = PatchParams::apply("bench-raw").force();
    for job in &rendered {
        jobs.patch(
            job.metadata.name.as_deref().unwrap(),
            &apply,
            &Patch::Apply(job),
        )
        .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds: usize = match kube_zerocopy_e2e::bench_smoke() {
        true => 1,
        false => std::env::var("KZC_BENCH_ROUNDS")
            .ok()
            .map(|r| r.parse())
            .transpose()
            .context("KZC_BENCH_ROUNDS")?
            .unwrap_or(5),
    };
    let per_round = pipelines_per_round();
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    println!(
        "bench-operator: control plane up in {:.1} s; {} cores; {rounds} rounds of {per_round} pipelines",
        cp.startup_time().as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &InferencePipeline::crd())
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (mut operator_rates, mut raw_rates) = (vec![], vec![]);
    for round in 1..=rounds {
        let operator_secs = through_operator(&cp, &client, &format!("operator-{round}")).await?;
        let raw_secs = raw_apply(&client, &format!("raw-{round}")).await?;
        let (operator_rate, raw_rate) = (
            per_round as f64 / operator_secs,
            per_round as f64 / raw_secs,
        );
        println!(
            "round {round}: operator {operator_secs:.2} s ({operator_rate:.1}/s, from its start), \
             raw apply {raw_secs:.2} s ({raw_rate:.1}/s), ratio {:.2}",
            operator_rate / raw_rate
        );
        operator_rates.push(operator_rate);
        raw_rates.push(raw_rate);
    }
    let (operator_rate, raw_rate) = (median(&operator_rates), median(&raw_rates));
    println!("medians: operator {operator_rate:.1}/s, raw apply {raw_rate:.1}/s");
    println!(
        "reconcile-efficiency operator/raw_apply = {:.2}",
        operator_rate / raw_rate
    );
    Ok(())
}
