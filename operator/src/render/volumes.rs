//! A pod's volumes and where its containers see them: the store (Pod sharing) or the node
//! agent's volume (Node sharing), the models' and the data's credentials, the client token.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, ConfigMapProjection, EmptyDirVolumeSource, KeyToPath, LocalObjectReference,
    ProjectedVolumeSource, SecretKeySelector, SecretProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_zerocopy_contract::models::{
    models_to_json, MODELS_ATTRIBUTE, NODE_STORE_DRIVER, VIEW_BINDINGS_DIR,
};

use super::pod::mount;
use crate::crd::{
    CredentialFiles, InferencePipeline, InferencePipelineSpec, PodOverrides, Sharing,
    CLIENT_TOKEN_FILE, SOURCE_AZURE_DIR, SOURCE_CA_FILE, SOURCE_S3_DIR, SOURCE_TOKEN_FILE,
};
use crate::invocation::Mounts;
use crate::quantity;

/// The uid and gid every container runs as (not root).
pub const RUN_AS: i64 = 65532;
/// Where a Node-sharing pod's workers see the node agent's volume of their models.
pub const NODE_MODELS_MOUNT: &str = "/kzc/models";
/// Memory the sidecar process needs beyond the weights it writes.
pub(super) const SIDECAR_OVERHEAD: u64 = 128 << 20;

// Every name starts with policy::RESERVED_VOLUME_PREFIX and every path in Mounts::in_pod
// lies under policy::RESERVED_MOUNT_ROOT: a template may use neither.
pub const STORE_VOLUME: &str = "kzc-store";
pub const BINDINGS_VOLUME: &str = "kzc-bindings";
pub const DOWNLOADS_VOLUME: &str = "kzc-downloads";
/// Node sharing's one volume: the node agent's read-only view of the pod's models.
pub const MODELS_VOLUME: &str = "kzc-models";
/// A model's token and CA bundle: kzc-source-<index of the model>.
pub const SOURCE_VOLUME_PREFIX: &str = "kzc-source-";
pub const CLIENT_TOKEN_VOLUME: &str = "kzc-client-token";
/// The input's or output's S3 credentials: kzc-input-credentials, kzc-output-credentials.
pub(super) const DATA_CREDENTIALS_SUFFIX: &str = "-credentials";

/// The pod's volumes and where the containers see them.
///
/// Pod sharing: the weight server writes the pod's own store (memory), its bindings and its
/// downloads. Node sharing: one read-only volume of the node agent's CSI driver holding
/// exactly the pod's models and their bindings; the agent fetches and publishes them into the
/// node's store, which no pod can write, before the pod's containers start.
pub(super) fn volumes(
    pipeline: &InferencePipeline,
    model_bytes: Option<u64>,
) -> (Vec<Volume>, Mounts) {
    let in_pod = Mounts::in_pod();
    let (mut all, mounts) = match pipeline.spec.sharing {
        Sharing::Pod => {
            // Room for alignment padding and TorchScript skeletons beyond the model files.
            let store_limit =
                model_bytes.map(|b| Quantity(quantity::mebibytes(b + b / 20 + (16 << 20))));
            let small_memory = EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("1Mi".into())),
            };
            let mut own = vec![
                Volume {
                    name: STORE_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        size_limit: store_limit,
                    }),
                    ..Default::default()
                },
                Volume {
                    name: BINDINGS_VOLUME.into(),
                    empty_dir: Some(small_memory),
                    ..Default::default()
                },
                Volume {
                    name: DOWNLOADS_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: model_bytes.map(|b| Quantity(quantity::mebibytes(b))),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ];
            own.extend(source_volumes(&pipeline.spec).into_iter().map(|(v, _)| v));
            (own, in_pod)
        }
        Sharing::Node => {
            let models =
                models_to_json(&pipeline.spec.model_sources(CredentialFiles::VolumeSecret));
            let volume = Volume {
                name: MODELS_VOLUME.into(),
                csi: Some(CSIVolumeSource {
                    driver: NODE_STORE_DRIVER.into(),
                    read_only: Some(true),
                    volume_attributes: Some(BTreeMap::from([(
                        MODELS_ATTRIBUTE.to_owned(),
                        models,
                    )])),
                    // The kubelet reads it in the pod's namespace and hands it to the agent.
                    // Checked to be one Secret before rendering (see render_planned).
                    node_publish_secret_ref: pipeline
                        .spec
                        .volume_secret()
                        .ok()
                        .flatten()
                        .map(|name| LocalObjectReference { name }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let view = PathBuf::from(NODE_MODELS_MOUNT);
            let mounts = Mounts {
                bindings: view.join(VIEW_BINDINGS_DIR),
                store: view,
                ..in_pod
            };
            (vec![volume], mounts)
        }
    };
    all.extend(data_volumes(&pipeline.spec).into_iter().map(|(v, _)| v));
    all.extend(client_token_volume(&pipeline.spec));
    if let Some(extra) = pipeline
        .spec
        .template
        .as_ref()
        .and_then(|t| t.volumes.clone())
    {
        all.extend(extra);
    }
    (all, mounts)
}

/// The object store credentials of a model or data location, from the Secrets its `s3` and
/// `azure` settings name: S3's under [`SOURCE_S3_DIR`], Azure's under [`SOURCE_AZURE_DIR`].
pub(super) fn store_credentials(
    s3: Option<&crate::crd::S3SourceSpec>,
    azure: Option<&crate::crd::AzureSourceSpec>,
) -> Vec<VolumeProjection> {
    let s3 = s3
        .and_then(|s3| s3.credentials_secret.as_deref())
        .map(s3_credentials)
        .unwrap_or_default();
    let azure = azure
        .and_then(|a| a.credentials_secret.as_deref())
        .map(azure_credentials);
    s3.into_iter().chain(azure).collect()
}

/// An Azure credentials Secret's account key under [`SOURCE_AZURE_DIR`].
pub(super) fn azure_credentials(secret: &str) -> VolumeProjection {
    use kube_zerocopy_contract::models::ACCOUNT_KEY_FILE;
    VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_owned(),
            items: Some(vec![KeyToPath {
                key: ACCOUNT_KEY_FILE.to_owned(),
                path: format!("{SOURCE_AZURE_DIR}/{ACCOUNT_KEY_FILE}"),
                ..Default::default()
            }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// An S3 credentials Secret's keys under [`SOURCE_S3_DIR`]: the key id and secret required,
/// a session token only when the Secret has one.
pub(super) fn s3_credentials(secret: &str) -> Vec<VolumeProjection> {
    use kube_zerocopy_contract::models::{
        ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE, SESSION_TOKEN_FILE,
    };
    let keys = |keys: &[&str], optional: bool| VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.to_owned(),
            items: Some(
                keys.iter()
                    .map(|key| KeyToPath {
                        key: (*key).to_owned(),
                        path: format!("{SOURCE_S3_DIR}/{key}"),
                        ..Default::default()
                    })
                    .collect(),
            ),
            optional: Some(optional),
        }),
        ..Default::default()
    };
    vec![
        keys(&[ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE], false),
        keys(&[SESSION_TOKEN_FILE], true),
    ]
}

/// Each model's bearer token and CA bundle (when it names them) as one projected volume, with
/// the name of the model whose folder under [`Mounts::sources`] it is mounted on. Only the
/// weight server mounts them; the files are readable by the pods' group only.
pub(super) fn source_volumes(spec: &InferencePipelineSpec) -> Vec<(Volume, String)> {
    spec.models
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let token = m
                .source
                .bearer_token_secret
                .as_ref()
                .map(|s| secret_key(s, SOURCE_TOKEN_FILE));
            let ca = m.source.ca_config_map.as_ref().map(|c| VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: c.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: c.key.clone(),
                        path: SOURCE_CA_FILE.into(),
                        ..Default::default()
                    }]),
                    optional: Some(false),
                }),
                ..Default::default()
            });
            let stores = store_credentials(m.source.s3.as_ref(), m.source.azure.as_ref());
            let sources: Vec<_> = token.into_iter().chain(ca).chain(stores).collect();
            (!sources.is_empty()).then(|| {
                let volume = Volume {
                    name: format!("{SOURCE_VOLUME_PREFIX}{i}"),
                    projected: Some(ProjectedVolumeSource {
                        sources: Some(sources),
                        default_mode: Some(0o440),
                    }),
                    ..Default::default()
                };
                (volume, m.name.clone())
            })
        })
        .collect()
}

/// One key of a Secret, as the file `path` of a projected volume; the pod does not start
/// without it.
pub(super) fn secret_key(selector: &SecretKeySelector, path: &str) -> VolumeProjection {
    VolumeProjection {
        secret: Some(SecretProjection {
            name: selector.name.clone(),
            items: Some(vec![KeyToPath {
                key: selector.key.clone(),
                path: path.to_owned(),
                ..Default::default()
            }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// `actor.tokenSecret`, when set, as a volume: the replicas mount it to check their clients'
/// token, the driver to send it. The kubelet updates it when the Secret changes.
pub(super) fn client_token_volume(spec: &InferencePipelineSpec) -> Option<Volume> {
    let secret = spec.actor.as_ref()?.token_secret.as_ref()?;
    Some(Volume {
        name: CLIENT_TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![secret_key(secret, CLIENT_TOKEN_FILE)]),
            default_mode: Some(0o440),
        }),
        ..Default::default()
    })
}

/// The input's and output's credentials (when they name a Secret) as projected volumes, with
/// the field whose folder under [`Mounts::data`] each is mounted on. Only the containers that
/// read or write the data mount them (the workers, and the planner the input's).
pub(super) fn data_volumes(spec: &InferencePipelineSpec) -> Vec<(Volume, &'static str)> {
    [("input", &spec.input), ("output", &spec.output)]
        .into_iter()
        .filter_map(|(field, location)| {
            let location = location.as_ref()?;
            let sources = store_credentials(location.s3.as_ref(), location.azure.as_ref());
            if sources.is_empty() {
                return None;
            }
            let volume = Volume {
                name: format!("kzc-{field}{DATA_CREDENTIALS_SUFFIX}"),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(sources),
                    default_mode: Some(0o440),
                }),
                ..Default::default()
            };
            Some((volume, field))
        })
        .collect()
}

pub(super) fn data_mounts(volumes: &[(Volume, &str)], mounts: &Mounts) -> Vec<VolumeMount> {
    volumes
        .iter()
        .map(|(v, field)| mount(&v.name, &mounts.data.join(field), true))
        .collect()
}

/// The weight server's mounts: its own three, writable, then every mount of the pipeline's
/// template, read-only. A `file://` model lives on one of the template's volumes (a PVC at
/// /models), so the sidecar, which reads it, needs them as the worker does; it only reads
/// sources (and may need e.g. a CA bundle mounted for https), so its copies are forced
/// read-only whatever the template says. A `file://` source under no mount is left alone: it
/// can only be in a custom image, and the sidecar says so if it is not.
pub(super) fn sidecar_mounts(spec: &InferencePipelineSpec, mounts: &Mounts) -> Vec<VolumeMount> {
    let mut all = vec![
        mount(STORE_VOLUME, &mounts.store, false),
        mount(BINDINGS_VOLUME, &mounts.bindings, false),
        mount(DOWNLOADS_VOLUME, &mounts.downloads, false),
    ];
    all.extend(
        source_volumes(spec)
            .iter()
            .map(|(v, model)| mount(&v.name, &mounts.sources.join(model), true)),
    );
    let overrides = spec.template.clone().unwrap_or_default();
    all.extend(template_mounts_read_only(&overrides));
    all
}

/// The template's mounts, each read-only: for the containers that only read what they mount
/// (the weight server, the planner).
pub(super) fn template_mounts_read_only(
    overrides: &PodOverrides,
) -> impl Iterator<Item = VolumeMount> + '_ {
    overrides
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| VolumeMount {
            read_only: Some(true),
            ..m.clone()
        })
}
