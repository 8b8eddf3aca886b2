//! The scenarios on a cluster named by a kubeconfig, as a team runs them on kind or k3d: this
//! binary runs itself again with `KZC_TEST_KUBECONFIG` naming a second control plane (one
//! with no Nodes of kwok's, standing in for someone else's cluster).

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_zerocopy::crd::{InferencePipeline, Phase};
use kube_zerocopy_test_env::cluster::existing::KUBECONFIG_ENV;
use kube_zerocopy_test_env::cluster::kwok::KWOK_ANNOTATION;
use kube_zerocopy_test_env::cluster::{ControlPlane, Options};
use kube_zerocopy_test_env::wait::eventually;
use serde_json::json;

use crate::support::{Env, MINUTE};

/// The scenario run there: a Task pipeline through kwok's Nodes to Succeeded.
const SCENARIO: &str = "task_a_task_pipeline_succeeds_with_one_event_per_phase";

/// On a cluster whose own Node would take the scenarios' pods, nothing runs and the error
/// says to cordon it; once cordoned, the scenario passes there, on kwok's Nodes.
pub async fn the_scenarios_run_on_a_cluster_named_by_a_kubeconfig(_env: Arc<Env>) {
    let cluster = ControlPlane::start_with(Options {
        nodes: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = cluster.client().await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    // Ready, as its kubelet would say, its heartbeat renewed while the refusal is tried: the
    // node controller taints a Node whose heartbeat is some 50 s old, and a tainted Node
    // takes no pods (the harness would then have nothing to refuse).
    let ready = |heartbeat: String| {
        json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": heartbeat, "lastTransitionTime": heartbeat,
        }]}})
    };
    let now = || k8s_openapi::jiff::Timestamp::now().to_string();
    let mut own_node = ready(now());
    own_node["metadata"] = json!({"name": "someone-elses-node"});
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(own_node).unwrap(),
        )
        .await
        .unwrap();
    let kubelet = tokio::spawn({
        let nodes = nodes.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let beat = Patch::Merge(ready(now()));
                let params = PatchParams::default();
                let _ = nodes
                    .patch_status("someone-elses-node", &params, &beat)
                    .await;
            }
        }
    });
    // The API server taints a new Node not-ready until the node controller sees it Ready.
    eventually("someone-elses-node without taints", MINUTE, || async {
        let node = nodes.get("someone-elses-node").await.unwrap();
        node.spec?.taints.is_none_or(|t| t.is_empty()).then_some(())
    })
    .await;
    let (passed, said) = run_here(&cluster).await;
    kubelet.abort();
    assert!(!passed, "{said}");
    assert!(
        said.contains("cordon them first (kubectl cordon someone-elses-node)"),
        "{said}"
    );

    let cordon = json!({"spec": {"unschedulable": true}});
    nodes
        .patch(
            "someone-elses-node",
            &PatchParams::default(),
            &Patch::Merge(&cordon),
        )
        .await
        .unwrap();
    let (passed, said) = run_here(&cluster).await;
    assert!(passed, "{said}");
    assert!(said.contains("operator scenarios: 1 passed"), "{said}");
    // It ran there: kwok's Nodes joined that cluster, and its pipeline succeeded on them.
    for name in ["kwok-node-0", "kwok-node-1"] {
        let node = nodes.get(name).await.unwrap();
        assert_eq!(node.metadata.annotations.unwrap()[KWOK_ANNOTATION], "fake");
    }
    let pipelines: Api<InferencePipeline> = Api::namespaced(admin, "task");
    let batch = pipelines.get("batch").await.unwrap();
    assert_eq!(batch.status.unwrap().phase, Some(Phase::Succeeded));
}

/// This binary, on `cluster` through its kubeconfig, running the one scenario: whether it
/// passed, and what it wrote.
async fn run_here(cluster: &ControlPlane) -> (bool, String) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env(KUBECONFIG_ENV, cluster.kubeconfig_path())
        .args([SCENARIO, "--exact"]);
    let out: Output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let said = [out.stdout, out.stderr].concat();
    (
        out.status.success(),
        String::from_utf8_lossy(&said).into_owned(),
    )
}
