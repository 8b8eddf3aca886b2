// Included by the two layout targets: writes the input to a file in shared memory and lays
// it out into a store there, as the sidecar does.
use std::path::PathBuf;
use std::sync::OnceLock;

use kube_zerocopy_fetch::config::ModelFormat;
use kube_zerocopy_fetch::formats;
use kube_zerocopy_fetch::source::{Source, SourceFile};
use kube_zerocopy_fetch::Store;

fn scratch() -> &'static (tempfile::TempDir, PathBuf, Store) {
    static SCRATCH: OnceLock<(tempfile::TempDir, PathBuf, Store)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::tempdir_in("/dev/shm").expect("a folder in /dev/shm");
        let file = dir.path().join("source");
        let store = Store::new(dir.path().join("store"));
        (dir, file, store)
    })
}

/// Errors are fine; a panic, an abort or a signal is what the fuzzer looks for.
pub fn lay_out(format: ModelFormat, data: &[u8]) {
    let (_, file, store) = scratch();
    std::fs::write(file, data).expect("writing the source");
    let source = SourceFile::open(file, "file://fuzz").expect("opening the source");
    let staging = store.begin("fuzz").expect("a staging folder");
    if let Ok(laid) = formats::lay_out(format, &source, &staging) {
        // What a format accepts, the worker's check must accept too.
        let manifest = kube_zerocopy_fetch::Manifest {
            layout_version: kube_zerocopy_fetch::layout::LAYOUT_VERSION,
            digest: "fuzz".into(),
            format,
            source_bytes: source.len(),
            tensors_bytes: laid.tensors_bytes,
            tensors: laid.tensors,
            skeleton: laid.skeleton,
        };
        manifest
            .validate(manifest.tensors_bytes)
            .expect("a laid-out model passes the manifest check");
    }
}
