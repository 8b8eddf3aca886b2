//! The shared-memory layout: the one format that the sidecar writes and the workers read.
//!
//! ```text
//! <store>/blobs/<sha256>/manifest.json   what is in tensors.bin, and where
//! <store>/blobs/<sha256>/tensors.bin     every tensor at a 64-byte aligned offset
//! <store>/blobs/<sha256>/skeleton.pt     TorchScript only: the archive without its tensor records
//! <store>/.staging/<sha256>.<pid>.<n>/   a model being written; never read by workers
//! <store>/.locks/<key>.lock              held while one sidecar loads a model (node sharing)
//! <store>/.users/<sha256>.lock           shared-locked by every sidecar that serves the model;
//!                                        its mtime is when one last did (both lock folders
//!                                        elsewhere with Store::with_lock_dir)
//! <bindings>/ready.json                  per pod: model name -> digest, written last
//! ```
//!
//! A model folder is named by the sha256 of its source file and is published by one atomic
//! rename of a complete staging folder; it never changes afterwards. A reader therefore sees
//! either no folder or a complete one, also when the sidecar is killed mid-write.
//!
//! On a node's shared store, models that no sidecar holds and that nobody used for a while are
//! collected ([`Store::collect_unused`]): unpublished by one rename, then deleted. A sidecar takes
//! its hold before it looks for a model, so a collection never removes a model in use.

mod bindings;
mod manifest;
mod staging;
mod store;

pub use bindings::Bindings;
pub use manifest::{plan, DType, Manifest, TensorEntry};
pub use staging::{Staging, StoreFull, TensorsFile};
pub use store::{Hold, Store, LOCK_TIMEOUT};

/// Every tensor starts at a multiple of this many bytes (libtorch's own CPU alignment).
pub const ALIGNMENT: u64 = 64;
pub const LAYOUT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TENSORS_FILE: &str = "tensors.bin";
pub const SKELETON_FILE: &str = "skeleton.pt";
pub const READY_FILE: &str = "ready.json";

#[cfg(test)]
mod tests;
