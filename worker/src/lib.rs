//! The worker runtime: maps a published model read-only and hands libtorch tensors that point
//! into that mapping, without copying.
//!
//! - [`shared`]: [`SharedModel`], the read-only mapping of one published model, and zero-copy
//!   tensor views whose storages keep the mapping alive (it is unmapped after the last view).
//! - [`nn`]: binding those views to tch::nn modules built in Rust, never initialising weights.
//! - [`jit`]: TorchScript modules whose parameters, buffers and constants live in the mapping.
//! - [`model`]: one loaded model of either format, on cpu or cuda.
//! - [`memory`]: RSS/PSS/USS from /proc, to prove the sharing.
//! - [`task`]: one Task shard through the models, behind `kube-zerocopy-worker task`;
//!   [`shard_file`]: the tensors of the safetensors files shards hold.
//! - [`actor`]: the Actor-mode server behind `kube-zerocopy-worker actor`, speaking the Open
//!   Inference Protocol ([`oip`]: tensors in and out of its bodies).
//! - [`cli`]: the binary's commands, including `plan` and `drive`, whose work (no libtorch)
//!   is in `kube_zerocopy_batch`, as are the Task data, records and manifests.

pub mod actor;
pub mod cli;
pub mod cuda;
pub mod dlpack;
mod ffi;
pub mod jit;
pub mod memory;
pub mod model;
pub mod nn;
pub mod oip;
pub mod shard_file;
pub mod shared;
pub mod task;

pub use model::{LoadedModel, Pipeline};
pub use shared::SharedModel;
