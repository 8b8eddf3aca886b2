//! Task pipelines from the examples on the real node: every shard's output equals
//! `kube-zerocopy local run`'s on the same inputs, and every pod started its worker only after
//! its weight server's startup probe passed; one with its model and data in S3, planned.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kube::Api;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy_e2e::cluster::host::GATEWAY;
use kube_zerocopy_e2e::s3::S3Server;
use serde_json::json;
use sha2::Digest;

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

/// examples/task-s3.yaml: the model, the input and the output in a real S3 server (versitygw
/// on the pods' bridge), each read with the credentials of its own Secret, in a namespace that
/// enforces `restricted`, and no shard count: the planning Job finds the shards
/// (status.plannedInput), every output object equals `kube-zerocopy local run`'s output, and
/// manifest.json beside them gives each one's sha256. On an empty prefix the same pipeline is
/// Blocked with reason InputNotPlanned, in the planner's words.
pub async fn torchscript_with_data_on_s3(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "task-s3", &[RESTRICTED]).await?;
    let server = tokio::task::spawn_blocking(|| S3Server::start_on(GATEWAY)).await??;
    server.create_bucket("models")?;
    server.create_bucket("batch")?;
    let file = env.models_dir().join(env.torchscript.file);
    server.put_file("models", env.torchscript.file, &file)?;
    let inputs = kube_zerocopy_batch::shards::list_shards(&env.input_dir())?;
    for shard in &inputs {
        let name = shard.file_name().context("a shard file")?.to_string_lossy();
        server.put_file("batch", &format!("inputs/{name}"), shard)?;
    }
    for secret in ["s3-reader", "s3-batch"] {
        s3_secret(&env.client, &ns.name, secret, &server).await?;
    }
    let s3 = |secret: &str| {
        json!({
            "endpoint": server.endpoint,
            "region": server.region,
            "credentialsSecret": secret,
        })
    };
    let uri = format!("s3://models/{}", env.torchscript.file);
    let pipeline = example("task-s3.yaml", &ns.name, &env.torchscript, &uri, |p| {
        p["spec"]["models"][0]["source"]["s3"] = s3("s3-reader");
        p["spec"]["input"]["s3"] = s3("s3-batch");
        p["spec"]["output"]["s3"] = s3("s3-batch");
        p["spec"]["task"] = json!({"parallelism": 2});
    })?;
    let name = pipeline.metadata.name.clone().context("a name")?;
    let outcome = async {
        apply(&env.client, &pipeline).await?;
        wait_phase(
            &env.client,
            &ns.name,
            &name,
            &["Succeeded"],
            Duration::from_secs(300),
        )
        .await?;
        let status = Api::<InferencePipeline>::namespaced(env.client.clone(), &ns.name)
            .get_status(&name)
            .await?
            .status
            .context("no status")?;
        let planned = status.planned_input.context("no status.plannedInput")?;
        ensure!(
            planned.shards == SHARDS as i32,
            "planned {} shards, the input holds {SHARDS}",
            planned.shards
        );
        print_task_report(&env, &ns.name, &name).await?;
        let outputs = tempfile::tempdir()?;
        let mut digests = Vec::new();
        for shard in &inputs {
            let file = shard.file_name().context("a shard file")?.to_string_lossy();
            let object = server.get_object("batch", &format!("outputs/{file}"))?;
            digests.push(hex::encode(sha2::Sha256::digest(&object)));
            std::fs::write(outputs.path().join(&*file), object)?;
        }
        check_outputs(outputs.path(), &env.torchscript.reference)?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&server.get_object("batch", "outputs/manifest.json")?)?;
        let recorded: Vec<&str> = manifest["shards"]
            .as_array()
            .context("a manifest without shards")?
            .iter()
            .filter_map(|r| r["sha256"].as_str())
            .collect();
        ensure!(
            recorded == digests,
            "manifest.json's digests {recorded:?} are not the objects' {digests:?}"
        );
        println!(
            "  {}/{name}: {} shards planned (input sha256 {}), outputs and manifest.json in s3://batch/outputs/",
            ns.name, planned.shards, planned.input_digest
        );
        // The same pipeline on a prefix with nothing in it: its plan fails, and the pipeline
        // says why in the planner's words.
        let mut empty = pipeline.clone();
        empty.metadata.name = Some("embed-empty".into());
        empty.spec.input.as_mut().context("an input")?.uri = "s3://batch/nothing/".into();
        empty.spec.output.as_mut().context("an output")?.uri = "s3://batch/none/".into();
        apply(&env.client, &empty).await?;
        let degraded = blocked_because(&env.client, &ns.name, "embed-empty").await?;
        ensure!(
            degraded.reason == "InputNotPlanned"
                && degraded
                    .message
                    .contains("the input s3://batch/nothing/ holds no .safetensors shard files"),
            "{}: {}",
            degraded.reason,
            degraded.message
        );
        println!("  {}/embed-empty: Blocked, {}", ns.name, degraded.message);
        Ok(())
    }
    .await;
    env.record(&format!("{}/{name}", ns.name), outcome.is_ok());
    outcome
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
