//! The memory the node's store lives in: a tmpfs of the configured size that the agent mounts
//! itself, so that the weights are charged to the agent (the first writer of each page), once
//! per node, and the store's size is the chart's capacity, not whatever /dev/shm has left.

use std::ffi::CString;
use std::path::Path;

use anyhow::{Context, Result};
use rustix::mount::{mount, MountFlags};
use tracing::{info, warn};

use crate::views::is_mounted;

/// Mounts a tmpfs of `size` (tmpfs's syntax: bytes, or with k, m, g) on `store` unless a
/// mount is there already: an earlier agent's, whose models stay published (the pods that
/// map them keep running while the agent restarts).
pub fn mount_tmpfs(store: &Path, size: &str) -> Result<()> {
    if is_mounted(store)? {
        info!(store = %store.display(), "the store's memory is already mounted");
        return Ok(());
    }
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    // Huge pages where the kernel gives them to tmpfs: fewer page faults and TLB misses when a
    // worker first touches a mapping of hundreds of MiB.
    let options = |extra: &str| CString::new(format!("size={size},mode=0755{extra}"));
    let (huge, plain) = (options(",huge=within_size")?, options("")?);
    if let Err(e) = mount("kube-zerocopy", store, "tmpfs", flags, huge.as_c_str()) {
        warn!(error = %e, "this kernel's tmpfs takes no huge=within_size: small pages");
        mount("kube-zerocopy", store, "tmpfs", flags, plain.as_c_str()).with_context(|| {
            format!(
                "mounting a tmpfs of {size} on the store {}",
                store.display()
            )
        })?;
    }
    info!(store = %store.display(), size, "the store's memory is mounted");
    Ok(())
}
