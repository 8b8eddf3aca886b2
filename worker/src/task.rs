//! Task mode: one shard of the input folder through the pipeline, into the output folder.
//!
//! The input is a folder of safetensors files; shard `i` is the i-th file in name order (the
//! Indexed Job's completion index). Its tensor `input` runs through the models in order and the
//! result is written as tensor `output` to a file of the same name in the output folder, by an
//! atomic rename: a re-run shard replaces its output whole, and no reader sees half a file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use kube_zerocopy_sidecar::process::Permanent;

use crate::model::Pipeline;

pub const INPUT_TENSOR: &str = "input";
pub const OUTPUT_TENSOR: &str = "output";

pub use kube_zerocopy_sidecar::config::shard_files as list_shards;

pub fn read_input(path: &Path) -> Result<Tensor> {
    let tensors = Tensor::read_safetensors(path)
        .with_context(|| format!("reading shard {}", path.display()))?;
    tensors
        .into_iter()
        .find(|(n, _)| n == INPUT_TENSOR)
        .map(|(_, t)| t)
        .with_context(|| format!("shard {} has no tensor {INPUT_TENSOR:?}", path.display()))
}

/// Writes `tensor` as `output/<file_name>` atomically: into a file of a unique name (two pods
/// may write the same shard: a retry overlapping a slow pod), synced, renamed over the target,
/// and the rename synced too.
pub fn write_output(output: &Path, file_name: &str, tensor: &Tensor) -> Result<PathBuf> {
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let target = output.join(file_name);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(output)
        .with_context(|| format!("creating a file in {}", output.display()))?;
    let cpu = tensor.to_device(Device::Cpu).contiguous();
    Tensor::write_safetensors(&[(OUTPUT_TENSOR, &cpu)], tmp.path())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    std::fs::File::open(tmp.path())?.sync_all()?;
    tmp.persist(&target)
        .with_context(|| format!("replacing {}", target.display()))?;
    std::fs::File::open(output)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", output.display()))?;
    Ok(target)
}

/// Runs shard `index` of an input folder that must hold `expected` shard files (when known):
/// any other count means that some files would be skipped or some shards fail, so the Task
/// fails at once with a [`Permanent`] error. Returns the output file.
pub fn run_shard(
    pipeline: &Pipeline,
    input: &Path,
    output: &Path,
    index: usize,
    expected: Option<usize>,
) -> Result<PathBuf> {
    let shards = list_shards(input)?;
    if let Some(expected) = expected.filter(|&n| n != shards.len()) {
        return Err(Permanent(format!(
            "the input folder {} holds {} shard files, the pipeline declares {expected} \
             (spec.task.shards): make them agree, or shards would be skipped or missing",
            input.display(),
            shards.len()
        ))
        .into());
    }
    let Some(shard) = shards.get(index) else {
        bail!(
            "shard {index} does not exist: {} holds {} shard files",
            input.display(),
            shards.len()
        );
    };
    let x = read_input(shard)?;
    let y = pipeline.forward(&x)?;
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    write_output(output, &name, &y)
}
