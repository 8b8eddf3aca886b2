//! The store's entries as the agent laid them out: when the agent publishes a model it records
//! the sha256 of the laid-out files (`.layouts/<digest>` in the store's private folder: the
//! agent's own memory volume, which nothing else on the node writes, not beside the entries
//! where whoever could change an entry could change its record too), and it serves an entry it
//! did not lay out in this call only once that entry's files hash to the record; it also
//! checks every entry again periodically. The source's digest names what was
//! fetched; this one, what is served: an entry whose files changed since (or one that appeared
//! in the store without the agent laying it out) is removed and laid out again from its source.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use kube_zerocopy_fetch::Store;

pub struct Layouts {
    store: Store,
}

/// What the record says of an entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Its files hash to the record.
    Verified,
    /// No record, or files that hash to something else: the reason.
    Untrusted(String),
}

impl Layouts {
    pub fn new(store: Store) -> Self {
        Layouts { store }
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.store.private_root().join(".layouts").join(digest)
    }

    /// Records the entry of `digest` as it is now (call right after laying it out).
    pub fn record(&self, digest: &str) -> Result<()> {
        self.record_laid_out(digest, &self.store.model_dir(digest))
    }

    /// Records the files of `digest` laid out in `dir` (its staging folder, before it becomes
    /// the entry: the record then exists whenever the entry does).
    pub fn record_laid_out(&self, digest: &str, dir: &Path) -> Result<()> {
        let hash = hash_entry(dir)?;
        let path = self.record_path(digest);
        fs::create_dir_all(path.parent().expect("a folder"))?;
        fs::write(&path, hash).with_context(|| format!("writing {}", path.display()))
    }

    /// Whether the agent recorded laying out `digest`.
    pub fn is_recorded(&self, digest: &str) -> bool {
        self.record_path(digest).is_file()
    }

    /// Whether the entry of `digest` is the one recorded.
    pub fn check(&self, digest: &str) -> Result<Check> {
        let dir = self.store.model_dir(digest);
        if !fs::symlink_metadata(&dir)?.is_dir() {
            return Ok(Check::Untrusted("it is not a folder".into()));
        }
        let recorded = match fs::read_to_string(self.record_path(digest)) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Check::Untrusted(
                    "the agent has no record of laying it out".into(),
                ))
            }
            Err(e) => return Err(e).context("reading the layout record"),
        };
        let now = hash_entry(&dir)?;
        Ok(if now == recorded.trim() {
            Check::Verified
        } else {
            Check::Untrusted(format!(
                "its files hash to {now}, not to {} as laid out",
                recorded.trim()
            ))
        })
    }

    /// Every entry of the store now, by digest, with its folder's inode: an entry that is not
    /// among them afterwards, or with another inode, was published in between.
    pub fn entries(&self) -> Result<HashMap<String, u64>> {
        let blobs = self.store.root().join("blobs");
        let listing = match fs::read_dir(&blobs) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", blobs.display())),
        };
        let mut entries = HashMap::new();
        for entry in listing {
            let entry = entry?;
            let inode = fs::symlink_metadata(entry.path())?.ino();
            entries.insert(entry.file_name().to_string_lossy().into_owned(), inode);
        }
        Ok(entries)
    }
}

/// The sha256 over the entry's files in name order: each one's name, length and bytes. Anything
/// that is not a plain file (a link, a folder) makes the entry unverifiable.
pub fn hash_entry(dir: &Path) -> Result<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for name in names {
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        anyhow::ensure!(
            meta.file_type().is_file(),
            "{} is not a plain file",
            path.display()
        );
        hasher.update(name.as_encoded_bytes());
        hasher.update([0]);
        hasher.update(meta.len().to_le_bytes());
        let mut file = File::open(&path)?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}
