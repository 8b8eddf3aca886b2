//! A model folder being written (tensors.bin reserved and mapped up front), and its atomic
//! publication.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Manifest, TensorEntry, MANIFEST_FILE, TENSORS_FILE};

/// The store cannot hold a model: a typed error, so that the publisher can make room.
#[derive(Debug, thiserror::Error)]
#[error("shared memory is full: the model needs {needed} bytes, {free} are free in {store}")]
pub struct StoreFull {
    pub needed: u64,
    pub free: u64,
    /// The store's whole size: a model larger than that cannot fit whatever is removed.
    pub capacity: u64,
    pub store: String,
}

/// A model folder being written. Dropped without [`Staging::publish`], it is removed.
pub struct Staging {
    dir: PathBuf,
    /// Where published models are: the folder is published as `blobs/<manifest's digest>`.
    blobs: PathBuf,
    published: bool,
}

impl Staging {
    /// A staging folder at `dir` (see [`Store::begin`](super::Store::begin)), published into
    /// `blobs`.
    pub(super) fn new(dir: PathBuf, blobs: PathBuf) -> Self {
        Staging {
            dir,
            blobs,
            published: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates tensors.bin with all its space reserved up front, so that a full shared-memory
    /// folder fails here, at once, and not halfway through the copy.
    pub fn create_tensors_file(&self, size: u64) -> Result<TensorsFile> {
        let path = self.dir.join(TENSORS_FILE);
        // Readable too: a shared writable mapping needs both.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        if size > 0 {
            if let Err(e) =
                rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
            {
                let (free, capacity) = rustix::fs::statvfs(&self.dir)
                    .map(|s| (s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
                    .unwrap_or((0, 0));
                if e == rustix::io::Errno::NOSPC {
                    let store = self
                        .dir
                        .parent()
                        .and_then(Path::parent)
                        .unwrap_or(&self.dir);
                    return Err(StoreFull {
                        needed: size,
                        free,
                        capacity,
                        store: store.display().to_string(),
                    }
                    .into());
                }
                bail!("reserving {size} bytes in {}: {e}", path.display());
            }
        }
        // Mapped (not populated: the space is reserved, so no fault can fail for lack of room,
        // and the faults are taken by the threads that fill it, beside the hash, not before it
        // on one thread); the formats read their sources straight into it (one copy).
        let map = if size > 0 {
            let len = usize::try_from(size).context("tensors.bin exceeds the address space")?;
            // SAFETY: a file this process just created in its own staging folder; nobody else
            // maps or truncates it before it is published (and never after).
            Some(
                unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }
                    .with_context(|| format!("mapping {}", path.display()))?,
            )
        } else {
            None
        };
        Ok(TensorsFile { map, path })
    }

    /// fsyncs the folder's files, writes the manifest, and renames the folder into place under
    /// the manifest's digest.
    /// `before_visible` sees the complete folder just before it is renamed into place: what
    /// must exist whenever the entry does (the node agent's record of it) is written there;
    /// its error stops the publication.
    pub fn publish(
        mut self,
        manifest: &Manifest,
        before_visible: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let target = self.blobs.join(&manifest.digest);
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let mut f = File::create(&manifest_path)?;
        f.write_all(serde_json::to_string_pretty(manifest)?.as_bytes())?;
        f.sync_all()?;
        for entry in fs::read_dir(&self.dir)?.flatten() {
            File::open(entry.path())?.sync_all()?;
        }
        File::open(&self.dir)?.sync_all()?;
        before_visible(&self.dir)?;
        fs::create_dir_all(&self.blobs)?;
        match fs::rename(&self.dir, &target) {
            Ok(()) => {}
            // Published meanwhile by a process that did not take the lock: the content is the
            // same (same digest), keep theirs.
            Err(_) if target.join(MANIFEST_FILE).is_file() => {
                let _ = fs::remove_dir_all(&self.dir);
            }
            Err(e) => return Err(e).with_context(|| format!("publishing {}", target.display())),
        }
        File::open(&self.blobs)?.sync_all()?;
        self.published = true;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// tensors.bin of a staging folder, mapped for writing.
pub struct TensorsFile {
    map: Option<memmap2::MmapMut>,
    path: PathBuf,
}

impl TensorsFile {
    /// The bytes of several tensors at once, in the order of `entries`, to be filled in place
    /// (by other threads, too); tensors that overlap are an error.
    pub fn regions(&mut self, entries: &[&TensorEntry]) -> Result<Vec<&mut [u8]>> {
        let path = self.path.display().to_string();
        let mut rest: &mut [u8] = self.map.as_deref_mut().unwrap_or_default();
        let len = rest.len() as u64;
        let mut by_offset: Vec<usize> = (0..entries.len()).collect();
        by_offset.sort_by_key(|&i| entries[i].offset);
        let mut taken = 0u64;
        let mut regions: Vec<Option<&mut [u8]>> = entries.iter().map(|_| None).collect();
        for i in by_offset {
            let entry = entries[i];
            let end = entry.offset.checked_add(entry.length);
            if entry.offset < taken || end.is_none_or(|end| end > len) {
                bail!(
                    "tensor {:?} overlaps another or lies outside {path} ({len} bytes)",
                    entry.name
                );
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((entry.offset - taken) as usize);
            let (region, tail) = tail.split_at_mut(entry.length as usize);
            rest = tail;
            taken = entry.offset + entry.length;
            regions[i] = Some(region);
        }
        Ok(regions
            .into_iter()
            .map(|r| r.expect("each entry"))
            .collect())
    }

    /// The bytes of one tensor, to be filled in place.
    pub fn region(&mut self, entry: &TensorEntry) -> Result<&mut [u8]> {
        let range = usize::try_from(entry.offset)
            .ok()
            .zip(usize::try_from(entry.length).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        let map = self.map.as_deref_mut().unwrap_or_default();
        let len = map.len();
        range.and_then(|r| map.get_mut(r)).with_context(|| {
            format!(
                "tensor {:?} lies outside {} ({len} bytes)",
                entry.name,
                self.path.display()
            )
        })
    }
}
