//! Objects applied only if the pipeline owns them: an object of its name that is someone
//! else's is never taken over (server-side apply with force would, and the pipeline's owner
//! reference would then delete it with the pipeline).

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Resource;
use kube_zerocopy_contract::names;

use crate::crd::InferencePipeline;
use crate::status::{Blocked, Reason};

/// Deletes the Job `name` only if it is still the one seen (`uid`): a reconcile that read a
/// stale cache must not delete a newer one. Gone already, or replaced, is fine.
pub(super) async fn delete_seen(
    api: &Api<Job>,
    name: &str,
    uid: Option<String>,
) -> Result<bool, kube::Error> {
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &delete).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `object` belongs to `pipeline` (an owner reference to its uid).
pub(super) fn owned_by(object: &impl Resource, pipeline: &InferencePipeline) -> bool {
    let uid = pipeline.metadata.uid.as_deref();
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid)
}

/// Refuses an object of the pipeline's name that the pipeline does not own: server-side apply
/// with force would take it over, and its owner reference would then delete it with the
/// pipeline. One GET before each apply.
pub(super) async fn foreign<K>(
    api: &Api<K>,
    pipeline: &InferencePipeline,
    ns: &str,
    name: &str,
) -> Result<Option<Blocked>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(match api.get_opt(name).await? {
        Some(existing) if !owned_by(&existing, pipeline) => Some(not_owned::<K>(ns, name)),
        _ => None,
    })
}

pub(super) fn not_owned<K: Resource<DynamicType = ()>>(ns: &str, name: &str) -> Blocked {
    let kind = K::kind(&());
    Blocked {
        reason: Reason::ObjectNotOwned,
        message: format!(
            "a {kind} named {name} already exists in namespace {ns} and does not belong to this \
             pipeline, which would take it over: delete or rename that {kind}, or rename the pipeline"
        ),
    }
}

/// Applies `object` if the pipeline owns the object of its name, or creates it if there is
/// none; never touches one that is not the pipeline's (see [`foreign`]). Creating is a POST,
/// which fails on an object made meanwhile instead of taking it over.
pub(super) async fn apply_owned<K>(
    api: &Api<K>,
    pipeline: &InferencePipeline,
    ns: &str,
    object: &K,
) -> Result<Option<Blocked>, kube::Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        Some(existing) if !owned_by(&existing, pipeline) => Ok(Some(not_owned::<K>(ns, &name))),
        Some(_) => {
            let apply = PatchParams::apply(names::MANAGER).force();
            api.patch(&name, &apply, &Patch::Apply(object)).await?;
            Ok(None)
        }
        None => {
            let create = PostParams {
                field_manager: Some(names::MANAGER.into()),
                ..Default::default()
            };
            match api.create(&create, object).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(not_owned::<K>(ns, &name))),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock_api::{answer, api_server, not_found};
    use super::*;
    use crate::status::Reason;
    use http::Method;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use serde_json::json;

    fn pipeline() -> InferencePipeline {
        let mut pipeline: InferencePipeline = serde_yaml::from_str(
            "apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {name: p, namespace: tenant, uid: pipeline-uid}\nspec:\n  mode: Actor\n  models: [{name: m, format: TorchScript, source: {uri: 'file:///m.pt'}}]\n  actor: {replicas: 1}\n",
        )
        .unwrap();
        pipeline.metadata.uid = Some("pipeline-uid".into());
        pipeline
    }

    /// The driver's ServiceAccount as the operator renders it: owned by the pipeline.
    fn account(owner_uid: Option<&str>) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("p-zerocopy-driver".into()),
                namespace: Some("tenant".into()),
                owner_references: owner_uid.map(|uid| {
                    vec![OwnerReference {
                        api_version: "kube-zerocopy.io/v1alpha1".into(),
                        kind: "InferencePipeline".into(),
                        name: "p".into(),
                        uid: uid.into(),
                        controller: Some(true),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    const ACCOUNT_PATH: &str = "/api/v1/namespaces/tenant/serviceaccounts/p-zerocopy-driver";

    #[tokio::test]
    async fn an_administrators_account_of_the_same_name_is_refused_and_left_untouched() {
        let theirs = serde_json::to_value(account(Some("administrator-uid"))).unwrap();
        let (client, server) = api_server(vec![answer(Method::GET, ACCOUNT_PATH, 200, theirs)]);
        let api = Api::<ServiceAccount>::namespaced(client, "tenant");
        let refused = apply_owned(&api, &pipeline(), "tenant", &account(Some("pipeline-uid")))
            .await
            .unwrap();
        drop(api);
        let blocked = refused.expect("another's account is refused");
        assert_eq!(blocked.reason, Reason::ObjectNotOwned);
        assert!(
            blocked
                .message
                .contains("a ServiceAccount named p-zerocopy-driver"),
            "{}",
            blocked.message
        );
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 1, "only the GET: nothing is written over it");
    }

    #[tokio::test]
    async fn a_missing_object_is_created_by_a_post_that_cannot_take_one_over() {
        let ours = serde_json::to_value(account(Some("pipeline-uid"))).unwrap();
        let (client, server) = api_server(vec![
            answer(Method::GET, ACCOUNT_PATH, 404, not_found()),
            answer(
                Method::POST,
                "/api/v1/namespaces/tenant/serviceaccounts",
                201,
                ours,
            ),
        ]);
        let api = Api::<ServiceAccount>::namespaced(client, "tenant");
        let refused = apply_owned(&api, &pipeline(), "tenant", &account(Some("pipeline-uid")))
            .await
            .unwrap();
        drop(api);
        assert_eq!(refused, None);
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2);
        assert!(
            seen[1].uri.contains("fieldManager=kube-zerocopy"),
            "{}",
            seen[1].uri
        );
        assert_eq!(
            seen[1].body["metadata"]["ownerReferences"][0]["uid"],
            "pipeline-uid"
        );
    }

    #[tokio::test]
    async fn an_object_made_meanwhile_by_someone_else_is_refused() {
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409});
        let (client, server) = api_server(vec![
            answer(Method::GET, ACCOUNT_PATH, 404, not_found()),
            answer(
                Method::POST,
                "/api/v1/namespaces/tenant/serviceaccounts",
                409,
                conflict,
            ),
        ]);
        let api = Api::<ServiceAccount>::namespaced(client, "tenant");
        let refused = apply_owned(&api, &pipeline(), "tenant", &account(Some("pipeline-uid")))
            .await
            .unwrap();
        drop(api);
        assert_eq!(refused.map(|b| b.reason), Some(Reason::ObjectNotOwned));
        assert_eq!(server.await.unwrap().len(), 2, "no apply after the refusal");
    }

    #[tokio::test]
    async fn the_pipelines_own_object_is_applied_by_its_field_manager() {
        let ours = serde_json::to_value(account(Some("pipeline-uid"))).unwrap();
        let (client, server) = api_server(vec![
            answer(Method::GET, ACCOUNT_PATH, 200, ours.clone()),
            answer(Method::PATCH, ACCOUNT_PATH, 200, ours),
        ]);
        let api = Api::<ServiceAccount>::namespaced(client, "tenant");
        let refused = apply_owned(&api, &pipeline(), "tenant", &account(Some("pipeline-uid")))
            .await
            .unwrap();
        drop(api);
        assert_eq!(refused, None);
        let seen = server.await.unwrap();
        assert_eq!(seen[1].method, Method::PATCH);
        for part in ["fieldManager=kube-zerocopy", "force=true"] {
            assert!(seen[1].uri.contains(part), "{}", seen[1].uri);
        }
    }

    #[tokio::test]
    async fn only_the_job_that_was_seen_is_deleted() {
        let jobs = "/apis/batch/v1/namespaces/tenant/jobs/p-zerocopy";
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409});
        let (client, server) = api_server(vec![answer(Method::DELETE, jobs, 409, conflict)]);
        let api = Api::<Job>::namespaced(client, "tenant");
        let deleted = delete_seen(&api, "p-zerocopy", Some("seen-uid".into()))
            .await
            .unwrap();
        drop(api);
        assert!(!deleted, "a newer Job of the same name stays");
        let seen = server.await.unwrap();
        assert_eq!(seen[0].body["preconditions"]["uid"], "seen-uid");
    }
}
