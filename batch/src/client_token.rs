//! The bearer token an Actor's clients must send (`actor.tokenSecret`), read from the file the
//! Secret is mounted as. The kubelet rewrites that file when the Secret changes, so it is read
//! again every few seconds: a rotated token is taken without a restart.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use subtle::ConstantTimeEq;
use tracing::warn;

/// How long a token read from the file is used before the file is read again.
const REREAD_AFTER: Duration = Duration::from_secs(5);

pub struct ClientToken {
    path: PathBuf,
    read: Mutex<(Instant, Vec<u8>)>,
}

impl std::fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Why a request's credentials were not accepted.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Unauthorized {
    #[error("this model needs a bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the bearer token is not this model's")]
    Wrong,
}

impl ClientToken {
    /// The token in `path`; an unreadable or empty file is an error now, not at the first
    /// request.
    pub fn open(path: &Path) -> Result<Self> {
        let token = read(path)?;
        Ok(ClientToken {
            path: path.to_owned(),
            read: Mutex::new((Instant::now(), token)),
        })
    }

    /// Whether an `Authorization` header's value carries the token.
    pub fn admits(&self, authorization: Option<&[u8]>) -> Result<(), Unauthorized> {
        let given = authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .ok_or(Unauthorized::Missing)?;
        let expected = self.current();
        // Compared in constant time: the answer's timing says nothing of how much matched.
        if bool::from(given.ct_eq(&expected)) {
            Ok(())
        } else {
            Err(Unauthorized::Wrong)
        }
    }

    /// The token, read again once [`REREAD_AFTER`] has passed; a file that cannot be read
    /// meanwhile (the kubelet swapping it) keeps the last one.
    pub fn current(&self) -> Vec<u8> {
        let mut read_at = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if read_at.0.elapsed() >= REREAD_AFTER {
            match read(&self.path) {
                Ok(token) => read_at.1 = token,
                Err(e) => warn!(error = %format!("{e:#}"), "keeping the last client token"),
            }
            read_at.0 = Instant::now();
        }
        read_at.1.clone()
    }

    /// The `Authorization` header's value that carries the token.
    pub fn header(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.current()))
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the client token {}", path.display()))?;
    let token = bytes.trim_ascii().to_vec();
    ensure!(
        !token.is_empty(),
        "the client token {} is empty",
        path.display()
    );
    ensure!(
        token.iter().all(|b| b.is_ascii_graphic()),
        "the client token {} holds characters a header cannot carry (only visible ASCII)",
        path.display()
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let token = ClientToken::open(&path).unwrap();
        assert_eq!(token.admits(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(token.header(), "Bearer s3cret");
        assert_eq!(token.admits(None), Err(Unauthorized::Missing));
        assert_eq!(token.admits(Some(b"s3cret")), Err(Unauthorized::Missing));
        assert_eq!(
            token.admits(Some(b"Basic s3cret")),
            Err(Unauthorized::Missing)
        );
        for wrong in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Bearer ",
            b"Bearer S3CRET",
        ] {
            assert_eq!(token.admits(Some(wrong)), Err(Unauthorized::Wrong));
        }
    }

    #[test]
    fn an_empty_or_unprintable_token_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, " \n").unwrap();
        let e = ClientToken::open(&path).unwrap_err();
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
        std::fs::write(&path, "a b").unwrap();
        let e = ClientToken::open(&path).unwrap_err();
        assert!(format!("{e:#}").contains("visible ASCII"), "{e:#}");
        let e = ClientToken::open(&dir.path().join("none")).unwrap_err();
        assert!(
            format!("{e:#}").contains("reading the client token"),
            "{e:#}"
        );
    }
}
