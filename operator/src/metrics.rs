//! Prometheus metrics and the health endpoints of the operator (/metrics, /livez, /readyz).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A failed reconcile's labels: the step that failed, and whether a person must act.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub step: &'static str,
    pub needs_a_person: bool,
}

/// A reconcile's outcome: "success" or "error".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram>,
    /// 1 while this replica holds the leader lease and its controller runs.
    pub leader: Gauge,
    /// Set once the controller runs (its caches synced) or the replica stands by for the
    /// leader lease: /readyz answers 503 until then.
    ready: AtomicBool,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 12))) as fn() -> Histogram,
        );
        let leader = Gauge::default();
        let mut registry = Registry::with_prefix("kube_zerocopy");
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by the step that failed",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconciliation, by outcome",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads and reconciles, 0 while it stands by",
            leader.clone(),
        );
        Metrics {
            reconciles,
            errors,
            duration,
            leader,
            ready: AtomicBool::new(false),
            registry,
        }
    }
}

impl Metrics {
    /// Counts one reconcile that took `took` and failed as `error` says, if it did.
    pub fn reconciled(&self, took: Duration, error: Option<ErrorLabels>) {
        self.reconciles.inc();
        let outcome = match error {
            None => "success",
            Some(labels) => {
                self.errors.get_or_create(&labels).inc();
                "error"
            }
        };
        self.duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode to a string");
        out
    }
}

/// Serves /metrics, /livez and /readyz on `listen` from a thread of its own. /livez answers
/// as long as the process serves; /readyz once the controller runs or stands by.
pub fn serve(listen: &str, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    kube_zerocopy_runtime::process::serve_endpoints(listen, move |path| match path {
        "/metrics" => (200, metrics.render()),
        "/livez" => (200, "ok".into()),
        "/readyz" if metrics.is_ready() => (200, "ok".into()),
        "/readyz" => (503, "starting".into()),
        _ => (404, "not found".into()),
    })
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn readyz_fails_until_the_controller_runs() {
        let metrics = std::sync::Arc::new(super::Metrics::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap().to_string();
        drop(listener);
        super::serve(&listen, metrics.clone()).unwrap();
        let status = |path: &str| match ureq::get(format!("http://{listen}{path}")).call() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(code)) => code,
            Err(e) => panic!("{path}: {e}"),
        };
        assert_eq!(status("/livez"), 200);
        assert_eq!(status("/readyz"), 503);
        metrics.set_ready();
        assert_eq!(status("/readyz"), 200);
        assert_eq!(status("/nothing"), 404);
    }

    #[test]
    fn counts_show_up_in_the_text_format() {
        let m = super::Metrics::default();
        m.reconciled(std::time::Duration::from_millis(20), None);
        let failed = || super::ErrorLabels {
            step: "patch_status",
            needs_a_person: true,
        };
        m.reconciled(std::time::Duration::from_millis(40), Some(failed()));
        m.reconciled(std::time::Duration::from_millis(40), Some(failed()));
        let text = m.render();
        for line in [
            "kube_zerocopy_reconciles_total 3",
            r#"kube_zerocopy_reconcile_errors_total{step="patch_status",needs_a_person="true"} 2"#,
            r#"kube_zerocopy_reconcile_duration_seconds_count{outcome="success"} 1"#,
            r#"kube_zerocopy_reconcile_duration_seconds_count{outcome="error"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
