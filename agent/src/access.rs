//! Who may be served a model the store holds. A digest is no secret (every NodeStore lists the
//! node's), so it is no capability either: a model laid out from a source read with a
//! pipeline's credentials (a bearer token, S3 or Azure keys) is private, and another volume
//! that names its digest gets it only once it shows that its own source holds those bytes.
//!
//! The agent records, where only it writes (its memory volume, beside its layout records),
//! that an entry is private and which versions of which sources it was read from. A volume
//! shows access by its source, asked with its own credentials, answering a recorded version
//! (one HEAD: the same object, unchanged), or else by its source read whole hashing to the
//! digest. A model laid out from a source that needs no credentials is served to whoever
//! names its digest: anyone who can name the source can read it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use kube_zerocopy_fetch::config::ModelSource;
use kube_zerocopy_fetch::publish::Observer;
use kube_zerocopy_fetch::source::{self, SourceLimits};
use kube_zerocopy_fetch::Store;

use crate::activity::Activity;

/// The store's private models and how each may be shown.
pub struct Access {
    store: Store,
    /// Where a source read whole to show its bytes is downloaded (and removed again).
    download_dir: PathBuf,
    limits: SourceLimits,
}

/// A private entry's record: the sources and versions it was read from.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    versions: Vec<Version>,
}

/// One version of one source: where it is (its URI and the settings that reach it) and the
/// ETag it had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Version {
    source: String,
    etag: String,
}

/// A volume named a private model's digest without showing that its source holds those bytes.
#[derive(Debug)]
pub struct NotShown(String);

impl std::fmt::Display for NotShown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotShown {}

impl Access {
    pub fn new(store: Store, download_dir: PathBuf, limits: SourceLimits) -> Self {
        Access {
            store,
            download_dir,
            limits,
        }
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.store
            .private_root()
            .join(".access")
            .join(format!("{digest}.json"))
    }

    fn read(&self, digest: &str) -> Result<Option<Record>> {
        let path = self.record_path(digest);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written whole or not at all: a torn record would read as no record (a public model).
    fn write(&self, digest: &str, record: &Record) -> Result<()> {
        let path = self.record_path(digest);
        let dir = path.parent().expect("a folder");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut file, &serde_json::to_vec(record)?)?;
        file.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Records that `model`, read with its credentials, is a source of `digest` (laid out from
    /// it now): the entry is private from now on. Under the digest's lock.
    pub fn record(&self, model: &ModelSource, digest: &str) -> Result<()> {
        self.record_version(digest, self.version_now(model))
    }

    /// Records `digest` as private, read from `version` of a source when it is known. Without a
    /// version (a source that offers none, or a HEAD that failed) the entry is private all the
    /// same: later volumes show their bytes instead.
    fn record_version(&self, digest: &str, version: Option<Version>) -> Result<()> {
        let mut record = self.read(digest)?.unwrap_or_default();
        if let Some(version) = version.filter(|v| !record.versions.contains(v)) {
            record.versions.push(version);
        }
        self.write(digest, &record)
    }

    /// The version of `model`'s source now, asked with its credentials (one HEAD); `None`
    /// when it offers none or does not answer (logged).
    fn version_now(&self, model: &ModelSource) -> Option<Version> {
        match source::version_of(model, &self.limits) {
            Ok(etag) => etag.map(|etag| Version {
                source: source_identity(model),
                etag,
            }),
            Err(e) => {
                warn!(model = %model.name, error = format!("{e:#}"), "a source's version could not be read");
                None
            }
        }
    }

    /// Ok when `model`'s holder may have the published `digest`: a public entry, or a private
    /// one whose bytes `model`'s source is shown to hold. Under the digest's lock.
    pub fn check(&self, model: &ModelSource, digest: &str) -> Result<()> {
        let Some(record) = self.read(digest)? else {
            return Ok(());
        };
        let version = model
            .names_credentials()
            .then(|| self.version_now(model))
            .flatten();
        if version
            .as_ref()
            .is_some_and(|v| record.versions.contains(v))
        {
            info!(model = %model.name, %digest, "a private model: the volume's source is a version it was read from");
            return Ok(());
        }
        let started = Instant::now();
        info!(model = %model.name, %digest, "a private model: reading the volume's source whole to show it holds the same bytes");
        let shown = source::sha256_of(model, &self.download_dir, &self.limits);
        let why = match shown {
            Ok(sha256) if sha256 == digest => {
                info!(model = %model.name, %digest, secs = started.elapsed().as_secs_f32(), "the volume's source holds the private model's bytes");
                if model.names_credentials() {
                    self.record_version(digest, version)?;
                }
                return Ok(());
            }
            Ok(_) => "its source holds other bytes".to_owned(),
            Err(e) => format!("its source could not be read: {e:#}"),
        };
        Err(NotShown(format!(
            "this node holds sha256 {digest} as a private model, and the volume did not show \
             that it may read it ({why}): name a source of those bytes that its credentials \
             read, in the Secret the volume names"
        ))
        .into())
    }
}

/// Where a source is, with the settings that reach it: the same URI at another endpoint or
/// account is another object.
fn source_identity(model: &ModelSource) -> String {
    let s3 = model.s3.as_ref();
    let azure = model.azure.as_ref();
    serde_json::json!({
        "uri": model.uri,
        "s3": s3.map(|s| (&s.endpoint, &s.region)),
        "azure": azure.map(|a| (&a.account, &a.endpoint)),
    })
    .to_string()
}

/// How the agent observes a publication: the node's report ([`Activity`]) and the access
/// records of private models ([`Access`]).
pub struct Guard {
    pub activity: Arc<Activity>,
    pub access: Arc<Access>,
}

impl Observer for Guard {
    fn fetching(&self, model: &ModelSource, started: Instant, bytes: u64, total: Option<u64>) {
        self.activity.fetching(model, started, bytes, total);
    }

    fn fetched(&self, model: &ModelSource) {
        self.activity.fetched(model);
    }

    fn publishing(&self, model: &ModelSource, digest: &str, laid_out: &Path) -> Result<()> {
        // Before the entry is visible: no volume may find it public meanwhile.
        if model.names_credentials() {
            self.access.record(model, digest)?;
        }
        self.activity.publishing(model, digest, laid_out)
    }

    fn may_serve_published(&self, model: &ModelSource, digest: &str) -> Result<()> {
        self.access.check(model, digest)
    }

    fn published(&self, model: &ModelSource, digest: &str, fetch: Duration, layout: Duration) {
        self.activity.published(model, digest, fetch, layout);
    }

    fn made_room(&self, model: &ModelSource, removed: &str) {
        self.activity.made_room(model, removed);
    }
}
