//! Memory of a process from /proc: the figures that prove (or disprove) sharing.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Kibibytes, as /proc reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Resident set: every page mapped and present.
    pub rss_kib: u64,
    /// Proportional set: shared pages divided among the processes that map them.
    pub pss_kib: u64,
    /// Unique set: pages only this process maps (Private_Clean + Private_Dirty).
    pub uss_kib: u64,
    /// Anonymous memory: heap and private copies; a copied model shows up here.
    pub anon_kib: u64,
}

fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    rest.trim().trim_end_matches("kB").trim().parse().ok()
}

fn add_fields(stats: &mut MemoryStats, line: &str) {
    if let Some(v) = field(line, "Rss") {
        stats.rss_kib += v;
    } else if let Some(v) = field(line, "Pss") {
        stats.pss_kib += v;
    } else if let Some(v) = field(line, "Private_Clean").or_else(|| field(line, "Private_Dirty")) {
        stats.uss_kib += v;
    } else if let Some(v) = field(line, "Anonymous") {
        stats.anon_kib += v;
    }
}

impl MemoryStats {
    /// The whole process (`pid` or "self").
    pub fn of_process(pid: &str) -> Result<Self> {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let mut stats = MemoryStats::default();
        text.lines().for_each(|l| add_fields(&mut stats, l));
        Ok(stats)
    }

    /// Only the mappings of `file` in the process.
    pub fn of_mapping(pid: &str, file: &Path) -> Result<Self> {
        Self::of_mappings(pid, &[file])
    }

    /// The mappings of any of `files` in the process, together (one read of its smaps).
    pub fn of_mappings(pid: &str, files: &[&Path]) -> Result<Self> {
        let path = format!("/proc/{pid}/smaps");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let files: Vec<_> = files.iter().map(|f| f.to_string_lossy()).collect();
        let mut stats = MemoryStats::default();
        let mut inside = false;
        for line in text.lines() {
            // A mapping's header line: "start-end perms offset dev inode [path]".
            let is_header = line.split_whitespace().next().is_some_and(|w| {
                w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            });
            if is_header {
                inside = files.iter().any(|f| line.ends_with(&**f));
            } else if inside {
                add_fields(&mut stats, line);
            }
        }
        Ok(stats)
    }
}

/// The address ranges at which the process maps `file` (every mapping of it: the worker's and,
/// in the Python worker, the Python package's), from /proc/<pid>/maps.
pub fn mapped_ranges(pid: &str, file: &Path) -> Result<Vec<std::ops::Range<usize>>> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let file = file.to_string_lossy();
    let mut ranges = Vec::new();
    for line in text.lines().filter(|l| l.ends_with(&*file)) {
        let span = line.split_whitespace().next().unwrap_or_default();
        if let Some((start, end)) = span.split_once('-') {
            let start = usize::from_str_radix(start, 16)?;
            let end = usize::from_str_radix(end, 16)?;
            ranges.push(start..end);
        }
    }
    Ok(ranges)
}

/// One "Name: N kB" field of /proc/<pid>/status (`pid` or "self"): VmHWM (the peak resident
/// set), VmRSS, RssAnon (anonymous memory now).
pub fn status_kib(pid: &str, name: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| field(l, name))
        .with_context(|| format!("{path} has no {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read from a process of its own that writes 32 MiB and waits: inside this test binary,
    /// other tests' threads allocate and free meanwhile, and a difference of this process's
    /// readings would measure them too.
    #[test]
    fn status_fields_follow_the_process() {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, time\nb = bytearray(b'\\x01') * (32 << 20)\nprint('written', flush=True)\ntime.sleep(60)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "written");
        let pid = child.id().to_string();
        let anon = status_kib(&pid, "RssAnon").unwrap();
        // One reading of both: the kernel shows the peak as at least the resident size only
        // within one reading.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let read = |name| status.lines().find_map(|l| field(l, name)).unwrap();
        let (peak, now) = (read("VmHWM"), read("VmRSS"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(anon >= 32 * 1024, "RssAnon {anon} KiB after writing 32 MiB");
        assert!(
            peak >= now && now >= anon,
            "peak {peak}, now {now}, anon {anon}"
        );
        assert!(status_kib("self", "NoSuchField").is_err());
    }

    #[test]
    fn own_process_has_memory_and_pss_at_most_rss() {
        let s = MemoryStats::of_process("self").unwrap();
        assert!(
            s.rss_kib > 0 && s.pss_kib <= s.rss_kib && s.uss_kib <= s.rss_kib,
            "{s:?}"
        );
    }

    #[test]
    fn mapping_stats_follow_a_mapped_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        std::hint::black_box(map.iter().step_by(4096).map(|&b| b as u64).sum::<u64>());
        let s = MemoryStats::of_mapping("self", &path).unwrap();
        assert_eq!(s.rss_kib, 1024, "{s:?}");
        assert_eq!(s.anon_kib, 0);
    }
}
