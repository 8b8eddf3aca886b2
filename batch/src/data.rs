//! Where a Task pipeline's shards come from and go to: a folder (mounted into the pod) or an
//! object storage prefix (`s3://<bucket>/<prefix>/`, `az://<container>/<prefix>/`, read and
//! written with `object_store`'s clients, which also retry what fails on the way).
//!
//! Both are seen the same way: the shard files are the `*.safetensors` entries directly under
//! it, in name order, each with a version (an object's ETag; a file's size and modification
//! time) so that a shard read later can be checked to be the one that was planned. A write is
//! atomic: a file is renamed into place, an object is one PUT; no reader sees half of either.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object_store::path::Path as Key;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use kube_zerocopy_contract::models::{AzureAccess, S3Access};
use kube_zerocopy_object_storage::{self as cloud, Storage};
use kube_zerocopy_runtime::process::Permanent;

pub const SHARD_EXTENSION: &str = ".safetensors";

/// One entry of a listing: its name under the folder or prefix, size and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub bytes: u64,
    pub version: String,
}

pub enum Store {
    Folder(PathBuf),
    Bucket(Bucket),
}

pub struct Bucket {
    uri: String,
    /// Which field of the pipeline holds its credentials, for errors
    /// (`input.s3.credentialsSecret`).
    field: String,
    store: std::sync::Arc<dyn Storage>,
    prefix: Option<Key>,
    runtime: tokio::runtime::Runtime,
}

impl Store {
    /// A folder path or `file://` URI, or an `s3://` or `az://` prefix reached with its
    /// settings. `field` names the pipeline's field (`input`, `output`) in errors.
    pub fn open(
        uri: &str,
        s3: Option<&S3Access>,
        azure: Option<&AzureAccess>,
        field: &str,
    ) -> Result<Self> {
        let located = cloud::locate(uri, s3, azure).with_context(|| format!("{field} {uri}"))?;
        let Some(located) = located else {
            if uri.contains("://") && !uri.starts_with("file://") {
                bail!("{field} {uri}: expected a folder, or an s3:// or az:// prefix");
            }
            return Ok(Store::Folder(uri.trim_start_matches("file://").into()));
        };
        let prefix = located.key.trim_matches('/');
        let top = uri.strip_suffix(&located.key).unwrap_or(uri);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Store::Bucket(Bucket {
            uri: format!(
                "{}/{prefix}{}",
                top.trim_end_matches('/'),
                if prefix.is_empty() { "" } else { "/" }
            ),
            field: format!("{field}.{}", located.settings),
            store: located.store,
            prefix: (!prefix.is_empty())
                .then(|| Key::parse(prefix))
                .transpose()
                .with_context(|| format!("{field} {uri}: not a valid object prefix"))?,
            runtime,
        }))
    }

    /// How it is named to a user, ending in `/`: the folder, or `s3://bucket/prefix/`.
    pub fn uri(&self) -> String {
        match self {
            Store::Folder(dir) => format!("{}/", dir.display().to_string().trim_end_matches('/')),
            Store::Bucket(b) => b.uri.clone(),
        }
    }

    /// The shard files, in name order. An entry that cannot be read fails the listing:
    /// skipping it would shift every shard after it to another index.
    pub fn shards(&self) -> Result<Vec<Entry>> {
        let mut entries = self.list("")?;
        entries.retain(|e| e.name.ends_with(SHARD_EXTENSION) && !e.name.contains('/'));
        Ok(entries)
    }

    /// Every entry under `dir` (a relative folder, "" for the top; not recursive), by name.
    pub fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut entries = match self {
            Store::Folder(root) => list_folder(root, dir)?,
            Store::Bucket(b) => b.list(dir)?,
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// The whole of `entry`, refused if it is no longer the version listed.
    pub fn read(&self, entry: &Entry) -> Result<Vec<u8>> {
        self.fetch(&entry.name, Some(&entry.version))
    }

    /// The whole of `name` as it is now.
    pub fn read_latest(&self, name: &str) -> Result<Vec<u8>> {
        self.fetch(name, None)
    }

    fn fetch(&self, name: &str, version: Option<&str>) -> Result<Vec<u8>> {
        match self {
            Store::Folder(root) => {
                let path = root.join(name);
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let now = file_version(&std::fs::metadata(&path)?);
                if version.is_some_and(|v| v != now) {
                    return Err(changed(&path.display().to_string()));
                }
                Ok(bytes)
            }
            Store::Bucket(b) => b.fetch(name, version),
        }
    }

    /// Writes `bytes` as `name` (which may hold folders) atomically, replacing what was there.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match self {
            Store::Folder(root) => write_file(&root.join(name), bytes),
            Store::Bucket(b) => b.write(name, bytes),
        }
    }

    /// Removes `name`; gone already is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        match self {
            Store::Folder(root) => match std::fs::remove_file(root.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", root.join(name).display()))
                }
                _ => Ok(()),
            },
            Store::Bucket(b) => b.remove(name),
        }
    }
}

fn changed(what: &str) -> anyhow::Error {
    Permanent(format!(
        "{what} changed since it was listed: every shard must read the input as it was listed \
         (and planned), so the pipeline stops here; change or re-create the pipeline to run on \
         the input as it is now"
    ))
    .into()
}

fn file_version(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}-{}.{:09}", meta.len(), meta.mtime(), meta.mtime_nsec())
}

fn list_folder(root: &Path, dir: &str) -> Result<Vec<Entry>> {
    let folder = root.join(dir);
    let reading = || format!("reading folder {}", folder.display());
    let read = match std::fs::read_dir(&folder) {
        // A folder of records not written yet is empty; the top must exist.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.is_empty() => {
            return Ok(Vec::new())
        }
        other => other.with_context(reading)?,
    };
    let mut entries = Vec::new();
    for entry in read {
        let entry = entry.with_context(reading)?;
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Gone since the folder was read: another writer's temporary file, renamed into
            // place meanwhile (shards write their records into one folder at once).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(reading),
        };
        if !meta.is_file() {
            continue;
        }
        entries.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            bytes: meta.len(),
            version: file_version(&meta),
        });
    }
    Ok(entries)
}

/// Into a file of a unique name beside the target (two pods may write the same shard: a retry
/// overlapping a slow pod), synced, renamed over the target, and the rename synced too.
fn write_file(target: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = target.parent().context("a file to write has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(target)
        .with_context(|| format!("replacing {}", target.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

impl Bucket {
    fn key(&self, name: &str) -> Key {
        let mut parts: Vec<&str> = self
            .prefix
            .as_ref()
            .map(|p| p.as_ref())
            .into_iter()
            .collect();
        parts.push(name);
        Key::from(parts.join("/"))
    }

    fn uri_of(&self, name: &str) -> String {
        format!("{}{name}", self.uri)
    }

    /// The storage's answer in a few words (its status and S3 error code, not the whole XML
    /// body object_store quotes), and which of the pipeline's fields to look at when it
    /// refuses the credentials.
    fn error(&self, doing: &str, name: &str, e: object_store::Error) -> anyhow::Error {
        let text = e.to_string();
        let status = text
            .split_once("status code: ")
            .map(|(_, rest)| rest.split(':').next().unwrap_or(rest).trim().to_owned());
        let code = text
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map(|(code, _)| code.to_owned());
        let refused = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || status
            .as_deref()
            .is_some_and(|s| s.starts_with("401") || s.starts_with("403"));
        let said = match (status, code) {
            (Some(status), Some(code)) => format!("HTTP {status} ({code})"),
            (Some(status), None) => format!("HTTP {status}"),
            _ => text.chars().take(300).collect(),
        };
        let hint = if refused {
            format!(
                " (the credentials come from {}.credentialsSecret, or the environment)",
                self.field
            )
        } else {
            String::new()
        };
        anyhow::anyhow!("{doing} {}: {said}{hint}", self.uri_of(name))
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let under = if dir.is_empty() {
            self.prefix.clone()
        } else {
            Some(self.key(dir.trim_end_matches('/')))
        };
        let listing = self
            .runtime
            .block_on(self.store.list_with_delimiter(under.as_ref()))
            .map_err(|e| self.error("listing", dir, e))?;
        let base = under.map(|k| k.to_string() + "/").unwrap_or_default();
        listing
            .objects
            .into_iter()
            .map(|o| {
                let name = o.location.as_ref().strip_prefix(&base).unwrap_or_default();
                Ok(Entry {
                    name: name.to_owned(),
                    bytes: o.size,
                    version: o
                        .e_tag
                        .with_context(|| format!("{} has no ETag", self.uri_of(name)))?,
                })
            })
            .collect()
    }

    fn fetch(&self, name: &str, version: Option<&str>) -> Result<Vec<u8>> {
        let options = GetOptions {
            if_match: version.map(str::to_owned),
            ..Default::default()
        };
        let key = self.key(name);
        let got = self.runtime.block_on(async {
            let result = self.store.get_opts(&key, options).await?;
            result.bytes().await
        });
        match got {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(object_store::Error::Precondition { .. }) => Err(changed(&self.uri_of(name))),
            Err(e) => Err(self.error("reading", name, e)),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let payload = PutPayload::from(bytes.to_vec());
        self.runtime
            .block_on(self.store.put(&self.key(name), payload))
            .map_err(|e| self.error("writing", name, e))?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        match self.runtime.block_on(self.store.delete(&self.key(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("removing", name, e)),
        }
    }
}
