//! The sidecar's job: every model from its source to a published folder, then the bindings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::config::ModelSource;
use crate::formats::{self, LaidOut};
use crate::layout::{Bindings, Hold, Manifest, Staging, Store, StoreFull, LAYOUT_VERSION};
use crate::source::{fetch, sha256_hex, Fetched, Source, SourceLimits};

pub struct Publisher {
    pub store: Store,
    pub bindings: Bindings,
    /// Where http(s) sources are downloaded before they are laid out (a disk, not the store).
    pub download_dir: PathBuf,
    /// What sources may reach and how slow they may be (see [`SourceLimits`]).
    pub limits: SourceLimits,
    /// Told how each fetch goes and what was published (the node agent reports it per node);
    /// the logs tell it in any case.
    pub observer: Option<Arc<dyn Observer>>,
}

/// What a publication reports while it runs.
pub trait Observer: Send + Sync {
    /// `bytes` of `model`'s source received so far, of `total` when the source announced it.
    fn fetching(&self, model: &ModelSource, started: Instant, bytes: u64, total: Option<u64>);
    /// The fetch of `model` ended (published or not).
    fn fetched(&self, model: &ModelSource);
    /// `model`, fetched and hashed as `digest`, is laid out, complete, in the folder
    /// `laid_out`, which becomes visible in the store next (if this returns no error).
    fn publishing(&self, _model: &ModelSource, _digest: &str, _laid_out: &Path) -> Result<()> {
        Ok(())
    }
    /// `model` declares `digest`, which the store holds already, laid out from some source:
    /// an error keeps it from `model`'s holder (who has not shown its source to hold those
    /// bytes). Called under the digest's lock.
    fn may_serve_published(&self, _model: &ModelSource, _digest: &str) -> Result<()> {
        Ok(())
    }
    /// `model` was laid out and published as `digest`.
    fn published(&self, model: &ModelSource, digest: &str, fetch: Duration, layout: Duration);
    /// The unused model `removed` was removed to make room for `model`.
    fn made_room(&self, model: &ModelSource, removed: &str);
}

/// How often a fetch's progress is logged.
const LOG_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Publisher {
    /// Publishes every model, then writes the bindings; returns the holds that keep the models
    /// from collection while this sidecar serves them. On error nothing is bound, and no
    /// partial model is visible in the store.
    pub fn publish_all(&self, models: &[ModelSource]) -> Result<Vec<Hold>> {
        self.bindings.clear()?;
        let mut digests = BTreeMap::new();
        let mut holds = Vec::new();
        for model in models {
            let hold = self
                .publish(model)
                .with_context(|| format!("model {:?} ({})", model.name, model.uri))?;
            digests.insert(model.name.clone(), hold.digest.clone());
            holds.push(hold);
        }
        self.bindings.write(&digests)?;
        info!(models = digests.len(), "all models published");
        Ok(holds)
    }

    /// Publishes one model and holds it. Two sidecars asked for the same model on one node
    /// serialise on a lock: the second finds it published and only verifies it. The hold is
    /// taken before looking for the model, so that no collection removes it in between.
    pub fn publish(&self, model: &ModelSource) -> Result<Hold> {
        let expected = model.sha256.as_ref().map(|s| s.to_ascii_lowercase());
        let hold = expected
            .as_deref()
            .map(|d| self.store.hold(d))
            .transpose()?;
        let lock_key = expected
            .clone()
            .unwrap_or_else(|| format!("uri-{}", sha256_hex(model.uri.as_bytes())));
        info!(model = %model.name, "waiting for the model's lock");
        let _lock = self.store.lock(&lock_key)?;
        if let (Some(digest), Some(_)) = (&expected, &hold) {
            if self.verified_if_published(model, digest, "already published; verified")? {
                self.may_serve_published(model, digest)?;
                return Ok(hold.expect("a declared digest is held"));
            }
        }
        let started = Instant::now();
        info!(model = %model.name, uri = %kube_zerocopy_runtime::redact::uri(&model.uri), "fetching");
        let logged = Mutex::new(started);
        let on_progress = |bytes: u64, total: Option<u64>| {
            if let Some(observer) = &self.observer {
                observer.fetching(model, started, bytes, total);
            }
            let mut logged = logged.lock().unwrap();
            if logged.elapsed() >= LOG_PROGRESS_EVERY {
                *logged = Instant::now();
                let mib_per_s = bytes as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64;
                info!(model = %model.name, bytes, total, mib_per_s = format!("{mib_per_s:.1}"), "fetching");
            }
        };
        let published = fetch(model, &self.download_dir, &self.limits, &on_progress)
            .and_then(|fetched| self.lay_out_and_publish(model, fetched, hold, &lock_key, started));
        if let Some(observer) = &self.observer {
            observer.fetched(model);
        }
        published
    }

    /// Lays `fetched` out and publishes it, unless it turns out to be published already. With
    /// its digest unknown until the layout has hashed it, it is staged under `lock_key`.
    fn lay_out_and_publish(
        &self,
        model: &ModelSource,
        fetched: Fetched,
        mut hold: Option<Hold>,
        lock_key: &str,
        started: Instant,
    ) -> Result<Hold> {
        let mut fetch_time = started.elapsed();
        if !fetched.streamed {
            info!(model = %model.name, bytes = fetched.size(), secs = fetch_time.as_secs_f32(), "fetched");
        }
        let mut _digest_lock = None;
        if let Some(digest) = &fetched.sha256 {
            match &hold {
                Some(held) if held.digest != *digest => bail!(
                    "sha256 mismatch: expected {}, the source has {digest}",
                    held.digest
                ),
                Some(_) => {}
                // The lock was keyed by the URI: now hold the digest and take its lock too.
                None => {
                    hold = Some(self.store.hold(digest)?);
                    _digest_lock = Some(self.store.lock(digest)?);
                }
            }
            if self.verified_if_published(model, digest, "already published; verified")? {
                // A declared digest of a source not hashed yet proves nothing of its bytes.
                if !fetched.hashed {
                    self.may_serve_published(model, digest)?;
                }
                return Ok(hold.expect("held above"));
            }
        }

        let staging_key = fetched.sha256.as_deref().unwrap_or(lock_key);
        // Room is made only for a model fetched and hashed: a streamed source's header could
        // claim any size, and its bytes may never come.
        let may_make_room = !fetched.streamed;
        let (staging, laid) = match self.lay_out_making_room(
            model,
            staging_key,
            &*fetched.source,
            may_make_room,
        ) {
            Err(e) if fetched.streamed && e.chain().any(|c| c.is::<StoreFull>()) => {
                info!(model = %model.name, "the store is full: fetching the model whole before anything is removed to make room for it");
                let fetched = fetched.into_local(&self.download_dir, &self.limits)?;
                return self.lay_out_and_publish(model, fetched, hold, lock_key, started);
            }
            laid => laid?,
        };
        let source = fetched.source.as_ref();
        if fetched.streamed {
            fetch_time = started.elapsed();
            info!(model = %model.name, bytes = fetched.size(), secs = fetch_time.as_secs_f32(), "fetched into place");
        }
        let digest = match (&fetched.sha256, &laid.source_sha256) {
            (Some(digest), _) | (None, Some(digest)) => digest.clone(),
            (None, None) => bail!("the layout of a source streamed unhashed hashed nothing"),
        };
        // What was laid out must be what was hashed (or declared): the staging folder goes if
        // not.
        check_laid_out_what_was_hashed(source, &digest, &laid, fetched.hashed)?;
        let hold = match hold {
            Some(hold) => hold,
            // Hashed only now: hold the digest and take its lock; another fetch may have
            // published it meanwhile.
            None => {
                let hold = self.store.hold(&digest)?;
                _digest_lock = Some(self.store.lock(&digest)?);
                if self.verified_if_published(model, &digest, "published meanwhile; verified")? {
                    return Ok(hold);
                }
                hold
            }
        };
        info!(model = %model.name, tensors = laid.tensors.len(), bytes = laid.tensors_bytes, "laid out");
        let manifest = Manifest {
            layout_version: LAYOUT_VERSION,
            digest: digest.clone(),
            format: model.format,
            source_bytes: fetched.size(),
            tensors_bytes: laid.tensors_bytes,
            tensors: laid.tensors,
            skeleton: laid.skeleton,
        };
        let dir = staging.publish(&manifest, |laid_out| match &self.observer {
            Some(observer) => observer.publishing(model, &digest, laid_out),
            None => Ok(()),
        })?;
        info!(model = %model.name, %digest, dir = %dir.display(), secs = started.elapsed().as_secs_f32(), "published");
        if let Some(observer) = &self.observer {
            observer.published(model, &digest, fetch_time, started.elapsed() - fetch_time);
        }
        Ok(hold)
    }

    /// Asks the observer whether `model`'s holder may have the published `digest`.
    fn may_serve_published(&self, model: &ModelSource, digest: &str) -> Result<()> {
        match &self.observer {
            Some(observer) => observer.may_serve_published(model, digest),
            None => Ok(()),
        }
    }

    /// True when `digest` is published already, its folder verified (`open`); says `found`.
    fn verified_if_published(
        &self,
        model: &ModelSource,
        digest: &str,
        found: &str,
    ) -> Result<bool> {
        if !self.store.is_published(digest) {
            return Ok(false);
        }
        self.store.open(digest)?;
        info!(model = %model.name, %digest, "{found}");
        Ok(true)
    }

    /// Writes the model into a staging folder (removed again if this fails). When
    /// `may_make_room`, room may be taken by models that no pod uses any more: they are
    /// removed least recently used first, one at a time, until this one fits. A model larger
    /// than the whole store removes nothing.
    fn lay_out_making_room(
        &self,
        model: &ModelSource,
        staging_key: &str,
        source: &dyn Source,
        may_make_room: bool,
    ) -> Result<(Staging, LaidOut)> {
        loop {
            let laid = self.store.begin(staging_key).and_then(|staging| {
                Ok((formats::lay_out(model.format, source, &staging)?, staging))
            });
            let full = laid
                .as_ref()
                .err()
                .and_then(|e| e.chain().find_map(|c| c.downcast_ref::<StoreFull>()))
                .map(|full| (full.needed, full.capacity));
            match laid {
                Err(e) if full.is_some_and(|(needed, capacity)| needed > capacity) => {
                    let capacity = full.map_or(0, |(_, capacity)| capacity);
                    return Err(e.context(format!(
                        "the model is larger than the whole store ({capacity} bytes): nothing \
                         was removed to make room"
                    )));
                }
                Err(e) if may_make_room && full.is_some() => {
                    let Some(removed) = self.store.collect_least_recently_used()? else {
                        return Err(e);
                    };
                    info!(model = %model.name, %removed, "shared memory was full: removed the unused model used least recently");
                    if let Some(observer) = &self.observer {
                        observer.made_room(model, &removed);
                    }
                }
                laid => return laid.map(|(laid, staging)| (staging, laid)),
            }
        }
    }

    /// True when every model is bound to a published, consistent folder.
    pub fn check_ready(&self, models: &[ModelSource]) -> Result<()> {
        for model in models {
            self.bindings.resolve(&self.store, &model.name)?;
        }
        Ok(())
    }
}

/// A source written to between hashing and layout would be published under the digest of
/// other bytes. Formats that read the whole file in order hash it again on the way (exact);
/// every format's reads go through one descriptor whose size and times must not have changed.
/// A digest that was declared, not hashed before (`hashed` false), is checked here alone.
fn check_laid_out_what_was_hashed(
    source: &dyn Source,
    digest: &str,
    laid: &LaidOut,
    hashed: bool,
) -> Result<()> {
    source.check_unchanged()?;
    if let Some(read) = laid.source_sha256.as_ref().filter(|read| *read != digest) {
        if !hashed {
            bail!("sha256 mismatch: expected {digest}, the source has {read}");
        }
        bail!(
            "the source changed while it was loaded: it hashed to {digest}, the bytes laid \
             out hash to {read}; nothing was published, and the next attempt loads it again"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SourceFile;

    fn laid_out(source_sha256: Option<&str>) -> LaidOut {
        LaidOut {
            tensors: vec![],
            tensors_bytes: 0,
            skeleton: None,
            source_sha256: source_sha256.map(str::to_owned),
        }
    }

    /// A file:// safetensors source with a declared digest is read once: the layout's own hash
    /// is the check, and a source that does not match says so in the download's words.
    #[test]
    fn a_declared_digest_is_checked_against_what_the_layout_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        std::fs::write(&path, b"weights").unwrap();
        let source = SourceFile::open(&path, "file://m.bin").unwrap();
        let actual = source.sha256().unwrap();
        let declared = "0".repeat(64);
        check_laid_out_what_was_hashed(&source, &actual, &laid_out(Some(&actual)), false).unwrap();
        let err =
            check_laid_out_what_was_hashed(&source, &declared, &laid_out(Some(&actual)), false)
                .unwrap_err()
                .to_string();
        assert_eq!(
            err,
            format!("sha256 mismatch: expected {declared}, the source has {actual}")
        );
    }

    /// The node agent records each entry it lays out before the entry is visible: another
    /// volume vetting it meanwhile would otherwise find no record and discard it.
    #[test]
    fn the_observer_sees_the_complete_folder_before_the_entry_is_visible() {
        struct Seen {
            store: Store,
            before_visible: std::sync::Mutex<Vec<(bool, bool)>>,
        }
        impl Observer for Seen {
            fn fetching(&self, _: &ModelSource, _: Instant, _: u64, _: Option<u64>) {}
            fn fetched(&self, _: &ModelSource) {}
            fn published(&self, _: &ModelSource, _: &str, _: Duration, _: Duration) {}
            fn made_room(&self, _: &ModelSource, _: &str) {}
            fn publishing(&self, _: &ModelSource, digest: &str, laid_out: &Path) -> Result<()> {
                let complete = laid_out.join(crate::layout::MANIFEST_FILE).is_file();
                let visible = self.store.is_published(digest);
                self.before_visible
                    .lock()
                    .unwrap()
                    .push((complete, visible));
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let mut model = (header.len() as u64).to_le_bytes().to_vec();
        model.extend_from_slice(header);
        model.extend_from_slice(&[1, 2, 3, 4]);
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &model).unwrap();
        let store = Store::new(dir.path().join("store"));
        let seen = Arc::new(Seen {
            store: store.clone(),
            before_visible: Default::default(),
        });
        let publisher = Publisher {
            store: store.clone(),
            bindings: Bindings::new(dir.path().join("bindings")),
            download_dir: dir.path().join("downloads"),
            limits: SourceLimits::default(),
            observer: Some(seen.clone()),
        };
        let source: ModelSource = serde_json::from_value(serde_json::json!({
            "name": "m", "format": "Safetensors", "uri": format!("file://{}", path.display())
        }))
        .unwrap();
        let hold = publisher.publish(&source).unwrap();
        assert_eq!(*seen.before_visible.lock().unwrap(), [(true, false)]);
        assert!(store.is_published(&hold.digest));
    }

    #[test]
    fn a_source_that_changed_during_layout_is_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        std::fs::write(&path, b"weights").unwrap();
        let source = SourceFile::open(&path, "file://m.bin").unwrap();
        let digest = source.sha256().unwrap();
        check_laid_out_what_was_hashed(&source, &digest, &laid_out(Some(&digest)), true).unwrap();
        check_laid_out_what_was_hashed(&source, &digest, &laid_out(None), true).unwrap();
        let err = check_laid_out_what_was_hashed(&source, &digest, &laid_out(Some("other")), true)
            .unwrap_err();
        assert!(
            err.to_string().contains("changed while it was loaded"),
            "{err:#}"
        );
        // Grown meanwhile: caught by its size even for formats that do not hash again.
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut &file, b"!").unwrap();
        let err =
            check_laid_out_what_was_hashed(&source, &digest, &laid_out(None), true).unwrap_err();
        assert!(
            err.to_string().contains("changed while it was loaded"),
            "{err:#}"
        );
    }
}
