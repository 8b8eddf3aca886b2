//! A model's source bytes, read by offset: a local file ([`SourceFile`]) or a remote object
//! read by byte ranges ([`RemoteObject`]), behind one trait ([`Source`]) so that the formats
//! lay out either the same way.
//!
//! A local source is opened once and read through that one descriptor with positioned reads:
//! the sha256 and the layout come from the same file even if its path is replaced meanwhile,
//! and a file truncated while it is read gives an error (a memory mapping would die of SIGBUS).
//! [`Source::check_unchanged`] tells when the source was written to meanwhile.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::ModelSource;
use crate::download;
use crate::networks::SourceNetworks;
use crate::remote::RemoteObject;

/// Bytes of a model's source, read by offset.
pub trait Source: Sync {
    /// What errors call it (its URI).
    fn name(&self) -> &str;
    /// Its length when it was opened; every read stays within it.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; a source that ends early is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Fails when the source changed since it was opened: whatever was read from it may then
    /// mix old and new bytes.
    fn check_unchanged(&self) -> Result<()>;
    /// How many reads pay to run at once: one for a local file (the hash bounds it), several
    /// for a remote object (each waits on the network).
    fn concurrent_reads(&self) -> usize {
        1
    }
}

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
        Self::from_file(file, name)
    }

    /// Opens `path` only where it lies beneath `root`, every link in it resolved inside `root`
    /// by the kernel (openat2 with RESOLVE_BENEATH on the root's descriptor): a check of the
    /// path made earlier cannot be undone by a link swapped in before the open.
    pub fn open_beneath(root: &Path, path: &Path, name: &str) -> Result<Self> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        let outside = || {
            anyhow::anyhow!(
                "source {name} is not a file under {}, the only folder file:// sources are read from",
                root.display()
            )
        };
        let canonical = std::fs::canonicalize(root)
            .with_context(|| format!("reading the folder of file:// sources {}", root.display()))?;
        let beneath = path
            .strip_prefix(root)
            .or_else(|_| path.strip_prefix(&canonical))
            .map_err(|_| outside())?;
        let dir = File::open(&canonical)
            .with_context(|| format!("opening the folder of file:// sources {}", root.display()))?;
        let fd = openat2(
            &dir,
            beneath,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            rustix::io::Errno::XDEV => outside(),
            e => {
                anyhow::Error::new(io::Error::from(e)).context(format!("cannot open source {name}"))
            }
        })?;
        Self::from_file(File::from(fd), name)
    }

    fn from_file(file: File, name: &str) -> Result<Self> {
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
}

impl Source for SourceFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.opened.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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

    fn check_unchanged(&self) -> Result<()> {
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

/// A reader over the whole source with its own position (for readers that seek, like zip).
pub fn reader(source: &dyn Source) -> SourceReader<'_> {
    SourceReader { source, pos: 0 }
}

/// Fills each region with the source's bytes from its offset and returns the sha256 of
/// `prefix` followed by the regions' bytes, in the order given (the file's order, so that it
/// is the file's digest). The regions are read in chunks by [`Source::concurrent_reads`]
/// threads, each taking the next chunk; the calling thread hashes the chunks in order as they
/// finish. A chunk finished ahead of its turn waits where it landed: the bytes are read once,
/// never kept twice, and hashed in place.
pub fn read_into_hashing(
    source: &dyn Source,
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
    let readers = source.concurrent_reads().clamp(1, chunks.len().max(1));
    let queue = &Mutex::new(chunks.into_iter().enumerate());
    let failed = &AtomicBool::new(false);
    // A few chunks read ahead of the hash at most per reader.
    let (read, hash) = std::sync::mpsc::sync_channel::<(usize, &mut [u8])>(2 * readers);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..readers)
            .map(|_| {
                let read = read.clone();
                scope.spawn(move || -> Result<()> {
                    while !failed.load(Ordering::Relaxed) {
                        let Some((i, (offset, chunk))) = queue.lock().unwrap().next() else {
                            break;
                        };
                        if let Err(e) = source.read_exact_at(chunk, offset) {
                            // The other readers stop at their next chunk.
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        if read.send((i, chunk)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop(read);
        let mut hasher = Sha256::new();
        hasher.update(prefix);
        let mut next = 0;
        let mut ahead = BTreeMap::new();
        for (i, chunk) in hash {
            ahead.insert(i, chunk);
            while let Some(chunk) = ahead.remove(&next) {
                hasher.update(&*chunk);
                next += 1;
            }
        }
        let mut outcome = Ok(());
        for reader in readers {
            let done = reader.join().expect("a reading thread does not panic");
            if outcome.is_ok() {
                outcome = done;
            }
        }
        outcome.map(|()| hex::encode(hasher.finalize()))
    })
}

/// See [`reader`].
pub struct SourceReader<'a> {
    source: &'a dyn Source,
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
        self.pos = seek_position(self.pos, self.source.len(), to)?;
        Ok(self.pos)
    }
}

/// Where a seek `to` from `pos` in `len` bytes leads (past the end is allowed, as for files).
pub(crate) fn seek_position(pos: u64, len: u64, to: SeekFrom) -> io::Result<u64> {
    let pos = match to {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::End(d) => len.checked_add_signed(d),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
    };
    pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before 0"))
}

/// What a fetch may reach, and how slow it may be. The node agent's are limited: it fetches
/// on any pod's say-so, and a fetch holds its model's lock.
#[derive(Clone, Debug, Default)]
pub struct SourceLimits {
    /// The only folder `file://` sources are read from, opened beneath it; `None`: any file
    /// the process may read.
    pub file_root: Option<PathBuf>,
    /// The internal networks remote sources may be fetched from besides public addresses;
    /// `None`: any address.
    pub networks: Option<Arc<SourceNetworks>>,
    /// A transfer slower than this many bytes a second over a minute is broken off.
    pub min_bytes_per_second: Option<u64>,
    /// The most bytes a source may have, whatever its model declares.
    pub max_source_bytes: Option<u64>,
    /// Downloads to disk at once at most: the download folder then holds at most so many
    /// sources of at most `max_source_bytes`.
    pub downloads: Option<Arc<DownloadSlots>>,
}

/// A count of downloads that may run at once; a download waits for a free one.
#[derive(Debug)]
pub struct DownloadSlots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl DownloadSlots {
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(DownloadSlots {
            free: Mutex::new(count.max(1)),
            freed: std::sync::Condvar::new(),
        })
    }

    /// Waits for a free slot and takes it until the returned guard is dropped.
    fn take(self: &Arc<Self>) -> DownloadSlot {
        let mut free = self.free.lock().unwrap();
        while *free == 0 {
            free = self.freed.wait(free).unwrap();
        }
        *free -= 1;
        DownloadSlot(self.clone())
    }
}

/// A taken [`DownloadSlots`] slot, given back when dropped.
#[derive(Debug)]
struct DownloadSlot(Arc<DownloadSlots>);

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.freed.notify_one();
    }
}

/// A source ready to be laid out. A downloaded file is removed on drop.
pub struct Fetched<'a> {
    pub source: Box<dyn Source + 'a>,
    /// The source's sha256 when known before the layout: hashed already (`hashed`), or the
    /// model's declared digest, which the layout's own hash of the bytes must then equal.
    /// `None` for a source streamed without a declared digest: the layout computes it.
    pub sha256: Option<String>,
    pub hashed: bool,
    /// True when the bytes arrive as the layout reads them (a remote object read by ranges):
    /// the fetch ends with the layout.
    pub streamed: bool,
    downloaded: Option<PathBuf>,
    /// The download slot its file takes while it lives.
    _slot: Option<DownloadSlot>,
}

impl<'a> Fetched<'a> {
    pub fn size(&self) -> u64 {
        self.source.len()
    }

    /// The same source fetched whole into `download_dir` (under a name of its own, removed
    /// with the returned [`Fetched`]) and hashed on the way; a declared digest must match.
    /// For a streamed source that must be verified before the store makes room for it.
    pub fn into_local(self, download_dir: &Path, limits: &SourceLimits) -> Result<Fetched<'a>> {
        let name = self.source.name().to_owned();
        let slot = limits.downloads.as_ref().map(DownloadSlots::take);
        let (mut file, path) = download_file(download_dir)?;
        let copied = copy_hashing(self.source.as_ref(), &mut file).and_then(|sha256| {
            self.source.check_unchanged()?;
            if let Some(declared) = self.sha256.as_ref().filter(|d| **d != sha256) {
                bail!("sha256 mismatch: expected {declared}, the source has {sha256}");
            }
            Ok((SourceFile::open(&path, &name)?, sha256))
        });
        downloaded(copied, path, slot)
    }
}

/// A file downloaded into `path` and hashed as a [`Fetched`]; on error the file is removed.
fn downloaded<'a>(
    file: Result<(SourceFile, String)>,
    path: PathBuf,
    slot: Option<DownloadSlot>,
) -> Result<Fetched<'a>> {
    match file {
        Ok((source, sha256)) => Ok(Fetched {
            source: Box::new(source),
            sha256: Some(sha256),
            hashed: true,
            streamed: false,
            downloaded: Some(path),
            _slot: slot,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Copies the whole of `source` into `file` in order; returns its sha256.
fn copy_hashing(source: &dyn Source, file: &mut std::fs::File) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 8 << 20];
    let mut offset = 0;
    while offset < source.len() {
        let n =
            usize::try_from(source.len() - offset).map_or(buf.len(), |left| left.min(buf.len()));
        source.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        io::Write::write_all(file, &buf[..n]).context("writing the downloaded file")?;
        offset += n as u64;
    }
    file.sync_all().context("syncing the downloaded file")?;
    Ok(hex::encode(hasher.finalize()))
}

/// A new file of its own in `download_dir` (two processes may share the folder).
fn download_file(download_dir: &Path) -> Result<(std::fs::File, PathBuf)> {
    std::fs::create_dir_all(download_dir)
        .with_context(|| format!("creating download folder {}", download_dir.display()))?;
    tempfile::Builder::new()
        .prefix(DOWNLOAD_PREFIX)
        .tempfile_in(download_dir)
        .with_context(|| format!("creating a file in {}", download_dir.display()))?
        .keep()
        .context("keeping the download file")
}

impl Drop for Fetched<'_> {
    fn drop(&mut self) {
        if let Some(path) = &self.downloaded {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fetches `model`'s source (`file://`, `http(s)://`, `s3://`, `az://`); a `file://` one only
/// from beneath `limits.file_root` when given (see [`SourceFile::open_beneath`]). Both formats hash the source
/// as their layout reads each byte into place, so a local file is read once and a remote
/// object whose server offers byte ranges is streamed into place, never written to a disk. A
/// server without ranges is downloaded into `download_dir` first, under a name of its own,
/// removed when the [`Fetched`] is dropped.
pub fn fetch<'a>(
    model: &ModelSource,
    download_dir: &Path,
    limits: &SourceLimits,
    on_progress: download::OnProgress<'a>,
) -> Result<Fetched<'a>> {
    let uri = model.uri.as_str();
    let declared = model.sha256.as_ref().map(|d| d.to_ascii_lowercase());
    if let Some(path) = uri.strip_prefix("file://") {
        let source = match &limits.file_root {
            Some(root) => SourceFile::open_beneath(root, Path::new(path), uri)?,
            None => SourceFile::open(Path::new(path), uri)?,
        };
        // Without a declared digest the file is hashed first (a local read): a model already
        // published is then found without laying it out again.
        let (sha256, hashed) = match declared {
            Some(declared) => (declared, false),
            None => (source.sha256()?, true),
        };
        return Ok(Fetched {
            source: Box::new(source),
            sha256: Some(sha256),
            hashed,
            streamed: false,
            downloaded: None,
            _slot: None,
        });
    }
    if !is_remote(uri) {
        bail!("source {uri}: unsupported scheme; use file://, http://, https://, s3:// or az://");
    }
    let policy = remote_policy(model, limits);
    match RemoteObject::open(model, &policy, on_progress)? {
        Some(remote) => Ok(Fetched {
            source: Box::new(remote),
            sha256: declared,
            hashed: false,
            streamed: true,
            downloaded: None,
            _slot: None,
        }),
        None => {
            let slot = limits.downloads.as_ref().map(DownloadSlots::take);
            download_whole(uri, download_dir, &policy, on_progress, slot)
        }
    }
}

/// Whether `uri` names a remote source (http(s), S3 or Azure), read by requests.
pub fn is_remote(uri: &str) -> bool {
    ["http://", "https://", "s3://", "az://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

/// How `model`'s remote source is read within `limits`.
fn remote_policy(model: &ModelSource, limits: &SourceLimits) -> download::Policy {
    download::Policy {
        max_bytes: model.max_bytes,
        ceiling: limits.max_source_bytes,
        bearer_token_file: model.bearer_token_file.as_ref().map(PathBuf::from),
        ca_file: model.ca_file.as_ref().map(PathBuf::from),
        networks: limits.networks.clone(),
        min_bytes_per_second: limits.min_bytes_per_second,
        ..download::Policy::default()
    }
}

/// The version (ETag) of `model`'s remote source now, asked with its credentials (a HEAD):
/// `None` when the source offers no strong ETag with ranges, or is not remote. An error when
/// the source refuses the credentials or cannot be reached.
pub fn version_of(model: &ModelSource, limits: &SourceLimits) -> Result<Option<String>> {
    if !is_remote(&model.uri) {
        return Ok(None);
    }
    let policy = remote_policy(model, limits);
    let quiet = |_: u64, _: Option<u64>| {};
    let remote = RemoteObject::open(model, &policy, &quiet)?;
    Ok(remote.map(|r| r.etag().to_owned()))
}

/// The sha256 of `model`'s source as it is now, read whole (into `download_dir` when it is
/// remote, removed again), whatever digest it declares: what its holder can show it reads.
pub fn sha256_of(
    model: &ModelSource,
    download_dir: &Path,
    limits: &SourceLimits,
) -> Result<String> {
    let undeclared = ModelSource {
        sha256: None,
        ..model.clone()
    };
    let quiet = |_: u64, _: Option<u64>| {};
    let mut fetched = fetch(&undeclared, download_dir, limits, &quiet)?;
    if !fetched.hashed {
        fetched = fetched.into_local(download_dir, limits)?;
    }
    Ok(fetched
        .sha256
        .clone()
        .expect("a source read whole is hashed"))
}

/// The name every download file starts with in a download folder.
const DOWNLOAD_PREFIX: &str = ".download-";

/// Removes the download files a killed process left in `download_dir` (a file is removed when
/// its [`Fetched`] is dropped, which a SIGKILL skips); returns how many. To be called before
/// this process downloads anything: another process's download in the same folder would go too.
pub fn remove_left_downloads(download_dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(download_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        entries => entries.with_context(|| format!("reading {}", download_dir.display()))?,
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(DOWNLOAD_PREFIX)
        {
            match std::fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", entry.path().display()))
                }
                _ => removed += 1,
            }
        }
    }
    Ok(removed)
}

/// Downloads an http(s) file whole into `download_dir`, in one transfer that resumes (a
/// server without ranges, or without HEAD), hashing it on the way.
fn download_whole<'a>(
    uri: &str,
    download_dir: &Path,
    policy: &download::Policy,
    on_progress: download::OnProgress,
    slot: Option<DownloadSlot>,
) -> Result<Fetched<'a>> {
    let (mut file, path) = download_file(download_dir)?;
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
    downloaded(fetched, path, slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_left_by_a_killed_process_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".download-abc", ".download-def", "keep.safetensors"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_left_downloads(dir.path()).unwrap(), 2);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["keep.safetensors"]);
        assert_eq!(remove_left_downloads(&dir.path().join("none")).unwrap(), 0);
    }

    #[test]
    fn a_file_source_is_opened_only_beneath_its_folder_whatever_links_lead_elsewhere() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let secret = elsewhere.path().join("secret");
        std::fs::write(&secret, b"node secret").unwrap();
        std::fs::write(root.path().join("m.safetensors"), b"model").unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        // A link planted in the folder, as one swapped in after a check of the path would be.
        std::os::unix::fs::symlink(&secret, root.path().join("planted")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("sub/out")).unwrap();
        let open = |relative: &str| {
            let path = root.path().join(relative);
            SourceFile::open_beneath(root.path(), &path, &format!("file://{relative}"))
        };
        let inside = open("sub/../m.safetensors").unwrap();
        assert_eq!(inside.len(), 5);
        for escape in ["planted", "sub/out/secret", "../secret", "sub/../../secret"] {
            let err = format!("{:#}", open(escape).err().expect(escape));
            assert!(err.contains("is not a file under"), "{escape}: {err}");
        }
        let err = format!(
            "{:#}",
            SourceFile::open_beneath(root.path(), &secret, "file://secret")
                .err()
                .unwrap()
        );
        assert!(err.contains("is not a file under"), "{err}");
    }
}
