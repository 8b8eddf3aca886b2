//! Fetching a model's source file, hashing it on the way.
//!
//! A source is opened once and read through that one descriptor with positioned reads: the
//! sha256 and the layout come from the same file even if its path is replaced meanwhile, and a
//! file truncated while it is read gives an error (a memory mapping would die of SIGBUS).
//! [`SourceFile::check_unchanged`] tells when the file was written to meanwhile.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

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

/// Copies `reader` to `out` while hashing; returns (sha256, bytes).
fn hash_stream(mut reader: impl Read, out: &mut File) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Fetches `uri` (`file://`, `http://`, `https://`). Downloads land in `download_dir`.
pub fn fetch(uri: &str, download_dir: &Path) -> Result<Fetched> {
    if let Some(path) = uri.strip_prefix("file://") {
        let source = SourceFile::open(Path::new(path), uri)?;
        let sha256 = source.sha256()?;
        return Ok(Fetched {
            source,
            sha256,
            downloaded: None,
        });
    }
    if uri.starts_with("http://") || uri.starts_with("https://") {
        return download(uri, download_dir);
    }
    bail!("source {uri}: unsupported scheme; use file://, http:// or https://")
}

const ATTEMPTS: u32 = 3;

fn download(uri: &str, download_dir: &Path) -> Result<Fetched> {
    std::fs::create_dir_all(download_dir)
        .with_context(|| format!("creating download folder {}", download_dir.display()))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        let path = download_dir.join(format!(".download-{}-{attempt}", std::process::id()));
        let result = (|| -> Result<(String, u64)> {
            let response = agent.get(uri).call().map_err(|e| match e {
                ureq::Error::StatusCode(code) => {
                    anyhow::anyhow!("source {uri} answered HTTP {code}")
                }
                other => anyhow::anyhow!("source {uri} is unreachable: {other}"),
            })?;
            let mut file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let reader = response.into_body().into_reader();
            let (sha, size) =
                hash_stream(reader, &mut file).with_context(|| format!("downloading {uri}"))?;
            file.sync_all()?;
            Ok((sha, size))
        })();
        match result {
            Ok((sha256, size)) => {
                let source = match SourceFile::open(&path, uri) {
                    Ok(source) => source,
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        return Err(e);
                    }
                };
                let fetched = Fetched {
                    source,
                    sha256,
                    downloaded: Some(path),
                };
                if fetched.size() != size {
                    bail!(
                        "download of {uri}: wrote {size} bytes, the file holds {}",
                        fetched.size()
                    );
                }
                return Ok(fetched);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                // A 4xx will not change on retry.
                let permanent = e.to_string().contains("answered HTTP 4");
                tracing::warn!(attempt, error = %format!("{e:#}"), "download failed");
                last_error = Some(e);
                if permanent || attempt == ATTEMPTS {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
            }
        }
    }
    Err(last_error.expect("at least one attempt"))
}
