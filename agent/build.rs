//! The gRPC services the agent serves, from the protocol files in proto/ (protoc comes with
//! the build: nothing to install).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: a build script is single-threaded; protoc is looked up through this variable.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // The clients are for the tests, which play the kubelet.
        .build_client(true)
        .build_transport(false)
        .compile_protos(
            &[PathBuf::from("proto/csi.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
