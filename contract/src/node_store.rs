//! The `NodeStore` resource: what one node's agent holds in its weight store, written by that
//! agent alone (the chart's admission policy allows an agent only its own node's object), read
//! by people with `kubectl get nodestores`. Cluster-scoped, one per node, named after it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The label an agent puts on its node for each model its store holds, so that pods that
/// map the model prefer the node (preferred node affinity, rendered by the operator). A label
/// name has at most 63 characters: "sha256-" and the digest's first 56 hex digits (224 bits).
pub const HELD_LABEL_PREFIX: &str = "models.kube-zerocopy.io/";

/// The node label saying that the node's store holds the model of `digest` (lowercase hex).
pub fn held_label(digest: &str) -> String {
    let digest = digest.to_ascii_lowercase();
    format!(
        "{HELD_LABEL_PREFIX}sha256-{}",
        &digest[..digest.len().min(56)]
    )
}

/// A node's weight store (written by the node's agent).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kube-zerocopy.io",
    version = "v1alpha1",
    kind = "NodeStore",
    status = "NodeStoreStatus",
    shortname = "nstore",
    category = "kube-zerocopy",
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".status.models[*].name"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usage"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Fetching","type":"string","jsonPath":".status.fetching[*].progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "The models one node's weight store holds, written by the node's kube-zerocopy agent; named after the node."
)]
pub struct NodeStoreSpec {}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStoreStatus {
    /// The store's size (bytes): the chart's nodeStore.capacityMiB.
    pub capacity_bytes: u64,
    /// Bytes the store's models take.
    pub used_bytes: u64,
    /// Used and capacity, for people (for example "20.1 MiB of 2.0 GiB").
    pub usage: String,
    /// Pods that map at least one of the models (mounted volumes).
    pub pods: u32,
    /// The models in the store, published and whole.
    #[serde(default)]
    pub models: Vec<HeldModel>,
    /// The models being fetched now.
    #[serde(default)]
    pub fetching: Vec<Fetching>,
}

/// A published model in a node's store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldModel {
    /// The sha256 of the model's source (its address in the store).
    pub digest: String,
    /// The model's name in the pipeline that had it published ("" when the agent did not
    /// publish it since it started).
    pub name: String,
    /// Where it was fetched from ("" when not known, as for name).
    pub source: String,
    /// Bytes of its laid-out files in the store.
    pub bytes: u64,
    /// Pods that map it now (volumes that link its files).
    pub pods: u32,
    /// When it was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<Time>,
    /// Seconds fetching its source took (absent when not known, as for name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_seconds: Option<f64>,
    /// Seconds laying it out in the store took (absent when not known, as for name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_seconds: Option<f64>,
}

/// A model being fetched.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fetching {
    /// The model's name in the pipeline that asked for it.
    pub name: String,
    /// Where it is fetched from.
    pub source: String,
    /// Bytes received so far.
    pub bytes: u64,
    /// The source's size, when it announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes per second since the fetch started.
    pub bytes_per_second: u64,
    /// For people: name, bytes of total and rate (for example "mlp 96 MiB of 512 MiB, 210 MiB/s").
    pub progress: String,
    /// When the fetch started.
    pub started_at: Time,
}

/// A byte count for people, in binary units with one decimal (as `kubectl top` rounds).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_label_is_a_valid_label_name() {
        let digest = "AB".repeat(32);
        let label = held_label(&digest);
        let name = label.strip_prefix(HELD_LABEL_PREFIX).unwrap();
        assert_eq!(name.len(), 63);
        assert_eq!(name, format!("sha256-{}", &"ab".repeat(32)[..56]));
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(21_076_377), "20.1 MiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
    }
}
