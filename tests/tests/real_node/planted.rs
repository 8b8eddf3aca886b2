//! What someone with the node's files planted in the node agent's store before any pipeline
//! named those models: a folder under one model's digest holding other bytes, a link under
//! another's pointing out of the store, and locks held forever at the lock files' places for
//! both. Pipelines in a `restricted` namespace then name both models (by digest): each runs
//! and answers exactly as the reference, the link's target is untouched and the entries are the
//! agent's own layouts. Runs first: the store must not hold the two models yet.

use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::actor::run_actor;
use crate::support::*;

pub async fn entries_planted_in_the_store_affect_no_pipeline(env: Arc<Env>) -> Result<()> {
    let store = env.cluster.node.agent_dir().join("store");
    let (folder_digest, link_digest) = (&env.safetensors.sha256, &env.torchscript.sha256);
    for digest in [folder_digest, link_digest] {
        ensure!(
            fs::symlink_metadata(store.join("blobs").join(digest)).is_err(),
            "the store holds {digest} already: this scenario must run first"
        );
    }
    // A folder under the safetensors model's digest: the TorchScript file's bytes as its
    // tensors and a manifest that claims them.
    let folder = store.join("blobs").join(folder_digest);
    fs::create_dir_all(&folder)?;
    fs::copy(
        env.models_dir().join(env.torchscript.file),
        folder.join("tensors.bin"),
    )?;
    let manifest = json!({"layout_version": 1, "digest": folder_digest, "format": "Safetensors",
        "source_bytes": 1, "tensors_bytes": 1, "tensors": []});
    fs::write(folder.join("manifest.json"), manifest.to_string())?;
    // A link under the TorchScript model's digest to a folder of the node.
    let outside = tempfile::tempdir()?;
    fs::write(outside.path().join("keep.txt"), "the node's own file")?;
    std::os::unix::fs::symlink(outside.path(), store.join("blobs").join(link_digest))?;
    // Locks held for as long as this scenario runs, where a store keeps them.
    let mut held = Vec::new();
    for digest in [folder_digest, link_digest] {
        for dir in [".locks", ".users"] {
            held.push(hold_lock(&store.join(dir).join(format!("{digest}.lock")))?);
        }
    }

    let ns = TestNamespace::create(&env.client, "planted", &[RESTRICTED]).await?;
    let mut results = Vec::new();
    for (file, model) in [
        ("actor-safetensors.yaml", &env.safetensors),
        ("actor-torchscript.yaml", &env.torchscript),
    ] {
        let uri = format!("{}/{}", env.http_base, model.file);
        let pipeline = example(file, &ns.name, model, &uri, |p| {
            p["spec"]["actor"] = json!({"replicas": 1});
            p["spec"]["sharing"] = json!("Node");
        })?;
        let name = pipeline.metadata.name.clone().context("a name")?;
        let result = run_actor(&env, &pipeline, model).await;
        env.record(&format!("{}/{name}", ns.name), result.is_ok());
        results.push(result);
    }
    results.into_iter().collect::<Result<Vec<_>>>()?;

    // The link's target is as it was; each entry is now a folder the agent laid out.
    let kept: Vec<_> = fs::read_dir(outside.path())?.flatten().collect();
    ensure!(
        kept.len() == 1
            && fs::read_to_string(outside.path().join("keep.txt"))? == "the node's own file",
        "the folder the planted link pointed at changed"
    );
    for (digest, source) in [
        (folder_digest, &env.safetensors),
        (link_digest, &env.torchscript),
    ] {
        let entry = store.join("blobs").join(digest);
        ensure!(
            fs::symlink_metadata(&entry)?.is_dir(),
            "{} is not a folder",
            entry.display()
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(entry.join("manifest.json"))?)?;
        ensure!(
            manifest["source_bytes"] == json!(source.bytes),
            "{}: the manifest is not the agent's layout of {}: {manifest}",
            entry.display(),
            source.file
        );
    }
    println!(
        "  a planted folder, a planted link and {} locks held throughout: both pipelines ran on the agent's own layouts",
        held.len()
    );
    Ok(())
}

/// An exclusive lock on `path` (created), held until the file is dropped.
fn hold_lock(path: &Path) -> Result<File> {
    fs::create_dir_all(path.parent().context("a folder")?)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}
