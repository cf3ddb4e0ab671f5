//! S3 buckets a source reads or a restore writes that are not the
//! repository: Kubeflow Pipelines' `mlpipeline`, an MLflow artifact root in
//! S3. Opened with their own endpoint and credentials file, checked before
//! anything else is done, objects streamed into a backup run.

use crate::backend::{Backend, OpenOptions};
use crate::error::LabError;
use crate::repo::backup::BackupRun;
use crate::repo::chunker::ChunkerKind;
use std::path::PathBuf;

pub(crate) fn bucket_options(endpoint: &Option<String>, creds: &Option<PathBuf>) -> OpenOptions {
    OpenOptions {
        credentials_file: creds.clone(),
        ca_file: None,
        endpoint_url: endpoint.clone(),
    }
}

pub(crate) fn check_bucket_url(field: &str, url: &str) -> Result<(), (String, String)> {
    let ok = url
        .strip_prefix("s3://")
        .is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
    if !ok || url.contains('@') {
        return Err((
            field.into(),
            format!(
                "'{}': expected s3://bucket or s3://bucket/prefix (keys go in the credentials file)",
                crate::util::redact_url(url)
            ),
        ));
    }
    Ok(())
}

/// Opens `url` (`s3://bucket[/prefix]`) with its endpoint and credentials
/// file and checks that the bucket can be read.
///
/// # Errors
/// A missing bucket (exit 2), an unreadable one, a too-open credentials file.
pub(crate) fn open(
    url: &str,
    endpoint: &Option<String>,
    creds: &Option<PathBuf>,
) -> crate::error::Result<crate::backend::s3::S3Backend> {
    let b = crate::backend::s3::S3Backend::open_with(url, &bucket_options(endpoint, creds))?;
    probe_bucket(&b, url)?;
    Ok(b)
}

/// Fails clearly when the bucket is missing or unreadable (before anything
/// is dumped or scaled).
pub(crate) fn probe_bucket(
    b: &crate::backend::s3::S3Backend,
    url: &str,
) -> crate::error::Result<()> {
    b.list("\u{7f}labctl-probe", &mut |_| {}).map_err(|e| {
        let m = e.to_string();
        if m.contains("NoSuchBucket") || m.contains("does not exist") {
            LabError::usage(format!(
                "bucket {url} does not exist at {} ({m})",
                b.location()
            ))
        } else {
            LabError::storage(format!("reading bucket {url}: {m}"))
        }
    })?;
    Ok(())
}

/// Streams one object into the run (a reader thread feeds a bounded
/// channel: the object is never whole in memory).
pub(crate) fn stream_object(
    run: &mut BackupRun<'_>,
    bucket: &crate::backend::s3::S3Backend,
    key: &str,
) -> crate::error::Result<Vec<crate::repo::tree::ContentRef>> {
    struct ChanReader {
        rx: crossbeam_channel::Receiver<Vec<u8>>,
        buf: Vec<u8>,
        pos: usize,
    }
    impl std::io::Read for ChanReader {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            while self.pos == self.buf.len() {
                match self.rx.recv() {
                    Ok(b) => {
                        self.buf = b;
                        self.pos = 0;
                    }
                    Err(_) => return Ok(0),
                }
            }
            let n = out.len().min(self.buf.len() - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(8);
        let getter = s.spawn(move || bucket.get_stream(key, &mut |b| tx.send(b.to_vec()).is_ok()));
        let content = run.add_stream(
            ChanReader {
                rx,
                buf: vec![],
                pos: 0,
            },
            ChunkerKind::Cdc,
            key,
        );
        let got = getter
            .join()
            .map_err(|_| anyhow::anyhow!("the object reader panicked"))?;
        got?;
        content
    })
}
