//! The `kubeflow-pipelines` source: Kubeflow Pipelines' metadata — its
//! MySQL databases (`mlpipeline`, `metadb` for ML Metadata, `cachedb`) and
//! its object store bucket (`mlpipeline` in the in-cluster MinIO) — as one
//! snapshot: `mysql/kfp.sql`, one `mysqldump --single-transaction
//! --databases ...` of all of them (one consistent snapshot across the
//! databases), taken first, then `bucket/<key>`, every object of the
//! bucket listed after the dump, so the bucket is a superset of what the
//! databases name. With `quiesce`, the `ml-pipeline` API server and the
//! persistence agent in `kubeflow` are scaled to 0 for the dump and back to
//! their replica counts afterwards, also when the backup fails.
//!
//! The facts record the row count of every table (read in one consistent
//! snapshot before the dump and again after it: equal when nothing wrote,
//! else the restore is checked against the range), the object count and
//! bytes, and a sample of objects that a restore reads back.
//!
//! Restore loads the dump into scratch databases beside the targets on the
//! staging server, checks the row counts there, uploads the objects into
//! the staging bucket, and only then moves every table into the target
//! databases with one `RENAME TABLE` (atomic in MySQL/MariaDB); a failure
//! before that drops the scratch databases and deletes what was uploaded.
//!
//! Contract (PLATFORM.md, Kubeflow Pipelines; KFP 2.0.3 as Kubeflow 1.8
//! ships it): databases `mlpipeline` (tables `pipelines`,
//! `pipeline_versions`, `experiments`, `run_details`, `jobs`, `tasks`, ...,
//! gorm-made), `metadb` (ML Metadata's `Artifact`, `Execution`, `Context`,
//! ...), `cachedb` (`execution_caches`); deployments `ml-pipeline` and
//! `ml-pipeline-persistenceagent` in `kubeflow`, scaled through
//! `deployments/scale` (autoscaling/v1 Scale).

use super::SourceContext;
use crate::backend::Backend;
use crate::error::LabError;
use crate::repo::backup::{BackupOutcome, BackupRun};
use crate::repo::chunker::ChunkerKind;
use crate::repo::snapshot::Source;
use crate::repo::tree::NodeType;
use crate::repo::{Id, Repository};
use crate::util::dbclient::{literal, my_ident, MyTarget};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The snapshot's `source.kind`.
pub const KIND: &str = "kubeflow-pipelines";
/// The databases' dump in the snapshot.
pub const DUMP_FILE: &str = "mysql/kfp.sql";
/// The bucket's objects in the snapshot.
pub const BUCKET_DIR: &str = "bucket";
/// The namespace and deployments `quiesce` scales down.
pub const KFP_NAMESPACE: &str = "kubeflow";
pub const QUIESCED: [&str; 2] = ["ml-pipeline", "ml-pipeline-persistenceagent"];
/// Objects sampled for verification.
const SAMPLE_OBJECTS: usize = 5;
/// Tables the reports name (the issue's "pipelines, versions, runs,
/// experiments, MLMD executions/artifacts/contexts").
pub const KEY_TABLES: [&str; 7] = [
    "mlpipeline.pipelines",
    "mlpipeline.pipeline_versions",
    "mlpipeline.run_details",
    "mlpipeline.experiments",
    "metadb.Execution",
    "metadb.Artifact",
    "metadb.Context",
];

fn default_databases() -> Vec<String> {
    ["mlpipeline", "metadb", "cachedb"]
        .map(String::from)
        .to_vec()
}

/// `labctl backup kubeflow-pipelines` / `{ source = "kubeflow-pipelines",
/// mysql = "mysql://root@mysql.kubeflow:3306", bucket = "s3://mlpipeline", ... }`.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KfpSource {
    /// KFP's MySQL server: `mysql://user@host:3306` (no password in the
    /// URI: see --password-file).
    #[arg(long, value_name = "URI")]
    pub mysql: String,
    /// A file (mode 0600) holding the MySQL password (else the client's
    /// own ~/.my.cnf).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The databases, dumped in one transaction.
    #[arg(
        long,
        value_name = "DB,..",
        value_delimiter = ',',
        default_value = "mlpipeline,metadb,cachedb"
    )]
    #[serde(default = "default_databases")]
    pub databases: Vec<String>,
    /// The pipelines' bucket: `s3://mlpipeline` (or `s3://bucket/prefix`).
    #[arg(long, value_name = "S3URL")]
    pub bucket: String,
    /// The bucket's S3 endpoint, such as KFP's MinIO
    /// (`http://minio-service.kubeflow:9000`); default: AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    /// An AWS shared-credentials file (0600) with the bucket's keys (KFP's
    /// `mlpipeline-minio-artifact` Secret); with --s3-endpoint it is used
    /// alone, not the environment's keys.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub s3_credentials_file: Option<PathBuf>,
    /// Scale `ml-pipeline` and `ml-pipeline-persistenceagent` in
    /// `kubeflow` to 0 for the dump (through the Kubernetes API) and back
    /// to their replica counts afterwards, also when the backup fails.
    #[arg(long)]
    #[serde(default)]
    pub quiesce: bool,
    /// Kubeconfig for --quiesce (default: labctl.toml's [platform],
    /// $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context for --quiesce.
    #[arg(long)]
    #[serde(default)]
    pub context: Option<String>,
}

fn check_db_name(field: &str, d: &str) -> Result<(), (String, String)> {
    if d.is_empty()
        || d.len() > 40
        || !d
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err((
            field.into(),
            format!("'{d}' is not a database name labctl restores (letters, digits, _ and -, at most 40)"),
        ));
    }
    Ok(())
}

impl KfpSource {
    /// The URIs parse and name no password; databases are plain names.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, from_config: bool) -> Result<(), (String, String)> {
        MyTarget::parse(&self.mysql, None)
            .map_err(|e| ("mysql".to_string(), e.message().to_string()))?;
        super::bucket::check_bucket_url("bucket", &self.bucket)?;
        if self.databases.is_empty() {
            return Err(("databases".into(), "name at least one database".into()));
        }
        for d in &self.databases {
            check_db_name("databases", d)?;
        }
        for (field, p) in [
            ("password_file", &self.password_file),
            ("s3_credentials_file", &self.s3_credentials_file),
            ("kubeconfig", &self.kubeconfig),
        ] {
            if from_config && p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err((field.into(), "use an absolute path".into()));
            }
        }
        Ok(())
    }

    /// The client programs are here.
    ///
    /// # Errors
    /// A usage error naming the package.
    pub fn check_host(&self) -> Result<(), LabError> {
        let t = MyTarget::parse(&self.mysql, self.password_file.as_deref())?;
        t.command("mysql")?;
        t.command("mysqldump")?;
        Ok(())
    }

    /// The source in words.
    pub fn what(&self) -> String {
        format!(
            "{} + {}",
            MyTarget::parse(&self.mysql, None)
                .map(|t| t.display())
                .unwrap_or_else(|_| crate::util::redact_url(&self.mysql)),
            self.bucket
        )
    }

    /// Fills the cluster from labctl.toml's `[platform]` when the table
    /// names none.
    pub fn with_default_target(&self, t: &crate::k8s::KubeTarget) -> KfpSource {
        let mine = crate::k8s::KubeTarget {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
        .or(t);
        KfpSource {
            kubeconfig: mine.kubeconfig,
            context: mine.context,
            ..self.clone()
        }
    }

    /// Dumps the databases (quiesced if asked), then reads the bucket, into
    /// one snapshot.
    ///
    /// # Errors
    /// A refused login (exit 5), an unreachable server, a failing dump, a
    /// missing bucket or database (nothing is committed); objects that
    /// cannot be read are in the snapshot's errors (exit 3).
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        let started = Instant::now();
        let t = MyTarget::parse(&self.mysql, self.password_file.as_deref())?;
        t.command("mysql")?;
        t.command("mysqldump")?;
        let bucket =
            super::bucket::open(&self.bucket, &self.s3_endpoint, &self.s3_credentials_file)?;
        let tables = tables_of(&t, &self.databases)?;
        for d in &self.databases {
            if !tables.iter().any(|(db, _)| db == d) && !database_exists(&t, d)? {
                return Err(LabError::usage(format!(
                    "database {d} does not exist on {}",
                    t.display()
                ))
                .into());
            }
        }
        // The pipelines stopped (if asked) from before the counts to after
        // the dump; they come back whatever happens.
        let quiesced = if self.quiesce {
            Some(Quiesce::start(&crate::k8s::KubeTarget {
                kubeconfig: self.kubeconfig.clone(),
                context: self.context.clone(),
            })?)
        } else {
            None
        };
        let before = count_rows(&t, &tables)?;
        let mut run = BackupRun::start(ctx.repo, ctx.opts.threads, ctx.progress)?;
        run.set_cancel(ctx.opts.cancel.clone());
        let mut dump = t.command("mysqldump")?.into_parts();
        dump.0.args([
            "--single-transaction",
            "--quick",
            "--skip-lock-tables",
            "--no-tablespaces",
            "--hex-blob",
            "--routines",
            "--triggers",
            "--default-character-set=utf8mb4",
            "--databases",
        ]);
        dump.0.args(&self.databases);
        let cancel = ctx.opts.cancel.clone().unwrap_or_default();
        let reader = super::stream::CommandReader::from_command(dump.0, "mysqldump", &cancel)?;
        let before_bytes = run.summary_mut().bytes_read;
        let content = run
            .add_stream(reader, ChunkerKind::Cdc, "KFP databases")
            .map_err(|e| -> crate::error::Error {
                if e.downcast_ref::<crate::error::Cancelled>().is_some() {
                    e
                } else {
                    t.classify("mysqldump", &e.to_string()).into()
                }
            })?;
        drop(dump.1);
        let dump_size = run.summary_mut().bytes_read - before_bytes;
        let after = count_rows(&t, &tables)?;
        let quiesce_fact = quiesced.map(Quiesce::finish).transpose()?;
        run.check_cancel()?;

        // The bucket, listed after the dump.
        let mut objects = vec![];
        bucket.list("", &mut |o| objects.push((o.name, o.size)))?;
        objects.sort();
        let mtime = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let mut root = super::Folder::default();
        root.insert(
            &DUMP_FILE.split('/').map(String::from).collect::<Vec<_>>(),
            super::Leaf::Stored {
                size: dump_size,
                content,
            },
        );
        let (mut stored, mut bytes) = (0u64, 0u64);
        let mut sample = vec![];
        let mut skipped = vec![];
        for (i, (key, size)) in objects.iter().enumerate() {
            run.check_cancel()?;
            let parts: Vec<String> = key.split('/').map(String::from).collect();
            if parts.iter().any(|p| p.is_empty() || p == "." || p == "..") {
                skipped.push(format!(
                    "{key}: an object key that is not a path (empty, . or .. part)"
                ));
                continue;
            }
            let content = match super::bucket::stream_object(&mut run, &bucket, key) {
                Ok(c) => c,
                Err(e) if e.downcast_ref::<crate::error::Cancelled>().is_some() => return Err(e),
                Err(e) => {
                    skipped.push(format!("{key}: {e}"));
                    continue;
                }
            };
            let mut path = vec![BUCKET_DIR.to_string()];
            path.extend(parts);
            root.insert(
                &path,
                super::Leaf::Stored {
                    size: *size,
                    content,
                },
            );
            stored += 1;
            bytes += size;
            // An even spread of the objects, for verification.
            let step = (objects.len() / SAMPLE_OBJECTS).max(1);
            if i % step == 0 && sample.len() < SAMPLE_OBJECTS {
                sample.push(json!({"key": key, "size": size}));
            }
        }
        let root_ids = root.store(&mut run, mtime)?;
        for s in &skipped {
            run.summary_mut().errors.push(s.clone());
        }
        let total = run.summary_mut().bytes_read;
        run.summary_mut().bytes_total = total;
        let mut opts = ctx.opts.clone();
        let counts: BTreeMap<String, u64> = before.clone();
        opts.facts.insert("kfp.mysql".into(), json!(t.display()));
        opts.facts
            .insert("kfp.databases".into(), json!(self.databases));
        opts.facts.insert("kfp.counts".into(), json!(counts));
        if after != before {
            opts.facts.insert("kfp.counts_after".into(), json!(after));
        }
        opts.facts.insert("kfp.bucket".into(), json!(self.bucket));
        opts.facts.insert(
            "kfp.objects".into(),
            json!({"count": stored, "bytes": bytes}),
        );
        opts.facts.insert("kfp.sample".into(), Value::Array(sample));
        if let Some(q) = quiesce_fact {
            opts.facts.insert("kfp.quiesced".into(), q);
        }
        run.finish(
            Source {
                kind: KIND.into(),
                name: self.what(),
            },
            root_ids,
            &opts,
            started,
        )
    }
}

/// `(database, table)` of every base table in `dbs`.
fn tables_of(t: &MyTarget, dbs: &[String]) -> crate::error::Result<Vec<(String, String)>> {
    let list = dbs
        .iter()
        .map(|d| literal(d))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = t.query(&format!(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN ({list}) AND table_type = 'BASE TABLE' ORDER BY table_schema, table_name"
    ))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.clone())))
        .collect())
}

fn database_exists(t: &MyTarget, d: &str) -> crate::error::Result<bool> {
    Ok(!t
        .query(&format!(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name = {}",
            literal(d)
        ))?
        .is_empty())
}

/// Row counts of `tables`, read in one consistent snapshot.
fn count_rows(
    t: &MyTarget,
    tables: &[(String, String)],
) -> crate::error::Result<BTreeMap<String, u64>> {
    if tables.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut sql = String::from("START TRANSACTION WITH CONSISTENT SNAPSHOT;");
    for (d, n) in tables {
        sql.push_str(&format!(
            " SELECT {}, COUNT(*) FROM {}.{};",
            literal(&format!("{d}.{n}")),
            my_ident(d),
            my_ident(n)
        ));
    }
    sql.push_str(" COMMIT;");
    Ok(t.query(&sql)?
        .into_iter()
        .filter_map(|r| Some((r.first()?.clone(), r.get(1)?.parse().ok()?)))
        .collect())
}

/// KFP's API server and persistence agent scaled to 0; [`Quiesce::finish`]
/// (or dropping it, when the backup fails) scales them back.
struct Quiesce {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    previous: Vec<(String, i32)>,
    restored: bool,
}

fn quiesce_wait() -> Duration {
    Duration::from_secs(
        std::env::var("LABCTL_QUIESCE_WAIT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    )
}

impl Quiesce {
    fn start(target: &crate::k8s::KubeTarget) -> crate::error::Result<Quiesce> {
        use k8s_openapi::api::apps::v1::Deployment;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (client, _) = rt.block_on(target.connect())?;
        let mut q = Quiesce {
            rt,
            client,
            previous: vec![],
            restored: false,
        };
        let api: kube::Api<Deployment> = kube::Api::namespaced(q.client.clone(), KFP_NAMESPACE);
        for name in QUIESCED {
            let scale = q.rt.block_on(api.get_scale(name)).map_err(|e| {
                kube_error(
                    &format!("reading the scale of deployment {KFP_NAMESPACE}/{name}"),
                    e,
                )
            })?;
            let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(1);
            q.set(name, 0)?;
            q.previous.push((name.to_string(), replicas));
        }
        // Wait for their pods to be gone (the Deployment's status).
        let end = Instant::now() + quiesce_wait();
        for name in QUIESCED {
            loop {
                let d = q.rt.block_on(api.get(name)).map_err(|e| {
                    kube_error(&format!("reading deployment {KFP_NAMESPACE}/{name}"), e)
                })?;
                let live = d.status.and_then(|s| s.replicas).unwrap_or(0);
                if live == 0 {
                    break;
                }
                if Instant::now() > end {
                    return Err(LabError::failed(format!(
                        "deployment {KFP_NAMESPACE}/{name} still has {live} pod(s) after {} s of being scaled to 0 (LABCTL_QUIESCE_WAIT_SECS); the pipelines were scaled back and nothing was dumped",
                        quiesce_wait().as_secs()
                    ))
                    .into());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(q)
    }

    fn set(&self, name: &str, replicas: i32) -> crate::error::Result<()> {
        use k8s_openapi::api::apps::v1::Deployment;
        let api: kube::Api<Deployment> = kube::Api::namespaced(self.client.clone(), KFP_NAMESPACE);
        self.rt
            .block_on(api.patch_scale(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"spec": {"replicas": replicas}})),
            ))
            .map_err(|e| {
                kube_error(
                    &format!("scaling deployment {KFP_NAMESPACE}/{name} to {replicas}"),
                    e,
                )
            })?;
        Ok(())
    }

    fn scale_back(&mut self) -> crate::error::Result<()> {
        self.restored = true;
        let mut failed = vec![];
        for (name, n) in &self.previous {
            if let Err(e) = self.set(name, *n) {
                failed.push(e.to_string());
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(LabError::failed(format!(
                "scaling the pipelines back failed, scale them by hand: {}",
                failed.join("; ")
            ))
            .into())
        }
    }

    /// Scales back; what was quiesced, as a fact.
    fn finish(mut self) -> crate::error::Result<Value> {
        self.scale_back()?;
        Ok(json!(self
            .previous
            .iter()
            .map(|(n, r)| (format!("{KFP_NAMESPACE}/{n}"), *r))
            .collect::<BTreeMap<_, _>>()))
    }
}

impl Drop for Quiesce {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self.scale_back() {
                eprintln!("labctl: {e}");
            }
        }
    }
}

fn kube_error(what: &str, e: kube::Error) -> crate::error::Error {
    match e {
        kube::Error::Api(ae) if ae.code == 403 => LabError::key(format!(
            "{what}: forbidden by RBAC (403): {}; --quiesce needs get and patch on deployments/scale and get on deployments in {KFP_NAMESPACE} (deploy/kubernetes/labctl-backup-rbac.yaml)",
            ae.message
        ))
        .into(),
        kube::Error::Api(ae) if ae.code == 404 => LabError::usage(format!(
            "{what}: not found ({}); is Kubeflow Pipelines installed in {KFP_NAMESPACE}?",
            ae.message
        ))
        .into(),
        other => LabError::failed(format!("{what}: {other}")).into(),
    }
}

// ---------------------------------------------------------------- restore

/// `labctl restore SNAP --kfp-mysql URI --kfp-bucket S3URL`.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Kubeflow Pipelines (kubeflow-pipelines snapshots)")]
pub struct KfpRestore {
    /// Restore a kubeflow-pipelines snapshot's databases into this MySQL
    /// server (`mysql://user@host:3306`; the user creates and drops
    /// databases: the dump is loaded into scratch ones first). Databases
    /// with tables are refused unless --overwrite.
    #[arg(long, value_name = "URI", requires = "kfp_bucket")]
    pub kfp_mysql: Option<String>,
    /// A file (mode 0600) with that server's password.
    #[arg(long, value_name = "FILE", requires = "kfp_mysql")]
    pub kfp_password_file: Option<PathBuf>,
    /// Restore the bucket's objects into this bucket (`s3://bucket`; must
    /// be empty unless --overwrite).
    #[arg(long, value_name = "S3URL", requires = "kfp_mysql")]
    pub kfp_bucket: Option<String>,
    /// That bucket's S3 endpoint (default: AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL", requires = "kfp_mysql")]
    pub kfp_s3_endpoint: Option<String>,
    /// An AWS shared-credentials file (0600) for that bucket.
    #[arg(long, value_name = "FILE", requires = "kfp_mysql")]
    pub kfp_s3_credentials_file: Option<PathBuf>,
}

/// What a KFP restore did and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KfpRestoreReport {
    pub mysql: String,
    pub databases: Vec<String>,
    /// Row counts of the named tables after the restore.
    pub rows: BTreeMap<String, u64>,
    pub tables: usize,
    pub bucket: String,
    pub objects: u64,
    pub bytes: u64,
    /// Sampled objects read back from the bucket byte-identical.
    pub objects_verified: usize,
    pub seconds: f64,
    /// Target databases that did not exist before (what a drill's cleanup
    /// drops).
    pub created_databases: Vec<String>,
    /// Objects that were not in the bucket before (what a drill's cleanup
    /// deletes).
    #[serde(skip)]
    pub uploaded: Vec<String>,
    /// What the check after the move found different (empty: as backed
    /// up); [`KfpRestoreReport::verified`] makes it an error.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_problems: Vec<String>,
    /// Of `seconds`, the check after the move.
    pub verify_seconds: f64,
}

impl KfpRestoreReport {
    /// What the restore checked, in words.
    pub fn summary(&self) -> String {
        format!(
            "{} tables' row counts as backed up ({}); {} object(s), {} sampled read back identical",
            self.tables,
            self.rows
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.objects,
            self.objects_verified
        )
    }

    /// The report, or an integrity error (exit 4) naming each difference
    /// the check after the move found.
    ///
    /// # Errors
    /// As said.
    pub fn verified(self) -> crate::error::Result<KfpRestoreReport> {
        if self.verify_problems.is_empty() {
            return Ok(self);
        }
        Err(LabError::integrity(format!(
            "the restored Kubeflow Pipelines metadata differs from the backup: {}",
            self.verify_problems.join("; ")
        ))
        .into())
    }
}

/// Every file under `dir/` of a snapshot: its path and size.
fn files_under(
    repo: &Repository,
    root: &[Id],
    dir: &str,
) -> crate::error::Result<Vec<(String, u64)>> {
    let mut out = vec![];
    let mut stack: Vec<(String, Vec<Id>)> = vec![(String::new(), root.to_vec())];
    while let Some((prefix, ids)) = stack.pop() {
        for n in repo.read_tree(&ids)?.nodes {
            let name = String::from_utf8_lossy(&n.name_bytes()).into_owned();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            match n.node_type {
                NodeType::Dir if prefix.is_empty() && path != dir => {}
                NodeType::Dir => {
                    if let Some(sub) = n.subtree.clone() {
                        stack.push((path, sub));
                    }
                }
                NodeType::File if path.starts_with(&format!("{dir}/")) => out.push((path, n.size)),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Rewrites `mysqldump --databases`' `CREATE DATABASE` and `USE` lines to
/// the scratch names, passing every other byte through (a line's first 16
/// bytes decide; data lines, however long, are not held).
struct Renaming<W: std::io::Write> {
    inner: W,
    map: Vec<(String, String)>,
    line: Vec<u8>,
    state: LineState,
}

#[derive(Clone, Copy, PartialEq)]
enum LineState {
    Start,
    Hold,
    Pass,
}

const DECIDE: usize = 16;

fn is_db_line(l: &[u8]) -> bool {
    l.starts_with(b"CREATE DATABASE ") || l.starts_with(b"USE `")
}

impl<W: std::io::Write> Renaming<W> {
    fn new(inner: W, map: Vec<(String, String)>) -> Self {
        Renaming {
            inner,
            map,
            line: vec![],
            state: LineState::Start,
        }
    }

    fn flush_line(&mut self) -> std::io::Result<()> {
        let l = std::mem::take(&mut self.line);
        self.state = LineState::Start;
        if !is_db_line(&l) {
            return self.inner.write_all(&l);
        }
        let mut s = String::from_utf8_lossy(&l).into_owned();
        for (from, to) in &self.map {
            let from = my_ident(from);
            if s.contains(&from) {
                s = s.replacen(&from, &my_ident(to), 1);
                break;
            }
        }
        self.inner.write_all(s.as_bytes())
    }
}

impl<W: std::io::Write> std::io::Write for Renaming<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let nl = rest.iter().position(|b| *b == b'\n');
            match self.state {
                LineState::Pass => match nl {
                    Some(i) => {
                        self.inner.write_all(&rest[..=i])?;
                        rest = &rest[i + 1..];
                        self.state = LineState::Start;
                    }
                    None => {
                        self.inner.write_all(rest)?;
                        rest = &[];
                    }
                },
                LineState::Hold => match nl {
                    Some(i) => {
                        self.line.extend_from_slice(&rest[..=i]);
                        rest = &rest[i + 1..];
                        self.flush_line()?;
                    }
                    None => {
                        self.line.extend_from_slice(rest);
                        rest = &[];
                    }
                },
                LineState::Start => {
                    let need = DECIDE - self.line.len();
                    let take = match nl {
                        Some(i) if i < need => i + 1,
                        _ => need.min(rest.len()),
                    };
                    self.line.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if self.line.ends_with(b"\n") {
                        self.flush_line()?;
                    } else if self.line.len() >= DECIDE {
                        if is_db_line(&self.line) {
                            self.state = LineState::Hold;
                        } else {
                            let l = std::mem::take(&mut self.line);
                            self.inner.write_all(&l)?;
                            self.state = LineState::Pass;
                        }
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.flush_line()?;
        }
        self.inner.flush()
    }
}

/// Scratch databases dropped when dropped (unless disarmed), and objects
/// uploaded by a restore that did not finish deleted.
struct Undo<'a> {
    t: &'a MyTarget,
    databases: Vec<String>,
    bucket: &'a crate::backend::s3::S3Backend,
    uploaded: Vec<String>,
    keep_uploads: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.databases.is_empty() {
            let sql = self
                .databases
                .iter()
                .map(|d| format!("DROP DATABASE IF EXISTS {};", my_ident(d)))
                .collect::<String>();
            if let Err(e) = self.t.query(&sql) {
                eprintln!(
                    "labctl: dropping scratch databases {} failed, drop them by hand: {e}",
                    self.databases.join(", ")
                );
            }
        }
        if !self.keep_uploads {
            for k in &self.uploaded {
                let _ = self.bucket.delete(k);
            }
        }
    }
}

fn fact_counts(v: Option<&Value>) -> BTreeMap<String, u64> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Differences between counted rows and what the backup recorded (before
/// and, when they differ, after the dump: a count between them is right).
fn count_problems(
    got: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Vec<String> {
    let mut problems = vec![];
    for (table, b) in before {
        let a = after.get(table).copied().unwrap_or(*b);
        let (lo, hi) = (a.min(*b), a.max(*b));
        match got.get(table) {
            None => problems.push(format!("{table}: missing")),
            Some(n) if *n < lo || *n > hi => problems.push(if lo == hi {
                format!("{table}: {n} rows, {lo} backed up")
            } else {
                format!("{table}: {n} rows, {lo} to {hi} backed up")
            }),
            _ => {}
        }
    }
    for table in got.keys().filter(|t| !before.contains_key(*t)) {
        problems.push(format!("{table}: not in the backup"));
    }
    problems
}

/// Restores a kubeflow-pipelines snapshot (see [`KfpRestore`]) and checks
/// it: every table's row count, and sampled objects read back.
///
/// # Errors
/// Not a kubeflow-pipelines snapshot (exit 2); databases with tables or a
/// non-empty bucket without `overwrite` (exit 6); a refused login (exit
/// 5); counts or objects that differ from the backup (exit 4); client,
/// storage and key errors. Nothing is left behind on failure: the targets
/// change only in the final step.
pub fn restore(
    repo: &Repository,
    id: &Id,
    args: &KfpRestore,
    overwrite: bool,
    threads: usize,
) -> crate::error::Result<KfpRestoreReport> {
    use crate::repo::extract;
    let started = Instant::now();
    let (snap, _) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a {} snapshot, not a {KIND} one",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    let dbs: Vec<String> = snap
        .facts
        .get("kfp.databases")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for d in &dbs {
        check_db_name("kfp.databases", d).map_err(|(_, why)| LabError::integrity(why))?;
    }
    let before = fact_counts(snap.facts.get("kfp.counts"));
    let after = fact_counts(snap.facts.get("kfp.counts_after"));
    let uri = args.kfp_mysql.as_deref().expect("given");
    let bucket_url = args.kfp_bucket.as_deref().expect("given");
    super::bucket::check_bucket_url("--kfp-bucket", bucket_url)
        .map_err(|(_, why)| LabError::usage(why))?;
    let t = MyTarget::parse(uri, args.kfp_password_file.as_deref())?;
    t.command("mysql")?;
    let bucket = super::bucket::open(
        bucket_url,
        &args.kfp_s3_endpoint,
        &args.kfp_s3_credentials_file,
    )?;
    let existing = tables_of(&t, &dbs)?;
    let mut created_databases = vec![];
    for d in &dbs {
        if !database_exists(&t, d)? {
            created_databases.push(d.clone());
        }
    }
    let mut present = vec![];
    bucket.list("", &mut |o| present.push(o.name))?;
    if !overwrite {
        if !existing.is_empty() {
            let mut with: Vec<&str> = existing.iter().map(|(d, _)| d.as_str()).collect();
            with.dedup();
            return Err(LabError::refused(format!(
                "database(s) {} on {} already have tables: restore into a server without them, or pass --overwrite to replace them whole; nothing was written",
                with.join(", "),
                t.display()
            ))
            .into());
        }
        if !present.is_empty() {
            return Err(LabError::refused(format!(
                "bucket {bucket_url} holds {} object(s): restore into an empty bucket, or pass --overwrite to replace its content; nothing was written",
                present.len()
            ))
            .into());
        }
    }

    // 1. The dump into scratch databases.
    let tag = format!("{:08x}", rand::random::<u32>());
    let scratch: Vec<(String, String)> = dbs
        .iter()
        .map(|d| (d.clone(), format!("labctl_new_{tag}_{d}")))
        .collect();
    let mut undo = Undo {
        t: &t,
        databases: scratch.iter().map(|(_, s)| s.clone()).collect(),
        bucket: &bucket,
        uploaded: vec![],
        keep_uploads: false,
    };
    {
        use std::io::{Read, Write};
        use std::process::Stdio;
        let (mut cmd, _file) = t.command("mysql")?.into_parts();
        let mut child = cmd
            .args(["--batch", "--default-character-set=utf8mb4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::failed(format!("running mysql: {e}")))?;
        let mut err = child.stderr.take().expect("piped");
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let stdin = std::io::BufWriter::with_capacity(1 << 20, child.stdin.take().expect("piped"));
        let mut w = Renaming::new(stdin, scratch.clone());
        let written = extract::restore_to_writer(repo, id, Some(DUMP_FILE), &mut w, threads)
            .and_then(|n| w.flush().map(|()| n).map_err(Into::into));
        drop(w);
        let status = child.wait()?;
        let err = err.join().unwrap_or_default();
        if !status.success() {
            return Err(t.classify("mysql", &err).into());
        }
        written?;
    }

    // 2. Every table's rows, in the scratch databases, as backed up.
    let names: Vec<String> = scratch.iter().map(|(_, s)| s.clone()).collect();
    let loaded = tables_of(&t, &names)?;
    let back = |s: &str| -> String {
        scratch
            .iter()
            .find(|(_, n)| n == s)
            .map(|(d, _)| d.clone())
            .unwrap_or_else(|| s.to_string())
    };
    let got: BTreeMap<String, u64> = count_rows(&t, &loaded)?
        .into_iter()
        .map(|(k, n)| {
            let (db, table) = k.split_once('.').unwrap_or((&k, ""));
            (format!("{}.{table}", back(db)), n)
        })
        .collect();
    let problems = count_problems(&got, &before, &after);
    if !problems.is_empty() {
        return Err(LabError::integrity(format!(
            "the dump of snapshot {} loads with other row counts than were backed up: {}; nothing was changed",
            id.short(),
            problems.join("; ")
        ))
        .into());
    }

    // 3. The objects into the bucket.
    let files = files_under(repo, &snap.root, BUCKET_DIR)?;
    let mut bytes = 0u64;
    let keep: std::collections::BTreeSet<String> = files
        .iter()
        .map(|(p, _)| p[BUCKET_DIR.len() + 1..].to_string())
        .collect();
    for (path, size) in &files {
        let key = &path[BUCKET_DIR.len() + 1..];
        let mut data = Vec::with_capacity(*size as usize);
        extract::restore_to_writer(repo, id, Some(path), &mut data, threads)?;
        if present.iter().any(|p| p == key) {
            // --overwrite: objects are replaced one by one (the databases
            // move in one step at the end, after all of them).
            bucket.put_replacing(key, data).map_err(|e| {
                LabError::storage(format!(
                    "replacing object {key} in {bucket_url}: {e}; the bucket is partly replaced, the databases untouched: run the restore again"
                ))
            })?;
        } else {
            bucket.put(key, &data)?;
            undo.uploaded.push(key.to_string());
        }
        bytes += size;
    }

    // 4. Into place: every table in one RENAME TABLE (atomic).
    let mut sql = String::new();
    let mut renames = vec![];
    let mut olds = vec![];
    for (d, s) in &scratch {
        sql.push_str(&format!("CREATE DATABASE IF NOT EXISTS {};", my_ident(d)));
        let old_tables: Vec<&(String, String)> =
            existing.iter().filter(|(db, _)| db == d).collect();
        if !old_tables.is_empty() {
            let old = format!("labctl_old_{tag}_{d}");
            sql.push_str(&format!("CREATE DATABASE {};", my_ident(&old)));
            for (_, tb) in old_tables {
                renames.push(format!(
                    "{}.{} TO {}.{}",
                    my_ident(d),
                    my_ident(tb),
                    my_ident(&old),
                    my_ident(tb)
                ));
            }
            olds.push(old);
        }
        for (_, tb) in loaded.iter().filter(|(db, _)| db == s) {
            renames.push(format!(
                "{}.{} TO {}.{}",
                my_ident(s),
                my_ident(tb),
                my_ident(d),
                my_ident(tb)
            ));
        }
    }
    undo.databases.extend(olds.iter().cloned());
    if !renames.is_empty() {
        sql.push_str(&format!("RENAME TABLE {};", renames.join(", ")));
    }
    t.query(&sql)?;
    undo.keep_uploads = true;
    let uploaded = undo.uploaded.clone();
    // A replaced bucket holds only what the snapshot held.
    if overwrite {
        for k in present.iter().filter(|k| !keep.contains(*k)) {
            bucket.delete(k)?;
        }
    }
    drop(undo);

    // 5. Check what the targets now serve (differences are reported, not
    // raised here: the caller records what was created first).
    let checking = Instant::now();
    let now = count_rows(&t, &tables_of(&t, &dbs)?)?;
    let mut verify_problems: Vec<String> = count_problems(&now, &before, &after)
        .into_iter()
        .map(|p| format!("{} {p}", t.display()))
        .collect();
    let mut verified = 0;
    for s in snap
        .facts
        .get("kfp.sample")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s["key"].as_str().unwrap_or("");
        let mut want = vec![];
        extract::restore_to_writer(
            repo,
            id,
            Some(&format!("{BUCKET_DIR}/{key}")),
            &mut want,
            threads,
        )?;
        match bucket.get(key) {
            Ok(got) if got == want => verified += 1,
            Ok(got) => verify_problems.push(format!(
                "object {key} in {bucket_url} is not what was backed up ({} bytes read back, {} backed up)",
                got.len(),
                want.len()
            )),
            Err(e) => verify_problems.push(format!(
                "object {key} cannot be read back from {bucket_url}: {e}"
            )),
        }
    }
    Ok(KfpRestoreReport {
        mysql: t.display(),
        databases: dbs,
        rows: now
            .iter()
            .filter(|(k, _)| KEY_TABLES.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        tables: now.len(),
        bucket: bucket_url.to_string(),
        objects: files.len() as u64,
        bytes,
        objects_verified: verified,
        seconds: started.elapsed().as_secs_f64(),
        created_databases,
        uploaded,
        verify_problems,
        verify_seconds: checking.elapsed().as_secs_f64(),
    })
}

/// Removes what a restore created (a drill's cleanup): the databases that
/// did not exist before it and the objects that were not in the bucket.
/// Returns what could not be removed.
pub fn remove_restored(args: &KfpRestore, databases: &[String], objects: &[String]) -> Vec<String> {
    let mut errors = vec![];
    if !databases.is_empty() {
        match MyTarget::parse(
            args.kfp_mysql.as_deref().unwrap_or(""),
            args.kfp_password_file.as_deref(),
        ) {
            Ok(t) => {
                let sql = databases
                    .iter()
                    .map(|d| format!("DROP DATABASE IF EXISTS {};", my_ident(d)))
                    .collect::<String>();
                if let Err(e) = t.query(&sql) {
                    errors.push(format!("databases {}: {e}", databases.join(", ")));
                }
            }
            Err(e) => errors.push(format!("databases {}: {e}", databases.join(", "))),
        }
    }
    if !objects.is_empty() {
        let url = args.kfp_bucket.as_deref().unwrap_or("");
        match crate::backend::s3::S3Backend::open_with(
            url,
            &super::bucket::bucket_options(&args.kfp_s3_endpoint, &args.kfp_s3_credentials_file),
        ) {
            Ok(b) => {
                let failed: Vec<&String> =
                    objects.iter().filter(|k| b.delete(k).is_err()).collect();
                if !failed.is_empty() {
                    errors.push(format!(
                        "{} object(s) in {url} could not be deleted, first {}",
                        failed.len(),
                        failed[0]
                    ));
                }
            }
            Err(e) => errors.push(format!("bucket {url}: {e:#}")),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dump_lines_naming_databases_are_renamed_and_data_passes_through() {
        let dump = "-- Current Database: `mlpipeline`\n\nCREATE DATABASE /*!32312 IF NOT EXISTS*/ `mlpipeline` /*!40100 DEFAULT CHARACTER SET utf8mb4 */;\n\nUSE `mlpipeline`;\nINSERT INTO `pipelines` VALUES ('USE `metadb`;\nCREATE DATABASE x');\nUSE `metadb`;\n";
        let map = vec![
            (
                "mlpipeline".to_string(),
                "labctl_new_1_mlpipeline".to_string(),
            ),
            ("metadb".to_string(), "labctl_new_1_metadb".to_string()),
        ];
        // Any split of the input gives the same output.
        for step in [1, 3, 7, 16, 17, 1000] {
            let mut out = vec![];
            {
                let mut w = Renaming::new(&mut out, map.clone());
                for c in dump.as_bytes().chunks(step) {
                    w.write_all(c).unwrap();
                }
                w.flush().unwrap();
            }
            let out = String::from_utf8(out).unwrap();
            assert!(
                out.contains(
                    "CREATE DATABASE /*!32312 IF NOT EXISTS*/ `labctl_new_1_mlpipeline` /*!40100"
                ),
                "{step}: {out}"
            );
            assert!(out.contains("\nUSE `labctl_new_1_mlpipeline`;\n"), "{out}");
            assert!(out.ends_with("\nUSE `labctl_new_1_metadb`;\n"), "{out}");
            assert!(
                out.starts_with("-- Current Database: `mlpipeline`"),
                "{out}"
            );
            assert_eq!(
                out.len(),
                dump.len() + 2 * "labctl_new_1_".len() + "labctl_new_1_".len()
            );
        }
    }

    #[test]
    fn counts_are_checked_against_the_range_the_backup_saw() {
        let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let before = m(&[("mlpipeline.run_details", 10), ("metadb.Artifact", 4)]);
        let after = m(&[("mlpipeline.run_details", 12), ("metadb.Artifact", 4)]);
        assert!(count_problems(
            &m(&[("mlpipeline.run_details", 11), ("metadb.Artifact", 4)]),
            &before,
            &after
        )
        .is_empty());
        let p = count_problems(
            &m(&[("mlpipeline.run_details", 13), ("x.y", 1)]),
            &before,
            &after,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p.contains(&"mlpipeline.run_details: 13 rows, 10 to 12 backed up".to_string()),
            "{p:?}"
        );
        assert!(p.contains(&"metadb.Artifact: missing".to_string()), "{p:?}");
        assert!(p.contains(&"x.y: not in the backup".to_string()), "{p:?}");
    }
}
