//! The models one pod serves. The operator renders this list as JSON into the environment
//! variable [`MODELS_ENV`] of both the sidecar and the workers (and into the node agent's
//! volume attribute [`MODELS_ATTRIBUTE`]), so they agree by construction.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Environment variable holding the JSON list of [`ModelSource`].
pub const MODELS_ENV: &str = "KZC_MODELS";

/// The node agent's CSI driver: Node-sharing pods get their models as an inline volume of it.
pub const NODE_STORE_DRIVER: &str = "models.kube-zerocopy.io";
/// The volume attribute that lists a pod's models (the same JSON as [`MODELS_ENV`]).
pub const MODELS_ATTRIBUTE: &str = "models";
/// The folder of a node agent's volume that holds the pod's bindings (its other folder,
/// `blobs/`, is a store's).
pub const VIEW_BINDINGS_DIR: &str = "bindings";

/// Where a Node-sharing volume's credentials are: the keys of the one Secret its
/// `nodePublishSecretRef` names, which the kubelet reads in the pod's namespace and hands to
/// the node agent with the volume. The operator writes credential paths beneath it into the
/// volume's [`MODELS_ATTRIBUTE`] (a bearer token is one key, an S3 or Azure credentials folder
/// the folder itself); the agent lays the Secret's keys out in a folder of its own for the
/// publication alone, and reads nothing else as credentials.
pub const VOLUME_SECRET_DIR: &str = "/kzc/volume-secret";

/// The credential files in an S3 credentials folder ([`S3Access::credentials_dir`]): the keys
/// of the pipeline's Secret, as the operator mounts them.
pub const ACCESS_KEY_ID_FILE: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_ACCESS_KEY_FILE: &str = "AWS_SECRET_ACCESS_KEY";
pub const SESSION_TOKEN_FILE: &str = "AWS_SESSION_TOKEN";
/// The credential file in an Azure credentials folder: the storage account's key.
pub const ACCOUNT_KEY_FILE: &str = "AZURE_STORAGE_ACCOUNT_KEY";

/// Safetensors: a file of named tensors, run by a built-in architecture or the user's Python code.
/// TorchScript: a module saved with torch.jit.save, which carries its own code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ModelFormat {
    Safetensors,
    TorchScript,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Unique within a pipeline; workers refer to models by this name.
    pub name: String,
    pub format: ModelFormat,
    /// `file://`, `http://`, `https://`, `s3://<bucket>/<key>` or `az://<container>/<blob>`.
    pub uri: String,
    /// Expected sha256 of the source file, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// For safetensors: the built-in architecture the worker builds (see the worker crate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// For safetensors: the user's Python code (`module:callable`) that builds and runs the
    /// model, which the Python worker imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_entry_point: Option<String>,
    /// The most bytes the source may have (its declared size): a download stops beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// http(s): a file holding a bearer token (a Secret's key, mounted into the weight server
    /// only), sent as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<String>,
    /// https: a file of PEM certificates trusted besides the system's (a ConfigMap's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// s3: where the bucket is served and with which credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Access>,
    /// az: which storage account holds the container, and with which credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureAccess>,
}

impl ModelSource {
    /// A source of `name` in `format` at `uri`, with nothing else: no digest, no size, no
    /// credentials, no code to run it (what a tool or a test starts from and adds to).
    pub fn new(name: &str, format: ModelFormat, uri: &str) -> ModelSource {
        ModelSource {
            name: name.into(),
            format,
            uri: uri.into(),
            sha256: None,
            architecture: None,
            python_entry_point: None,
            max_bytes: None,
            bearer_token_file: None,
            ca_file: None,
            s3: None,
            azure: None,
        }
    }

    /// Whether its source is read with credentials the pipeline named (a bearer token, an S3
    /// or Azure credentials folder): a private model.
    pub fn names_credentials(&self) -> bool {
        self.bearer_token_file.is_some()
            || self
                .s3
                .as_ref()
                .is_some_and(|s| s.credentials_dir.is_some())
            || self
                .azure
                .as_ref()
                .is_some_and(|a| a.credentials_dir.is_some())
    }
}

/// How an `s3://` source is reached. Unset fields come from the environment (AWS_REGION,
/// AWS_ENDPOINT_URL, web identity, instance profile), as AWS's own tools do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct S3Access {
    /// An S3-compatible service's address (`https://minio.storage:9000`); AWS by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A folder holding the files AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally
    /// AWS_SESSION_TOKEN (a Secret's keys, mounted into the weight server only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_dir: Option<String>,
}

/// How an `az://<container>/<blob>` source is reached. Without a credentials folder the
/// environment's identity is used (workload identity, managed identity).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AzureAccess {
    /// The storage account.
    pub account: String,
    /// The account's blob endpoint (an emulator's `http://azurite:10000/<account>`);
    /// `https://<account>.blob.core.windows.net` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A folder holding the file AZURE_STORAGE_ACCOUNT_KEY (a Secret's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_dir: Option<String>,
}

pub fn models_to_json(models: &[ModelSource]) -> String {
    serde_json::to_string(models).expect("model sources serialize")
}

pub fn models_from_json(json: &str) -> anyhow::Result<Vec<ModelSource>> {
    let models: Vec<ModelSource> = serde_json::from_str(json)
        .map_err(|e| anyhow::anyhow!("invalid {MODELS_ENV} (a JSON list of models): {e}"))?;
    if models.is_empty() {
        anyhow::bail!("{MODELS_ENV} lists no models");
    }
    for (i, m) in models.iter().enumerate() {
        if models[..i].iter().any(|o| o.name == m.name) {
            anyhow::bail!("model name {:?} appears twice in {MODELS_ENV}", m.name);
        }
        if let Some(sha) = &m.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                anyhow::bail!(
                    "model {:?}: sha256 must be 64 hex digits, got {sha:?}",
                    m.name
                );
            }
        }
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_duplicates_and_bad_digests() {
        let m = ModelSource {
            max_bytes: Some(1 << 20),
            bearer_token_file: Some("/kzc/sources/a/token".into()),
            ..ModelSource::new("a", ModelFormat::TorchScript, "file:///m.pt")
        };
        let json = models_to_json(std::slice::from_ref(&m));
        assert_eq!(models_from_json(&json).unwrap(), vec![m.clone()]);
        let dup = models_to_json(&[m.clone(), m.clone()]);
        assert!(models_from_json(&dup)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let bad = models_to_json(&[ModelSource {
            sha256: Some("abc".into()),
            ..m
        }]);
        assert!(models_from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        assert!(models_from_json("[]").is_err());
    }
}
