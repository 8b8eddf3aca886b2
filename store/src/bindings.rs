//! Per pod: which model each name is bound to (ready.json).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{Manifest, Store, READY_FILE};

/// Per pod: which digest each model name is bound to. Written last, atomically; the readiness
/// probe and the workers read it.
#[derive(Clone, Debug)]
pub struct Bindings {
    dir: PathBuf,
}

impl Bindings {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Bindings { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(READY_FILE)
    }

    pub fn clear(&self) -> Result<()> {
        match fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn write(&self, digests: &BTreeMap<String, String>) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self
            .dir
            .join(format!(".{READY_FILE}.{}", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(digests)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, self.path())?;
        Ok(())
    }

    /// The digests, or None while the sidecar has not finished.
    pub fn read(&self) -> Result<Option<BTreeMap<String, String>>> {
        match fs::read_to_string(self.path()) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).context("ready.json is not valid")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The digest of one model, with its manifest checked.
    pub fn resolve(&self, store: &Store, model: &str) -> Result<(String, Manifest)> {
        let digests = self.read()?.with_context(|| {
            format!(
                "the weights are not ready: {} does not exist",
                self.path().display()
            )
        })?;
        let digest = digests
            .get(model)
            .with_context(|| format!("model {model:?} is not among the published models"))?;
        let manifest = store
            .open(digest)
            .with_context(|| format!("model {model:?}"))?;
        Ok((digest.clone(), manifest))
    }
}
