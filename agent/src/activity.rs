//! What the agent's publications are doing and did: the fetches under way (with their bytes so
//! far), and for each model it published a record of where from and how long it took
//! (`<store>/.publications/<digest>.json`, outside every view, so that an agent that restarts
//! still reports them). The node's `NodeStore` status is made from these and the store.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use kube_zerocopy_fetch::config::ModelSource;
use kube_zerocopy_fetch::publish::Observer;
use kube_zerocopy_fetch::Store;
use kube_zerocopy_runtime::redact;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::integrity::Layouts;

/// A model published by the agent, as recorded when it was.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    pub name: String,
    pub source: String,
    pub published_at: SystemTime,
    pub fetch_seconds: f64,
    pub layout_seconds: f64,
}

/// A fetch under way.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetch {
    pub name: String,
    pub source: String,
    pub started_at: SystemTime,
    pub elapsed: Duration,
    pub bytes: u64,
    pub total: Option<u64>,
}

/// How far a fetch has come.
struct Progress {
    /// The source as the report shows it.
    shown: String,
    started: Instant,
    started_at: SystemTime,
    bytes: u64,
    total: Option<u64>,
}

pub struct Activity {
    store: Store,
    /// Told when a fetch starts or ends, a model is published or a volume comes or goes: the
    /// node's report is made again at once rather than at its next round.
    pub changed: tokio::sync::Notify,
    /// The metric of models removed to make room.
    room_evictions: Counter,
    /// By source and model name: two volumes may wait on one fetch, which reports once.
    fetching: Mutex<BTreeMap<(String, String), Progress>>,
}

impl Activity {
    pub fn new(store: Store, room_evictions: Counter) -> Self {
        Activity {
            store,
            changed: tokio::sync::Notify::new(),
            room_evictions,
            fetching: Mutex::new(BTreeMap::new()),
        }
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.store
            .root()
            .join(".publications")
            .join(format!("{digest}.json"))
    }

    /// The record of the model `digest`, if the agent published it and the record reads.
    pub fn publication(&self, digest: &str) -> Option<Publication> {
        let text = fs::read(self.record_path(digest)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Removes the record of a model that left the store.
    pub fn forget(&self, digest: &str) {
        let path = self.record_path(digest);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %path.display(), error = %e, "removing a publication record");
            }
        }
    }

    /// The fetches under way, by source.
    pub fn fetches(&self) -> Vec<Fetch> {
        let fetching = self.fetching.lock().unwrap();
        fetching
            .iter()
            .map(|((_, name), progress)| Fetch {
                name: name.clone(),
                source: progress.shown.clone(),
                started_at: progress.started_at,
                elapsed: progress.started.elapsed(),
                bytes: progress.bytes,
                total: progress.total,
            })
            .collect()
    }
}

impl Observer for Activity {
    fn fetching(&self, model: &ModelSource, started: Instant, bytes: u64, total: Option<u64>) {
        let mut fetching = self.fetching.lock().unwrap();
        let progress = fetching
            .entry((model.uri.clone(), model.name.clone()))
            .or_insert_with(|| {
                self.changed.notify_one();
                Progress {
                    shown: shown_source(model),
                    started,
                    started_at: SystemTime::now() - started.elapsed(),
                    bytes: 0,
                    total: None,
                }
            });
        progress.bytes = bytes;
        progress.total = total;
    }

    fn fetched(&self, model: &ModelSource) {
        let mut fetching = self.fetching.lock().unwrap();
        fetching.remove(&(model.uri.clone(), model.name.clone()));
        self.changed.notify_one();
    }

    fn made_room(&self, _: &ModelSource, removed: &str) {
        self.room_evictions.inc();
        self.forget(removed);
    }

    fn publishing(&self, _: &ModelSource, digest: &str, laid_out: &Path) -> anyhow::Result<()> {
        // Before the entry is visible: another volume that vets it meanwhile finds the record
        // (without it, it would discard the entry as one the agent never laid out).
        Layouts::new(self.store.clone()).record_laid_out(digest, laid_out)
    }

    fn published(&self, model: &ModelSource, digest: &str, fetch: Duration, layout: Duration) {
        let record = Publication {
            name: model.name.clone(),
            source: shown_source(model),
            published_at: SystemTime::now(),
            fetch_seconds: fetch.as_secs_f64(),
            layout_seconds: layout.as_secs_f64(),
        };
        let path = self.record_path(digest);
        // Only a report depends on it: a record that cannot be written is logged, not fatal.
        let written = fs::create_dir_all(path.parent().expect("a folder"))
            .and_then(|()| fs::write(&path, serde_json::to_vec(&record).expect("serializable")));
        if let Err(e) = written {
            warn!(error = %e, path = %path.display(), "recording a publication");
        }
        self.changed.notify_one();
    }
}

/// A model's source as the node's report shows it (to whoever reads NodeStores): without its
/// query, and none at all for a private one (where a tenant keeps its models is its own).
fn shown_source(model: &ModelSource) -> String {
    match model.names_credentials() {
        true => "(a private source)".to_owned(),
        false => redact::uri(&model.uri).into_owned(),
    }
}
