//! The actor's Prometheus metrics, and the memory gauges read from /proc at each scrape.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Result;
use prometheus_client::encoding::text::encode as encode_metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::memory::MemoryStats;
use crate::model::Pipeline;

/// The actor's metrics, prefixed `kube_zerocopy_worker_`.
pub struct ActorMetrics {
    pub(super) batches: Counter,
    pub(super) failed: Counter,
    pub(super) rows: Counter,
    pub(super) executions: Counter,
    pub(super) seconds: Histogram,
    in_flight: Gauge,
    weights: Gauge,
    process_pss: Gauge,
    process_uss: Gauge,
    weights_pss: Gauge,
    /// The models' shared mappings, whose PSS each scrape reads (once they are mapped).
    mappings: OnceLock<Vec<PathBuf>>,
    registry: Registry,
}

impl Default for ActorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ActorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kube_zerocopy_worker");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let bytes = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register_with_unit(name, help, Unit::Bytes, g.clone());
            g
        };
        let batches = counter(&mut registry, "batches", "Inference requests answered");
        let failed = counter(&mut registry, "batch_errors", "Inference requests refused");
        let rows = counter(&mut registry, "rows", "Rows of the requests answered");
        let executions = counter(
            &mut registry,
            "executions",
            "Forward passes (fewer than requests when dynamic batching merges them)",
        );
        let seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "batch_duration",
            "Time per answered request, waiting included",
            Unit::Seconds,
            seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Inference requests admitted and not yet answered (their bodies read, queued or running)",
            in_flight.clone(),
        );
        let process_pss = bytes(
            &mut registry,
            "process_pss",
            "Proportional set size of the process (shared pages split among their users)",
        );
        let process_uss = bytes(
            &mut registry,
            "process_uss",
            "Unique set size of the process (pages no other process maps)",
        );
        let weights_pss = bytes(
            &mut registry,
            "weights_mapped_pss",
            "This process's share of the resident pages of the shared weight mappings",
        );
        let weights = bytes(&mut registry, "weights", "Bytes of weights the models use");
        ActorMetrics {
            batches,
            failed,
            rows,
            executions,
            seconds,
            in_flight,
            weights,
            process_pss,
            process_uss,
            weights_pss,
            mappings: OnceLock::new(),
            registry,
        }
    }

    pub(super) fn set_models(&self, pipeline: &Pipeline) {
        let shared = || pipeline.models.iter().filter_map(|m| m.shared.as_ref());
        let total: u64 = shared().map(|s| s.manifest.tensors_bytes).sum();
        self.weights.set(total as i64);
        let _ = self
            .mappings
            .set(shared().map(|s| s.mapping_path().to_owned()).collect());
    }

    /// The text format, with the memory gauges read from /proc now.
    pub fn render(&self, in_flight: usize) -> Result<String> {
        self.in_flight.set(in_flight as i64);
        let process = MemoryStats::of_process("self")?;
        self.process_pss.set(process.pss_kib as i64 * 1024);
        self.process_uss.set(process.uss_kib as i64 * 1024);
        if let Some(mappings) = self.mappings.get() {
            let mappings: Vec<&std::path::Path> = mappings.iter().map(PathBuf::as_path).collect();
            let mapped = MemoryStats::of_mappings("self", &mappings)?;
            self.weights_pss.set(mapped.pss_kib as i64 * 1024);
        }
        let mut out = String::new();
        encode_metrics(&mut out, &self.registry)?;
        Ok(out)
    }
}
