//! Task mode: one shard of the input through the pipeline, into the output.
//!
//! Shard `i` is the i-th safetensors file of the input (see [`kube_zerocopy_batch::shards`],
//! which also keeps the run's records and manifest). Its tensor `input` runs through the models
//! in order and the result is written as tensor `output` under the same name in the output,
//! atomically: a re-run shard replaces its output whole, and no reader sees half of one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::Tensor;

use kube_zerocopy_batch::data::{Entry, Store};
use kube_zerocopy_batch::shards::{
    checked_listing, commit_if_complete, commit_output, Shard, ShardRecord,
};
use kube_zerocopy_runtime::process::ShardFailed;

use crate::model::Pipeline;
use crate::shard_file::{decode, encode};

pub const INPUT_TENSOR: &str = "input";
pub const OUTPUT_TENSOR: &str = "output";

/// Runs one shard. Any other shard count than expected, or an input changed since its plan,
/// means that some files would be skipped or read in another order: the Task fails at once with
/// a [`Permanent`] error. Returns the committed record, and whether this shard wrote the
/// manifest.
pub fn run_shard(pipeline: &Pipeline, shard: &Shard) -> Result<(ShardRecord, bool)> {
    let listed = checked_listing(shard)?;
    let entry = listed.get(shard.index).with_context(|| {
        format!(
            "shard {} does not exist: {} holds {} shard files",
            shard.index,
            shard.input.uri(),
            listed.len()
        )
    })?;
    let x = decode(&shard.input.read(entry)?)
        .with_context(|| format!("shard {} of {}", entry.name, shard.input.uri()))?;
    let y = pipeline.forward(&x).map_err(|e| forward_failed(entry, e))?;
    let bytes = encode(&y)?;
    let record = commit_output(shard.output, shard.run, shard.index, entry, &bytes)?;
    let committed = commit_if_complete(&shard.input.uri(), shard.output, shard.run, listed.len())?;
    Ok((record, committed))
}

/// A forward pass that failed: the same model on the same input fails again, so this shard
/// fails at once ([`ShardFailed`]: its index fails, the other shards go on, and the Job's cap on
/// failed shards applies), instead of being retried and its model fetched again; unless the
/// device failed (memory ran out, a GPU fault), which another try elsewhere may not meet.
fn forward_failed(entry: &Entry, error: anyhow::Error) -> anyhow::Error {
    let message = format!("shard {}: {error:#}", entry.name);
    if crate::model::is_device_failure(&message) {
        return anyhow::anyhow!(message);
    }
    ShardFailed(message).into()
}

/// The tensor `input` of a safetensors file.
pub fn read_input(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading shard {}", path.display()))?;
    decode(&bytes).with_context(|| format!("shard {}", path.display()))
}

/// Writes `tensor` as tensor `output` of `output/<file_name>`, atomically.
pub fn write_output(output: &Path, file_name: &str, tensor: &Tensor) -> Result<PathBuf> {
    Store::Folder(output.to_owned()).write(file_name, &encode(tensor)?)?;
    Ok(output.join(file_name))
}
