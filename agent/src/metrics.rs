//! The agent's Prometheus metrics and health endpoints (/metrics, /livez): the node store's
//! bytes and models, the volumes mounted from it, how long publishing a volume takes, and
//! what the store took in and let go.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A volume publication's outcome: "success" or "error".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    /// The store's folder: its file system's size and use are read at each scrape.
    store: PathBuf,
    store_bytes: Gauge,
    store_free_bytes: Gauge,
    /// Published models in the store, counted at each scrape.
    models: Gauge,
    /// Volumes mounted from the store now (pods reading it).
    pub volumes: Gauge,
    /// NodePublishVolume calls, by outcome: fetching and laying out included.
    pub publish: Family<OutcomeLabels, Histogram>,
    /// Models the agent laid out (fetched, verified, published).
    pub layouts: Counter,
    /// Models the periodic collection removed (unmounted past the keep time).
    pub evictions: Counter,
    /// Unused models removed at once to make room for a new one.
    pub room_evictions: Counter,
    /// Entries removed because they did not verify against what the agent laid out.
    pub discarded: Counter,
    registry: Registry,
}

impl Metrics {
    pub fn new(store: PathBuf) -> Self {
        let mut m = Metrics {
            store,
            store_bytes: Gauge::default(),
            store_free_bytes: Gauge::default(),
            models: Gauge::default(),
            volumes: Gauge::default(),
            publish: Family::new_with_constructor(
                (|| Histogram::new(exponential_buckets(0.01, 2.0, 14))) as fn() -> Histogram,
            ),
            layouts: Counter::default(),
            evictions: Counter::default(),
            room_evictions: Counter::default(),
            discarded: Counter::default(),
            registry: Registry::with_prefix("kube_zerocopy_agent"),
        };
        let r = &mut m.registry;
        r.register(
            "store_bytes",
            "Size of the node's store",
            m.store_bytes.clone(),
        );
        r.register(
            "store_free_bytes",
            "Bytes still free in the node's store",
            m.store_free_bytes.clone(),
        );
        r.register("models", "Published models in the store", m.models.clone());
        r.register(
            "volumes",
            "Volumes mounted from the store",
            m.volumes.clone(),
        );
        r.register(
            "publish_seconds",
            "Time to publish a pod's volume (fetch and layout included), by outcome",
            m.publish.clone(),
        );
        r.register(
            "layouts",
            "Models fetched, verified and laid out",
            m.layouts.clone(),
        );
        r.register(
            "evictions",
            "Unused models removed by the periodic collection",
            m.evictions.clone(),
        );
        r.register(
            "room_evictions",
            "Unused models removed, least recently used first, to make room for a new one",
            m.room_evictions.clone(),
        );
        r.register(
            "discarded",
            "Store entries removed because they did not verify",
            m.discarded.clone(),
        );
        m
    }

    pub fn published(&self, took: Duration, ok: bool) {
        let outcome = if ok { "success" } else { "error" };
        self.publish
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        if let Ok(fs) = rustix::fs::statvfs(&self.store) {
            self.store_bytes.set((fs.f_blocks * fs.f_frsize) as i64);
            self.store_free_bytes
                .set((fs.f_bavail * fs.f_frsize) as i64);
        }
        if let Ok(models) = std::fs::read_dir(self.store.join("blobs")) {
            self.models.set(models.count() as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode to a string");
        out
    }
}

/// Serves /metrics and /livez on `listen` from a thread of its own.
pub fn serve(listen: &str, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    kube_zerocopy_runtime::process::serve_endpoints(listen, move |path| match path {
        "/metrics" => (200, metrics.render()),
        "/livez" => (200, "ok".into()),
        _ => (404, "not found".into()),
    })
    .map(|_| ())
}
