//! A pod's view of its models: a folder of the store holding hard links to the published
//! files of exactly the models its volume names, plus its bindings, bind-mounted read-only at
//! the volume's target path. Hard links cost no memory (one inode, one copy of the pages), the
//! pod sees no other model, and a model stays whole while any view links it.
//!
//! ```text
//! <store>/.views/<volume id>/blobs/<sha256>/...   hard links to <store>/blobs/<sha256>/...
//! <store>/.views/<volume id>/bindings/ready.json  model name -> digest
//! ```
//!
//! A worker reads the view as it reads a store: `KZC_STORE=<mount>`,
//! `KZC_BINDINGS=<mount>/bindings`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kube_zerocopy_fetch::Store;
use rustix::mount::{mount_bind, mount_remount, unmount, MountFlags, UnmountFlags};

pub struct Views {
    store: Store,
}

impl Views {
    pub fn new(store: Store) -> Self {
        Views { store }
    }

    /// The view folder of a volume. Volume ids come from the kubelet (`csi-<sha256>`); one
    /// that could leave the folder is refused.
    pub fn dir(&self, volume_id: &str) -> Result<PathBuf> {
        let safe = !volume_id.is_empty()
            && volume_id.len() <= 128
            && !volume_id.starts_with('.')
            && volume_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !safe {
            bail!("volume id {volume_id:?} is not a plain name");
        }
        Ok(self.store.root().join(".views").join(volume_id))
    }

    /// Links every published file of the models `digests` into the volume's view; the
    /// bindings must already be written there. Repeating it is harmless.
    pub fn link(&self, volume_id: &str, digests: &[&str]) -> Result<PathBuf> {
        let view = self.dir(volume_id)?;
        for digest in digests {
            let from = self.store.model_dir(digest);
            let to = view.join("blobs").join(digest);
            fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
            for entry in
                fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))?
            {
                let entry = entry?;
                // A published folder holds plain files only; anything else is not linked.
                if !entry.file_type()?.is_file() {
                    continue;
                }
                let link = to.join(entry.file_name());
                match fs::hard_link(entry.path(), &link) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    other => other.with_context(|| format!("linking {}", link.display()))?,
                }
            }
        }
        Ok(view)
    }

    /// Removes a volume's view (its links: the store's files stay).
    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let view = self.dir(volume_id)?;
        match fs::remove_dir_all(&view) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", view.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Bind-mounts `view` at `target` read-only (and without devices, set-uid or executables):
/// nothing a pod does through it can change the store.
pub fn mount_read_only(view: &Path, target: &Path) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    mount_bind(view, target)
        .with_context(|| format!("bind-mounting {} at {}", view.display(), target.display()))?;
    let flags = MountFlags::BIND
        | MountFlags::RDONLY
        | MountFlags::NOSUID
        | MountFlags::NODEV
        | MountFlags::NOEXEC;
    if let Err(e) = mount_remount(target, flags, "") {
        let _ = unmount(target, UnmountFlags::DETACH);
        return Err(e).with_context(|| format!("making {} read-only", target.display()));
    }
    Ok(())
}

/// Unmounts `target` if something is mounted there, and removes the folder.
pub fn unmount_and_remove(target: &Path) -> Result<()> {
    match unmount(target, UnmountFlags::empty()) {
        // EINVAL: not a mount point (already unmounted); ENOENT: no folder.
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", target.display())),
    }
    match fs::remove_dir(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", target.display()))
        }
        _ => Ok(()),
    }
}

/// Whether something is mounted at `path`, as this process's mount table says (a bind mount
/// from the same file system keeps the device, so comparing devices would not tell).
pub fn is_mounted(path: &Path) -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let wanted = path.to_string_lossy();
    // mountinfo's fifth field is the mount point, with spaces and such octal-escaped.
    Ok(mounts.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|p| unescape(p) == wanted)
    }))
}

fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_that_could_leave_the_views_folder_are_refused() {
        let views = Views::new(Store::new("/store"));
        assert_eq!(
            views.dir("csi-0a1b").unwrap(),
            Path::new("/store/.views/csi-0a1b")
        );
        for bad in ["", "..", ".hidden", "a/b", "../blobs", "a\0b"] {
            assert!(views.dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(r"/var/lib/a\040b"), "/var/lib/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
