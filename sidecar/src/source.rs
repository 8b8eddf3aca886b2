//! Fetching a model's source file, hashing it on the way.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A source file on local disk, with its sha256. A downloaded file is removed on drop.
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    downloaded: bool,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if self.downloaded {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Copies `reader` to `out` (if any) while hashing; returns (sha256, bytes).
fn hash_stream(
    mut reader: impl Read,
    mut out: Option<&mut File>,
) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some(out) = out.as_deref_mut() {
            out.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Fetches `uri` (`file://`, `http://`, `https://`). Downloads land in `download_dir`.
pub fn fetch(uri: &str, download_dir: &Path) -> Result<Fetched> {
    if let Some(path) = uri.strip_prefix("file://") {
        let file = File::open(path).with_context(|| format!("cannot open source {uri}"))?;
        let (sha256, size) =
            hash_stream(file, None).with_context(|| format!("reading source {uri}"))?;
        return Ok(Fetched {
            path: PathBuf::from(path),
            sha256,
            size,
            downloaded: false,
        });
    }
    if uri.starts_with("http://") || uri.starts_with("https://") {
        return download(uri, download_dir);
    }
    bail!("source {uri}: unsupported scheme; use file://, http:// or https://")
}

const ATTEMPTS: u32 = 3;

fn download(uri: &str, download_dir: &Path) -> Result<Fetched> {
    std::fs::create_dir_all(download_dir)
        .with_context(|| format!("creating download folder {}", download_dir.display()))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        let path = download_dir.join(format!(".download-{}-{attempt}", std::process::id()));
        let result = (|| -> Result<(String, u64)> {
            let response = agent.get(uri).call().map_err(|e| match e {
                ureq::Error::StatusCode(code) => {
                    anyhow::anyhow!("source {uri} answered HTTP {code}")
                }
                other => anyhow::anyhow!("source {uri} is unreachable: {other}"),
            })?;
            let mut file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let reader = response.into_body().into_reader();
            let (sha, size) = hash_stream(reader, Some(&mut file))
                .with_context(|| format!("downloading {uri}"))?;
            file.sync_all()?;
            Ok((sha, size))
        })();
        match result {
            Ok((sha256, size)) => {
                return Ok(Fetched {
                    path,
                    sha256,
                    size,
                    downloaded: true,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                // A 4xx will not change on retry.
                let permanent = e.to_string().contains("answered HTTP 4");
                tracing::warn!(attempt, error = %format!("{e:#}"), "download failed");
                last_error = Some(e);
                if permanent || attempt == ATTEMPTS {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
            }
        }
    }
    Err(last_error.expect("at least one attempt"))
}
