//! kwok, which plays the kubelet of fake Nodes: pods there are scheduled, go Running and (Job
//! pods) Succeeded, and no container runs. The control plane built here starts it, and so does
//! [`super::existing::ExistingCluster`] beside a cluster of someone else's.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::json;

use super::flag;

/// The annotation that makes kwok manage a Node.
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// The fake pods' IPs (kwok hands them out; nothing routes to them).
pub const POD_CIDR: &str = "10.244.0.0/16";

/// The fake Nodes' names: kwok-node-0, kwok-node-1, ...
pub fn node_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("kwok-node-{i}")).collect()
}

/// kwok on `kubeconfig`'s cluster, managing only the Nodes annotated as its own, serving its
/// health on 127.0.0.1:`port`; `home` replaces ~ (kwok also reads ~/.kwok/kwok.yaml).
pub fn command(bin: &Path, kubeconfig: &Path, stages: &Path, port: u16, home: &Path) -> Command {
    let mut cmd = Command::new(bin.join("kwok"));
    cmd.arg(flag("kubeconfig", kubeconfig))
        .arg(flag("config", stages))
        .arg("--manage-all-nodes=false")
        .arg(format!(
            "--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake"
        ))
        .arg(format!("--server-address=127.0.0.1:{port}"))
        .arg("--node-ip=127.0.0.1")
        .arg(format!("--cidr={POD_CIDR}"))
        .arg("--node-lease-duration-seconds=40")
        .env("HOME", home);
    cmd
}

/// Creates the fake Nodes, each with room for any scenario's pods (one of the name there
/// already is kept).
pub async fn create_nodes(client: &Client, names: &[String]) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in names {
        let resources = json!({ "cpu": "32", "memory": "256Gi", "pods": "110" });
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {
                    KWOK_ANNOTATION: "fake",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node-role.kubernetes.io/agent": "",
                },
            },
            "spec": {},
            "status": {
                "allocatable": resources,
                "capacity": resources,
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                    "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
                    "osImage": "", "systemUUID": "",
                },
            },
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            // Left by an earlier run on a cluster of someone else's: kwok takes it over.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            created => {
                created.with_context(|| format!("creating Node {name}"))?;
            }
        }
    }
    Ok(())
}

/// Whether every one of the fake Nodes is Ready (kwok renews their status).
pub async fn nodes_ready(client: &Client, names: &[String]) -> Result<bool> {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in names {
        if !node_ready(&nodes.get(name).await?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a Node says it is Ready.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether kwok plays this Node's kubelet.
pub fn is_fake(node: &Node) -> bool {
    node.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.get(KWOK_ANNOTATION).is_some_and(|v| v == "fake"))
}
