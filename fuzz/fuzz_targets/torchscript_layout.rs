#![no_main]
// A TorchScript archive (zip, pickles, storage records) from arbitrary bytes, laid out.
include!("layout_common.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| lay_out(ModelFormat::TorchScript, data));
