//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler built from the official modules, kwok nodes), installed by its chart with
//! helm and running under the chart's ServiceAccount token (so its RBAC is proven sufficient).
//! With `KZC_TEST_KUBECONFIG` set, the same scenarios run on that cluster instead (kind, k3d),
//! with kwok's Nodes beside its own (see `TestCluster`).
//!
//! One control plane and one operator for all scenarios, each named after what a user does
//! and run in a namespace of its own, so that one failure does not hide the others. The
//! scenarios that stop the operator or the API server run last, one at a time.

mod actor;
mod backends;
mod chart;
mod explain;
mod lifecycle;
mod linking;
mod mistakes;
mod node_store;
mod pod_security;
mod queue;
mod rights;
mod support;
mod task;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Arguments, Conclusion, Failed, Trial};
use support::Env;

type Scenario = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! scenarios {
    ($($path:path),* $(,)?) => {
        vec![$((stringify!($path).replace("::", "_"), (|env| Box::pin($path(env))) as Scenario)),*]
    };
}

fn main() {
    let args = Arguments::from_args();
    let side_by_side = scenarios![
        chart::two_replicas_without_leader_election_are_refused,
        chart::a_watched_namespace_gives_the_operator_no_cluster_wide_rights,
        chart::the_charts_containers_set_only_what_their_binaries_read,
        chart::the_default_install_runs_no_node_agent,
        chart::node_pools_get_an_agent_each_with_their_capacity,
        chart::monitoring_is_opt_in_and_complete_when_asked,
        explain::kubectl_explain_describes_every_field,
        linking::the_operators_scenarios_load_no_libtorch,
        mistakes::invalid_pipelines_are_rejected_in_the_cli_s_words,
        mistakes::a_template_with_a_host_path_is_forbidden_by_policy,
        mistakes::a_pipeline_whose_job_is_refused_says_why_until_fixed,
        mistakes::a_pipeline_with_a_bad_quantity_reports_why,
        mistakes::a_foreign_object_of_the_same_name_is_not_taken_over,
        mistakes::a_pipeline_whose_pods_cannot_be_scheduled_says_why,
        task::a_task_pipeline_succeeds_with_one_event_per_phase,
        task::more_parallelism_applies_in_place_and_a_new_model_reruns_with_an_event,
        task::a_finished_pipeline_is_deleted_once_its_ttl_is_up,
        queue::a_suspended_pipeline_runs_only_while_resumed,
        queue::queued_pipelines_wait_for_quota_and_run_in_turn,
        queue::a_job_another_controller_suspended_is_not_resumed_by_the_operator,
        actor::an_actor_pipeline_scales_and_rolls_out_a_new_model,
        actor::a_suspended_batch_run_runs_once_resumed_and_expires,
        actor::a_pipeline_named_after_an_administrators_account_cannot_take_it_over,
        pod_security::node_sharing_pods_pass_restricted,
        node_store::an_agent_writes_only_its_own_nodes_store_and_labels,
        node_store::node_sharing_pods_prefer_nodes_that_hold_their_models,
        rights::the_operators_account_holds_the_committed_rights_and_cannot_lend_them,
    ];
    let one_at_a_time = scenarios![
        lifecycle::an_operator_killed_mid_reconcile_converges_when_restarted,
        lifecycle::an_upgraded_operator_leaves_finished_jobs_alone,
        lifecycle::replicas_elect_one_leader_and_hand_over,
        lifecycle::deleting_pipelines_removes_their_objects_without_warnings,
        chart::helm_upgrade_upgrades_the_crds,
    ];
    // Only where this harness runs the API server (not on a cluster named by a kubeconfig).
    let api_server_stopped = scenarios![
        lifecycle::the_operator_rides_out_an_api_server_outage,
        backends::the_scenarios_run_on_a_cluster_named_by_a_kubeconfig,
    ];
    if args.list {
        let names = side_by_side
            .iter()
            .chain(&one_at_a_time)
            .chain(&api_server_stopped)
            .map(|(n, _)| n);
        let trials = names.map(|n| Trial::test(n, || Ok(()))).collect();
        libtest_mimic::run(&args, trials).exit();
    }

    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let env = match runtime.block_on(Env::start()) {
        Ok(env) => Arc::new(env),
        Err(e) => {
            // Every scenario fails with the cause, so the count shows them all.
            let cause = format!("starting the control plane: {e:#}");
            eprintln!("{cause}");
            let trials = side_by_side
                .iter()
                .chain(&one_at_a_time)
                .chain(&api_server_stopped)
                .map(|(n, _)| {
                    let cause = cause.clone();
                    Trial::test(n, move || Err(Failed::from(cause)))
                })
                .collect();
            libtest_mimic::run(&args, trials).exit();
        }
    };
    let trials = |scenarios: Vec<(String, Scenario)>| -> Vec<Trial> {
        scenarios
            .into_iter()
            .map(|(name, scenario)| {
                let (env, handle) = (env.clone(), runtime.handle().clone());
                // A panicking scenario fails alone: its task's panic becomes the failure.
                Trial::test(name, move || {
                    let task = handle.spawn(scenario(env));
                    handle
                        .block_on(task)
                        .map_err(|e| Failed::from(panic_message(e)))
                })
            })
            .collect()
    };
    let first = libtest_mimic::run(&args, trials(side_by_side));
    let alone = Arguments {
        test_threads: Some(1),
        ..args.clone()
    };
    let can_stop_api_server = env
        .cluster
        .try_lock()
        .is_ok_and(|cluster| cluster.can_stop_api_server());
    let mut last_trials = trials(one_at_a_time);
    last_trials.extend(
        trials(api_server_stopped)
            .into_iter()
            .map(|trial| trial.with_ignored_flag(!can_stop_api_server)),
    );
    let last = libtest_mimic::run(&alone, last_trials);
    let failed = first.has_failed() || last.has_failed();
    if let (true, Ok(env)) = (failed, Arc::try_unwrap(env)) {
        env.cluster.into_inner().keep();
        println!("operator log: {}", env.log.display());
    }
    drop(runtime);
    if failed {
        std::process::exit(101);
    }
    let total = |c: &Conclusion| c.num_passed;
    println!(
        "operator scenarios: {} passed",
        total(&first) + total(&last)
    );
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}
