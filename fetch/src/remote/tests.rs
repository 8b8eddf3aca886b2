//! Models published from a real HTTP server on 127.0.0.1 that serves byte ranges the way
//! object stores do (ETag, If-Match, 206), and misbehaves on purpose: it cuts ranges off
//! midway, replaces the object while it is read, or offers no ranges at all.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use super::*;
use crate::config::ModelFormat;
use crate::layout::{Bindings, Store, TENSORS_FILE};
use crate::publish::Publisher;
use crate::source::sha256_hex;

/// What the server serves, and how it misbehaves.
struct Object {
    body: Vec<u8>,
    etag: String,
    ranges: bool,
    /// The next this many ranged answers stop after half their bytes and close.
    cut: usize,
    /// After this many ranged answers the object is replaced (new bytes, new ETag).
    replace_after: Option<usize>,
    /// HEAD answered 403, as a presigned GET URL answers it.
    refuse_head: bool,
    /// Other bytes of the same length, served to every range of at most 64 KiB (a zip's
    /// central directory and headers are read that way) under the same ETag.
    forged_small_reads: Option<Vec<u8>>,
    ranged_answers: usize,
}

/// One request as the server saw it: method, Range, If-Match.
type Seen = (String, Option<String>, Option<String>);

struct Server {
    uri: String,
    object: Arc<Mutex<Object>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(body: Vec<u8>, ranges: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}/m.safetensors", listener.local_addr().unwrap());
        let object = Arc::new(Mutex::new(Object {
            etag: format!("\"{}\"", &sha256_hex(&body)[..16]),
            body,
            ranges,
            cut: 0,
            replace_after: None,
            refuse_head: false,
            forged_small_reads: None,
            ranged_answers: 0,
        }));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (o, s) = (object.clone(), seen.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (o, s) = (o.clone(), s.clone());
                // Each on its own thread: ranges are asked for several at once.
                thread::spawn(move || answer(stream, &o, &s));
            }
        });
        Server { uri, object, seen }
    }

    fn ranged_gets(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(method, range, _)| method == "GET" && range.is_some())
            .map(|(_, range, _)| range.clone().unwrap())
            .collect()
    }
}

/// Answers one request on `stream`, then closes it.
fn answer(mut stream: TcpStream, object: &Mutex<Object>, seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let method = request_line.split(' ').next().unwrap().to_owned();
    let (mut range, mut if_match) = (None, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        let value = Some(value.trim().to_owned());
        match name.to_ascii_lowercase().as_str() {
            "range" => range = value,
            "if-match" => if_match = value,
            _ => {}
        }
    }
    seen.lock()
        .unwrap()
        .push((method.clone(), range.clone(), if_match.clone()));
    let mut object = object.lock().unwrap();
    if method == "HEAD" && object.refuse_head {
        let _ = stream
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let len = object.body.len();
    let mut head = format!("ETag: {}\r\nConnection: close\r\n", object.etag);
    if object.ranges {
        head.push_str("Accept-Ranges: bytes\r\n");
    }
    let (status, start, end) = match range.filter(|_| object.ranges) {
        None => ("200 OK", 0, len),
        Some(_) if if_match.is_some_and(|m| m != object.etag) => {
            let _ = stream.write_all(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        }
        Some(range) => {
            let (a, b) = range
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .unwrap();
            let (start, end) = (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap() + 1);
            head.push_str(&format!(
                "Content-Range: bytes {start}-{}/{len}\r\n",
                end - 1
            ));
            object.ranged_answers += 1;
            ("206 Partial Content", start, end)
        }
    };
    // Tensor data, not the header's few bytes, is what gets cut off.
    let mut send = end - start;
    if object.cut > 0 && send > 1 << 20 {
        object.cut -= 1;
        send /= 2;
    }
    let body = match &object.forged_small_reads {
        Some(forged) if end - start <= 64 << 10 => forged[start..start + send].to_vec(),
        _ => object.body[start..start + send].to_vec(),
    };
    if object.replace_after == Some(object.ranged_answers) {
        object.body.iter_mut().for_each(|b| *b = b.wrapping_add(1));
        object.etag = format!("\"{}\"", &sha256_hex(&object.body)[..16]);
    }
    drop(object);
    // The head announces every byte asked for, even when fewer follow before the close.
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{head}\r\n",
        end - start
    );
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A safetensors file of `mib` MiB in two tensors (`b` first in the file).
fn safetensors(mib: usize) -> Vec<u8> {
    let half = mib << 19;
    let header = format!(
        r#"{{"b":{{"dtype":"U8","shape":[{half}],"data_offsets":[0,{half}]}},"a":{{"dtype":"U8","shape":[{half}],"data_offsets":[{half},{}]}}}}"#,
        2 * half
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..2 * half).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 20) as u8));
    bytes
}

struct Published {
    result: Result<String>,
    store: tempfile::TempDir,
    downloads: tempfile::TempDir,
}

impl Published {
    /// The published models' tensors files, by digest.
    fn blobs(&self) -> BTreeMap<String, Vec<u8>> {
        let blobs = self.store.path().join("blobs");
        std::fs::read_dir(&blobs)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        (name, std::fs::read(e.path().join(TENSORS_FILE)).unwrap())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn staging_left(&self) -> usize {
        std::fs::read_dir(self.store.path().join(".staging")).map_or(0, |d| d.count())
    }

    fn downloads_left(&self) -> usize {
        std::fs::read_dir(self.downloads.path()).map_or(0, |d| d.count())
    }
}

fn publish(uri: &str, sha256: Option<String>) -> Published {
    publish_as(ModelFormat::Safetensors, uri, sha256)
}

fn publish_as(format: ModelFormat, uri: &str, sha256: Option<String>) -> Published {
    let downloads = tempfile::tempdir().unwrap();
    let download_dir = downloads.path().to_owned();
    publish_into(format, uri, sha256, downloads, download_dir)
}

/// [`publish`] with a download folder that cannot hold a file (a file stands at its place:
/// root, as these tests run, is refused too), so that any write to the disk fails.
fn publish_without_a_disk(uri: &str) -> Published {
    let downloads = tempfile::tempdir().unwrap();
    let download_dir = downloads.path().join("not-a-folder");
    std::fs::write(&download_dir, b"").unwrap();
    publish_into(ModelFormat::Safetensors, uri, None, downloads, download_dir)
}

fn publish_into(
    format: ModelFormat,
    uri: &str,
    sha256: Option<String>,
    downloads: tempfile::TempDir,
    download_dir: std::path::PathBuf,
) -> Published {
    let store = tempfile::tempdir().unwrap();
    let publisher = Publisher {
        store: Store::new(store.path()),
        bindings: Bindings::new(store.path().join("bindings")),
        download_dir,
        limits: Default::default(),
        observer: None,
    };
    let model = ModelSource {
        sha256,
        ..ModelSource::new("m", format, uri)
    };
    let result = publisher.publish(&model).map(|hold| hold.digest.clone());
    Published {
        result,
        store,
        downloads,
    }
}

/// The tensors file the layout must write for [`safetensors`]: `a` then `b`, each aligned.
fn expected_tensors(bytes: &[u8]) -> Vec<u8> {
    let store = tempfile::tempdir().unwrap();
    let path = store.path().join("m.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let source = crate::source::SourceFile::open(&path, "file://m").unwrap();
    let (laid, tensors) = crate::formats::lay_out_in_fresh_store(ModelFormat::Safetensors, &source);
    laid.unwrap();
    tensors
}

#[test]
fn a_model_is_streamed_into_place_by_ranges_with_no_file_on_disk() {
    let bytes = safetensors(40);
    let server = Server::start(bytes.clone(), true);
    let published = publish_without_a_disk(&server.uri);
    let digest = published.result.as_ref().unwrap();
    assert_eq!(
        *digest,
        sha256_hex(&bytes),
        "published under the bytes' digest"
    );
    assert_eq!(
        published.blobs(),
        BTreeMap::from([(digest.clone(), expected_tensors(&bytes))])
    );
    assert_eq!(
        published.downloads_left(),
        1,
        "only the file in the folder's place"
    );
    assert_eq!(published.staging_left(), 0);
    let gets = server.ranged_gets();
    assert!(gets.len() >= 5, "40 MiB in 8 MiB ranges: {gets:?}");
    let etag = server.object.lock().unwrap().etag.clone();
    let seen = server.seen.lock().unwrap();
    assert!(
        seen.iter()
            .filter(|(m, _, _)| m == "GET")
            .all(|(_, _, if_match)| if_match.as_deref() == Some(etag.as_str())),
        "every range asked If-Match the ETag: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|(m, range, _)| m == "GET" && range.is_none()),
        "never the whole object"
    );
}

#[test]
fn ranges_cut_off_midway_are_resumed_from_their_last_byte() {
    let bytes = safetensors(24);
    let server = Server::start(bytes.clone(), true);
    server.object.lock().unwrap().cut = 3;
    let published = publish(&server.uri, Some(sha256_hex(&bytes)));
    assert_eq!(published.result.as_ref().unwrap(), &sha256_hex(&bytes));
    assert_eq!(
        published.blobs().into_values().collect::<Vec<_>>(),
        [expected_tensors(&bytes)]
    );
    // A resumed range starts halfway into a chunk: not on an 8 MiB boundary from the data.
    let gets = server.ranged_gets();
    let data_start = bytes.len() as u64 - (24 << 20);
    let starts: Vec<u64> = gets
        .iter()
        .map(|r| r[6..r.find('-').unwrap()].parse().unwrap())
        .filter(|&s| s >= data_start)
        .collect();
    let chunk_starts = starts
        .iter()
        .filter(|&&s| (s - data_start).is_multiple_of(8 << 20))
        .count();
    assert!(
        starts.len() - chunk_starts >= 3,
        "3 ranges resumed midway: {gets:?}"
    );
}

#[test]
fn an_object_replaced_while_it_is_fetched_is_refused_and_nothing_is_published() {
    let bytes = safetensors(40);
    let server = Server::start(bytes.clone(), true);
    server.object.lock().unwrap().replace_after = Some(2);
    let published = publish(&server.uri, None);
    let err = format!("{:#}", published.result.as_ref().unwrap_err());
    assert!(err.contains("changed while it was fetched"), "{err}");
    assert!(published.blobs().is_empty());
    assert_eq!(published.staging_left(), 0, "the staging folder is removed");
}

#[test]
fn a_wrong_declared_digest_is_refused_and_nothing_is_published() {
    let bytes = safetensors(10);
    let server = Server::start(bytes.clone(), true);
    let wrong = "0".repeat(64);
    let published = publish(&server.uri, Some(wrong.clone()));
    let err = format!("{:#}", published.result.as_ref().unwrap_err());
    assert!(
        err.contains(&format!(
            "sha256 mismatch: expected {wrong}, the source has {}",
            sha256_hex(&bytes)
        )),
        "{err}"
    );
    assert!(published.blobs().is_empty());
    assert_eq!(published.staging_left(), 0);
}

#[test]
fn a_server_without_ranges_is_downloaded_whole() {
    let bytes = safetensors(4);
    let server = Server::start(bytes.clone(), false);
    let published = publish(&server.uri, None);
    assert_eq!(published.result.as_ref().unwrap(), &sha256_hex(&bytes));
    assert!(server.ranged_gets().is_empty());
    assert_eq!(published.downloads_left(), 0, "the download is removed");
    // It needs the disk: without one it fails (what the streamed test's success rules out).
    let without = publish_without_a_disk(&server.uri);
    assert!(without.result.is_err(), "downloaded whole without a disk");
}

#[test]
fn a_source_that_refuses_head_is_downloaded_whole() {
    let bytes = safetensors(4);
    let server = Server::start(bytes.clone(), true);
    server.object.lock().unwrap().refuse_head = true;
    let published = publish(&server.uri, None);
    assert_eq!(published.result.as_ref().unwrap(), &sha256_hex(&bytes));
    let seen = server.seen.lock().unwrap();
    let methods: Vec<&str> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
    assert_eq!(
        methods,
        ["HEAD", "GET"],
        "a HEAD, then one GET of the whole file"
    );
}

/// A TorchScript-shaped archive with two storages of 1 MiB (`data/0` of bytes 0, `data/1` of
/// bytes 1) and a code record of 128 KiB after them, so that the in-order read of its last
/// part (the code and the central directory) is larger than 64 KiB.
fn torchscript_archive() -> Vec<u8> {
    const NUMEL: u64 = 1 << 20;
    let storage = |key: &str| {
        let mut p = vec![b'(', 0x8c, 7];
        p.extend_from_slice(b"storage");
        p.extend_from_slice(b"ctorch\nByteStorage\n");
        p.extend_from_slice(&[0x8c, 1, key.as_bytes()[0], 0x8c, 3]);
        p.extend_from_slice(b"cpu");
        p.extend_from_slice(&[0x8a, 8]);
        p.extend_from_slice(&NUMEL.to_le_bytes());
        p.extend_from_slice(b"tQ");
        p
    };
    let mut data_pkl = vec![0x80, 2, b'('];
    data_pkl.extend(storage("0"));
    data_pkl.extend(storage("1"));
    data_pkl.extend_from_slice(b"t.");
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let code = "# padding\n".repeat((128 << 10) / 10);
    let records: [(&str, Vec<u8>); 5] = [
        ("m/data/0", vec![0; NUMEL as usize]),
        ("m/data/1", vec![1; NUMEL as usize]),
        ("m/data.pkl", data_pkl),
        ("m/constants.pkl", vec![0x80, 2, b')', b'.']),
        ("m/code/__torch__.py", code.into_bytes()),
    ];
    for (name, bytes) in records {
        zip.start_file(name, stored).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// `archive` with the names of its two storages swapped in the central directory: a zip as
/// valid as the original, whose `data/0` is the original's `data/1`.
fn with_storages_swapped(archive: &[u8]) -> Vec<u8> {
    let mut forged = archive.to_vec();
    let directory = archive.len() - 2048;
    let at = |name: &[u8]| {
        directory
            + archive[directory..]
                .windows(name.len())
                .position(|w| w == name)
                .unwrap()
    };
    let (zero, one) = (at(b"m/data/0"), at(b"m/data/1"));
    forged[zero + 7] = b'1';
    forged[one + 7] = b'0';
    forged
}

#[test]
fn a_server_that_serves_another_central_directory_to_the_structure_reads_publishes_nothing() {
    let genuine = torchscript_archive();
    let digest = sha256_hex(&genuine);

    // The server answers honestly: the model is published under its digest.
    let honest = Server::start(genuine.clone(), true);
    let published = publish_as(ModelFormat::TorchScript, &honest.uri, Some(digest.clone()));
    assert_eq!(published.result.as_ref().unwrap(), &digest);
    let tensors = &published.blobs()[&digest];
    assert!(tensors[..1 << 20].iter().all(|&b| b == 0), "data/0 first");

    // The same server answers the structure's reads with the storages swapped, and the
    // in-order read with the genuine file: every byte hashed is the genuine file's.
    let two_faced = Server::start(genuine.clone(), true);
    two_faced.object.lock().unwrap().forged_small_reads = Some(with_storages_swapped(&genuine));
    let published = publish_as(ModelFormat::TorchScript, &two_faced.uri, Some(digest));
    let err = format!("{:#}", published.result.as_ref().unwrap_err());
    assert!(
        err.contains(
            "differ between the reads that placed the storages and the bytes that were hashed"
        ),
        "{err}"
    );
    assert!(published.blobs().is_empty(), "nothing is published");
    assert_eq!(published.staging_left(), 0);
}
