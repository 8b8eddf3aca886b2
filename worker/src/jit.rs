//! TorchScript modules whose tensors live in the shared mapping.
//!
//! `torch::jit::load` reads and copies every storage of the archive. The sidecar instead
//! publishes the storages in the layout and the rest of the archive as skeleton.pt; the shim
//! runs libtorch's own deserializer over the skeleton with every storage supplied from the
//! mapping (a `DeserializationStorageContext`). Parameters, buffers (BatchNorm statistics) and
//! tensor constants (frozen modules) all end up pointing into the shared memory: no worker
//! ever holds a private copy, not even while loading.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use crate::ffi;
use crate::shared::SharedModel;

pub struct SharedScriptModule {
    raw: *mut ffi::JitModule,
}

// SAFETY: a torch::jit::Module may be used from any thread; calls take &self for reads.
unsafe impl Send for SharedScriptModule {}
unsafe impl Sync for SharedScriptModule {}

impl Drop for SharedScriptModule {
    fn drop(&mut self) {
        unsafe { ffi::kzc_jit_free(self.raw) }
    }
}

/// A parameter or buffer of a module.
pub struct NamedTensor {
    pub name: String,
    pub is_buffer: bool,
    pub tensor: Tensor,
}

unsafe extern "C" fn collect_named(
    user: *mut c_void,
    name: *const c_char,
    is_buffer: c_int,
    t: ffi::RawTensor,
) {
    let out = &mut *(user as *mut Vec<NamedTensor>);
    out.push(NamedTensor {
        name: CStr::from_ptr(name).to_string_lossy().into_owned(),
        is_buffer: is_buffer != 0,
        tensor: ffi::tensor(t),
    });
}

/// Gives back the mapping counts taken for storages that the shim never saw.
fn release_all<'a>(storages: impl IntoIterator<Item = &'a ffi::Storage>) {
    for s in storages {
        // SAFETY: each context is one count taken by `SharedModel::raw`, released once here.
        unsafe { SharedModel::release_fn()(s.ctx) };
    }
}

impl SharedScriptModule {
    pub fn load(model: &SharedModel) -> Result<Self> {
        let skeleton = model.manifest.skeleton.as_ref().with_context(|| {
            format!(
                "model {:?} is not a TorchScript model (no skeleton)",
                model.name
            )
        })?;
        let path = CString::new(model.dir.join(skeleton).to_string_lossy().as_bytes())?;
        let mut keys = Vec::new();
        let mut data = Vec::new();
        let mut constants = Vec::new();
        for entry in &model.manifest.tensors {
            let (archive, key) = entry.name.split_once('/').with_context(|| {
                format!(
                    "model {:?}: tensor {:?} names no archive",
                    model.name, entry.name
                )
            })?;
            let key = CString::new(key)?;
            let (ptr, ctx) = match model.raw(entry) {
                Ok(raw) => raw,
                Err(e) => {
                    release_all(data.iter().chain(&constants));
                    return Err(e);
                }
            };
            let storage = ffi::Storage {
                key: key.as_ptr(),
                data: ptr,
                nbytes: entry.length as usize,
                ctx,
            };
            keys.push(key);
            match archive {
                "data" => data.push(storage),
                "constants" => constants.push(storage),
                other => {
                    release_all(data.iter().chain(&constants).chain([&storage]));
                    bail!("model {:?}: unknown archive {other:?}", model.name);
                }
            }
        }
        // The shim takes every storage context, also when it fails.
        let raw = ffi::call(|err| unsafe {
            ffi::kzc_jit_load(
                path.as_ptr(),
                data.as_ptr(),
                data.len(),
                constants.as_ptr(),
                constants.len(),
                SharedModel::release_fn(),
                err,
            )
        })
        .with_context(|| format!("loading TorchScript model {:?}", model.name))?;
        Ok(SharedScriptModule { raw })
    }

    pub fn forward(&self, inputs: &[Tensor]) -> Result<Tensor> {
        let raw: Vec<ffi::RawTensor> = inputs
            .iter()
            .map(|t| t.as_ptr() as ffi::RawTensor)
            .collect();
        let out = ffi::call(|err| unsafe {
            ffi::kzc_jit_forward(self.raw, raw.as_ptr(), raw.len() as c_int, err)
        })?;
        Ok(unsafe { ffi::tensor(out) })
    }

    /// Every parameter and buffer, recursively, as tensors sharing their storage.
    pub fn named_tensors(&self) -> Result<Vec<NamedTensor>> {
        let mut out: Vec<NamedTensor> = Vec::new();
        ffi::call(|err| unsafe {
            ffi::kzc_jit_named_tensors(
                self.raw,
                &mut out as *mut _ as *mut c_void,
                collect_named,
                err,
            )
        })?;
        Ok(out)
    }

    /// Copies every parameter and buffer to `device` (one host-to-device copy); the shared
    /// host storages are released.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        let (kind, index) = match device {
            Device::Cpu => return Ok(()),
            Device::Cuda(i) => (1, i as c_int),
            other => bail!("device {other:?} is not supported"),
        };
        ffi::call(|err| unsafe { ffi::kzc_jit_to(self.raw, kind, index, err) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The contexts the shim released, in order.
    static RELEASED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record_release(ctx: *mut c_void) {
        RELEASED.lock().unwrap().push(ctx as usize);
    }

    /// Calls the shim with storages whose contexts are 1, 2, ... and returns its error and the
    /// contexts it released.
    fn load_with_keys(
        skeleton: &CStr,
        data: &[&CStr],
        constants: &[&CStr],
    ) -> (String, Vec<usize>) {
        RELEASED.lock().unwrap().clear();
        let mut bytes = [0u8; 64];
        let mut next = 0usize;
        let mut storages = |keys: &[&CStr]| -> Vec<ffi::Storage> {
            keys.iter()
                .map(|key| {
                    next += 1;
                    ffi::Storage {
                        key: key.as_ptr(),
                        data: bytes.as_mut_ptr() as *mut c_void,
                        nbytes: 4,
                        ctx: next as *mut c_void,
                    }
                })
                .collect()
        };
        let (data, constants) = (storages(data), storages(constants));
        let err = ffi::call(|err| unsafe {
            ffi::kzc_jit_load(
                skeleton.as_ptr(),
                data.as_ptr(),
                data.len(),
                constants.as_ptr(),
                constants.len(),
                record_release,
                err,
            )
        })
        .map(|_| ())
        .expect_err("the load succeeded");
        let mut released = RELEASED.lock().unwrap().clone();
        released.sort();
        (err.to_string(), released)
    }

    /// A failed load releases every storage exactly once: a repeated key used to release the
    /// ones before it twice (once by libtorch, once by the shim's clean-up).
    #[test]
    fn a_failed_load_releases_each_storage_once() {
        let (err, released) = load_with_keys(c"/nonexistent", &[c"0", c"1", c"0"], &[c"0"]);
        assert!(err.contains("storage key 0 is given twice"), "{err}");
        assert_eq!(released, [1, 2, 3, 4]);
        let (err, released) = load_with_keys(c"/nonexistent", &[c"0"], &[c"0", c"1", c"1"]);
        assert!(err.contains("given twice"), "{err}");
        assert_eq!(released, [1, 2, 3, 4]);
        let (err, released) = load_with_keys(c"/nonexistent/skeleton.pt", &[c"0", c"1"], &[c"0"]);
        assert!(!err.contains("given twice"), "{err}");
        assert_eq!(released, [1, 2, 3]);
    }
}
