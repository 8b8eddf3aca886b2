//! examples/quickstart/ applied as it is (only its namespace changes): the ConfigMap's model is
//! published, the Actor becomes Ready and answers a batch through its Service with what the
//! ordinary (copying) load of the same file computes. Nothing outside the cluster is needed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, PostParams};
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy_e2e::{repo, source};
use kube_zerocopy_fetch::ModelFormat;
use kube_zerocopy_worker::model::LoadedModel;
use tch::{Device, Kind, Tensor};

use crate::actor::infer_through_service;
use crate::support::*;

pub async fn quickstart_runs_as_it_is(env: Arc<Env>) -> Result<()> {
    let ns = TestNamespace::create(&env.client, "quickstart", &[]).await?;
    let dir = repo().join("examples/quickstart");
    let mut model: ConfigMap =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("model.yaml"))?)?;
    let mut pipeline: InferencePipeline =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("pipeline.yaml"))?)?;
    model.metadata.namespace = Some(ns.name.clone());
    pipeline.metadata.namespace = Some(ns.name.clone());
    let outcome = async {
        Api::<ConfigMap>::namespaced(env.client.clone(), &ns.name)
            .create(&PostParams::default(), &model)
            .await?;
        apply(&env.client, &pipeline).await?;
        wait_phase(
            &env.client,
            &ns.name,
            "quickstart",
            &["Ready"],
            Duration::from_secs(300),
        )
        .await?;
        timelines(&env.client, &ns.name, "quickstart").await?;
        // What `kubectl wait --for=condition=Ready` waits for.
        let status = Api::<InferencePipeline>::namespaced(env.client.clone(), &ns.name)
            .get_status("quickstart")
            .await?
            .status
            .context("no status")?;
        ensure!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "Ready, yet no Ready=True condition: {:?}",
            status.conditions
        );
        let url = format!("http://quickstart-zerocopy.{}.svc", ns.name);
        ensure!(
            status.url.as_deref() == Some(url.as_str()),
            "status.url {:?}, not {url}",
            status.url
        );

        // The reference: the copying load of the ConfigMap's bytes.
        let bytes = &model
            .binary_data
            .as_ref()
            .and_then(|d| d.get("mlp.safetensors"))
            .context("the ConfigMap holds no mlp.safetensors")?
            .0;
        let scratch = tempfile::tempdir()?;
        let file = scratch.path().join("mlp.safetensors");
        std::fs::write(&file, bytes)?;
        let mut mlp = source("mlp", ModelFormat::Safetensors, &file);
        mlp.architecture = Some("Mlp".into());
        let copying = LoadedModel::load_copying(&file, &mlp, Device::Cpu)?;
        tch::manual_seed(7);
        let batch = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let expected = copying.forward(&batch)?;
        let body_file = scratch.path().join("batch.safetensors");
        Tensor::write_safetensors(&[("input", &batch)], &body_file)?;
        let body = std::fs::read(&body_file)?;

        let service = Api::<Service>::namespaced(env.client.clone(), &ns.name)
            .get("quickstart-zerocopy")
            .await?;
        let ip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .context("the Service has no ClusterIP")?;
        let answer = infer_through_service(&ip, "quickstart", body).await?;
        let got = kube_zerocopy_worker::shard_file::decode_output(&answer)?;
        ensure!(
            got.size() == [3, 4] && got.equal(&expected),
            "the quickstart answered {got:?}, not the copying load's {expected:?}"
        );
        println!(
            "  {}/quickstart: a batch of 3 through the Service equals the copying load's answer",
            ns.name
        );
        Ok(())
    }
    .await;
    env.record(&format!("{}/quickstart", ns.name), outcome.is_ok());
    outcome
}
