//! Fetching a model's source file, hashing it on the way.
//!
//! A source is opened once and read through that one descriptor with positioned reads: the
//! sha256 and the layout come from the same file even if its path is replaced meanwhile, and a
//! file truncated while it is read gives an error (a memory mapping would die of SIGBUS).
//! [`SourceFile::check_unchanged`] tells when the file was written to meanwhile.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::{ModelFormat, ModelSource};
use crate::download;

/// What fstat says about a file that changes when someone writes to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(file: &File) -> io::Result<Self> {
        Ok(Identity::from(&file.metadata()?))
    }

    fn from(m: &std::fs::Metadata) -> Self {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A source file opened for reading, with its length when opened.
pub struct SourceFile {
    file: File,
    name: String,
    opened: Identity,
}

impl SourceFile {
    /// Opens `path`; `name` (the URI) is what errors call it.
    pub fn open(path: &Path, name: &str) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open source {name}"))?;
        let metadata = file
            .metadata()
            .with_context(|| format!("reading source {name}"))?;
        if !metadata.is_file() {
            bail!("source {name} is not a regular file");
        }
        let opened = Identity::from(&metadata);
        Ok(SourceFile {
            file,
            name: name.to_owned(),
            opened,
        })
    }

    /// The length the file had when it was opened; every read stays within it.
    pub fn len(&self) -> u64 {
        self.opened.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`; a file that ends early (truncated meanwhile) is an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len()) {
            bail!(
                "source {}: bytes {offset}..+{} lie past its end ({} bytes)",
                self.name,
                buf.len(),
                self.len()
            );
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                anyhow::anyhow!(
                    "source {} shrank below {} bytes while it was read (was it overwritten?)",
                    self.name,
                    self.len()
                )
            } else {
                anyhow::Error::new(e).context(format!("reading source {}", self.name))
            }
        })
    }

    /// A reader over the whole file with its own position (for readers that seek, like zip).
    pub fn reader(&self) -> SourceReader<'_> {
        SourceReader {
            source: self,
            pos: 0,
        }
    }

    /// Fills each region with the source's bytes from its offset and returns the sha256 of
    /// `prefix` followed by the regions' bytes, in the order given (the file's order, so that
    /// it is the file's digest). The reads, which copy into the regions, run on one thread and
    /// the hashing on another, a chunk behind: the bytes are read once and hashed where they
    /// landed.
    pub fn read_into_hashing(
        &self,
        prefix: &[u8],
        regions: Vec<(u64, &mut [u8])>,
    ) -> Result<String> {
        const CHUNK: usize = 8 << 20;
        let chunks: Vec<(u64, &mut [u8])> = regions
            .into_iter()
            .flat_map(|(offset, region)| {
                region
                    .chunks_mut(CHUNK)
                    .enumerate()
                    .map(move |(i, chunk)| (offset + (i * CHUNK) as u64, chunk))
            })
            .collect();
        // A few chunks read ahead of the hash at most.
        let (read, hash) = std::sync::mpsc::sync_channel::<&mut [u8]>(4);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> Result<()> {
                for (offset, chunk) in chunks {
                    self.read_exact_at(chunk, offset)?;
                    if read.send(chunk).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let mut hasher = Sha256::new();
            hasher.update(prefix);
            for chunk in hash {
                hasher.update(&*chunk);
            }
            reader.join().expect("the reading thread does not panic")?;
            Ok(hex::encode(hasher.finalize()))
        })
    }

    /// The sha256 of the file's bytes, read in order.
    pub fn sha256(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < self.len() {
            let n = buf.len().min((self.len() - offset) as usize);
            self.read_exact_at(&mut buf[..n], offset)?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Fails when the file was written to, truncated or grown since it was opened: whatever
    /// was read from it may then mix old and new bytes.
    pub fn check_unchanged(&self) -> Result<()> {
        let now =
            Identity::of(&self.file).with_context(|| format!("reading source {}", self.name))?;
        if now != self.opened {
            bail!(
                "source {} changed while it was loaded ({} bytes when opened, {} now, modified \
                 meanwhile); nothing was published, and the next attempt loads it again",
                self.name,
                self.opened.len,
                now.len
            );
        }
        Ok(())
    }
}

/// See [`SourceFile::reader`].
pub struct SourceReader<'a> {
    source: &'a SourceFile,
    pos: u64,
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.source.len().saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.source
            .read_exact_at(&mut buf[..n], self.pos)
            .map_err(|e| io::Error::other(format!("{e:#}")))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SourceReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.source.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before 0"))?;
        Ok(self.pos)
    }
}

/// A source ready to be laid out, with its sha256. A downloaded file is removed on drop.
pub struct Fetched {
    pub source: SourceFile,
    pub sha256: String,
    /// False when `sha256` is the model's declared digest, not yet checked against the bytes:
    /// the layout hashes them as it copies them, and must find that digest.
    pub hashed: bool,
    downloaded: Option<PathBuf>,
}

impl Fetched {
    pub fn size(&self) -> u64 {
        self.source.len()
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if let Some(path) = &self.downloaded {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fetches `model`'s source (`file://`, `http://`, `https://`). Downloads land in
/// `download_dir`, under a name of their own, and are removed when the [`Fetched`] is dropped.
pub fn fetch(
    model: &ModelSource,
    download_dir: &Path,
    on_progress: download::OnProgress,
) -> Result<Fetched> {
    let uri = model.uri.as_str();
    if let Some(path) = uri.strip_prefix("file://") {
        let source = SourceFile::open(Path::new(path), uri)?;
        // A safetensors layout hashes every byte as it copies it: with a declared digest, that
        // one pass is the check, and the file is read once.
        if let (Some(declared), ModelFormat::Safetensors) = (&model.sha256, model.format) {
            return Ok(Fetched {
                source,
                sha256: declared.to_ascii_lowercase(),
                hashed: false,
                downloaded: None,
            });
        }
        let sha256 = source.sha256()?;
        return Ok(Fetched {
            source,
            sha256,
            hashed: true,
            downloaded: None,
        });
    }
    if uri.starts_with("http://") || uri.starts_with("https://") {
        let policy = download::Policy {
            max_bytes: model.max_bytes,
            bearer_token_file: model.bearer_token_file.as_ref().map(PathBuf::from),
            ca_file: model.ca_file.as_ref().map(PathBuf::from),
            ..download::Policy::default()
        };
        return fetch_http(uri, download_dir, &policy, on_progress);
    }
    bail!("source {uri}: unsupported scheme; use file://, http:// or https://")
}

fn fetch_http(
    uri: &str,
    download_dir: &Path,
    policy: &download::Policy,
    on_progress: download::OnProgress,
) -> Result<Fetched> {
    std::fs::create_dir_all(download_dir)
        .with_context(|| format!("creating download folder {}", download_dir.display()))?;
    // A name of its own: two weight servers may share the folder.
    let (mut file, path) = tempfile::Builder::new()
        .prefix(".download-")
        .tempfile_in(download_dir)
        .with_context(|| format!("creating a file in {}", download_dir.display()))?
        .keep()
        .context("keeping the download file")?;
    let fetched = download::download(uri, &mut file, policy, on_progress).and_then(|done| {
        let source = SourceFile::open(&path, uri)?;
        if source.len() != done.bytes {
            bail!(
                "download of {uri}: wrote {} bytes, the file holds {}",
                done.bytes,
                source.len()
            );
        }
        Ok((source, done.sha256))
    });
    match fetched {
        Ok((source, sha256)) => Ok(Fetched {
            source,
            sha256,
            hashed: true,
            downloaded: Some(path),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}
