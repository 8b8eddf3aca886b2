//! A remote model source read by byte ranges, straight into place: `s3://` and `az://`
//! objects and `http(s)://` files whose server offers ranges.
//!
//! Nothing is downloaded into a file first: the layout asks for the ranges it needs, several
//! at once, and each lands where it belongs in the store. Every range is asked `If-Match` the
//! ETag the object had when it was opened, so an object replaced meanwhile is refused (HTTP
//! 412), never spliced. A range broken off (no byte for [`Policy::stall`], or the connection
//! lost) is resumed from its last byte, alone; attempts are counted only while they make no
//! progress. Object store requests are signed by `object_store` (S3's SigV4, Azure's SAS, with
//! the credentials of the pipeline's Secret or of the environment; see [`crate::cloud`]) and
//! sent by the same HTTP client as http(s) sources, as presigned URLs that never appear in
//! logs or errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use std::sync::Arc;

use crate::cloud::{self, Storage};
use crate::config::ModelSource;
use crate::download::{self, Failure, OnProgress, Policy};
use crate::networks::AddressRefused;
use crate::source::Source;

/// How long a presigned request stays valid: each request is signed just before it is sent.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// Ranges read at once from one object.
const CONCURRENT_RANGES: usize = 8;

/// Where an object is, and how a request for it is addressed.
enum Location {
    Http {
        uri: String,
        token: Option<String>,
    },
    Store {
        store: Arc<dyn Storage>,
        key: object_store::path::Path,
        /// The pipeline's settings that reach it (`s3`, `azure`), for messages.
        settings: &'static str,
        /// Drives the credential providers that fetch (web identity, instance metadata).
        runtime: tokio::runtime::Runtime,
    },
}

impl Location {
    fn parse(model: &ModelSource, policy: &Policy) -> Result<Self> {
        let uri = model.uri.as_str();
        let located = cloud::locate(uri, model.s3.as_ref(), model.azure.as_ref())
            .with_context(|| format!("source {uri}"))?;
        if let Some(located) = located {
            if located.key.is_empty() {
                bail!("source {uri}: expected a key after the bucket or container");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the object store client's runtime")?;
            return Ok(Location::Store {
                store: located.store,
                key: object_store::path::Path::from(located.key),
                settings: located.settings,
                runtime,
            });
        }
        let token = policy
            .bearer_token_file
            .as_deref()
            .map(download::read_token)
            .transpose()?;
        Ok(Location::Http {
            uri: uri.to_owned(),
            token,
        })
    }

    /// A request for the object, signed when it is in an object store.
    fn request(
        &self,
        agent: &ureq::Agent,
        method: http::Method,
    ) -> Result<ureq::RequestBuilder<ureq::typestate::WithoutBody>> {
        let url = match self {
            Location::Http { uri, .. } => uri.clone(),
            Location::Store {
                store,
                key,
                runtime,
                settings,
            } => runtime
                .block_on(store.signed_url(
                    cloud::signing_method(settings, method.clone()),
                    key,
                    SIGNED_FOR,
                ))
                .with_context(|| {
                    format!("signing the request (are the {settings} credentials there?)")
                })?
                .to_string(),
        };
        let request = match method {
            http::Method::HEAD => agent.head(&url),
            _ => agent.get(&url),
        };
        // Compressed transfer would make byte ranges refer to other bytes than the object's.
        let request = request.header("Accept-Encoding", "identity");
        Ok(match self {
            Location::Http {
                token: Some(token), ..
            } => request.header("Authorization", format!("Bearer {token}")),
            _ => request,
        })
    }

    /// What a user sets when the source refuses the credentials.
    fn credentials_hint(&self) -> String {
        match self {
            Location::Http { .. } => "source.bearerTokenSecret".into(),
            Location::Store { settings, .. } => format!("source.{settings}.credentialsSecret"),
        }
    }
}

/// A remote object opened for ranged reads: its size and ETag as they were when opened.
pub struct RemoteObject<'a> {
    name: String,
    location: Location,
    agent: ureq::Agent,
    policy: Policy,
    len: u64,
    etag: String,
    fetched: AtomicU64,
    on_progress: OnProgress<'a>,
}

impl<'a> RemoteObject<'a> {
    /// Opens `model`'s source with a HEAD request. `None` when an http(s) server offers no
    /// byte ranges or no strong ETag to guard them with: the caller downloads it whole.
    pub fn open(
        model: &ModelSource,
        policy: &Policy,
        on_progress: OnProgress<'a>,
    ) -> Result<Option<Self>> {
        let name = model.uri.clone();
        let location = Location::parse(model, policy)?;
        let agent = download::agent(&name, policy)?;
        let response = download::retrying(policy, &name, "no answer; trying again", |_| {
            let sent = location
                .request(&agent, http::Method::HEAD)
                .map_err(Failure::Permanent)?
                .call()
                .map_err(|e| download::classify(&name, e, &location.credentials_hint()));
            match sent {
                // Some http(s) sources refuse HEAD (a presigned GET URL, a server that does
                // not implement it): the download asks with GET and says what it answers.
                Err(Failure::Permanent(e))
                    if matches!(location, Location::Http { .. })
                        && !e.chain().any(|c| c.is::<AddressRefused>()) =>
                {
                    tracing::info!(uri = %kube_zerocopy_runtime::redact::uri(&name), error = %kube_zerocopy_runtime::redact::uris_in(&format!("{e:#}")), "HEAD refused: downloading the file whole");
                    Ok(None)
                }
                sent => sent.map(Some),
            }
        })?;
        let Some(response) = response else {
            return Ok(None);
        };
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let len = header("Content-Length").and_then(|v| v.parse::<u64>().ok());
        let etag = header("ETag").filter(|e| !e.starts_with("W/"));
        // Object stores always serve ranges; an http server says so.
        let ranges = matches!(location, Location::Store { .. })
            || header("Accept-Ranges").is_some_and(|v| v.contains("bytes"));
        let (Some(len), Some(etag), true) = (len, etag, ranges) else {
            if let Location::Store { .. } = location {
                bail!("{name}: the object store sent no size or no ETag");
            }
            tracing::info!(uri = %kube_zerocopy_runtime::redact::uri(&name), "the server offers no byte ranges with a strong ETag: downloading the file whole");
            return Ok(None);
        };
        policy.check_size(&name, len, true)?;
        Ok(Some(RemoteObject {
            name,
            location,
            agent,
            policy: policy.clone(),
            len,
            etag,
            fetched: AtomicU64::new(0),
            on_progress,
        }))
    }

    /// The object's ETag when it was opened: which version of it is read.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// One request for `buf.len()` bytes from `offset`, of which `done` are already in `buf`:
    /// fills `buf` from there, counting what arrives in `done`.
    fn attempt(&self, buf: &mut [u8], offset: u64, done: &mut usize) -> Result<(), Failure> {
        let name = &self.name;
        let first = offset + *done as u64;
        let last = offset + buf.len() as u64 - 1;
        let response = self
            .location
            .request(&self.agent, http::Method::GET)
            .map_err(Failure::Permanent)?
            .header("Range", format!("bytes={first}-{last}"))
            .header("If-Match", &self.etag)
            .call()
            .map_err(|e| match e {
                ureq::Error::StatusCode(412) => Failure::Permanent(anyhow!(
                    "{name} changed while it was fetched (it no longer has ETag {}); nothing \
                     was published, and the next attempt fetches it again",
                    self.etag
                )),
                e => download::classify(name, e, &self.location.credentials_hint()),
            })?;
        let status = response.status().as_u16();
        if status != 206 {
            return Err(Failure::Permanent(anyhow!(
                "{name} answered HTTP {status} to a request for bytes {first}-{last}, expected \
                 206 (partial content)"
            )));
        }
        let start = response
            .headers()
            .get("Content-Range")
            .and_then(|v| v.to_str().ok())
            .and_then(download::content_range)
            .map(|(start, _)| start);
        if start != Some(first) {
            return Err(Failure::Transient(anyhow!(
                "{name}: asked for bytes from {first}, the answer holds other bytes ({start:?})"
            )));
        }
        let mut body = response.into_body();
        let mut reader = body.with_config().limit(u64::MAX).reader();
        let mut pace = download::Pace::new(&self.policy);
        while *done < buf.len() {
            match std::io::Read::read(&mut reader, &mut buf[*done..]) {
                Ok(0) => break,
                Ok(n) => {
                    *done += n;
                    let fetched = self.fetched.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    (self.on_progress)(fetched, Some(self.len));
                    pace.received(n, name)?;
                }
                Err(e) => {
                    return Err(Failure::Transient(anyhow!(
                        "{name}: bytes {first}-{last} broke off after {} bytes: {e}",
                        *done as u64 + offset - first
                    )))
                }
            }
        }
        if *done < buf.len() {
            return Err(Failure::Transient(anyhow!(
                "{name}: bytes {first}-{last} ended early"
            )));
        }
        Ok(())
    }
}

impl Source for RemoteObject<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            bail!(
                "source {}: bytes {offset}..+{} lie past its end ({} bytes)",
                self.name,
                buf.len(),
                self.len
            );
        }
        download::retrying(
            &self.policy,
            &self.name,
            "range broken off; resuming it",
            |received| {
                let mut done = *received as usize;
                let attempt = self.attempt(buf, offset, &mut done);
                *received = done as u64;
                attempt
            },
        )
    }

    /// Every range was asked `If-Match` its ETag: a changed object failed its request.
    fn check_unchanged(&self) -> Result<()> {
        Ok(())
    }

    fn concurrent_reads(&self) -> usize {
        CONCURRENT_RANGES
    }
}

#[cfg(test)]
mod tests;
