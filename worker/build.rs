//! Compiles the small C++ shim (shim/zerocopy.cpp) against the same libtorch that tch uses,
//! found the same way: the python of the project's torch environment (LIBTORCH_USE_PYTORCH).

use std::path::PathBuf;
use std::process::Command;

fn torch_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KZC_TORCH_DIR") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .expect("running python to find torch (run through the Makefile, which sets it up)");
    assert!(
        out.status.success(),
        "python cannot import torch: run `make` targets, which install it"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn main() {
    println!("cargo:rerun-if-changed=shim/zerocopy.cpp");
    println!("cargo:rerun-if-env-changed=KZC_TORCH_DIR");
    let torch = torch_dir();
    let include = torch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("shim/zerocopy.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        // Debug info of libtorch's headers made most of this compile's minute.
        .debug(false)
        .compile("kzc_shim");
    let lib = torch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // For the binaries of crates that link this one (the Python worker): DEP_KZC_SHIM_TORCH_LIB.
    println!("cargo:torch_lib={}", lib.display());
    for l in ["torch_cpu", "torch", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}
