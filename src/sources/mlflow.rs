//! The `mlflow` source: an MLflow tracking server's state — its backend
//! store (the SQL database alembic manages) and its artifact root — as one
//! snapshot: the database dump, taken first (`backend/mlflow.db`, a
//! consistent copy through SQLite's online backup API, or
//! `backend/mlflow.pgdump`, `pg_dump --format=custom` of a PostgreSQL store
//! at a snapshot exported by the session that reads the facts, so the
//! facts describe exactly the dump, or `backend/mlflow.sql`, `mysqldump
//! --single-transaction` of a MySQL store, whose facts are read beside the
//! dump: counts before and after it bound what it holds, and only ended
//! runs are sampled) and `artifacts/` (the artifact root's
//! tree, read after the dump, so it holds at least every artifact the
//! database names). The facts record the alembic revision, the artifact root, the
//! counts of experiments, runs, registered models and versions, and a
//! sample of runs (metric history lengths, artifact paths) that a restore
//! is verified against through MLflow's REST API.
//!
//! Restore writes the database and the artifacts beside their targets,
//! rewrites every stored absolute artifact URI from the old root to the new
//! one (any text column of any table, so columns later alembic revisions
//! add are covered), then moves both into place: a failure leaves the
//! targets as they were (PostgreSQL: the load and the rewrite are one
//! transaction; MySQL: into an empty database only, emptied again when the
//! load fails, as MLflow's triggers keep tables from moving between
//! databases). IDs, names and version numbers are unchanged.
//!
//! Contract (PLATFORM.md, MLflow): stored artifact URIs are absolute
//! (`experiments.artifact_location`, `runs.artifact_uri`,
//! `model_versions.source`/`storage_location`, `logged_models`...); REST
//! `experiments/search`, `runs/search`, `metrics/get-history`,
//! `registered-models/search`, `model-versions/search`, `/get-artifact`,
//! `/version`. An `s3://` artifact root is read object by object from its
//! bucket (sources/bucket.rs) and restored into a directory or a bucket.

use super::SourceContext;
use crate::error::LabError;
use crate::repo::backup::{BackupOutcome, BackupRun, ChunkerChoice};
use crate::repo::chunker::ChunkerKind;
use crate::repo::extract::{self, RestoreOptions};
use crate::repo::snapshot::Source;
use crate::repo::tree::{Node, NodeType, Tree};
use crate::repo::{Id, Repository};
use crate::util::dbclient::{first_cell, my_ident, MyTarget, PgSession, PgTarget};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The snapshot's `source.kind`.
pub const KIND: &str = "mlflow";
/// The database's name in the snapshot.
pub const DB_FILE: &str = "backend/mlflow.db";
/// A PostgreSQL store's dump (`pg_dump --format=custom`) in the snapshot.
pub const PG_DUMP_FILE: &str = "backend/mlflow.pgdump";
/// A MySQL store's dump (`mysqldump --single-transaction`) in the snapshot.
pub const MY_DUMP_FILE: &str = "backend/mlflow.sql";
/// The artifact root's folder in the snapshot.
pub const ARTIFACTS_DIR: &str = "artifacts";
/// Runs sampled for verification.
const SAMPLE_RUNS: usize = 3;

/// `labctl backup mlflow` / `{ source = "mlflow", backend_store_uri = "sqlite:////srv/mlflow/mlflow.db", artifacts = "/srv/mlflow/artifacts" }`.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowSource {
    /// The tracking server's backend store, as `mlflow server
    /// --backend-store-uri` takes it: `sqlite:////abs/path/mlflow.db`,
    /// `postgresql://user@host:5432/mlflow` or
    /// `mysql://user@host:3306/mlflow` (no password in the URI: see
    /// --password-file).
    #[arg(long, value_name = "URI")]
    pub backend_store_uri: String,
    /// A file (mode 0600) holding the database password. Without it,
    /// libpq's own PGPASSWORD, PGPASSFILE or ~/.pgpass apply (PostgreSQL),
    /// or the client's ~/.my.cnf (MySQL).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The artifact root (`--default-artifact-root` or
    /// `--artifacts-destination` of the server): a directory (a path or
    /// `file://` URI) or `s3://bucket/prefix`.
    #[arg(long, value_name = "DIR|S3URL")]
    pub artifacts: String,
    /// The S3 endpoint of an `s3://` artifact root (MinIO's, say);
    /// default: AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    /// An AWS shared-credentials file (0600) with the artifact bucket's
    /// keys; with --s3-endpoint it is used alone.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub s3_credentials_file: Option<PathBuf>,
    /// The tracking server, to record its MLflow version (`/version`).
    #[arg(long, value_name = "URL")]
    #[serde(default)]
    pub tracking_uri: Option<String>,
}

/// A local path from `sqlite:///rel`, `sqlite:////abs` or a plain path.
fn sqlite_path(uri: &str) -> Option<PathBuf> {
    uri.strip_prefix("sqlite:///").map(PathBuf::from)
}

/// A directory from `/abs`, `file:///abs`.
fn dir_of(uri: &str) -> PathBuf {
    PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri))
}

fn unsupported(uri: &str) -> Option<String> {
    let scheme = uri.split("://").next().unwrap_or("");
    match scheme {
        "sqlite" => None,
        _ if PgTarget::is_uri(uri) || MyTarget::is_uri(uri) => None,
        _ => Some(format!(
            "'{}' is not an MLflow backend store URI (sqlite:////path/mlflow.db, postgresql://user@host/db)",
            crate::util::redact_url(uri)
        )),
    }
}

/// The backend a store URI names, as the `mlflow.backend` fact spells it.
fn backend_of(uri: &str) -> &'static str {
    if PgTarget::is_uri(uri) {
        "postgresql"
    } else if MyTarget::is_uri(uri) {
        "mysql"
    } else {
        "sqlite"
    }
}

/// Whether a store URI names a database server (PostgreSQL, MySQL) rather
/// than a SQLite file.
///
/// # Errors
/// Why a server URI is malformed (never repeating a password).
pub fn is_server_store(uri: &str) -> Result<bool, String> {
    if PgTarget::is_uri(uri) {
        PgTarget::parse(uri, None).map_err(|e| e.message().to_string())?;
        return Ok(true);
    }
    if MyTarget::is_uri(uri) {
        let t = MyTarget::parse(uri, None).map_err(|e| e.message().to_string())?;
        if t.database.is_none() {
            return Err(format!(
                "'{}' names no database (mysql://user@host:3306/mlflow)",
                crate::util::redact_url(uri)
            ));
        }
        return Ok(true);
    }
    Ok(false)
}

/// A MySQL store's server and database (the URI must name one).
fn my_target(uri: &str, password_file: Option<&Path>) -> Result<(MyTarget, String), LabError> {
    let t = MyTarget::parse(uri, password_file)?;
    let db = t.database.clone().ok_or_else(|| {
        LabError::usage(format!(
            "'{}' names no database (mysql://user@host:3306/mlflow)",
            crate::util::redact_url(uri)
        ))
    })?;
    t.command("mysql")?;
    Ok((t, db))
}

/// Rows of one query, every field as text (NULL empty).
type Rows = Vec<Vec<String>>;

fn sqlite_rows(c: &rusqlite::Connection, sql: &str) -> rusqlite::Result<Rows> {
    use rusqlite::types::ValueRef;
    let mut st = c.prepare(sql)?;
    let n = st.column_count();
    let rows = st
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => String::new(),
                        ValueRef::Integer(v) => v.to_string(),
                        ValueRef::Real(f) => f.to_string(),
                        ValueRef::Text(t) | ValueRef::Blob(t) => {
                            String::from_utf8_lossy(t).into_owned()
                        }
                    })
                })
                .collect::<rusqlite::Result<Vec<String>>>()
        })?
        .collect::<rusqlite::Result<Rows>>()?;
    Ok(rows)
}

impl MlflowSource {
    /// The URI's scheme is supported and the paths are absolute.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, from_config: bool) -> Result<(), (String, String)> {
        if let Some(why) = unsupported(&self.backend_store_uri) {
            return Err(("backend_store_uri".into(), why));
        }
        let server = is_server_store(&self.backend_store_uri)
            .map_err(|why| ("backend_store_uri".to_string(), why))?;
        if server {
            if from_config
                && self
                    .password_file
                    .as_ref()
                    .is_some_and(|p| !p.is_absolute())
            {
                return Err(("password_file".into(), "use an absolute path".into()));
            }
        } else if self.password_file.is_some() {
            return Err((
                "password_file".into(),
                "only a postgresql:// or mysql:// store takes a password file".into(),
            ));
        }
        let db = sqlite_path(&self.backend_store_uri).unwrap_or_default();
        if from_config && !db.is_absolute() && !server {
            return Err((
                "backend_store_uri".into(),
                "use an absolute path: sqlite:////srv/mlflow/mlflow.db".into(),
            ));
        }
        if self.artifacts.starts_with("s3://") {
            super::bucket::check_bucket_url("artifacts", &self.artifacts)?;
            if from_config
                && self
                    .s3_credentials_file
                    .as_ref()
                    .is_some_and(|p| !p.is_absolute())
            {
                return Err(("s3_credentials_file".into(), "use an absolute path".into()));
            }
            return Ok(());
        }
        if self.s3_endpoint.is_some() || self.s3_credentials_file.is_some() {
            return Err((
                "s3_endpoint".into(),
                "only an s3:// artifact root takes s3_endpoint and s3_credentials_file".into(),
            ));
        }
        if self.artifacts.contains("://") && !self.artifacts.starts_with("file://") {
            return Err((
                "artifacts".into(),
                format!(
                    "'{}': a directory (a path or file:// URI) or s3://bucket/prefix",
                    crate::util::redact_url(&self.artifacts)
                ),
            ));
        }
        if from_config && !dir_of(&self.artifacts).is_absolute() {
            return Err(("artifacts".into(), "use an absolute path".into()));
        }
        Ok(())
    }

    /// The database and the artifact root exist here.
    ///
    /// # Errors
    /// A usage error naming what is missing.
    pub fn check_host(&self) -> Result<(), LabError> {
        if PgTarget::is_uri(&self.backend_store_uri) {
            let t = PgTarget::parse(&self.backend_store_uri, self.password_file.as_deref())?;
            t.command("psql")?;
            t.command("pg_dump")?;
        } else if MyTarget::is_uri(&self.backend_store_uri) {
            let (t, _) = my_target(&self.backend_store_uri, self.password_file.as_deref())?;
            t.command("mysqldump")?;
        } else if !sqlite_path(&self.backend_store_uri)
            .unwrap_or_default()
            .is_file()
        {
            let db = sqlite_path(&self.backend_store_uri).unwrap_or_default();
            return Err(LabError::usage(format!(
                "MLflow database {} does not exist",
                db.display()
            )));
        }
        let a = dir_of(&self.artifacts);
        if !self.artifacts.starts_with("s3://") && !a.is_dir() {
            return Err(LabError::usage(format!(
                "MLflow artifact root {} is not a directory",
                a.display()
            )));
        }
        Ok(())
    }

    /// The source in words.
    pub fn what(&self) -> String {
        crate::util::redact_url(&self.backend_store_uri)
    }

    /// Dumps the database consistently, then reads the artifact root, into
    /// one snapshot.
    ///
    /// # Errors
    /// A store that cannot be opened or dumped, an artifact root that is
    /// not a directory (nothing is committed); unreadable artifact files
    /// are in the snapshot's errors (exit 3).
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        if let Some(why) = unsupported(&self.backend_store_uri) {
            return Err(LabError::usage(why).into());
        }
        let started = Instant::now();
        let art = if self.artifacts.starts_with("s3://") {
            ArtifactRoot::S3 {
                url: self.artifacts.trim_end_matches('/').to_string(),
                bucket: super::bucket::open(
                    &self.artifacts,
                    &self.s3_endpoint,
                    &self.s3_credentials_file,
                )?,
            }
        } else {
            let art = std::fs::canonicalize(dir_of(&self.artifacts)).map_err(|e| {
                LabError::usage(format!("MLflow artifact root {}: {e}", self.artifacts))
            })?;
            if !art.is_dir() {
                return Err(LabError::usage(format!(
                    "MLflow artifact root {} is not a directory",
                    art.display()
                ))
                .into());
            }
            ArtifactRoot::Dir(art)
        };
        // The dump first (a consistent copy, while the server writes on),
        // and the facts read from exactly what is dumped.
        let backend = backend_of(&self.backend_store_uri);
        let mut _scratch = None;
        let mut session = None;
        let mut pg = None;
        let mut my = None;
        let mut _option_file = None;
        let (facts, reader, size, file_name): (_, Box<dyn std::io::Read>, Option<u64>, &str) =
            if MyTarget::is_uri(&self.backend_store_uri) {
                let (t, db) = my_target(&self.backend_store_uri, self.password_file.as_deref())?;
                t.command("mysqldump")?;
                let facts = describe(&mut |q| Ok(t.query_in(&db, q)?), &art, '`', true)?;
                let (mut cmd, file) = t.command("mysqldump")?.into_parts();
                cmd.args([
                    "--single-transaction",
                    "--quick",
                    "--skip-lock-tables",
                    "--no-tablespaces",
                    "--hex-blob",
                    "--routines",
                    "--triggers",
                    "--default-character-set=utf8mb4",
                ])
                .arg(&db);
                let cancel = ctx.opts.cancel.clone().unwrap_or_default();
                let r = super::stream::CommandReader::from_command(cmd, "mysqldump", &cancel)?;
                _option_file = Some(file);
                my = Some((t, db));
                (facts, Box::new(r), None, "mlflow.sql")
            } else if let Some(db) = sqlite_path(&self.backend_store_uri) {
                let copy = sqlite_copy(&db)?;
                let dump = copy.0.join("mlflow.db");
                let c = rusqlite::Connection::open_with_flags(
                    &dump,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                let facts = describe(&mut |q| Ok(sqlite_rows(&c, q)?), &art, '"', false)?;
                drop(c);
                let size = std::fs::metadata(&dump)?.len();
                let f = std::fs::File::open(&dump)?;
                _scratch = Some(copy);
                (
                    facts,
                    Box::new(std::io::BufReader::with_capacity(1 << 20, f)),
                    Some(size),
                    "mlflow.db",
                )
            } else {
                let t = PgTarget::parse(&self.backend_store_uri, self.password_file.as_deref())?;
                let mut s = PgSession::open(&t)?;
                let facts = describe(&mut |q| Ok(s.rows(q)?), &art, '"', false)?;
                let mut cmd = t.command("pg_dump")?;
                cmd.args(["-w", "--format=custom", "--compress=0"])
                    .arg(format!("--snapshot={}", s.snapshot));
                let cancel = ctx.opts.cancel.clone().unwrap_or_default();
                let r = super::stream::CommandReader::from_command(cmd, "pg_dump", &cancel)?;
                session = Some(s);
                pg = Some(t);
                (facts, Box::new(r), None, "mlflow.pgdump")
            };
        let server_version = match &self.tracking_uri {
            Some(u) => Some(server_version(u)?),
            None => None,
        };
        let mut run = BackupRun::start(ctx.repo, ctx.opts.threads, ctx.progress)?;
        run.set_cancel(ctx.opts.cancel.clone());
        // Streamed: a large store is not held in memory.
        let before = run.summary_mut().bytes_read;
        let content = run
            .add_stream(reader, ChunkerKind::Cdc, "MLflow database")
            .map_err(|e| -> crate::error::Error {
                if e.downcast_ref::<crate::error::Cancelled>().is_some() {
                    return e;
                }
                match (&pg, &my) {
                    (Some(t), _) => t.classify("pg_dump", &e.to_string()).into(),
                    (_, Some((t, _))) => t.classify("mysqldump", &e.to_string()).into(),
                    _ => e,
                }
            })?;
        // MySQL: the facts were read beside the dump's snapshot, not in it;
        // the counts after it bound what the dump holds.
        let counts_after = match &my {
            Some((t, db)) => Some(store_counts(&mut |q| Ok(t.query_in(db, q)?))?),
            None => None,
        };
        let size = size.unwrap_or(run.summary_mut().bytes_read - before);
        if let Some(s) = session {
            s.close();
        }
        run.check_cancel()?;
        let art_root = match &art {
            ArtifactRoot::Dir(d) => {
                super::path::walk_tree(&mut run, d, ARTIFACTS_DIR.as_bytes(), ChunkerChoice::Auto)?
            }
            ArtifactRoot::S3 { bucket, .. } => {
                // Every object under the prefix, streamed (no local copy).
                use crate::backend::Backend;
                let mut objects = vec![];
                bucket.list("", &mut |o| objects.push((o.name, o.size)))?;
                objects.sort();
                let mut folder = super::Folder::default();
                for (key, size) in objects {
                    run.check_cancel()?;
                    let parts: Vec<String> = key.split('/').map(String::from).collect();
                    if parts.iter().any(|p| p.is_empty() || p == "." || p == "..") {
                        run.summary_mut().errors.push(format!(
                            "{key}: an object key that is not a path (empty, . or .. part)"
                        ));
                        continue;
                    }
                    match super::bucket::stream_object(&mut run, bucket, &key) {
                        Ok(content) => folder.insert(&parts, super::Leaf::Stored { size, content }),
                        Err(e) if e.downcast_ref::<crate::error::Cancelled>().is_some() => {
                            return Err(e)
                        }
                        Err(e) => run.summary_mut().errors.push(format!("{key}: {e}")),
                    }
                }
                folder.store(
                    &mut run,
                    time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
                )?
            }
        };
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let mut file = Node::new(
            file_name.as_bytes(),
            NodeType::File,
            0o100600,
            uid,
            gid,
            now,
        );
        file.size = size;
        file.content = content;
        run.summary_mut().files_new += 1;
        let backend_tree = run.add_tree(&Tree {
            v: 1,
            nodes: vec![file],
        })?;
        let mut bdir = Node::new(b"backend", NodeType::Dir, 0o040700, uid, gid, now);
        bdir.subtree = Some(backend_tree);
        let mut adir = Node::new(
            ARTIFACTS_DIR.as_bytes(),
            NodeType::Dir,
            0o040755,
            uid,
            gid,
            now,
        );
        adir.subtree = Some(art_root);
        let root = run.add_tree(&Tree {
            v: 1,
            nodes: vec![adir, bdir],
        })?;
        let total = run.summary_mut().bytes_read;
        run.summary_mut().bytes_total = total;
        let mut opts = ctx.opts.clone();
        for (k, v) in facts {
            opts.facts.insert(k, v);
        }
        opts.facts.insert("mlflow.backend".into(), json!(backend));
        if let Some(t) = &pg {
            opts.facts
                .insert("mlflow.database".into(), json!(t.display()));
        }
        if let Some((t, _)) = &my {
            opts.facts
                .insert("mlflow.database".into(), json!(t.display()));
        }
        if let Some(after) = counts_after {
            if opts.facts.get("mlflow.counts") != Some(&after) {
                opts.facts.insert("mlflow.counts_after".into(), after);
            }
        }
        opts.facts
            .insert("mlflow.artifact_root".into(), json!(art.uri()));
        if let Some(v) = server_version {
            opts.facts.insert("mlflow.server_version".into(), json!(v));
        }
        run.finish(
            Source {
                kind: KIND.into(),
                name: self.what(),
            },
            root,
            &opts,
            started,
        )
    }
}

/// A consistent copy of a SQLite store (its online backup API), in a
/// scratch directory, as `mlflow.db`.
fn sqlite_copy(db: &Path) -> crate::error::Result<Scratch> {
    if !db.is_file() {
        return Err(
            LabError::usage(format!("MLflow database {} does not exist", db.display())).into(),
        );
    }
    let copy = Scratch::new(&std::env::temp_dir(), "mlflow-dump")?;
    let src = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| LabError::failed(format!("opening MLflow database {}: {e}", db.display())))?;
    src.busy_timeout(Duration::from_secs(30))?;
    let mut dst = rusqlite::Connection::open(copy.0.join("mlflow.db"))?;
    let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
    b.run_to_completion(256, Duration::from_millis(5), None)
        .map_err(|e| LabError::failed(format!("dumping MLflow database {}: {e}", db.display())))?;
    drop(b);
    Ok(copy)
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(near: &Path, tag: &str) -> crate::error::Result<Scratch> {
        let p = near.join(format!(
            ".labctl-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the dump holds: the alembic revision, counts, and a sample of runs
/// with their metric history lengths and artifact files. `q` runs a query
/// on the dumped state; `quote` quotes identifiers (`key` is reserved in
/// some dialects).
fn describe(
    q: &mut dyn FnMut(&str) -> crate::error::Result<Rows>,
    art: &ArtifactRoot,
    quote: char,
    finished_only: bool,
) -> crate::error::Result<Vec<(String, Value)>> {
    let not_mlflow = |e: crate::error::Error| -> crate::error::Error {
        LabError::failed(format!(
            "reading the database: {e}: is it an MLflow backend store?"
        ))
        .into()
    };
    let rev = first_cell(&q("SELECT version_num FROM alembic_version").map_err(not_mlflow)?)
        .map(String::from)
        .ok_or_else(|| {
            LabError::failed("the database has no alembic revision: is it an MLflow backend store?")
        })?;
    let counts = store_counts(q).map_err(not_mlflow)?;
    let mut sample = vec![];
    // Where the facts and the dump are not one snapshot (MySQL), only runs
    // that have ended are sampled: their metric histories no longer grow.
    let ended = if finished_only {
        "WHERE status IN ('FINISHED', 'FAILED', 'KILLED') "
    } else {
        ""
    };
    let runs = q(&format!(
        "SELECT run_uuid, experiment_id, artifact_uri FROM runs {ended}ORDER BY start_time DESC, run_uuid LIMIT {SAMPLE_RUNS}"
    ))?;
    for r in runs {
        let [id, exp, uri] =
            <[String; 3]>::try_from(r).map_err(|_| LabError::failed("runs: unexpected columns"))?;
        let key = format!("{quote}key{quote}");
        let metrics: BTreeMap<String, i64> = q(&format!(
            "SELECT {key}, count(*) FROM metrics WHERE run_uuid = {} GROUP BY {key} ORDER BY {key}",
            crate::util::dbclient::literal(&id)
        ))?
        .into_iter()
        .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.parse().ok()?)))
        .collect();
        // The run's artifact files, as paths under its artifact URI.
        let files = art.files_under(&uri, 5);
        sample.push(
            json!({"run_id": id, "experiment_id": exp, "metrics": metrics, "artifacts": files}),
        );
    }
    Ok(vec![
        ("mlflow.alembic_revision".into(), json!(rev)),
        ("mlflow.counts".into(), counts),
        ("mlflow.sample".into(), Value::Array(sample)),
    ])
}

/// Where the artifacts are: a directory, or an S3 bucket and prefix.
enum ArtifactRoot {
    Dir(PathBuf),
    S3 {
        /// `s3://bucket[/prefix]`, without a trailing `/`.
        url: String,
        bucket: crate::backend::s3::S3Backend,
    },
}

impl ArtifactRoot {
    /// The root as stored artifact URIs start with it.
    fn uri(&self) -> String {
        match self {
            ArtifactRoot::Dir(p) => p.display().to_string(),
            ArtifactRoot::S3 { url, .. } => url.clone(),
        }
    }

    /// Up to `max` files under a run's artifact URI, as paths relative to
    /// it, sorted (none when the URI is not under this root).
    fn files_under(&self, uri: &str, max: usize) -> Vec<String> {
        let mut files = vec![];
        match self {
            ArtifactRoot::Dir(art) => {
                let dir = dir_of(uri);
                if !dir.starts_with(art) {
                    return files;
                }
                let mut stack = vec![dir.clone()];
                while let Some(d) = stack.pop() {
                    let Ok(rd) = std::fs::read_dir(&d) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if let Ok(rel) = p.strip_prefix(&dir) {
                            files.push(rel.display().to_string());
                        }
                        if files.len() >= max {
                            break;
                        }
                    }
                }
            }
            ArtifactRoot::S3 { url, bucket } => {
                use crate::backend::Backend;
                let Some(rel) = uri.strip_prefix(&format!("{url}/")) else {
                    return files;
                };
                let prefix = format!("{}/", rel.trim_end_matches('/'));
                let _ = bucket.list(&prefix, &mut |o| {
                    if files.len() < max {
                        files.push(o.name[prefix.len()..].to_string());
                    }
                });
            }
        }
        files.sort();
        files
    }
}

/// The counts of experiments, runs, registered models and versions.
fn store_counts(
    q: &mut dyn FnMut(&str) -> crate::error::Result<Rows>,
) -> crate::error::Result<Value> {
    let mut counts = serde_json::Map::new();
    for table in ["experiments", "runs", "registered_models", "model_versions"] {
        let r = q(&format!("SELECT count(*) FROM {table}"))?;
        let n: i64 = first_cell(&r).and_then(|v| v.parse().ok()).unwrap_or(0);
        counts.insert(table.to_string(), json!(n));
    }
    Ok(Value::Object(counts))
}

fn runtime() -> crate::error::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn client() -> crate::error::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// The tracking server's MLflow version (`GET /version`).
fn server_version(base: &str) -> crate::error::Result<String> {
    let url = format!("{}/version", base.trim_end_matches('/'));
    runtime()?.block_on(async {
        let r = client()?.get(&url).send().await.map_err(|e| {
            LabError::failed(format!(
                "asking the MLflow server {base} for its version: {e}"
            ))
        })?;
        if !r.status().is_success() {
            return Err(LabError::failed(format!("{url}: HTTP {}", r.status())).into());
        }
        Ok(r.text().await?.trim().to_string())
    })
}

// ---------------------------------------------------------------- restore

/// `labctl restore SNAP --mlflow-backend-store-uri URI --mlflow-artifacts DIR`.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "MLflow (mlflow snapshots)")]
pub struct MlflowRestore {
    /// Restore an mlflow snapshot's database here, onto the backend it was
    /// taken from: `sqlite:////path/mlflow.db`,
    /// `postgresql://user@host/db` (an existing, empty database; loaded in
    /// one transaction) or `mysql://user@host/db` (an existing, empty
    /// database; emptied again if the load fails). A database with tables
    /// is refused unless --overwrite (SQLite: replaced whole; PostgreSQL:
    /// the dump's objects dropped and loaded again; MySQL: not offered).
    /// Every stored artifact URI under the old root is rewritten to
    /// --mlflow-artifacts.
    #[arg(long, value_name = "URI", requires = "mlflow_artifacts")]
    pub mlflow_backend_store_uri: Option<String>,
    /// Restore the artifact root into this directory, or under this
    /// `s3://bucket/prefix` (must be empty unless --overwrite).
    #[arg(long, value_name = "DIR", requires = "mlflow_backend_store_uri")]
    pub mlflow_artifacts: Option<PathBuf>,
    /// Rewrite stored artifact URIs starting with OLD to NEW instead of the
    /// recorded root to --mlflow-artifacts (repeatable; for an artifact
    /// root the server sees under another path).
    #[arg(long, value_name = "OLD=NEW", requires = "mlflow_backend_store_uri")]
    pub rewrite_artifact_root: Vec<String>,
    /// After restoring, check through this MLflow server (started on the
    /// restored store) that experiments, runs, registered models, versions,
    /// sampled metric histories and artifacts are what was backed up.
    #[arg(long, value_name = "URL")]
    pub verify_tracking_uri: Option<String>,
    /// The S3 endpoint of an s3:// --mlflow-artifacts (default:
    /// AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL", requires = "mlflow_artifacts")]
    pub mlflow_s3_endpoint: Option<String>,
    /// An AWS shared-credentials file (0600) for an s3:// --mlflow-artifacts.
    #[arg(long, value_name = "FILE", requires = "mlflow_artifacts")]
    pub mlflow_s3_credentials_file: Option<PathBuf>,
    /// A file (mode 0600) with the password of a postgresql:// or mysql://
    /// restore target (else libpq's PGPASSWORD, PGPASSFILE or ~/.pgpass, or
    /// ~/.my.cnf).
    #[arg(long, value_name = "FILE", requires = "mlflow_backend_store_uri")]
    pub mlflow_password_file: Option<PathBuf>,
}

/// What an MLflow restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MlflowRestoreReport {
    /// The database file, or the PostgreSQL database (never a password).
    pub database: String,
    pub artifacts: PathBuf,
    pub alembic_revision: String,
    /// `table.column` → values rewritten.
    pub rewritten: BTreeMap<String, usize>,
    pub bytes: u64,
    pub seconds: f64,
}

fn has_tables(db: &Path) -> bool {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n > 0)
        .unwrap_or(true)
}

fn non_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Restores an mlflow snapshot (see [`MlflowRestore`]).
///
/// # Errors
/// Not an mlflow snapshot, an unsupported URI or another backend than the
/// snapshot's (exit 2); a target that holds data without `overwrite` (exit
/// 6); a refused database login (exit 5); storage, key and integrity
/// errors. The targets are untouched unless everything succeeded.
pub fn restore(
    repo: &Repository,
    id: &Id,
    args: &MlflowRestore,
    overwrite: bool,
    threads: usize,
) -> crate::error::Result<MlflowRestoreReport> {
    let started = Instant::now();
    let uri = args.mlflow_backend_store_uri.as_deref().expect("given");
    if let Some(why) = unsupported(uri) {
        return Err(LabError::usage(why).into());
    }
    let art = args.mlflow_artifacts.clone().expect("given");
    let (snap, _) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a {} snapshot, not an mlflow one",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    let from = snap
        .facts
        .get("mlflow.backend")
        .and_then(Value::as_str)
        .unwrap_or("sqlite");
    let to = backend_of(uri);
    if from != to {
        return Err(LabError::usage(format!(
            "snapshot {} holds a {from} backend store; restore it into a {from} one (a {to} URI was given): labctl restores a store onto the same kind of database, as alembic made it; nothing was written",
            id.short()
        ))
        .into());
    }
    let pg = if PgTarget::is_uri(uri) {
        Some(PgTarget::parse(uri, args.mlflow_password_file.as_deref())?)
    } else {
        None
    };
    if let Some(t) = &pg {
        for p in ["psql", "pg_restore"] {
            t.command(p)?;
        }
    }
    let my = if MyTarget::is_uri(uri) {
        Some(my_target(uri, args.mlflow_password_file.as_deref())?)
    } else {
        None
    };
    // An s3:// artifact root: its bucket, and the objects already there.
    let s3_art = match art.to_str().filter(|a| a.starts_with("s3://")) {
        Some(url) => {
            use crate::backend::Backend;
            super::bucket::check_bucket_url("--mlflow-artifacts", url)
                .map_err(|(_, why)| LabError::usage(why))?;
            let b = super::bucket::open(
                url,
                &args.mlflow_s3_endpoint,
                &args.mlflow_s3_credentials_file,
            )?;
            let mut present = vec![];
            b.list("", &mut |o| present.push(o.name))?;
            Some((url.trim_end_matches('/').to_string(), b, present))
        }
        None => None,
    };
    if let Some((t, db)) = &my {
        // MLflow's MySQL schema has triggers, which keep tables from moving
        // between databases: a load cannot be staged beside the target and
        // swapped in, so it goes only into an empty one (emptied again if
        // it fails).
        if overwrite {
            return Err(LabError::usage(format!(
                "a MySQL store is restored only into an empty database (MLflow's triggers keep labctl from swapping tables in whole): drop the tables of {}/{db} or name a new database; nothing was written",
                t.display()
            ))
            .into());
        }
        let n = my_tables(t, db)?.len();
        if n > 0 {
            return Err(LabError::refused(format!(
                "MySQL database {db} on {} already has {n} table(s): restore into an empty database; nothing was written",
                t.display()
            ))
            .into());
        }
    }
    if !overwrite {
        match (&pg, sqlite_path(uri)) {
            (Some(t), _) => {
                let n = pg_table_count(t)?;
                if n > 0 {
                    return Err(LabError::refused(format!(
                        "PostgreSQL database {} already has {n} table(s): restore into an empty database, or pass --overwrite to replace what the dump holds; nothing was written",
                        t.display()
                    ))
                    .into());
                }
            }
            (None, Some(db)) if db.exists() && has_tables(&db) => {
                return Err(LabError::refused(format!(
                    "MLflow database {} already has tables: restore into a new one, or pass --overwrite to replace it whole; nothing was written",
                    db.display()
                ))
                .into());
            }
            _ => {}
        }
        if s3_art.is_none() && non_empty_dir(&art) {
            return Err(LabError::refused(format!(
                "artifact directory {} is not empty: choose an empty one, or pass --overwrite to replace it whole; nothing was written",
                art.display()
            ))
            .into());
        }
        if let Some((url, _, present)) = &s3_art {
            if !present.is_empty() {
                return Err(LabError::refused(format!(
                    "artifact root {url} holds {} object(s): choose an empty prefix, or pass --overwrite to replace its content; nothing was written",
                    present.len()
                ))
                .into());
            }
        }
    }
    let old_root = snap
        .facts
        .get("mlflow.artifact_root")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let new_root = match &s3_art {
        Some((url, _, _)) => PathBuf::from(url),
        None => absolute(&art)?,
    };
    let mut pairs: Vec<(String, String)> = vec![];
    for p in &args.rewrite_artifact_root {
        let (o, n) = p.split_once('=').ok_or_else(|| {
            LabError::usage(format!("--rewrite-artifact-root {p:?}: expected OLD=NEW"))
        })?;
        pairs.push((
            o.trim_end_matches('/').to_string(),
            n.trim_end_matches('/').to_string(),
        ));
    }
    if pairs.is_empty() && !old_root.is_empty() {
        let new = new_root.display().to_string();
        if !old_root.contains("://") {
            let file_new = if s3_art.is_some() {
                new.clone()
            } else {
                format!("file://{new}")
            };
            pairs.push((format!("file://{old_root}"), file_new));
        }
        pairs.push((old_root.clone(), new));
    }
    // Everything is written beside the targets first (for an s3:// root,
    // in the temporary directory).
    let art_parent = if s3_art.is_some() {
        std::env::temp_dir()
    } else {
        new_root.parent().unwrap_or(Path::new("/")).to_path_buf()
    };
    std::fs::create_dir_all(&art_parent)?;
    let scratch = Scratch::new(&art_parent, "mlflow-restore")?;
    let summary = extract::restore_to_dir(
        repo,
        id,
        &scratch.0,
        &RestoreOptions {
            threads,
            ..Default::default()
        },
        crate::util::progress::Progress::hidden(),
    )?;
    if !summary.failed.is_empty() {
        return Err(LabError::integrity(format!(
            "{} file(s) of the snapshot could not be restored: {}; the targets were not touched",
            summary.failed.len(),
            summary.failed.join("; ")
        ))
        .into());
    }
    let (database, rev, rewritten) = match (&pg, &my) {
        (_, Some((t, db))) => {
            let dump = dump_in(&scratch.0, MY_DUMP_FILE, id)?;
            let placed = place_artifacts(&scratch.0.join(ARTIFACTS_DIR), &art, &s3_art, overwrite)?;
            match my_load(t, db, &dump, &pairs) {
                Ok(rewritten) => {
                    placed.commit()?;
                    let rows = t.query_in(db, "SELECT version_num FROM alembic_version")?;
                    let rev = first_cell(&rows).unwrap_or_default().to_string();
                    (t.display(), rev, rewritten)
                }
                Err(e) => {
                    placed.rollback();
                    let left = my_drop_tables(t, db).err();
                    return Err(match left {
                        None => e,
                        Some(d) => LabError::failed(format!(
                            "{e:#}; emptying {db} again failed too, drop its tables by hand: {d:#}"
                        ))
                        .into(),
                    });
                }
            }
        }
        (Some(t), _) => {
            let dump = dump_in(&scratch.0, PG_DUMP_FILE, id)?;
            // The artifacts go in first, the database load is one
            // transaction; if it fails the artifacts go back.
            let placed = place_artifacts(&scratch.0.join(ARTIFACTS_DIR), &art, &s3_art, overwrite)?;
            match pg_load(t, &dump, overwrite, &pairs) {
                Ok(rewritten) => {
                    placed.commit()?;
                    let rows = t.query("SELECT version_num FROM alembic_version")?;
                    let rev = first_cell(&rows).unwrap_or_default().to_string();
                    (t.display(), rev, rewritten)
                }
                Err(e) => {
                    placed.rollback();
                    return Err(e);
                }
            }
        }
        (None, None) => {
            let db = sqlite_path(uri).expect("checked");
            let new_db = scratch.0.join(DB_FILE);
            let rewritten = rewrite_uris(&new_db, &pairs)?;
            let rev: String = rusqlite::Connection::open(&new_db)?.query_row(
                "SELECT version_num FROM alembic_version",
                [],
                |r| r.get(0),
            )?;
            // Into place: the database by rename (beside it, then over it),
            // the artifacts by rename of the whole folder.
            let db_parent = db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::create_dir_all(db_parent)?;
            let db_tmp = db_parent.join(format!(
                ".{}.labctl-new",
                db.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("mlflow.db")
            ));
            std::fs::copy(&new_db, &db_tmp)?;
            std::fs::File::open(&db_tmp)?.sync_all()?;
            let placed = place_artifacts(&scratch.0.join(ARTIFACTS_DIR), &art, &s3_art, overwrite)?;
            if let Err(e) = std::fs::rename(&db_tmp, &db) {
                placed.rollback();
                let _ = std::fs::remove_file(&db_tmp);
                return Err(e.into());
            }
            placed.commit()?;
            for side in ["-wal", "-shm", "-journal"] {
                let mut p = db.clone().into_os_string();
                p.push(side);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
            (db.display().to_string(), rev, rewritten)
        }
    };
    Ok(MlflowRestoreReport {
        database,
        artifacts: art,
        alembic_revision: rev,
        rewritten,
        bytes: summary.bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The restored snapshot's database dump `file` in `scratch`.
///
/// # Errors
/// An integrity error when the snapshot has none.
fn dump_in(scratch: &Path, file: &str, id: &Id) -> crate::error::Result<PathBuf> {
    let dump = scratch.join(file);
    if !dump.is_file() {
        return Err(LabError::integrity(format!(
            "snapshot {} has no {file}; nothing was written",
            id.short()
        ))
        .into());
    }
    Ok(dump)
}

/// Artifacts put in place, until the database step says whether they stay.
enum Placed<'a> {
    /// The new directory is in place; the old one (if any) aside.
    Dir {
        target: PathBuf,
        aside: Option<PathBuf>,
    },
    /// Objects uploaded under the prefix: the new keys, and the keys that
    /// were there before and are not in the snapshot (deleted on commit).
    S3 {
        bucket: &'a crate::backend::s3::S3Backend,
        new_keys: Vec<String>,
        stale: Vec<String>,
    },
}

impl Placed<'_> {
    /// The artifacts stay (the old ones are removed).
    fn commit(self) -> crate::error::Result<()> {
        match self {
            Placed::Dir { aside, .. } => {
                if let Some(a) = aside {
                    let _ = std::fs::remove_dir_all(a);
                }
            }
            Placed::S3 { bucket, stale, .. } => {
                use crate::backend::Backend;
                for k in stale {
                    bucket.delete(&k)?;
                }
            }
        }
        Ok(())
    }

    /// The database step failed: the new artifacts go (the old directory
    /// comes back; objects that were replaced stay replaced).
    fn rollback(self) {
        match self {
            Placed::Dir { target, aside } => {
                let _ = std::fs::remove_dir_all(&target);
                if let Some(a) = aside {
                    let _ = std::fs::rename(a, &target);
                }
            }
            Placed::S3 {
                bucket, new_keys, ..
            } => {
                use crate::backend::Backend;
                for k in new_keys {
                    let _ = bucket.delete(&k);
                }
            }
        }
    }
}

/// Puts the restored artifact tree `from` at its target: a directory (the
/// old one renamed aside, the new one renamed in), or the objects of an
/// s3:// root (uploaded; with `overwrite` existing keys replaced).
fn place_artifacts<'a>(
    from: &Path,
    art: &Path,
    s3: &'a Option<(String, crate::backend::s3::S3Backend, Vec<String>)>,
    overwrite: bool,
) -> crate::error::Result<Placed<'a>> {
    match s3 {
        None => {
            let aside = if art.exists() {
                let a = art.with_file_name(format!(
                    ".{}.labctl-old-{:08x}",
                    art.file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("artifacts"),
                    rand::random::<u32>()
                ));
                std::fs::rename(art, &a)?;
                Some(a)
            } else {
                None
            };
            if let Err(e) = std::fs::rename(from, art) {
                if let Some(a) = &aside {
                    let _ = std::fs::rename(a, art);
                }
                return Err(e.into());
            }
            Ok(Placed::Dir {
                target: art.to_path_buf(),
                aside,
            })
        }
        Some((url, bucket, present)) => {
            use crate::backend::Backend;
            let mut files = vec![];
            let mut stack = vec![from.to_path_buf()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d)? {
                    let p = e?.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(from) {
                        files.push((rel.to_string_lossy().into_owned(), p));
                    }
                }
            }
            let mut placed = Placed::S3 {
                bucket,
                new_keys: vec![],
                stale: vec![],
            };
            let mut keep = std::collections::BTreeSet::new();
            for (key, path) in files {
                let data = std::fs::read(&path)?;
                let r = if present.contains(&key) {
                    bucket.put_replacing(&key, data)
                } else {
                    bucket.put(&key, &data).inspect(|()| {
                        if let Placed::S3 { new_keys, .. } = &mut placed {
                            new_keys.push(key.clone());
                        }
                    })
                };
                if let Err(e) = r {
                    placed.rollback();
                    return Err(LabError::storage(format!(
                        "uploading artifact {key} to {url}: {e}{}",
                        if overwrite {
                            "; objects replaced so far stay replaced"
                        } else {
                            "; the objects uploaded so far were deleted"
                        }
                    ))
                    .into());
                }
                keep.insert(key);
            }
            if let Placed::S3 { stale, .. } = &mut placed {
                *stale = present
                    .iter()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
            }
            Ok(placed)
        }
    }
}

/// The base tables of a MySQL database.
fn my_tables(t: &MyTarget, db: &str) -> crate::error::Result<Vec<String>> {
    Ok(t.query_in(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE'",
    )?
    .into_iter()
    .filter_map(|r| r.into_iter().next())
    .collect())
}

/// Drops every table of a MySQL database (a failed load into an empty one).
fn my_drop_tables(t: &MyTarget, db: &str) -> crate::error::Result<()> {
    let tables = my_tables(t, db)?;
    if !tables.is_empty() {
        t.script(
            db,
            &format!(
                "SET FOREIGN_KEY_CHECKS = 0; DROP TABLE IF EXISTS {};",
                tables
                    .iter()
                    .map(|n| my_ident(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )?;
    }
    Ok(())
}

/// Loads a `mysqldump` of one database into `db` (empty), then rewrites
/// artifact roots in every text column of every table, at path boundaries
/// and compared byte for byte (MySQL's default collations would take
/// `/SRV` for `/srv`). Returns `table.column` → values rewritten.
fn my_load(
    t: &MyTarget,
    db: &str,
    dump: &Path,
    pairs: &[(String, String)],
) -> crate::error::Result<BTreeMap<String, usize>> {
    use std::process::Stdio;
    let (mut cmd, _file) = t.command("mysql")?.into_parts();
    let out = cmd
        .args(["--batch", "--default-character-set=utf8mb4"])
        .arg(db)
        .stdin(std::fs::File::open(dump)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LabError::failed(format!("running mysql: {e}")))?;
    if !out.status.success() {
        return Err(t
            .classify("mysql", &String::from_utf8_lossy(&out.stderr))
            .into());
    }
    if pairs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let cols = t.query_in(
        db,
        "SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name WHERE c.table_schema = DATABASE() AND t.table_type = 'BASE TABLE' AND c.data_type IN ('char', 'varchar', 'tinytext', 'text', 'mediumtext', 'longtext')",
    )?;
    let lit = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"));
    let mut sql = String::new();
    for r in &cols {
        let (Some(table), Some(col)) = (r.first(), r.get(1)) else {
            continue;
        };
        let (tq, c) = (my_ident(table), my_ident(col));
        for (old, new) in pairs {
            let (o, n) = (lit(old), lit(new));
            sql.push_str(&format!(
                "UPDATE {tq} SET {c} = CONCAT({n}, SUBSTRING({c}, CHAR_LENGTH({o}) + 1)) WHERE BINARY {c} = BINARY {o} OR BINARY LEFT({c}, CHAR_LENGTH({o}) + 1) = BINARY CONCAT({o}, '/');\nSELECT {}, ROW_COUNT();\n",
                lit(&format!("{table}.{col}"))
            ));
        }
    }
    let mut rewritten = BTreeMap::new();
    for r in t.script(db, &sql)? {
        if let (Some(k), Some(n)) = (r.first(), r.get(1).and_then(|n| n.parse::<usize>().ok())) {
            if n > 0 {
                *rewritten.entry(k.clone()).or_default() += n;
            }
        }
    }
    Ok(rewritten)
}

/// Tables in a PostgreSQL database's own schemas.
fn pg_table_count(t: &PgTarget) -> crate::error::Result<u64> {
    let r = t.query(
        "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'",
    )?;
    Ok(first_cell(&r).and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The `DO` block that rewrites artifact roots (`pairs` of OLD, NEW) in
/// every text column of every table, at path boundaries, and reports each
/// column's count as a `labctl-rewrote TABLE.COLUMN N` notice (the dump's
/// script sets `client_min_messages = warning`: notices are turned back on).
fn pg_rewrite_sql(pairs: &[(String, String)]) -> String {
    use crate::util::dbclient::literal;
    let arr = pairs
        .iter()
        .map(|(o, n)| format!("ARRAY[{}, {}]", literal(o), literal(n)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
SET client_min_messages = notice;
DO $labctl$
DECLARE r record; n bigint; pair text[]; pairs text[] := ARRAY[{arr}]::text[];
BEGIN
  FOR r IN SELECT c.table_schema, c.table_name, c.column_name
           FROM information_schema.columns c JOIN information_schema.tables t
             ON t.table_schema = c.table_schema AND t.table_name = c.table_name
           WHERE t.table_type = 'BASE TABLE'
             AND c.table_schema NOT IN ('pg_catalog', 'information_schema')
             AND c.data_type IN ('text', 'character varying', 'character')
  LOOP
    FOREACH pair SLICE 1 IN ARRAY pairs LOOP
      EXECUTE format('UPDATE %I.%I SET %I = $2 || substr(%I, length($1) + 1) WHERE %I = $1 OR left(%I, length($1) + 1) = $1 || chr(47)',
                     r.table_schema, r.table_name, r.column_name, r.column_name, r.column_name, r.column_name)
        USING pair[1], pair[2];
      GET DIAGNOSTICS n = ROW_COUNT;
      IF n > 0 THEN RAISE NOTICE 'labctl-rewrote %.% %', r.table_name, r.column_name, n; END IF;
    END LOOP;
  END LOOP;
END
$labctl$;
"#
    )
}

/// Loads a `pg_dump --format=custom` file into `t` and rewrites artifact
/// URIs, in one transaction: `pg_restore -f -` (the dump as SQL, owners
/// and grants left out: the staging role owns what it loads; with `clean`
/// the dump's objects are dropped first) piped into `psql
/// --single-transaction`, followed by [`pg_rewrite_sql`].
fn pg_load(
    t: &PgTarget,
    dump: &Path,
    clean: bool,
    pairs: &[(String, String)],
) -> crate::error::Result<BTreeMap<String, usize>> {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut psql = t
        .command("psql")?
        .args(["-X", "-w", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::failed(format!("running psql: {e}")))?;
    let mut perr = psql.stderr.take().expect("piped");
    let perr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = perr.read_to_string(&mut s);
        s
    });
    let mut restore = t.command("pg_restore")?;
    restore.args(["--no-owner", "--no-privileges", "-f", "-"]);
    if clean {
        restore.args(["--clean", "--if-exists"]);
    }
    let mut restore = restore
        .arg(dump)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::failed(format!("running pg_restore: {e}")))?;
    let mut rerr = restore.stderr.take().expect("piped");
    let rerr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = rerr.read_to_string(&mut s);
        s
    });
    let mut stdin = psql.stdin.take().expect("piped");
    let mut out = restore.stdout.take().expect("piped");
    let copied = std::io::copy(&mut out, &mut stdin);
    drop(out);
    let rstatus = restore.wait()?;
    let rerr = rerr.join().unwrap_or_default();
    if !rstatus.success() || copied.is_err() {
        // Ending psql before its input's end rolls the transaction back.
        let _ = psql.kill();
        let _ = psql.wait();
        if !rstatus.success() {
            return Err(t.classify("pg_restore", &rerr).into());
        }
        let perr = perr.join().unwrap_or_default();
        return Err(t.classify("psql", &perr).into());
    }
    if !pairs.is_empty() {
        // A write error means psql has stopped: its status and stderr say why.
        let _ = stdin.write_all(pg_rewrite_sql(pairs).as_bytes());
    }
    drop(stdin);
    let status = psql.wait()?;
    let perr = perr.join().unwrap_or_default();
    if !status.success() {
        return Err(t.classify("psql", &perr).into());
    }
    let mut rewritten = BTreeMap::new();
    for l in perr.lines() {
        if let Some(rest) = l.split("labctl-rewrote ").nth(1) {
            if let Some((col, n)) = rest.trim().rsplit_once(' ') {
                *rewritten.entry(col.to_string()).or_default() += n.parse::<usize>().unwrap_or(0);
            }
        }
    }
    Ok(rewritten)
}

fn absolute(p: &Path) -> crate::error::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Rewrites every text value starting with an OLD root (whole path
/// components) to its NEW root, in every text column of every table.
fn rewrite_uris(
    db: &Path,
    pairs: &[(String, String)],
) -> crate::error::Result<BTreeMap<String, usize>> {
    let mut c = rusqlite::Connection::open(db)?;
    let tx = c.transaction()?;
    let mut out = BTreeMap::new();
    let tables: Vec<String> = {
        let mut st = tx.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?;
        let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        v
    };
    for t in tables {
        let cols: Vec<(String, String)> = {
            let mut st = tx.prepare(&format!(
                "PRAGMA table_info(\"{}\")",
                t.replace('"', "\"\"")
            ))?;
            let v = st
                .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
                .collect::<Result<_, _>>()?;
            v
        };
        for (col, ty) in cols {
            let ty = ty.to_ascii_uppercase();
            if !(ty.contains("CHAR") || ty.contains("TEXT") || ty.contains("CLOB")) {
                continue;
            }
            for (old, new) in pairs {
                // substr is 1-based: keep what follows the old root.
                let sql = format!(
                    "UPDATE \"{t}\" SET \"{col}\" = ?2 || substr(\"{col}\", length(?1) + 1) WHERE \"{col}\" = ?1 OR substr(\"{col}\", 1, length(?1) + 1) = ?1 || '/'",
                    t = t.replace('"', "\"\""),
                    col = col.replace('"', "\"\"")
                );
                let n = tx.execute(&sql, rusqlite::params![old, new])?;
                if n > 0 {
                    *out.entry(format!("{t}.{col}")).or_default() += n;
                }
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

/// The number of `key` items over every page of a GET search endpoint
/// (`max_results` per page, `next_page_token` to go on).
async fn count_pages(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    max: &str,
) -> crate::error::Result<u64> {
    let mut n = 0u64;
    let mut token: Option<String> = None;
    loop {
        let mut q = vec![("max_results".to_string(), max.to_string())];
        if let Some(t) = &token {
            q.push(("page_token".into(), t.clone()));
        }
        let r: Value = http
            .get(url)
            .query(&q)
            .send()
            .await
            .map_err(|e| LabError::failed(format!("{url} did not answer: {e}")))?
            .json()
            .await?;
        n += r[key].as_array().map_or(0, |a| a.len()) as u64;
        token = r["next_page_token"].as_str().map(String::from);
        if token.is_none() {
            return Ok(n);
        }
    }
}

/// What verification through the REST API found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MlflowVerify {
    pub experiments: u64,
    pub runs: u64,
    pub registered_models: u64,
    pub model_versions: u64,
    pub metric_histories: usize,
    pub artifacts: usize,
    pub server_version: String,
    pub seconds: f64,
}

/// Checks a server started on the restored store against the snapshot's
/// facts: counts, sampled runs' metric histories, and sampled artifacts
/// byte for byte (against the snapshot's own files).
///
/// # Errors
/// An integrity error naming each difference; an unreachable server.
pub fn verify(
    repo: &Repository,
    id: &Id,
    tracking_uri: &str,
    threads: usize,
) -> crate::error::Result<MlflowVerify> {
    let started = Instant::now();
    let (snap, _) = repo.load_snapshot(id)?;
    let counts = snap.facts.get("mlflow.counts").cloned().unwrap_or_default();
    let sample = snap.facts.get("mlflow.sample").cloned().unwrap_or_default();
    let base = tracking_uri.trim_end_matches('/').to_string();
    // The sampled artifacts' bytes, from the snapshot itself.
    let mut expected_files = vec![];
    for s in sample.as_array().into_iter().flatten() {
        for f in s["artifacts"].as_array().into_iter().flatten() {
            let run = s["run_id"].as_str().unwrap_or("");
            let exp = s["experiment_id"].as_str().unwrap_or("");
            let rel = f.as_str().unwrap_or("");
            let path = format!("{ARTIFACTS_DIR}/{exp}/{run}/artifacts/{rel}");
            let mut bytes = vec![];
            if extract::restore_to_writer(repo, id, Some(&path), &mut bytes, threads).is_ok() {
                expected_files.push((run.to_string(), rel.to_string(), bytes));
            }
        }
    }
    let mut v = MlflowVerify::default();
    let mut problems = vec![];
    runtime()?.block_on(async {
        let http = client()?;
        let unreachable = |e: reqwest::Error| -> crate::error::Error {
            LabError::failed(format!("the MLflow server {base} did not answer: {e}")).into()
        };
        v.server_version = http.get(format!("{base}/version")).send().await.map_err(unreachable)?.text().await.unwrap_or_default();
        // Experiments (every lifecycle stage), with paging.
        let mut exp_ids = vec![];
        let mut token: Option<String> = None;
        loop {
            let mut body = json!({"max_results": 1000, "view_type": "ALL"});
            if let Some(t) = &token {
                body["page_token"] = json!(t);
            }
            let r: Value = http.post(format!("{base}/api/2.0/mlflow/experiments/search")).json(&body).send().await.map_err(unreachable)?.json().await?;
            for e in r["experiments"].as_array().into_iter().flatten() {
                exp_ids.push(e["experiment_id"].as_str().unwrap_or("").to_string());
            }
            token = r["next_page_token"].as_str().map(String::from);
            if token.is_none() {
                break;
            }
        }
        v.experiments = exp_ids.len() as u64;
        for chunk in exp_ids.chunks(100) {
            let mut token: Option<String> = None;
            loop {
                let mut body = json!({"experiment_ids": chunk, "max_results": 1000, "run_view_type": "ALL"});
                if let Some(t) = &token {
                    body["page_token"] = json!(t);
                }
                let r: Value = http.post(format!("{base}/api/2.0/mlflow/runs/search")).json(&body).send().await.map_err(unreachable)?.json().await?;
                v.runs += r["runs"].as_array().map_or(0, |a| a.len()) as u64;
                token = r["next_page_token"].as_str().map(String::from);
                if token.is_none() {
                    break;
                }
            }
        }
        v.registered_models = count_pages(
            &http,
            &format!("{base}/api/2.0/mlflow/registered-models/search"),
            "registered_models",
            "1000",
        )
        .await?;
        v.model_versions = count_pages(
            &http,
            &format!("{base}/api/2.0/mlflow/model-versions/search"),
            "model_versions",
            "10000",
        )
        .await?;
        for s in sample.as_array().into_iter().flatten() {
            let run = s["run_id"].as_str().unwrap_or("");
            for (key, n) in s["metrics"].as_object().into_iter().flatten() {
                let r: Value = http
                    .get(format!("{base}/api/2.0/mlflow/metrics/get-history"))
                    .query(&[("run_id", run), ("metric_key", key.as_str()), ("max_results", "25000")])
                    .send()
                    .await
                    .map_err(unreachable)?
                    .json()
                    .await?;
                let got = r["metrics"].as_array().map_or(0, |a| a.len()) as u64;
                if Some(got) != n.as_u64() {
                    problems.push(format!("run {run} metric {key}: {got} points through the API, {n} backed up"));
                }
                v.metric_histories += 1;
            }
        }
        for (run, rel, want) in &expected_files {
            let r = http
                .get(format!("{base}/get-artifact"))
                .query(&[("path", rel.as_str()), ("run_uuid", run.as_str())])
                .send()
                .await
                .map_err(unreachable)?;
            let ok = r.status().is_success();
            let got = r.bytes().await?;
            if !ok || got.as_ref() != want.as_slice() {
                problems.push(format!("run {run} artifact {rel}: not what was backed up ({} bytes through the API, {} backed up)", got.len(), want.len()));
            }
            v.artifacts += 1;
        }
        Ok::<_, crate::error::Error>(())
    })?;
    for (name, got) in [
        ("experiments", v.experiments),
        ("runs", v.runs),
        ("registered_models", v.registered_models),
        ("model_versions", v.model_versions),
    ] {
        // A MySQL store's counts before and after its dump bound what the
        // dump holds.
        let want = counts[name].as_u64().unwrap_or(0);
        let then = snap
            .facts
            .get("mlflow.counts_after")
            .and_then(|a| a[name].as_u64())
            .unwrap_or(want);
        let (lo, hi) = (want.min(then), want.max(then));
        if got < lo || got > hi {
            problems.push(if lo == hi {
                format!("{name}: {got} through the API, {want} backed up")
            } else {
                format!("{name}: {got} through the API, {lo} to {hi} backed up")
            });
        }
    }
    if !problems.is_empty() {
        return Err(LabError::integrity(format!(
            "the restored MLflow store at {base} differs from the backup: {}",
            problems.join("; ")
        ))
        .into());
    }
    v.seconds = started.elapsed().as_secs_f64();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_rewritten_at_path_boundaries_in_every_text_column() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("m.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE experiments (experiment_id INTEGER, artifact_location VARCHAR(256));
             CREATE TABLE logged_models (id TEXT, artifact_location TEXT, n INTEGER);
             INSERT INTO experiments VALUES (1, '/srv/art/1'), (2, '/srv/art'), (3, '/srv/artifacts-other/3'), (4, 'file:///srv/art/4');
             INSERT INTO logged_models VALUES ('m', '/srv/art/1/models/m', 5);",
        )
        .unwrap();
        drop(c);
        let n = rewrite_uris(
            &db,
            &[
                ("file:///srv/art".into(), "file:///stage/art".into()),
                ("/srv/art".into(), "/stage/art".into()),
            ],
        )
        .unwrap();
        assert_eq!(n["experiments.artifact_location"], 3);
        assert_eq!(n["logged_models.artifact_location"], 1);
        let c = rusqlite::Connection::open(&db).unwrap();
        let got: Vec<String> = c
            .prepare("SELECT artifact_location FROM experiments ORDER BY experiment_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            [
                "/stage/art/1",
                "/stage/art",
                "/srv/artifacts-other/3",
                "file:///stage/art/4"
            ]
        );
    }

    #[test]
    fn other_backends_and_passwords_in_uris_are_refused_saying_what_to_do() {
        let mut s = MlflowSource {
            backend_store_uri: "mongodb://mlflow:secret@db/mlflow".into(),
            artifacts: "/srv/a".into(),
            tracking_uri: None,
            password_file: None,
            s3_endpoint: None,
            s3_credentials_file: None,
        };
        let (_, why) = s.validate(true).unwrap_err();
        assert!(
            why.contains("not an MLflow backend store URI") && !why.contains("secret"),
            "{why}"
        );
        for uri in [
            "postgresql://mlflow:secret@db/mlflow",
            "mysql://mlflow:secret@db/mlflow",
        ] {
            s.backend_store_uri = uri.into();
            let (field, why) = s.validate(true).unwrap_err();
            assert!(
                field == "backend_store_uri"
                    && why.contains("password file")
                    && !why.contains("secret"),
                "{why}"
            );
        }
        s.backend_store_uri = "mysql://mlflow@db:3306".into();
        assert!(s
            .validate(true)
            .unwrap_err()
            .1
            .contains("names no database"));
        s.backend_store_uri = "mysql://mlflow@db:3306/mlflow".into();
        s.validate(true).unwrap();
        s.backend_store_uri = "postgresql://mlflow@db/mlflow".into();
        s.validate(true).unwrap();
        s.password_file = Some("pw".into());
        assert_eq!(s.validate(true).unwrap_err().0, "password_file");
        s.backend_store_uri = "sqlite:////srv/m.db".into();
        assert_eq!(s.validate(true).unwrap_err().0, "password_file");
        s.password_file = None;
        s.artifacts = "s3://mlflow/artifacts".into();
        s.validate(true).unwrap();
        s.artifacts = "s3://AKIA:secret@mlflow".into();
        let (field, why) = s.validate(true).unwrap_err();
        assert!(field == "artifacts" && !why.contains("secret"), "{why}");
        s.artifacts = "/srv/a".into();
        s.s3_endpoint = Some("http://minio:9000".into());
        assert_eq!(s.validate(true).unwrap_err().0, "s3_endpoint");
    }

    #[test]
    fn the_postgresql_rewrite_quotes_roots_and_keeps_path_boundaries() {
        let sql = pg_rewrite_sql(&[("/srv/o'art".into(), "/stage/art".into())]);
        assert!(
            sql.contains("ARRAY[ARRAY['/srv/o''art', '/stage/art']]"),
            "{sql}"
        );
        assert!(sql.contains("$1 || chr(47)"), "{sql}");
    }
}
