//! The `etcd` source: the v3 `Maintenance.Snapshot` stream of one etcd
//! member, checked against its sha256 trailer while it streams, stored as
//! one file (`snapshot.db`, byte for byte what `etcdctl snapshot save`
//! writes, trailer included), with the member's facts (member and cluster
//! ID, revision, key count, db size, version). Restore runs the installed
//! `etcdutl` (3.5+) or `etcdctl` (3.4) `snapshot restore` into a new data
//! directory; verify restores into a scratch directory, starts a real etcd
//! member on free loopback ports and compares what it serves with the facts.
//!
//! Wire contract (etcd `server/etcdserver/api/v3rpc/maintenance.go`, the
//! same in 3.4, 3.5 and 3.6): the server sends the backend in messages whose
//! `remaining_bytes` counts what is left after each one, then one more
//! message whose blob is the sha256 of everything before it. A stream that
//! ends without that trailer, or whose trailer does not match, is refused
//! and nothing is committed.
//!
//! Must not copy `member/snap/db` from disk (a live bbolt file is not a
//! consistent snapshot), and must not touch the engine's internals.

use super::SourceContext;
use crate::error::{Cancelled, LabError};
use crate::repo::backup::{BackupOutcome, BackupRun};
use crate::repo::chunker::ChunkerKind;
use crate::repo::extract;
use crate::repo::snapshot::Source;
use crate::repo::{Id, Repository};
use crate::util::units::parse_duration;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The snapshot's `source.kind`.
pub const KIND: &str = "etcd";

/// The file the snapshot holds (what `labctl restore --target DIR` writes).
pub const FILE_NAME: &str = "snapshot.db";

/// kubeadm's defaults: the local member and its health-check client files.
const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:2379";
const DEFAULT_CACERT: &str = "/etc/kubernetes/pki/etcd/ca.crt";
const DEFAULT_CERT: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.crt";
const DEFAULT_CLIENT_KEY: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.key";
const DEFAULT_TIMEOUT: &str = "10s";

/// What `etcdutl snapshot restore --bump-revision` adds, so that watchers
/// and caches of the old cluster see every key as changed and resync.
pub const REVISION_BUMP: u64 = 1_000_000_000;

/// The member name and cluster token of the member `verify` starts.
const VERIFY_MEMBER: &str = "labctl-verify";

/// How long a restored member may take to become healthy in `verify`.
const VERIFY_START_TIMEOUT: Duration = Duration::from_secs(60);

/// `labctl backup etcd [--endpoint URL] [--cacert F --cert F --client-key F]`
/// / `backup = { source = "etcd", endpoint = "https://10.0.0.11:2379" }`.
///
/// The defaults are a kubeadm control plane's: the local member and the
/// health-check client certificate kubeadm writes.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSource {
    /// Client URL of the member to snapshot (https:// with the TLS files
    /// below, or http:// without them).
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// CA certificate that signed the member's server certificate.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CACERT)]
    #[serde(default = "default_cacert")]
    pub cacert: PathBuf,
    /// Client certificate (etcd runs with --client-cert-auth under kubeadm).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CERT)]
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// The client certificate's private key; refused when other users can
    /// read it. (`--key` is the repository key, as everywhere in labctl.)
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CLIENT_KEY)]
    #[serde(default = "default_client_key")]
    pub client_key: PathBuf,
    /// Time allowed to connect and for each status request (the stream
    /// itself may take as long as it needs).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TIMEOUT)]
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_endpoint() -> String {
    DEFAULT_ENDPOINT.into()
}
fn default_cacert() -> PathBuf {
    DEFAULT_CACERT.into()
}
fn default_cert() -> PathBuf {
    DEFAULT_CERT.into()
}
fn default_client_key() -> PathBuf {
    DEFAULT_CLIENT_KEY.into()
}
fn default_timeout() -> String {
    DEFAULT_TIMEOUT.into()
}

impl EtcdSource {
    /// The endpoint must be an http(s) URL with a host and port, and the
    /// timeout a duration.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, _from_config: bool) -> Result<(), (String, String)> {
        let rest = self
            .endpoint
            .strip_prefix("https://")
            .or_else(|| self.endpoint.strip_prefix("http://"));
        match rest {
            Some(hp)
                if hp.rsplit_once(':').is_some_and(|(h, p)| {
                    !h.is_empty() && p.trim_end_matches('/').parse::<u16>().is_ok()
                }) => {}
            _ => {
                return Err((
                    "endpoint".into(),
                    format!(
                        "'{}' is not a client URL like https://127.0.0.1:2379",
                        self.endpoint
                    ),
                ))
            }
        }
        parse_duration(&self.timeout).map_err(|e| ("timeout".into(), e.to_string()))?;
        Ok(())
    }

    fn is_tls(&self) -> bool {
        self.endpoint.starts_with("https://")
    }

    fn timeout(&self) -> Duration {
        parse_duration(&self.timeout).unwrap_or(Duration::from_secs(10))
    }

    /// The files this source reads on the host (for `labctl config validate
    /// --host`): the client key must be private.
    ///
    /// # Errors
    /// The first file that is missing or too open.
    pub fn check_host(&self) -> Result<(), LabError> {
        if self.is_tls() {
            self.tls_options()?;
        }
        Ok(())
    }

    fn tls_options(&self) -> Result<etcd_client::TlsOptions, LabError> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).map_err(|e| {
                LabError::usage(format!(
                    "cannot read the etcd {what} {}: {e} (set it with --{})",
                    p.display(),
                    match what {
                        "CA certificate" => "cacert",
                        "client certificate" => "cert",
                        _ => "client-key",
                    }
                ))
            })
        };
        let ca = read(&self.cacert, "CA certificate")?;
        let cert = read(&self.cert, "client certificate")?;
        let meta = std::fs::metadata(&self.client_key).map_err(|e| {
            LabError::key(format!(
                "cannot read the etcd client key {}: {e} (set it with --client-key)",
                self.client_key.display()
            ))
        })?;
        crate::util::secret::check_private(&self.client_key, &meta)?;
        let key = read(&self.client_key, "client key")?;
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }

    fn connect_options(&self) -> Result<etcd_client::ConnectOptions, LabError> {
        let mut o = etcd_client::ConnectOptions::new().with_connect_timeout(self.timeout());
        if self.is_tls() {
            o = o.with_tls(self.tls_options()?);
        }
        Ok(o)
    }

    /// Streams a snapshot of the member into the repository.
    ///
    /// # Errors
    /// An unreachable or unhealthy endpoint, a refused certificate, a stream
    /// cut short (exit 1, naming the endpoint), a trailer that does not match
    /// (exit 4), storage errors: nothing is committed then.
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        let started = Instant::now();
        let endpoint = self.endpoint.clone();
        let rt = crate::util::runtime()?;
        let options = self.connect_options()?;
        let timeout = self.timeout();
        let (mut client, before) = rt.block_on(async {
            let mut client = within(
                timeout,
                &endpoint,
                "connecting",
                etcd_client::Client::connect([endpoint.as_str()], Some(options)),
            )
            .await?;
            let before = member_state(&mut client, &endpoint, timeout).await?;
            Ok::<_, LabError>((client, before))
        })?;

        // The stream runs on the runtime; the engine reads it on this thread
        // through a bounded channel (backpressure up to the server).
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, LabError>>(64);
        let cancel = ctx.cancel().cloned();
        let ep = endpoint.clone();
        let stream_client = client.clone();
        let streamer = rt.spawn(async move {
            let mut stream = match stream_client.maintenance_client().snapshot().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx
                        .send(Err(source_error(&ep, "starting the snapshot stream", &e)))
                        .await;
                    return;
                }
            };
            let mut check = SnapshotCheck::default();
            loop {
                if cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                    return;
                }
                match stream.message().await {
                    Ok(Some(m)) => {
                        if let Err(e) = check.feed(m.remaining_bytes(), m.blob()) {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        // A closed receiver means the backup stopped.
                        if tx.send(Ok(m.blob().to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let end = check.finish().map(|_| Vec::new());
                        let end = end.map_err(|e| {
                            LabError::new(e.exit_code(), format!("etcd at {ep}: {}", e.message()))
                        });
                        let _ = tx.send(end).await;
                        return;
                    }
                    Err(e) => {
                        let what =
                            format!("the snapshot stream broke after {} bytes", check.received);
                        let _ = tx.send(Err(source_error(&ep, &what, &e))).await;
                        return;
                    }
                }
            }
        });

        let failure = Arc::new(Mutex::new(None::<LabError>));
        let reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            failure: failure.clone(),
            done: false,
        };
        // The member's db size (plus the trailer) is the stream's length.
        ctx.progress
            .set_total(u64::try_from(before.db_size).unwrap_or(0) + 32);
        let mut run = BackupRun::start(ctx.repo, ctx.opts.threads, ctx.progress)?;
        run.set_cancel(ctx.opts.cancel.clone());
        let content = run.add_stream(reader, ChunkerKind::Fixed, &format!("etcd at {endpoint}"));
        let content = match content {
            Ok(c) => c,
            Err(e) => {
                streamer.abort();
                if e.downcast_ref::<Cancelled>().is_some() {
                    return Err(e);
                }
                if ctx.opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                    return Err(Cancelled.into());
                }
                if let Some(f) = failure.lock().expect("failure slot").take() {
                    return Err(LabError::new(
                        f.exit_code(),
                        format!("{}; nothing was committed", f.message()),
                    )
                    .into());
                }
                return Err(e);
            }
        };
        let size = run.summary_mut().bytes_read;
        let after = rt.block_on(member_state(&mut client, &endpoint, timeout))?;
        let mut opts = ctx.opts.clone();
        facts(&mut opts.facts, &endpoint, &before, &after, size);
        let root = super::one_file_root(&mut run, FILE_NAME.as_bytes(), content)?;
        run.finish(
            Source {
                kind: KIND.into(),
                name: endpoint,
            },
            root,
            &opts,
            started,
        )
    }
}

/// What a member reports about itself at one moment.
#[derive(Debug, Clone)]
struct MemberState {
    member_id: u64,
    cluster_id: u64,
    revision: i64,
    keys: i64,
    version: String,
    db_size: i64,
    /// The member's alarms and errors (`NOSPACE`, ...).
    alarms: Vec<String>,
}

async fn within<T, F>(t: Duration, endpoint: &str, what: &str, f: F) -> Result<T, LabError>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(source_error(endpoint, what, &e)),
        Err(_) => Err(LabError::failed(format!(
            "etcd at {endpoint}: {what} timed out after {}s (is the endpoint reachable and healthy?)",
            t.as_secs()
        ))),
    }
}

/// The member's status and a count-only range over the whole key space.
async fn member_state(
    client: &mut etcd_client::Client,
    endpoint: &str,
    t: Duration,
) -> Result<MemberState, LabError> {
    let status = within(t, endpoint, FIRST_REQUEST, client.status()).await?;
    // A member that reports corruption, or knows no leader (its data may be
    // behind the cluster's), is not snapshotted. NOSPACE and other alarms
    // are not a reason to skip a backup (it is the moment one is wanted):
    // they are recorded in the facts.
    if let Some(e) = status.errors().iter().find(|e| e.contains("CORRUPT")) {
        return Err(LabError::integrity(format!(
            "etcd at {endpoint} reports corruption ({}); not taking a snapshot of it",
            e.trim()
        )));
    }
    if status.leader() == 0 {
        return Err(LabError::failed(format!(
            "etcd at {endpoint} is unhealthy: it knows no leader, so its data may be behind the cluster's"
        )));
    }
    let count = within(
        t,
        endpoint,
        "counting its keys",
        client.get(
            vec![0u8],
            Some(
                etcd_client::GetOptions::new()
                    .with_all_keys()
                    .with_count_only(),
            ),
        ),
    )
    .await?;
    let h = status
        .header()
        .ok_or_else(|| LabError::failed(format!("etcd at {endpoint}: status without a header")))?;
    let revision = count.header().map(|h| h.revision()).unwrap_or(h.revision());
    Ok(MemberState {
        member_id: h.member_id(),
        cluster_id: h.cluster_id(),
        revision,
        keys: count.count(),
        version: status.version().to_string(),
        db_size: status.db_size(),
        alarms: status
            .errors()
            .iter()
            .map(|e| e.trim().to_string())
            .collect(),
    })
}

/// Records the snapshot's facts. The revision and key count are exact when
/// nothing was written while the snapshot streamed (the same revision
/// before and after); otherwise the revision is a range and the count is
/// left out.
fn facts(
    f: &mut std::collections::BTreeMap<String, serde_json::Value>,
    endpoint: &str,
    before: &MemberState,
    after: &MemberState,
    size: u64,
) {
    use serde_json::json;
    f.insert("etcd.endpoint".into(), json!(endpoint));
    f.insert(
        "etcd.member-id".into(),
        json!(format!("{:x}", before.member_id)),
    );
    f.insert(
        "etcd.cluster-id".into(),
        json!(format!("{:x}", before.cluster_id)),
    );
    f.insert("etcd.version".into(), json!(before.version));
    f.insert("etcd.db-size".into(), json!(size.saturating_sub(32)));
    f.insert("etcd.status-db-size".into(), json!(before.db_size));
    if !before.alarms.is_empty() {
        f.insert("etcd.alarms".into(), json!(before.alarms));
    }
    if before.revision == after.revision {
        f.insert("etcd.revision".into(), json!(before.revision));
        f.insert("etcd.keys".into(), json!(before.keys));
    } else {
        f.insert("etcd.revision-min".into(), json!(before.revision));
        f.insert("etcd.revision-max".into(), json!(after.revision));
    }
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn source_error(endpoint: &str, what: &str, e: &etcd_client::Error) -> LabError {
    let text = describe(e);
    // The first request over TLS that fails after the TCP connection was
    // made: the handshake, or the member refusing our certificate (under
    // TLS 1.3 the client learns that only as a closed connection).
    let hint = if endpoint.starts_with("https://")
        && what == FIRST_REQUEST
        && !text.contains("tcp connect error")
    {
        " (the TLS handshake failed or the member closed the connection: are --cacert, --cert and --client-key the member's, and the client certificate valid?)"
    } else {
        ""
    };
    LabError::failed(format!("etcd at {endpoint}: {what}: {text}{hint}"))
}

/// What the first request is called in errors.
const FIRST_REQUEST: &str = "asking its status";

/// Checks a snapshot stream as it passes: the size the first message
/// announces, the messages after it, and the sha256 trailer (the last 32
/// bytes) against everything before it.
#[derive(Default)]
pub struct SnapshotCheck {
    /// The backend's size, from the first message (`remaining_bytes` plus
    /// its blob).
    size: Option<u64>,
    /// Bytes received, trailer included.
    pub received: u64,
    hasher: Sha256,
    trailer: Vec<u8>,
}

impl SnapshotCheck {
    /// A check of a stream whose backend size is already known (a stored
    /// snapshot file: its size less the 32-byte trailer).
    pub fn expecting(db_size: u64) -> SnapshotCheck {
        SnapshotCheck {
            size: Some(db_size),
            ..Default::default()
        }
    }

    /// Takes one message.
    ///
    /// # Errors
    /// An integrity error when the stream holds more than it announced.
    pub fn feed(&mut self, remaining: u64, blob: &[u8]) -> Result<(), LabError> {
        let size = *self.size.get_or_insert(remaining + blob.len() as u64);
        let mut data = blob;
        if self.received < size {
            let take = ((size - self.received) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            data = &data[take..];
        }
        self.received += blob.len() as u64;
        if self.trailer.len() + data.len() > 32 {
            return Err(LabError::integrity(format!(
                "the snapshot stream holds more than the {size} bytes and checksum it announced"
            )));
        }
        self.trailer.extend_from_slice(data);
        Ok(())
    }

    /// The stream has ended: checks it is whole and its checksum matches.
    ///
    /// # Errors
    /// An integrity error for a short stream or a checksum mismatch.
    pub fn finish(self) -> Result<u64, LabError> {
        let Some(size) = self.size else {
            return Err(LabError::integrity("the snapshot stream was empty"));
        };
        if self.trailer.len() != 32 {
            return Err(LabError::integrity(format!(
                "the snapshot stream ended after {} of {} bytes (no checksum trailer)",
                self.received,
                size + 32
            )));
        }
        let got = self.hasher.finalize();
        if got.as_slice() != self.trailer.as_slice() {
            return Err(LabError::integrity(format!(
                "the snapshot's sha256 does not match its trailer (computed {}, sent {})",
                hex::encode(got),
                hex::encode(&self.trailer)
            )));
        }
        Ok(size)
    }
}

/// The stream as a reader for the engine. The first failure is kept (typed)
/// for the caller and surfaces as a read error.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, LabError>>,
    buf: Vec<u8>,
    pos: usize,
    failure: Arc<Mutex<Option<LabError>>>,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) if b.is_empty() => self.done = true,
                Some(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Err(e)) => {
                    let msg = e.to_string();
                    *self.failure.lock().expect("failure slot") = Some(e);
                    return Err(std::io::Error::other(msg));
                }
                None => {
                    return Err(std::io::Error::other(
                        "the snapshot stream stopped without an end",
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `labctl restore SNAP --etcd-data-dir DIR ...`: where and as which member
/// an etcd snapshot is restored, and how it is verified.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdRestore {
    /// Restore an etcd snapshot into this new data directory (it must not
    /// exist, or be empty) with `etcdutl snapshot restore` (etcd 3.5+, with
    /// --bump-revision 1000000000 --mark-compacted so watchers and caches
    /// of the old cluster resync) or `etcdctl snapshot restore` (3.4).
    #[arg(long, value_name = "DIR", help_heading = "etcd snapshots")]
    pub etcd_data_dir: Option<PathBuf>,
    /// Member name of the restored member.
    #[arg(
        long = "name",
        value_name = "NAME",
        default_value = "default",
        help_heading = "etcd snapshots"
    )]
    #[serde(default = "default_name")]
    pub name: String,
    /// The restored cluster's members, NAME=PEER-URL,...
    #[arg(long, value_name = "MEMBERS", help_heading = "etcd snapshots")]
    pub initial_cluster: Option<String>,
    /// The restored cluster's token (give each restored cluster its own).
    #[arg(
        long,
        value_name = "TOKEN",
        default_value = "etcd-cluster",
        help_heading = "etcd snapshots"
    )]
    #[serde(default = "default_token")]
    pub initial_cluster_token: String,
    /// This member's peer URLs.
    #[arg(long, value_name = "URLS", help_heading = "etcd snapshots")]
    pub initial_advertise_peer_urls: Option<String>,
    /// The restore tool (`etcdutl`, or `etcdctl` for etcd 3.4); default:
    /// found on PATH, etcdutl first.
    #[arg(long, value_name = "PATH", help_heading = "etcd snapshots")]
    pub etcdutl: Option<PathBuf>,
    /// The etcd server binary `--verify` starts (default: `etcd` on PATH).
    #[arg(long, value_name = "PATH", help_heading = "etcd snapshots")]
    pub etcd: Option<PathBuf>,
    /// With --verify: a key that must exist in the restored data.
    #[arg(long, value_name = "KEY", help_heading = "etcd snapshots")]
    pub sentinel_key: Option<String>,
}

fn default_name() -> String {
    "default".into()
}
fn default_token() -> String {
    "etcd-cluster".into()
}

/// What a restore into a data directory did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreReport {
    pub data_dir: PathBuf,
    pub tool: String,
    pub tool_version: String,
    pub revision_bumped: bool,
    pub bytes: u64,
}

/// What `verify` saw on the live member.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    pub keys: i64,
    pub revision: i64,
    pub expected_keys: Option<i64>,
    pub expected_revision: Option<i64>,
    pub sentinel_key: Option<String>,
    pub seconds: f64,
}

/// The restore tool found, and how to call it.
#[derive(Debug, Clone)]
struct Tool {
    path: PathBuf,
    /// `etcdutl` (3.5+) or `etcdctl` (3.4's `snapshot restore`).
    etcdutl: bool,
    version: String,
}

/// The first `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_tool(given: Option<&Path>) -> Result<Tool, LabError> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => on_path("etcdutl")
            .or_else(|| on_path("etcdctl"))
            .ok_or_else(|| {
                LabError::usage(
                    "neither etcdutl nor etcdctl is on PATH: install etcd's client tools \
                 (Debian: etcd-client) or name one with --etcdutl",
                )
            })?,
    };
    let out = Command::new(&path)
        .arg("version")
        .env("ETCDCTL_API", "3")
        .output()
        .map_err(|e| LabError::usage(format!("cannot run {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.lines().next().unwrap_or("").trim().to_string();
    // "etcdutl version: 3.5.9" / "etcdctl version: 3.4.23"
    let Some((prog, version)) = first.split_once(" version: ") else {
        return Err(LabError::usage(format!(
            "{} does not look like etcdutl or etcdctl (`version` printed: {first:?})",
            path.display()
        )));
    };
    Ok(Tool {
        path,
        etcdutl: prog.trim() == "etcdutl",
        version: version.trim().to_string(),
    })
}

fn check_snapshot(
    repo: &Repository,
    id: &Id,
) -> crate::error::Result<crate::repo::snapshot::Snapshot> {
    let (snap, _) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a '{}' snapshot, not an etcd one",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    Ok(snap)
}

/// Writes the snapshot's `snapshot.db` (`size` bytes, trailer included)
/// to `file`, checking its sha256 trailer as it is written.
fn write_db(
    repo: &Repository,
    id: &Id,
    size: u64,
    file: &Path,
    threads: usize,
) -> crate::error::Result<u64> {
    let f = std::fs::File::create(file)?;
    let mut w = CheckingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, f),
        check: SnapshotCheck::expecting(size.saturating_sub(32)),
    };
    let n = extract::restore_to_writer(repo, id, Some(FILE_NAME), &mut w, threads)?;
    let f = w.inner.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    w.check.finish().map_err(|e| {
        LabError::new(
            e.exit_code(),
            format!("{}: {}", file.display(), e.message()),
        )
    })?;
    Ok(n)
}

/// A writer that passes the restored file through [`SnapshotCheck`], as
/// it passed when it streamed from the member.
struct CheckingWriter<W> {
    inner: W,
    check: SnapshotCheck,
}

impl<W: std::io::Write> std::io::Write for CheckingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        // The size is known, so the `remaining_bytes` argument is unused.
        self.check
            .feed(0, &buf[..n])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Who the restored member is (the `snapshot restore` flags).
struct Membership<'a> {
    name: &'a str,
    cluster: &'a str,
    token: &'a str,
    peer_urls: &'a str,
}

/// Runs the restore tool on `db` into `dir` (which must not exist).
fn run_tool(
    tool: &Tool,
    db: &Path,
    dir: &Path,
    m: &Membership<'_>,
    bump: bool,
) -> crate::error::Result<()> {
    let mut cmd = Command::new(&tool.path);
    cmd.env("ETCDCTL_API", "3")
        .arg("snapshot")
        .arg("restore")
        .arg(db)
        .arg("--data-dir")
        .arg(dir)
        .arg("--name")
        .arg(m.name)
        .arg("--initial-cluster")
        .arg(m.cluster)
        .arg("--initial-cluster-token")
        .arg(m.token)
        .arg("--initial-advertise-peer-urls")
        .arg(m.peer_urls)
        .stdin(Stdio::null());
    if bump {
        cmd.arg("--bump-revision")
            .arg(REVISION_BUMP.to_string())
            .arg("--mark-compacted");
    }
    let out = cmd
        .output()
        .map_err(|e| LabError::usage(format!("cannot run {}: {e}", tool.path.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or("").to_string();
        return Err(LabError::failed(format!(
            "`{} snapshot restore` exited with {}: {last}",
            tool.path.display(),
            out.status
        ))
        .into());
    }
    Ok(())
}

/// A temporary directory beside `near` (same filesystem, so a rename into
/// place is atomic), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn beside(near: &Path, tag: &str) -> crate::error::Result<Scratch> {
        let parent = near
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = format!(
            ".labctl-etcd-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let p = parent.join(name);
        std::fs::create_dir_all(&p)
            .map_err(|e| LabError::failed(format!("cannot create {}: {e}", p.display())))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Restores an etcd snapshot into a new data directory. The tool writes
/// into a scratch directory beside it, which is renamed into place only
/// when the tool succeeded: a failed restore leaves nothing at `dir`.
///
/// # Errors
/// A snapshot of another kind or a missing tool (exit 2), a data directory
/// that exists and is not empty (exit 6), a damaged snapshot (exit 4), a
/// failing tool (exit 1).
pub fn restore(
    repo: &Repository,
    id: &Id,
    args: &EtcdRestore,
    dir: &Path,
    threads: usize,
) -> crate::error::Result<RestoreReport> {
    let snap = check_snapshot(repo, id)?;
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(LabError::refused(format!(
                "{} exists and is not empty; restore etcd into a new data directory",
                dir.display()
            ))
            .into());
        }
    }
    let tool = find_tool(args.etcdutl.as_deref())?;
    let peer = args
        .initial_advertise_peer_urls
        .clone()
        .unwrap_or_else(|| "http://localhost:2380".into());
    let cluster = args
        .initial_cluster
        .clone()
        .unwrap_or_else(|| format!("{}={peer}", args.name));
    let scratch = Scratch::beside(dir, "restore")?;
    let db = scratch.0.join(FILE_NAME);
    let bytes = write_db(repo, id, snap.summary.bytes_total, &db, threads)?;
    let staged = scratch.0.join("data");
    let member = Membership {
        name: &args.name,
        cluster: &cluster,
        token: &args.initial_cluster_token,
        peer_urls: &peer,
    };
    run_tool(&tool, &db, &staged, &member, tool.etcdutl)?;
    if dir.exists() {
        std::fs::remove_dir(dir)?; // empty, checked above
    }
    std::fs::rename(&staged, dir).map_err(|e| {
        LabError::failed(format!(
            "cannot move the restored data into {}: {e}",
            dir.display()
        ))
    })?;
    Ok(RestoreReport {
        data_dir: dir.to_path_buf(),
        tool: tool.path.display().to_string(),
        tool_version: tool.version,
        revision_bumped: tool.etcdutl,
        bytes,
    })
}

/// A free TCP port on 127.0.0.1 (for members labctl starts to verify).
pub fn free_loopback_port() -> crate::error::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A started etcd member, killed when dropped.
struct Member(std::process::Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Verifies an etcd snapshot on a live member: restores it into a scratch
/// data directory as a one-member cluster, starts etcd there on free
/// loopback ports, waits for it to answer, and compares its key count and
/// revision with the snapshot's facts (and reads the sentinel key). The
/// member is stopped and the scratch directory removed afterwards.
///
/// `near` says where the scratch directory goes (a path on a disk with
/// room for the data).
///
/// # Errors
/// A member that does not start or answer (exit 1), counts that differ
/// from the facts or a missing sentinel key (exit 4).
pub fn verify(
    repo: &Repository,
    id: &Id,
    args: &EtcdRestore,
    near: &Path,
    threads: usize,
) -> crate::error::Result<VerifyReport> {
    let started = Instant::now();
    let snap = check_snapshot(repo, id)?;
    let tool = find_tool(args.etcdutl.as_deref())?;
    let etcd = server_binary(args)?;
    let scratch = Scratch::beside(near, "verify")?;
    let db = scratch.0.join(FILE_NAME);
    write_db(repo, id, snap.summary.bytes_total, &db, threads)?;
    let data = scratch.0.join("data");
    // The member is started with its own loopback URLs; this peer URL is
    // only recorded in the scratch membership.
    let peer = format!("http://127.0.0.1:{}", free_loopback_port()?);
    // No revision bump here: the point is to compare with the facts.
    let cluster = format!("{VERIFY_MEMBER}={peer}");
    let member = Membership {
        name: VERIFY_MEMBER,
        cluster: &cluster,
        token: VERIFY_MEMBER,
        peer_urls: &peer,
    };
    run_tool(&tool, &db, &data, &member, false)?;
    serve_and_compare(
        &etcd,
        VERIFY_MEMBER,
        &data,
        &scratch.0,
        &snap,
        id,
        args.sentinel_key.as_deref(),
        0,
        started,
    )
}

/// Verifies a data directory [`restore`] wrote: starts a member on it
/// (free loopback ports; its stored membership is kept) and compares its
/// key count and revision with the snapshot's facts, the revision raised
/// by [`REVISION_BUMP`] when the restore bumped it.
///
/// # Errors
/// As [`verify`].
pub fn verify_data_dir(
    repo: &Repository,
    id: &Id,
    args: &EtcdRestore,
    restored: &RestoreReport,
) -> crate::error::Result<VerifyReport> {
    let started = Instant::now();
    let snap = check_snapshot(repo, id)?;
    let etcd = server_binary(args)?;
    let scratch = Scratch::beside(&restored.data_dir, "verify")?;
    serve_and_compare(
        &etcd,
        &args.name,
        &restored.data_dir,
        &scratch.0,
        &snap,
        id,
        args.sentinel_key.as_deref(),
        if restored.revision_bumped {
            REVISION_BUMP as i64
        } else {
            0
        },
        started,
    )
}

fn server_binary(args: &EtcdRestore) -> Result<PathBuf, LabError> {
    match &args.etcd {
        Some(p) => Ok(p.clone()),
        None => on_path("etcd").ok_or_else(|| {
            LabError::usage(
                "etcd is not on PATH: install it (Debian: etcd-server) or name it with --etcd",
            )
        }),
    }
}

/// Starts etcd on the data directory `data` (which holds its membership)
/// with loopback URLs, waits for it to answer, reads its state, stops it,
/// and compares with the snapshot's facts (`bump` added to the revision).
#[allow(clippy::too_many_arguments)]
fn serve_and_compare(
    etcd: &Path,
    name: &str,
    data: &Path,
    log_dir: &Path,
    snap: &crate::repo::snapshot::Snapshot,
    id: &Id,
    sentinel_key: Option<&str>,
    bump: i64,
    started: Instant,
) -> crate::error::Result<VerifyReport> {
    let (client_port, peer_port) = (free_loopback_port()?, free_loopback_port()?);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let client_url = format!("http://127.0.0.1:{client_port}");
    let log_file = log_dir.join("etcd.log");
    let log = std::fs::File::create(&log_file)?;
    // A data directory with a WAL restarts its stored member: etcd reads
    // no --initial-* flag then (etcdserver/server.go, the haveWAL case).
    let child = Command::new(etcd)
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data)
        .arg("--listen-client-urls")
        .arg(&client_url)
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| LabError::usage(format!("cannot start {}: {e}", etcd.display())))?;
    let mut member = Member(child);
    let rt = crate::util::runtime()?;
    let state = rt.block_on(async {
        let deadline = Instant::now() + VERIFY_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = member.0.try_wait() {
                return Err(LabError::failed(format!(
                    "the restored etcd member exited with {status} before it answered: {}",
                    last_line(&log_file)
                )));
            }
            let attempt = async {
                let mut c = etcd_client::Client::connect(
                    [client_url.as_str()],
                    Some(
                        etcd_client::ConnectOptions::new()
                            .with_connect_timeout(Duration::from_secs(2)),
                    ),
                )
                .await
                .map_err(|e| source_error(&client_url, "connecting", &e))?;
                let s = member_state(&mut c, &client_url, Duration::from_secs(5)).await?;
                let sentinel = match sentinel_key {
                    Some(k) => Some(
                        within(
                            Duration::from_secs(5),
                            &client_url,
                            "reading the sentinel key",
                            c.get(k.as_bytes(), None),
                        )
                        .await?
                        .count(),
                    ),
                    None => None,
                };
                Ok::<_, LabError>((s, sentinel))
            };
            match attempt.await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => {
                    return Err(LabError::failed(format!(
                        "the restored etcd member did not answer within {}s: {}",
                        VERIFY_START_TIMEOUT.as_secs(),
                        e.message()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })?;
    drop(member);
    let (state, sentinel) = state;
    let fact = |k: &str| snap.facts.get(k).and_then(|v| v.as_i64());
    let expected_keys = fact("etcd.keys");
    let expected_revision = fact("etcd.revision").map(|r| r + bump);
    let mut problems = vec![];
    if let Some(k) = expected_keys {
        if k != state.keys {
            problems.push(format!("{} keys, the snapshot's facts say {k}", state.keys));
        }
    }
    match (
        expected_revision,
        fact("etcd.revision-min"),
        fact("etcd.revision-max"),
    ) {
        (Some(r), _, _) if r != state.revision => problems.push(format!(
            "revision {}, the snapshot's facts say {r}",
            state.revision
        )),
        (None, Some(lo), Some(hi)) if !(lo + bump..=hi + bump).contains(&state.revision) => {
            problems.push(format!(
                "revision {}, the snapshot's facts say {}..={}",
                state.revision,
                lo + bump,
                hi + bump
            ))
        }
        _ => {}
    }
    if let (Some(k), Some(0)) = (sentinel_key, sentinel) {
        problems.push(format!("the sentinel key {k:?} is missing"));
    }
    if !problems.is_empty() {
        return Err(LabError::integrity(format!(
            "etcd snapshot {} restored, but the live member serves {}",
            id.short(),
            problems.join("; ")
        ))
        .into());
    }
    Ok(VerifyReport {
        keys: state.keys,
        revision: state.revision,
        expected_keys,
        expected_revision,
        sentinel_key: sentinel_key.map(str::to_string),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn last_line(p: &Path) -> String {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().lines().last().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(db: &[u8], msg: usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = vec![];
        let mut sent = 0;
        for c in db.chunks(msg) {
            sent += c.len();
            out.push(((db.len() - sent) as u64, c.to_vec()));
        }
        out.push((0, Sha256::digest(db).to_vec()));
        out
    }

    fn run(msgs: &[(u64, Vec<u8>)]) -> Result<u64, LabError> {
        let mut c = SnapshotCheck::default();
        for (r, b) in msgs {
            c.feed(*r, b)?;
        }
        c.finish()
    }

    #[test]
    fn a_whole_stream_with_its_trailer_passes() {
        let db: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(run(&stream(&db, 32 * 1024)).unwrap(), 100_000);
        assert_eq!(run(&stream(&db, 7)).unwrap(), 100_000);
    }

    #[test]
    fn a_wrong_trailer_a_short_stream_or_extra_bytes_are_integrity_errors() {
        let db: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let mut m = stream(&db, 32 * 1024);
        m[1].1[5] ^= 1; // a flipped bit in the data
        let e = run(&m).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::ExitCode::Integrity);
        assert!(e.message().contains("does not match"), "{e}");

        let m = stream(&db, 32 * 1024);
        let e = run(&m[..m.len() - 1]).unwrap_err();
        assert!(e.message().contains("ended after 100000 of 100032"), "{e}");
        let e = run(&m[..2]).unwrap_err();
        assert!(e.message().contains("no checksum trailer"), "{e}");

        let mut m = stream(&db, 32 * 1024);
        m.push((0, vec![1]));
        let e = run(&m).unwrap_err();
        assert!(e.message().contains("more than"), "{e}");
        assert!(run(&[]).is_err());
    }
}
