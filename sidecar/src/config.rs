//! The models one pod serves, as the contract crate defines them (the operator renders them,
//! the weight server, the workers and the node agent read them), and the input folder's shards.

pub use kube_zerocopy_contract::models::*;

/// The shard files of a Task pipeline's input folder, in order: shard `i` is the i-th
/// `*.safetensors` file by name. The operator, the local runner and the worker all use this.
pub fn shard_files(input: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use anyhow::Context;
    let reading = || format!("reading input folder {}", input.display());
    let mut shards = Vec::new();
    // An entry that cannot be read fails the listing: skipping it would shift every shard
    // after it to another index.
    for entry in std::fs::read_dir(input).with_context(reading)? {
        let path = entry.with_context(reading)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}
