//! The sidecar's job: every model from its source to a published folder, then the bindings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::config::ModelSource;
use crate::formats;
use crate::layout::{Bindings, Manifest, Store, LAYOUT_VERSION};
use crate::source::{fetch, sha256_hex};

pub struct Publisher {
    pub store: Store,
    pub bindings: Bindings,
    /// Where http(s) sources are downloaded before they are laid out (a disk, not the store).
    pub download_dir: PathBuf,
}

impl Publisher {
    /// Publishes every model, then writes the bindings. On error nothing is bound, and no
    /// partial model is visible in the store.
    pub fn publish_all(&self, models: &[ModelSource]) -> Result<BTreeMap<String, String>> {
        self.bindings.clear()?;
        let mut digests = BTreeMap::new();
        for model in models {
            let digest = self
                .publish(model)
                .with_context(|| format!("model {:?} ({})", model.name, model.uri))?;
            digests.insert(model.name.clone(), digest);
        }
        self.bindings.write(&digests)?;
        info!(models = digests.len(), "all models published");
        Ok(digests)
    }

    /// Publishes one model and returns its digest. Two sidecars asked for the same model on
    /// one node serialise on a lock: the second finds it published and only verifies it.
    pub fn publish(&self, model: &ModelSource) -> Result<String> {
        let expected = model.sha256.as_ref().map(|s| s.to_ascii_lowercase());
        let lock_key = expected
            .clone()
            .unwrap_or_else(|| format!("uri-{}", sha256_hex(model.uri.as_bytes())));
        info!(model = %model.name, "waiting for the model's lock");
        let _lock = self.store.lock(&lock_key)?;
        if let Some(digest) = &expected {
            if self.store.is_published(digest) {
                self.store.open(digest)?;
                info!(model = %model.name, %digest, "already published; verified");
                return Ok(digest.clone());
            }
        }

        let started = Instant::now();
        info!(model = %model.name, uri = %model.uri, "fetching");
        let fetched = fetch(&model.uri, &self.download_dir)?;
        info!(model = %model.name, bytes = fetched.size, secs = started.elapsed().as_secs_f32(), "fetched");
        if let Some(digest) = &expected {
            if *digest != fetched.sha256 {
                bail!(
                    "sha256 mismatch: expected {digest}, the source has {}",
                    fetched.sha256
                );
            }
        }
        let digest = fetched.sha256.clone();
        // Without an expected digest the lock was keyed by the URI: also hold the digest's.
        let _digest_lock = if lock_key != digest {
            Some(self.store.lock(&digest)?)
        } else {
            None
        };
        if self.store.is_published(&digest) {
            self.store.open(&digest)?;
            info!(model = %model.name, %digest, "already published; verified");
            return Ok(digest);
        }

        let file = std::fs::File::open(&fetched.path)?;
        // SAFETY: read-only map of a source file that this process does not modify.
        let source = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", fetched.path.display()))?;
        let staging = self.store.begin(&digest)?;
        let laid = formats::lay_out(model.format, &source, &staging)?;
        info!(model = %model.name, tensors = laid.tensors.len(), bytes = laid.tensors_bytes, "laid out");
        let manifest = Manifest {
            layout_version: LAYOUT_VERSION,
            digest: digest.clone(),
            format: model.format,
            source_bytes: fetched.size,
            tensors_bytes: laid.tensors_bytes,
            tensors: laid.tensors,
            skeleton: laid.skeleton,
        };
        let dir = staging.publish(&manifest)?;
        info!(model = %model.name, %digest, dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "published");
        Ok(digest)
    }

    /// True when every model is bound to a published, consistent folder.
    pub fn check_ready(&self, models: &[ModelSource]) -> Result<()> {
        for model in models {
            self.bindings.resolve(&self.store, &model.name)?;
        }
        Ok(())
    }
}
