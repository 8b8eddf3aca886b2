//! Real-node scenarios: the operator installed by its chart as a pod, pipelines from the
//! examples run by a real kubelet and containerd on the images built from the Dockerfiles.
//! One cluster for all (one node per machine); each scenario in its own namespace, so that one
//! failure does not hide the others. Prints each pipeline's pod timelines and memory figures,
//! and closes with `real-node pipelines: N succeeded of M`.
//!
//! Needs root (it runs a kubelet). `make e2e-node` runs it alone; `make test` runs it too.

mod actor;
mod bad_model;
mod images;
mod planted;
mod pod_security;
mod quickstart;
mod retry;
mod support;
mod task;
mod tenant_attacks;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};
use support::Env;

type Scenario = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

macro_rules! scenarios {
    ($($path:path),* $(,)?) => {
        vec![$((stringify!($path), (|env| Box::pin($path(env))) as Scenario)),*]
    };
}

fn main() {
    let args = Arguments::from_args();
    let scenarios = scenarios![
        // First: it plants entries for models no scenario has published yet.
        planted::entries_planted_in_the_store_affect_no_pipeline,
        quickstart::quickstart_runs_as_it_is,
        task::torchscript_model_on_a_volume,
        task::safetensors_model_over_http,
        task::torchscript_with_data_on_s3,
        actor::torchscript_pod_sharing,
        actor::safetensors_two_namespaces_node_sharing,
        actor::safetensors_from_s3_with_a_secret,
        actor::batch_run_survives_a_killed_replica,
        retry::killed_worker_is_retried,
        retry::a_failed_shard_is_listed_and_the_others_run_on,
        bad_model::wrong_digest_is_told_by_the_termination_message,
        bad_model::node_sharing_wrong_digest_is_told_by_the_agent,
        pod_security::restricted_namespace_runs_pod_sharing,
        images::each_image_runs_with_runc_as_non_root,
        tenant_attacks::a_private_model_mounted_by_another_namespace_that_names_its_digest,
        tenant_attacks::a_batch_driver_taking_over_an_administrators_account,
        tenant_attacks::sources_on_node_local_addresses,
        tenant_attacks::an_idle_connection_flood_of_the_node_agent,
        tenant_attacks::a_store_wipe_by_a_crafted_size_header,
        tenant_attacks::a_kueue_managed_job_without_a_queue_label,
    ];
    let names = || scenarios.iter().map(|(n, _)| n.replace("::", "_"));
    if args.list {
        let trials = names().map(|n| Trial::test(n, || Ok(()))).collect();
        libtest_mimic::run(&args, trials).exit();
    }

    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let env = match runtime.block_on(Env::start()) {
        Ok(env) => env,
        Err(e) => {
            // Every scenario fails with the cause, so the count shows them all.
            let cause = format!("starting the real cluster: {e:#}");
            eprintln!("{cause}");
            let trials = names()
                .map(|n| {
                    let cause = cause.clone();
                    Trial::test(n, move || Err(Failed::from(cause)))
                })
                .collect();
            let conclusion = libtest_mimic::run(&args, trials);
            println!("real-node pipelines: 0 succeeded of 0 (no cluster)");
            conclusion.exit();
        }
    };
    let trials = scenarios
        .into_iter()
        .map(|(name, scenario)| {
            let env = env.clone();
            let handle = runtime.handle().clone();
            Trial::test(name.replace("::", "_"), move || {
                handle
                    .block_on(scenario(env))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let (succeeded, total) = env.outcomes();
    let (refused, attacks) = env.attacks();
    // Every scenario has finished: this is the last reference.
    if let (true, Ok(mut env)) = (conclusion.has_failed(), Arc::try_unwrap(env)) {
        env.cluster.keep_files();
    }
    drop(runtime);
    println!("real-node pipelines: {succeeded} succeeded of {total}");
    println!("tenant attacks: {refused} refused of {attacks}");
    conclusion.exit();
}
