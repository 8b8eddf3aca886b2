#![no_main]
// The storage references of an arbitrary pickle (data.pkl, constants.pkl).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kube_zerocopy_fetch::pickle::storage_refs(data);
});
