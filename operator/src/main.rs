//! `kube-zerocopy`: the operator's binary and CLI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kube::{CustomResourceExt, Resource as _};
use kube_zerocopy::crd::InferencePipeline;
use kube_zerocopy::leader::Election;
use kube_zerocopy::node_store::NodeStore;
use kube_zerocopy::{local, render};
use kube_zerocopy_contract::settings;

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
        #[command(flatten)]
        settings: settings::Operator,
    },
    /// Print a CustomResourceDefinition as YAML.
    Crd {
        #[arg(value_enum, default_value = "inference-pipeline")]
        resource: Resource,
    },
    /// Print the reference of the resources (every field, its type, description and the API
    /// server's rules) as Markdown.
    Reference,
    /// Print the version, the API version it serves and the images its pipelines run.
    Version,
    /// Print the objects a pipeline becomes (Job, or Deployment and Service), without a cluster,
    /// after the checks the API server makes.
    Render {
        /// A YAML file (every InferencePipeline in it; other kinds are skipped), a folder of
        /// them, or - for standard input.
        #[arg(short = 'f', long)]
        file: PathBuf,
        #[command(flatten)]
        images: settings::Images,
        #[command(flatten)]
        policy: settings::Policy,
    },
    /// Run pipelines on this machine, without a cluster.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
}

/// The chart's (or the command line's) images and policy, over the operator's defaults.
fn render_settings(images: settings::Images, policy: settings::Policy) -> render::Settings {
    let mut settings = render::Settings::default();
    if let Some(image) = images.runtime_image {
        settings.runtime_image = image;
    }
    if let Some(image) = images.cuda_runtime_image {
        settings.cuda_runtime_image = image;
    }
    settings.policy = kube_zerocopy::policy::PipelinePolicy {
        allow_host_path: policy.allow_host_path,
        allow_service_account: policy.allow_service_account,
        toleration_keys: policy.toleration_keys,
        node_sharing: policy.node_sharing,
        priority_classes: policy
            .priority_classes
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect(),
        runtime_classes: policy
            .runtime_classes
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect(),
    };
    settings
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
        /// Where kube-zerocopy-weight-server and kube-zerocopy-worker are (default: beside this binary).
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
            settings:
                settings::Operator {
                    namespace,
                    images,
                    policy,
                    metrics_listen,
                    leader_election,
                    lease_namespace,
                    identity,
                    lease_duration,
                },
        } => {
            let settings = render_settings(images, policy);
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
                // The chart sets an empty namespace for all namespaces.
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
        Command::Reference => {
            emit(&kube_zerocopy::reference::markdown(&[
                InferencePipeline::crd(),
                NodeStore::crd(),
            ]))?;
            Ok(())
        }
        Command::Version => {
            let defaults = render::Settings::default();
            emit(&format!(
                "kube-zerocopy {}
api: {}
runtime image: {}
cuda runtime image: {}
",
                env!("CARGO_PKG_VERSION"),
                InferencePipeline::api_version(&()),
                defaults.runtime_image,
                defaults.cuda_runtime_image,
            ))?;
            Ok(())
        }
        Command::Render {
            file,
            images,
            policy,
        } => {
            let settings = render_settings(images, policy);
            for pipeline in local::load_pipelines(&file)? {
                let rendered = render::render(&pipeline, &settings).with_context(|| {
                    format!(
                        "pipeline {}",
                        pipeline.metadata.name.as_deref().unwrap_or_default()
                    )
                })?;
                emit(&rendered.to_yaml()?)?;
            }
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
