#![no_main]
// A manifest as a worker reads it from the store, checked against a tensors.bin length; one
// it accepts must describe tensors that lie inside that length.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((len, json)) = data.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len);
    let Ok(manifest) = serde_json::from_slice::<kube_zerocopy_fetch::Manifest>(json) else {
        return;
    };
    if manifest.validate(len).is_ok() {
        for t in &manifest.tensors {
            let end = t.offset.checked_add(t.length).expect("no overflow once valid");
            assert!(end <= len, "tensor {:?} ends past the file", t.name);
        }
    }
});
