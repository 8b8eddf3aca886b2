//! A real Azure Blob endpoint on 127.0.0.1 for the end-to-end tests: Azurite, Microsoft's own
//! emulator, installed from npm by scripts/azure-server.sh and serving a fresh temporary
//! folder. It checks shared-key and SAS signatures and serves what a fetch relies on:
//! Content-Length, quoted ETags, `Accept-Ranges: bytes`, 206 with Content-Range, If-Match (412
//! ConditionNotMet), path-style URLs `{endpoint}/{container}/{blob}`.
//!
//! Containers and blobs are put and read with Microsoft's Python client
//! (scripts/azure-blob.py), so that the only Rust client in a test is the one under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cluster::process::{stop_server, wait_until_answers, Process, Spawner};
use crate::cluster::{free_port, run_script};

/// The account the server serves, and its key (base64, as Azure's).
pub const ACCOUNT: &str = "kzctest";
pub const ACCOUNT_KEY: &str =
    "a3pjLXRlc3Qta2V5LW9mLXRoZS1henVyaXRlLWFjY291bnQtZm9yLWt1YmUtemVyb2NvcHk=";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running Azurite; stopped (SIGTERM, then SIGKILL) and its folder removed on drop, kept
/// when the test panics or `KZC_KEEP_CLUSTER` is set.
pub struct AzureServer {
    /// `http://127.0.0.1:PORT/<account>`: the account's blob endpoint.
    pub endpoint: String,
    pub account: String,
    pub key: String,
    pub log: PathBuf,
    /// The interpreter of the installed Python client.
    python: PathBuf,
    process: Option<Process>,
    dir: Option<tempfile::TempDir>,
    // Last: the server dies with the spawner's thread (PR_SET_PDEATHSIG).
    _spawner: Spawner,
}

impl AzureServer {
    /// Installs Azurite if needed (a minute, the first time), starts it on a free port, and
    /// returns once it answers.
    pub fn start() -> Result<AzureServer> {
        let installed = PathBuf::from(run_script("azure-server.sh", &[])?.trim());
        let dir = tempfile::Builder::new()
            .prefix("kzc-azure-")
            .tempdir()
            .context("creating the Azure server's folder")?;
        let log = dir.path().join("azurite.log");
        let port = free_port()?;
        let mut cmd = Command::new(installed.join("node_modules/.bin/azurite-blob"));
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path().join("data"))
            // Azurite 3.35 knows API versions up to 2025-11-05; Microsoft's newer clients
            // send later ones.
            .arg("--skipApiVersionCheck")
            // Why it refuses a request (a signature it computed otherwise) is only said there.
            .arg("--debug")
            .arg(dir.path().join("debug.log"))
            .env("AZURITE_ACCOUNTS", format!("{ACCOUNT}:{ACCOUNT_KEY}"));
        let spawner = Spawner::new()?;
        let process = spawner.spawn_logged("azurite", cmd, &log, false)?;
        let mut server = AzureServer {
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
            account: ACCOUNT.into(),
            key: ACCOUNT_KEY.into(),
            log,
            python: installed.join("client/bin/python"),
            process: Some(process),
            dir: Some(dir),
            _spawner: spawner,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Azurite has no health path: any answer (403 to an unsigned listing) means it listens.
    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}?comp=list", self.endpoint);
        wait_until_answers(
            self.process.as_mut().unwrap(),
            &url,
            true,
            READY_TIMEOUT,
            &self.log,
        )
    }

    pub fn create_container(&self, name: &str) -> Result<()> {
        self.client(&["create-container", name])?;
        Ok(())
    }

    pub fn put_file(&self, container: &str, blob: &str, path: &Path) -> Result<()> {
        let path = path.to_str().context("a file path that is not UTF-8")?;
        self.client(&["put", container, blob, path])?;
        Ok(())
    }

    pub fn put_object(&self, container: &str, blob: &str, bytes: &[u8]) -> Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), bytes)?;
        self.put_file(container, blob, file.path())
    }

    pub fn get_object(&self, container: &str, blob: &str) -> Result<Vec<u8>> {
        self.client(&["get", container, blob])
    }

    /// scripts/azure-blob.py with this server's endpoint and key: its stdout, or an error.
    fn client(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(&self.python)
            .arg(crate::repo().join("scripts/azure-blob.py"))
            .args([&self.endpoint, &self.account, &self.key])
            .args(args)
            .output()
            .context("running scripts/azure-blob.py")?;
        if !out.status.success() {
            bail!(
                "azure-blob.py {args:?}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }
}

impl Drop for AzureServer {
    fn drop(&mut self) {
        stop_server(
            self.process.take(),
            STOP_GRACE,
            self.dir.take(),
            "Azure server",
        );
    }
}
