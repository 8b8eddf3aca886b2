//! TorchScript archives (`torch.jit.save`): a zip with `<archive>/data.pkl`,
//! `<archive>/constants.pkl`, `<archive>/code/...` and one record per tensor storage under
//! `<archive>/data/<key>` and `<archive>/constants/<key>`.
//!
//! Each storage is copied into tensors.bin as `data/<key>` or `constants/<key>`; the rest of
//! the archive becomes skeleton.pt, from which a worker rebuilds the module with every storage
//! pointing into the shared memory (see the worker crate's TorchScript loader).

use std::fs::File;
use std::io::{Cursor, Read};

use anyhow::{bail, Context, Result};
use zip::result::ZipError;
use zip::ZipArchive;

use super::LaidOut;
use crate::layout::{plan, Staging, SKELETON_FILE};
use crate::pickle::storage_refs;

/// The tensor archives of a TorchScript file and their pickles.
const ARCHIVES: [&str; 2] = ["data", "constants"];

pub fn lay_out(source: &[u8], staging: &Staging) -> Result<LaidOut> {
    let mut zip = ZipArchive::new(Cursor::new(source))
        .context("not a TorchScript archive (it is not a valid zip file)")?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|s| s.into_owned()))
        .collect::<Result<_, _>>()
        .context("TorchScript archive has an unreadable record name")?;
    let prefix = names
        .iter()
        .find_map(|n| {
            n.strip_suffix("data.pkl")
                .filter(|p| p.ends_with('/') && p.matches('/').count() == 1)
        })
        .map(str::to_owned)
        .context("TorchScript archive is missing its record data.pkl")?;
    if !names
        .iter()
        .any(|n| n.starts_with(&format!("{prefix}code/")))
    {
        bail!("TorchScript archive is missing its code/ records");
    }

    let mut wanted = Vec::new();
    let mut records = Vec::new();
    for archive in ARCHIVES {
        let pickle_name = format!("{prefix}{archive}.pkl");
        let pickle = read_record(&mut zip, &pickle_name)?;
        let refs = storage_refs(&pickle).with_context(|| format!("reading {pickle_name}"))?;
        for r in refs {
            let record = format!("{prefix}{archive}/{}", r.key);
            let size = match zip.by_name(&record) {
                Ok(f) => f.size(),
                Err(ZipError::FileNotFound) => bail!(
                    "TorchScript archive is missing record {record} (storage {:?} of {archive}.pkl)",
                    r.key
                ),
                Err(e) => return Err(e).with_context(|| format!("reading record {record}")),
            };
            let needed = r.numel * r.dtype.size();
            if size < needed {
                bail!("record {record} holds {size} bytes, its storage needs {needed}");
            }
            wanted.push((format!("{archive}/{}", r.key), r.dtype, vec![r.numel]));
            records.push(record);
        }
    }

    let (tensors, tensors_bytes) = plan(wanted);
    let out = staging.create_tensors_file(tensors_bytes)?;
    let mut buf = vec![0u8; 1 << 20];
    for (entry, record) in tensors.iter().zip(&records) {
        let mut f = zip.by_name(record)?;
        let mut done = 0u64;
        while done < entry.length {
            let want = buf.len().min((entry.length - done) as usize);
            f.read_exact(&mut buf[..want])
                .with_context(|| format!("reading record {record}"))?;
            out.write_at(entry.offset + done, &buf[..want])?;
            done += want as u64;
        }
        // Reading to the end makes the zip reader check the record's CRC.
        std::io::copy(&mut f, &mut std::io::sink())
            .with_context(|| format!("reading record {record}"))?;
    }

    let skeleton = staging.path().join(SKELETON_FILE);
    let mut writer = zip::ZipWriter::new(File::create(&skeleton)?);
    for name in &names {
        let is_storage = ARCHIVES
            .iter()
            .any(|a| name.starts_with(&format!("{prefix}{a}/")));
        if !is_storage {
            writer.raw_copy_file(zip.by_name(name)?)?;
        }
    }
    writer.finish()?;
    Ok(LaidOut {
        tensors,
        tensors_bytes,
        skeleton: Some(SKELETON_FILE.to_owned()),
    })
}

fn read_record(zip: &mut ZipArchive<Cursor<&[u8]>>, name: &str) -> Result<Vec<u8>> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(ZipError::FileNotFound) => bail!("TorchScript archive is missing record {name}"),
        Err(e) => return Err(e).with_context(|| format!("reading record {name}")),
    };
    let mut bytes = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut bytes)
        .with_context(|| format!("reading record {name}"))?;
    Ok(bytes)
}
