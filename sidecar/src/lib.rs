//! The weight server's library. It owns the shared-memory layout, the one format that the
//! sidecar writes and every worker reads, so both sides link this crate.
//!
//! - [`cloud`]: the object stores (S3, Azure Blob) a pipeline names, and their credentials.
//! - [`config`]: the models a pod serves, as rendered by the operator (`KZC_MODELS`).
//! - [`layout`]: content-addressed store, manifest, atomic publication, bindings (the
//!   `kube-zerocopy-store` crate, re-exported).
//! - [`source`]: fetching `file://`, `http(s)://` and `s3://` sources with sha256 verification.
//! - [`remote`]: reading remote objects by byte ranges, several at once, straight into place.
//! - [`download`]: http(s) downloads that resume, with a stall timeout and a size cap.
//! - [`formats`]: reading safetensors files and TorchScript archives into the layout.
//! - [`publish`]: the sidecar's job from fetch to published, with node-level locking.

pub mod cloud;
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
