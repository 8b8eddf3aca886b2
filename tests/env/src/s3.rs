//! A real S3 server on 127.0.0.1 for the end-to-end tests: versitygw (Apache-2.0), built from its
//! pinned Go module by scripts/s3-server.sh, serving a fresh temporary folder with its posix
//! backend. It checks SigV4 signatures (headers and presigned URLs) and serves what a model
//! fetch relies on: Content-Length, strong MD5 ETags (quoted), `Accept-Ranges: bytes`, 206 with
//! Content-Range, If-Match (412 when it does not hold), path-style addressing.
//!
//! Buckets and objects are put with curl's `--aws-sigv4`, so that the only S3 client in a test
//! is the one under test. The posix backend keeps ETags in user xattrs: the temporary folder
//! must be on a filesystem that has them (ext4, xfs, btrfs; tmpfs from Linux 6.6).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cluster::process::{stop_server, wait_until_answers, Process, Spawner};
use crate::cluster::{free_port, run_script};

/// The server's root user; it owns every bucket (versitygw runs in single-account mode).
pub const ACCESS_KEY: &str = "kzc-test-access";
pub const SECRET_KEY: &str = "kzc-test-secret";
pub const REGION: &str = "us-east-1";
/// The path versitygw answers 200 on once it listens (`--health`).
const HEALTH: &str = "/kzc-health";
/// It starts in well under a second; the bound is for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// It exits about a second after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running server; stopped (SIGTERM, then SIGKILL) and its folder removed on drop. The folder
/// (with the server's log) is kept when the test panics or `KZC_KEEP_CLUSTER` is set.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`: objects are at `{endpoint}/{bucket}/{key}` (path style).
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// The served folder: bucket `b` is the folder `root/b` and its object `k` the file
    /// `root/b/k`, which a test may change behind the server's back (its ETag stays).
    pub root: PathBuf,
    /// The server's stdout and stderr, one line per request.
    pub log: PathBuf,
    process: Option<Process>,
    dir: Option<tempfile::TempDir>,
    // Last: the server gets SIGKILL (PR_SET_PDEATHSIG) once the spawner's thread ends, so the
    // spawner lives as long as the server, and the server also dies with the test process.
    _spawner: Spawner,
}

impl S3Server {
    /// Builds versitygw if needed (minutes, the first time: from an async test call this
    /// through `spawn_blocking`), starts it on a free port, and returns once it answers.
    pub fn start() -> Result<S3Server> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST)
    }

    /// [`S3Server::start`] on another address of this machine (the pods' bridge, for pods).
    pub fn start_on(address: std::net::Ipv4Addr) -> Result<S3Server> {
        let bin = run_script("s3-server.sh", &[])?.trim().to_owned();
        if bin.is_empty() {
            bail!("scripts/s3-server.sh printed no folder");
        }
        let dir = tempfile::Builder::new()
            .prefix("kzc-s3-")
            .tempdir()
            .context("creating the S3 server's folder")?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        let log = dir.path().join("versitygw.log");
        let port = free_port()?;
        let mut cmd = Command::new(Path::new(&bin).join("versitygw"));
        cmd.arg("--access")
            .arg(ACCESS_KEY)
            .arg("--secret")
            .arg(SECRET_KEY)
            .arg("--region")
            .arg(REGION)
            .arg("--port")
            .arg(format!("{address}:{port}"))
            .arg("--health")
            .arg(HEALTH)
            .arg("posix")
            .arg(&root);
        let spawner = Spawner::new()?;
        let process = spawner.spawn_logged("versitygw", cmd, &log, false)?;
        let mut server = S3Server {
            endpoint: format!("http://{address}:{port}"),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            region: REGION.into(),
            root,
            log,
            process: Some(process),
            dir: Some(dir),
            _spawner: spawner,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}{HEALTH}", self.endpoint);
        wait_until_answers(
            self.process.as_mut().unwrap(),
            &url,
            false,
            READY_TIMEOUT,
            &self.log,
        )
    }

    /// The path-style URL of an object. Keys are kept to characters that need no escaping
    /// (letters, digits, `-._~/`), so that the URL curl signs is the one the server checks.
    pub fn url(&self, bucket: &str, key: &str) -> Result<String> {
        let plain = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b));
        if !plain || key.is_empty() {
            bail!("key {key:?} is empty or would need URL escaping");
        }
        Ok(format!("{}/{key}", self.bucket_url(bucket)?))
    }

    /// S3's bucket names: 3 to 63 lowercase letters, digits, '-' and '.'.
    fn bucket_url(&self, bucket: &str) -> Result<String> {
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !valid {
            bail!("{bucket:?} is not a valid bucket name");
        }
        Ok(format!("{}/{bucket}", self.endpoint))
    }

    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let url = self.bucket_url(name)?;
        self.curl(
            &format!("creating bucket {name}"),
            &["-X".as_ref(), "PUT".as_ref(), url.as_ref()],
        )?;
        Ok(())
    }

    /// Puts an object from memory (through a file, as [`S3Server::put_file`]).
    pub fn put_object(&self, bucket: &str, key: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.dir.as_ref().unwrap().path();
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        file.write_all(bytes)?;
        file.flush()?;
        self.put_file(bucket, key, file.path())
    }

    /// An object's bytes.
    pub fn get_object(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let url = self.url(bucket, key)?;
        self.curl(&format!("getting s3://{bucket}/{key}"), &[url.as_ref()])
    }

    /// Puts a file as an object, streamed by curl (`-T`): a model of gigabytes is never read
    /// into this process's memory.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) -> Result<()> {
        let url = self.url(bucket, key)?;
        self.curl(
            &format!("putting {} as s3://{bucket}/{key}", path.display()),
            &["-T".as_ref(), path.as_os_str(), url.as_ref()],
        )?;
        Ok(())
    }

    /// Runs curl with a SigV4 signature for this server: the answer's body, or an error with
    /// it unless 2xx.
    fn curl(&self, what: &str, args: &[&OsStr]) -> Result<Vec<u8>> {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail-with-body"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.region))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            // S3 requires this header; curl before 8.x does not send it but signs its value as
            // the payload's hash when given (newer curl sends this same value itself).
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(args)
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!(
                "{what}: curl {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out.stdout)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        stop_server(
            self.process.take(),
            STOP_GRACE,
            self.dir.take(),
            "S3 server",
        );
    }
}
