//! The node's store, told to the cluster: the agent writes its node's `NodeStore` (the models
//! it holds, how many pods map each, the fetches under way) and labels its node with one
//! label per model held, which the operator's preferred node affinity looks for. The chart's
//! admission policy lets an agent write only its own node's object and its own labels there.
//!
//! It is written when it changes: at once after a change, every 2 s while a fetch runs (its
//! progress), and looked at every 10 s otherwise. Reporting never stands in the way of
//! mounting: a failed write is logged and tried again at the next round.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use kube_zerocopy_contract::node_store::{
    held_label, human_bytes, Fetching, HeldModel, NodeStore, NodeStoreStatus, HELD_LABEL_PREFIX,
};
use kube_zerocopy_fetch::layout::MANIFEST_FILE;
use kube_zerocopy_fetch::Store;
use serde_json::json;
use tracing::{info, warn};

use crate::activity::Activity;

const FIELD_MANAGER: &str = "kube-zerocopy-agent";

/// How often the report is made while a fetch is under way (its progress), and otherwise; a
/// change (a fetch started, a volume mounted) makes it sooner, after `SETTLE`.
const WHILE_FETCHING: Duration = Duration::from_secs(2);
const OTHERWISE: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_millis(200);

/// The store's state now: its published models (with what the activity recorded of them), how
/// many pods map each, and the fetches under way.
pub fn status(store: &Store, activity: &Activity) -> Result<NodeStoreStatus> {
    let root = store.root();
    let capacity = rustix::fs::statvfs(root)
        .with_context(|| format!("reading the size of {}", root.display()))?;
    let mut models = Vec::new();
    for digest in store.published()? {
        let dir = store.model_dir(&digest);
        // A model collected since the listing is simply no longer held.
        let Some((bytes, pods, modified)) = gone_is_none(held_files(&dir))? else {
            continue;
        };
        let record = activity.publication(&digest);
        let published_at = record.as_ref().map_or(modified, |r| r.published_at);
        models.push(HeldModel {
            name: record.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
            source: record
                .as_ref()
                .map(|r| r.source.clone())
                .unwrap_or_default(),
            bytes,
            pods,
            published_at: Some(time(published_at)),
            fetch_seconds: record.as_ref().map(|r| round(r.fetch_seconds)),
            layout_seconds: record.as_ref().map(|r| round(r.layout_seconds)),
            digest,
        });
    }
    let fetching = activity
        .fetches()
        .into_iter()
        .map(|f| {
            let rate = (f.bytes as f64 / f.elapsed.as_secs_f64().max(0.001)) as u64;
            let of = f
                .total
                .map(|t| format!(" of {}", human_bytes(t)))
                .unwrap_or_default();
            Fetching {
                progress: format!(
                    "{} {}{of}, {}/s",
                    f.name,
                    human_bytes(f.bytes),
                    human_bytes(rate)
                ),
                name: f.name,
                source: f.source,
                bytes: f.bytes,
                total_bytes: f.total,
                bytes_per_second: rate,
                started_at: time(f.started_at),
            }
        })
        .collect();
    let used: u64 = models.iter().map(|m| m.bytes).sum();
    let capacity_bytes = capacity.f_blocks * capacity.f_frsize;
    Ok(NodeStoreStatus {
        capacity_bytes,
        used_bytes: used,
        usage: format!("{} of {}", human_bytes(used), human_bytes(capacity_bytes)),
        pods: views(store)?,
        models,
        fetching,
    })
}

/// A model's folder: its bytes, the pods that map it and when it was written.
fn held_files(dir: &Path) -> std::io::Result<(u64, u32, std::time::SystemTime)> {
    let (mut bytes, mut pods) = (0, 0);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        bytes += metadata.len();
        // Every view links the manifest once: its other links are the pods that map it.
        if entry.file_name() == MANIFEST_FILE {
            pods = metadata.nlink().saturating_sub(1) as u32;
        }
    }
    Ok((bytes, pods, fs::metadata(dir)?.modified()?))
}

/// `None` for what was removed meanwhile (NotFound); any other error stays one.
fn gone_is_none<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// Mounted volumes: one view each.
fn views(store: &Store) -> Result<u32> {
    match fs::read_dir(store.root().join(".views")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
        Ok(entries) => Ok(entries.count() as u32),
    }
}

fn time(at: std::time::SystemTime) -> Time {
    Time(Timestamp::try_from(at).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// Milliseconds are as precise as a report needs (and they keep it from changing every round).
fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// The labels the node should carry of ours: one per model held.
fn held_labels(status: &NodeStoreStatus) -> BTreeSet<String> {
    status
        .models
        .iter()
        .map(|m| held_label(&m.digest))
        .collect()
}

/// Writes the node's report whenever it changes, every few seconds, until the process ends.
pub async fn run(client: Client, node: String, store: Store, activity: Arc<Activity>) {
    let mut last: Option<NodeStoreStatus> = None;
    loop {
        let status = match status(&store, &activity) {
            Ok(status) => status,
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "reading the store for the node's report"
                );
                tokio::time::sleep(OTHERWISE).await;
                continue;
            }
        };
        if last.as_ref() != Some(&status) {
            // The object is created (applied with its owner) by the first write, and again
            // after a failed one (it may have been deleted); later writes patch the status.
            match write(&client, &node, &status, last.is_none()).await {
                Ok(()) => last = Some(status.clone()),
                Err(e) => {
                    warn!(error = format!("{e:#}"), node, "writing the node's report");
                    last = None;
                }
            }
        }
        if status.fetching.is_empty() {
            // At the next change (then a moment for the changes that come with it), or the
            // next round.
            tokio::select! {
                _ = tokio::time::sleep(OTHERWISE) => {}
                _ = activity.changed.notified() => tokio::time::sleep(SETTLE).await,
            }
        } else {
            tokio::time::sleep(WHILE_FETCHING).await;
        }
    }
}

async fn write(
    client: &Client,
    node_name: &str,
    status: &NodeStoreStatus,
    create: bool,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get(node_name)
        .await
        .with_context(|| format!("reading node {node_name}"))?;
    label(&nodes, &node, held_labels(status)).await?;
    let stores: Api<NodeStore> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if create {
        // Owned by its node, so that it goes when the node does.
        let owner = node.controller_owner_ref(&()).map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            o
        });
        stores
            .patch(
                node_name,
                &params,
                &Patch::Apply(json!({
                    "apiVersion": NodeStore::api_version(&()),
                    "kind": NodeStore::kind(&()),
                    "metadata": {"name": node_name, "ownerReferences": owner.into_iter().collect::<Vec<_>>()},
                    "spec": {},
                })),
            )
            .await
            .with_context(|| format!("creating NodeStore {node_name}"))?;
    }
    stores
        .patch_status(
            node_name,
            &params,
            &Patch::Apply(json!({
                "apiVersion": NodeStore::api_version(&()),
                "kind": NodeStore::kind(&()),
                "status": status,
            })),
        )
        .await
        .with_context(|| format!("writing the status of NodeStore {node_name}"))?;
    Ok(())
}

/// Adds the node's missing labels of held models and removes those of models no longer held
/// (a merge patch of the labels under our prefix only).
async fn label(nodes: &Api<Node>, node: &Node, held: BTreeSet<String>) -> Result<()> {
    let current: BTreeSet<String> = node
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .filter(|k| k.starts_with(HELD_LABEL_PREFIX))
        .collect();
    let mut changes = BTreeMap::new();
    for added in held.difference(&current) {
        changes.insert(added.clone(), json!("held"));
    }
    for removed in current.difference(&held) {
        changes.insert(removed.clone(), serde_json::Value::Null);
    }
    if changes.is_empty() {
        return Ok(());
    }
    let name = node.metadata.name.clone().unwrap_or_default();
    nodes
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": changes}})),
        )
        .await
        .with_context(|| format!("labelling node {name} with the models it holds"))?;
    info!(node = name, ?changes, "node labels of held models updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use kube_zerocopy_fetch::config::ModelSource;
    use kube_zerocopy_fetch::publish::Observer;

    use super::*;

    #[test]
    fn a_model_removed_since_the_listing_is_left_out_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let gone = gone_is_none(held_files(&dir.path().join("gone"))).unwrap();
        assert!(gone.is_none());
        std::fs::write(dir.path().join(MANIFEST_FILE), b"{}").unwrap();
        let (bytes, pods, _) = gone_is_none(held_files(dir.path())).unwrap().unwrap();
        assert_eq!((bytes, pods), (2, 0));
    }

    #[test]
    fn a_fetch_under_way_is_reported_with_its_progress_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let activity = Activity::new(store.clone(), Default::default());
        let model: ModelSource = serde_json::from_value(json!({
            "name": "mlp",
            "format": "Safetensors",
            "uri": "https://models.example/mlp.safetensors",
        }))
        .unwrap();
        let started = Instant::now() - Duration::from_secs(2);
        activity.fetching(&model, started, 100 << 20, Some(512 << 20));
        let report = status(&store, &activity).unwrap();
        let [fetch] = &report.fetching[..] else {
            panic!("{report:?}")
        };
        assert_eq!(
            (fetch.bytes, fetch.total_bytes),
            (100 << 20, Some(512 << 20))
        );
        assert_eq!(fetch.source, model.uri);
        // 100 MiB in about 2 s.
        let rate = fetch.bytes_per_second as f64 / (50 << 20) as f64;
        assert!((0.9..=1.0).contains(&rate), "{fetch:?}");
        assert!(
            fetch.progress.starts_with("mlp 100.0 MiB of 512.0 MiB, "),
            "{}",
            fetch.progress
        );
        assert!(report.models.is_empty() && report.pods == 0, "{report:?}");
        activity.fetched(&model);
        assert!(status(&store, &activity).unwrap().fetching.is_empty());
    }
}
