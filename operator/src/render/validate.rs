//! What a pipeline may not ask for, checked before anything is built: the operator's policy,
//! the worker's resources, file:// paths the pods cannot see, models of unknown size (Pod
//! sharing), Node sharing's one Secret, Kueue's label on an Actor.

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::ResourceRequirements;

use super::Settings;
use crate::crd::{InferencePipeline, InferencePipelineSpec, Mode, Sharing};
use crate::policy::{self};
use crate::quantity;

/// The worker's resources must be quantities: the API server does not check them inside a
/// pipeline, and would refuse the Job with an internal error.
pub(super) fn check_resources(resources: Option<&ResourceRequirements>) -> Result<()> {
    let Some(r) = resources else { return Ok(()) };
    for (kind, list) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, value) in list.iter().flatten() {
            if !quantity::is_quantity(&value.0) {
                bail!(
                    "template.resources.{kind}.{name}: {:?} is not a quantity (such as 500m, 2 or 4Gi)",
                    value.0
                );
            }
        }
    }
    Ok(())
}

/// Every `file://` path the pods read or write lies where they can see it: the output on a
/// volume the template mounts (the containers' own files are read-only, and gone with the pod);
/// the models the weight server reads (Pod sharing; with Node sharing the node agent reads
/// them from its own `nodeStore.fileSources`) and the input on such a volume too, or in the
/// pipeline's own image (`template.image`), which may hold them. Elsewhere the pods would
/// start and fail on a path that is not there.
pub(super) fn check_file_paths_are_seen(spec: &InferencePipelineSpec) -> Result<()> {
    let template = spec.template.as_ref();
    let mounts: Vec<&str> = template
        .iter()
        .flat_map(|t| t.volume_mounts.iter().flatten())
        .map(|m| m.mount_path.as_str())
        .collect();
    let own_image = template.is_some_and(|t| t.image.is_some());
    let models = spec
        .models
        .iter()
        .enumerate()
        .filter(|_| spec.sharing == Sharing::Pod)
        .map(|(i, m)| {
            (
                format!("spec.models[{i}].source.uri"),
                &m.source.uri,
                own_image,
            )
        });
    let data = [
        ("input", &spec.input, own_image),
        ("output", &spec.output, false),
    ]
    .into_iter()
    .filter_map(|(field, data, in_image)| {
        Some((format!("spec.{field}.uri"), &data.as_ref()?.uri, in_image))
    });
    for (field, uri, in_image) in models.chain(data) {
        let Some(path) = uri.strip_prefix("file://") else {
            continue;
        };
        let on = |mount: &&str| {
            let mount = mount.trim_end_matches('/');
            path == mount || path.starts_with(&format!("{mount}/"))
        };
        if in_image || mounts.iter().any(on) {
            continue;
        }
        let folder = std::path::Path::new(path)
            .parent()
            .map_or("/".into(), |p| p.display().to_string());
        let or_image = if field.ends_with("output.uri") {
            ""
        } else {
            ", or build it into your own template.image"
        };
        bail!(
            "{field} {uri}: no volume of the template is mounted there, so the pods would not \
             find it: add the volume that holds it to template.volumes and mount it at {folder} \
             (or a folder above) in template.volumeMounts{or_image}"
        );
    }
    Ok(())
}

/// With Pod sharing each pod holds its own copy of the weights: the models' sizes are what the
/// weight server's memory is requested by and the pod's store limited to, and what the
/// scheduler places the pod by. A pipeline without them would run pods sized for nothing.
pub(super) fn check_sizes_are_given(spec: &InferencePipelineSpec) -> Result<()> {
    if spec.sharing != Sharing::Pod {
        return Ok(());
    }
    let without_size = spec.models.iter().position(|m| m.source.size.is_none());
    if let Some(i) = without_size {
        bail!(
            "spec.models[{i}].source.size is missing: with sharing: Pod it sizes each pod's \
             memory for the weights (the weight server's request and the store's limit), which \
             the scheduler places the pod by; give the model file's size or a little more \
             (e.g. 400Mi), or use sharing: Node (the node agent's store holds the weights)"
        );
    }
    Ok(())
}

/// Why a pipeline cannot become objects. [`Error::Refused`] is the operator's policy speaking;
/// every other check says the pipeline is invalid.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error(transparent)]
    Refused(#[from] policy::Refusal),
    #[error(transparent)]
    Invalid(#[from] anyhow::Error),
}

/// Refuses what a pipeline may not ask for, before anything is built: what the operator's
/// policy forbids, resources that are not quantities, Node sharing with more than one
/// credentials Secret, an Actor queued with Kueue.
pub fn validate(pipeline: &InferencePipeline, settings: &Settings) -> Result<(), Error> {
    let spec = &pipeline.spec;
    policy::check(spec, &settings.policy)?;
    check_resources(spec.template.as_ref().and_then(|t| t.resources.as_ref()))?;
    check_file_paths_are_seen(spec)?;
    check_sizes_are_given(spec)?;
    if spec.sharing == Sharing::Node {
        spec.volume_secret()?;
    }
    if let (Mode::Actor, Some(queue)) = (spec.mode, crate::queue::queue_name(pipeline)) {
        return Err(anyhow::anyhow!(
            "the label {}={queue} queues a Task pipeline's Job with Kueue; an Actor \
             pipeline's replicas are not queued: remove the label, or use spec.suspend",
            crate::queue::QUEUE_LABEL
        )
        .into());
    }
    Ok(())
}
