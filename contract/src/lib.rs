//! What kube-zerocopy's binaries agree on, in types: the resources one writes and another
//! reads. Light on dependencies (kube's derive, k8s-openapi, schemars, serde, clap), so that every
//! binary can depend on it without the operator.
//!
//! - [`models`]: the models a pod serves, as the operator renders them for the weight server,
//!   the workers and the node agent.
//! - [`names`]: the field managers, labels, annotations and container names of the objects the
//!   operator makes.
//! - [`node_store`]: the `NodeStore` resource each node agent writes, and its node labels.
//! - [`pod`]: what the operator sets in each container's environment, as the binaries read it.
//! - [`settings`]: what the chart sets for the operator and the node agent.

pub mod models;
pub mod names;
pub mod node_store;
pub mod pod;
pub mod settings;
