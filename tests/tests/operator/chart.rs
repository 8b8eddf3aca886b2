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
/// leader lease's in its own): nothing cluster-wide. The node agents' report is their only
/// cluster-wide right; without it they have no API access at all.
pub async fn a_watched_namespace_gives_the_operator_no_cluster_wide_rights(env: Arc<Env>) {
    const WATCHED: &str = "pipelines";
    let render = |extra: &'static str| {
        let env = env.clone();
        async move {
            let out = helm_template(&env, &[&format!("watchNamespace={WATCHED}"), extra]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_yaml::Deserializer::from_slice(&out.stdout)
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .collect::<Vec<serde_yaml::Value>>()
        }
    };
    let kinds = |docs: &[serde_yaml::Value], kind: &str| -> Vec<serde_yaml::Value> {
        docs.iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    let agent_account = format!("{RELEASE}-kube-zerocopy-agent");

    // The operator's rights are a Role in the watched namespace. The only cluster-wide ones
    // are the node agents' report (their nodes' NodeStores and labels), bound to the agents'
    // ServiceAccount alone.
    let docs = render("nodeStore.report=true").await;
    let pipelines_role = kinds(&docs, "Role")
        .into_iter()
        .find(|r| r["metadata"]["name"] == format!("{RELEASE}-kube-zerocopy").as_str())
        .expect("the operator's Role");
    assert_eq!(pipelines_role["metadata"]["namespace"], WATCHED);
    for role in kinds(&docs, "ClusterRole") {
        assert_eq!(role["metadata"]["name"], agent_account.as_str(), "{role:?}");
        let rules = serde_json::to_value(&role["rules"]).unwrap();
        assert_eq!(
            rules,
            json!([
                {"apiGroups": ["kube-zerocopy.io"], "resources": ["nodestores"], "verbs": ["create", "patch"]},
                {"apiGroups": ["kube-zerocopy.io"], "resources": ["nodestores/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
            ])
        );
    }
    for binding in kinds(&docs, "ClusterRoleBinding") {
        let subjects = serde_json::to_value(&binding["subjects"]).unwrap();
        assert_eq!(subjects.as_array().unwrap().len(), 1, "{subjects}");
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], agent_account.as_str());
    }
    let agent = kinds(&docs, "DaemonSet")
        .pop()
        .expect("the node agent's DaemonSet");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], agent_account.as_str());
    // Admission policies only narrow rights: the agents' to their own node, the operator's
    // writes to batch drivers' RBAC objects and away from the system namespaces.
    let policies = |docs: &[serde_yaml::Value]| -> Vec<String> {
        let mut names: Vec<String> = kinds(docs, "ValidatingAdmissionPolicyBinding")
            .iter()
            .map(|b| b["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        policies(&docs),
        [
            format!("{RELEASE}-kube-zerocopy-agent-own-node"),
            format!("{RELEASE}-kube-zerocopy-operator-writes")
        ]
    );
    assert_eq!(
        serde_json::to_value(&kinds(&docs, "CSIDriver")[0]["spec"]).unwrap(),
        json!({"attachRequired": false, "podInfoOnMount": true,
               "volumeLifecycleModes": ["Ephemeral"], "fsGroupPolicy": "None"})
    );

    // Without the report: nothing cluster-wide, and the agent's pods carry no token.
    let docs = render("nodeStore.report=false").await;
    assert!(
        kinds(&docs, "ClusterRole").is_empty(),
        "a ClusterRole: {:?}",
        kinds(&docs, "ClusterRole")
    );
    assert!(kinds(&docs, "ClusterRoleBinding").is_empty());
    assert_eq!(
        policies(&docs),
        [format!("{RELEASE}-kube-zerocopy-operator-writes")]
    );
    let agent = kinds(&docs, "DaemonSet").pop().unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
}
