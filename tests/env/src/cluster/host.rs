//! What a real node changes on the host, and how it is undone: a bridge for the pods, the
//! kernel settings that kubelet and the bridge plugin set, the `kubepods` cgroups, mounts,
//! kube-proxy's nftables tables and a few fixed paths. What was there before is written to a
//! state file first, so a run that was killed before it could clean up is cleaned up (and the
//! settings restored) by the next one.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The pods' bridge: kube-apiserver listens on its address too, so pods reach it through the
/// "kubernetes" Service. The node's InternalIP is that address (kubelet refuses loopback).
pub const BRIDGE: &str = "kzc0";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_SUBNET: &str = "10.244.0.0/24";

/// kubelet sets these (see its protectKernelDefaults) and the bridge plugin sets ip_forward.
const SYSCTLS: [&str; 7] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
];

/// Paths that kubelet, containerd and the CNI plugins use whatever they are told.
const FIXED_PATHS: [&str; 7] = [
    // The store of Node-sharing pipelines on this node.
    "/dev/shm/kube-zerocopy",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/etc/cni",
];

const STATE_FILE: &str = "/run/kube-zerocopy-real-node.json";
/// Folders of real nodes start with this (under the temporary folder).
pub const NODE_DIR_PREFIX: &str = "kzc-real-node-";

#[derive(Serialize, Deserialize)]
struct State {
    /// The node's binaries: only processes started from there are killed.
    bin: PathBuf,
    sysctls: Vec<(String, String)>,
    created_paths: Vec<PathBuf>,
    /// The nftables tables there were; kubelet adds iptables chains (through iptables-nft)
    /// and kube-proxy its own tables.
    nft_tables: Vec<String>,
}

/// The host prepared for one real node; dropping it undoes the changes.
pub struct Host {
    state: State,
}

impl Host {
    /// Cleans up after an earlier run that could not, records the host's settings, and creates
    /// the bridge. Needs root. `bin` holds the node's binaries.
    pub fn prepare(bin: &Path) -> Result<Host> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("a real node needs root (CI runs as root)");
        }
        if let Ok(text) = std::fs::read_to_string(STATE_FILE) {
            eprintln!("real node: cleaning up after an earlier run ({STATE_FILE})");
            let state: State = serde_json::from_str(&text).context("reading the state file")?;
            Host { state }.undo();
        }
        let state = State {
            bin: bin.to_owned(),
            sysctls: SYSCTLS
                .iter()
                .map(|k| Ok((k.to_string(), sysctl_get(k)?)))
                .collect::<Result<_>>()?,
            created_paths: FIXED_PATHS
                .iter()
                .map(PathBuf::from)
                .filter(|p| !p.exists())
                .collect(),
            nft_tables: nft_tables(),
        };
        std::fs::write(STATE_FILE, serde_json::to_string(&state)?)?;
        let host = Host { state };
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE],
        )?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(host)
    }

    fn undo(&self) {
        kill_pods();
        kill_started_from(&self.state.bin);
        unmount_node_folders();
        remove_cgroups();
        for table in nft_tables() {
            if !self.state.nft_tables.contains(&table) {
                let mut args = vec!["delete", "table"];
                args.extend(table.split_whitespace());
                let _ = run("nft", &args);
            }
        }
        let _ = run("ip", &["link", "del", BRIDGE]);
        for (key, value) in &self.state.sysctls {
            if let Err(e) = sysctl_set(key, value) {
                eprintln!("real node: restoring {key}={value}: {e:#}");
            }
        }
        for path in &self.state.created_paths {
            let _ = std::fs::remove_dir_all(path);
        }
        let _ = std::fs::remove_file(STATE_FILE);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Kills every process in the `kubepods` cgroups (the containers), in every hierarchy.
pub fn kill_pods() {
    for dir in kubepods_cgroups() {
        for entry in walk(&dir) {
            let procs = std::fs::read_to_string(entry.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid read from the container's cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Kills the processes started from a binary in `bin` (containerd's shims outlive it).
pub fn kill_started_from(bin: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let exe = std::fs::read_link(entry.path().join("exe")).unwrap_or_default();
        if exe.starts_with(bin) {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Unmounts (lazily, innermost first) everything mounted under a real node's folder: the
/// containers' root filesystems, volumes, network namespaces, kubelet's own bind mount.
pub fn unmount_node_folders() {
    let tmp = std::env::temp_dir().join(NODE_DIR_PREFIX);
    let prefix = tmp.to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = run("umount", &["-l", &p]);
    }
}

fn kubepods_cgroups() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("kubepods"))
        .filter(|p| p.is_dir())
        .collect()
}

/// Removes the `kubepods` cgroups, innermost first (a cgroup is removed with rmdir).
fn remove_cgroups() {
    for dir in kubepods_cgroups() {
        let mut all = walk(&dir);
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in all {
            let _ = std::fs::remove_dir(&p);
        }
    }
}

/// `dir` and every folder below it.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_owned()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[i]) {
            all.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    all
}

/// `nft list tables`: "table ip nat" and so on, without the word "table".
fn nft_tables() -> Vec<String> {
    let out = Command::new("nft").args(["list", "tables"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("table "))
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn sysctl_get(key: &str) -> Result<String> {
    let path = sysctl_path(key);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn sysctl_set(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
}

pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
