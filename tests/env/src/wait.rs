//! Waiting for a cluster to reach a state: poll a check until it gives a value.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `check` every 250 ms until it gives a value; fails after `timeout` with `what` and
/// the state it saw last (each check returns the value once there, and what it saw).
pub async fn eventually_seen<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Option<T>, String)>>,
{
    let start = Instant::now();
    loop {
        let seen = match tokio::time::timeout(Duration::from_secs(10), check()).await {
            Ok(Ok((Some(v), _))) => return Ok(v),
            Ok(Ok((None, seen))) => seen,
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(_) => "a check took over 10 s".into(),
        };
        if start.elapsed() > timeout {
            bail!("waited {timeout:?} for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// [`eventually_seen`] for a check that only says whether it is there yet; panics on timeout.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let seen = eventually_seen(what, timeout, || {
        let value = check();
        async move { Ok((value.await, "not yet".to_owned())) }
    });
    seen.await.unwrap_or_else(|e| panic!("{e:#}"))
}
