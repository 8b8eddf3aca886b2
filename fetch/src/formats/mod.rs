//! Reading model files into the shared-memory layout.

pub mod safetensors;
pub mod torchscript;

use anyhow::Result;

use crate::config::ModelFormat;
use crate::layout::{Staging, TensorEntry};
use crate::source::Source;

/// What a format wrote into a staging folder.
#[derive(Debug)]
pub struct LaidOut {
    pub tensors: Vec<TensorEntry>,
    pub tensors_bytes: u64,
    pub skeleton: Option<String>,
    /// The sha256 of the source's bytes as the format read them, when it reads every byte in
    /// order (safetensors); it must equal the digest the source was published under.
    pub source_sha256: Option<String>,
}

pub fn lay_out(format: ModelFormat, source: &dyn Source, staging: &Staging) -> Result<LaidOut> {
    match format {
        ModelFormat::Safetensors => safetensors::lay_out(source, staging),
        ModelFormat::TorchScript => torchscript::lay_out(source, staging),
    }
}

/// Tests of the formats: lays `source` out into a fresh store; returns the result and the
/// tensors file as written (empty when none was).
#[cfg(test)]
pub(crate) fn lay_out_in_fresh_store(
    format: ModelFormat,
    source: &dyn Source,
) -> (Result<LaidOut>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let staging = crate::layout::Store::new(dir.path()).begin("d").unwrap();
    let laid = lay_out(format, source, &staging);
    let tensors =
        std::fs::read(staging.path().join(crate::layout::TENSORS_FILE)).unwrap_or_default();
    (laid, tensors)
}
