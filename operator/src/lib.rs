//! kube-zerocopy's operator crate: the `InferencePipeline` resource, what its pods run, and
//! the local runner. The Kubernetes rendering and reconcile loop build on these.

pub mod crd;
pub mod invocation;
pub mod local;
