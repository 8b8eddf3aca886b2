//! What a pipeline may not ask for, checked before anything is built: the operator's policy,
//! the worker's resources, file:// paths the pods cannot see, models of unknown size (Pod
//! sharing), Node sharing's one Secret, Kueue's label on an Actor.

use anyhow::{bail, Result};
use k8s_openapi::api::core::v1::{ResourceRequirements, VolumeMount};

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
/// volume the template mounts writable (the containers' own files are read-only, and gone with
/// the pod); the models the weight server reads (Pod sharing; with Node sharing the node agent
/// reads them from its own `nodeStore.fileSources`) and a Task's input on such a volume too, or
/// in the pipeline's own image (`template.image`), which may hold them. A batch run's input is
/// read by its driver, which runs the operator's image: on a volume only. Elsewhere the pods
/// would start and fail on a path that is not there.
pub(super) fn check_file_paths_are_seen(spec: &InferencePipelineSpec) -> Result<()> {
    let template = spec.template.as_ref();
    let mounts: Vec<&VolumeMount> = template
        .iter()
        .flat_map(|t| t.volume_mounts.iter().flatten())
        .collect();
    let own_image = template.is_some_and(|t| t.image.is_some());
    // (field, URI, whether the pipeline's own image could hold it, whether pods write it)
    let models = spec
        .models
        .iter()
        .enumerate()
        .filter(|_| spec.sharing == Sharing::Pod)
        .map(|(i, m)| {
            (
                format!("spec.models[{i}].source.uri"),
                &m.source.uri,
                true,
                false,
            )
        });
    let data = [
        ("input", &spec.input, spec.mode == Mode::Task, false),
        ("output", &spec.output, false, true),
    ]
    .into_iter()
    .filter_map(|(field, data, imaged, written)| {
        Some((
            format!("spec.{field}.uri"),
            &data.as_ref()?.uri,
            imaged,
            written,
        ))
    });
    for (field, uri, imaged, written) in models.chain(data) {
        let Some(path) = uri.strip_prefix("file://") else {
            continue;
        };
        // The deepest mount holding the path is the one the pods see it on.
        let holder = mounts
            .iter()
            .filter(|m| {
                let mount = m.mount_path.trim_end_matches('/');
                path == mount || path.starts_with(&format!("{mount}/"))
            })
            .max_by_key(|m| m.mount_path.trim_end_matches('/').len());
        match holder {
            Some(mount) if written && mount.read_only == Some(true) => bail!(
                "{field} {uri}: the volume {:?} holding it is mounted read-only at {}, and the \
                 workers write the outputs there: mount it writable, or write the output \
                 elsewhere",
                mount.name,
                mount.mount_path
            ),
            Some(_) => continue,
            None if imaged && own_image => continue,
            None => {}
        }
        let folder = std::path::Path::new(path)
            .parent()
            .map_or("/".into(), |p| p.display().to_string());
        let or_image = if imaged {
            ", or build it into your own template.image"
        } else {
            ""
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
