//! What a model folder holds: the dtypes, the tensors' entries, the manifest that lists them,
//! and the plan that places them at aligned offsets.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{ALIGNMENT, LAYOUT_VERSION, TENSORS_FILE};
use kube_zerocopy_contract::models::ModelFormat;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Byte offset in tensors.bin, a multiple of [`ALIGNMENT`].
    pub offset: u64,
    /// Byte length: the product of `shape` times the dtype's size.
    pub length: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub layout_version: u32,
    /// sha256 of the source file: the folder's name.
    pub digest: String,
    pub format: ModelFormat,
    pub source_bytes: u64,
    pub tensors_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    /// TorchScript: the archive's code and pickles, without tensor records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skeleton: Option<String>,
}

impl Manifest {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Checks what a reader relies on: aligned, in bounds, consistent lengths, no overlap.
    pub fn validate(&self, tensors_file_len: u64) -> Result<()> {
        if self.layout_version != LAYOUT_VERSION {
            bail!(
                "layout version {} is not the supported {LAYOUT_VERSION}",
                self.layout_version
            );
        }
        if tensors_file_len != self.tensors_bytes {
            bail!(
                "{TENSORS_FILE} holds {tensors_file_len} bytes, the manifest says {}",
                self.tensors_bytes
            );
        }
        let mut names = std::collections::HashSet::new();
        if let Some(t) = self.tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            bail!("tensor {:?} is listed twice", t.name);
        }
        let mut by_offset: Vec<&TensorEntry> = self.tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        let mut end_of_previous = 0u64;
        for t in by_offset {
            if t.offset % ALIGNMENT != 0 {
                bail!(
                    "tensor {:?} starts at unaligned offset {}",
                    t.name,
                    t.offset
                );
            }
            let expected = t
                .shape
                .iter()
                .try_fold(t.dtype.size(), |n, &d| n.checked_mul(d));
            if expected != Some(t.length) {
                bail!(
                    "tensor {:?}: length {} does not match its shape and dtype",
                    t.name,
                    t.length
                );
            }
            if t.offset < end_of_previous {
                bail!("tensor {:?} overlaps the tensor before it", t.name);
            }
            end_of_previous = t.offset.checked_add(t.length).context("offset overflow")?;
            if end_of_previous > self.tensors_bytes {
                bail!("tensor {:?} runs past the end of {TENSORS_FILE}", t.name);
            }
        }
        Ok(())
    }
}

/// Assigns aligned offsets, in the given order. Returns the entries and the total size, or an
/// error when a size does not fit in 64 bits (shapes come from untrusted files).
pub fn plan(
    tensors: impl IntoIterator<Item = (String, DType, Vec<u64>)>,
) -> Result<(Vec<TensorEntry>, u64)> {
    let mut offset = 0u64;
    let mut entries = Vec::new();
    for (name, dtype, shape) in tensors {
        let length = shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
            .with_context(|| format!("tensor {name:?}: its shape {shape:?} overflows 64 bits"))?;
        let end = offset
            .checked_add(length)
            .and_then(|end| end.checked_next_multiple_of(ALIGNMENT))
            .with_context(|| {
                format!("tensor {name:?}: the tensors' total size overflows 64 bits")
            })?;
        entries.push(TensorEntry {
            name,
            dtype,
            shape,
            offset,
            length,
        });
        offset = end;
    }
    Ok((entries, offset))
}
