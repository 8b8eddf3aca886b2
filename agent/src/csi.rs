//! The CSI services the kubelet calls on the agent's socket: Identity (who it is) and Node
//! (publish and unpublish a pod's volume, what it can do, which node it is on). The kubelet
//! learns the socket from the registrar (agent/registrar), the agent pod's other container.
//!
//! A volume's attribute `models` lists the pod's models as the weight server's `KZC_MODELS`
//! does (JSON). Publishing a volume publishes those models in the store if they are not yet
//! there, links them into the volume's view and mounts it read-only at the target path.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube_zerocopy_fetch::config::{models_from_json, ModelSource, MODELS_ATTRIBUTE};
use kube_zerocopy_fetch::layout::{Bindings, Hold, StoreFull};
use kube_zerocopy_fetch::publish::Publisher;
use kube_zerocopy_fetch::source::SourceLimits;
use kube_zerocopy_fetch::Store;
use kube_zerocopy_runtime::redact;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::access::{Access, Guard, NotShown};
use crate::activity::Activity;
use crate::integrity::{Check, Layouts};
use crate::metrics::Metrics;
use crate::proto::csi::{
    identity_server::Identity, node_server::Node, GetPluginCapabilitiesRequest,
    GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, ProbeRequest, ProbeResponse,
};
use crate::tenants::{Shares, Tenants};
use crate::views::{self, Views};
use crate::volume_secret::VolumeSecret;

/// The volume attribute in which the kubelet passes the pod's namespace.
const POD_NAMESPACE_ATTRIBUTE: &str = "csi.storage.k8s.io/pod.namespace";
use kube_zerocopy_fetch::config::VIEW_BINDINGS_DIR;

pub struct Agent {
    /// The CSI driver's name, as pods' volumes and the CSIDriver object name it.
    pub driver: String,
    pub node_id: String,
    pub store: Store,
    /// Where http(s) sources are downloaded before they are laid out.
    pub download_dir: PathBuf,
    /// What sources may reach and how slow they may be: the node's folder whose files a
    /// volume may name as `file://` sources (none when None), the internal networks remote
    /// sources may be in, a minimum rate, the most a source may hold, downloads at once.
    pub limits: SourceLimits,
    /// What each namespace holds of the store and has under way.
    tenants: Tenants,
    /// Each published volume's claims on its models, so that no collection removes them.
    holds: Mutex<HashMap<String, Vec<Hold>>>,
    pub metrics: Arc<Metrics>,
    /// The publications' fetches and records, for the node's report.
    pub activity: Arc<Activity>,
    /// Which entries are private, and who has shown access to them.
    access: Arc<Access>,
    /// The store entries checked against their layout records, by digest and folder (inode):
    /// a folder that is replaced is checked again.
    verified: Mutex<HashSet<(String, u64)>>,
}

impl Agent {
    pub fn new(
        driver: String,
        node_id: String,
        store: Store,
        download_dir: PathBuf,
        limits: SourceLimits,
        shares: Shares,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(store.root().to_owned()));
        Arc::new(Agent {
            activity: Arc::new(Activity::new(store.clone(), metrics.room_evictions.clone())),
            access: Arc::new(Access::new(
                store.clone(),
                download_dir.clone(),
                limits.clone(),
            )),
            metrics,
            driver,
            node_id,
            store,
            download_dir,
            limits,
            tenants: Tenants::new(shares),
            holds: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashSet::new()),
        })
    }

    fn views(&self) -> Views {
        Views::new(self.store.clone())
    }

    /// Publishes the volume's models, links them into its view and mounts it at `target`.
    /// `secrets`: the keys of the Secret the volume names, its models' only credentials.
    fn publish_volume(
        &self,
        volume_id: &str,
        namespace: &str,
        target: &Path,
        models_json: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let mut models = models_from_json(models_json).map_err(|e| {
            Status::invalid_argument(format!("volume attribute {MODELS_ATTRIBUTE:?}: {e:#}"))
        })?;
        for model in &models {
            self.check_source(model)?;
        }
        // Laid out for this call alone, and removed when it returns.
        let _secret = VolumeSecret::lay_out(self.store.private_root(), secrets, &mut models)
            .map_err(Status::permission_denied)?;
        let views = self.views();
        let view = views
            .dir(volume_id)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if views::is_mounted(target).map_err(internal)? {
            return Ok(());
        }
        // Counted when something may be fetched and laid out: a volume of models the store
        // holds already is only verified and linked.
        let held = models.iter().all(|m| {
            m.sha256
                .as_deref()
                .is_some_and(|d| self.store.is_published(&d.to_ascii_lowercase()))
        });
        let _publishing = match held {
            true => None,
            false => Some(
                self.tenants
                    .start_publication(namespace)
                    .map_err(Status::unavailable)?,
            ),
        };
        // A failed publication leaves no view behind: each view counts as a pod that maps.
        let published = self.publish_into_view(volume_id, namespace, &view, target, &models);
        if published.is_err() {
            let _ = views.remove(volume_id);
            self.tenants.release(volume_id);
        }
        published
    }

    /// [`Self::publish_volume`]'s work once its view's folder is known.
    fn publish_into_view(
        &self,
        volume_id: &str,
        namespace: &str,
        view: &Path,
        target: &Path,
        models: &[ModelSource],
    ) -> Result<(), Status> {
        let layouts = Layouts::new(self.store.clone());
        for digest in models.iter().filter_map(|m| m.sha256.as_deref()) {
            self.vet_existing(&layouts, &digest.to_ascii_lowercase())?;
        }
        let before = layouts.entries().map_err(internal)?;
        let publisher = Publisher {
            store: self.store.clone(),
            bindings: Bindings::new(view.join(VIEW_BINDINGS_DIR)),
            download_dir: self.download_dir.clone(),
            limits: self.limits.clone(),
            observer: Some(Arc::new(Guard {
                activity: self.activity.clone(),
                access: self.access.clone(),
            })),
        };
        let holds = publisher.publish_all(models).map_err(|e| {
            let message = format!("{e:#}");
            if e.chain().any(|c| c.is::<StoreFull>()) {
                Status::resource_exhausted(message)
            } else if e.chain().any(|c| c.is::<NotShown>()) {
                Status::permission_denied(message)
            } else {
                Status::internal(message)
            }
        })?;
        for hold in &holds {
            self.settle(&layouts, &hold.digest, &before)?;
        }
        // Counted against the namespace's share before it is mounted (and forgotten again if
        // it is not).
        let sizes = holds
            .iter()
            .map(|h| Ok((h.digest.clone(), self.store.open(&h.digest)?.tensors_bytes)))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(internal)?;
        self.tenants
            .admit(volume_id, namespace, sizes)
            .map_err(Status::resource_exhausted)?;
        // One hold per model, in the models' order: their digests are what the view links.
        let digests: Vec<&str> = holds.iter().map(|h| h.digest.as_str()).collect();
        self.views()
            .link(volume_id, &digests)
            .and_then(|view| views::mount_read_only(&view, target))
            .map_err(internal)?;
        info!(volume_id, target = %target.display(), ?digests, "volume published");
        let mut all = self.holds.lock().unwrap();
        all.insert(volume_id.to_owned(), holds);
        self.metrics.volumes.set(all.len() as i64);
        self.activity.changed.notify_one();
        Ok(())
    }

    fn is_verified(&self, digest: &str, folder: u64) -> bool {
        let verified = self.verified.lock().unwrap();
        verified.contains(&(digest.to_owned(), folder))
    }

    fn mark_verified(&self, digest: &str, folder: u64) {
        let mut verified = self.verified.lock().unwrap();
        verified.insert((digest.to_owned(), folder));
    }

    /// Before an entry already in the store is served: it must be the one this agent laid out
    /// (its files hash to the record), or it is removed and laid out again from its source. An
    /// entry checked once is not hashed again while it stays the same folder.
    fn vet_existing(&self, layouts: &Layouts, digest: &str) -> Result<(), Status> {
        let Some(folder) = folder_id(&self.store, digest) else {
            return Ok(());
        };
        if self.is_verified(digest, folder) {
            return Ok(());
        }
        match layouts.check(digest).map_err(internal)? {
            Check::Verified => self.mark_verified(digest, folder),
            Check::Untrusted(why) => self.discard(digest, &why)?,
        }
        Ok(())
    }

    /// Checks every entry of the store against its record, as [`Self::vet_existing`] does
    /// once per folder: one changed since (or planted) is removed, and laid out again from its
    /// source at its next mount. Returns how many were removed.
    pub fn verify_store(&self) -> anyhow::Result<usize> {
        let layouts = Layouts::new(self.store.clone());
        let mut removed = 0;
        for digest in layouts.entries()?.into_keys() {
            // An entry collected meanwhile cannot be checked, and need not be.
            let Ok(check) = layouts.check(&digest) else {
                continue;
            };
            if let Check::Untrusted(why) = check {
                self.verified.lock().unwrap().retain(|(d, _)| *d != digest);
                self.discard(&digest, &why)
                    .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes an entry that does not verify (it is laid out again from its source).
    fn discard(&self, digest: &str, why: &str) -> Result<(), Status> {
        warn!(%digest, %why, "a store entry that does not verify: removed, laid out again");
        self.store.discard(digest).map_err(internal)?;
        self.metrics.discarded.inc();
        Ok(())
    }

    /// After publishing: records what was laid out since `before` (the store's entries then);
    /// vets what was there already (a model whose digest was not known before fetching).
    fn settle(
        &self,
        layouts: &Layouts,
        digest: &str,
        before: &HashMap<String, u64>,
    ) -> Result<(), Status> {
        let folder = folder_id(&self.store, digest)
            .ok_or_else(|| Status::internal(format!("model {digest} vanished from the store")))?;
        if self.is_verified(digest, folder) {
            return Ok(());
        }
        if before.get(digest) != Some(&folder) {
            // Laid out by this agent (in this call or another's): recorded before it appeared.
            if !layouts.is_recorded(digest) {
                layouts.record(digest).map_err(internal)?;
            }
            self.metrics.layouts.inc();
        } else if let Check::Untrusted(why) = layouts.check(digest).map_err(internal)? {
            self.discard(digest, &why)?;
            return Err(Status::unavailable(format!(
                "the store's entry of model {digest} does not verify ({why}): removed, laid out again at the next try"
            )));
        }
        self.mark_verified(digest, folder);
        Ok(())
    }

    /// Whoever can create a pod can name any source in its volume, and the agent reads as
    /// root: it fetches http(s), s3 and az sources (with the volume's own credentials alone:
    /// see [`VolumeSecret`]), and reads `file://` ones only under the folder the node's
    /// administrator set aside for them.
    fn check_source(&self, model: &ModelSource) -> Result<(), Status> {
        let refuse = |why: String| {
            Err(Status::permission_denied(format!(
                "model {:?}: {why}",
                model.name
            )))
        };
        if kube_zerocopy_fetch::source::is_remote(&model.uri) {
            return Ok(());
        }
        let Some(path) = model.uri.strip_prefix("file://") else {
            return refuse(format!(
                "source {:?} is not http(s)://, s3://, az:// or file://",
                model.uri
            ));
        };
        let Some(root) = &self.limits.file_root else {
            return refuse(format!(
                "source {:?}: this node's agent reads no file:// sources (its \
                 KZC_FILE_SOURCES is not set); serve the model over http(s)",
                model.uri
            ));
        };
        // Resolved, so that neither `..` nor a link leads out of the folder.
        let inside = std::fs::canonicalize(path)
            .ok()
            .zip(std::fs::canonicalize(root).ok())
            .is_some_and(|(file, root)| file.starts_with(root));
        if !inside {
            return refuse(format!(
                "source {:?} is not a file under {}, the only folder this node's agent reads \
                 file:// sources from",
                model.uri,
                root.display()
            ));
        }
        Ok(())
    }

    fn unpublish_volume(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        views::unmount_and_remove(target).map_err(internal)?;
        self.views().remove(volume_id).map_err(internal)?;
        // The models were in use until now: their idle time counts from here.
        let released = {
            self.tenants.release(volume_id);
            let mut all = self.holds.lock().unwrap();
            let released = all.remove(volume_id);
            self.metrics.volumes.set(all.len() as i64);
            released
        };
        for hold in released.iter().flatten() {
            if let Err(e) = hold.refresh() {
                tracing::warn!(error = format!("{e:#}"), "marking a model as used");
            }
        }
        self.activity.changed.notify_one();
        info!(volume_id, target = %target.display(), "volume unpublished");
        Ok(())
    }
}

/// The identity of a model's folder in the store (its inode), when there is one.
fn folder_id(store: &Store, digest: &str) -> Option<u64> {
    std::fs::symlink_metadata(store.model_dir(digest))
        .ok()
        .map(|m| m.ino())
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

/// The two fields every volume call needs (the spec's InvalidArgument when missing).
fn required(volume_id: &str, target_path: &str) -> Result<(), Status> {
    if volume_id.is_empty() {
        return Err(Status::invalid_argument("volume_id is missing"));
    }
    if target_path.is_empty() {
        return Err(Status::invalid_argument("target_path is missing"));
    }
    Ok(())
}

/// Runs blocking work (fetching, laying out, mounting) off the gRPC threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the call's worker thread failed: {e}")))?
}

/// The agent behind an `Arc`, as each gRPC service holds it.
#[derive(Clone)]
pub struct Service(pub Arc<Agent>);

#[tonic::async_trait]
impl Identity for Service {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.driver.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    /// No controller service and no topology: a node plugin for ephemeral volumes.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse::default()))
    }

    /// Ready when the store can be read.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.0.store.root().is_dir();
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl Node for Service {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, &r.target_path)?;
        if r.volume_capability.is_none() {
            return Err(Status::invalid_argument("volume_capability is missing"));
        }
        let models = r
            .volume_context
            .get(MODELS_ATTRIBUTE)
            .cloned()
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "the volume has no attribute {MODELS_ATTRIBUTE:?}: the pod's models"
                ))
            })?;
        // The kubelet says whose pod it is (the CSIDriver's podInfoOnMount).
        let namespace = r
            .volume_context
            .get(POD_NAMESPACE_ATTRIBUTE)
            .cloned()
            .unwrap_or_default();
        let agent = self.0.clone();
        let started = Instant::now();
        let published = blocking(move || {
            agent.publish_volume(
                &r.volume_id,
                &namespace,
                Path::new(&r.target_path),
                &models,
                &r.secrets,
            )
        })
        .await;
        self.0
            .metrics
            .published(started.elapsed(), published.is_ok());
        // The kubelet shows the message in the pod's events, to whoever can read them.
        published.map_err(|e| Status::new(e.code(), redact::uris_in(e.message())))?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, &r.target_path)?;
        let agent = self.0.clone();
        blocking(move || agent.unpublish_volume(&r.volume_id, Path::new(&r.target_path))).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    /// No staging, no stats, no expansion: publish and unpublish only.
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse::default()))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
        }))
    }
}
