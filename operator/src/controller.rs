//! The controller: the watches that bring a pipeline to [`reconcile`], how a failed reconcile
//! is retried, and the leader lease that lets one replica reconcile at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller, Error as ControllerError};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use kube_zerocopy_contract::names;
use tracing::{debug, info, warn};

use crate::crd::InferencePipeline;
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::reconcile::{reconcile, Context, Error};
use crate::render::Settings;
use crate::retry::{is_transient, retry_transient, WatchBackoff};

/// First retry after a failed reconcile; each further failure in a row doubles it, up to the
/// max. An error a person must fix first is retried from a minute on: trying every few seconds
/// would only fill the log.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_FIRST_NEEDS_A_PERSON: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(300);
const RETRY_MAX_NEEDS_A_PERSON: Duration = Duration::from_secs(900);

pub fn error_policy(pipeline: Arc<InferencePipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut all = ctx.failures.lock().unwrap();
        let n = all.entry(ObjectRef::from_obj(&*pipeline)).or_insert(0);
        *n += 1;
        *n
    };
    let retry = retry_after(failures, error.needs_a_person());
    warn!(
        pipeline = %pipeline.name_any(),
        error = %error,
        step = error.step(),
        needs_a_person = error.needs_a_person(),
        failures,
        retry_s = retry.as_secs(),
        "reconcile failed"
    );
    Action::requeue(retry)
}

fn retry_after(failures: u32, needs_a_person: bool) -> Duration {
    let (first, max) = if needs_a_person {
        (RETRY_FIRST_NEEDS_A_PERSON, RETRY_MAX_NEEDS_A_PERSON)
    } else {
        (RETRY_FIRST, RETRY_MAX)
    };
    first
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(max)
}

/// Checks that InferencePipelines can be listed before anything starts. An API server that
/// is away (a control-plane upgrade, an outage) is waited for, with the reason logged; a
/// missing CRD or permission ends the operator with a message that says what to fix.
async fn wait_for_api(pipelines: &Api<InferencePipeline>) -> anyhow::Result<()> {
    let first = ListParams::default().limit(1);
    retry_transient("API server not reachable yet", is_transient, || {
        pipelines.list(&first)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot list InferencePipelines (is the CRD installed, and may the operator's \
             ServiceAccount list them?): {e}"
        )
    })?;
    Ok(())
}

/// Runs the controller until SIGTERM or Ctrl-C. `namespace`: watch one namespace, or all.
/// With an `election`, only while this replica holds the leader lease.
pub async fn run(
    client: Client,
    settings: Settings,
    namespace: Option<String>,
    election: Option<Election>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let pipelines: Api<InferencePipeline> = api(&client, &namespace);
    wait_for_api(&pipelines).await?;
    let mut leadership = match election {
        Some(election) => Some(
            election
                .acquire(client.clone(), || metrics.set_ready())
                .await?,
        ),
        None => None,
    };
    let reporter = Reporter {
        controller: names::MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=kube-zerocopy");
    let (jobs, jobs_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    tokio::spawn(
        watcher(api::<Job>(&client, &namespace), managed.clone())
            .backoff(WatchBackoff::default())
            .reflect(jobs_writer)
            .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        watcher(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(names::PIPELINE_LABEL),
        )
        .backoff(WatchBackoff::default())
        .reflect(pods_writer)
        .for_each(|_| futures::future::ready(())),
    );
    jobs.wait_until_ready().await?;
    pods.wait_until_ready().await?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        jobs,
        pods,
        failures: Mutex::default(),
    });
    ctx.metrics.set_ready();
    ctx.metrics.leader.set(1);
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "operator running"
    );
    let controller = Controller::new(pipelines, watcher::Config::default())
        .owns(api::<Job>(&client, &namespace), managed.clone())
        .owns(api::<Deployment>(&client, &namespace), managed.clone())
        .owns(api::<Service>(&client, &namespace), managed)
        .watches(
            api::<Pod>(&client, &namespace),
            watcher::Config::default().labels(names::PIPELINE_LABEL),
            |pod: Pod| {
                let name = pod.labels().get(names::PIPELINE_LABEL)?.clone();
                Some(ObjectRef::<InferencePipeline>::new(&name).within(&pod.namespace()?))
            },
        )
        .trigger_backoff(WatchBackoff::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => info!(pipeline = %object.name, "reconciled"),
                // An owned object's deletion after its pipeline's: nothing left to reconcile.
                Err(ControllerError::ObjectNotFound(object)) => {
                    debug!(pipeline = %object.name, "deleted; nothing to reconcile")
                }
                // error_policy logged it, with its count and the retry.
                Err(ControllerError::ReconcilerFailed(..)) => {}
                Err(e) => warn!(error = %e, "reconcile error"),
            }
        });
    match leadership.as_mut() {
        None => controller.await,
        Some(held) => tokio::select! {
            () = controller => {}
            reason = held.lost() => anyhow::bail!("{reason}: exiting so that one replica reconciles"),
        },
    }
    if let Some(held) = leadership {
        held.release().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{retry_after, Error};
    use kube::core::Status;
    use std::time::Duration;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("x", "y").with_code(code).boxed())
    }

    #[test]
    fn failed_reconciles_back_off_to_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| retry_after(n, false).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry_after(u32::MAX, false), Duration::from_secs(300));
    }

    /// A permission the operator lacks or a CRD that is gone: a minute first, up to 15.
    #[test]
    fn errors_a_person_must_fix_back_off_longer() {
        let secs: Vec<u64> = (1..=6).map(|n| retry_after(n, true).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 900, 900]);
        let forbidden = Error::PatchStatus(api_error(403));
        assert!(forbidden.needs_a_person());
        assert_eq!(forbidden.step(), "patch_status");
        let away = Error::Apply(api_error(503));
        assert!(!away.needs_a_person());
        assert_eq!(away.step(), "apply");
    }
}
