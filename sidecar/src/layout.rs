//! The shared-memory layout: the one format that the sidecar writes and the workers read.
//!
//! ```text
//! <store>/blobs/<sha256>/manifest.json   what is in tensors.bin, and where
//! <store>/blobs/<sha256>/tensors.bin     every tensor at a 64-byte aligned offset
//! <store>/blobs/<sha256>/skeleton.pt     TorchScript only: the archive without its tensor records
//! <store>/.staging/<sha256>.<pid>.<n>/   a model being written; never read by workers
//! <store>/.locks/<key>.lock              held while one sidecar loads a model (node sharing)
//! <store>/.users/<sha256>.lock           shared-locked by every sidecar that serves the model;
//!                                        its mtime is when one last did (both lock folders
//!                                        elsewhere with Store::with_lock_dir)
//! <bindings>/ready.json                  per pod: model name -> digest, written last
//! ```
//!
//! A model folder is named by the sha256 of its source file and is published by one atomic
//! rename of a complete staging folder; it never changes afterwards. A reader therefore sees
//! either no folder or a complete one, also when the sidecar is killed mid-write.
//!
//! On a node's shared store, models that no sidecar holds and that nobody used for a while are
//! collected ([`Store::collect_unused`]): unpublished by one rename, then deleted. A sidecar takes
//! its hold before it looks for a model, so a collection never removes a model in use.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::ModelFormat;

/// Every tensor starts at a multiple of this many bytes (libtorch's own CPU alignment).
pub const ALIGNMENT: u64 = 64;
pub const LAYOUT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TENSORS_FILE: &str = "tensors.bin";
pub const SKELETON_FILE: &str = "skeleton.pt";
pub const READY_FILE: &str = "ready.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte offset in tensors.bin, a multiple of [`ALIGNMENT`].
    pub offset: u64,
    /// Byte length: the product of `shape` times the dtype's size.
    pub length: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub layout_version: u32,
    /// sha256 of the source file: the folder's name.
    pub digest: String,
    pub format: ModelFormat,
    pub source_bytes: u64,
    pub tensors_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    /// TorchScript: the archive's code and pickles, without tensor records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<String>,
}

impl Manifest {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Checks what a reader relies on: aligned, in bounds, consistent lengths, no overlap.
    pub fn validate(&self, tensors_file_len: u64) -> Result<()> {
        if self.layout_version != LAYOUT_VERSION {
            bail!(
                "layout version {} is not the supported {LAYOUT_VERSION}",
                self.layout_version
            );
        }
        if tensors_file_len != self.tensors_bytes {
            bail!(
                "{TENSORS_FILE} holds {tensors_file_len} bytes, the manifest says {}",
                self.tensors_bytes
            );
        }
        let mut names = std::collections::HashSet::new();
        if let Some(t) = self.tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            bail!("tensor {:?} is listed twice", t.name);
        }
        let mut by_offset: Vec<&TensorEntry> = self.tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        let mut end_of_previous = 0u64;
        for t in by_offset {
            if t.offset % ALIGNMENT != 0 {
                bail!(
                    "tensor {:?} starts at unaligned offset {}",
                    t.name,
                    t.offset
                );
            }
            let expected = t
                .shape
                .iter()
                .try_fold(t.dtype.size(), |n, &d| n.checked_mul(d));
            if expected != Some(t.length) {
                bail!(
                    "tensor {:?}: length {} does not match its shape and dtype",
                    t.name,
                    t.length
                );
            }
            if t.offset < end_of_previous {
                bail!("tensor {:?} overlaps the tensor before it", t.name);
            }
            end_of_previous = t.offset.checked_add(t.length).context("offset overflow")?;
            if end_of_previous > self.tensors_bytes {
                bail!("tensor {:?} runs past the end of {TENSORS_FILE}", t.name);
            }
        }
        Ok(())
    }
}

/// Assigns aligned offsets, in the given order. Returns the entries and the total size, or an
/// error when a size does not fit in 64 bits (shapes come from untrusted files).
pub fn plan(
    tensors: impl IntoIterator<Item = (String, DType, Vec<u64>)>,
) -> Result<(Vec<TensorEntry>, u64)> {
    let mut offset = 0u64;
    let mut entries = Vec::new();
    for (name, dtype, shape) in tensors {
        let length = shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
            .with_context(|| format!("tensor {name:?}: its shape {shape:?} overflows 64 bits"))?;
        let end = offset
            .checked_add(length)
            .and_then(|end| end.checked_next_multiple_of(ALIGNMENT))
            .with_context(|| {
                format!("tensor {name:?}: the tensors' total size overflows 64 bits")
            })?;
        entries.push(TensorEntry {
            name,
            dtype,
            shape,
            offset,
            length,
        });
        offset = end;
    }
    Ok((entries, offset))
}

/// How long a sidecar waits for a lock another process holds before it gives up: long enough
/// for another sidecar to lay out a large model, short enough that a process that never lets
/// go (hung, or hostile on a shared store) fails the pod with the reason instead of hanging it.
pub const LOCK_TIMEOUT: Duration =
    Duration::from_secs(kube_zerocopy_contract::pod::DEFAULT_LOCK_TIMEOUT_SECONDS);

/// The content-addressed store: the shared volume's root.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    lock_timeout: Duration,
    /// Where `.locks/` and `.users/` are: the store's root unless set.
    lock_dir: Option<PathBuf>,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store {
            root: root.into(),
            lock_timeout: LOCK_TIMEOUT,
            lock_dir: None,
        }
    }

    /// The same store, its lock files (`.locks/`, `.users/`) in `dir` instead of its root. The
    /// node agent keeps them in its own pod's memory, where nothing else on the node reaches:
    /// the store's sole writer needs no lock a stranger could hold.
    pub fn with_lock_dir(self, dir: impl Into<PathBuf>) -> Self {
        Store {
            lock_dir: Some(dir.into()),
            ..self
        }
    }

    fn lock_root(&self) -> &Path {
        self.lock_dir.as_deref().unwrap_or(&self.root)
    }

    /// Where the store's writer keeps what no one else may write (its locks and its other
    /// bookkeeping): the lock folder when set (see [`Store::with_lock_dir`]), else the root.
    pub fn private_root(&self) -> &Path {
        self.lock_root()
    }

    /// The same store, giving up on a held lock after `timeout` instead of [`LOCK_TIMEOUT`].
    pub fn with_lock_timeout(self, timeout: Duration) -> Self {
        Store {
            lock_timeout: timeout,
            ..self
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_dir(&self, digest: &str) -> PathBuf {
        self.root.join("blobs").join(digest)
    }

    pub fn is_published(&self, digest: &str) -> bool {
        self.model_dir(digest).join(MANIFEST_FILE).is_file()
    }

    /// The digests of the published models, sorted.
    pub fn published(&self) -> Result<Vec<String>> {
        let mut digests = names_in(&self.root.join("blobs"))?;
        digests.retain(|digest| self.is_published(digest));
        digests.sort();
        Ok(digests)
    }

    /// Reads and checks a published model's manifest. The folder and its files must be the
    /// store's own, not links to elsewhere (a link planted in a shared store would hand a
    /// reader someone else's files).
    pub fn open(&self, digest: &str) -> Result<Manifest> {
        let dir = self.model_dir(digest);
        // What is there, as itself (a link is not followed); absent is reported below.
        let is = |path: &Path, kind: fn(&fs::Metadata) -> bool| {
            fs::symlink_metadata(path).map_or(true, |m| kind(&m))
        };
        if !is(&dir, fs::Metadata::is_dir) {
            bail!(
                "model {digest}: {} is not a folder of the store",
                dir.display()
            );
        }
        for file in [MANIFEST_FILE, TENSORS_FILE] {
            let path = dir.join(file);
            if !is(&path, fs::Metadata::is_file) {
                bail!("model {digest}: {} is not a plain file", path.display());
            }
        }
        let text = fs::read_to_string(dir.join(MANIFEST_FILE)).with_context(|| {
            format!("model {digest} is not published in {}", self.root.display())
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("manifest of {digest} is not valid"))?;
        if manifest.digest != digest {
            bail!("folder {digest} holds a manifest for {}", manifest.digest);
        }
        let len = fs::metadata(dir.join(TENSORS_FILE))
            .with_context(|| format!("{TENSORS_FILE} of {digest} is missing"))?
            .len();
        manifest
            .validate(len)
            .with_context(|| format!("published model {digest} is inconsistent"))?;
        if let Some(skeleton) = &manifest.skeleton {
            if !dir.join(skeleton).is_file() {
                bail!("published model {digest} lacks its {skeleton}");
            }
        }
        Ok(manifest)
    }

    /// Takes the node-wide lock for `key`, waiting while another process holds it. The lock is
    /// released when the returned file is dropped or the process dies.
    pub fn lock(&self, key: &str) -> Result<File> {
        let (file, path) = self.key_lock(key)?;
        self.wait_for(&file, &path, Lock::Exclusive)?;
        Ok(file)
    }

    /// The lock file of `key` (see [`Store::lock`]), opened, not locked.
    fn key_lock(&self, key: &str) -> Result<(File, PathBuf)> {
        let dir = self.lock_root().join(".locks");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((file, path))
    }

    /// Takes `file`'s lock, waiting at most the store's lock timeout.
    fn wait_for(&self, file: &File, path: &Path, kind: Lock) -> Result<()> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            if try_lock(file, kind).with_context(|| format!("locking {}", path.display()))? {
                return Ok(());
            }
            if started.elapsed() >= self.lock_timeout {
                bail!(
                    "waited {:?} for {}: another process holds it (a sidecar laying out the \
                     same model, or one that hangs)",
                    self.lock_timeout,
                    path.display()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Claims a model for as long as the returned [`Hold`] lives (or the process does). Waits
    /// while a collection is removing it; look for the model only once this returns.
    pub fn hold(&self, digest: &str) -> Result<Hold> {
        let file = self.users_lock(digest)?;
        self.wait_for(&file, &self.users_lock_path(digest), Lock::Shared)
            .with_context(|| format!("holding model {digest}"))?;
        let hold = Hold {
            file,
            digest: digest.to_owned(),
        };
        hold.refresh()?;
        Ok(hold)
    }

    fn users_lock_path(&self, digest: &str) -> PathBuf {
        self.lock_root()
            .join(".users")
            .join(format!("{digest}.lock"))
    }

    fn users_lock(&self, digest: &str) -> Result<File> {
        let path = self.users_lock_path(digest);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    /// Removes the published models that no sidecar holds and that none has used for at least
    /// `unused_for`, and the staging folders of models nobody is writing. Returns the removed
    /// digests. The lock files stay: a waiter may hold one open, and they are a few bytes.
    pub fn collect_unused(&self, unused_for: Duration) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        // One entry that cannot be handled (unreadable, planted) is reported and skipped: it
        // must not keep the others from being collected.
        for digest in names_in(&self.root.join("blobs"))? {
            match self.collect_one(&digest, unused_for) {
                Ok(true) => removed.push(digest),
                Ok(false) => {}
                Err(e) => tracing::warn!(%digest, error = format!("{e:#}"), "collecting a model"),
            }
        }
        self.empty_trash()?;
        // A staging folder is written under its key's lock (a digest, or a URI's key while
        // the digest is unknown): one whose lock is free was left by a killed writer.
        for name in names_in(&self.root.join(".staging"))? {
            let key = name.split('.').next().unwrap_or_default();
            if self
                .key_lock(key)
                .and_then(|(lock, _)| try_lock(&lock, Lock::Exclusive))
                .unwrap_or(false)
            {
                let _ = fs::remove_dir_all(self.root.join(".staging").join(&name));
            }
        }
        Ok(removed)
    }

    /// Removes the unused model that was used least recently (its use mark the oldest), to
    /// make room: its digest, or None when every model is in use.
    pub fn collect_least_recently_used(&self) -> Result<Option<String>> {
        let mut unused = Vec::new();
        for digest in names_in(&self.root.join("blobs"))? {
            let marked = fs::metadata(self.users_lock_path(&digest)).and_then(|m| m.modified());
            // A model without a use mark was never held: oldest of all.
            unused.push((marked.unwrap_or(std::time::UNIX_EPOCH), digest));
        }
        unused.sort();
        for (_, digest) in unused {
            match self.collect_one(&digest, Duration::ZERO) {
                Ok(true) => {
                    self.empty_trash()?;
                    return Ok(Some(digest));
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%digest, error = format!("{e:#}"), "collecting a model"),
            }
        }
        Ok(None)
    }

    /// Collects one entry of blobs/ if unused for `unused_for`; true when it was removed. An
    /// entry that is not a folder (a link or file planted there) is removed at once.
    fn collect_one(&self, digest: &str, unused_for: Duration) -> Result<bool> {
        let path = self.model_dir(digest);
        if !fs::symlink_metadata(&path)?.file_type().is_dir() {
            self.take_out(digest)?;
            tracing::warn!(path = %path.display(), "removed an entry that is no model folder");
            return Ok(true);
        }
        let users = self.users_lock(digest)?;
        if !try_lock(&users, Lock::Exclusive)? {
            return Ok(false);
        }
        // A node agent's views link the model's files: while one does, a pod has it mounted
        // (the links outlive the agent's holds, which go with its process).
        if linked_elsewhere(&path)? {
            return Ok(false);
        }
        let idle = users.metadata()?.modified()?.elapsed().unwrap_or_default();
        if idle < unused_for {
            return Ok(false);
        }
        self.take_out(digest)?;
        Ok(true)
    }

    /// Unpublishes the entry of `digest`: a folder in one rename into the trash (the slow
    /// delete happens out of sight; what a killed process leaves there goes with the next
    /// emptying), anything else (a link or file planted there) removed itself, never followed.
    fn take_out(&self, digest: &str) -> Result<()> {
        let path = self.model_dir(digest);
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_dir() {
            return fs::remove_file(&path).with_context(|| format!("removing {}", path.display()));
        }
        let trash = self.root.join(".trash");
        fs::create_dir_all(&trash)?;
        let gone = trash.join(format!("{digest}.{}.{}", std::process::id(), nanos()));
        fs::rename(&path, &gone).with_context(|| format!("unpublishing model {digest}"))
    }

    fn empty_trash(&self) -> Result<()> {
        let trash = self.root.join(".trash");
        // remove_dir_all removes a link itself, never what it points at.
        for name in names_in(&trash)? {
            let _ = fs::remove_dir_all(trash.join(name));
        }
        Ok(())
    }

    /// Takes a model out of the store at once, whoever holds it (a node agent's views keep
    /// their own links): an entry that must not be served. A link or file planted in its place
    /// is removed, never followed.
    pub fn discard(&self, digest: &str) -> Result<()> {
        let _lock = self.lock(digest)?;
        match fs::symlink_metadata(self.model_dir(digest)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            _ => self.take_out(digest)?,
        }
        self.empty_trash()
    }

    /// Starts writing a model, staged under `key`: its digest, or while that is unknown (a
    /// source hashed as it is laid out) the key of the lock held meanwhile. Call with that lock
    /// held: staging folders under the same key left by a killed sidecar are removed first.
    pub fn begin(&self, key: &str) -> Result<Staging> {
        let staging_root = self.root.join(".staging");
        fs::create_dir_all(&staging_root)
            .with_context(|| format!("creating {}", staging_root.display()))?;
        for entry in fs::read_dir(&staging_root)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{key}."))
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = staging_root.join(format!("{key}.{}.{}", std::process::id(), nanos()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging {
            dir,
            blobs: self.root.join("blobs"),
            published: false,
        })
    }
}

/// A sidecar's claim on a model (see [`Store::hold`]): released when dropped.
pub struct Hold {
    file: File,
    pub digest: String,
}

impl Hold {
    /// Records that the model is in use now: collection counts idle time from the last refresh.
    pub fn refresh(&self) -> Result<()> {
        self.file
            .set_modified(SystemTime::now())
            .with_context(|| format!("marking model {} as used", self.digest))
    }
}

/// Whether a file of the model folder `dir` has another link (a node agent's view of it).
fn linked_elsewhere(dir: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        if entry?.metadata()?.nlink() > 1 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Tells apart the folders one process makes in the same second.
fn nanos() -> u32 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// The entries of `dir` by name; none when it does not exist.
fn names_in(dir: &Path) -> Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

#[derive(Clone, Copy)]
enum Lock {
    Exclusive,
    Shared,
}

/// Takes `file`'s lock if nobody holds it in a conflicting way; false when somebody does.
fn try_lock(file: &File, kind: Lock) -> Result<bool> {
    let attempt = match kind {
        Lock::Exclusive => file.try_lock(),
        Lock::Shared => file.try_lock_shared(),
    };
    match attempt {
        Ok(()) => Ok(true),
        Err(fs::TryLockError::WouldBlock) => Ok(false),
        Err(fs::TryLockError::Error(e)) => Err(e).context("taking a lock"),
    }
}

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

/// Per pod: which digest each model name is bound to. Written last, atomically; the readiness
/// probe and the workers read it.
#[derive(Clone, Debug)]
pub struct Bindings {
    dir: PathBuf,
}

impl Bindings {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Bindings { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(READY_FILE)
    }

    pub fn clear(&self) -> Result<()> {
        match fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn write(&self, digests: &BTreeMap<String, String>) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self
            .dir
            .join(format!(".{READY_FILE}.{}", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(digests)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, self.path())?;
        Ok(())
    }

    /// The digests, or None while the sidecar has not finished.
    pub fn read(&self) -> Result<Option<BTreeMap<String, String>>> {
        match fs::read_to_string(self.path()) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).context("ready.json is not valid")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The digest of one model, with its manifest checked.
    pub fn resolve(&self, store: &Store, model: &str) -> Result<(String, Manifest)> {
        let digests = self.read()?.with_context(|| {
            format!(
                "the weights are not ready: {} does not exist",
                self.path().display()
            )
        })?;
        let digest = digests
            .get(model)
            .with_context(|| format!("model {model:?} is not among the published models"))?;
        let manifest = store
            .open(digest)
            .with_context(|| format!("model {model:?}"))?;
        Ok((digest.clone(), manifest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_in_the_order_asked_and_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Store::new(dir.path()).begin("d").unwrap();
        let mut file = staging.create_tensors_file(256).unwrap();
        let entry = |name: &str, offset: u64, length: u64| TensorEntry {
            name: name.into(),
            dtype: DType::U8,
            shape: vec![length],
            offset,
            length,
        };
        let (a, b) = (entry("a", 128, 16), entry("b", 0, 64));
        let regions = file.regions(&[&a, &b]).unwrap();
        assert_eq!(
            regions.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [16, 64]
        );
        for (region, fill) in regions.into_iter().zip([1u8, 2]) {
            region.fill(fill);
        }
        assert!(file.region(&a).unwrap().iter().all(|&x| x == 1));
        assert!(file.region(&b).unwrap().iter().all(|&x| x == 2));
        let overlapping = entry("c", 32, 64);
        let err = file.regions(&[&b, &overlapping]).unwrap_err().to_string();
        assert!(err.contains("overlaps another"), "{err}");
        assert!(file.regions(&[&entry("d", 250, 16)]).is_err());
    }

    /// A store with a (fake) published model folder for `digest`.
    fn store_with(digest: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        fs::create_dir_all(store.model_dir(digest)).unwrap();
        (dir, store)
    }

    #[test]
    fn a_held_model_is_never_collected() {
        let (_dir, store) = store_with("aa");
        let hold = store.hold("aa").unwrap();
        // A second holder (another sidecar) shares the claim.
        let other = store.hold("aa").unwrap();
        assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
        drop(hold);
        assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
        assert!(store.model_dir("aa").is_dir());
        drop(other);
        assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["aa"]);
        assert!(!store.model_dir("aa").exists());
        assert!(names_in(&store.root.join(".trash")).unwrap().is_empty());
    }

    /// A model whose files a node agent's view links is in use, held or not.
    #[test]
    fn a_model_linked_into_a_view_is_never_collected() {
        let (dir, store) = store_with("dd");
        let tensors = store.model_dir("dd").join("tensors.bin");
        fs::write(&tensors, b"weights").unwrap();
        let view = dir.path().join(".views/csi-1");
        fs::create_dir_all(&view).unwrap();
        fs::hard_link(&tensors, view.join("tensors.bin")).unwrap();
        assert!(store.collect_unused(Duration::ZERO).unwrap().is_empty());
        assert!(tensors.is_file());
        fs::remove_dir_all(&view).unwrap();
        assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["dd"]);
    }

    /// Room is made from the model used least recently; a held one is never taken.
    #[test]
    fn room_is_made_from_the_least_recently_used_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let hour = Duration::from_secs(3600);
        for (digest, hours_ago) in [("new", 1), ("old", 3), ("mid", 2), ("held", 5)] {
            fs::create_dir_all(store.model_dir(digest)).unwrap();
            drop(store.hold(digest).unwrap());
            let users = store.users_lock(digest).unwrap();
            users
                .set_modified(SystemTime::now() - hours_ago * hour)
                .unwrap();
        }
        let _held = store.hold("held").unwrap();
        store
            .users_lock("held")
            .unwrap()
            .set_modified(SystemTime::now() - 5 * hour)
            .unwrap();
        let order: Vec<_> =
            std::iter::from_fn(|| store.collect_least_recently_used().unwrap()).collect();
        assert_eq!(order, ["old", "mid", "new"]);
        assert!(store.model_dir("held").is_dir());
    }

    #[test]
    fn an_unused_model_is_kept_until_it_was_idle_long_enough() {
        let (_dir, store) = store_with("bb");
        drop(store.hold("bb").unwrap());
        let hour = Duration::from_secs(3600);
        assert!(store.collect_unused(hour).unwrap().is_empty());
        let users = store.users_lock("bb").unwrap();
        users.set_modified(SystemTime::now() - 2 * hour).unwrap();
        assert_eq!(store.collect_unused(hour).unwrap(), vec!["bb"]);
    }

    #[test]
    fn staging_is_collected_only_when_nobody_writes_that_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let lock = store.lock("cc").unwrap();
        let writing = store.begin("cc").unwrap();
        // A model fetched by URI alone is staged under its URI's key, which nobody holds as
        // a user: its writer's lock is what keeps it.
        let uri_lock = store.lock("uri-ee").unwrap();
        let fetching = store.begin("uri-ee").unwrap();
        let left = store.begin("dd").unwrap();
        std::mem::forget(left); // a killed sidecar's leftover
        store.collect_unused(Duration::ZERO).unwrap();
        let mut staging = names_in(&dir.path().join(".staging")).unwrap();
        staging.sort();
        assert_eq!(staging.len(), 2, "{staging:?}");
        assert!(staging[0].starts_with("cc."), "{staging:?}");
        assert!(staging[1].starts_with("uri-ee."), "{staging:?}");
        // The writer is killed: its lock goes with it, and its folder with the next collection.
        std::mem::forget(fetching);
        drop(uri_lock);
        store.collect_unused(Duration::ZERO).unwrap();
        let staging = names_in(&dir.path().join(".staging")).unwrap();
        assert_eq!(staging.len(), 1, "{staging:?}");
        drop((writing, lock));
    }

    #[test]
    fn a_lock_held_forever_fails_after_the_timeout_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).with_lock_timeout(Duration::from_millis(300));
        // Another process's lock (flock: another open file conflicts, in one process too).
        let held = store.lock("ee").unwrap();
        let err = format!("{:#}", store.lock("ee").unwrap_err());
        assert!(
            err.contains("waited 300ms") && err.contains("ee.lock"),
            "{err}"
        );
        drop(held);
        drop(store.lock("ee").unwrap());
        // A collection's exclusive claim held forever: a hold gives up the same way.
        let users = store.users_lock("ff").unwrap();
        users.lock().unwrap();
        let err = format!("{:#}", store.hold("ff").err().unwrap());
        assert!(
            err.contains("holding model ff") && err.contains("waited"),
            "{err}"
        );
    }

    #[test]
    fn a_link_planted_in_the_store_is_never_followed() {
        let (_elsewhere, other) = store_with("gg");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        fs::create_dir_all(dir.path().join("blobs")).unwrap();
        fs::write(other.model_dir("gg").join(MANIFEST_FILE), "{}").unwrap();
        std::os::unix::fs::symlink(other.model_dir("gg"), store.model_dir("gg")).unwrap();
        let err = format!("{:#}", store.open("gg").unwrap_err());
        assert!(err.contains("is not a folder of the store"), "{err}");
        // The collection removes the link, not what it points at.
        assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["gg"]);
        assert!(fs::symlink_metadata(store.model_dir("gg")).is_err());
        assert!(other.model_dir("gg").join(MANIFEST_FILE).is_file());
        // A real folder whose manifest is a link is refused too.
        fs::create_dir_all(store.model_dir("hh")).unwrap();
        std::os::unix::fs::symlink(
            other.model_dir("gg").join(MANIFEST_FILE),
            store.model_dir("hh").join(MANIFEST_FILE),
        )
        .unwrap();
        let err = format!("{:#}", store.open("hh").unwrap_err());
        assert!(err.contains("is not a plain file"), "{err}");
    }

    #[test]
    fn one_bad_entry_does_not_stop_the_collection() {
        let (_dir, store) = store_with("ii");
        fs::create_dir_all(store.model_dir("jj")).unwrap();
        // jj's users lock cannot be opened (a folder stands where the file goes).
        fs::create_dir_all(store.root.join(".users/jj.lock")).unwrap();
        assert_eq!(store.collect_unused(Duration::ZERO).unwrap(), vec!["ii"]);
        assert!(store.model_dir("jj").is_dir());
    }

    fn manifest(tensors: Vec<TensorEntry>, size: u64) -> Manifest {
        Manifest {
            layout_version: LAYOUT_VERSION,
            digest: "d".into(),
            format: ModelFormat::Safetensors,
            source_bytes: 0,
            tensors_bytes: size,
            tensors,
            skeleton: None,
        }
    }

    #[test]
    fn plan_aligns_every_tensor() {
        let (entries, total) = plan([
            ("a".to_string(), DType::F32, vec![3]),
            ("b".to_string(), DType::BF16, vec![5, 7]),
            ("c".to_string(), DType::Bool, vec![1]),
        ])
        .unwrap();
        assert_eq!(
            entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![0, 64, 192]
        );
        assert_eq!(entries[1].length, 70);
        assert_eq!(total, 256);
        manifest(entries, total).validate(total).unwrap();
    }

    #[test]
    fn validate_rejects_overlap_misalignment_and_overrun() {
        let t = |name: &str, offset, n| TensorEntry {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
            offset,
            length: n * 4,
        };
        let err = |m: Manifest, len| m.validate(len).unwrap_err().to_string();
        assert!(err(manifest(vec![t("a", 0, 32), t("b", 64, 4)], 256), 256).contains("overlaps"));
        assert!(err(manifest(vec![t("a", 4, 1)], 64), 64).contains("unaligned"));
        assert!(err(manifest(vec![t("a", 0, 100)], 256), 256).contains("past the end"));
        assert!(err(manifest(vec![t("a", 0, 1)], 64), 128).contains("holds 128 bytes"));
        assert!(err(manifest(vec![t("a", 0, 1), t("a", 64, 1)], 128), 128).contains("listed twice"));
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused() {
        let huge = vec![1 << 40, 1 << 40];
        let err = plan([("w".to_string(), DType::F32, huge)]).unwrap_err();
        assert!(err.to_string().contains("overflows 64 bits"), "{err}");
        let err = plan([
            ("a".to_string(), DType::U8, vec![u64::MAX - 8]),
            ("b".to_string(), DType::U8, vec![64]),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("overflows 64 bits"), "{err}");
        let mut m = manifest(vec![], 0);
        m.tensors.push(TensorEntry {
            name: "w".into(),
            dtype: DType::F64,
            shape: vec![1 << 62, 4],
            offset: 0,
            length: 0,
        });
        assert!(m
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }
}
