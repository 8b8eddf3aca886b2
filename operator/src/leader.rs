//! Leader election: several operator replicas may run (a rolling update overlaps two, or
//! replicas > 1 for a fast takeover), and only the holder of a Lease reconciles, so two
//! replicas never race on a pipeline's objects or status.
//!
//! A replica that loses the lease to another exits, as Kubernetes' own controllers do: its
//! caches and queue belong to a leadership that ended, and a restart is the clean way back
//! to standing by. A standby takes over within one lease duration of the leader's last
//! renewal; on a clean shutdown the leader also hands the lease back (cleared holder), so
//! that no replica has to judge whether it lapsed.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::retry::{is_transient, retry_transient};

/// Where the lease lives and who asks for it.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica: the pod's name in a cluster.
    pub identity: String,
    /// How long a lease holds without renewal; renewed `RENEW_BEFORE` ahead of its end.
    pub lease_duration: Duration,
}

/// Renewal happens this long (seconds) before the lease would lapse.
const RENEW_BEFORE: u64 = 5;
/// A replica that has not got the lease after this long reports that it stands by.
const STANDBY_AFTER: Duration = Duration::from_secs(2);

/// This replica's leadership, held until [`Leadership::release`] or until it is lost.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    election: Election,
}

impl Election {
    /// The identity of a replica outside a pod: host name and process id.
    pub fn default_identity() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    }

    /// Waits until this replica holds the lease. `standing_by` runs once if another replica
    /// holds it first.
    pub async fn acquire(
        self,
        client: Client,
        standing_by: impl FnOnce(),
    ) -> anyhow::Result<Leadership> {
        let duration = self.lease_duration.as_secs().max(RENEW_BEFORE + 1);
        let manager = retry_transient(
            "cannot reach the leader lease yet",
            |e| matches!(e, LeaseManagerError::KubeError(e) if is_transient(e)),
            || {
                LeaseManagerBuilder::new(client.clone(), &self.lease_name)
                    .with_namespace(&self.namespace)
                    .with_identity(&self.identity)
                    .with_duration(duration)
                    .with_grace(RENEW_BEFORE)
                    .with_field_manager(format!("kube-zerocopy-{}", self.identity))
                    .build()
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot use the leader lease {}/{} (may the operator's ServiceAccount get, \
                 create and patch leases there?): {e}",
                self.namespace,
                self.lease_name
            )
        })?;
        let (mut state, task) = manager.watch().await;
        // A free lease is taken within moments; one that is still false after that is held
        // by another replica.
        let mut standing_by = Some(standing_by);
        while !*state.borrow_and_update() {
            match tokio::time::timeout(STANDBY_AFTER, state.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    anyhow::bail!("the leader election task ended: {}", ended(task).await)
                }
                Err(_) => {
                    if let Some(announce) = standing_by.take() {
                        info!(lease = %self.lease_name, identity = %self.identity,
                              "standing by: another replica leads");
                        announce();
                    }
                }
            }
        }
        info!(lease = %self.lease_name, identity = %self.identity, "leading");
        Ok(Leadership {
            state,
            task,
            election: self,
        })
    }
}

impl Leadership {
    /// Resolves when another replica has taken the lease (or the election task ended).
    pub async fn lost(&mut self) -> String {
        loop {
            if self.state.changed().await.is_err() {
                return "the leader election task ended".into();
            }
            if !*self.state.borrow_and_update() {
                return format!(
                    "lost the leader lease {}/{} to another replica",
                    self.election.namespace, self.election.lease_name
                );
            }
        }
    }

    /// Hands the lease back (a clean shutdown).
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => info!(lease = %self.election.lease_name, "released the leader lease"),
            Ok(Ok(Err(e))) => warn!(error = %e, "cannot release the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "the leader election task failed"),
            Err(_) => warn!("releasing the leader lease timed out; it lapses on its own"),
        }
    }
}

async fn ended(task: JoinHandle<Result<LeaseManager, LeaseManagerError>>) -> String {
    match task.await {
        Ok(Ok(_)) => "without an error".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}
