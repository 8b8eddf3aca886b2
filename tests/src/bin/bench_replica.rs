//! `make bench-replica`: on the real node, how long a Node-sharing replica takes to be ready
//! when it is the first on its node (the node agent fetches the model over http, verifies and
//! publishes it) against a later one (the model already in the node's store: mounted, mapped).
//!
//! One model of KZC_BENCH_MIB (default 512, at least 400) MiB, served from the host over http.
//! Each round: with the model gone from the node's store (the agent collects it once unused,
//! here at once), an Actor pipeline of 1 replica is applied and its pod timed from when it is
//! first seen to when its worker's /v2/health/ready (the protocol's readiness) answers 200 at
//! the pod's IP (polled every 20 ms: the kubelet's probe period would round every figure up to
//! 2 s); then the pipeline is scaled to 2 and the new pod timed the same way; then the
//! pipeline is deleted. Rounds: KZC_BENCH_ROUNDS (default 5). The last line is
//! `replica-ready cold/warm = X`: the median cold time over the median warm time. Needs root
//! (a kubelet), as the real-node tests.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::local::median;
use kube_zerocopy::node_store::NodeStore;
use kube_zerocopy_e2e::cluster::real::{serve_folder, RealCluster};
use kube_zerocopy_e2e::{make_model, sha256_of};
use serde_json::json;

const NAMESPACE: &str = "bench-replica";
const PIPELINE: &str = "bench";

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let rounds = env_number("KZC_BENCH_ROUNDS", 5)?;
    let mib = env_number("KZC_BENCH_MIB", 512)?;
    ensure!(
        mib >= 400,
        "KZC_BENCH_MIB={mib}: the benchmark's model has at least 400 MiB"
    );
    let data = tempfile::Builder::new()
        .prefix("kzc-bench-replica-")
        .tempdir()?;
    let model = data.path().join("model.safetensors");
    // An Mlp of 4096 -> w -> w -> 4096 (f32): 4 × (2 × 4096 × w + w²) bytes, w from the size.
    let width = {
        let bytes = (mib << 20) as f64 / 4.0;
        ((-8192.0 + (8192.0f64.powi(2) + 4.0 * bytes).sqrt()) / 2.0) as u64
    };
    make_model(&[
        "mlp",
        model.to_str().context("a UTF-8 path")?,
        "--sizes",
        &format!("4096,{width},{width},4096"),
    ]);
    let bytes = std::fs::metadata(&model)?.len();
    let sha256 = sha256_of(&model);
    println!(
        "model: {:.0} MiB, sha256 {sha256}",
        bytes as f64 / (1u64 << 20) as f64
    );

    let mut cluster = RealCluster::start().await?;
    let base = serve_folder(data.path())?;
    // Unused models go at the next collection, one a second: each round starts cold.
    cluster
        .install_operator_with(&[
            "nodeStore.keepUnusedSeconds=0",
            "nodeStore.collectEverySeconds=1",
        ])
        .await?;
    let client = cluster.control_plane.client().await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?,
        )
        .await?;
    let pipeline: InferencePipeline = serde_json::from_value(json!({
        "apiVersion": "kube-zerocopy.io/v1alpha1",
        "kind": "InferencePipeline",
        "metadata": {"name": PIPELINE, "namespace": NAMESPACE},
        "spec": {
            "mode": "Actor",
            "sharing": "Node",
            "models": [{
                "name": "mlp", "format": "Safetensors", "architecture": "Mlp",
                "source": {
                    "uri": format!("{base}/model.safetensors"),
                    "size": format!("{}Mi", bytes.div_ceil(1 << 20) + 1),
                    "sha256": sha256,
                },
            }],
            "actor": {"replicas": 1},
        },
    }))?;
    let pipelines: Api<InferencePipeline> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let held = cluster.node.agent_dir().join("store/blobs").join(&sha256);

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        wait_until_gone(&held).await?;
        pipelines.create(&PostParams::default(), &pipeline).await?;
        let watch = tokio::spawn(fetch_progress_shown(client.clone()));
        let first = time_new_replica(&pods, &BTreeSet::new()).await?;
        watch.abort();
        // Aborted as it should be, unless reading failed before.
        if let Ok(Err(e)) = watch.await {
            println!("round {round}: reading the NodeStore: {e:#}");
        }
        let seen: BTreeSet<String> = pod_names(&pods).await?;
        pipelines
            .patch(
                PIPELINE,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"actor": {"replicas": 2}}})),
            )
            .await?;
        let second = time_new_replica(&pods, &seen).await?;
        println!(
            "round {round}: first replica on the node ready in {:.3} s, a later one in {:.3} s",
            first.as_secs_f64(),
            second.as_secs_f64()
        );
        cold.push(first.as_secs_f64());
        warm.push(second.as_secs_f64());
        pipelines.delete(PIPELINE, &DeleteParams::default()).await?;
        wait_for_no_pods(&pods).await?;
    }
    let (cold, warm) = (median(&cold), median(&warm));
    println!(
        "median over {rounds} rounds: cold {cold:.3} s (fetch, verify, publish {:.0} MiB, map), warm {warm:.3} s (mount, map)",
        bytes as f64 / (1u64 << 20) as f64
    );
    println!("replica-ready cold/warm = {:.1}", cold / warm);
    Ok(())
}

/// Prints each new line of progress that `kubectl get nodestores` shows for fetches under way
/// (the agent's report), until aborted.
async fn fetch_progress_shown(client: kube::Client) -> Result<()> {
    let stores: Api<NodeStore> = Api::all(client);
    let mut shown = BTreeSet::new();
    loop {
        for store in stores.list(&Default::default()).await? {
            for fetch in store.status.unwrap_or_default().fetching {
                if shown.insert(fetch.progress.clone()) {
                    println!("  NodeStore shows: fetching {}", fetch.progress);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn pod_names(pods: &Api<Pod>) -> Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect())
}

/// The time from when a pod not in `known` is first seen to when its worker answers
/// /v2/health/ready.
async fn time_new_replica(pods: &Api<Pod>, known: &BTreeSet<String>) -> Result<Duration> {
    let poll = Duration::from_millis(20);
    let deadline = Instant::now() + Duration::from_secs(600);
    let (name, seen) = loop {
        ensure!(Instant::now() < deadline, "no new pod appeared");
        if let Some(name) = pod_names(pods)
            .await?
            .into_iter()
            .find(|n| !known.contains(n))
        {
            break (name, Instant::now());
        }
        tokio::time::sleep(poll).await;
    };
    loop {
        ensure!(
            Instant::now() < deadline,
            "pod {name} was not ready in 10 minutes"
        );
        let ip = pods.get(&name).await?.status.and_then(|s| s.pod_ip);
        if let Some(ip) = ip {
            if answers_200(format!("http://{ip}:8080/v2/health/ready")).await {
                return Ok(seen.elapsed());
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Whether GET `url` answers 200 within a second.
async fn answers_200(url: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(1)))
            .build()
            .into();
        agent.get(&url).call().is_ok_and(|r| r.status() == 200)
    })
    .await
    .unwrap_or(false)
}

async fn wait_until_gone(held: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.exists() {
        if Instant::now() > deadline {
            bail!(
                "the node agent kept {} for 2 minutes after its last pod",
                held.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn wait_for_no_pods(pods: &Api<Pod>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pod_names(pods).await?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the pipeline's pods stayed 2 minutes after its deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
