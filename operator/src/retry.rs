//! Waiting out an API server that is away: the watches' backoff, and a retry of what may
//! succeed once it is back.

use std::time::Duration;

use tracing::warn;

/// The backoff of the controller's watches. kube's controller merges every watch (pipelines,
/// Jobs, Deployments, Services, pods) into one stream under one backoff, so after an API
/// server outage each watch's one "resource version too old" error pushed the shared default
/// backoff (up to 30 s, reset only after 2 quiet minutes) further and stalled all watches for
/// minutes. Capped at a few seconds, they resume within seconds of the API server's return.
pub struct WatchBackoff {
    next: Duration,
}

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(3);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(WATCH_BACKOFF_MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_BACKOFF_MIN;
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff {
            next: WATCH_BACKOFF_MIN,
        }
    }
}

/// Whether an API error may go away on its own (the API server restarting, overloaded or
/// unreachable for a while), as opposed to one a person must fix (no CRD, no permission).
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `attempt` until it succeeds or fails in a way a person must fix; errors that
/// `transient` accepts are logged as `what` and retried on the watches' backoff.
pub async fn retry_transient<T, E, Fut>(
    what: &str,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = WatchBackoff::default();
    loop {
        match attempt().await {
            Err(e) if transient(&e) => {
                let delay = backoff.next().unwrap_or(WATCH_BACKOFF_MAX);
                warn!(error = %e, retry_in = ?delay, "{what}");
                tokio::time::sleep(delay).await;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_transient;
    use kube::core::Status;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn an_away_or_busy_api_server_is_waited_for() {
        assert!(is_transient(&api_error(503)));
        assert!(is_transient(&api_error(500)));
        assert!(is_transient(&api_error(429)));
        assert!(is_transient(&kube::Error::Service(
            "client error (Connect)".into()
        )));
    }

    #[test]
    fn a_missing_crd_or_permission_is_not() {
        assert!(!is_transient(&api_error(404)));
        assert!(!is_transient(&api_error(403)));
        assert!(!is_transient(&api_error(401)));
    }
}
