//! The content-addressed store: published models, the node-wide locks and the holds on models,
//! and the collection of unused models.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use super::{Manifest, Staging, MANIFEST_FILE, TENSORS_FILE};

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

    pub(super) fn users_lock(&self, digest: &str) -> Result<File> {
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
        Ok(Staging::new(dir, self.root.join("blobs")))
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
pub(super) fn names_in(dir: &Path) -> Result<Vec<String>> {
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
