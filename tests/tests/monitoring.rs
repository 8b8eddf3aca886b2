//! The chart's alerts and Grafana dashboard name only metrics that the binaries export: a
//! renamed metric would leave an alert that never fires and a panel that stays empty.

use std::collections::BTreeSet;
use std::time::Duration;

use kube_zerocopy_e2e::repo;

/// The names a Prometheus text page lets a query use: each family of a `# TYPE` line, with
/// the suffixes its samples carry (counters `_total`; histograms `_bucket`, `_sum`, `_count`).
fn queryable(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    names
}

/// Every `kube_zerocopy_*` name in `text`.
fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kube_zerocopy_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        // "kube_zerocopy_*" in prose names no metric.
        if name.len() > "kube_zerocopy_".len() {
            names.insert(name);
        }
    }
    names
}

#[test]
fn the_charts_alerts_and_dashboard_name_only_exported_metrics() {
    // A family of labelled series shows in the page only once it has one: each gets one.
    let operator = kube_zerocopy::metrics::Metrics::default();
    let failed = kube_zerocopy::metrics::ErrorLabels {
        step: "apply",
        needs_a_person: false,
    };
    operator.reconciled(Duration::from_millis(5), Some(failed));
    let store = tempfile::tempdir().unwrap();
    let agent = kube_zerocopy_agent::metrics::Metrics::new(store.path().to_owned());
    agent.published(Duration::from_millis(5), true);
    let pages = [
        operator.render(),
        agent.render(),
        kube_zerocopy_worker::actor::metrics::ActorMetrics::new()
            .render(0)
            .unwrap(),
    ];
    let exported: BTreeSet<String> = pages.iter().flat_map(|p| queryable(p)).collect();
    // The three components' families, so that an empty page cannot pass.
    for family in [
        "kube_zerocopy_reconciles_total",
        "kube_zerocopy_agent_publish_seconds_bucket",
        "kube_zerocopy_worker_batches_total",
    ] {
        assert!(exported.contains(family), "{family} in {exported:?}");
    }
    let monitoring = repo().join("charts/kube-zerocopy/files/monitoring");
    for file in ["alerts.yaml", "dashboard.json"] {
        let text = std::fs::read_to_string(monitoring.join(file)).unwrap();
        let named = named_in(&text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics no binary exports: {unknown:?}"
        );
    }
}
