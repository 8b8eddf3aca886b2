//! What the operator's own account may do, as the API server says (a SelfSubjectRulesReview
//! with the chart's ServiceAccount token), compared with the committed list; and what the
//! chart's admission policy keeps it from doing with those rights.

use std::sync::Arc;

use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_zerocopy_test_env::wait::eventually_seen;

use crate::support::{Env, MINUTE};

/// The committed list: one line per API group and resource, its verbs and names.
const EXPECTED: &str = "tests/expected/operator-rights.txt";

/// A client with the operator's token (the chart's ServiceAccount).
async fn operator_client(env: &Env) -> Client {
    let kubeconfig = Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The rules the API server grants `client` in `ns`, one sorted line each.
async fn rights(client: &Client, ns: &str) -> Vec<String> {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(ns.into()),
        },
        ..Default::default()
    };
    let review = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let mut lines = Vec::new();
    for rule in review.status.unwrap().resource_rules {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        let names = rule
            .resource_names
            .filter(|n| !n.is_empty())
            .map(|n| format!(" names={}", n.join(",")))
            .unwrap_or_default();
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                let group = if group.is_empty() { "core" } else { group };
                lines.push(format!("{group} {resource}: {}{names}", verbs.join(",")));
            }
        }
    }
    lines.sort();
    lines.dedup();
    lines
}

/// The API server's refusal of `result`, or what it accepted.
fn refused<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Result<String, String> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(status.message),
        other => Err(format!("{other:?}")),
    }
}

/// The operator's rights in a tenant's namespace are the committed list. With them it could
/// bind a tenant's account to a Role of its own verbs (creating Jobs), or write in
/// kube-system: the chart's admission policy refuses both, in words.
pub async fn the_operators_account_holds_the_committed_rights_and_cannot_lend_them(env: Arc<Env>) {
    let ns = env.namespace("rights").await;
    let operator = operator_client(&env).await;
    let held = rights(&operator, &ns).await;
    let expected = std::fs::read_to_string(kube_zerocopy_test_env::repo().join(EXPECTED)).unwrap();
    let expected: Vec<&str> = expected.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        held,
        expected,
        "the operator's rights in a tenant namespace changed; if that is meant, write into \
         {EXPECTED}:\n{}",
        held.join("\n")
    );

    // An administrator's Role that creates Jobs, which the operator may create too: bound by
    // the operator to the tenant's default account, it would lend the operator's verbs.
    let roles: Api<Role> = env.api(&ns);
    let role = Role {
        metadata: ObjectMeta {
            name: Some("job-creators".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["batch".into()]),
            resources: Some(vec!["jobs".into()]),
            verbs: vec!["create".into()],
            ..Default::default()
        }]),
    };
    roles.create(&PostParams::default(), &role).await.unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("borrowed".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "job-creators".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "default".into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    let bindings: Api<RoleBinding> = Api::namespaced(operator.clone(), &ns);
    // The policy is in force a moment after the chart created it.
    let message = eventually_seen("the operator's RoleBinding refused", MINUTE, || async {
        let attempt = bindings.create(&PostParams::default(), &binding).await;
        let seen = refused(attempt);
        if seen.is_err() {
            let _ = Api::<RoleBinding>::namespaced(env.admin.clone(), &ns)
                .delete("borrowed", &Default::default())
                .await;
        }
        Ok((seen.clone().ok(), seen.err().unwrap_or_default()))
    })
    .await
    .unwrap();
    assert!(
        message.contains("writes only batch drivers' RoleBindings"),
        "{message}"
    );
    // A Role of another shape, by the operator.
    let roles_as_operator: Api<Role> = Api::namespaced(operator.clone(), &ns);
    let own = Role {
        metadata: ObjectMeta {
            name: Some("x-zerocopy-driver".into()),
            ..Default::default()
        },
        ..role.clone()
    };
    let message = refused(roles_as_operator.create(&PostParams::default(), &own).await).unwrap();
    assert!(
        message.contains("writes only batch drivers' Roles"),
        "{message}"
    );
    // A Job in kube-system.
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "in-kube-system"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(operator, "kube-system");
    let message = refused(jobs.create(&PostParams::default(), &job).await).unwrap();
    assert!(
        message.contains("writes nothing in the system namespace kube-system"),
        "{message}"
    );
}
