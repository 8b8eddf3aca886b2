//! The worker runtime: maps a published model read-only and hands libtorch tensors that point
//! into that mapping, without copying.
//!
//! - [`shared`]: [`SharedModel`], the read-only mapping of one published model, and zero-copy
//!   tensor views whose storages keep the mapping alive (it is unmapped after the last view).
//! - [`nn`]: binding those views to tch::nn modules built in Rust, never initialising weights.
//! - [`jit`]: TorchScript modules whose parameters, buffers and constants live in the mapping.
//! - [`model`]: one loaded model of either format, on cpu or cuda.
//! - [`memory`]: RSS/PSS/USS from /proc, to prove the sharing.
//! - [`task`]: the Task-mode planner and shard runner behind `kube-zerocopy-worker plan` and
//!   `task`; [`data`]: the folders and object storage prefixes they read and write,
//!   [`shard_file`] the safetensors files they hold.
//! - [`actor`]: the Actor-mode server behind `kube-zerocopy-worker actor`, speaking the Open
//!   Inference Protocol ([`oip`]); [`driver`]: what streams an input through the replicas.

pub mod actor;
pub mod cli;
pub mod client_token;
pub mod cuda;
pub mod data;
pub mod dlpack;
pub mod driver;
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
