//! The user's Python model code, run by the interpreter embedded in the worker.
//!
//! The glue on the Python side is `kube_zerocopy.embedded` (the project's Python package): it
//! maps the weights and calls the user's entry point once, then runs each batch. Both torch
//! (Python's) and tch (the worker's) run on the one libtorch of the process, so a tensor handed
//! across as a DLPack capsule is the same memory on both sides.

use std::ffi::{c_void, CStr};

use anyhow::{anyhow, Context, Result};
use pyo3::prelude::*;
use pyo3::{ffi, PyErr};
use tch::{Device, Tensor};

use kube_zerocopy_contract::models::ModelSource;
use kube_zerocopy_worker::dlpack;
use kube_zerocopy_worker::model::{Forward, PythonBuilder};
use kube_zerocopy_worker::SharedModel;

/// The Python package's module that builds and runs models.
const GLUE: &str = "kube_zerocopy.embedded";
/// DLPack's capsule names: a tensor not yet taken, and one its consumer took.
const DLTENSOR: &CStr = c"dltensor";
const USED_DLTENSOR: &CStr = c"used_dltensor";

pub struct Builder;

impl PythonBuilder for Builder {
    fn build(
        &self,
        source: &ModelSource,
        entry_point: &str,
        shared: &SharedModel,
        device: Device,
    ) -> Result<Box<dyn Forward>> {
        // <store>/blobs/<digest>: the package maps the model from the store by its digest.
        let store = shared
            .dir
            .parent()
            .and_then(|blobs| blobs.parent())
            .context("the model's folder is not in a store")?;
        let device = match device {
            Device::Cpu => "cpu".to_owned(),
            Device::Cuda(index) => format!("cuda:{index}"),
            other => anyhow::bail!("device {other:?} is not one a pipeline can name"),
        };
        // The interpreter starts with the first Python model (plan and drive never start it).
        Python::initialize();
        Python::attach(|py| {
            let model = py
                .import(GLUE)
                .and_then(|glue| {
                    glue.call_method1(
                        "build",
                        (
                            entry_point,
                            &shared.manifest.digest,
                            store.to_string_lossy(),
                            device,
                        ),
                    )
                })
                .map_err(|e| python_error(py, e))
                .with_context(|| format!("building model {:?} with {entry_point}", source.name))?;
            Ok(Box::new(PythonModel {
                glue: py.import(GLUE).map_err(|e| python_error(py, e))?.unbind(),
                model: model.unbind(),
            }) as Box<dyn Forward>)
        })
    }
}

struct PythonModel {
    /// `kube_zerocopy.embedded`.
    glue: Py<PyModule>,
    /// `kube_zerocopy.embedded.Model`.
    model: Py<PyAny>,
}

impl Forward for PythonModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Python::attach(|py| {
            let batch = to_capsule(py, x)?;
            let answer = self
                .glue
                .bind(py)
                .call_method1("forward", (self.model.bind(py), batch))
                .map_err(|e| python_error(py, e))?;
            from_capsule(py, &answer)
        })
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Python::attach(|py| {
            let named: Vec<(String, Bound<PyAny>)> = self
                .glue
                .bind(py)
                .call_method1("tensors", (self.model.bind(py),))
                .and_then(|list| list.extract())
                .map_err(|e| python_error(py, e))?;
            named
                .into_iter()
                .map(|(name, capsule)| Ok((name, from_capsule(py, &capsule)?)))
                .collect()
        })
    }
}

/// A Python exception as one line (`TypeError: ...`), its traceback in the log.
fn python_error(py: Python<'_>, error: PyErr) -> anyhow::Error {
    if let Some(traceback) = error.traceback(py).and_then(|t| t.format().ok()) {
        tracing::warn!(traceback = %traceback, "the model's Python code raised {error}");
    }
    anyhow!("{error}")
}

/// Runs a capsule's deleter if nobody took its tensor (the capsule's destructor).
unsafe extern "C" fn release_untaken(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls this with the capsule being destroyed; a capsule still named
    // "dltensor" holds a DLManagedTensor that nobody took, which only this can release.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr());
            dlpack::delete(managed);
        }
    }
}

/// `t` as a DLPack capsule, sharing its memory.
fn to_capsule<'py>(py: Python<'py>, t: &Tensor) -> Result<Bound<'py, PyAny>> {
    let managed = dlpack::export(t)?;
    // SAFETY: `managed` is a live DLManagedTensor that the capsule owns from here on (its
    // destructor releases it unless a consumer renames the capsule, taking it).
    let raw = unsafe { ffi::PyCapsule_New(managed, DLTENSOR.as_ptr(), Some(release_untaken)) };
    if raw.is_null() {
        // SAFETY: no capsule took it.
        unsafe { dlpack::delete(managed) };
        return Err(python_error(py, PyErr::fetch(py)));
    }
    // SAFETY: `raw` is a new reference that nobody else owns.
    Ok(unsafe { Bound::from_owned_ptr(py, raw) })
}

/// Takes the tensor out of a DLPack capsule (`torch.utils.dlpack.to_dlpack`'s), without a copy.
fn from_capsule(py: Python<'_>, capsule: &Bound<'_, PyAny>) -> Result<Tensor> {
    // SAFETY: GetPointer checks that the object is a capsule named "dltensor" (an error
    // otherwise, never a wrong cast).
    let managed: *mut c_void =
        unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr()) };
    if managed.is_null() {
        return Err(python_error(py, PyErr::fetch(py)))
            .context("the model's answer is not a DLPack tensor");
    }
    // SAFETY: the capsule holds the only owner of `managed`; if the import fails, the capsule
    // still owns it and its destructor releases it.
    let tensor = unsafe { dlpack::import(managed) }?;
    // Taken: renamed, the capsule's own destructor leaves the tensor to us.
    // SAFETY: `capsule` is a capsule (GetPointer checked it); the name is a static string.
    if unsafe { ffi::PyCapsule_SetName(capsule.as_ptr(), USED_DLTENSOR.as_ptr()) } != 0 {
        // The capsule would release what the tensor now owns: keep both rather than free twice.
        std::mem::forget(tensor);
        return Err(python_error(py, PyErr::fetch(py)));
    }
    Ok(tensor)
}
