//! Reading model files into the shared-memory layout.

pub mod safetensors;
pub mod torchscript;

use anyhow::Result;

use crate::config::ModelFormat;
use crate::layout::{Staging, TensorEntry};

/// What a format wrote into a staging folder.
pub struct LaidOut {
    pub tensors: Vec<TensorEntry>,
    pub tensors_bytes: u64,
    pub skeleton: Option<String>,
}

pub fn lay_out(format: ModelFormat, source: &[u8], staging: &Staging) -> Result<LaidOut> {
    match format {
        ModelFormat::Safetensors => safetensors::lay_out(source, staging),
        ModelFormat::TorchScript => torchscript::lay_out(source, staging),
    }
}
