//! kube-zerocopy's operator crate: the `InferencePipeline` resource, the `NodeStore` resource
//! the node agents write, what its pods run, the
//! pure rendering into Jobs and Deployments, the API server's checks without a cluster, and the
//! local runner.

pub mod batch_run;
pub mod controller;
pub mod crd;
pub mod invocation;
pub mod k8s_ext;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod quantity;
pub mod queue;
pub mod reconcile;
pub mod reference;
pub mod render;
pub mod retry;
pub mod status;
pub mod validation;

/// The `NodeStore` resource lives in the contract crate, which the node agent uses alone.
pub use kube_zerocopy_contract::node_store;
