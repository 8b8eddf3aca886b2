//! A namespace that enforces Pod Security `restricted`: a Pod-sharing pipeline runs there (its
//! pods pass the admission for real), and a Node-sharing one is refused with a condition on
//! the pipeline that says why, instead of staying Pending.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::support::*;
use crate::task::run_task;

const RESTRICTED: (&str, &str) = ("pod-security.kubernetes.io/enforce", "restricted");

pub async fn restricted_namespace_runs_pod_sharing(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(
        &env,
        "restricted-pod",
        &[RESTRICTED],
        "sentiment-data",
        false,
    )
    .await?;
    let uri = format!("{}/{}", env.http_base, env.torchscript.file);
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

pub async fn restricted_namespace_refuses_node_sharing(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "restricted-node", &[RESTRICTED]).await?;
    let uri = format!("{}/{}", env.http_base, env.safetensors.file);
    let pipeline = example(
        "actor-safetensors.yaml",
        &ns.name,
        &env.safetensors,
        &uri,
        |_| {},
    )?;
    apply(&env.client, &pipeline).await?;
    let name = pipeline.metadata.name.as_deref().context("a name")?;
    let p = wait_phase(
        &env.client,
        &ns.name,
        name,
        &["Blocked"],
        Duration::from_secs(120),
    )
    .await?;
    let status = p.status.unwrap_or_default();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.status == "True" && c.reason == "PodSecurityForbidsNodeSharing")
        .with_context(|| {
            format!(
                "no PodSecurityForbidsNodeSharing condition: {:?}",
                status.conditions
            )
        })?;
    println!(
        "  {}/{name}: {} {}: {}",
        ns.name, condition.type_, condition.reason, condition.message
    );
    ensure!(
        condition.message.contains(&ns.name) && condition.message.contains("restricted"),
        "the message names neither the namespace nor the level: {}",
        condition.message
    );
    ensure!(
        pods(&env.client, &ns.name, name).await?.is_empty(),
        "pods exist for a blocked pipeline"
    );
    Ok(())
}
