//! The images themselves, outside Kubernetes: scripts/images-check.sh runs each archive with
//! runc, as the image's user with a read-only root. The runtime's sidecar publishes a model and
//! its worker computes the host worker's output; the CPU image refuses `--device cuda` by name.

use std::sync::Arc;

use anyhow::Result;
use kube_zerocopy_e2e::cluster::run_script;

use crate::support::Env;

pub async fn each_image_runs_with_runc_as_non_root(env: Arc<Env>) -> Result<()> {
    let list = tempfile::NamedTempFile::new()?;
    std::fs::write(list.path(), env.cluster.images.list())?;
    tokio::task::spawn_blocking(move || {
        run_script("images-check.sh", &[list.path().as_os_str()]).map(drop)
    })
    .await?
}
