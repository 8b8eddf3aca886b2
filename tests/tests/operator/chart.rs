//! What the chart renders for the values a platform team sets.

use std::sync::Arc;

use kube_zerocopy_e2e::repo;
use serde_json::json;

use crate::support::{Env, RELEASE};

/// `helm template` of the chart with these `--set` values.
async fn helm_template(env: &Env, values: &[&str]) -> std::process::Output {
    let mut helm = env.cp.lock().await.helm();
    helm.args(["template", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"));
    for value in values {
        helm.args(["--set", value]);
    }
    helm.output().unwrap()
}

/// Two operator replicas without leader election would race: the chart refuses to render.
pub async fn two_replicas_without_leader_election_are_refused(env: Arc<Env>) {
    let out = helm_template(&env, &["replicas=2", "leaderElection.enabled=false"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("replicas > 1 needs leaderElection.enabled=true"),
        "helm template with 2 replicas and no leader election: {stderr}"
    );
}

/// With watchNamespace set, the operator may list and watch that one namespace and no other
/// (namespaces are cluster-scoped: a ClusterRole, limited by name).
pub async fn a_watched_namespace_limits_the_namespace_rbac_to_it(env: Arc<Env>) {
    const WATCHED: &str = "pipelines";
    let out = helm_template(&env, &[&format!("watchNamespace={WATCHED}")]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let named = |kind: &str| {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"]
                        == format!("{RELEASE}-kube-zerocopy-namespaces").as_str()
            })
            .unwrap_or_else(|| panic!("no {kind} for namespaces"))
            .clone()
    };
    let role = named("ClusterRole");
    let rules: Vec<serde_json::Value> =
        serde_json::from_value(serde_json::to_value(&role["rules"]).unwrap()).unwrap();
    assert_eq!(
        rules,
        [
            json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"], "resourceNames": [WATCHED]})
        ]
    );
    named("ClusterRoleBinding");
}
