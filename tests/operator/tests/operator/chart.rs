//! What the chart renders for the values a platform team sets.

use std::sync::Arc;

use kube_zerocopy_test_env::repo;
use serde_json::json;

use crate::support::{Env, RELEASE};

/// `helm template` of the chart with these `--set` values.
async fn helm_template(env: &Env, values: &[&str]) -> std::process::Output {
    let mut helm = env.cluster.lock().await.helm();
    helm.args(["template", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"));
    for value in values {
        helm.args(["--set", value]);
    }
    helm.output().unwrap()
}

/// The documents `helm template` renders for these `--set` values (it must succeed).
async fn rendered(env: &Env, values: &[&str]) -> Vec<serde_yaml::Value> {
    let out = helm_template(env, values).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// A rendered container's environment, name and value; a value from the downward API reads as
/// one of the right kind.
fn container_env(container: &serde_yaml::Value) -> Vec<(String, String)> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = e["value"].as_str().unwrap_or("from-the-pod").to_owned();
            (name, value)
        })
        .collect()
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
            let watched = format!("watchNamespace={WATCHED}");
            rendered(&env, &[&watched, "nodeStore.enabled=true", extra]).await
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

/// The chart's contract with its binaries: the operator's and the node agent's containers set
/// only variables their binaries read (the logging ones apart), each with a value the
/// binary's own parser takes, and the values the chart was given arrive as set.
pub async fn the_charts_containers_set_only_what_their_binaries_read(env: Arc<Env>) {
    use kube_zerocopy_contract::pod::{from_env, variables};
    use kube_zerocopy_contract::settings::{NodeAgent, Operator};
    let docs = rendered(
        &env,
        &[
            "watchNamespace=pipelines",
            "nodeStore.enabled=true",
            "nodeStore.sourceNetworks=10.20.0.0/16",
            "nodeStore.fileSources=/var/models",
            "pipelinePolicy.allowHostPath=true",
        ],
    )
    .await;
    let container = |kind: &str, name: &str| -> Vec<(String, String)> {
        let workload = docs
            .iter()
            .find(|d| {
                d["kind"] == kind
                    && d["spec"]["template"]["spec"]["containers"]
                        .as_sequence()
                        .is_some_and(|c| c.iter().any(|c| c["name"] == name))
            })
            .unwrap_or_else(|| panic!("no {kind} with a container {name}"));
        let containers = workload["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        container_env(containers.iter().find(|c| c["name"] == name).unwrap())
    };
    let read_elsewhere = ["RUST_LOG", "KZC_LOG_FORMAT"];
    let unread = |env: &[(String, String)], read: Vec<String>| -> Vec<String> {
        env.iter()
            .map(|(k, _)| k.clone())
            .filter(|k| !read.contains(k) && !read_elsewhere.contains(&k.as_str()))
            .collect()
    };

    let operator_env = container("Deployment", "operator");
    let operator: Operator = from_env(&operator_env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        unread(&operator_env, variables::<Operator>()),
        Vec::<String>::new()
    );
    assert_eq!(operator.namespace.as_deref(), Some("pipelines"));
    assert!(operator.policy.allow_host_path);
    assert!(!operator.policy.allow_service_account);
    assert!(operator.policy.node_sharing);

    let agent_env = container("DaemonSet", "agent");
    let agent: NodeAgent = from_env(&agent_env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        unread(&agent_env, variables::<NodeAgent>()),
        Vec::<String>::new()
    );
    assert_eq!(agent.source_networks, "10.20.0.0/16");
    assert_eq!(
        agent.file_sources.as_deref(),
        Some(std::path::Path::new("/var/models"))
    );
    assert_eq!(agent.namespace_share_percent, 50);
}

/// The chart's default install runs no node agent (it is privileged and reserves memory on
/// every node): no DaemonSet, CSIDriver or agent account, and the operator is told so (it
/// refuses Node-sharing pipelines). Enabled, the agent tolerates GPU nodes' taint, not every
/// taint.
pub async fn the_default_install_runs_no_node_agent(env: Arc<Env>) {
    use kube_zerocopy_contract::pod::from_env;
    use kube_zerocopy_contract::settings::Operator;
    let defaults = rendered(&env, &[]).await;
    let kinds: Vec<&str> = defaults.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["DaemonSet", "CSIDriver"] {
        assert!(
            !kinds.contains(&kind),
            "the default install has a {kind}: {kinds:?}"
        );
    }
    let operator = defaults
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the operator's Deployment");
    let settings: Operator = from_env(&container_env(
        &operator["spec"]["template"]["spec"]["containers"][0],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!settings.policy.node_sharing);

    let enabled = rendered(&env, &["nodeStore.enabled=true"]).await;
    let agent = enabled
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the node agent's DaemonSet");
    let tolerations = agent["spec"]["template"]["spec"]["tolerations"]
        .as_sequence()
        .unwrap();
    assert!(
        tolerations
            .iter()
            .all(|t| t["key"].as_str().is_some_and(|k| !k.is_empty())),
        "the agent tolerates every taint: {tolerations:?}"
    );
}

/// Node pools of different sizes get an agent each: its own DaemonSet on its pool's nodes,
/// with its pool's store capacity (the agent's memory follows it) and tolerations, the
/// others' defaults; pools that could share a node, and names that cannot name objects, are
/// refused.
pub async fn node_pools_get_an_agent_each_with_their_capacity(env: Arc<Env>) {
    let pools = [
        "nodeStore.enabled=true",
        "nodeStore.nodeSelector.kubernetes\\.io/os=linux",
        "nodeStore.pools[0].name=small",
        "nodeStore.pools[0].nodeSelector.pool=small",
        "nodeStore.pools[0].capacityMiB=1024",
        "nodeStore.pools[1].name=large",
        "nodeStore.pools[1].nodeSelector.pool=large",
        "nodeStore.pools[1].tolerations=null",
    ];
    let agents: Vec<serde_yaml::Value> = rendered(&env, &pools)
        .await
        .into_iter()
        .filter(|d| d["kind"] == "DaemonSet")
        .collect();
    let of = |name: &str| {
        agents
            .iter()
            .find(|d| d["metadata"]["name"] == format!("{RELEASE}-kube-zerocopy-agent-{name}"))
            .unwrap_or_else(|| panic!("no agent for pool {name}"))
    };
    assert_eq!(agents.len(), 2);
    for (pool, store, memory, tolerated) in [
        ("small", "1024m", "1280Mi", true),
        ("large", "8192m", "8448Mi", false),
    ] {
        let agent = of(pool);
        assert_eq!(
            agent["spec"]["selector"]["matchLabels"]["kube-zerocopy.io/agent-pool"],
            pool
        );
        let spec = &agent["spec"]["template"]["spec"];
        assert_eq!(spec["nodeSelector"]["pool"], pool);
        assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
        let container = &spec["containers"][0];
        let env = container_env(container);
        assert!(
            env.contains(&("KZC_STORE_SIZE".into(), store.into())),
            "{env:?}"
        );
        assert_eq!(container["resources"]["limits"]["memory"], memory);
        assert_eq!(!spec["tolerations"].is_null(), tolerated, "{pool}");
    }
    for (values, refused) in [
        (
            &[
                "nodeStore.enabled=true",
                "nodeStore.pools[0].name=a",
                "nodeStore.pools[1].name=b",
            ][..],
            "pool \"a\" needs a nodeSelector",
        ),
        (
            &["nodeStore.enabled=true", "nodeStore.pools[0].name=Big"][..],
            "\"Big\" is not a name",
        ),
    ] {
        let out = helm_template(&env, values).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(refused),
            "{values:?}: {stderr}"
        );
    }
}

/// `helm upgrade` upgrades the CRDs, which Helm never does for a chart's crds/ folder: a CRD
/// that says something else (as an older release's would) is the chart's again after the
/// upgrade, and it stays marked to be kept by `helm uninstall`.
pub async fn helm_upgrade_upgrades_the_crds(env: Arc<Env>) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};

    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    let name = "inferencepipelines.kube-zerocopy.io";
    // A field's description: the rules of the schema do not depend on it.
    let description = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/models/items/properties/python/description";
    let described = |crd: &CustomResourceDefinition| {
        let crd = serde_json::to_value(crd).unwrap();
        crd.pointer(description)
            .and_then(|d| d.as_str())
            .map(str::to_owned)
    };
    let current = described(&crds.get(name).await.unwrap()).expect("the field is described");
    let older: json_patch::Patch = serde_json::from_value(
        json!([{"op": "replace", "path": description, "value": "an older release's"}]),
    )
    .unwrap();
    crds.patch(name, &PatchParams::default(), &Patch::<()>::Json(older))
        .await
        .unwrap();
    assert_eq!(
        described(&crds.get(name).await.unwrap()).as_deref(),
        Some("an older release's")
    );

    let mut helm = env.cluster.lock().await.helm();
    let out = helm
        .args(["upgrade", RELEASE])
        .arg(repo().join("charts/kube-zerocopy"))
        .args(["--namespace", crate::support::OPERATOR_NS])
        .args(["--reuse-values", "--wait=false"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upgraded = crds.get(name).await.unwrap();
    assert_eq!(
        described(&upgraded),
        Some(current),
        "helm upgrade left the CRD as it was"
    );
    let annotations = upgraded.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("helm.sh/resource-policy")
            .map(String::as_str),
        Some("keep")
    );
}

/// Monitoring is opt-in: the default install has no monitor, rule or dashboard; asked for, the
/// chart renders the operator's ServiceMonitor, the agents' and actors' PodMonitors (the
/// pipeline's name kept as `pipeline`), the alert rules and the dashboard as a ConfigMap the
/// Grafana sidecar loads, and a headless Service of the agents' metrics.
pub async fn monitoring_is_opt_in_and_complete_when_asked(env: Arc<Env>) {
    let kinds = |documents: &[serde_yaml::Value]| -> Vec<(String, String)> {
        documents
            .iter()
            .map(|d| {
                let field = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
                (field(&d["kind"]), field(&d["metadata"]["name"]))
            })
            .collect()
    };
    let defaults = kinds(&rendered(&env, &["nodeStore.enabled=true"]).await);
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(!defaults.iter().any(|(k, _)| k == kind), "{defaults:?}");
    }
    assert!(!defaults.iter().any(|(_, n)| n.ends_with("-dashboard")));

    let documents = rendered(
        &env,
        &[
            "nodeStore.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prometheus",
            "metrics.prometheusRule.enabled=true",
            "metrics.grafanaDashboard.enabled=true",
        ],
    )
    .await;
    let asked = kinds(&documents);
    for (kind, name) in [
        ("ServiceMonitor", "kzc-kube-zerocopy-operator"),
        ("PodMonitor", "kzc-kube-zerocopy-node-agent"),
        ("PodMonitor", "kzc-kube-zerocopy-actors"),
        ("PrometheusRule", "kzc-kube-zerocopy"),
        ("ConfigMap", "kzc-kube-zerocopy-dashboard"),
        ("Service", "kzc-kube-zerocopy-agent-metrics"),
    ] {
        assert!(
            asked.contains(&(kind.to_owned(), name.to_owned())),
            "no {kind} {name} in {asked:?}"
        );
    }
    let find = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap()
    };
    let operator = find("ServiceMonitor", "kzc-kube-zerocopy-operator");
    assert_eq!(operator["metadata"]["labels"]["release"], "prometheus");
    let actors = find("PodMonitor", "kzc-kube-zerocopy-actors");
    let endpoint = &actors["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "pipeline");
    let rules = find("PrometheusRule", "kzc-kube-zerocopy");
    let groups = rules["spec"]["groups"].as_sequence().unwrap();
    assert!(groups.len() >= 4, "{groups:?}");
    let dashboard = find("ConfigMap", "kzc-kube-zerocopy-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["kube-zerocopy.json"].as_str().unwrap()).unwrap();
    assert!(json["panels"].as_array().unwrap().len() >= 10);
    let service = find("Service", "kzc-kube-zerocopy-agent-metrics");
    assert_eq!(service["spec"]["clusterIP"], "None");
}
