//! Tensors handed to another framework in this process, and taken back, without a copy:
//! DLPack's `DLManagedTensor`, which libtorch makes and takes (`at::toDLPack`,
//! `at::fromDLPack`). The Python worker hands its batches to the embedded interpreter's torch
//! this way; its torch runs on the same libtorch, so a tensor is the same memory on both sides.

use std::ffi::c_void;

use anyhow::Result;
use tch::Tensor;

use crate::ffi;

/// A `DLManagedTensor*` that shares `t`'s storage and holds a reference to it until its
/// deleter runs: whoever takes it (`torch.from_dlpack`, [`import`]) must run it, or [`delete`].
pub fn export(t: &Tensor) -> Result<*mut c_void> {
    // SAFETY: `t` is a live tensor; the shim only reads it.
    ffi::call(|error| unsafe { ffi::kzc_to_dlpack(t.as_ptr() as ffi::RawTensor, error) })
}

/// The tensor a `DLManagedTensor*` describes, which owns it from now on (it runs the deleter
/// when its storage goes).
///
/// # Safety
/// `managed` must be a live `DLManagedTensor*` that nobody else owns or deletes.
pub unsafe fn import(managed: *mut c_void) -> Result<Tensor> {
    // SAFETY: the caller hands over the only owner of `managed`; the shim gives it to the tensor.
    let raw = ffi::call(|error| unsafe { ffi::kzc_from_dlpack(managed, error) })?;
    // SAFETY: the shim returned a new tensor that nobody else owns.
    Ok(unsafe { ffi::tensor(raw) })
}

/// Releases a `DLManagedTensor*` that nobody took.
///
/// # Safety
/// `managed` must be a live `DLManagedTensor*` that nobody else owns or deletes.
pub unsafe fn delete(managed: *mut c_void) {
    // SAFETY: the caller hands over the only owner of `managed`, released once here.
    unsafe { ffi::kzc_dlpack_delete(managed) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_comes_back_from_dlpack_as_the_same_memory() {
        let t = Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).reshape([3, 4]);
        let managed = export(&t).unwrap();
        // SAFETY: exported just above, taken once.
        let back = unsafe { import(managed) }.unwrap();
        assert_eq!(back.data_ptr(), t.data_ptr());
        assert_eq!(back.size(), [3, 4]);
        drop(t);
        // The storage outlives the original: the imported tensor holds it.
        assert_eq!(back.sum(tch::Kind::Float).double_value(&[]), 66.0);
        let unused = export(&back).unwrap();
        // SAFETY: exported just above, never taken.
        unsafe { delete(unused) };
    }
}
