//! The pod contract: what the operator puts in each container's environment and the binaries
//! read, one struct per part, each variable named once here. The operator builds the structs
//! and renders them with [`to_env`]; a binary parses the same structs by flattening them into
//! its command line (clap reads the variables). A field renamed or removed here changes both
//! sides or fails to compile, never in a pod.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use crate::models::{models_from_json, AzureAccess, ModelSource, S3Access, MODELS_ENV};

/// Every variable of the pod contract starts with this: a pipeline's template may add others.
pub const ENV_PREFIX: &str = "KZC_";

/// `value` as environment variables: each field that has a value, under the variable its
/// argument reads. Strings and numbers as they are; a list or an object as JSON, which its
/// argument parses back.
///
/// Every field must be an argument with an environment variable: a field the binary could not
/// read back is a defect, and panics here (the contract test renders every example).
pub fn to_env<T: clap::Args + Serialize>(value: &T) -> Vec<(String, String)> {
    let command = T::augment_args(clap::Command::new("env"));
    let serde_json::Value::Object(fields) =
        serde_json::to_value(value).expect("the pod contract serializes")
    else {
        panic!("a pod contract struct serializes as an object");
    };
    for field in fields.keys() {
        assert!(
            command
                .get_arguments()
                .any(|a| a.get_id().as_str() == field && a.get_env().is_some()),
            "field {field} has no argument with an environment variable"
        );
    }
    command
        .get_arguments()
        .filter_map(|argument| {
            let variable = argument.get_env()?.to_str()?.to_owned();
            let value = match fields.get(argument.get_id().as_str())? {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                other => other.to_string(),
            };
            Some((variable, value))
        })
        .collect()
}

/// The variables `T` reads.
pub fn variables<T: clap::Args>() -> Vec<String> {
    T::augment_args(clap::Command::new("env"))
        .get_arguments()
        .filter_map(|a| Some(a.get_env()?.to_str()?.to_owned()))
        .collect()
}

/// `T` as its binary reads it from `env` (the variables it does not read are left alone):
/// each variable given to the argument that reads it, through that argument's own parser.
/// For tests and tools that check a rendered pod without running it.
pub fn from_env<T: clap::Args + clap::FromArgMatches>(
    env: &[(String, String)],
) -> Result<T, clap::Error> {
    let command = T::augment_args(clap::Command::new("env").no_binary_name(true));
    let mut args = vec![];
    for (variable, value) in env {
        let reads = |a: &&clap::Arg| a.get_env().and_then(|e| e.to_str()) == Some(variable);
        if let Some(argument) = command.get_arguments().find(reads) {
            let long = argument.get_long().expect("every argument has a long flag");
            if argument.get_action().takes_values() {
                args.push(format!("--{long}={value}"));
            } else if matches!(value.as_str(), "true" | "1" | "yes" | "on") {
                // A flag: set by a true value, as clap reads its variable.
                args.push(format!("--{long}"));
            }
        }
    }
    T::from_arg_matches(&command.try_get_matches_from(args)?)
}

/// A JSON-valued field as the string its variable holds, its keys in the struct's order.
fn json_string<T: Serialize, S: serde::Serializer>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer
            .serialize_str(&serde_json::to_string(value).map_err(serde::ser::Error::custom)?),
        None => serializer.serialize_none(),
    }
}

/// A JSON argument (S3 or Azure settings) as the operator renders it.
fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("not the expected JSON: {e}"))
}

/// The models a pod serves (`KZC_MODELS`, a JSON list).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Models(pub Vec<ModelSource>);

impl FromStr for Models {
    type Err = anyhow::Error;

    /// An empty list is read (collecting unused models needs none); a command that publishes
    /// or maps models refuses it ([`PodModels::models`]).
    fn from_str(json: &str) -> anyhow::Result<Self> {
        if serde_json::from_str::<Vec<serde_json::Value>>(json).is_ok_and(|list| list.is_empty()) {
            return Ok(Models(vec![]));
        }
        models_from_json(json).map(Models)
    }
}

/// Where a pod's store and bindings are, and which models it serves: the weight server's and
/// the workers' common part.
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct PodModels {
    /// The models, as JSON (what the operator renders from `spec.models`).
    #[arg(long, env = MODELS_ENV, global = true)]
    #[serde(serialize_with = "json_string")]
    pub models: Option<Models>,
    /// The store: the pod's own (an emptyDir with medium Memory), or the node agent's read-only
    /// view of the node's store.
    #[arg(long, env = "KZC_STORE", global = true, default_value = "/kzc/store")]
    pub store: PathBuf,
    /// This pod's bindings folder (model name -> digest).
    #[arg(
        long,
        env = "KZC_BINDINGS",
        global = true,
        default_value = "/kzc/bindings"
    )]
    pub bindings: PathBuf,
}

impl PodModels {
    /// The models, which every command that publishes or maps them needs.
    pub fn models(&self) -> anyhow::Result<&[ModelSource]> {
        match &self.models {
            None => anyhow::bail!("{MODELS_ENV} is not set: it must list the models"),
            Some(Models(models)) if models.is_empty() => {
                anyhow::bail!("{MODELS_ENV} lists no models")
            }
            Some(Models(models)) => Ok(models),
        }
    }
}

/// The weight server's own part (Pod sharing).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct WeightServer {
    /// Where http(s) sources are downloaded before they are laid out.
    #[arg(long, env = "KZC_DOWNLOAD_DIR", global = true, default_value_os_t = std::env::temp_dir())]
    pub download_dir: PathBuf,
}

/// The address of the weight server's health endpoints (`serve`).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
// The subcommand that flattens it is also `Serve`: two argument groups of one name.
#[group(skip)]
pub struct Serve {
    /// Address of the HTTP endpoints /readyz and /livez.
    #[arg(long, env = "KZC_LISTEN", default_value = "0.0.0.0:8471")]
    pub listen: String,
}

/// Where a worker runs the models.
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct Device {
    /// cpu, or cuda / cuda:N (weights are copied once from the shared memory to the GPU).
    #[arg(long, env = "KZC_DEVICE", global = true, default_value = "cpu")]
    pub device: String,
}

/// A pipeline's input: a folder or an object storage prefix, and how it is reached.
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct Input {
    /// A folder, or an object storage prefix (s3://bucket/prefix/), of safetensors files.
    #[arg(long, env = "KZC_INPUT")]
    pub input: String,
    /// How to reach an s3:// input (JSON: endpoint, region, credentialsDir).
    #[arg(long, env = "KZC_INPUT_S3", value_parser = json::<S3Access>)]
    #[serde(serialize_with = "json_string")]
    pub input_s3: Option<S3Access>,
    /// How to reach an az:// input (JSON: account, endpoint, credentialsDir).
    #[arg(long, env = "KZC_INPUT_AZURE", value_parser = json::<AzureAccess>)]
    #[serde(serialize_with = "json_string")]
    pub input_azure: Option<AzureAccess>,
}

/// A pipeline's output, as [`Input`].
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct Output {
    /// A folder, or an object storage prefix (s3://bucket/prefix/).
    #[arg(long, env = "KZC_OUTPUT")]
    pub output: String,
    /// How to reach an s3:// output (JSON: endpoint, region, credentialsDir).
    #[arg(long, env = "KZC_OUTPUT_S3", value_parser = json::<S3Access>)]
    #[serde(serialize_with = "json_string")]
    pub output_s3: Option<S3Access>,
    /// How to reach an az:// output (JSON: account, endpoint, credentialsDir).
    #[arg(long, env = "KZC_OUTPUT_AZURE", value_parser = json::<AzureAccess>)]
    #[serde(serialize_with = "json_string")]
    pub output_azure: Option<AzureAccess>,
}

/// One shard of a Task pipeline (the shard index is the Job's `JOB_COMPLETION_INDEX`).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
// No argument group: the worker's subcommand of the same name has one, and clap refuses two.
#[group(skip)]
pub struct Task {
    #[command(flatten)]
    #[serde(flatten)]
    pub input: Input,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
    /// How many shard files the input must hold (the Job's completions).
    #[arg(long, env = "KZC_SHARDS")]
    pub shards: Option<usize>,
    /// The listing digest the input was planned with: a changed input fails the Task.
    #[arg(long, env = "KZC_INPUT_DIGEST")]
    pub input_digest: Option<String>,
    /// The run the shard belongs to: its records and manifest are the run's.
    #[arg(long, env = "KZC_RUN", default_value = "run")]
    pub run: String,
}

/// An Actor replica: where it serves, under which name, how it batches, whom it answers.
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
// No argument group: the worker's subcommand of the same name has one, and clap refuses two.
#[group(skip)]
pub struct Actor {
    /// The address the protocol (and health, /metrics) is served on.
    #[arg(long, env = "KZC_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// The model's name in the protocol (the pipeline's name).
    #[arg(long, env = "KZC_MODEL_NAME", default_value = "pipeline")]
    pub model_name: String,
    /// Dynamic batching: the most rows of one forward pass (off when not set).
    #[arg(long, env = "KZC_MAX_BATCH_ROWS")]
    pub max_batch_rows: Option<i64>,
    /// Dynamic batching: how long a request waits for others to join it (default 5 ms).
    #[arg(long, env = "KZC_MAX_BATCH_DELAY_MS")]
    pub max_batch_delay_ms: Option<u64>,
    /// A file holding the bearer token clients must send to the model's paths.
    #[arg(long, env = "KZC_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
}

/// The driver of an Actor's batch run.
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub struct Driver {
    #[command(flatten)]
    #[serde(flatten)]
    pub input: Input,
    #[command(flatten)]
    #[serde(flatten)]
    pub output: Output,
    /// The Service in front of the replicas: its ready endpoints, asked again every 2 s.
    #[arg(long, env = "KZC_SERVICE")]
    pub service: Option<String>,
    /// With --service: the pipeline whose status.batches the driver keeps current.
    #[arg(long, env = "KZC_PIPELINE", requires = "service")]
    pub pipeline: Option<String>,
    /// The model's name in the protocol (the pipeline's name).
    #[arg(long, env = "KZC_MODEL_NAME", default_value = "pipeline")]
    pub model_name: String,
    /// Batches that may wait on one replica at a time (default 2).
    #[arg(long, env = "KZC_IN_FLIGHT_PER_REPLICA")]
    pub in_flight_per_replica: Option<usize>,
    /// The run the outputs belong to: its records and manifest are the run's.
    #[arg(long, env = "KZC_RUN", default_value = "run")]
    pub run: String,
    /// A file holding the bearer token the replicas want.
    #[arg(long, env = "KZC_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
}

/// How the worker maps the models: settings of the worker's own, which the operator leaves at
/// their defaults (a pipeline's template may set them).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct Mapping {
    /// Fault every page of the mapping in at load (MAP_POPULATE) instead of on first use.
    #[arg(long, env = "KZC_PREFAULT", global = true)]
    pub prefault: bool,
}

/// Whether the worker pins the mapping before copying it to the GPU (default true; `false` or
/// `0` where pinning fails): read where the copy is made.
pub const PIN_HOST_ENV: &str = "KZC_PIN_HOST";

/// The largest request body a replica takes, by default.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 << 20;
/// Seconds a request body may take to arrive, by default.
pub const DEFAULT_BODY_TIMEOUT_SECONDS: u64 = 30;
/// Requests that may wait while a batch runs, by default.
pub const DEFAULT_QUEUED_BATCHES: usize = 8;

/// What a replica accepts from its clients, and how long it drains: the worker's own
/// settings, at their defaults unless a pipeline's template sets them.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct ActorLimits {
    /// The largest request body accepted (413 beyond).
    #[arg(long, env = "KZC_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: u64,
    /// Seconds a request body may take to arrive (408 beyond).
    #[arg(long, env = "KZC_BODY_TIMEOUT", default_value_t = DEFAULT_BODY_TIMEOUT_SECONDS)]
    pub body_timeout: u64,
    /// Requests that may wait while a batch runs (503 with Retry-After beyond).
    #[arg(long, env = "KZC_QUEUED_BATCHES", default_value_t = DEFAULT_QUEUED_BATCHES)]
    pub queued_batches: usize,
    /// The longest drain after SIGTERM, in seconds.
    #[arg(long, env = "KZC_DRAIN_SECONDS", default_value_t = 20)]
    pub drain_seconds: u64,
}

/// How a driver sends: the worker's own settings, and the replicas' addresses when it runs
/// outside a cluster.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct DriverLimits {
    /// Or the replicas' base URLs (http://host:port), comma-separated, instead of a Service.
    #[arg(
        long,
        env = "KZC_REPLICAS",
        value_delimiter = ',',
        required_unless_present = "service",
        conflicts_with = "service"
    )]
    pub replicas: Vec<String>,
    /// Sends of one batch before it is listed as failed.
    #[arg(long, env = "KZC_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Seconds one replica may take to answer one request.
    #[arg(long, env = "KZC_REQUEST_TIMEOUT", default_value_t = 300)]
    pub request_timeout: u64,
    /// The most tensor bytes in one request: a larger shard file is sent in row ranges,
    /// their outputs joined (the replicas take bodies of 64 MiB at most by default).
    #[arg(long, env = "KZC_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    pub max_request_bytes: usize,
    /// The listing digest the input was planned with: a changed input stops the run.
    #[arg(long, env = "KZC_INPUT_DIGEST")]
    pub input_digest: Option<String>,
}

/// Seconds a store's user waits for a lock another process holds, by default.
pub const DEFAULT_LOCK_TIMEOUT_SECONDS: u64 = 900;

/// How the weight server keeps a store: its own settings.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct StoreUpkeep {
    /// Seconds a model may stay in the store unused (no sidecar holding it) before the
    /// collection removes it; a full store makes room at once, least recently used first.
    #[arg(long, env = "KZC_KEEP_UNUSED", global = true, default_value_t = 3600)]
    pub keep_unused: u64,
    /// Seconds to wait for a lock another process holds (another sidecar laying out the same
    /// model) before failing with the reason.
    #[arg(long, env = "KZC_LOCK_TIMEOUT", global = true, default_value_t = DEFAULT_LOCK_TIMEOUT_SECONDS)]
    pub lock_timeout: u64,
    /// Seconds between marking this pod's models as used and collecting unused ones (`serve`).
    #[arg(long, env = "KZC_COLLECT_EVERY", global = true, default_value_t = 60)]
    pub collect_every: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches;

    fn parse<T: clap::Args + FromArgMatches>(env: &[(String, String)]) -> T {
        from_env(env).unwrap()
    }

    #[test]
    fn every_part_reads_back_what_it_renders() {
        let access = S3Access {
            endpoint: Some("http://minio:9000".into()),
            region: None,
            credentials_dir: Some("/kzc/data/input/s3".into()),
        };
        let task = Task {
            input: Input {
                input: "s3://bucket/in/".into(),
                input_s3: Some(access),
                input_azure: None,
            },
            output: Output {
                output: "/data/out".into(),
                output_s3: None,
                output_azure: None,
            },
            shards: Some(4),
            input_digest: Some("ab".repeat(32)),
            run: "p-1".into(),
        };
        let env = to_env(&task);
        assert!(env.contains(&("KZC_SHARDS".into(), "4".into())), "{env:?}");
        assert!(env.iter().all(|(k, _)| k != "KZC_OUTPUT_S3"), "{env:?}");
        assert_eq!(parse::<Task>(&env), task);

        let actor = Actor {
            listen: "0.0.0.0:8080".into(),
            model_name: "net".into(),
            max_batch_rows: Some(256),
            max_batch_delay_ms: None,
            client_token_file: Some("/kzc/client-token/token".into()),
        };
        assert_eq!(parse::<Actor>(&to_env(&actor)), actor);
    }

    #[test]
    fn an_empty_list_of_models_is_read_but_not_served() {
        let env = [(MODELS_ENV.to_owned(), "[]".to_owned())];
        let pod: PodModels = parse(&env);
        let e = pod.models().unwrap_err();
        assert!(e.to_string().contains("lists no models"), "{e}");
        let unset: PodModels = parse(&[]);
        assert!(unset
            .models()
            .unwrap_err()
            .to_string()
            .contains("is not set"));
        let bad = [(MODELS_ENV.to_owned(), r#"[{"name":"a"}]"#.to_owned())];
        assert!(from_env::<PodModels>(&bad).is_err());
    }

    #[test]
    #[should_panic(expected = "no argument with an environment variable")]
    fn a_field_the_binaries_cannot_read_is_a_defect() {
        #[derive(clap::Args, Serialize)]
        struct Unread {
            #[arg(long)]
            hidden: String,
        }
        to_env(&Unread { hidden: "x".into() });
    }
}
