//! TorchScript archives (`torch.jit.save`): a zip with `<archive>/data.pkl`,
//! `<archive>/constants.pkl`, `<archive>/code/...` and one record per tensor storage under
//! `<archive>/data/<key>` and `<archive>/constants/<key>`.
//!
//! Each storage is copied into tensors.bin as `data/<key>` or `constants/<key>`; the rest of
//! the archive becomes skeleton.pt, from which a worker rebuilds the module with every storage
//! pointing into the shared memory (see the worker crate's TorchScript loader).
//!
//! The archive is read the way a remote source is best read: its central directory and
//! pickles first (a few small reads at the end), which say where each storage's bytes are; then
//! the whole archive once, in order, by [`read_into_hashing`]: each storage straight into its
//! place in tensors.bin, the rest (headers, pickles, code: small) into memory, hashed on the
//! way. The skeleton is written from that memory.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use anyhow::{bail, Context, Result};
use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use super::LaidOut;
use crate::layout::{plan, Staging, TensorEntry, SKELETON_FILE};
use crate::pickle::storage_refs;
use crate::source::{read_into_hashing, reader, seek_position, Source};

/// The tensor archives of a TorchScript file and their pickles.
const ARCHIVES: [&str; 2] = ["data", "constants"];

/// The most a pickle record may hold. Pickles describe the module, not its tensors: large
/// models have pickles of a few MB. A zip's declared sizes are never trusted for allocation.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The most an archive may hold besides its storages (kept in memory while it is laid out).
const MAX_SKELETON_BYTES: u64 = 256 << 20;

/// Reads of the central directory and the local headers: each is a request when the source is
/// remote, so small enough not to fetch tensor bytes along with a header.
const HEADER_READS: usize = 64 << 10;

pub fn lay_out(source: &dyn Source, staging: &Staging) -> Result<LaidOut> {
    let mut zip = ZipArchive::new(BufReader::with_capacity(HEADER_READS, reader(source)))
        .context("not a TorchScript archive (it is not a valid zip file)")?;
    let structure = read_structure(&mut zip)?;
    drop(zip);

    let (tensors, tensors_bytes) = plan(structure.storages.iter().map(|s| {
        let name = s
            .record
            .strip_prefix(&structure.prefix)
            .unwrap_or(&s.record);
        (name.to_owned(), s.dtype, vec![s.numel])
    }))?;
    let spans = structure
        .storages
        .iter()
        .zip(&tensors)
        .filter(|(_, entry)| entry.length > 0)
        .map(|(storage, entry)| (storage.start, entry))
        .collect();

    let mut out = staging.create_tensors_file(tensors_bytes)?;
    let (sha256, rest) = read_archive(source, &mut out, spans)?;

    // The digest binds only the bytes of the in-order pass: the structure that placed each
    // storage came from earlier reads, which a server (or anyone on a plain http path) may
    // have answered with other bytes. Read again from the hashed bytes, it must be the same.
    let mut zip = ZipArchive::new(Sparse::new(source.len(), &rest)).context(SERVED_TWO_ARCHIVES)?;
    if read_structure(&mut zip).context(SERVED_TWO_ARCHIVES)? != structure {
        bail!(SERVED_TWO_ARCHIVES);
    }

    // The skeleton: every record but the storages, copied as they are from the bytes in memory.
    let skeleton = staging.path().join(SKELETON_FILE);
    let mut writer = zip::ZipWriter::new(File::create(&skeleton)?);
    for name in &structure.names {
        let is_storage = ARCHIVES
            .iter()
            .any(|a| name.starts_with(&format!("{}{a}/", structure.prefix)));
        if !is_storage {
            writer.raw_copy_file(zip.by_name(name)?)?;
        }
    }
    writer.finish()?;
    Ok(LaidOut {
        tensors,
        tensors_bytes,
        skeleton: Some(SKELETON_FILE.to_owned()),
        source_sha256: Some(sha256),
    })
}

const SERVED_TWO_ARCHIVES: &str = "the source's central directory, local headers or pickles \
    differ between the reads that placed the storages and the bytes that were hashed (the \
    server answered two reads of the same bytes differently); nothing was published";

/// What the layout takes from an archive's structure.
#[derive(Debug, PartialEq)]
struct Structure {
    /// Every record's name, in the central directory's order.
    names: Vec<String>,
    /// The archive's folder (`<archive>/`).
    prefix: String,
    storages: Vec<Storage>,
}

/// A tensor storage's record: what its pickle declares and where its bytes lie.
#[derive(Debug, PartialEq)]
struct Storage {
    /// `<archive>/data/<key>` or `<archive>/constants/<key>`.
    record: String,
    dtype: crate::layout::DType,
    numel: u64,
    /// The offset of its first byte in the archive.
    start: u64,
}

/// Reads the records, the pickles and each storage's record of an archive, and checks that
/// every storage is stored whole and uncompressed.
fn read_structure<R: Read + Seek>(zip: &mut ZipArchive<R>) -> Result<Structure> {
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

    let mut storages = Vec::new();
    for archive in ARCHIVES {
        let pickle_name = format!("{prefix}{archive}.pkl");
        let pickle = read_record(zip, &pickle_name)?;
        let refs = storage_refs(&pickle).with_context(|| format!("reading {pickle_name}"))?;
        for r in refs {
            let record = format!("{prefix}{archive}/{}", r.key);
            let f = match zip.by_name(&record) {
                Ok(f) => f,
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
            if f.size() != needed {
                bail!(
                    "record {record} holds {} bytes, its storage declares {needed}",
                    f.size()
                );
            }
            // Stored, not compressed, so that its bytes are its tensor's.
            if f.compression() != CompressionMethod::Stored {
                bail!(
                    "record {record} is compressed ({}); TorchScript stores its storages uncompressed",
                    f.compression()
                );
            }
            let start = f
                .data_start()
                .with_context(|| format!("record {record} has no data offset"))?;
            storages.push(Storage {
                record,
                dtype: r.dtype,
                numel: r.numel,
                start,
            });
        }
    }
    Ok(Structure {
        names,
        prefix,
        storages,
    })
}

/// The bytes of an archive besides its storages: each run with its offset, in order.
type Kept = Vec<(u64, Vec<u8>)>;

/// Reads the whole archive once, in order: each storage span (its offset, its tensor) into
/// the tensor's place in `out`, every other byte into memory. Returns the archive's sha256 and
/// the bytes between the spans, each with its offset.
fn read_archive(
    source: &dyn Source,
    out: &mut crate::layout::TensorsFile,
    mut spans: Vec<(u64, &TensorEntry)>,
) -> Result<(String, Kept)> {
    spans.sort_by_key(|(start, _)| *start);
    let len = source.len();
    let mut rest = Vec::new();
    let mut at = 0u64;
    for (start, entry) in &spans {
        let end = start.checked_add(entry.length).filter(|&end| end <= len);
        if *start < at || end.is_none() {
            bail!(
                "the bytes of storage {:?} overlap another's or lie past the archive's end",
                entry.name
            );
        }
        rest.push((at, *start - at));
        at = start + entry.length;
    }
    rest.push((at, len - at));
    let kept: u64 = rest.iter().map(|(_, n)| n).sum();
    if kept > MAX_SKELETON_BYTES {
        bail!(
            "the archive holds {kept} bytes besides its storages, more than {MAX_SKELETON_BYTES}; \
             a module's code and pickles are far smaller"
        );
    }
    let mut rest: Kept = rest
        .into_iter()
        .map(|(offset, n)| (offset, vec![0u8; n as usize]))
        .collect();
    let entries: Vec<&TensorEntry> = spans.iter().map(|(_, entry)| *entry).collect();
    let regions = out.regions(&entries)?;
    // In file order: a gap, a storage, a gap, ..., the last gap (the central directory).
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::with_capacity(2 * spans.len() + 1);
    let mut storages = spans.iter().map(|(start, _)| *start).zip(regions);
    for (offset, bytes) in rest.iter_mut() {
        pieces.push((*offset, bytes.as_mut_slice()));
        if let Some(storage) = storages.next() {
            pieces.push(storage);
        }
    }
    let sha256 = read_into_hashing(source, &[], pieces)?;
    Ok((sha256, rest))
}

/// The archive as read, without its storages: the bytes kept in memory at their offsets,
/// zeros where a storage's bytes were (no record the skeleton copies lies there).
struct Sparse<'a> {
    len: u64,
    pieces: &'a [(u64, Vec<u8>)],
    pos: u64,
}

impl<'a> Sparse<'a> {
    fn new(len: u64, pieces: &'a [(u64, Vec<u8>)]) -> Self {
        Sparse {
            len,
            pieces,
            pos: 0,
        }
    }
}

impl Read for Sparse<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        // The last piece that starts at or before the position.
        let i = self
            .pieces
            .partition_point(|(offset, _)| *offset <= self.pos);
        let (offset, bytes) = &self.pieces[i.saturating_sub(1)];
        let within = self.pos - offset;
        let n = if within < bytes.len() as u64 {
            let from = &bytes[within as usize..];
            let n = from.len().min(buf.len());
            buf[..n].copy_from_slice(&from[..n]);
            n
        } else {
            // Inside a storage: zeros up to the next piece.
            let next = self.pieces.get(i).map_or(self.len, |(offset, _)| *offset);
            let n = ((next - self.pos) as usize).min(buf.len());
            buf[..n].fill(0);
            n
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Sparse<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// A pickle record, read whole up to [`MAX_PICKLE_BYTES`] whatever its header declares.
fn read_record<R: Read + Seek>(zip: &mut ZipArchive<R>, name: &str) -> Result<Vec<u8>> {
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
    fn the_archive_is_hashed_whole_and_the_skeleton_holds_every_other_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        archive(
            &path,
            &data_pkl("FloatStorage", 4),
            &(0..16).collect::<Vec<u8>>(),
        );
        let store = tempfile::tempdir().unwrap();
        let staging = crate::layout::Store::new(store.path()).begin("d").unwrap();
        let source = SourceFile::open(&path, "file://archive.pt").unwrap();
        let laid = lay_out(&source, &staging).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(laid.source_sha256, Some(crate::source::sha256_hex(&bytes)));
        let mut skeleton =
            ZipArchive::new(File::open(staging.path().join(SKELETON_FILE)).unwrap()).unwrap();
        let mut names: Vec<String> = skeleton
            .file_names()
            .map(|n| n.unwrap().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["m/code/__torch__.py", "m/constants.pkl", "m/data.pkl"]
        );
        let mut code = String::new();
        skeleton
            .by_name("m/code/__torch__.py")
            .unwrap()
            .read_to_string(&mut code)
            .unwrap();
        assert_eq!(code, "class M: pass\n");
    }

    #[test]
    fn a_compressed_storage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let deflated = stored.compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes, options) in [
            ("m/data.pkl", data_pkl("FloatStorage", 4), stored),
            ("m/constants.pkl", vec![0x80, 2, b')', b'.'], stored),
            ("m/code/__torch__.py", b"class M: pass\n".to_vec(), stored),
            ("m/data/0", vec![0u8; 16], deflated),
        ] {
            zip.start_file(name, options).unwrap();
            zip.write_all(&bytes).unwrap();
        }
        zip.finish().unwrap();
        let err = lay_out_archive(&path).0.unwrap_err();
        assert!(
            err.to_string().contains("record m/data/0 is compressed"),
            "{err:#}"
        );
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
