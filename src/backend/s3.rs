//! S3-compatible backend (aws-sdk-s3), behind the same [`Backend`] rules.
//!
//! URL: `s3://bucket/prefix`. Configuration comes from the standard AWS
//! environment and files, with no labctl config needed: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, profiles and
//! `AWS_SHARED_CREDENTIALS_FILE` (refused when other users can read it).
//! A custom endpoint switches to path-style addressing; `LABCTL_S3_CA_FILE`
//! (or `AWS_CA_BUNDLE`) adds a private CA to the trusted roots. Secrets are never
//! taken from the URL or from process arguments.
//!
//! # Write once
//! `put` writes with `If-None-Match: *`, so a store that honours the header
//! (AWS S3, MinIO, Ceph RGW, moto) refuses a second writer (412:
//! `AlreadyExists`). Packs, index fragments and snapshots are named by the
//! BLAKE3 hash of their bytes, so for them that is all: even a store that
//! ignored the header could only be handed identical bytes again. Every
//! other object (`config`, `keys/`, `prune/`) is first looked for (HEAD)
//! and refused if it exists, so a store that ignores the header is never
//! asked to replace one labctl saw. (A HEAD per pack cost one round trip
//! each on a distant store.)
//!
//! # Faults
//! The SDK retries throttling (503 SlowDown), 5xx, timeouts and reset
//! connections with exponential backoff and jitter; labctl additionally
//! retries body reads that end early (truncated responses) and stalls
//! (a per-attempt timeout; `LABCTL_S3_TIMEOUT_SECS`, default 30 s without
//! progress). A failure after the retries names the object.

use super::{Backend, BackendError, BackendResult, ObjectInfo};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectLockMode;
use aws_sdk_s3::Client;
use std::time::Duration;

/// Object Lock settings for new objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub days: u32,
    pub compliance: bool,
}

impl ObjectLock {
    fn mode(&self) -> ObjectLockMode {
        if self.compliance {
            ObjectLockMode::Compliance
        } else {
            ObjectLockMode::Governance
        }
    }
}

pub struct S3Backend {
    client: Client,
    /// The endpoint, for error messages (userinfo removed).
    endpoint: String,
    bucket: String,
    prefix: String,
    rt: tokio::runtime::Runtime,
    lock: std::sync::OnceLock<ObjectLock>,
}

const ATTEMPTS: u32 = 8;
/// Seconds without progress before a request counts as stalled and is
/// retried (`LABCTL_S3_TIMEOUT_SECS`, default 30; whole attempts get 4×).
fn stall_timeout() -> Duration {
    let secs = std::env::var("LABCTL_S3_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30u64);
    Duration::from_secs(secs.max(1))
}

fn io_err(name: &str, msg: String) -> BackendError {
    BackendError::Io {
        name: name.to_string(),
        cause: std::io::Error::other(msg),
    }
}

/// Describes an SDK error without secrets: code, message, HTTP status.
fn describe<E: ProvideErrorMetadata + std::fmt::Debug>(e: &SdkError<E>) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            format!(
                "HTTP {status} {}: {}",
                s.err().code().unwrap_or("error"),
                s.err().message().unwrap_or("(no message)")
            )
        }
        SdkError::TimeoutError(_) => "timed out (after retries)".into(),
        SdkError::DispatchFailure(d) => {
            let what = match d.as_connector_error() {
                Some(c) if c.is_timeout() => "timed out",
                Some(c) if c.is_io() => "could not connect or the connection broke",
                Some(c) if c.is_user() => "the request could not be sent",
                _ => "the request failed",
            };
            match d.as_connector_error() {
                Some(c) => format!("{what} (after retries): {}", error_words(c)),
                None => format!("{what} (after retries)"),
            }
        }
        SdkError::ResponseError(_) => "malformed response (after retries)".into(),
        other => format!("{other}"),
    }
}

/// A URL with any `user:secret@` taken out of its authority.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit('@').next().unwrap_or(auth);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_string(),
    }
}

/// An error and its causes in words (each one's `Display`, repeated text
/// left out), never Rust debug output.
fn error_words(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![];
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    }
}

impl S3Backend {
    /// Opens `s3://bucket/prefix` with the standard AWS configuration.
    ///
    /// # Errors
    /// A usage error for a malformed URL; a key error for a credentials file
    /// other users can read.
    pub fn open(url: &str) -> crate::error::Result<S3Backend> {
        Self::open_with(url, &super::OpenOptions::default())
    }

    /// [`S3Backend::open`] with a credentials file and CA file from a config
    /// file (each overrides its environment variable).
    ///
    /// # Errors
    /// As [`S3Backend::open`].
    pub fn open_with(url: &str, opts: &super::OpenOptions) -> crate::error::Result<S3Backend> {
        let rest = url.strip_prefix("s3://").expect("an s3:// URL");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(crate::error::LabError::usage(format!(
                "'{url}': expected s3://bucket/prefix"
            ))
            .into());
        }
        if let Some(p) = &opts.credentials_file {
            let meta = std::fs::metadata(p).map_err(|e| {
                crate::error::LabError::usage(format!("credentials file {}: {e}", p.display()))
            })?;
            crate::util::secret::check_private(p, &meta)?;
        } else if let Some(f) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
            let p = std::path::PathBuf::from(f);
            if let Ok(meta) = std::fs::metadata(&p) {
                crate::util::secret::check_private(&p, &meta)?;
            }
        } else if let Some(home) = std::env::var_os("HOME") {
            let p = std::path::PathBuf::from(home).join(".aws/credentials");
            if let Ok(meta) = std::fs::metadata(&p) {
                crate::util::secret::check_private(&p, &meta)?;
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = rt.block_on(async {
            let retry = aws_config::retry::RetryConfig::standard()
                .with_max_attempts(ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(10));
            let timeouts = aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(stall_timeout() * 4)
                .read_timeout(stall_timeout())
                .build();
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .retry_config(retry)
                .timeout_config(timeouts);
            if let Some(http) = ca_http_client(opts.ca_file.as_deref())? {
                loader = loader.http_client(http);
            }
            if let Some(p) = &opts.credentials_file {
                use aws_runtime::env_config::file::{
                    EnvConfigFileKind as ProfileFileKind, EnvConfigFiles as ProfileFiles,
                };
                let files = || {
                    ProfileFiles::builder()
                        .include_default_config_file(true)
                        .with_file(ProfileFileKind::Credentials, p)
                        .build()
                };
                loader = loader.profile_files(files());
                if opts.endpoint_url.is_some() {
                    // A second store's own keys: the file alone, not the
                    // environment's keys (those are the repository's).
                    loader = loader.credentials_provider(
                        aws_config::profile::ProfileFileCredentialsProvider::builder()
                            .profile_files(files())
                            .build(),
                    );
                }
            }
            if let Some(u) = &opts.endpoint_url {
                loader = loader.endpoint_url(u);
            }
            let shared = loader.load().await;
            let mut b = aws_sdk_s3::config::Builder::from(&shared);
            if shared.endpoint_url().is_some() {
                b = b.force_path_style(true);
            }
            if shared.region().is_none() {
                b = b.region(aws_sdk_s3::config::Region::new("us-east-1"));
            }
            let endpoint = shared
                .endpoint_url()
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "AWS S3 ({})",
                        shared
                            .region()
                            .map(|r| r.to_string())
                            .unwrap_or_else(|| "us-east-1".into())
                    )
                });
            Ok::<_, crate::error::Error>((Client::from_conf(b.build()), endpoint))
        })?;
        let (client, endpoint) = client;
        let endpoint = without_userinfo(&endpoint);
        Ok(S3Backend {
            client,
            endpoint,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            rt,
            lock: std::sync::OnceLock::new(),
        })
    }

    /// Names the operation and the endpoint in a storage error's words.
    fn ctx<T>(&self, op: &str, r: BackendResult<T>) -> BackendResult<T> {
        r.map_err(|e| match e {
            BackendError::Io { name, cause } => BackendError::Io {
                name,
                cause: std::io::Error::new(
                    cause.kind(),
                    format!("{op} at {} failed: {cause}", self.endpoint),
                ),
            },
            other => other,
        })
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// Writes an object whether or not it exists (not for repositories,
    /// whose objects are written once: for a bucket labctl restores into,
    /// with `--overwrite`).
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_replacing(&self, name: &str, data: Vec<u8>) -> BackendResult<()> {
        let key = self.key(name);
        self.ctx(
            "PUT",
            self.rt.block_on(async {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .body(ByteStream::from(bytes::Bytes::from(data)))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| io_err(name, describe(&e)))
            }),
        )
    }

    /// Whether the bucket has Object Lock enabled.
    ///
    /// # Errors
    /// Storage errors other than "no lock configuration".
    pub fn object_lock_enabled(&self) -> BackendResult<bool> {
        self.rt.block_on(async {
            match self
                .client
                .get_object_lock_configuration()
                .bucket(&self.bucket)
                .send()
                .await
            {
                Ok(out) => Ok(out
                    .object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled")),
                Err(e) if matches!(status(&e), Some(404) | Some(400)) => Ok(false),
                Err(e) => Err(io_err(&self.bucket, describe(&e))),
            }
        })
    }

    /// HEAD of an object; `None` when it does not exist.
    fn head(
        &self,
        name: &str,
    ) -> BackendResult<Option<aws_sdk_s3::operation::head_object::HeadObjectOutput>> {
        let key = self.key(name);
        self.rt.block_on(async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
            {
                Ok(out) => Ok(Some(out)),
                Err(e) if matches!(status(&e), Some(404)) => Ok(None),
                Err(e) => Err(io_err(name, describe(&e))),
            }
        })
    }

    /// The retain-until time of an object, if it is locked (from HEAD).
    ///
    /// # Errors
    /// Storage errors.
    pub fn retention(&self, name: &str) -> BackendResult<Option<time::OffsetDateTime>> {
        Ok(self
            .head(name)?
            .and_then(|out| out.object_lock_retain_until_date().copied())
            .and_then(|d| time::OffsetDateTime::from_unix_timestamp(d.secs()).ok()))
    }

    /// Extends an object's retention to `days` from now.
    ///
    /// # Errors
    /// Storage errors.
    pub fn extend_retention(&self, name: &str, lock: ObjectLock) -> BackendResult<()> {
        let key = self.key(name);
        let until = retain_until(lock.days);
        self.rt.block_on(async {
            let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
                .mode(if lock.compliance {
                    aws_sdk_s3::types::ObjectLockRetentionMode::Compliance
                } else {
                    aws_sdk_s3::types::ObjectLockRetentionMode::Governance
                })
                .retain_until_date(until)
                .build();
            self.client
                .put_object_retention()
                .bucket(&self.bucket)
                .key(&key)
                .retention(retention)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| io_err(name, describe(&e)))
        })
    }

    /// A whole object or a range of it, through [`Self::stream_body`] (one
    /// retry and resume logic for every read).
    async fn read_body(&self, name: &str, range: Option<(u64, u64)>) -> BackendResult<Vec<u8>> {
        let (offset, len) = match range {
            Some((o, l)) => (o, Some(l)),
            None => (0, None),
        };
        let mut out = Vec::with_capacity(len.unwrap_or(0) as usize);
        self.stream_body(name, offset, len, &mut |piece| {
            out.extend_from_slice(piece);
            true
        })
        .await?;
        Ok(out)
    }
}

/// Objects at least this large go up as multipart uploads
/// (`LABCTL_S3_MULTIPART_MIB`, default 64, so packs from `--pack-mib 64`
/// up; the default 32 MiB packs go in one PUT, which measured faster and
/// is what AWS advises below ~100 MB).
fn multipart_threshold() -> usize {
    env_mib("LABCTL_S3_MULTIPART_MIB", 64).max(5 << 20)
}

/// Part size of multipart uploads (`LABCTL_S3_PART_MIB`, default 8; S3's
/// minimum is 5).
fn part_size() -> usize {
    env_mib("LABCTL_S3_PART_MIB", 8).max(5 << 20)
}

fn env_mib(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(default)
        .saturating_mul(1 << 20)
}

/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

impl S3Backend {
    /// A multipart upload: parts in parallel (each retried by the SDK on
    /// its own, so a reset costs one part, not the whole pack), each with a
    /// CRC32 checksum the store verifies; completed with `If-None-Match: *`
    /// so the object is still written once. Any failure aborts the upload
    /// (nothing becomes visible); an upload orphaned by a crash is invisible
    /// to readers and is aborted by `labctl prune` after the grace period.
    async fn put_multipart(
        &self,
        name: &str,
        key: &str,
        body: bytes::Bytes,
        lock: Option<ObjectLock>,
    ) -> BackendResult<()> {
        use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32);
        if let Some(lock) = lock {
            create = create
                .object_lock_mode(lock.mode())
                .object_lock_retain_until_date(retain_until(lock.days));
        }
        let created = create
            .send()
            .await
            .map_err(|e| io_err(name, describe(&e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| io_err(name, "the store returned no multipart upload ID".into()))?
            .to_string();
        let result = async {
            let part = part_size();
            let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(PARTS_IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            for (i, start) in (0..body.len()).step_by(part).enumerate() {
                let chunk = body.slice(start..(start + part).min(body.len()));
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(i as i32 + 1)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .body(ByteStream::from(chunk));
                let permit = limit.clone().acquire_owned().await.expect("never closed");
                tasks.spawn(async move {
                    let r = req.send().await;
                    drop(permit);
                    r.map(|out| {
                        CompletedPart::builder()
                            .part_number(i as i32 + 1)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                            .build()
                    })
                    .map_err(|e| describe(&e))
                });
            }
            let mut parts = vec![];
            while let Some(joined) = tasks.join_next().await {
                let part = joined.map_err(|e| io_err(name, format!("upload task failed: {e}")))?;
                parts.push(part.map_err(|e| io_err(name, e))?);
            }
            parts.sort_by_key(|p| p.part_number());
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .if_none_match("*")
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await;
            written_once(name, completed)
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    /// One ranged GET streamed into `sink`; an interrupted, truncated or
    /// stalled body is resumed with a new request from the first byte not
    /// yet delivered. Attempts that make progress do not count against the
    /// retry budget (a long download through a flaky link still finishes);
    /// a hard cap keeps a pathological server from looping forever.
    /// `len: None` reads to the end of the object: the first request then
    /// goes without a `Range` header (resumes use one).
    async fn stream_body(
        &self,
        name: &str,
        offset: u64,
        len: Option<u64>,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<()> {
        let key = self.key(name);
        let mut end = len.map_or(u64::MAX, |l| offset + l);
        let mut at = offset;
        let (mut failures, mut requests) = (0u32, 0u32);
        let mut last = String::new();
        while at < end {
            if failures >= ATTEMPTS || requests >= ATTEMPTS * 8 {
                return Err(io_err(name, format!("{last} (after {requests} requests)")));
            }
            if failures > 0 {
                tokio::time::sleep(backoff(failures)).await;
            }
            requests += 1;
            let mut req = self.client.get_object().bucket(&self.bucket).key(&key);
            if at > 0 || end != u64::MAX {
                req = req.range(if end == u64::MAX {
                    format!("bytes={at}-")
                } else {
                    format!("bytes={}-{}", at, end - 1)
                });
            }
            let out = match req.send().await {
                Ok(o) => o,
                Err(e) => {
                    return Err(match status(&e) {
                        Some(404) => BackendError::NotFound {
                            name: name.to_string(),
                        },
                        Some(416) => BackendError::ShortRead {
                            name: name.to_string(),
                            offset,
                            end,
                            size: at,
                        },
                        _ => io_err(name, describe(&e)),
                    })
                }
            };
            // A range past the object's end is answered with what exists.
            let object_size = out
                .content_range()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|s| s.parse::<u64>().ok());
            if end == u64::MAX {
                // The whole object (or its rest): now its end is known.
                match object_size.or(out.content_length().map(|l| at + l.max(0) as u64)) {
                    Some(size) => end = size,
                    None => return Err(io_err(name, "the store sent no object length".into())),
                }
                if at >= end {
                    return Ok(());
                }
            }
            let mut body = out.body;
            let before = at;
            last = String::new();
            loop {
                match tokio::time::timeout(stall_timeout(), body.next()).await {
                    Ok(Some(Ok(piece))) => {
                        let take = piece.len().min((end - at) as usize);
                        if take > 0 && !sink(&piece[..take]) {
                            return Ok(());
                        }
                        at += take as u64;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        last = format!("reading the body failed: {}", error_words(&e));
                        break;
                    }
                    Err(_) => {
                        last = format!(
                            "reading the body stalled for {}s",
                            stall_timeout().as_secs()
                        );
                        break;
                    }
                }
            }
            if at >= end {
                return Ok(());
            }
            if let Some(size) = object_size.filter(|s| *s < end) {
                if at >= size {
                    return Err(BackendError::ShortRead {
                        name: name.to_string(),
                        offset,
                        end,
                        size,
                    });
                }
            }
            if last.is_empty() {
                last = format!("body ended after {} of {} bytes", at - before, end - before);
            }
            if at > before {
                failures = 0;
            }
            failures += 1;
        }
        Ok(())
    }
}

/// An HTTPS client that also trusts the CA in `LABCTL_S3_CA_FILE` (or the
/// AWS-standard `AWS_CA_BUNDLE`), for stores with a private CA.
fn ca_http_client(
    file: Option<&std::path::Path>,
) -> crate::error::Result<Option<aws_sdk_s3::config::SharedHttpClient>> {
    use aws_smithy_http_client::tls;
    let Some(path) = file.map(|p| p.as_os_str().to_owned()).or_else(|| {
        std::env::var_os("LABCTL_S3_CA_FILE").or_else(|| std::env::var_os("AWS_CA_BUNDLE"))
    }) else {
        return Ok(None);
    };
    let pem = std::fs::read(&path).map_err(|e| {
        crate::error::LabError::usage(format!(
            "CA file {}: {e}",
            std::path::Path::new(&path).display()
        ))
    })?;
    let trust = tls::TrustStore::default().with_pem_certificate(pem);
    let ctx = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| {
            crate::error::LabError::usage(format!(
                "CA file {}: {e}",
                std::path::Path::new(&path).display()
            ))
        })?;
    Ok(Some(
        aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(ctx)
            .build_https(),
    ))
}

/// The outcome of a conditional (`If-None-Match: *`) write: 412 means the
/// object exists, which is never overwritten.
fn written_once<T, E: ProvideErrorMetadata + std::fmt::Debug>(
    name: &str,
    r: Result<T, SdkError<E>>,
) -> BackendResult<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if matches!(status(&e), Some(412)) => Err(BackendError::AlreadyExists {
            name: name.to_string(),
        }),
        Err(e) => Err(io_err(name, describe(&e))),
    }
}

/// Objects named by the BLAKE3 hash of their own bytes (docs/FORMAT.md):
/// any two writes of one name carry the same bytes.
fn content_addressed(name: &str) -> bool {
    ["packs/", "index/", "snapshots/"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(7);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
}

fn retain_until(days: u32) -> aws_smithy_types::DateTime {
    let secs = time::OffsetDateTime::now_utc().unix_timestamp() + days as i64 * 86400;
    aws_smithy_types::DateTime::from_secs(secs)
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn put(&self, name: &str, data: &[u8]) -> BackendResult<()> {
        self.put_owned(name, data.to_vec())
    }

    fn put_owned(&self, name: &str, data: Vec<u8>) -> BackendResult<()> {
        self.ctx(
            "PUT",
            (|| {
                if !content_addressed(name) && self.head(name)?.is_some() {
                    return Err(BackendError::AlreadyExists {
                        name: name.to_string(),
                    });
                }
                let key = self.key(name);
                // One shared buffer for every retry attempt: no copy of the pack.
                let body = bytes::Bytes::from(data);
                let lock = self
                    .lock
                    .get()
                    .filter(|_| !name.starts_with("prune/"))
                    .copied();
                if body.len() >= multipart_threshold() {
                    return self.rt.block_on(self.put_multipart(name, &key, body, lock));
                }
                self.rt.block_on(async {
                    let mut req = self
                        .client
                        .put_object()
                        .bucket(&self.bucket)
                        .key(&key)
                        .if_none_match("*")
                        .body(ByteStream::from(body));
                    // Prune marks are operational state, never locked.
                    if let Some(lock) = lock {
                        req = req
                            .object_lock_mode(lock.mode())
                            .object_lock_retain_until_date(retain_until(lock.days));
                    }
                    written_once(name, req.send().await)
                })
            })(),
        )
    }

    fn get(&self, name: &str) -> BackendResult<Vec<u8>> {
        self.ctx("GET", self.rt.block_on(self.read_body(name, None)))
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> BackendResult<Vec<u8>> {
        self.ctx(
            "GET (range)",
            (|| {
                if len == 0 {
                    return Ok(vec![]);
                }
                self.rt.block_on(self.read_body(name, Some((offset, len))))
            })(),
        )
    }

    fn get_range_stream(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> BackendResult<()> {
        if len == 0 {
            return Ok(());
        }
        self.ctx(
            "GET (range)",
            self.rt
                .block_on(self.stream_body(name, offset, Some(len), sink)),
        )
    }

    fn get_stream(&self, name: &str, sink: &mut dyn FnMut(&[u8]) -> bool) -> BackendResult<()> {
        self.ctx(
            "GET",
            self.rt.block_on(self.stream_body(name, 0, None, sink)),
        )
    }

    fn list(&self, prefix: &str, f: &mut dyn FnMut(ObjectInfo)) -> BackendResult<()> {
        self.ctx("LIST", {
            let full = self.key(prefix);
            let strip = if self.prefix.is_empty() {
                0
            } else {
                self.prefix.len() + 1
            };
            self.rt.block_on(async {
                let mut pages = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| io_err(prefix, describe(&e)))?;
                    for o in page.contents() {
                        if let Some(k) = o.key() {
                            f(ObjectInfo {
                                name: k[strip..].to_string(),
                                size: o.size().unwrap_or(0) as u64,
                            });
                        }
                    }
                }
                Ok(())
            })
        })
    }

    fn stat(&self, name: &str) -> BackendResult<Option<u64>> {
        self.ctx(
            "HEAD",
            self.head(name)
                .map(|o| o.map(|o| o.content_length().unwrap_or(0) as u64)),
        )
    }

    fn delete(&self, name: &str) -> BackendResult<()> {
        self.ctx("DELETE", {
            let key = self.key(name);
            self.rt.block_on(async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| io_err(name, describe(&e)))
            })
        })
    }

    /// `LABCTL_S3_REQUESTS` (default 16): ranged reads in flight on restore;
    /// an eighth of it (at most 2) pack uploads in flight on backup.
    fn parallelism(&self) -> usize {
        std::env::var("LABCTL_S3_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16usize)
            .clamp(1, 64)
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn unfinished_uploads(&self) -> BackendResult<Vec<super::Upload>> {
        let prefix = self.key("packs/");
        self.rt.block_on(async {
            let mut out = vec![];
            let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
            loop {
                let page = self
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(&prefix)
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(id_marker.clone())
                    .send()
                    .await
                    .map_err(|e| io_err(&prefix, describe(&e)))?;
                for u in page.uploads() {
                    if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                        out.push(super::Upload {
                            key: key.to_string(),
                            id: id.to_string(),
                            initiated: u
                                .initiated()
                                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                        });
                    }
                }
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if page.is_truncated() != Some(true) || key_marker.is_none() {
                    return Ok(out);
                }
            }
        })
    }

    fn abort_upload(&self, upload: &super::Upload) -> BackendResult<()> {
        self.rt.block_on(async {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&upload.key)
                .upload_id(&upload.id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| io_err(&upload.key, describe(&e)))
        })
    }

    fn set_object_lock(&self, lock: ObjectLock) -> crate::error::Result<()> {
        if !self.object_lock_enabled()? {
            return Err(crate::error::LabError::usage(format!(
                "bucket {} does not have Object Lock enabled; create it with Object Lock (it cannot be added to most existing buckets), or drop --object-lock-days",
                self.bucket
            ))
            .into());
        }
        let _ = self.lock.set(lock);
        Ok(())
    }

    fn locked_until(&self, name: &str) -> BackendResult<Option<time::OffsetDateTime>> {
        if self.lock.get().is_none() {
            return Ok(None);
        }
        self.retention(name)
    }

    fn extend_lock(&self, name: &str) -> BackendResult<()> {
        match self.lock.get() {
            Some(lock) => self.extend_retention(name, *lock),
            None => Ok(()),
        }
    }
}
