//! The node agents' reports and what the scheduler makes of them. An agent writes its node's
//! NodeStore and labels its node with the models it holds, with its pod's own token; the
//! chart's RBAC and admission policy allow it exactly that and nothing of another node. The
//! operator's pods prefer the nodes whose labels say they hold their models.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_zerocopy::crd::{InferencePipeline, Sharing};
use kube_zerocopy::node_store::{held_label, NodeStore};
use kube_zerocopy_test_env::wait::eventually;
use serde_json::{json, Value};

use crate::support::{actor_pipeline, token_kubeconfig, Env, MINUTE, OPERATOR_NS, RELEASE};

/// The agent pod the DaemonSet runs on `node`.
async fn agent_pod(env: &Env, node: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), OPERATOR_NS);
    let params = ListParams::default()
        .labels("app.kubernetes.io/component=node-agent")
        .fields(&format!("spec.nodeName={node}"));
    eventually(&format!("the agent pod on {node}"), MINUTE, || async {
        pods.list(&params).await.ok()?.items.into_iter().next()
    })
    .await
}

/// A client with the token the agent's pod on `node` gets.
async fn agent_client(env: &Env, node: &str) -> Client {
    let pod = agent_pod(env, node).await;
    let config = {
        let cluster = env.cluster.lock().await;
        token_kubeconfig(
            &cluster,
            &env.admin,
            &format!("{RELEASE}-kube-zerocopy-agent"),
            Some(&pod),
        )
        .await
    };
    let kubeconfig: Kubeconfig = serde_json::from_value(config).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The store report the agent writes (server-side apply, as the agent does).
async fn apply_store(stores: &Api<NodeStore>, node: &str) -> Result<(), kube::Error> {
    let params = PatchParams::apply("kube-zerocopy-agent").force();
    let object = json!({
        "apiVersion": "kube-zerocopy.io/v1alpha1", "kind": "NodeStore",
        "metadata": {"name": node}, "spec": {},
    });
    stores.patch(node, &params, &Patch::Apply(object)).await?;
    let status = json!({
        "apiVersion": "kube-zerocopy.io/v1alpha1", "kind": "NodeStore",
        "status": {"capacityBytes": 1 << 30, "usedBytes": 0, "usage": "0 B of 1.0 GiB", "pods": 0},
    });
    stores
        .patch_status(node, &params, &Patch::Apply(status))
        .await?;
    Ok(())
}

async fn merge_node(nodes: &Api<Node>, node: &str, patch: Value) -> Result<Node, kube::Error> {
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// The API server's refusal: its code and message.
fn refusal<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub async fn an_agent_writes_only_its_own_nodes_store_and_labels(env: Arc<Env>) {
    let [own, other] = ["kwok-node-0", "kwok-node-1"];
    let agent = agent_client(&env, own).await;
    let (stores, nodes): (Api<NodeStore>, Api<Node>) =
        (Api::all(agent.clone()), Api::all(agent.clone()));
    let held = held_label(&"ab".repeat(32));

    // Its own node: the report and a label of a model held.
    apply_store(&stores, own).await.unwrap();
    let labelled = merge_node(
        &nodes,
        own,
        json!({"metadata": {"labels": {&held: "held"}}}),
    )
    .await
    .unwrap();
    assert_eq!(labelled.metadata.labels.unwrap()[&held], "held");
    merge_node(&nodes, own, json!({"metadata": {"labels": {&held: null}}}))
        .await
        .unwrap();

    // Another node's report or labels: refused by the admission policy, in its words. (The
    // API server enforces a policy a moment after the chart made it: a scenario that runs
    // first may come before.)
    let (code, message) = eventually("the admission policy in force", MINUTE, || async {
        apply_store(&stores, other)
            .await
            .err()
            .map(|e| refusal::<()>(Err(e)))
    })
    .await;
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains("may write only its own node's objects")
            && message.contains(&format!("names node '{own}'")),
        "{message}"
    );
    let (code, message) = refusal(
        merge_node(
            &nodes,
            other,
            json!({"metadata": {"labels": {&held: "held"}}}),
        )
        .await,
    );
    assert_eq!(code, 403, "{message}");
    // Its own node, but anything besides its labels of held models.
    let not_labels = [
        json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
        json!({"metadata": {"annotations": {"example.com/note": "x"}}}),
        json!({"spec": {"unschedulable": true}}),
        // A finalizer keeps the node from being deleted; an owner reference to an object that
        // goes away would have the garbage collector delete the node with it.
        json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
            "name": "gone", "uid": "00000000-0000-0000-0000-000000000001"}]}}),
    ];
    for patch in not_labels {
        let (code, message) = refusal(merge_node(&nodes, own, patch.clone()).await);
        assert_eq!(code, 403, "{patch}: {message}");
        assert!(
            message.contains("may change only its node's labels under models.kube-zerocopy.io/"),
            "{patch}: {message}"
        );
    }
    // RBAC: no deleting, no reading pods or secrets.
    let (code, _) = refusal(stores.delete(own, &Default::default()).await);
    assert_eq!(code, 403);
    let pods: Api<Pod> = Api::all(agent.clone());
    let (code, _) = refusal(pods.list(&ListParams::default()).await);
    assert_eq!(code, 403);

    // What people see: `kubectl get nodestores` reads the report.
    let store = Api::<NodeStore>::all(env.admin.clone())
        .get(own)
        .await
        .unwrap();
    assert_eq!(store.status.unwrap().usage, "0 B of 1.0 GiB");
}

pub async fn node_sharing_pods_prefer_nodes_that_hold_their_models(env: Arc<Env>) {
    let ns = env.namespace("placement").await;
    let nodes: Api<Node> = Api::all(env.admin.clone());
    let pods: Api<Pod> = env.api(&ns);
    // Three models, held by node 0, node 1 and node 0 (as their agents label them): each
    // pipeline's one replica goes where its model is (by chance with 2 nodes: 1 in 8).
    let placements = [
        ("a", "kwok-node-0"),
        ("b", "kwok-node-1"),
        ("c", "kwok-node-0"),
    ];
    for (i, (name, node)) in placements.iter().enumerate() {
        let digest = format!("{i}").repeat(64);
        merge_node(
            &nodes,
            node,
            json!({"metadata": {"labels": {held_label(&digest): "held"}}}),
        )
        .await
        .unwrap();
        let mut pipeline = actor_pipeline(name, &ns, 1, "http://models.internal/m.safetensors");
        pipeline.spec.sharing = Sharing::Node;
        pipeline.spec.models[0].source.sha256 = Some(digest);
        env.api::<InferencePipeline>(&ns)
            .create(&Default::default(), &pipeline)
            .await
            .unwrap();
    }
    for (name, node) in placements {
        let selector = format!("kube-zerocopy.io/pipeline={name}");
        let on = eventually(&format!("{name}'s pod scheduled"), MINUTE, || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            list.items.first()?.spec.as_ref()?.node_name.clone()
        })
        .await;
        assert_eq!(on, node, "pipeline {name}'s replica");
    }
    for (i, (_, node)) in placements.iter().enumerate() {
        let digest = format!("{i}").repeat(64);
        merge_node(
            &nodes,
            node,
            json!({"metadata": {"labels": {held_label(&digest): null}}}),
        )
        .await
        .unwrap();
    }
}
