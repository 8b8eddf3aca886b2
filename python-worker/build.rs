//! Finds libpython and libtorch at run time where they were found at build time (rpath): the
//! Python runtime image keeps both where its Python installed them.

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let python = pyo3_build_config::get();
    if let Some(dir) = &python.lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    // The worker's build script found libtorch (DEP_<links>_TORCH_LIB).
    if let Ok(dir) = std::env::var("DEP_KZC_SHIM_TORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
