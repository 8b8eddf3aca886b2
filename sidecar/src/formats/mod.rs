//! Reading model files into the shared-memory layout.

pub mod safetensors;
pub mod torchscript;

use anyhow::Result;

use crate::config::ModelFormat;
use crate::layout::{Staging, TensorEntry};
use crate::source::SourceFile;

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

pub fn lay_out(format: ModelFormat, source: &SourceFile, staging: &Staging) -> Result<LaidOut> {
    match format {
        ModelFormat::Safetensors => safetensors::lay_out(source, staging),
        ModelFormat::TorchScript => torchscript::lay_out(source, staging),
    }
}
