//! A model whose source does not match its digest, in a real pod: the weight server's own
//! one-line error reaches Kubernetes as its termination message (written to the file the
//! kubelet mounts, not the kubelet's fallback to the log's tail), and the pipeline says it;
//! with Node sharing, the node agent's refusal reaches the pipeline through the kubelet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy_e2e::wait::eventually_seen;
use serde_json::json;

use crate::support::*;

pub async fn wrong_digest_is_told_by_the_termination_message(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "bad-digest", &[]).await?;
    let wrong = "0".repeat(64);
    let name = apply_with_digest(
        &env,
        &ns,
        "actor-torchscript.yaml",
        &env.torchscript,
        &wrong,
    )
    .await?;

    // The pod's view: the weight server ended with exit code 1 and a message of its own words.
    let message = eventually_seen(
        "the weight server's termination message",
        Duration::from_secs(180),
        || {
            let (client, ns, name) = (env.client.clone(), ns.name.clone(), name.clone());
            async move {
                let pods = pods(&client, &ns, &name).await?;
                let terminated = pods
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.init_container_statuses.clone())
                    .flatten()
                    .filter(|s| s.name == "weight-server")
                    .find_map(|s| {
                        s.state
                            .and_then(|st| st.terminated)
                            .or_else(|| s.last_state.and_then(|st| st.terminated))
                    });
                Ok(match terminated {
                    Some(t) => (
                        Some((t.exit_code, t.message.unwrap_or_default())),
                        String::new(),
                    ),
                    None => (
                        None,
                        format!("{} pods, no weight server ended yet", pods.len()),
                    ),
                })
            }
        },
    )
    .await?;
    let (exit_code, message) = message;
    println!(
        "  {}/{name}: weight server exit {exit_code}: {message}",
        ns.name
    );
    ensure!(
        exit_code == 1,
        "the weight server's exit code is {exit_code}, not 1"
    );
    ensure!(
        message.contains("sha256 mismatch") && message.contains(&wrong),
        "the termination message does not say the digest is wrong: {message:?}"
    );
    // The log's lines carry a timestamp and level and its error line starts "error:"; the
    // termination file holds the bare message on one line.
    ensure!(
        !message.starts_with("error:") && !message.contains('\n') && !message.contains(" ERROR "),
        "the termination message is the log's tail, not the file the weight server wrote: {message:?}"
    );

    // The pipeline's view: Degraded, with the same words.
    let api: Api<InferencePipeline> = Api::namespaced(env.client.clone(), &ns.name);
    let condition = weights_ready_with(&api, &name, "WeightServerFailed", 60).await?;
    ensure!(
        condition.status == "False" && condition.message.contains(&message),
        "the condition does not carry the weight server's message: {condition:?}"
    );
    let phase = api.get(&name).await?.status.and_then(|s| s.phase);
    ensure!(
        phase.map(|p| p.as_str()) == Some("Degraded"),
        "phase {phase:?}, not Degraded"
    );
    Ok(())
}

/// The same wrong digest with Node sharing: no weight server in the pod; the node agent refuses
/// the volume, the kubelet retries and says why in a FailedMount event, and the pipeline reads
/// `WeightsReady=False, ModelsNotMounted` with the agent's words, phase Degraded. The pod never
/// starts a container.
pub async fn node_sharing_wrong_digest_is_told_by_the_agent(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "bad-digest-node", &[RESTRICTED]).await?;
    let wrong = "1".repeat(64);
    let name = apply_with_digest(
        &env,
        &ns,
        "actor-safetensors.yaml",
        &env.safetensors,
        &wrong,
    )
    .await?;
    let api: Api<InferencePipeline> = Api::namespaced(env.client.clone(), &ns.name);
    let condition = weights_ready_with(&api, &name, "ModelsNotMounted", 120).await?;
    ensure!(
        condition.status == "False"
            && condition.message.contains("sha256 mismatch")
            && condition.message.contains(&wrong),
        "the condition does not carry the agent's words: {condition:?}"
    );
    let status = api.get(&name).await?.status.unwrap_or_default();
    ensure!(
        status.phase.map(|p| p.as_str()) == Some("Degraded"),
        "phase {:?}, not Degraded",
        status.phase
    );
    for pod in pods(&env.client, &ns.name, &name).await? {
        ensure!(!any_started(&pod), "a container started without its models");
    }
    // Nothing half-published in the agent's store.
    let store = env.cluster.node.agent_dir().join("store");
    let entries: Vec<_> = std::fs::read_dir(store.join("blobs"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(
        !entries.iter().any(|e| e.to_string_lossy() == wrong),
        "the store holds the refused digest"
    );
    Ok(())
}

/// Whether any of the pod's containers has started (runs or ran).
pub fn any_started(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .iter()
        .filter_map(|s| s.container_statuses.as_ref())
        .flatten()
        .any(|c| {
            c.state
                .as_ref()
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
        })
}

/// The pipeline's WeightsReady condition once its reason is `reason` (printed).
pub async fn weights_ready_with(
    api: &Api<InferencePipeline>,
    name: &str,
    reason: &str,
    seconds: u64,
) -> Result<Condition> {
    let condition = eventually_seen(
        &format!("WeightsReady with reason {reason}"),
        Duration::from_secs(seconds),
        || async move {
            let status = api.get(name).await?.status.unwrap_or_default();
            let seen = format!("phase {:?}, {:?}", status.phase, status.conditions);
            let c = status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "WeightsReady" && c.reason == reason);
            Ok((c, seen))
        },
    )
    .await?;
    println!(
        "  {}/{name}: {}: {}",
        api.namespace().unwrap_or_default(),
        condition.reason,
        condition.message
    );
    Ok(condition)
}

/// Applies the example's Actor pipeline with 1 replica, its model served over http but
/// declared with the digest `sha256`: the pipeline's name.
async fn apply_with_digest(
    env: &Env,
    ns: &TestNamespace,
    file: &str,
    model: &Model,
    sha256: &str,
) -> Result<String> {
    let uri = format!("{}/{}", env.http_base, model.file);
    let pipeline = example(file, &ns.name, model, &uri, |p| {
        p["spec"]["actor"] = json!({"replicas": 1});
        p["spec"]["models"][0]["source"]["sha256"] = json!(sha256);
    })?;
    apply(&env.client, &pipeline).await?;
    pipeline.metadata.name.context("a name")
}
