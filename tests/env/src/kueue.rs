//! Kueue, the job queueing controller, on the test cluster: built from its pinned module
//! by scripts/kueue.sh, its CustomResourceDefinitions applied from the same version, run as a
//! process under the admin's kubeconfig. By default only Jobs labelled
//! `kueue.x-k8s.io/queue-name` are its (`manageJobsWithoutQueueName: false`) and its admission
//! webhooks are not registered with the API server, so a queued Job must be created suspended,
//! as the operator does. [`Manage::AlsoUnlabelledIn`] makes it manage every Job of some
//! namespaces, its Job webhook registered for them, as a cluster's Kueue may.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

use crate::cluster::certs::Pki;
use crate::cluster::process::{wait_until_answers, Process, Spawner};
use crate::cluster::{free_port, run_script, TestCluster};
use crate::wait::eventually_seen;

/// Kueue answers /readyz once its webhook server listens: seconds, more on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Where Kueue reads its metrics server's certificate when it does not manage its own
/// certificates: fixed in its main.go, and read even with the metrics server off.
const METRICS_CERTS: &str = "/etc/kueue/metrics/certs";

/// A running Kueue, killed on drop (and with the test process).
pub struct Kueue {
    pub log: PathBuf,
    process: Option<Process>,
    /// The Job webhook registered for it, by name.
    webhook: Option<String>,
    admin: Client,
    _spawner: Spawner,
}

/// Which Jobs Kueue manages.
#[derive(Clone, Debug)]
pub enum Manage {
    /// Only those labelled `kueue.x-k8s.io/queue-name` (`manageJobsWithoutQueueName: false`).
    QueuedOnly,
    /// Those without the label too, in the namespaces labelled `label=value`, suspended when
    /// they are created by Kueue's Job webhook (registered with the API server for those
    /// namespaces alone), as where a cluster's Kueue manages every Job.
    AlsoUnlabelledIn { label: String, value: String },
}

impl Kueue {
    /// Builds Kueue if needed (minutes, the first time), applies its CRDs, starts it with its
    /// files in the cluster's folder and returns once it is ready. It manages queued Jobs only.
    pub async fn start(cluster: &TestCluster, admin: &Client) -> Result<Kueue> {
        Self::start_with(
            &cluster.dir().join("kueue"),
            &cluster.kubeconfig_path(),
            admin,
            Manage::QueuedOnly,
        )
        .await
    }

    /// [`Kueue::start`] on the cluster of `kubeconfig`, with its files in `dir`, managing
    /// `manage`'s Jobs.
    pub async fn start_with(
        dir: &Path,
        kubeconfig: &Path,
        admin: &Client,
        manage: Manage,
    ) -> Result<Kueue> {
        let bin = tokio::task::spawn_blocking(|| run_script("kueue.sh", &[])).await??;
        let bin = PathBuf::from(bin.trim());
        if bin.as_os_str().is_empty() {
            bail!("scripts/kueue.sh printed no folder");
        }
        apply_crds(admin, &bin.join("crds")).await?;
        Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "kueue-system"}}))?,
            )
            .await
            .or_else(|e| match e {
                kube::Error::Api(ref a) if a.code == 409 => Ok(Default::default()),
                e => Err(e),
            })?;

        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        // Its webhook serves with a certificate of its own CA, for 127.0.0.1: an API server
        // on this machine reaches it where a webhook is registered.
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let pki = Pki::create(&pki_dir, Ipv4Addr::LOCALHOST)?;
        pki.issue_server("kueue", "/CN=kueue-webhook-service")?;
        for folder in [certs.as_path(), Path::new(METRICS_CERTS)] {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("creating {} (Kueue reads it)", folder.display()))?;
            std::fs::copy(pki.path("kueue.crt"), folder.join("tls.crt"))?;
            std::fs::copy(pki.path("kueue.key"), folder.join("tls.key"))?;
        }
        let health = free_port()?;
        let webhook = free_port()?;
        let managed = match &manage {
            Manage::QueuedOnly => "manageJobsWithoutQueueName: false\n".to_owned(),
            Manage::AlsoUnlabelledIn { label, value } => format!(
                "manageJobsWithoutQueueName: true\n\
                 managedJobsNamespaceSelector: {{matchLabels: {{{label}: {value}}}}}\n"
            ),
        };
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "apiVersion: config.kueue.x-k8s.io/v1beta2\n\
                 kind: Configuration\n\
                 namespace: kueue-system\n\
                 {managed}\
                 leaderElection: {{leaderElect: false}}\n\
                 internalCertManagement: {{enable: false}}\n\
                 webhook: {{host: 127.0.0.1, port: {webhook}, certDir: {certs}}}\n\
                 metrics: {{bindAddress: \"0\"}}\n\
                 health: {{healthProbeBindAddress: \"127.0.0.1:{health}\"}}\n\
                 integrations: {{frameworks: [batch/job]}}\n\
                 featureGates: {{VisibilityOnDemand: false}}\n",
                certs = certs.display(),
            ),
        )?;
        let log = dir.join("kueue.log");
        let mut cmd = Command::new(bin.join("kueue"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--zap-log-level=2")
            .env("KUBECONFIG", kubeconfig);
        let spawner = Spawner::new()?;
        let mut process = spawner.spawn_logged("kueue", cmd, &log, false)?;
        let url = format!("http://127.0.0.1:{health}/readyz");
        let log_of_wait = log.clone();
        let process = tokio::task::spawn_blocking(move || {
            wait_until_answers(&mut process, &url, false, READY_TIMEOUT, &log_of_wait)
                .map(|()| process)
        })
        .await??;
        let kueue = Kueue {
            log,
            process: Some(process),
            webhook: None,
            admin: admin.clone(),
            _spawner: spawner,
        };
        match manage {
            Manage::QueuedOnly => Ok(kueue),
            Manage::AlsoUnlabelledIn { label, value } => {
                let ca = std::fs::read(pki.path("ca.crt"))?;
                kueue.with_job_webhook(webhook, ca, &label, &value).await
            }
        }
    }

    /// Registers Kueue's Job webhook (which suspends the Jobs it manages as they are created)
    /// for the namespaces labelled `label=value`; removed on drop.
    async fn with_job_webhook(
        mut self,
        port: u16,
        ca: Vec<u8>,
        label: &str,
        value: &str,
    ) -> Result<Kueue> {
        let name = format!("kzc-test-kueue-job-{port}");
        let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "mjob.kb.io",
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{port}/mutate-batch-v1-job"),
                    "caBundle": ByteString(ca),
                },
                "rules": [{
                    "apiGroups": ["batch"], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["jobs"],
                }],
                "namespaceSelector": {"matchLabels": {label: value}},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": "Fail",
            }],
        }))?;
        Api::<MutatingWebhookConfiguration>::all(self.admin.clone())
            .create(&PostParams::default(), &webhook)
            .await
            .context("registering Kueue's Job webhook")?;
        self.webhook = Some(name);
        Ok(self)
    }
}

impl Kueue {
    /// Removes its webhook (its namespaces' Jobs would be refused once Kueue is gone) and
    /// stops it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(name) = self.webhook.take() {
            Api::<MutatingWebhookConfiguration>::all(self.admin.clone())
                .delete(&name, &Default::default())
                .await
                .context("removing Kueue's Job webhook")?;
        }
        Ok(())
    }
}

impl Drop for Kueue {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }
}

/// Applies every CRD in `folder` (server-side: the Workload CRD is too large for the
/// last-applied annotation) and waits until each is established.
async fn apply_crds(admin: &Client, folder: &Path) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let mut names = vec![];
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .collect::<std::io::Result<_>>()?;
    files.sort_by_key(|f| f.path());
    for file in files
        .iter()
        .filter(|f| f.path().extension() == Some("yaml".as_ref()))
    {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(file.path())?)
                .with_context(|| format!("reading {}", file.path().display()))?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("kube-zerocopy-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying the CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        let what = format!("the CRD {name} established");
        eventually_seen(&what, Duration::from_secs(60), || async {
            let crd = crds.get(&name).await?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            let established = conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok((established.then_some(()), format!("{conditions:?}")))
        })
        .await?;
    }
    Ok(())
}
