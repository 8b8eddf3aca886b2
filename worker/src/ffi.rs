//! The C ABI of shim/zerocopy.cpp.

use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::{anyhow, Result};
use tch::Tensor;

/// libtorch's `at::Tensor*`, the same pointer that tch wraps.
pub type RawTensor = *mut torch_sys::C_tensor;

pub type ReleaseFn = unsafe extern "C" fn(*mut c_void);

#[repr(C)]
pub struct Storage {
    pub key: *const c_char,
    pub data: *mut c_void,
    pub nbytes: usize,
    pub ctx: *mut c_void,
}

pub enum JitModule {}

pub type NamedTensorFn = unsafe extern "C" fn(*mut c_void, *const c_char, c_int, RawTensor);

extern "C" {
    pub fn kzc_free(p: *mut c_char);
    /// A `DLManagedTensor*` that holds a reference to the tensor's storage.
    pub fn kzc_to_dlpack(t: RawTensor, error: *mut *mut c_char) -> *mut c_void;
    /// Calls a `DLManagedTensor*`'s deleter.
    pub fn kzc_dlpack_delete(managed: *mut c_void);
    /// Takes ownership of a `DLManagedTensor*`.
    pub fn kzc_from_dlpack(managed: *mut c_void, error: *mut *mut c_char) -> RawTensor;
    pub fn kzc_tensor_from_memory(
        data: *mut c_void,
        sizes: *const i64,
        ndim: c_int,
        scalar_type: c_int,
        ctx: *mut c_void,
        release: ReleaseFn,
        error: *mut *mut c_char,
    ) -> RawTensor;
    pub fn kzc_jit_load(
        skeleton_path: *const c_char,
        data: *const Storage,
        n_data: usize,
        constants: *const Storage,
        n_constants: usize,
        release: ReleaseFn,
        error: *mut *mut c_char,
    ) -> *mut JitModule;
    pub fn kzc_jit_free(m: *mut JitModule);
    pub fn kzc_jit_forward(
        m: *mut JitModule,
        inputs: *const RawTensor,
        n: c_int,
        error: *mut *mut c_char,
    ) -> RawTensor;
    pub fn kzc_jit_named_tensors(
        m: *mut JitModule,
        user: *mut c_void,
        f: NamedTensorFn,
        error: *mut *mut c_char,
    ) -> c_int;
    pub fn kzc_jit_to(
        m: *mut JitModule,
        device_type: c_int,
        device_index: c_int,
        error: *mut *mut c_char,
    ) -> c_int;
}

/// Runs a shim call and turns its error string into an `anyhow::Error`.
pub fn call<T>(f: impl FnOnce(*mut *mut c_char) -> T) -> Result<T> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let out = f(&mut error);
    if error.is_null() {
        return Ok(out);
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed with kzc_free.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { kzc_free(error) };
    Err(anyhow!("libtorch: {}", one_line(&message)))
}

/// libtorch's message on one line (the log's error line and the termination message): its
/// first line and, when an error was raised inside a TorchScript module, the exception it
/// raised (the last line naming an error), which says what failed (a shape or dtype mismatch),
/// not only that something did. Backtraces and the TorchScript traceback are left out.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let first = lines.first().copied().unwrap_or_default();
    let raised = lines.iter().rev().find(|l| {
        l.split_once(": ")
            .is_some_and(|(kind, _)| kind.ends_with("Error") && !kind.contains(' '))
    });
    match raised {
        Some(raised) if *raised != first => format!("{first} {raised}"),
        _ => first.to_owned(),
    }
}

/// Takes ownership of a tensor the shim allocated.
///
/// # Safety
/// `raw` must be a non-null `at::Tensor*` from `new`, owned by nobody else.
pub unsafe fn tensor(raw: RawTensor) -> Tensor {
    Tensor::from_ptr(raw)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn an_error_inside_a_torchscript_module_says_what_failed() {
        let interpreter = "The following operation failed in the TorchScript interpreter.\n\
            Traceback of TorchScript, serialized code (most recent call last):\n  \
            File \"code/__torch__.py\", line 9, in forward\n    \
            return torch.linear(x, weight, bias)\n\
            RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x32 and 64x4)\n";
        assert_eq!(
            one_line(interpreter),
            "The following operation failed in the TorchScript interpreter. RuntimeError: mat1 \
             and mat2 shapes cannot be multiplied (2x32 and 64x4)"
        );
        let plain =
            "expected scalar type Float but found Half\nException raised from foo at bar.cpp:1";
        assert_eq!(one_line(plain), "expected scalar type Float but found Half");
    }
}
