//! The object stores a pipeline names, reached with `object_store`'s clients: `s3://` (AWS S3
//! and S3-compatible services) and `az://` (Azure Blob Storage). Credentials come from the
//! pipeline's Secret, mounted as files, or else from the environment's chain (web identity,
//! instance profile, managed identity), as the clouds' own tools take them; every request is
//! signed by the library. The weight server reads model sources through presigned URLs (see
//! `kube_zerocopy_fetch::remote`); the Task workers list, read and write data through the clients.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::signer::Signer;
use object_store::ObjectStore;

use kube_zerocopy_contract::models::{
    AzureAccess, S3Access, ACCESS_KEY_ID_FILE, ACCOUNT_KEY_FILE, SECRET_ACCESS_KEY_FILE,
    SESSION_TOKEN_FILE,
};

/// What both clients are: a store (list, get, put) that also signs URLs.
pub trait Storage: ObjectStore + Signer {}
impl<T: ObjectStore + Signer> Storage for T {}

/// An object or prefix in a store: its client, its key in the bucket or container ("" for
/// the top), and the name of the settings that reach it (`s3`, `azure`), for messages.
pub struct Located {
    pub store: Arc<dyn Storage>,
    pub key: String,
    pub settings: &'static str,
}

/// The store of an `s3://<bucket>/<key>` or `az://<container>/<key>` URI (the key may be
/// empty: a prefix), reached with its settings; `None` for any other scheme.
pub fn locate(
    uri: &str,
    s3: Option<&S3Access>,
    azure: Option<&AzureAccess>,
) -> Result<Option<Located>> {
    let (scheme, rest) = match uri.split_once("://") {
        Some((scheme @ ("s3" | "az"), rest)) => (scheme, rest),
        _ => return Ok(None),
    };
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{uri}: expected {scheme}://<bucket or container>/<key>");
    }
    let located = match scheme {
        "s3" => Located {
            store: Arc::new(s3_store(bucket, s3)?),
            key: key.to_owned(),
            settings: "s3",
        },
        _ => {
            let azure = azure.context("an az:// URI needs its azure settings (the account)")?;
            Located {
                store: Arc::new(azure_store(bucket, azure)?),
                key: key.to_owned(),
                settings: "azure",
            }
        }
    };
    Ok(Some(located))
}

/// The method a request is signed for. S3 signs the method itself (SigV4). An Azure SAS grants
/// permissions instead, and `object_store` grants a HEAD none; the read permission it grants
/// a GET covers HEAD too.
pub fn signing_method(settings: &str, method: http::Method) -> http::Method {
    match (settings, method) {
        ("azure", http::Method::HEAD) => http::Method::GET,
        (_, method) => method,
    }
}

fn read_credential(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    let value = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the credential {}", path.display()))?;
    Ok(value.trim().to_owned())
}

pub fn s3_store(bucket: &str, access: Option<&S3Access>) -> Result<AmazonS3> {
    // The environment's settings first (AWS_REGION, web identity), the pipeline's over them.
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(access) = access {
        if let Some(endpoint) = &access.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &access.region {
            builder = builder.with_region(region);
        }
        if let Some(dir) = &access.credentials_dir {
            let dir = Path::new(dir);
            builder = builder
                .with_access_key_id(read_credential(dir, ACCESS_KEY_ID_FILE)?)
                .with_secret_access_key(read_credential(dir, SECRET_ACCESS_KEY_FILE)?);
            if dir.join(SESSION_TOKEN_FILE).exists() {
                builder = builder.with_token(read_credential(dir, SESSION_TOKEN_FILE)?);
            }
        }
    }
    Ok(builder.build()?)
}

pub fn azure_store(container: &str, access: &AzureAccess) -> Result<MicrosoftAzure> {
    // The environment's settings first (workload identity, managed identity), the pipeline's
    // over them.
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_account(&access.account);
    if let Some(endpoint) = &access.endpoint {
        builder = builder
            .with_endpoint(endpoint.clone())
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(dir) = &access.credentials_dir {
        builder = builder.with_access_key(read_credential(Path::new(dir), ACCOUNT_KEY_FILE)?);
    }
    Ok(builder.build()?)
}
