//! Fetching models into the store: sources, object storage, ranged and resumed downloads, the
//! formats' parsers, and publication. The weight server and the node agent run it; the workers
//! do not link it (they read the store through `kube-zerocopy-store`).
//!
//! - [`cloud`]: the object stores (S3, Azure Blob) a pipeline names, and their credentials
//!   (the `kube-zerocopy-object-storage` crate, re-exported).
//! - [`config`]: the models a pod serves, as rendered by the operator (`KZC_MODELS`).
//! - [`layout`]: content-addressed store, manifest, atomic publication, bindings (the
//!   `kube-zerocopy-store` crate, re-exported).
//! - [`source`]: fetching `file://`, `http(s)://` and `s3://` sources with sha256 verification.
//! - [`remote`]: reading remote objects by byte ranges, several at once, straight into place.
//! - [`download`]: http(s) downloads that resume, with a stall timeout and a size cap.
//! - [`formats`]: reading safetensors files and TorchScript archives into the layout.
//! - [`publish`]: the sidecar's job from fetch to published, with node-level locking.

/// The object stores (S3, Azure Blob) are a crate of their own: Task data uses them too.
pub use kube_zerocopy_object_storage as cloud;
pub mod config;
pub mod download;
pub mod formats;
/// The store's layout is its own crate: the workers read it without the fetching.
pub use kube_zerocopy_store as layout;
pub mod networks;
pub mod pickle;
pub mod publish;
pub mod remote;
pub mod source;

pub use config::{AzureAccess, ModelFormat, ModelSource, S3Access};
pub use layout::{Bindings, DType, Manifest, Store, TensorEntry, ALIGNMENT};
