//! The shards of a batch run, with no libtorch: the input listed once ([`plan`]) and checked by
//! every shard ([`checked_listing`]); each shard's output committed with a record of what it
//! wrote (input version, output, sha256) under `_kube-zerocopy/runs/<run>/`; the manifest
//! written by the shard that finds every record there. A run is one generation of one
//! pipeline, so an earlier run's records never count towards a later one's manifest.
//!
//! The input is a folder or an object storage prefix of safetensors files ([`Store`]); shard
//! `i` is the i-th file in name order (the Indexed Job's completion index). A Task's worker
//! (which runs the models) and a batch run's driver (which sends the shards to replicas) both
//! keep their outputs this way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use kube_zerocopy_runtime::process::Permanent;

use crate::data::{Entry, Store};

/// Where each run's shard records are kept, under the output.
pub const RUNS_DIR: &str = "_kube-zerocopy/runs";
/// The manifest of a finished run's outputs, under the output.
pub const MANIFEST: &str = "manifest.json";

/// The shard files of an input folder, in order: shard `i` is the i-th `*.safetensors` file
/// by name. The planner, every shard's worker and the local runner list it the same way.
pub fn list_shards(input: &Path) -> Result<Vec<PathBuf>> {
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

/// What planning found: how many shards, and the digest of the listing they were found in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub shards: usize,
    pub input_digest: String,
}

/// One shard's output, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardRecord {
    pub shard: usize,
    pub input: String,
    pub input_version: String,
    pub output: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A run's outputs, written once every shard has committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub run: String,
    pub input: String,
    pub output: String,
    pub shards: Vec<ShardRecord>,
}

/// sha256 over the listing's names, sizes and versions, in order: any file added, removed,
/// renamed or rewritten changes it.
pub fn listing_digest(entries: &[Entry]) -> String {
    let mut hasher = Sha256::new();
    for e in entries {
        hasher.update(format!("{}\t{}\t{}\n", e.name, e.bytes, e.version));
    }
    hex::encode(hasher.finalize())
}

/// Lists the input once: its shard count and listing digest. An input without shard files is
/// refused ([`Permanent`]: trying again cannot help until someone puts files there).
pub fn plan(input: &Store) -> Result<Plan> {
    let shards = input.shards()?;
    if shards.is_empty() {
        return Err(Permanent(format!(
            "the input {} holds no .safetensors shard files",
            input.uri()
        ))
        .into());
    }
    Ok(Plan {
        shards: shards.len(),
        input_digest: listing_digest(&shards),
    })
}

/// What one shard runs on, and what it is checked against.
pub struct Shard<'a> {
    pub input: &'a Store,
    pub output: &'a Store,
    pub index: usize,
    /// The shard count the pipeline declares or its plan found.
    pub expected: Option<usize>,
    /// The plan's listing digest, when planned.
    pub planned: Option<&'a str>,
    /// The run this shard belongs to (one generation of one pipeline).
    pub run: &'a str,
}

/// Writes a shard's output under its input's name, then its record in the run's folder: the
/// record says the output is there.
pub fn commit_output(
    output: &Store,
    run: &str,
    index: usize,
    entry: &Entry,
    bytes: &[u8],
) -> Result<ShardRecord> {
    output.write(&entry.name, bytes)?;
    let record = ShardRecord {
        shard: index,
        input: entry.name.clone(),
        input_version: entry.version.clone(),
        output: entry.name.clone(),
        sha256: hex::encode(Sha256::digest(bytes)),
        bytes: bytes.len() as u64,
    };
    output.write(
        &format!("{RUNS_DIR}/{run}/shard-{index:05}.json"),
        &serde_json::to_vec(&record)?,
    )?;
    Ok(record)
}

/// The shards of `listed` that `run` has committed: a record of the same input, same version.
pub fn committed_shards(output: &Store, run: &str, listed: &[Entry]) -> Result<BTreeSet<usize>> {
    let dir = format!("{RUNS_DIR}/{run}");
    let mut committed = BTreeSet::new();
    for record in run_records(output, &dir)? {
        let same = listed
            .get(record.shard)
            .is_some_and(|e| e.name == record.input && e.version == record.input_version);
        if same {
            committed.insert(record.shard);
        }
    }
    Ok(committed)
}

fn run_records(output: &Store, dir: &str) -> Result<Vec<ShardRecord>> {
    let entries = output.list(dir)?;
    let mut records = Vec::new();
    for entry in entries
        .iter()
        .filter(|e| e.name.starts_with("shard-") && e.name.ends_with(".json"))
    {
        let name = format!("{dir}/{}", entry.name);
        let bytes = output.read_latest(&name)?;
        let record: ShardRecord =
            serde_json::from_slice(&bytes).with_context(|| format!("the shard record {name}"))?;
        records.push(record);
    }
    Ok(records)
}

/// The input's shard files, checked against the count expected and the plan's digest.
pub fn checked_listing(shard: &Shard) -> Result<Vec<Entry>> {
    let listed = shard.input.shards()?;
    if let Some(expected) = shard.expected.filter(|&n| n != listed.len()) {
        let said = if shard.planned.is_some() {
            format!("its plan found {expected}")
        } else {
            format!("the pipeline declares {expected} (spec.task.shards)")
        };
        return Err(Permanent(format!(
            "the input {} holds {} shard files, {said}: make them agree, or shards would be \
             skipped or missing",
            shard.input.uri(),
            listed.len()
        ))
        .into());
    }
    if let Some(planned) = shard.planned.filter(|&p| p != listing_digest(&listed)) {
        return Err(Permanent(format!(
            "the input {} changed since its shards were planned (listing sha256 {planned}, now \
             {}): every shard must read the input as planned, so the pipeline stops here; \
             change or re-create the pipeline to plan the input as it is now",
            shard.input.uri(),
            listing_digest(&listed)
        ))
        .into());
    }
    Ok(listed)
}

/// Writes the manifest when every shard of the run has its record: each shard looks once its
/// own record is written, so the last to finish sees them all (storage that reads its own
/// writes: a file system, S3). Two that finish together both write it, with the same bytes.
pub fn commit_if_complete(input: &str, output: &Store, run: &str, total: usize) -> Result<bool> {
    let mut shards = run_records(output, &format!("{RUNS_DIR}/{run}"))?;
    if shards.len() < total {
        return Ok(false);
    }
    shards.sort_by_key(|r| r.shard);
    let manifest = Manifest {
        run: run.to_owned(),
        input: input.to_owned(),
        output: output.uri(),
        shards,
    };
    output.write(MANIFEST, &serde_json::to_vec_pretty(&manifest)?)?;
    Ok(true)
}

/// Why `file` is refused for lacking the tensor `name`: with the tensors it has, so that a
/// misnamed one is seen at once.
pub fn no_tensor(file: &SafeTensors, name: &str) -> String {
    let mut names: Vec<&str> = file.names();
    names.sort_unstable();
    let shown = names
        .iter()
        .take(8)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "it has no tensor {name:?}; it has {}{}",
        if shown.is_empty() {
            "none".to_owned()
        } else {
            shown.join(", ")
        },
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )
}
