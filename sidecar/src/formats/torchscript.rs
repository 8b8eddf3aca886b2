//! TorchScript archives (`torch.jit.save`): a zip with `<archive>/data.pkl`,
//! `<archive>/constants.pkl`, `<archive>/code/...` and one record per tensor storage under
//! `<archive>/data/<key>` and `<archive>/constants/<key>`.
//!
//! Each storage is copied into tensors.bin as `data/<key>` or `constants/<key>`; the rest of
//! the archive becomes skeleton.pt, from which a worker rebuilds the module with every storage
//! pointing into the shared memory (see the worker crate's TorchScript loader).

use std::fs::File;
use std::io::{BufReader, Read};

use anyhow::{bail, Context, Result};
use zip::result::ZipError;
use zip::ZipArchive;

use super::LaidOut;
use crate::layout::{plan, Staging, SKELETON_FILE};
use crate::pickle::storage_refs;
use crate::source::{reader, Source, SourceReader};

/// The tensor archives of a TorchScript file and their pickles.
const ARCHIVES: [&str; 2] = ["data", "constants"];

/// The most a pickle record may hold. Pickles describe the module, not its tensors: large
/// models have pickles of a few MB. A zip's declared sizes are never trusted for allocation.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

type Archive<'a> = ZipArchive<BufReader<SourceReader<'a>>>;

pub fn lay_out(source: &dyn Source, staging: &Staging) -> Result<LaidOut> {
    let mut zip = ZipArchive::new(BufReader::new(reader(source)))
        .context("not a TorchScript archive (it is not a valid zip file)")?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|s| s.into_owned()))
        .collect::<Result<_, _>>()
        .context("TorchScript archive has an unreadable record name")?;
    let prefix = names
        .iter()
        .find_map(|n| {
            n.strip_suffix("data.pkl")
                .filter(|p| p.ends_with('/') && p.matches('/').count() == 1)
        })
        .map(str::to_owned)
        .context("TorchScript archive is missing its record data.pkl")?;
    if !names
        .iter()
        .any(|n| n.starts_with(&format!("{prefix}code/")))
    {
        bail!("TorchScript archive is missing its code/ records");
    }

    let mut wanted = Vec::new();
    let mut records = Vec::new();
    for archive in ARCHIVES {
        let pickle_name = format!("{prefix}{archive}.pkl");
        let pickle = read_record(&mut zip, &pickle_name)?;
        let refs = storage_refs(&pickle).with_context(|| format!("reading {pickle_name}"))?;
        for r in refs {
            let record = format!("{prefix}{archive}/{}", r.key);
            let size = match zip.by_name(&record) {
                Ok(f) => f.size(),
                Err(ZipError::FileNotFound) => bail!(
                    "TorchScript archive is missing record {record} (storage {:?} of {archive}.pkl)",
                    r.key
                ),
                Err(e) => return Err(e).with_context(|| format!("reading record {record}")),
            };
            // libtorch writes each storage whole: its record is exactly numel elements long.
            let needed = r.numel.checked_mul(r.dtype.size()).with_context(|| {
                format!(
                    "storage {:?} of {archive}.pkl: {} elements overflow 64 bits",
                    r.key, r.numel
                )
            })?;
            if size != needed {
                bail!("record {record} holds {size} bytes, its storage declares {needed}");
            }
            wanted.push((format!("{archive}/{}", r.key), r.dtype, vec![r.numel]));
            records.push(record);
        }
    }

    let (tensors, tensors_bytes) = plan(wanted)?;
    let mut out = staging.create_tensors_file(tensors_bytes)?;
    for (entry, record) in tensors.iter().zip(&records) {
        let mut f = zip.by_name(record)?;
        f.read_exact(out.region(entry)?)
            .with_context(|| format!("reading record {record}"))?;
        // Reading to the end makes the zip reader check the record's CRC (a record that
        // changed since it was hashed fails here); the size matched, so nothing is left.
        if f.read(&mut [0u8; 1])
            .with_context(|| format!("reading record {record}"))?
            != 0
        {
            bail!("record {record} holds more bytes than its header declares");
        }
    }

    let skeleton = staging.path().join(SKELETON_FILE);
    let mut writer = zip::ZipWriter::new(File::create(&skeleton)?);
    for name in &names {
        let is_storage = ARCHIVES
            .iter()
            .any(|a| name.starts_with(&format!("{prefix}{a}/")));
        if !is_storage {
            writer.raw_copy_file(zip.by_name(name)?)?;
        }
    }
    writer.finish()?;
    Ok(LaidOut {
        tensors,
        tensors_bytes,
        skeleton: Some(SKELETON_FILE.to_owned()),
        // Read out of order: the records' CRCs and the source's unchanged size and times vouch
        // for the bytes instead.
        source_sha256: None,
    })
}

/// A pickle record, read whole up to [`MAX_PICKLE_BYTES`] whatever its header declares.
fn read_record(zip: &mut Archive<'_>, name: &str) -> Result<Vec<u8>> {
    let f = match zip.by_name(name) {
        Ok(f) => f,
        Err(ZipError::FileNotFound) => bail!("TorchScript archive is missing record {name}"),
        Err(e) => return Err(e).with_context(|| format!("reading record {name}")),
    };
    let mut bytes = Vec::new();
    f.take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading record {name}"))?;
    if bytes.len() as u64 > MAX_PICKLE_BYTES {
        bail!("record {name} holds more than {MAX_PICKLE_BYTES} bytes; a module's pickle is far smaller");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::*;
    use crate::source::SourceFile;

    /// A data.pkl whose only persistent id is `("storage", torch.<storage>, "0", "cpu", numel)`.
    fn data_pkl(storage: &str, numel: u64) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'(', 0x8c, 7];
        p.extend_from_slice(b"storage");
        p.extend_from_slice(format!("ctorch\n{storage}\n").as_bytes());
        p.extend_from_slice(&[0x8c, 1, b'0', 0x8c, 3]);
        p.extend_from_slice(b"cpu");
        p.extend_from_slice(&[0x8a, 8]);
        p.extend_from_slice(&numel.to_le_bytes());
        p.extend_from_slice(b"tQ.");
        p
    }

    /// A TorchScript-shaped archive: the pickles, one code record and storage `data/0`.
    fn archive(path: &Path, data_pkl: &[u8], storage: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let records: [(&str, &[u8]); 4] = [
            ("m/data.pkl", data_pkl),
            ("m/constants.pkl", &[0x80, 2, b')', b'.']),
            ("m/code/__torch__.py", b"class M: pass\n"),
            ("m/data/0", storage),
        ];
        for (name, bytes) in records {
            zip.start_file(name, stored).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// Lays out the archive at `path` into a fresh store; returns the result and tensors.bin.
    fn lay_out_archive(path: &Path) -> (Result<LaidOut>, Vec<u8>) {
        let source = SourceFile::open(path, "file://archive.pt").unwrap();
        crate::formats::lay_out_in_fresh_store(crate::config::ModelFormat::TorchScript, &source)
    }

    #[test]
    fn each_storage_is_copied_into_the_tensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let storage: Vec<u8> = (0..16).collect();
        archive(&path, &data_pkl("FloatStorage", 4), &storage);
        let (laid, tensors) = lay_out_archive(&path);
        let laid = laid.unwrap();
        assert_eq!(laid.tensors.len(), 1);
        assert_eq!(laid.tensors[0].name, "data/0");
        assert_eq!(laid.tensors[0].length, 16);
        assert_eq!(&tensors[..16], &storage[..]);
    }

    #[test]
    fn a_storage_record_of_another_size_than_declared_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        for len in [12, 20] {
            archive(&path, &data_pkl("FloatStorage", 4), &vec![0u8; len]);
            let err = lay_out_archive(&path).0.unwrap_err();
            let expected = format!("record m/data/0 holds {len} bytes, its storage declares 16");
            assert!(err.to_string().contains(&expected), "{err:#}");
        }
    }

    #[test]
    fn a_storage_whose_size_overflows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        archive(&path, &data_pkl("LongStorage", 1 << 62), &[0u8; 8]);
        let err = lay_out_archive(&path).0.unwrap_err();
        assert!(err.to_string().contains("overflow 64 bits"), "{err:#}");
    }

    #[test]
    fn a_pickle_larger_than_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let mut pickle = data_pkl("FloatStorage", 4);
        pickle.resize(MAX_PICKLE_BYTES as usize + 1, b'.');
        archive(&path, &pickle, &[0u8; 16]);
        let err = lay_out_archive(&path).0.unwrap_err();
        assert!(err.to_string().contains("holds more than"), "{err:#}");
    }
}
