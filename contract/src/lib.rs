//! What kube-zerocopy's binaries agree on, in types: the resources one writes and another
//! reads. Light on dependencies (kube's derive, k8s-openapi, schemars, serde), so that every
//! binary can depend on it without the operator.
//!
//! - [`node_store`]: the `NodeStore` resource each node agent writes, and its node labels.

pub mod node_store;
