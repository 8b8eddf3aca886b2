//! `kube-zerocopy`: the operator's binary and CLI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::leader::Election;
use kube_zerocopy::node_store::NodeStore;
use kube_zerocopy::{local, render};

#[derive(Parser)]
#[command(name = "kube-zerocopy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The custom resources kube-zerocopy defines.
#[derive(Clone, Copy, ValueEnum)]
enum Resource {
    InferencePipeline,
    NodeStore,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: reconcile InferencePipelines into Jobs and Deployments.
    Operator {
        /// Watch one namespace only (default: all).
        #[arg(long, env = "KZC_WATCH_NAMESPACE")]
        namespace: Option<String>,
        #[command(flatten)]
        images: Images,
        #[command(flatten)]
        policy: Policy,
        /// Address of /metrics, /livez and /readyz.
        #[arg(long, env = "KZC_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
        metrics_listen: String,
        /// Reconcile only while holding the leader lease, so that replicas never race.
        #[arg(long, env = "KZC_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// The namespace of the leader lease: the operator's own.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's name in the election (default: host name and process id).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds a lease holds without renewal: how long a standby waits for a leader that
        /// died without handing the lease back.
        #[arg(long, env = "KZC_LEASE_DURATION", default_value_t = 15)]
        lease_duration: u64,
    },
    /// Print a CustomResourceDefinition as YAML.
    Crd {
        #[arg(value_enum, default_value = "inference-pipeline")]
        resource: Resource,
    },
    /// Print the objects a pipeline becomes (Job, or Deployment and Service), without a cluster.
    Render {
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[command(flatten)]
        images: Images,
        #[command(flatten)]
        policy: Policy,
    },
    /// Run pipelines on this machine, without a cluster.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
}

/// The images the pipelines' pods run (the operator's version when not set).
#[derive(clap::Args)]
struct Images {
    /// The runtime image (sidecar and worker) of cpu pipelines.
    #[arg(long, env = "KZC_RUNTIME_IMAGE")]
    runtime_image: Option<String>,
    /// The runtime image of cuda pipelines (libtorch's CUDA backend and libraries).
    #[arg(long, env = "KZC_CUDA_RUNTIME_IMAGE")]
    cuda_runtime_image: Option<String>,
}

impl Images {
    fn apply(self, settings: &mut render::Settings) {
        if let Some(image) = self.runtime_image {
            settings.runtime_image = image;
        }
        if let Some(image) = self.cuda_runtime_image {
            settings.cuda_runtime_image = image;
        }
    }
}

/// What pipelines' templates may add to their pods (everything else is refused).
#[derive(clap::Args)]
struct Policy {
    /// Allow hostPath volumes in template.volumes.
    #[arg(long, env = "KZC_ALLOW_HOST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    allow_host_path: bool,
    /// Allow template.serviceAccountName and projected ServiceAccount tokens.
    #[arg(long, env = "KZC_ALLOW_SERVICE_ACCOUNT", default_value_t = false, action = clap::ArgAction::Set)]
    allow_service_account: bool,
    /// The taint keys template.tolerations may tolerate, comma-separated (`*`: any).
    #[arg(long, env = "KZC_TOLERATION_KEYS", value_delimiter = ',', default_values_t = kube_zerocopy::policy::DEFAULT_TOLERATION_KEYS.map(String::from))]
    toleration_keys: Vec<String>,
}

impl Policy {
    fn apply(self, settings: &mut render::Settings) {
        settings.policy = kube_zerocopy::policy::PipelinePolicy {
            allow_host_path: self.allow_host_path,
            allow_service_account: self.allow_service_account,
            toleration_keys: self.toleration_keys,
        };
    }
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Run a Task pipeline: one sidecar, worker processes sharing /dev/shm.
    Run {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// How many workers at once (default: the pipeline's task.parallelism).
        #[arg(long)]
        parallelism: Option<usize>,
        /// Where kube-zerocopy-sidecar and kube-zerocopy-worker are (default: beside this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The folder that plays the node's /dev/shm.
        #[arg(long, default_value = "/dev/shm")]
        shm_dir: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    kube_zerocopy_runtime::process::init_logs();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Prints to stdout; a reader that closed the pipe early (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Operator {
            namespace,
            images,
            policy,
            metrics_listen,
            leader_election,
            lease_namespace,
            identity,
            lease_duration,
        } => {
            let mut settings = render::Settings::default();
            images.apply(&mut settings);
            policy.apply(&mut settings);
            let metrics = std::sync::Arc::new(kube_zerocopy::metrics::Metrics::default());
            kube_zerocopy::metrics::serve(&metrics_listen, metrics.clone())?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let client = kube::Client::try_default().await?;
                let election = leader_election.then(|| Election {
                    namespace: lease_namespace,
                    lease_name: "kube-zerocopy-operator".into(),
                    identity: identity.unwrap_or_else(Election::default_identity),
                    lease_duration: Duration::from_secs(lease_duration),
                });
                // The chart sets KZC_WATCH_NAMESPACE="" for all namespaces.
                let namespace = namespace.filter(|n| !n.is_empty());
                kube_zerocopy::controller::run(client, settings, namespace, election, metrics).await
            })
        }
        Command::Crd { resource } => {
            let crd = match resource {
                Resource::InferencePipeline => InferencePipeline::crd(),
                Resource::NodeStore => NodeStore::crd(),
            };
            emit(&serde_yaml::to_string(&crd)?)?;
            Ok(())
        }
        Command::Render {
            file,
            images,
            policy,
        } => {
            let pipeline = local::load_pipeline(&file)?;
            let mut settings = render::Settings::default();
            images.apply(&mut settings);
            policy.apply(&mut settings);
            emit(&render::render(&pipeline, &settings)?.to_yaml()?)?;
            Ok(())
        }
        Command::Local {
            command:
                LocalCommand::Run {
                    file,
                    parallelism,
                    bin_dir,
                    shm_dir,
                    json,
                },
        } => {
            let opts = local::Options {
                file,
                parallelism,
                bin_dir,
                shm_dir,
                json,
            };
            let summary = local::run(&opts)?;
            if opts.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!("{summary}");
            }
            if !summary.failed.is_empty() {
                anyhow::bail!(
                    "{} of {} shards failed",
                    summary.failed.len(),
                    summary.shards
                );
            }
            Ok(())
        }
    }
}
