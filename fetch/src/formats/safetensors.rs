//! safetensors: an 8-byte header length, a JSON header naming each tensor's dtype, shape and
//! byte range, then the tensors' bytes. The `safetensors` crate parses and validates the header
//! (offsets contiguous, lengths matching shapes); the tensors are read straight from the source
//! into the store, in file order, hashing every byte on the way.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::Metadata;
use safetensors::Dtype;

use super::LaidOut;
use crate::layout::{plan, DType, Staging, TensorEntry};
use crate::source::{read_into_hashing, Source};

/// The `safetensors` crate's own bound on the JSON header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

fn dtype(d: Dtype) -> Result<DType> {
    Ok(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        other => bail!("dtype {other:?} is not supported"),
    })
}

fn invalid(why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("not a valid safetensors file: {why}")
}

pub fn lay_out(source: &dyn Source, staging: &Staging) -> Result<LaidOut> {
    let len = source.len();
    if len < 8 {
        return Err(invalid(format_args!(
            "{len} bytes, less than its 8-byte header length"
        )));
    }
    let mut header_len = [0u8; 8];
    source.read_exact_at(&mut header_len, 0)?;
    let header_len = u64::from_le_bytes(header_len);
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format_args!(
            "its header claims {header_len} bytes, more than {MAX_HEADER_BYTES}"
        )));
    }
    let data_start = 8 + header_len;
    if data_start > len {
        return Err(invalid(format_args!(
            "its {header_len}-byte header runs past the end of the {len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    source.read_exact_at(&mut header, 8)?;
    let metadata: Metadata = serde_json::from_slice(&header).map_err(invalid)?;

    // In file order (the header validated them contiguous from 0); the store's order is by name.
    let mut by_position: Vec<(String, &safetensors::tensor::TensorInfo)> =
        metadata.tensors().into_iter().collect();
    by_position.sort_by_key(|(_, info)| info.data_offsets);
    let data_len = by_position
        .last()
        .map_or(0, |(_, info)| info.data_offsets.1 as u64);
    if data_start + data_len != len {
        return Err(invalid(format_args!(
            "its header describes {data_len} bytes of tensors, the file holds {}",
            len - data_start
        )));
    }
    let mut by_name: Vec<_> = by_position
        .iter()
        .map(|(name, info)| (name, *info))
        .collect();
    by_name.sort_by(|a, b| a.0.cmp(b.0));
    let mut wanted = Vec::with_capacity(by_name.len());
    for (name, info) in &by_name {
        let dtype = dtype(info.dtype).with_context(|| format!("tensor {name:?}"))?;
        wanted.push((
            (*name).clone(),
            dtype,
            info.shape.iter().map(|&d| d as u64).collect(),
        ));
    }
    let (tensors, tensors_bytes) = plan(wanted)?;

    let mut out = staging.create_tensors_file(tensors_bytes)?;
    let planned: HashMap<&str, &TensorEntry> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let in_file_order: Vec<&TensorEntry> = by_position
        .iter()
        .map(|(name, _)| planned[name.as_str()])
        .collect();
    let regions = out.regions(&in_file_order)?;
    let from: Vec<(u64, &mut [u8])> = by_position
        .iter()
        .zip(regions)
        .map(|((_, info), region)| (data_start + info.data_offsets.0 as u64, region))
        .collect();
    let mut prefix = header_len.to_le_bytes().to_vec();
    prefix.extend_from_slice(&header);
    let sha256 = read_into_hashing(source, &prefix, from)?;
    Ok(LaidOut {
        tensors,
        tensors_bytes,
        skeleton: None,
        source_sha256: Some(sha256),
    })
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::*;
    use crate::source::{sha256_hex, SourceFile};

    /// Two tensors, `b` first in the file: [4] f32 (1..=4) and `a`: [2] i64 (-1, 7).
    fn two_tensors(path: &Path) -> Vec<u8> {
        let header = r#"{"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"a":{"dtype":"I64","shape":[2],"data_offsets":[16,32]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        for x in [1f32, 2., 3., 4.] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        for x in [-1i64, 7] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    fn lay_out_with(source: &SourceFile) -> (Result<LaidOut>, Vec<u8>) {
        crate::formats::lay_out_in_fresh_store(crate::config::ModelFormat::Safetensors, source)
    }

    #[test]
    fn tensors_are_laid_out_by_name_and_the_whole_file_is_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let bytes = two_tensors(&path);
        let source = SourceFile::open(&path, "file://m").unwrap();
        let (laid, tensors) = lay_out_with(&source);
        let laid = laid.unwrap();
        let names: Vec<_> = laid
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.offset))
            .collect();
        assert_eq!(names, [("a", 0), ("b", 64)]);
        let data = &bytes[bytes.len() - 32..];
        assert_eq!(&tensors[..16], &data[16..]);
        assert_eq!(&tensors[64..80], &data[..16]);
        assert_eq!(laid.source_sha256, Some(sha256_hex(&bytes)));
    }

    /// With the source mapped, this read died of SIGBUS.
    #[test]
    fn a_source_truncated_after_it_was_hashed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let bytes = two_tensors(&path);
        let source = SourceFile::open(&path, "file://m").unwrap();
        source.sha256().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(bytes.len() as u64 - 20)
            .unwrap();
        let err = lay_out_with(&source).0.unwrap_err();
        assert!(err.to_string().contains("shrank below"), "{err:#}");
        assert!(source.check_unchanged().is_err());
    }

    /// Overwritten in place within one clock tick, the file keeps its size and may keep its
    /// times: the second hash still tells.
    #[test]
    fn a_source_rewritten_after_it_was_hashed_hashes_differently() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let bytes = two_tensors(&path);
        let source = SourceFile::open(&path, "file://m").unwrap();
        let hashed = source.sha256().unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 4], bytes.len() as u64 - 4)
            .unwrap();
        let laid = lay_out_with(&source).0.unwrap();
        assert_ne!(laid.source_sha256, Some(hashed));
    }

    #[test]
    fn a_header_longer_than_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut bytes = two_tensors(&path);
        bytes[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let source = SourceFile::open(&path, "file://m").unwrap();
        let err = lay_out_with(&source).0.unwrap_err();
        assert!(err.to_string().contains("runs past the end"), "{err:#}");
    }
}
