//! Harness for the end-to-end tests: real sidecar and worker processes, sharing a real
//! folder in /dev/shm, on models built by scripts/make_models.py.

pub use kube_zerocopy_test_env::{
    azure, bin, cluster, invalid, kueue, metric_value, repo, s3, task_pipeline, wait,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kube_zerocopy_fetch::config::{models_to_json, MODELS_ENV};
use kube_zerocopy_fetch::{Bindings, ModelFormat, ModelSource, Store};
use kube_zerocopy_worker::memory::status_kib;
use serde_json::Value;

/// Set to 1, a benchmark runs in its smoke mode: one round of a small model, which `make test`
/// runs so that a change that breaks a benchmark fails CI (its figures then mean nothing).
pub const BENCH_SMOKE_ENV: &str = "KZC_BENCH_SMOKE";

/// Whether this benchmark runs in its smoke mode ([`BENCH_SMOKE_ENV`]).
pub fn bench_smoke() -> bool {
    std::env::var(BENCH_SMOKE_ENV).is_ok_and(|v| v == "1")
}

/// Runs scripts/make_models.py with the project's torch environment.
pub fn make_model(args: &[&str]) {
    let python = std::env::var("KZC_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let status = Command::new(python)
        .arg(repo().join("scripts/make_models.py"))
        .args(args)
        .status()
        .expect("running scripts/make_models.py (run through `make test`)");
    assert!(status.success(), "make_models.py {args:?} failed");
}

pub fn source(name: &str, format: ModelFormat, path: &Path) -> ModelSource {
    ModelSource::new(name, format, &format!("file://{}", path.display()))
}

/// Asserts that a finished command succeeded, showing its stderr otherwise; returns that.
pub fn succeeded(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", out.status);
    stderr
}

/// The sha256 of a file's bytes, hex: a model's digest, as the weight server computes it.
pub fn sha256_of(path: &Path) -> String {
    kube_zerocopy_fetch::source::sha256_hex(&std::fs::read(path).unwrap())
}

/// Sends SIGTERM, as the kubelet does to stop a container, and waits for the exit.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: a signal to a child this process started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap()
}

/// A tmpfs of `size` (mount's syntax: "1m") mounted in a new folder of `parent`, for a store
/// that fills up; unmounted on drop. Mounting needs root, which CI has.
pub struct SmallTmpfs {
    pub path: PathBuf,
}

impl SmallTmpfs {
    pub fn mount(parent: &Path, size: &str) -> Self {
        let path = parent.join(format!("tmpfs-{size}"));
        std::fs::create_dir(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "mounting a small tmpfs needs root (CI runs as root)"
        );
        SmallTmpfs { path }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// One pod's volumes in a fresh folder of /dev/shm, removed on drop.
/// A running actor, killed if a test ends (or fails) without stopping it.
pub struct Actor(pub Child);

impl std::ops::Deref for Actor {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Actor {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kube-zerocopy-worker actor` in `pod` on a free port with extra arguments (the model
/// name among them); returns it and its base URL once it answers ready.
pub fn start_actor(
    pod: &Pod,
    models: &[kube_zerocopy_fetch::ModelSource],
    args: &[&str],
) -> (Actor, String) {
    start_actor_with(pod.command("kube-zerocopy-worker", models), args)
}

/// [`start_actor`] of a worker command made here (another binary, more environment).
pub fn start_actor_with(mut worker: Command, args: &[&str]) -> (Actor, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let actor = worker
        .args(["actor", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .spawn()
        .unwrap();
    let mut actor = Actor(actor);
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while ureq::get(format!("{base}/v2/health/ready")).call().is_err() {
        assert!(actor.try_wait().unwrap().is_none(), "the actor exited");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the actor never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (actor, base)
}

/// The status, the header `Inference-Header-Content-Length` and the body of an Open Inference
/// Protocol answer.
pub fn read_answer(
    mut response: ureq::http::Response<ureq::Body>,
) -> (u16, Option<usize>, Vec<u8>) {
    use std::io::Read;
    let json_length = response
        .headers()
        .get(kube_zerocopy_worker::oip::HEADER_LENGTH)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let mut bytes = Vec::new();
    response
        .body_mut()
        .as_reader()
        .read_to_end(&mut bytes)
        .unwrap();
    (response.status().as_u16(), json_length, bytes)
}

/// Counts the files renamed into `dir` (how every output is put in place), by name.
pub struct RenameCounter {
    fd: i32,
}

impl RenameCounter {
    pub fn watch(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let path = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: plain syscalls on a descriptor this struct owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let watch = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MOVED_TO) };
        assert!(watch >= 0);
        RenameCounter { fd }
    }

    /// Every name renamed into the folder since `watch`, with how many times.
    pub fn counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe { libc::read(self.fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                return counts;
            }
            let mut at = 0;
            while at < n as usize {
                // SAFETY: the kernel wrote whole events, each a header and `len` name bytes.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buffer[at..].as_ptr().cast()) };
                let start = at + std::mem::size_of::<libc::inotify_event>();
                let name = &buffer[start..start + event.len as usize];
                let name = String::from_utf8_lossy(name)
                    .trim_end_matches('\0')
                    .to_owned();
                *counts.entry(name).or_default() += 1;
                at = start + event.len as usize;
            }
        }
    }
}

impl Drop for RenameCounter {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this struct owns.
        unsafe { libc::close(self.fd) };
    }
}

pub struct Pod {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub bindings: PathBuf,
}

impl Pod {
    pub fn new() -> Self {
        Self::in_dir(Path::new("/dev/shm"))
    }

    pub fn in_dir(parent: &Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kzc-test-")
            .tempdir_in(parent)
            .unwrap();
        let store = dir.path().join("store");
        let bindings = dir.path().join("bindings");
        // As Kubernetes does, the termination message's file exists before the container runs.
        std::fs::write(dir.path().join("termination-log"), "").unwrap();
        Pod {
            dir,
            store,
            bindings,
        }
    }

    /// A pod with its own bindings on the store of `other` (node sharing).
    pub fn sharing_store_of(other: &Pod) -> Self {
        let mut pod = Self::new();
        pod.store = other.store.clone();
        pod
    }

    pub fn env(&self, models: &[ModelSource]) -> Vec<(String, String)> {
        vec![
            (MODELS_ENV.into(), models_to_json(models)),
            ("KZC_STORE".into(), self.store.to_string_lossy().into()),
            (
                "KZC_BINDINGS".into(),
                self.bindings.to_string_lossy().into(),
            ),
            (
                "KZC_DOWNLOAD_DIR".into(),
                self.dir.path().join("downloads").to_string_lossy().into(),
            ),
            (
                "KZC_TERMINATION_LOG".into(),
                self.termination_log().to_string_lossy().into(),
            ),
        ]
    }

    /// The termination message of the last process that failed in this pod.
    pub fn termination_log(&self) -> PathBuf {
        self.dir.path().join("termination-log")
    }

    pub fn command(&self, binary: &str, models: &[ModelSource]) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.envs(self.env(models));
        cmd
    }

    /// `kube-zerocopy-weight-server publish`, to completion.
    pub fn publish(&self, models: &[ModelSource]) -> Output {
        self.command("kube-zerocopy-weight-server", models)
            .arg("publish")
            .output()
            .unwrap()
    }

    pub fn store(&self) -> Store {
        Store::new(&self.store)
    }

    pub fn bindings(&self) -> Bindings {
        Bindings::new(&self.bindings)
    }

    /// The published model folders.
    pub fn published(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.store.join("blobs"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Folders left in the staging area.
    pub fn staging(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.store.join(".staging"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Starts `kube-zerocopy-worker inspect --hold`; returns once it has reported.
    pub fn spawn_inspect(
        &self,
        models: &[ModelSource],
        loader: &str,
        input: &Path,
        output: &Path,
    ) -> Result<Worker> {
        let worker = self.command("kube-zerocopy-worker", models);
        Self::spawn_inspect_with(worker, loader, input, output)
    }

    /// `inspect --hold` of a worker command made here (another binary, more environment).
    pub fn spawn_inspect_with(
        mut worker: Command,
        loader: &str,
        input: &Path,
        output: &Path,
    ) -> Result<Worker> {
        let mut child = worker
            .args(["inspect", "--hold", "--loader", loader])
            .arg("--input-file")
            .arg(input)
            .arg("--output-file")
            .arg(output)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // The anonymous memory's peak while it loads, sampled every millisecond: a loader that
        // copies the weights and frees the copy before it reports would go unseen afterwards.
        let pid = child.id().to_string();
        let loading = Arc::new(AtomicBool::new(true));
        let sampler = {
            let loading = loading.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while loading.load(Ordering::Relaxed) {
                    match status_kib(&pid, "RssAnon") {
                        Ok(anon) => peak = peak.max(anon),
                        Err(_) => break,
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                peak
            })
        };
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        loading.store(false, Ordering::Relaxed);
        let peak_anon_kib = sampler.join().unwrap_or(0);
        read?;
        if line.trim().is_empty() {
            let out = child.wait_with_output()?;
            bail!(
                "worker reported nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: Value =
            serde_json::from_str(&line).with_context(|| format!("report {line:?}"))?;
        let stdin = child.stdin.take();
        Ok(Worker {
            child,
            stdin,
            report,
            peak_anon_kib,
        })
    }
}

impl Default for Pod {
    fn default() -> Self {
        Self::new()
    }
}

/// A worker process held alive after its report.
pub struct Worker {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub report: Value,
    /// The most anonymous memory it held until it reported (sampled), KiB.
    pub peak_anon_kib: u64,
}

impl Worker {
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Lets the worker exit and checks that it exited cleanly.
    pub fn finish(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "worker exited with {status}");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tensor "output" of a safetensors file.
pub fn read_output(path: &Path) -> tch::Tensor {
    tch::Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "output")
        .map(|(_, t)| t)
        .expect("an output tensor")
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
