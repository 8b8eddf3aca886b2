//! Downloading an http(s) model source into a local file, hashing it on the way.
//!
//! A transfer is broken off when no byte arrives for [`Policy::stall`], not after a fixed total
//! time: a large model on a slow link takes as long as it takes. A broken transfer resumes with
//! a range request from the last byte written, guarded by `If-Range` (the server's ETag or
//! Last-Modified), so a file that changed on the server meanwhile is fetched again from the
//! start instead of being spliced; the hash then starts over too. Attempts are counted only
//! while they make no progress. Credentials come from a file (a Secret mounted into the weight
//! server only), never from the URI.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use backon::BackoffBuilder;
use sha2::{Digest, Sha256};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::DefaultConnector;

use crate::networks::{AddressRefused, GuardedResolver, SourceNetworks};

/// Where Debian (the runtime image) and RHEL-like systems keep the system's CA bundle.
const SYSTEM_CA_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// How a download behaves; [`Policy::default`] is what the weight server uses.
#[derive(Clone, Debug)]
pub struct Policy {
    /// A transfer that delivers no byte for this long is broken off (and resumed).
    pub stall: Duration,
    /// Attempts in a row without a new byte before giving up.
    pub attempts_without_progress: u32,
    /// The first pause between attempts; it doubles up to 30 s.
    pub first_pause: Duration,
    /// The most bytes the file may have (the model's declared size); more is an error.
    pub max_bytes: Option<u64>,
    /// The most bytes any source may have here, whatever it declares (the node agent's: its
    /// store's capacity, as a larger source could never be laid out).
    pub ceiling: Option<u64>,
    /// A bearer token's file (a mounted Secret key), sent as `Authorization: Bearer`.
    pub bearer_token_file: Option<PathBuf>,
    /// PEM certificates trusted besides the system's bundle (a mounted ConfigMap key).
    pub ca_file: Option<PathBuf>,
    /// The internal networks the source may be reached in; `None`: any address.
    pub networks: Option<Arc<SourceNetworks>>,
    /// A transfer slower than this over `rate_window` fails: a source that sends a byte just
    /// before each stall timeout would otherwise hold its model's lock for ever.
    pub min_bytes_per_second: Option<u64>,
    pub rate_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            stall: Duration::from_secs(30),
            attempts_without_progress: 4,
            first_pause: Duration::from_secs(1),
            max_bytes: None,
            ceiling: None,
            bearer_token_file: None,
            ca_file: None,
            networks: None,
            min_bytes_per_second: None,
            rate_window: Duration::from_secs(60),
        }
    }
}

/// A finished download.
#[derive(Debug, PartialEq, Eq)]
pub struct Downloaded {
    pub sha256: String,
    pub bytes: u64,
}

/// Why an attempt ended. A transient failure is retried (resuming if bytes were written); a
/// permanent one ends the download at once.
#[derive(Debug)]
pub(crate) enum Failure {
    Transient(anyhow::Error),
    Permanent(anyhow::Error),
}

/// Bytes written so far, and the file's size when the server announced it.
/// Called from the threads that read (several at once for a source read by ranges).
pub type OnProgress<'a> = &'a (dyn Fn(u64, Option<u64>) + Sync);

/// Downloads `uri` into `file` (truncated first), resuming broken transfers; tells
/// `on_progress` after each chunk written.
pub fn download(
    uri: &str,
    file: &mut File,
    policy: &Policy,
    on_progress: OnProgress,
) -> Result<Downloaded> {
    let agent = agent(uri, policy)?;
    let token = policy
        .bearer_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let mut transfer = Transfer {
        uri,
        file,
        hasher: Sha256::new(),
        written: 0,
        validator: None,
    };
    transfer.start_over()?;
    retrying(policy, uri, "download broken off; resuming", |received| {
        let attempt = transfer.attempt(&agent, token.as_deref(), policy, on_progress);
        *received = transfer.written;
        attempt
    })?;
    transfer
        .file
        .sync_all()
        .context("syncing the downloaded file")?;
    Ok(Downloaded {
        sha256: hex::encode(transfer.hasher.finalize()),
        bytes: transfer.written,
    })
}

/// Runs `attempt` until it succeeds or fails for good. A transient failure is tried again
/// after a pause; an attempt that got further (the bytes it holds, which it sets in its
/// argument) starts the count and the pauses over, and after
/// [`Policy::attempts_without_progress`] attempts in a row without progress it gives up.
/// `retrying` is what the log says between attempts.
pub(crate) fn retrying<T>(
    policy: &Policy,
    uri: &str,
    retrying: &str,
    mut attempt: impl FnMut(&mut u64) -> Result<T, Failure>,
) -> Result<T> {
    let mut received = 0;
    let mut pause = pauses(policy);
    let mut attempts_without_progress = 0;
    loop {
        let before = received;
        let error = match attempt(&mut received) {
            Ok(done) => return Ok(done),
            Err(Failure::Permanent(e)) => return Err(e),
            Err(Failure::Transient(e)) => e,
        };
        if received > before {
            attempts_without_progress = 0;
            pause = pauses(policy);
        } else {
            attempts_without_progress += 1;
        }
        if attempts_without_progress >= policy.attempts_without_progress {
            return Err(error.context(format!(
                "giving up on {uri} after {attempts_without_progress} attempts in a row \
                 without progress ({received} bytes received)"
            )));
        }
        let wait = pause.next().unwrap_or(Duration::from_secs(30));
        tracing::warn!(
            uri = %kube_zerocopy_runtime::redact::uri(uri),
            received,
            retry_in_ms = wait.as_millis() as u64,
            error = %kube_zerocopy_runtime::redact::uris_in(&format!("{error:#}")),
            "{retrying}"
        );
        std::thread::sleep(wait);
    }
}

/// The pauses between attempts: from [`Policy::first_pause`], doubling up to 30 s.
fn pauses(policy: &Policy) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(policy.first_pause)
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(usize::MAX)
        .build()
}

/// The HTTP client for one source: stall timeout, no downgrade from https, the trusted CAs.
pub(crate) fn agent(uri: &str, policy: &Policy) -> Result<ureq::Agent> {
    let config = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(policy.stall))
        // An https source may redirect to https only: a redirect to plain http is refused.
        .https_only(uri.starts_with("https://"))
        .tls_config(
            TlsConfig::builder()
                .root_certs(trusted_roots(policy.ca_file.as_deref())?)
                .build(),
        )
        .build();
    Ok(match &policy.networks {
        Some(networks) => ureq::Agent::with_parts(
            config,
            DefaultConnector::default(),
            GuardedResolver {
                networks: networks.clone(),
                inner: DefaultResolver::default(),
            },
        ),
        None => config.into(),
    })
}

/// The system's CA bundle plus `extra`; ureq's built-in roots when neither has a certificate.
fn trusted_roots(extra: Option<&Path>) -> Result<RootCerts> {
    let mut certs = Vec::new();
    if let Some(pem) = SYSTEM_CA_BUNDLES.iter().find_map(|p| std::fs::read(p).ok()) {
        certs.extend(pem_certificates(&pem));
    }
    if let Some(path) = extra {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA bundle {}", path.display()))?;
        let before = certs.len();
        certs.extend(pem_certificates(&pem));
        if certs.len() == before {
            anyhow::bail!("the CA bundle {} holds no PEM certificate", path.display());
        }
    }
    Ok(if certs.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(certs))
    })
}

fn pem_certificates(pem: &[u8]) -> Vec<Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

pub(crate) fn read_token(path: &Path) -> Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the bearer token {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() || token.chars().any(|c| c.is_control()) {
        anyhow::bail!(
            "the bearer token {} is empty or not a single line",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// One download's state across attempts.
struct Transfer<'a> {
    uri: &'a str,
    file: &'a mut File,
    hasher: Sha256,
    written: u64,
    /// The ETag (strong) or Last-Modified of the bytes written so far: a resumed request
    /// continues them only if the file is still the same.
    validator: Option<String>,
}

impl Transfer<'_> {
    fn start_over(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .context("truncating the download file")?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = Sha256::new();
        self.written = 0;
        self.validator = None;
        Ok(())
    }

    fn attempt(
        &mut self,
        agent: &ureq::Agent,
        token: Option<&str>,
        policy: &Policy,
        on_progress: OnProgress,
    ) -> std::result::Result<(), Failure> {
        let uri = self.uri;
        // A resumed request needs a validator: without one, the file may have changed.
        let resume = self.written > 0 && self.validator.is_some();
        if self.written > 0 && !resume {
            self.start_over().map_err(Failure::Permanent)?;
        }
        // Compressed transfer would make byte ranges refer to other bytes than the file's.
        let mut request = agent.get(uri).header("Accept-Encoding", "identity");
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if resume {
            request = request
                .header("Range", format!("bytes={}-", self.written))
                .header("If-Range", self.validator.as_deref().unwrap_or_default());
        }
        let response = request
            .call()
            .map_err(|e| classify(uri, e, "source.bearerTokenSecret"))?;
        let headers = response.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let total = match response.status().as_u16() {
            206 if resume => {
                let (start, total) =
                    header("Content-Range")
                        .and_then(content_range)
                        .ok_or_else(|| {
                            Failure::Transient(anyhow!(
                                "{uri}: a partial answer without a valid Content-Range"
                            ))
                        })?;
                if start != self.written {
                    return Err(Failure::Transient(anyhow!(
                        "{uri}: asked for bytes from {}, the server sent them from {start}",
                        self.written
                    )));
                }
                total
            }
            200 => {
                if self.written > 0 {
                    tracing::info!(uri = %kube_zerocopy_runtime::redact::uri(uri), "the server sent the whole file again (it changed, or it ignores ranges): starting over");
                    self.start_over().map_err(Failure::Permanent)?;
                }
                self.validator = validator(header("ETag"), header("Last-Modified"));
                header("Content-Length").and_then(|v| v.parse().ok())
            }
            status => {
                return Err(Failure::Permanent(anyhow!(
                    "{uri} answered HTTP {status}, expected 200"
                )))
            }
        };
        if let Some(total) = total {
            policy
                .check_size(uri, total, true)
                .map_err(Failure::Permanent)?;
        }
        let mut body = response.into_body();
        let mut reader = body.with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut pace = Pace::new(policy);
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    return Err(Failure::Transient(anyhow!(
                        "{uri}: the transfer broke off after {} bytes: {e}",
                        self.written
                    )))
                }
            };
            policy
                .check_size(uri, self.written + n as u64, false)
                .map_err(Failure::Permanent)?;
            self.file
                .write_all(&buf[..n])
                .with_context(|| format!("writing the download of {uri}"))
                .map_err(Failure::Permanent)?;
            self.hasher.update(&buf[..n]);
            self.written += n as u64;
            on_progress(self.written, total);
            pace.received(n, uri)?;
        }
        match total {
            Some(total) if total != self.written => Err(Failure::Transient(anyhow!(
                "{uri}: the transfer ended after {} of {total} bytes",
                self.written
            ))),
            _ => Ok(()),
        }
    }
}

/// Measures a transfer's rate window by window (see [`Policy::min_bytes_per_second`]).
pub(crate) struct Pace {
    min_bytes_per_second: Option<u64>,
    window: Duration,
    window_started: std::time::Instant,
    in_window: u64,
}

impl Pace {
    pub(crate) fn new(policy: &Policy) -> Pace {
        Pace {
            min_bytes_per_second: policy.min_bytes_per_second,
            window: policy.rate_window,
            window_started: std::time::Instant::now(),
            in_window: 0,
        }
    }

    /// Counts `n` bytes received; fails for good when a whole window went by below the rate
    /// (a slower source is not tried again: it would hold the lock as long once more).
    pub(crate) fn received(&mut self, n: usize, uri: &str) -> Result<(), Failure> {
        let Some(min) = self.min_bytes_per_second else {
            return Ok(());
        };
        self.in_window += n as u64;
        let elapsed = self.window_started.elapsed();
        if elapsed < self.window {
            return Ok(());
        }
        if (self.in_window as f64) < min as f64 * elapsed.as_secs_f64() {
            return Err(Failure::Permanent(anyhow!(
                "{uri} sent {} bytes in {:.0} s, slower than the {min} bytes a second a source \
                 must keep up; nothing was published",
                self.in_window,
                elapsed.as_secs_f64()
            )));
        }
        self.window_started = std::time::Instant::now();
        self.in_window = 0;
        Ok(())
    }
}

impl Policy {
    /// Fails when a source of `bytes` (`announced` by the server, or received so far) is more
    /// than the model's declared size or the ceiling allow.
    pub(crate) fn check_size(&self, uri: &str, bytes: u64, announced: bool) -> Result<()> {
        let what = match announced {
            true => format!("is {bytes} bytes"),
            false => "sent more".to_owned(),
        };
        if let Some(max) = self.max_bytes.filter(|&max| bytes > max) {
            anyhow::bail!(
                "{uri} {what}, more than the model's declared size ({max} bytes, source.size); \
                 raise source.size if the file is right"
            );
        }
        if let Some(ceiling) = self.ceiling.filter(|&ceiling| bytes > ceiling) {
            anyhow::bail!(
                "{uri} {what}, more than the node's store holds ({ceiling} bytes): it could \
                 never be laid out there; use sharing: Pod, or a larger nodeStore.capacityMiB"
            );
        }
        Ok(())
    }
}

/// What `If-Range` may carry: a strong ETag, else a Last-Modified date (weak ETags may not).
fn validator(etag: Option<&str>, last_modified: Option<&str>) -> Option<String> {
    etag.filter(|e| !e.starts_with("W/"))
        .or(last_modified)
        .map(str::to_owned)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`): the start, and the total when known.
pub(crate) fn content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, total))
}

/// Which errors another attempt may cure; `credentials` names the field that gives the
/// source's credentials.
pub(crate) fn classify(uri: &str, error: ureq::Error, credentials: &str) -> Failure {
    use ureq::Error as E;
    match error {
        E::StatusCode(code @ (408 | 425 | 429 | 500..=599)) => {
            Failure::Transient(anyhow!("{uri} answered HTTP {code}"))
        }
        // The range asked for no longer fits the file: start over.
        E::StatusCode(416) => {
            Failure::Transient(anyhow!("{uri} answered HTTP 416 to a resumed request"))
        }
        E::StatusCode(code @ (401 | 403)) => Failure::Permanent(anyhow!(
            "{uri} answered HTTP {code}: the source needs credentials it accepts ({credentials})"
        )),
        E::StatusCode(code) => Failure::Permanent(anyhow!("{uri} answered HTTP {code}")),
        E::RequireHttpsOnly(to) => Failure::Permanent(anyhow!(
            "{uri} redirected to a plain http address ({to}); an https source may not be \
             downgraded"
        )),
        E::TooManyRedirects => Failure::Permanent(anyhow!("{uri}: too many redirects")),
        e @ (E::Tls(_) | E::Rustls(_) | E::Pem(_)) => tls_failed(uri, &e),
        // rustls reports a certificate it does not trust through the stream, as an io error.
        E::Io(e)
            if e.get_ref()
                .is_some_and(|inner| inner.is::<AddressRefused>()) =>
        {
            Failure::Permanent(anyhow::Error::new(AddressRefused).context(uri.to_owned()))
        }
        E::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            tls_failed(uri, &e)
        }
        e @ (E::BadUri(_) | E::Http(_)) => Failure::Permanent(anyhow!("{uri}: {e}")),
        e => Failure::Transient(anyhow!("{uri} is unreachable: {e}")),
    }
}

fn tls_failed(uri: &str, error: &dyn std::fmt::Display) -> Failure {
    Failure::Permanent(anyhow!(
        "{uri}: TLS failed ({error}); if the server's certificate comes from a private CA, \
         give it in source.caConfigMap"
    ))
}

#[cfg(test)]
mod tests;
