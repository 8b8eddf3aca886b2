//! A namespace that enforces Pod Security `restricted`: a Pod-sharing pipeline runs there (its
//! pods pass the admission for real). Node-sharing pipelines run in such namespaces too
//! (actor.rs: their pods mount the node agent's CSI volume, no hostPath).

use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use crate::support::*;
use crate::task::run_task;

pub async fn restricted_namespace_runs_pod_sharing(env: Arc<Env>) -> Result<()> {
    let (ns, data) = task_namespace(
        &env,
        "restricted-pod",
        &[RESTRICTED],
        "sentiment-data",
        true,
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
