//! A volume's credentials: the keys of the Secret its `nodePublishSecretRef` names, which the
//! kubelet reads in the pod's namespace (with the pod's own right to it) and hands to the
//! agent with the volume. They are the only credentials the agent reads for a volume: its
//! `models` attribute may point a model's bearer token or S3 or Azure credentials folder at
//! [`VOLUME_SECRET_DIR`] only, never at a file of the node. For the publication alone the keys
//! are laid out as files in a folder of the agent's own memory, which goes with it.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kube_zerocopy_contract::models::{
    ACCESS_KEY_ID_FILE, ACCOUNT_KEY_FILE, SECRET_ACCESS_KEY_FILE, VOLUME_SECRET_DIR,
};
use kube_zerocopy_fetch::config::ModelSource;

/// Where the volumes' Secrets are laid out, under the store's private folder.
const SECRETS_DIR: &str = ".volume-secrets";

/// A volume's Secret laid out as files; removed on drop.
pub struct VolumeSecret {
    _dir: Option<tempfile::TempDir>,
}

impl VolumeSecret {
    /// Checks that `models` name credentials only in the volume's Secret, lays the Secret's
    /// keys out under `private_root` and points the models' credential paths at them. An error
    /// says why the volume is refused.
    pub fn lay_out(
        private_root: &Path,
        secrets: &HashMap<String, String>,
        models: &mut [ModelSource],
    ) -> Result<VolumeSecret, String> {
        for model in models.iter() {
            check_credentials(model, secrets)
                .map_err(|why| format!("model {:?}: {why}", model.name))?;
        }
        if !models.iter().any(ModelSource::names_credentials) {
            return Ok(VolumeSecret { _dir: None });
        }
        let parent = private_root.join(SECRETS_DIR);
        let dir = std::fs::create_dir_all(&parent)
            .and_then(|()| {
                tempfile::Builder::new()
                    .prefix("volume-")
                    .tempdir_in(&parent)
            })
            .map_err(|e| format!("laying out the volume's Secret: {e}"))?;
        for (key, value) in secrets.iter().filter(|(key, _)| is_key(key)) {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.path().join(key))
                .and_then(|mut f| f.write_all(value.as_bytes()));
            written.map_err(|e| format!("laying out the volume's Secret: {e}"))?;
        }
        let folder = dir.path().to_string_lossy().into_owned();
        let relocate = |path: &mut String| {
            if let Some(rest) = path.strip_prefix(VOLUME_SECRET_DIR) {
                *path = format!("{folder}{rest}");
            }
        };
        for model in models.iter_mut() {
            let s3 = model.s3.as_mut().and_then(|s| s.credentials_dir.as_mut());
            let azure = model
                .azure
                .as_mut()
                .and_then(|a| a.credentials_dir.as_mut());
            for path in [model.bearer_token_file.as_mut(), s3, azure]
                .into_iter()
                .flatten()
            {
                relocate(path);
            }
        }
        Ok(VolumeSecret { _dir: Some(dir) })
    }

    /// Removes what a killed agent left laid out (call at start, before any volume).
    pub fn remove_left(private_root: &Path) -> std::io::Result<()> {
        match std::fs::remove_dir_all(private_root.join(SECRETS_DIR)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The credentials `model` names are keys of the volume's Secret (`secrets`), and an object
/// store source names its own: the node's identity (its instance profile, the agent's
/// workload identity) would read it for whichever pod names an object.
fn check_credentials(model: &ModelSource, secrets: &HashMap<String, String>) -> Result<(), String> {
    const FROM_THE_SECRET: &str = "the node agent reads credentials only from the Secret the \
        volume names (nodePublishSecretRef), never files of the node";
    let has = |key: &str| secrets.contains_key(key) && is_key(key);
    if model.ca_file.is_some() {
        return Err("the node agent takes no CA file from a volume (use sharing: Pod)".into());
    }
    if let Some(token) = &model.bearer_token_file {
        let key = token
            .strip_prefix(VOLUME_SECRET_DIR)
            .and_then(|k| k.strip_prefix('/'))
            .ok_or(FROM_THE_SECRET)?;
        if !has(key) {
            return Err(format!(
                "the volume's Secret has no key {key:?} (its bearer token)"
            ));
        }
    }
    let scheme = model.uri.split_once("://").map(|(s, _)| s);
    let (settings, folder, keys): (_, _, &[&str]) = match scheme {
        Some("s3") => (
            "s3",
            model.s3.as_ref().and_then(|s| s.credentials_dir.as_deref()),
            &[ACCESS_KEY_ID_FILE, SECRET_ACCESS_KEY_FILE],
        ),
        Some("az") => (
            "azure",
            model
                .azure
                .as_ref()
                .and_then(|a| a.credentials_dir.as_deref()),
            &[ACCOUNT_KEY_FILE],
        ),
        _ => {
            if model.s3.is_some() || model.azure.is_some() {
                return Err("S3 or Azure settings for a source that is neither".into());
            }
            return Ok(());
        }
    };
    match folder {
        None => Err(format!(
            "the node agent reads {} only with the pipeline's own credentials (source.{settings}.credentialsSecret), never with the node's identity",
            kube_zerocopy_runtime::redact::uri(&model.uri)
        )),
        Some(folder) if folder != VOLUME_SECRET_DIR => Err(FROM_THE_SECRET.into()),
        Some(_) => match keys.iter().find(|k| !has(k)) {
            Some(missing) => Err(format!("the volume's Secret has no key {missing}")),
            None => Ok(()),
        },
    }
}

/// A Secret's key as the API server allows it: letters, digits, `-`, `_` and `.`, not `.` or
/// `..` (so that it is one file name).
fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key != "."
        && key != ".."
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_zerocopy_fetch::{ModelFormat, S3Access};

    fn model(uri: &str) -> ModelSource {
        ModelSource::new("m", ModelFormat::Safetensors, uri)
    }

    #[test]
    fn credentials_come_from_the_volume_s_secret_alone_and_go_with_it() {
        let root = tempfile::tempdir().unwrap();
        let secrets = HashMap::from([
            ("token".to_string(), "t0ken".to_string()),
            (ACCESS_KEY_ID_FILE.to_string(), "id".to_string()),
            (SECRET_ACCESS_KEY_FILE.to_string(), "secret".to_string()),
        ]);
        let mut models = vec![
            ModelSource {
                bearer_token_file: Some(format!("{VOLUME_SECRET_DIR}/token")),
                ..model("https://models.example/a")
            },
            ModelSource {
                s3: Some(S3Access {
                    credentials_dir: Some(VOLUME_SECRET_DIR.into()),
                    ..Default::default()
                }),
                ..model("s3://bucket/b")
            },
        ];
        let laid = VolumeSecret::lay_out(root.path(), &secrets, &mut models).unwrap();
        let token = models[0].bearer_token_file.clone().unwrap();
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "t0ken");
        let s3 = models[1]
            .s3
            .as_ref()
            .unwrap()
            .credentials_dir
            .clone()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(Path::new(&s3).join(SECRET_ACCESS_KEY_FILE)).unwrap(),
            "secret"
        );
        drop(laid);
        assert!(
            !Path::new(&token).exists(),
            "the Secret outlived its publication"
        );

        // Files of the node, keys the Secret lacks, and the node's own identity are refused.
        let refused = [
            ModelSource {
                bearer_token_file: Some("/etc/kubernetes/admin.conf".into()),
                ..model("https://models.example/a")
            },
            ModelSource {
                bearer_token_file: Some(format!("{VOLUME_SECRET_DIR}/../../etc/shadow")),
                ..model("https://models.example/a")
            },
            ModelSource {
                bearer_token_file: Some(format!("{VOLUME_SECRET_DIR}/other")),
                ..model("https://models.example/a")
            },
            model("s3://bucket/b"),
            ModelSource {
                s3: Some(S3Access {
                    credentials_dir: Some("/root/.aws".into()),
                    ..Default::default()
                }),
                ..model("s3://bucket/b")
            },
            ModelSource {
                ca_file: Some(format!("{VOLUME_SECRET_DIR}/ca.crt")),
                ..model("https://models.example/a")
            },
        ];
        for m in refused {
            let why = VolumeSecret::lay_out(root.path(), &secrets, &mut [m.clone()])
                .err()
                .unwrap_or_else(|| panic!("accepted {m:?}"));
            println!("refused: {why}");
        }
        assert!(
            VolumeSecret::lay_out(root.path(), &HashMap::new(), &mut [model("s3://b/k")])
                .err()
                .unwrap()
                .contains("never with the node's identity")
        );
    }
}
