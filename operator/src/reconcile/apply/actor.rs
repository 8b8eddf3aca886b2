//! An Actor pipeline's replicas (Deployment, Service, NetworkPolicy) and its batch run's
//! driver with its own identity.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube_zerocopy_contract::names;

use super::owned::{apply_owned, delete_seen, foreign};
use super::task::suspend_job;
use super::{ActorObjects, Applied};
use crate::batch_run;
use crate::crd::InferencePipeline;
use crate::queue::{self, Hold};
use crate::reconcile::Context;
use crate::render::{self, BatchRun};
use crate::status::Blocked;

/// An Actor pipeline's objects, as rendered.
pub(super) struct Objects {
    pub deployment: Deployment,
    pub service: Service,
    pub network_policy: NetworkPolicy,
    /// With an input and an output: the batch run's driver.
    pub run: Option<BatchRun>,
}

/// Applies an Actor pipeline's Service, NetworkPolicy and batch run, then its Deployment,
/// scaled to 0 while held or once the run is over.
impl Objects {
    /// An Actor pipeline's rendered objects (None for another mode's).
    pub(super) fn of(rendered: render::Rendered) -> Option<Objects> {
        match rendered {
            render::Rendered::Actor {
                deployment,
                service,
                network_policy,
                run,
            } => Some(Objects {
                deployment: *deployment,
                service: *service,
                network_policy: *network_policy,
                run: run.map(|r| *r),
            }),
            _ => None,
        }
    }
}

pub(super) async fn apply(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    objects: Objects,
) -> Result<Applied, kube::Error> {
    let Objects {
        mut deployment,
        service,
        network_policy,
        run,
    } = objects;
    let client = ctx.client.clone();
    let apply = PatchParams::apply(names::MANAGER).force();
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let name = render::object_name(pipeline);
    if let Some(blocked) = foreign(&deployments, pipeline, ns, &name).await? {
        return Ok(Applied::Blocked(blocked));
    }
    // Created with a POST when missing: one made meanwhile by someone else is refused,
    // never taken over.
    if let Some(blocked) = apply_owned(&services, pipeline, ns, &service).await? {
        return Ok(Applied::Blocked(blocked));
    }
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    if let Some(blocked) = apply_owned(&policies, pipeline, ns, &network_policy).await? {
        return Ok(Applied::Blocked(blocked));
    }
    let driver = match run {
        Some(run) => match apply_batch_run(ctx, pipeline, ns, run).await? {
            Ok(state) => Some(state),
            Err(blocked) => return Ok(Applied::Blocked(blocked)),
        },
        None => None,
    };
    // The run is over, or held: nothing is left to serve for now.
    let suspended = queue::suspended(pipeline);
    if suspended || matches!(driver, Some(batch_run::State::Done)) {
        if let Some(spec) = deployment.spec.as_mut() {
            spec.replicas = Some(0);
        }
    }
    let deployment = deployments
        .patch(
            &render::object_name(pipeline),
            &apply,
            &Patch::Apply(&deployment),
        )
        .await?;
    Ok(Applied::Actor(Box::new(ActorObjects {
        deployment,
        driver,
        hold: suspended.then(|| Hold::suspended("the replicas are scaled to 0")),
    })))
}

/// Carries an Actor's batch run on (see [`batch_run::state`]): applies the driver's identity,
/// creates its Job once, replaces the Job of another run, and says how the run stands; or why
/// it cannot (a Job, ServiceAccount, Role or RoleBinding of its name that is not the
/// pipeline's).
async fn apply_batch_run(
    ctx: &Context,
    pipeline: &InferencePipeline,
    ns: &str,
    run: BatchRun,
) -> Result<Result<batch_run::State, Blocked>, kube::Error> {
    let name = batch_run::driver_name(pipeline);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let cached = ctx.jobs.get(&ObjectRef::new(&name).within(ns));
    if cached.is_none() {
        if let Some(blocked) = foreign(&jobs, pipeline, ns, &name).await? {
            return Ok(Err(blocked));
        }
    }
    // The driver's identity: a ServiceAccount of the same name that the pipeline does not own
    // (an administrator's, with its bindings and cloud identity) must never be taken over.
    let client = ctx.client.clone();
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    if let Some(blocked) = apply_owned(&accounts, pipeline, ns, &run.account).await? {
        return Ok(Err(blocked));
    }
    let roles = Api::<Role>::namespaced(client.clone(), ns);
    if let Some(blocked) = apply_owned(&roles, pipeline, ns, &run.role).await? {
        return Ok(Err(blocked));
    }
    let bindings = Api::<RoleBinding>::namespaced(client, ns);
    if let Some(blocked) = apply_owned(&bindings, pipeline, ns, &run.binding).await? {
        return Ok(Err(blocked));
    }
    let state = batch_run::state(pipeline, cached.as_deref());
    match &state {
        // Held: the run starts once the pipeline goes on.
        batch_run::State::Missing if queue::suspended(pipeline) => {}
        batch_run::State::Missing => {
            if let Some(blocked) = apply_owned(&jobs, pipeline, ns, &run.job).await? {
                return Ok(Err(blocked));
            }
        }
        batch_run::State::Running => {
            if let Some(job) = cached.as_deref() {
                suspend_job(&jobs, job, queue::suspended(pipeline)).await?;
            }
        }
        batch_run::State::Outdated => {
            let uid = cached.as_ref().and_then(|j| j.metadata.uid.clone());
            delete_seen(&jobs, &name, uid).await?;
        }
        // A Job's pod template cannot change: the run goes on as it started.
        batch_run::State::Done | batch_run::State::Failed(_) => {}
    }
    Ok(Ok(state))
}

/// The step against a scripted API server.
#[cfg(test)]
mod tests {
    use super::super::mock_api::{answer, api_server, context, not_found};
    use super::*;
    use crate::render::{render, Settings};
    use crate::status::Reason;
    use http::Method;
    use serde_json::json;

    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/tenant/deployments/p-zerocopy";
    const SERVICES: &str = "/api/v1/namespaces/tenant/services";
    const SERVICE: &str = "/api/v1/namespaces/tenant/services/p-zerocopy";
    const POLICIES: &str = "/apis/networking.k8s.io/v1/namespaces/tenant/networkpolicies";
    const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/tenant/networkpolicies/p-zerocopy";

    /// An Actor pipeline of 2 replicas (suspended or not) and the objects it renders.
    fn actor(suspended: bool) -> (InferencePipeline, Objects) {
        let mut pipeline: InferencePipeline = serde_yaml::from_str(&format!(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: p, namespace: tenant, generation: 1}}\nspec:\n  mode: Actor\n  suspend: {suspended}\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://m.example/m.pt', size: 1Mi}}}}]\n  actor: {{replicas: 2}}\n"
        ))
        .unwrap();
        pipeline.metadata.uid = Some("pipeline-uid".into());
        let objects = Objects::of(render(&pipeline, &Settings::default()).unwrap())
            .expect("an Actor pipeline renders its objects");
        (pipeline, objects)
    }

    #[tokio::test]
    async fn a_new_actor_creates_its_service_and_policy_then_applies_its_deployment() {
        let (pipeline, objects) = actor(false);
        let (client, server) = api_server(vec![
            answer(Method::GET, DEPLOYMENT, 404, not_found()),
            answer(Method::GET, SERVICE, 404, not_found()),
            answer(Method::POST, SERVICES, 201, json!({})),
            answer(Method::GET, POLICY, 404, not_found()),
            answer(Method::POST, POLICIES, 201, json!({})),
            answer(Method::PATCH, DEPLOYMENT, 200, json!({})),
        ]);
        let applied = apply(&context(client, vec![]), &pipeline, "tenant", objects)
            .await
            .unwrap();
        let Applied::Actor(actor) = applied else {
            panic!("the Actor's objects")
        };
        assert!(actor.hold.is_none());
        let seen = server.await.unwrap();
        // Created as the pipeline's (a POST cannot take an object over), by its field manager.
        for created in [&seen[2], &seen[4]] {
            assert!(
                created.uri.contains("fieldManager=kube-zerocopy"),
                "{}",
                created.uri
            );
            assert_eq!(
                created.body["metadata"]["ownerReferences"][0]["uid"],
                "pipeline-uid"
            );
        }
        assert_eq!(seen[5].body["spec"]["replicas"], 2);
    }

    #[tokio::test]
    async fn a_suspended_actor_applies_its_deployment_at_zero_replicas() {
        let (pipeline, objects) = actor(true);
        let ours = |kind: &str| {
            json!({"kind": kind, "metadata": {"name": "p-zerocopy", "ownerReferences": [
                {"apiVersion": "kube-zerocopy.io/v1alpha1", "kind": "InferencePipeline",
                 "name": "p", "uid": "pipeline-uid", "controller": true}]}})
        };
        let (client, server) = api_server(vec![
            answer(Method::GET, DEPLOYMENT, 200, ours("Deployment")),
            answer(Method::GET, SERVICE, 200, ours("Service")),
            answer(Method::PATCH, SERVICE, 200, json!({})),
            answer(Method::GET, POLICY, 200, ours("NetworkPolicy")),
            answer(Method::PATCH, POLICY, 200, json!({})),
            answer(Method::PATCH, DEPLOYMENT, 200, json!({})),
        ]);
        let applied = apply(&context(client, vec![]), &pipeline, "tenant", objects)
            .await
            .unwrap();
        let Applied::Actor(actor) = applied else {
            panic!("the Actor's objects")
        };
        assert!(actor.hold.is_some(), "the status says why nothing serves");
        let seen = server.await.unwrap();
        assert_eq!(seen[5].body["spec"]["replicas"], 0);
    }

    #[tokio::test]
    async fn another_service_of_the_actors_name_stops_it_before_anything_is_written() {
        let (pipeline, objects) = actor(false);
        let theirs =
            json!({"kind": "Service", "metadata": {"name": "p-zerocopy", "uid": "their-uid"}});
        let (client, server) = api_server(vec![
            answer(Method::GET, DEPLOYMENT, 404, not_found()),
            answer(Method::GET, SERVICE, 200, theirs),
        ]);
        let applied = apply(&context(client, vec![]), &pipeline, "tenant", objects)
            .await
            .unwrap();
        let Applied::Blocked(blocked) = applied else {
            panic!("another's Service is not taken over")
        };
        assert_eq!(blocked.reason, Reason::ObjectNotOwned);
        assert_eq!(server.await.unwrap().len(), 2, "two GETs, no write");
    }
}
