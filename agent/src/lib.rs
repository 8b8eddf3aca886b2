//! The node agent: one per node (a DaemonSet). It owns the node's weight store, the only
//! writer there, and gives each pod a read-only view of exactly its models as a CSI ephemeral
//! inline volume, so that Node-sharing pods need no hostPath and cannot touch one another's
//! weights.
//!
//! - [`proto`]: the CSI gRPC services, generated from proto/csi.proto.
//! - [`views`]: a pod's view of its models: hard links into the store, mounted read-only.
//! - [`csi`]: the Identity and Node services the kubelet calls.
//! - [`store_memory`]: the tmpfs the store lives in.
//! - [`metrics`]: /metrics and /livez.
//! - [`integrity`]: the record of what the agent laid out, checked before an entry is served.
//! - [`activity`]: the fetches under way and a record of each publication.
//! - [`report`]: the node's `NodeStore` and its labels of held models, written to the API.
//! - [`tenants`]: each namespace's share of the store and of the publications under way.
//! - [`volume_secret`]: a volume's credentials, the keys of the Secret the kubelet hands over.
//! - [`access`]: private models, served only to volumes that show they may read them.

pub mod access;
pub mod activity;
pub mod csi;
pub mod integrity;
pub mod metrics;
pub mod report;
pub mod store_memory;
pub mod tenants;
pub mod views;
pub mod volume_secret;

pub mod proto {
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
}
