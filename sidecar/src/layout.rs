//! The shared-memory layout: the one format that the sidecar writes and the workers read.
//!
//! ```text
//! <store>/blobs/<sha256>/manifest.json   what is in tensors.bin, and where
//! <store>/blobs/<sha256>/tensors.bin     every tensor at a 64-byte aligned offset
//! <store>/blobs/<sha256>/skeleton.pt     TorchScript only: the archive without its tensor records
//! <store>/.staging/<sha256>.<pid>.<n>/   a model being written; never read by workers
//! <store>/.locks/<key>.lock              held while one sidecar loads a model (node sharing)
//! <bindings>/ready.json                  per pod: model name -> digest, written last
//! ```
//!
//! A model folder is named by the sha256 of its source file and is published by one atomic
//! rename of a complete staging folder; it never changes afterwards. A reader therefore sees
//! either no folder or a complete one, also when the sidecar is killed mid-write.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
            let expected = t.numel().checked_mul(t.dtype.size());
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

/// Assigns aligned offsets, in the given order. Returns the entries and the total size.
pub fn plan(
    tensors: impl IntoIterator<Item = (String, DType, Vec<u64>)>,
) -> (Vec<TensorEntry>, u64) {
    let mut offset = 0u64;
    let mut entries = Vec::new();
    for (name, dtype, shape) in tensors {
        let length = shape.iter().product::<u64>() * dtype.size();
        entries.push(TensorEntry {
            name,
            dtype,
            shape,
            offset,
            length,
        });
        offset = (offset + length).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    (entries, offset)
}

/// The content-addressed store: the shared volume's root.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
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

    /// Reads and checks a published model's manifest.
    pub fn open(&self, digest: &str) -> Result<Manifest> {
        let dir = self.model_dir(digest);
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
        let dir = self.root.join(".locks");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }

    /// Starts writing a model. Call with the digest's lock held: staging folders for the same
    /// digest left by a killed sidecar are removed first.
    pub fn begin(&self, digest: &str) -> Result<Staging> {
        let staging_root = self.root.join(".staging");
        fs::create_dir_all(&staging_root)
            .with_context(|| format!("creating {}", staging_root.display()))?;
        for entry in fs::read_dir(&staging_root)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{digest}."))
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = staging_root.join(format!("{digest}.{}.{nanos}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Staging {
            dir,
            target: self.model_dir(digest),
            published: false,
        })
    }
}

/// A model folder being written. Dropped without [`Staging::publish`], it is removed.
pub struct Staging {
    dir: PathBuf,
    target: PathBuf,
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
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if size > 0 {
            if let Err(e) =
                rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
            {
                let free = rustix::fs::statvfs(&self.dir)
                    .map(|s| s.f_bavail * s.f_frsize)
                    .unwrap_or(0);
                if e == rustix::io::Errno::NOSPC {
                    let store = self
                        .dir
                        .parent()
                        .and_then(Path::parent)
                        .unwrap_or(&self.dir);
                    bail!(
                        "shared memory is full: the model needs {size} bytes, {free} are free in {}",
                        store.display()
                    );
                }
                bail!("reserving {size} bytes in {}: {e}", path.display());
            }
        }
        Ok(TensorsFile { file, path })
    }

    /// fsyncs the folder's files, writes the manifest, and renames the folder into place.
    pub fn publish(mut self, manifest: &Manifest) -> Result<PathBuf> {
        let manifest_path = self.dir.join(MANIFEST_FILE);
        let mut f = File::create(&manifest_path)?;
        f.write_all(serde_json::to_string_pretty(manifest)?.as_bytes())?;
        f.sync_all()?;
        for entry in fs::read_dir(&self.dir)?.flatten() {
            File::open(entry.path())?.sync_all()?;
        }
        File::open(&self.dir)?.sync_all()?;
        let parent = self.target.parent().expect("model dir has a parent");
        fs::create_dir_all(parent)?;
        match fs::rename(&self.dir, &self.target) {
            Ok(()) => {}
            // Published meanwhile by a process that did not take the lock: the content is the
            // same (same digest), keep theirs.
            Err(_) if self.target.join(MANIFEST_FILE).is_file() => {
                let _ = fs::remove_dir_all(&self.dir);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("publishing {}", self.target.display()))
            }
        }
        File::open(parent)?.sync_all()?;
        self.published = true;
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct TensorsFile {
    file: File,
    path: PathBuf,
}

impl TensorsFile {
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, offset)
            .with_context(|| format!("writing {}", self.path.display()))
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
        ]);
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
    }
}

/// Where a pod's store and bindings are, as both binaries take them (flags or environment).
#[derive(clap::Args, Clone, Debug)]
pub struct PodPaths {
    /// The shared store (an emptyDir with medium Memory, or a folder of the host's /dev/shm).
    #[arg(long, env = "KZC_STORE", global = true, default_value = "/kzc/store")]
    pub store: PathBuf,
    /// This pod's bindings folder (model name -> digest).
    #[arg(
        long,
        env = "KZC_BINDINGS",
        global = true,
        default_value = "/kzc/bindings"
    )]
    pub bindings: PathBuf,
}

impl PodPaths {
    pub fn store(&self) -> Store {
        Store::new(&self.store)
    }

    pub fn bindings(&self) -> Bindings {
        Bindings::new(&self.bindings)
    }
}
