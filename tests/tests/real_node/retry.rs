//! A worker killed in the middle of its shard: the Job retries that index in a new pod, and
//! the output of every shard is whole and equals the reference.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use kube_zerocopy::crd::InferencePipeline;
use serde_json::json;

use crate::support::*;
use crate::task::print_task_report;

pub async fn killed_worker_is_retried(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(&env, "retry", &[], "sentiment-data", true).await?;
    let uri = format!("file://{MODELS_MOUNT}/{}", env.torchscript.file);
    let pipeline = example(
        "task-torchscript.yaml",
        &ns.name,
        &env.torchscript,
        &uri,
        |p| {
            p["metadata"]["name"] = json!("retried");
            p["spec"]["task"] = json!({"shards": SHARDS, "parallelism": 1});
        },
    )?;
    let outcome = async {
        apply(&env.client, &pipeline).await?;
        // Its workers alone: the run (its uid and generation) is in their environment, and
        // other scenarios run task workers of index 0 meanwhile (in pods, and on the host).
        let applied = Api::<InferencePipeline>::namespaced(env.client.clone(), &ns.name)
            .get("retried")
            .await?;
        let run = kube_zerocopy::render::run_name(&applied);
        // The worker of index 0 is killed as soon as it runs: it has mapped the weights or is
        // loading them, and has not written its output.
        let killed = tokio::task::spawn_blocking(move || {
            kill_worker_of_index(0, &run, Duration::from_secs(240))
        })
        .await??;
        println!(
            "  {}/retried: killed the worker of shard 0 (pid {killed})",
            ns.name
        );
        wait_phase(
            &env.client,
            &ns.name,
            "retried",
            &["Succeeded"],
            Duration::from_secs(300),
        )
        .await?;
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns.name);
        let job = jobs.get("retried-zerocopy").await?;
        let failed = job.status.and_then(|s| s.failed).unwrap_or(0);
        ensure!(
            failed >= 1,
            "the Job counts {failed} failed pods: the kill went unseen"
        );
        print_task_report(&env, &ns.name, "retried").await?;
        check_outputs(&data.join("output"), &env.torchscript.reference)?;
        // Nothing half-written is left beside the outputs: the shards, the manifest and the
        // folder of the runs' records only.
        let mut names: Vec<String> = std::fs::read_dir(data.join("output"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = (0..SHARDS)
            .map(|i| format!("shard-{i:05}.safetensors"))
            .chain(["_kube-zerocopy".into(), "manifest.json".into()])
            .collect();
        expected.sort();
        ensure!(
            names == expected,
            "the output folder holds {names:?}, not {expected:?}"
        );
        // The killed shard's retry committed once: one record per shard, all in the manifest.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("output/manifest.json"))?)?;
        let shards = manifest["shards"].as_array().map_or(0, Vec::len);
        ensure!(
            shards == SHARDS,
            "the manifest lists {shards} shards: {manifest}"
        );
        Ok(())
    }
    .await;
    env.record(&format!("{}/retried", ns.name), outcome.is_ok());
    outcome
}

/// SIGKILLs the first `kube-zerocopy-worker task` process on this machine of run `run` whose
/// JOB_COMPLETION_INDEX is `index`; returns its pid.
fn kill_worker_of_index(index: usize, run: &str, timeout: Duration) -> Result<i32> {
    let start = Instant::now();
    let wanted = format!("JOB_COMPLETION_INDEX={index}");
    let of_run = format!("KZC_RUN={run}");
    while start.elapsed() < timeout {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_task_worker = args
                .first()
                .is_some_and(|a| a.ends_with(b"kube-zerocopy-worker"))
                && args.iter().any(|a| *a == b"task");
            if !is_task_worker {
                continue;
            }
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
            if vars.contains(&wanted.as_bytes()) && vars.contains(&of_run.as_bytes()) {
                // SAFETY: kill(2) on a pid just read from /proc.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                return Ok(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("no worker of shard {index} ran within {timeout:?}")
}

/// One shard file of four is not a tensor file: its index fails its one retry, the others run
/// on (maxFailedShards 1 lets the Job go on), and the pipeline ends Failed with that shard in
/// status.shards.failedIndexes and in the Failed condition, the three good outputs written.
pub async fn a_failed_shard_is_listed_and_the_others_run_on(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(&env, "failed-shard", &[], "sentiment-data", true).await?;
    let shards = kube_zerocopy_batch::shards::list_shards(&data.join("input"))?;
    let broken = &shards[2];
    std::fs::write(broken, b"not a safetensors file")?;
    readable_by_all(broken)?;
    let uri = format!("file://{MODELS_MOUNT}/{}", env.torchscript.file);
    let pipeline = example(
        "task-torchscript.yaml",
        &ns.name,
        &env.torchscript,
        &uri,
        |p| {
            p["metadata"]["name"] = json!("partly");
            p["spec"]["task"] = json!({
                "shards": SHARDS, "parallelism": 2, "retriesPerShard": 1, "maxFailedShards": 1,
            });
        },
    )?;
    let outcome = async {
        apply(&env.client, &pipeline).await?;
        let failed = wait_phase(
            &env.client,
            &ns.name,
            "partly",
            &["Failed"],
            Duration::from_secs(300),
        )
        .await?;
        let status = failed.status.unwrap_or_default();
        let listed = status
            .shards
            .as_ref()
            .and_then(|s| s.failed_indexes.clone());
        ensure!(
            listed.as_deref() == Some("2"),
            "status.shards {:?}",
            status.shards
        );
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed" && c.status == "True")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ensure!(
            condition.contains("shards 2 failed every retry")
                && condition.contains("shard-00002.safetensors")
                && condition.contains("not a safetensors file"),
            "the Failed condition says {condition:?}"
        );
        println!("  {}/partly: Failed: {condition}", ns.name);
        let jobs: Api<Job> = Api::namespaced(env.client.clone(), &ns.name);
        let job = jobs.get("partly-zerocopy").await?;
        let pods_failed = job.status.and_then(|s| s.failed).unwrap_or(0);
        ensure!(
            pods_failed == 2,
            "{pods_failed} failed pods, not 2 (a try and one retry)"
        );
        for (i, shard) in shards.iter().enumerate().filter(|(i, _)| *i != 2) {
            let name = shard.file_name().unwrap_or_default();
            let got = read_output_file(&data.join("output").join(name))?;
            let expected = read_output_file(&env.torchscript.reference.join(name))?;
            ensure!(
                got == expected,
                "shard {i}'s output differs from the reference"
            );
        }
        Ok(())
    }
    .await;
    env.record(&format!("{}/partly", ns.name), outcome.is_ok());
    outcome
}

fn read_output_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
