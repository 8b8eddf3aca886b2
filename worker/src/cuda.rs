//! The cuda path: weights go from the shared mapping to the GPU with one host-to-device copy
//! per process, from pinned (page-locked) memory so that the copy runs at full bus speed.
//!
//! Two details of libtorch shape this module:
//! - libtorch registers its CUDA kernels when libtorch_cuda.so is loaded, and a binary linked
//!   with `--as-needed` does not load it (nothing references it directly): load it first.
//! - A host pointer cannot become a CUDA tensor without a copy. `cudaHostRegister` pins the
//!   mapping in place (read-only flag: the mapping is read-only), so the copy is a DMA from the
//!   shared pages; it is unpinned once the weights are on the GPU.

use std::ffi::{c_int, c_uint, c_void, CStr, CString};

use anyhow::{bail, Result};

/// Loads libtorch's CUDA backend and checks that a device is there.
pub fn load_backend() -> Result<()> {
    let name = CString::new("libtorch_cuda.so").unwrap();
    // SAFETY: dlopen of a library that registers itself; the handle is kept for the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        let why = unsafe { CStr::from_ptr(libc::dlerror()) }
            .to_string_lossy()
            .into_owned();
        bail!("device cuda: cannot load libtorch's CUDA backend: {why}");
    }
    if !tch::Cuda::is_available() {
        bail!("device cuda: libtorch sees no CUDA device");
    }
    Ok(())
}

type HostRegister = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> c_int;
type HostUnregister = unsafe extern "C" fn(*mut c_void) -> c_int;

fn symbol(name: &str) -> Option<*mut c_void> {
    let name = CString::new(name).ok()?;
    // SAFETY: a lookup in the libraries already loaded (libcudart comes with libtorch_cuda).
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

const CUDA_HOST_REGISTER_READ_ONLY: c_uint = 8;

/// Page-locks `len` bytes at `ptr` for fast copies to the GPU.
///
/// # Safety
/// `ptr..ptr+len` must be one live mapping of this process, unpinned with [`unpin`] before it
/// is unmapped.
pub unsafe fn pin(ptr: *mut c_void, len: usize) -> Result<()> {
    let Some(f) = symbol("cudaHostRegister") else {
        bail!("cudaHostRegister is not loaded")
    };
    // SAFETY: the symbol has this signature in every CUDA runtime; the range is one mapping.
    let register: HostRegister = unsafe { std::mem::transmute(f) };
    let code = unsafe { register(ptr, len, CUDA_HOST_REGISTER_READ_ONLY) };
    if code != 0 {
        bail!("cudaHostRegister failed with CUDA error {code}");
    }
    Ok(())
}

/// # Safety
/// `ptr` must have been pinned with [`pin`] and still be mapped.
pub unsafe fn unpin(ptr: *mut c_void) {
    if let Some(f) = symbol("cudaHostUnregister") {
        let unregister: HostUnregister = std::mem::transmute(f);
        unregister(ptr);
    }
}
