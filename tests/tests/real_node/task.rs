//! Task pipelines from the examples on the real node: every shard's output equals
//! `kube-zerocopy local run`'s on the same inputs, and every pod started its worker only after
//! its weight server's startup probe passed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kube_zerocopy::crd::InferencePipeline;
use serde_json::json;

use crate::support::*;

/// examples/task-torchscript.yaml: TorchScript, Pod sharing, the model and the data on
/// PersistentVolumes.
pub async fn torchscript_model_on_a_volume(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(&env, "task-torchscript", &[], "sentiment-data", true).await?;
    let uri = format!("file://{MODELS_MOUNT}/{}", env.torchscript.file);
    let pipeline = example(
        "task-torchscript.yaml",
        &ns.name,
        &env.torchscript,
        &uri,
        |p| {
            p["spec"]["task"] = json!({"shards": SHARDS, "parallelism": 2});
        },
    )?;
    run_task(&env, &pipeline, &data, &env.torchscript.reference).await
}

/// examples/task-safetensors.yaml: safetensors, Node sharing (the node agent's volume), the
/// model from an http server.
pub async fn safetensors_model_over_http(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(&env, "task-safetensors", &[], "embed-data", false).await?;
    let uri = format!("{}/{}", env.http_base, env.safetensors.file);
    let pipeline = example(
        "task-safetensors.yaml",
        &ns.name,
        &env.safetensors,
        &uri,
        |p| {
            p["spec"]["task"] = json!({"shards": SHARDS, "parallelism": 2});
        },
    )?;
    run_task(&env, &pipeline, &data, &env.safetensors.reference).await
}

/// Applies a Task pipeline whose data claim holds `data`; waits until it succeeded; prints the
/// timeline and the workers' memory; checks the order of starts and the outputs.
pub async fn run_task(
    env: &Env,
    pipeline: &InferencePipeline,
    data: &Path,
    reference: &Path,
) -> Result<()> {
    let name = pipeline.metadata.name.clone().context("a name")?;
    let ns = pipeline.metadata.namespace.clone().context("a namespace")?;
    let outcome = async {
        apply(&env.client, pipeline).await?;
        wait_phase(
            &env.client,
            &ns,
            &name,
            &["Succeeded"],
            Duration::from_secs(300),
        )
        .await?;
        print_task_report(env, &ns, &name).await?;
        check_outputs(&data.join("output"), reference)
    }
    .await;
    env.record(&format!("{ns}/{name}"), outcome.is_ok());
    outcome
}

/// Each pod's timeline, then each worker's memory as it reported it from /proc at the end of
/// its shard.
pub async fn print_task_report(env: &Env, ns: &str, name: &str) -> Result<()> {
    timelines(&env.client, ns, name).await?;
    for pod in pods(&env.client, ns, name).await? {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let log = worker_log(&env.client, ns, &pod_name).await?;
        let report: Option<serde_json::Value> =
            log.lines().rev().find_map(|l| serde_json::from_str(l).ok());
        if let Some(r) = report {
            let m = &r["memory"];
            println!(
                "  {ns}/{pod_name}: shard {}, load {:.1} ms, worker PSS {:.1} MiB, USS {:.1} MiB",
                r["shard"],
                r["load_ms"].as_f64().unwrap_or(0.0),
                m["pss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                m["uss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
            );
        }
    }
    Ok(())
}
