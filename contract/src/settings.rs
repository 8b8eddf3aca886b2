//! The settings the chart gives the long-running binaries (the operator, the node agent), each
//! variable named once here; the binaries flatten these structs into their command lines, and
//! a test reads the chart's rendered containers with them.

use std::path::PathBuf;

use crate::models::NODE_STORE_DRIVER;

/// `json` makes every binary log one JSON object per line (the chart sets it); anything else,
/// or nothing, logs text.
pub const LOG_FORMAT_ENV: &str = "KZC_LOG_FORMAT";
/// Where a binary writes its termination message instead of `/dev/termination-log` (tests
/// outside a pod).
pub const TERMINATION_LOG_ENV: &str = "KZC_TERMINATION_LOG";

/// The toleration keys allowed when the operator's settings name none: GPU nodes' taint.
pub const DEFAULT_TOLERATION_KEYS: [&str; 1] = ["nvidia.com/gpu"];

/// The images the pipelines' pods run (the operator's version when not set).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct Images {
    /// The runtime image (sidecar and worker) of cpu pipelines.
    #[arg(long, env = "KZC_RUNTIME_IMAGE")]
    pub runtime_image: Option<String>,
    /// The runtime image of cuda pipelines (libtorch's CUDA backend and libraries).
    #[arg(long, env = "KZC_CUDA_RUNTIME_IMAGE")]
    pub cuda_runtime_image: Option<String>,
}

/// What pipelines' templates may add to their pods (everything else is refused).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct Policy {
    /// Allow hostPath volumes in template.volumes.
    #[arg(long, env = "KZC_ALLOW_HOST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_host_path: bool,
    /// Allow template.serviceAccountName and projected ServiceAccount tokens.
    #[arg(long, env = "KZC_ALLOW_SERVICE_ACCOUNT", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_service_account: bool,
    /// The taint keys template.tolerations may tolerate, comma-separated (`*`: any).
    #[arg(long, env = "KZC_TOLERATION_KEYS", value_delimiter = ',', default_values_t = DEFAULT_TOLERATION_KEYS.map(String::from))]
    pub toleration_keys: Vec<String>,
    /// The node agent runs (the chart's nodeStore.enabled): pipelines may use sharing: Node.
    #[arg(long, env = "KZC_NODE_SHARING", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_sharing: bool,
    /// The PriorityClasses template.priorityClassName may name, comma-separated (`*`: any;
    /// none by default).
    #[arg(long, env = "KZC_PRIORITY_CLASSES", value_delimiter = ',')]
    pub priority_classes: Vec<String>,
    /// The RuntimeClasses template.runtimeClassName may name, comma-separated (`*`: any; none
    /// by default).
    #[arg(long, env = "KZC_RUNTIME_CLASSES", value_delimiter = ',')]
    pub runtime_classes: Vec<String>,
}

/// The operator's own settings (`kube-zerocopy operator`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
// No argument group: the operator's subcommand of the same name has one, and clap refuses two.
#[group(skip)]
pub struct Operator {
    /// Watch one namespace only (default: all).
    #[arg(long, env = "KZC_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub images: Images,
    #[command(flatten)]
    pub policy: Policy,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "KZC_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: String,
    /// Reconcile only while holding the leader lease, so that replicas never race.
    #[arg(long, env = "KZC_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// The namespace of the leader lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's name in the election (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a lease holds without renewal: how long a standby waits for a leader that
    /// died without handing the lease back.
    #[arg(long, env = "KZC_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,
}

/// The node agent's settings (`kube-zerocopy-agent`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct NodeAgent {
    /// The socket of the CSI services (the registrar tells the kubelet where it is).
    #[arg(long, env = "KZC_CSI_SOCKET", default_value = "/csi/csi.sock")]
    pub socket: PathBuf,
    /// The CSI driver's name: pods' volumes and the CSIDriver object use it.
    #[arg(long, env = "KZC_CSI_DRIVER", default_value = NODE_STORE_DRIVER)]
    pub driver: String,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// The node's weight store, which only the agent writes.
    #[arg(long, env = "KZC_STORE", default_value = "/kzc/store")]
    pub store: PathBuf,
    /// Where the store's lock files go (the pod's own memory volume, out of the node's reach);
    /// the store's root when unset.
    #[arg(long, env = "KZC_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,
    /// Mount a tmpfs of this size (bytes, or with k, m, g) on the store unless one is
    /// mounted there already (an earlier run's, which keeps its models); none when unset.
    #[arg(long, env = "KZC_STORE_SIZE")]
    pub store_size: Option<String>,
    /// Where http(s) sources are downloaded before they are laid out.
    #[arg(long, env = "KZC_DOWNLOAD_DIR", default_value_os_t = std::env::temp_dir())]
    pub download_dir: PathBuf,
    /// A folder of the node whose files volumes may name as `file://` sources (a node-local
    /// model cache); volumes may name no file at all when unset.
    #[arg(long, env = "KZC_FILE_SOURCES")]
    pub file_sources: Option<PathBuf>,
    /// Internal networks (comma-separated, `10.20.0.0/16,fd00::/8`) that http(s) sources may
    /// be fetched from: loopback, private and link-local addresses are refused otherwise.
    #[arg(long, env = "KZC_SOURCE_NETWORKS", default_value = "")]
    pub source_networks: String,
    /// A source that sends fewer bytes a second than this, over a minute, is broken off: a
    /// fetch holds its model's lock, which a trickling source would hold for ever.
    #[arg(long, env = "KZC_MIN_SOURCE_BYTES_PER_SECOND", default_value_t = 65536)]
    pub min_source_bytes_per_second: u64,
    /// Sources downloaded to the download folder at once at most (from servers without byte
    /// ranges, or fetched whole before room is made): with the store's capacity as the most a
    /// source may have, the folder holds at most that many times the store.
    #[arg(long, env = "KZC_MAX_DOWNLOADS", default_value_t = 2)]
    pub max_downloads: usize,
    /// Seconds between two checks of every store entry against the agent's layout records.
    #[arg(long, env = "KZC_VERIFY_EVERY", default_value_t = 3600)]
    pub verify_every: u64,
    /// The share of the store one namespace's mounted volumes may hold, in percent.
    #[arg(long, env = "KZC_NAMESPACE_SHARE_PERCENT", default_value_t = 50)]
    pub namespace_share_percent: u64,
    /// Publications one namespace may have under way on the node at once.
    #[arg(long, env = "KZC_NAMESPACE_PUBLICATIONS", default_value_t = 4)]
    pub namespace_publications: usize,
    /// Publications all namespaces together may have under way on the node at once.
    #[arg(long, env = "KZC_MAX_PUBLICATIONS", default_value_t = 8)]
    pub max_publications: usize,
    /// Seconds a model no pod mounts stays in the store before the collection removes it (a
    /// full store makes room at once, from the unused model used least recently).
    #[arg(long, env = "KZC_KEEP_UNUSED", default_value_t = 3600)]
    pub keep_unused: u64,
    /// The address of /metrics and /livez.
    #[arg(long, env = "KZC_METRICS_LISTEN", default_value = "0.0.0.0:9471")]
    pub metrics_listen: String,
    /// Write this node's NodeStore and its labels of held models (in a cluster: the agent's
    /// service account; the chart's admission policy confines it to its own node).
    #[arg(long, env = "KZC_REPORT")]
    pub report: bool,
    /// Seconds between two collections of unused models.
    #[arg(long, env = "KZC_COLLECT_EVERY", default_value_t = 60)]
    pub collect_every: u64,
}
