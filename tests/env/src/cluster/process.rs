//! The components' processes: started from one thread so that they die with the test process,
//! logged to one file each, stopped with a grace period.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One running component.
pub struct Process {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Fails with the component's log when it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts processes from one long-lived thread, so that PR_SET_PDEATHSIG (which fires when the
/// thread that forked exits) kills them only when this control plane or the test process ends.
pub struct Spawner {
    tx: Option<mpsc::Sender<(Command, mpsc::Sender<io::Result<Child>>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Spawner {
    pub fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<io::Result<Child>>)>();
        let thread = std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Spawner {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts `cmd` with stdout and stderr appended to (or, unless `append`, written anew
    /// into) `log`.
    pub fn spawn_logged(
        &self,
        name: &'static str,
        mut cmd: Command,
        log: &Path,
        append: bool,
    ) -> Result<Process> {
        let file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let program = PathBuf::from(cmd.get_program());
        let child = self
            .spawn(cmd)
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Process {
            name,
            child,
            log: log.to_owned(),
        })
    }

    fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply, rx) = mpsc::channel();
        let gone = || io::Error::other("the spawner thread is gone");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send((cmd, reply))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub async fn terminate(mut p: Process, grace: Duration) -> Result<()> {
    // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
    unsafe {
        libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let start = Instant::now();
    while p.child.try_wait()?.is_none() {
        if start.elapsed() > grace {
            p.child.kill()?;
            p.child.wait()?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// [`terminate`] for a drop, which cannot await: the test servers' (S3, Azure) folders are
/// then kept on a panic, or with `KZC_KEEP_CLUSTER`, and removed otherwise.
pub fn stop_server(
    process: Option<Process>,
    grace: Duration,
    dir: Option<tempfile::TempDir>,
    what: &str,
) {
    if let Some(mut p) = process {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(p.child.try_wait(), Ok(None)) && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(50));
        }
        p.kill();
    }
    let keep = std::thread::panicking() || std::env::var_os(super::KEEP_ENV).is_some();
    if let (true, Some(dir)) = (keep, dir) {
        eprintln!("{what}'s folder and log kept in {}", dir.keep().display());
    }
}

/// Waits until `url` answers (any HTTP status, with `any_status`; else 2xx) while `process`
/// lives, or fails with the tail of its log after `timeout`: the test servers' start-up.
pub fn wait_until_answers(
    process: &mut Process,
    url: &str,
    any_status: bool,
    timeout: Duration,
    log: &Path,
) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(!any_status)
        .build()
        .into();
    let start = Instant::now();
    loop {
        // Fails with the log's tail if it exited (a taken port, a folder it cannot use).
        process.check_alive()?;
        let last = match agent.get(url).call() {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() > timeout {
            anyhow::bail!(
                "{url} did not answer in {timeout:?} ({last}); the log {}:\n{}",
                log.display(),
                tail(log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = File::open(path)
        .and_then(|mut f| {
            let mut s = String::new();
            io::Read::read_to_string(&mut f, &mut s).map(|_| s)
        })
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
