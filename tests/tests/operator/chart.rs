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

/// With watchNamespace set, the operator's rights are a Role in that namespace (and the
/// leader lease's in its own): nothing cluster-wide. The node agent has no API access at all.
pub async fn a_watched_namespace_gives_the_operator_no_cluster_wide_rights(env: Arc<Env>) {
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
    let kinds = |kind: &str| -> Vec<serde_yaml::Value> {
        docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    assert!(
        kinds("ClusterRole").is_empty(),
        "a ClusterRole: {:?}",
        kinds("ClusterRole")
    );
    assert!(kinds("ClusterRoleBinding").is_empty());
    let pipelines_role = kinds("Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == format!("{RELEASE}-kube-zerocopy").as_str())
        .expect("the operator's Role");
    assert_eq!(pipelines_role["metadata"]["namespace"], WATCHED);
    let agent = kinds("DaemonSet")
        .pop()
        .expect("the node agent's DaemonSet");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        serde_json::to_value(&kinds("CSIDriver")[0]["spec"]).unwrap(),
        json!({"attachRequired": false, "podInfoOnMount": true,
               "volumeLifecycleModes": ["Ephemeral"], "fsGroupPolicy": "None"})
    );
}
