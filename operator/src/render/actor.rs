//! An Actor pipeline's replicas: a Deployment, the Service in front of it, and the
//! NetworkPolicy that admits only the pods of its namespace.

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{batch_run, metadata, selector_labels, Rendered, Settings};
use crate::crd::InferencePipeline;
use kube_zerocopy_contract::names;

/// An Actor pipeline's objects with `template` for its replicas' pods.
pub(super) fn objects(
    pipeline: &InferencePipeline,
    settings: &Settings,
    template: PodTemplateSpec,
) -> Result<Rendered> {
    let actor = pipeline
        .spec
        .actor
        .clone()
        .context("mode Actor needs spec.actor")?;
    let deployment = Deployment {
        metadata: metadata(pipeline),
        spec: Some(DeploymentSpec {
            replicas: Some(actor.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(pipeline)),
                ..Default::default()
            },
            template,
            ..Default::default()
        }),
        status: None,
    };
    // The replicas only: a batch run's driver carries the pipeline's label too.
    let mut selector = selector_labels(pipeline);
    selector.insert(names::COMPONENT_LABEL.into(), "actor".into());
    let service = Service {
        metadata: metadata(pipeline),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    // The replicas answer anyone who reaches them: only the pods of the pipeline's namespace
    // may (its driver among them). Policies add up: another NetworkPolicy admits more (an
    // ingress gateway, a monitoring namespace).
    let network_policy = NetworkPolicy {
        metadata: metadata(pipeline),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(LabelSelector::default()),
                    ..Default::default()
                }]),
                ports: None,
            }]),
            ..Default::default()
        }),
    };
    let run = crate::batch_run::is_batch(pipeline)
        .then(|| batch_run(pipeline, settings))
        .transpose()?;
    Ok(Rendered::Actor {
        deployment: Box::new(deployment),
        service: Box::new(service),
        network_policy: Box::new(network_policy),
        run: run.map(Box::new),
    })
}
