//! One published model, mapped read-only, and zero-copy tensor views into it.

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kube_zerocopy_store::{Bindings, Store};
use kube_zerocopy_store::{DType, Manifest, TensorEntry, TENSORS_FILE};
use memmap2::{Mmap, MmapOptions};
use tch::Tensor;

use crate::ffi;

/// The read-only mapping of a model's tensors.bin. Tensors viewing it hold an `Arc` to it, so
/// it is unmapped only after the last of them is gone, whatever the caller keeps.
pub struct Mapping {
    mmap: Option<Mmap>,
    path: PathBuf,
}

impl Mapping {
    fn open(path: &Path, prefault: bool) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Mapping {
                mmap: None,
                path: path.to_owned(),
            });
        }
        let mut options = MmapOptions::new();
        if prefault {
            options.populate();
        }
        // SAFETY: published files never change (the layout's contract), and the mapping is
        // read-only: a write through it faults instead of corrupting other workers' weights.
        let mmap =
            unsafe { options.map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Ok(Mapping {
            mmap: Some(mmap),
            path: path.to_owned(),
        })
    }

    pub fn range(&self) -> Range<usize> {
        match &self.mmap {
            Some(m) => m.as_ptr() as usize..m.as_ptr() as usize + m.len(),
            None => 0..0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Releases one `Arc<Mapping>` handed to libtorch as a storage's context.
unsafe extern "C" fn release_mapping(ctx: *mut c_void) {
    drop(Arc::from_raw(ctx as *const Mapping));
}

pub(crate) fn scalar_type(dtype: DType) -> c_int {
    match dtype {
        DType::U8 => 0,
        DType::I8 => 1,
        DType::I16 => 2,
        DType::I32 => 3,
        DType::I64 => 4,
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        DType::Bool => 11,
        DType::BF16 => 15,
    }
}

/// A published model, opened for reading.
pub struct SharedModel {
    pub name: String,
    pub manifest: Manifest,
    pub dir: PathBuf,
    mapping: Arc<Mapping>,
}

impl SharedModel {
    /// Opens the model bound to `name` in this pod.
    pub fn open(store: &Store, bindings: &Bindings, name: &str, prefault: bool) -> Result<Self> {
        let (digest, manifest) = bindings.resolve(store, name)?;
        let dir = store.model_dir(&digest);
        let mapping = Mapping::open(&dir.join(TENSORS_FILE), prefault)
            .with_context(|| format!("model {name:?}"))?;
        // Checked again against what was mapped, not what a stat said before: every tensor
        // view below lies inside this mapping.
        manifest
            .validate(mapping.range().len() as u64)
            .with_context(|| {
                format!("model {name:?}: the store's {TENSORS_FILE} does not match its manifest")
            })?;
        Ok(SharedModel {
            name: name.to_owned(),
            manifest,
            dir,
            mapping: Arc::new(mapping),
        })
    }

    /// The address range of the mapping: every zero-copy tensor's data lies inside it.
    pub fn mapping_range(&self) -> Range<usize> {
        self.mapping.range()
    }

    pub fn mapping_path(&self) -> &Path {
        self.mapping.path()
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.manifest
            .tensor(name)
            .with_context(|| format!("model {:?} has no tensor {name:?}", self.name))
    }

    /// The pointer and a context (one strong count on the mapping) for one entry, for libtorch.
    pub(crate) fn raw(&self, entry: &TensorEntry) -> Result<(*mut c_void, *mut c_void)> {
        let range = self.mapping.range();
        let inside = entry
            .offset
            .checked_add(entry.length)
            .is_some_and(|end| end <= range.len() as u64);
        if !inside {
            bail!(
                "model {:?}: tensor {:?} lies outside the mapping of {} bytes",
                self.name,
                entry.name,
                range.len()
            );
        }
        let data = (range.start + entry.offset as usize) as *mut c_void;
        let ctx = Arc::into_raw(self.mapping.clone()) as *mut c_void;
        Ok((data, ctx))
    }

    /// A CPU tensor over the entry's bytes: no copy, read-only memory.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        let (data, ctx) = self.raw(entry)?;
        let raw = ffi::call(|err| unsafe {
            ffi::kzc_tensor_from_memory(
                data,
                shape.as_ptr(),
                shape.len() as c_int,
                scalar_type(entry.dtype),
                ctx,
                release_mapping,
                err,
            )
        });
        match raw {
            Ok(raw) => Ok(unsafe { ffi::tensor(raw) }),
            Err(e) => {
                // libtorch never took the context: give the count back.
                unsafe { release_mapping(ctx) };
                Err(e)
            }
        }
    }

    /// Like [`SharedModel::tensor`], checking the shape first.
    pub fn tensor_with_shape(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.size() != shape {
            bail!(
                "model {:?}: tensor {name:?} has shape {:?}, expected {shape:?}",
                self.name,
                t.size()
            );
        }
        Ok(t)
    }

    /// Pins the mapping for fast host-to-device copies (see [`crate::cuda`]). Returns a guard
    /// that unpins it when dropped.
    pub fn pin_for_cuda(&self) -> Result<PinGuard> {
        let range = self.mapping.range();
        if range.is_empty() {
            return Ok(PinGuard { ptr: None });
        }
        // SAFETY: the range is this model's live mapping; the guard unpins it, and the guard
        // lives in the loader, shorter than the model that holds the mapping.
        unsafe { crate::cuda::pin(range.start as *mut c_void, range.len())? };
        Ok(PinGuard {
            ptr: Some(range.start as *mut c_void),
        })
    }

    pub(crate) fn release_fn() -> ffi::ReleaseFn {
        release_mapping
    }

    /// Number of mapping references alive (this model plus every tensor viewing it).
    pub fn mapping_refs(&self) -> usize {
        Arc::strong_count(&self.mapping)
    }
}

/// Unpins a pinned mapping when dropped.
pub struct PinGuard {
    ptr: Option<*mut c_void>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(p) = self.ptr {
            // SAFETY: pinned by `pin_for_cuda`, and the mapping outlives this guard.
            unsafe { crate::cuda::unpin(p) };
        }
    }
}
