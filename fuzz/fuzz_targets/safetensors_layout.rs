#![no_main]
// A safetensors file from arbitrary bytes, laid out into the store.
include!("layout_common.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| lay_out(ModelFormat::Safetensors, data));
