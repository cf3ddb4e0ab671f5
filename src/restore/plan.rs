//! Restore plans: `restore-plans/<environment>.yaml` says where each source
//! kind of a restore point goes in one environment, how it is verified, and
//! the recovery-time objective. Loading checks every field (file, line and
//! field in the message, as the other loaders do); [`RestorePlan::clashes`]
//! refuses a staging plan whose targets are production's.
//!
//! Kinds with a target section today: `vm`, `etcd`, `kube`, `path` and
//! `stream`. The other platform kinds (PVC data, MLflow, Kubeflow
//! Pipelines) gain their sections as their sources land; a
//! point holding a kind the plan has no section for fails that source with
//! a message saying so, and the others still restore.
//!
//! Must not restore anything: [`super::staging`] runs a plan.

use crate::error::LabError;
use crate::sources::SourceSpec;
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Which environment a plan restores into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Environment {
    /// A scratch copy of the platform for drills: never production's
    /// endpoints (a plan that names one is refused).
    Staging,
    /// The platform itself: needs `--confirm <point ID>`.
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

/// What a restore does when its target already holds data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Existing {
    /// Fail that source (exit 6); the target is left as it was.
    #[default]
    Refuse,
    /// Restore beside the target, then swap it in and remove the old one:
    /// the target is never half-overwritten, and a failed restore leaves
    /// the old one in place.
    Replace,
}

/// The plan file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    environment: Environment,
    #[serde(default)]
    rto_objective: Option<String>,
    #[serde(default)]
    path: Option<PathTarget>,
    #[serde(default)]
    stream: Option<StreamTarget>,
    #[serde(default)]
    etcd: Option<EtcdTarget>,
    #[serde(default)]
    vm: Option<VmTarget>,
    #[serde(default)]
    kube: Option<ClusterTarget>,
    #[serde(default)]
    mlflow: Option<MlflowTarget>,
    #[serde(default)]
    pvc: Option<PvcTarget>,
    #[serde(default)]
    kubeflow_pipelines: Option<KfpTarget>,
}

/// `kubeflow_pipelines:` — Kubeflow Pipelines' databases on a staging
/// MySQL server and its objects in a staging bucket.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KfpTarget {
    /// `mysql://user@host:3306` (no password: see password_file).
    pub mysql: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `s3://bucket`.
    pub bucket: String,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_credentials_file: Option<PathBuf>,
    #[serde(default)]
    pub existing: Existing,
}

impl KfpTarget {
    /// The kubeflow-pipelines source's restore settings for this target.
    pub fn restore_args(&self) -> crate::sources::kfp::KfpRestore {
        crate::sources::kfp::KfpRestore {
            kfp_mysql: Some(self.mysql.clone()),
            kfp_password_file: self.password_file.clone(),
            kfp_bucket: Some(self.bucket.clone()),
            kfp_s3_endpoint: self.s3_endpoint.clone(),
            kfp_s3_credentials_file: self.s3_credentials_file.clone(),
        }
    }

    /// The server's host and port (what a clash compares).
    pub fn server(&self) -> Option<(String, u16)> {
        crate::util::dbclient::MyTarget::parse(&self.mysql, None)
            .ok()
            .map(|t| (t.host, t.port))
    }
}

/// `pvc:` — PVC data, restored into claims by Jobs in the cluster.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PvcTarget {
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub context: Option<String>,
    /// Namespace FROM's claims go to TO; `"*": "*-staging"` for all.
    #[serde(default)]
    pub namespace_map: std::collections::BTreeMap<String, String>,
    /// The new claims' storage class (default: the stored one).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// labctl's image for the restore Jobs.
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "default_job_timeout")]
    pub job_timeout: String,
}

/// A plan's `namespace_map` as the `FROM=TO` pairs `--namespace-map` takes.
fn map_pairs(map: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    map.iter().map(|(f, t)| format!("{f}={t}")).collect()
}

fn default_image() -> String {
    crate::sources::pvc::DEFAULT_IMAGE.into()
}
fn default_job_timeout() -> String {
    "2h".into()
}

impl PvcTarget {
    /// The cluster.
    pub fn cluster(&self) -> crate::k8s::KubeTarget {
        crate::k8s::KubeTarget {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }

    /// The namespace map (checked when the plan was loaded).
    pub fn map(&self) -> crate::sources::kube::NamespaceMap {
        crate::sources::kube::NamespaceMap::parse(&map_pairs(&self.namespace_map))
            .unwrap_or_default()
    }
}

/// `mlflow:` — an MLflow store (database and artifact root), its artifact
/// URIs rewritten to the new root, verified through a server on it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowTarget {
    /// `sqlite:////abs/path/mlflow.db`, `postgresql://user@host/db` or
    /// `mysql://user@host/db` (an existing database; the snapshot's store
    /// must be of the same kind).
    pub backend_store_uri: String,
    /// A 0600 file with a PostgreSQL store's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The new artifact root (absolute).
    pub artifacts: PathBuf,
    #[serde(default)]
    pub existing: Existing,
    /// OLD: NEW artifact URI prefixes, instead of the recorded root to
    /// `artifacts`.
    #[serde(default)]
    pub rewrite_artifact_root: std::collections::BTreeMap<String, String>,
    /// The server to verify through (REST).
    #[serde(default)]
    pub verify_tracking_uri: Option<String>,
    /// A program and arguments (no shell) that serves the restored store at
    /// `verify_tracking_uri`: started after the restore, waited for (2 min),
    /// used for verification, stopped.
    #[serde(default)]
    pub verify_server: Vec<String>,
}

impl MlflowTarget {
    /// A PostgreSQL or MySQL store's host, port and database.
    pub fn server_database(&self) -> Option<(String, u16, String)> {
        server_database(&self.backend_store_uri)
    }

    /// The database file (empty for a PostgreSQL store).
    pub fn database(&self) -> PathBuf {
        PathBuf::from(
            self.backend_store_uri
                .strip_prefix("sqlite:///")
                .unwrap_or_default(),
        )
    }

    /// The mlflow source's restore settings for this target.
    pub fn restore_args(&self) -> crate::sources::mlflow::MlflowRestore {
        crate::sources::mlflow::MlflowRestore {
            mlflow_backend_store_uri: Some(self.backend_store_uri.clone()),
            mlflow_artifacts: Some(self.artifacts.clone()),
            rewrite_artifact_root: self
                .rewrite_artifact_root
                .iter()
                .map(|(o, n)| format!("{o}={n}"))
                .collect(),
            verify_tracking_uri: None,
            mlflow_password_file: self.password_file.clone(),
            mlflow_s3_endpoint: None,
            mlflow_s3_credentials_file: None,
        }
    }
}

/// `kube:` — Kubernetes objects, server-side applied to a cluster.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTarget {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Its context (default: the current one).
    #[serde(default)]
    pub context: Option<String>,
    /// Namespace FROM is restored as TO; `"*": "*-staging"` maps every
    /// namespace. Namespaces it does not name are skipped.
    #[serde(default)]
    pub namespace_map: std::collections::BTreeMap<String, String>,
    /// Objects that exist: `skip` (default) or `update`.
    #[serde(default)]
    pub existing: crate::sources::kube::Existing,
    /// Apply cluster-scoped objects too (CRDs, ClusterRoles, ...): only for
    /// a cluster of its own. Default false: only the mapped namespaces'
    /// objects, Namespaces and Profiles.
    #[serde(default)]
    pub cluster_resources: bool,
}

impl ClusterTarget {
    /// The kube source's restore settings for this target.
    pub fn restore_args(&self) -> crate::sources::kube::KubeRestore {
        crate::sources::kube::KubeRestore {
            to_cluster: true,
            namespace_map: self.map_pairs(),
            existing: self.existing,
            skip_cluster_resources: !self.cluster_resources,
            cluster: crate::k8s::KubeTarget {
                kubeconfig: self.kubeconfig.clone(),
                context: self.context.clone(),
            },
        }
    }

    /// `FROM=TO` pairs.
    pub fn map_pairs(&self) -> Vec<String> {
        map_pairs(&self.namespace_map)
    }

    /// The target in words.
    pub fn describe(&self) -> String {
        format!(
            "cluster {}{}",
            self.context.as_deref().unwrap_or("(current context)"),
            if self.namespace_map.is_empty() {
                String::new()
            } else {
                format!(", namespaces {}", self.map_pairs().join(" "))
            }
        )
    }
}

/// `vm:` — Proxmox VMs, restored with qmrestore as new VMIDs.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmTarget {
    /// The node to restore on.
    pub node: String,
    /// The VMIDs restores may use, `FIRST-LAST`: the point's VMs get them
    /// in order; one that exists is refused.
    pub vmid_range: String,
    /// The storage for the disks (default: as in the backup).
    #[serde(default)]
    pub storage: Option<String>,
    /// Every network interface goes on this bridge: an isolated staging
    /// network (refused when a production VM of the platform file uses it).
    pub bridge: String,
    /// The platform file (PVE API, `ssh:`, and the production VMs).
    #[serde(default = "default_platform")]
    pub platform: PathBuf,
    /// Start the restored VMs (default: left stopped).
    #[serde(default)]
    pub start: bool,
}

fn default_platform() -> PathBuf {
    crate::sources::vm::DEFAULT_PLATFORM.into()
}

impl VmTarget {
    /// The range, parsed.
    pub fn range(&self) -> (u32, u32) {
        crate::sources::vm::parse_range(&self.vmid_range).expect("checked when loaded")
    }
}

/// `path:` — directory trees.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathTarget {
    /// A tree backed up from `/srv/data` is restored into `<root>/srv/data`.
    pub root: PathBuf,
    #[serde(default)]
    pub existing: Existing,
    /// Keep setuid/setgid bits. Default: false in staging (no setuid-root
    /// programs left in a scratch area), true in production.
    #[serde(default)]
    pub keep_setuid: Option<bool>,
    /// Check the restored tree against the snapshot's listing (default true).
    #[serde(default = "yes")]
    pub verify: bool,
}

/// `stream:` — single streams (dumps, archives).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamTarget {
    /// A stream named `N` is written to `<dir>/N`, unless `commands` has
    /// an entry for it.
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub existing: Existing,
    /// Per stream name: a program that reads the stream on its standard
    /// input (`pg_restore --dbname=...`), and a check run after it.
    #[serde(default)]
    pub commands: std::collections::BTreeMap<String, StreamCommand>,
}

/// One stream's loader.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamCommand {
    /// Program and arguments (no shell); the stream is its standard input.
    pub command: Vec<String>,
    /// Program and arguments run afterwards; exit status 0 means verified.
    #[serde(default)]
    pub verify: Vec<String>,
}

/// `etcd:` — an etcd snapshot restored as a new member's data directory.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTarget {
    pub data_dir: PathBuf,
    #[serde(default = "default_member")]
    pub name: String,
    #[serde(default)]
    pub initial_cluster: Option<String>,
    #[serde(default = "default_token")]
    pub initial_cluster_token: String,
    #[serde(default)]
    pub initial_advertise_peer_urls: Option<String>,
    #[serde(default)]
    pub etcdutl: Option<PathBuf>,
    #[serde(default)]
    pub etcd: Option<PathBuf>,
    #[serde(default)]
    pub existing: Existing,
    /// Start a member on the restored data directory (loopback ports) and
    /// compare its key count and revision with the snapshot's facts
    /// (default true).
    #[serde(default = "yes")]
    pub verify: bool,
    /// With `verify`: a key that must exist.
    #[serde(default)]
    pub sentinel_key: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_member() -> String {
    "staging".into()
}
fn default_token() -> String {
    "labctl-staging".into()
}

impl EtcdTarget {
    /// The etcd source's restore settings for this target.
    pub fn restore_args(&self) -> crate::sources::etcd::EtcdRestore {
        crate::sources::etcd::EtcdRestore {
            etcd_data_dir: Some(self.data_dir.clone()),
            name: self.name.clone(),
            initial_cluster: self.initial_cluster.clone(),
            initial_cluster_token: self.initial_cluster_token.clone(),
            initial_advertise_peer_urls: self.initial_advertise_peer_urls.clone(),
            etcdutl: self.etcdutl.clone(),
            etcd: self.etcd.clone(),
            sentinel_key: self.sentinel_key.clone(),
        }
    }
}

/// A loaded, checked plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestorePlan {
    pub file: PathBuf,
    pub environment: Environment,
    pub rto_objective: Option<Duration>,
    pub path: Option<PathTarget>,
    pub stream: Option<StreamTarget>,
    pub etcd: Option<EtcdTarget>,
    pub vm: Option<VmTarget>,
    pub kube: Option<ClusterTarget>,
    pub mlflow: Option<MlflowTarget>,
    pub pvc: Option<PvcTarget>,
    pub kubeflow_pipelines: Option<KfpTarget>,
    /// The file's text, for locating fields in later messages.
    #[serde(skip)]
    text: String,
}

/// What production is, for [`RestorePlan::clashes`]: the sources the
/// daemon's jobs back up (their paths, etcd endpoints and database
/// commands are production's).
#[derive(Debug, Default, Clone)]
pub struct Production {
    /// Where the list came from (for messages): the daemon's config file.
    pub origin: String,
    pub sources: Vec<(String, SourceSpec)>,
}

/// One reason a staging plan touches production.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Clash {
    pub line: usize,
    pub field: String,
    pub why: String,
}

/// Reads and checks a plan file.
///
/// # Errors
/// A usage error `file:line[:col]: field `name`: why`.
pub fn load(path: &Path) -> crate::error::Result<RestorePlan> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LabError::usage(format!("cannot read restore plan {}: {e}", path.display()))
    })?;
    parse(&text, path)
}

/// Parses and checks plan text (`path` names it in messages).
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, path: &Path) -> crate::error::Result<RestorePlan> {
    let file = path.display().to_string();
    let de = serde_norway::Deserializer::from_str(text);
    let raw: PlanFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, col) = inner.location().map_or((0, 0), |l| (l.line(), l.column()));
        crate::util::located::error(
            &file,
            line,
            Some(col),
            &field,
            crate::util::located::yaml_message(&inner),
        )
    })?;
    let at = |section: &str, key: &str, why: String| -> crate::error::Error {
        let line = line_in(text, section, key);
        let field = if key.is_empty() {
            section.to_string()
        } else {
            format!("{section}.{key}")
        };
        crate::util::located::error(&file, line, None, &field, why).into()
    };
    let rto_objective = match &raw.rto_objective {
        Some(t) => Some(
            crate::util::units::parse_duration(t)
                .map_err(|e| at("rto_objective", "", e.message().to_string()))?,
        ),
        None => None,
    };
    if raw.path.is_none()
        && raw.stream.is_none()
        && raw.etcd.is_none()
        && raw.vm.is_none()
        && raw.kube.is_none()
        && raw.mlflow.is_none()
        && raw.pvc.is_none()
        && raw.kubeflow_pipelines.is_none()
    {
        return Err(at(
            "environment",
            "",
            "the plan has no target: give at least one of vm, etcd, kube, pvc, path, mlflow, kubeflow_pipelines, stream"
                .into(),
        ));
    }
    if let Some(k) = &raw.kube {
        crate::sources::kube::NamespaceMap::parse(&k.map_pairs())
            .map_err(|e| at("kube", "namespace_map", format!("{e:#}")))?;
    }
    if let Some(p) = &raw.pvc {
        crate::sources::kube::NamespaceMap::parse(&map_pairs(&p.namespace_map))
            .map_err(|e| at("pvc", "namespace_map", format!("{e:#}")))?;
        crate::util::units::parse_duration(&p.job_timeout)
            .map_err(|e| at("pvc", "job_timeout", e.message().to_string()))?;
    }
    if let Some(v) = &raw.vm {
        crate::sources::vm::parse_range(&v.vmid_range)
            .map_err(|e| at("vm", "vmid_range", e.message().to_string()))?;
        for (key, val) in [
            ("node", Some(&v.node)),
            ("bridge", Some(&v.bridge)),
            ("storage", v.storage.as_ref()),
        ] {
            if let Some(val) = val {
                if !crate::sources::vm::is_name(val) {
                    return Err(at("vm", key, format!("'{val}' is not a name")));
                }
            }
        }
    }
    let absolute = |section: &str, key: &str, p: &Path| -> crate::error::Result<()> {
        if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
            return Err(at(
                section,
                key,
                format!("{} must be an absolute path without `..`", p.display()),
            ));
        }
        if p == Path::new("/") {
            return Err(at(
                section,
                key,
                "is `/`: restore into a directory of its own".into(),
            ));
        }
        Ok(())
    };
    if let Some(p) = &raw.path {
        absolute("path", "root", &p.root)?;
    }
    if let Some(m) = &raw.mlflow {
        let server = crate::sources::mlflow::is_server_store(&m.backend_store_uri)
            .map_err(|why| at("mlflow", "backend_store_uri", why))?;
        if server {
            if let Some(f) = &m.password_file {
                absolute("mlflow", "password_file", f)?;
            }
        } else if !m.backend_store_uri.starts_with("sqlite:///") {
            return Err(at(
                "mlflow",
                "backend_store_uri",
                format!(
                    "'{}': a sqlite:////abs/path/mlflow.db, postgresql://user@host/db or mysql://user@host/db store",
                    crate::util::redact_url(&m.backend_store_uri)
                ),
            ));
        } else {
            absolute("mlflow", "backend_store_uri", &m.database())?;
            if m.password_file.is_some() {
                return Err(at(
                    "mlflow",
                    "password_file",
                    "only a postgresql:// or mysql:// store takes a password file".into(),
                ));
            }
        }
        absolute("mlflow", "artifacts", &m.artifacts)?;
        if !m.verify_server.is_empty() && m.verify_tracking_uri.is_none() {
            return Err(at(
                "mlflow",
                "verify_server",
                "needs verify_tracking_uri (where the server answers)".into(),
            ));
        }
        if m.verify_server.first().is_some_and(|p| p.is_empty()) {
            return Err(at("mlflow", "verify_server", "must name a program".into()));
        }
    }
    if let Some(k) = &raw.kubeflow_pipelines {
        let sec = "kubeflow_pipelines";
        crate::util::dbclient::MyTarget::parse(&k.mysql, None)
            .map_err(|e| at(sec, "mysql", e.message().to_string()))?;
        let ok = k
            .bucket
            .strip_prefix("s3://")
            .is_some_and(|b| !b.is_empty() && !b.contains('@'));
        if !ok {
            return Err(at(
                sec,
                "bucket",
                format!(
                    "'{}': expected s3://bucket",
                    crate::util::redact_url(&k.bucket)
                ),
            ));
        }
        for (key, f) in [
            ("password_file", &k.password_file),
            ("s3_credentials_file", &k.s3_credentials_file),
        ] {
            if let Some(f) = f {
                absolute(sec, key, f)?;
            }
        }
    }
    if let Some(s) = &raw.stream {
        if let Some(d) = &s.dir {
            absolute("stream", "dir", d)?;
        }
        for (name, c) in &s.commands {
            if c.command.first().is_none_or(|p| p.is_empty()) {
                return Err(at(
                    "stream",
                    name,
                    "command must name a program: command: [program, arg, ...]".into(),
                ));
            }
            if !c.verify.is_empty() && c.verify[0].is_empty() {
                return Err(at("stream", name, "verify must name a program".into()));
            }
        }
        if s.dir.is_none() && s.commands.is_empty() {
            return Err(at(
                "stream",
                "",
                "give dir (streams are written there) or commands (per stream name)".into(),
            ));
        }
    }
    if let Some(e) = &raw.etcd {
        absolute("etcd", "data_dir", &e.data_dir)?;
        if e.name.is_empty() {
            return Err(at("etcd", "name", "is empty".into()));
        }
        if let Some(c) = &e.initial_cluster {
            if !c
                .split(',')
                .any(|m| m.split_once('=').is_some_and(|(n, _)| n == e.name))
            {
                return Err(at(
                    "etcd",
                    "initial_cluster",
                    format!("does not list this member ({}=URL)", e.name),
                ));
            }
        }
    }
    Ok(RestorePlan {
        file: path.to_path_buf(),
        environment: raw.environment,
        rto_objective,
        path: raw.path,
        stream: raw.stream,
        etcd: raw.etcd,
        vm: raw.vm,
        kube: raw.kube,
        mlflow: raw.mlflow,
        pvc: raw.pvc,
        kubeflow_pipelines: raw.kubeflow_pipelines,
        text: text.to_string(),
    })
}

/// A PostgreSQL or MySQL store URI's scheme, host, port and database.
fn server_database(uri: &str) -> Option<(String, u16, String)> {
    use crate::util::dbclient::{MyTarget, PgTarget};
    if let Ok(t) = PgTarget::parse(uri, None) {
        return Some((t.host, t.port, t.database));
    }
    MyTarget::parse(uri, None)
        .ok()
        .and_then(|t| Some((t.host, t.port, t.database?)))
}

/// The 1-based line of `key` in the top-level `section` (the section's
/// line when the key is not found; 0 when neither is). Sections are the
/// plan's top-level keys: a nested key of the same name (a stream command
/// called `mlflow`) is not the section.
fn line_in(text: &str, section: &str, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| {
        !l.starts_with(char::is_whitespace)
            && l.split_once(':')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == section)
    }) else {
        return 0;
    };
    if key.is_empty() {
        return start + 1;
    }
    let block: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| {
            l.trim().is_empty() || l.starts_with(char::is_whitespace) || l.starts_with('#')
        })
        .copied()
        .collect();
    crate::util::located::yaml_line(&block.join("\n"), key, "").map_or(start + 1, |i| start + 2 + i)
}

impl RestorePlan {
    /// The source kinds this plan has a target for.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.vm.is_some() {
            v.push(crate::sources::vm::KIND);
        }
        if self.etcd.is_some() {
            v.push(crate::sources::etcd::KIND);
        }
        if self.kube.is_some() {
            v.push(crate::sources::kube::KIND);
        }
        if self.pvc.is_some() {
            v.push(crate::sources::pvc::KIND);
        }
        if self.path.is_some() {
            v.push(crate::sources::path::KIND);
        }
        if self.mlflow.is_some() {
            v.push(crate::sources::mlflow::KIND);
        }
        if self.kubeflow_pipelines.is_some() {
            v.push(crate::sources::kfp::KIND);
        }
        if self.stream.is_some() {
            v.push(crate::sources::stream::KIND);
        }
        v
    }

    /// Whether setuid bits are kept for path restores.
    pub fn keep_setuid(&self) -> bool {
        self.path
            .as_ref()
            .and_then(|p| p.keep_setuid)
            .unwrap_or(self.environment == Environment::Production)
    }

    /// Where each target of a staging plan meets production: a restore
    /// path that overlaps a path production backs up (or kubeadm's etcd
    /// data directory), an etcd member URL on a production etcd endpoint's
    /// host and port (or its peer port), a stream command naming a database
    /// a production dump reads. Empty for a production plan.
    pub fn clashes(&self, prod: &Production) -> Vec<Clash> {
        if self.environment == Environment::Production {
            return vec![];
        }
        let mut out = vec![];
        let mut clash = |section: &str, key: &str, why: String| {
            out.push(Clash {
                line: line_in(&self.text, section, key),
                field: format!("{section}.{key}"),
                why,
            })
        };
        let prod_paths: Vec<(&str, &Path)> = prod
            .sources
            .iter()
            .filter_map(|(job, s)| match s {
                SourceSpec::Path(p) => Some((job.as_str(), p.path.as_path())),
                _ => None,
            })
            .collect();
        // Whether `dir` meets a production path (each meeting recorded).
        let mut check_dir = |section: &str, key: &str, dir: &Path, what: &str| -> bool {
            let mut found = false;
            for (job, q) in &prod_paths {
                if overlaps(dir, q) {
                    found = true;
                    clash(
                        section,
                        key,
                        format!(
                            "{what} {} overlaps {}, which job `{job}` of {} backs up (production data)",
                            dir.display(),
                            q.display(),
                            prod.origin
                        ),
                    );
                }
            }
            found
        };
        if let Some(p) = &self.path {
            // A tree from P lands in <root>/P: it must not meet any
            // production path (nor may the root itself).
            if !check_dir("path", "root", &p.root, "the restore root") {
                for (_, src) in &prod_paths {
                    let dest = under(&p.root, src);
                    check_dir("path", "root", &dest, "the restore target");
                }
            }
        }
        if let Some(s) = &self.stream {
            if let Some(d) = &s.dir {
                check_dir("stream", "dir", d, "the stream directory");
            }
        }
        if let Some(e) = &self.etcd {
            check_dir("etcd", "data_dir", &e.data_dir, "the etcd data directory");
        }
        if let Some(m) = &self.mlflow {
            check_dir(
                "mlflow",
                "artifacts",
                &m.artifacts,
                "the MLflow artifact root",
            );
            if m.server_database().is_none() {
                check_dir(
                    "mlflow",
                    "backend_store_uri",
                    &m.database(),
                    "the MLflow database",
                );
            }
        }
        if let Some(e) = &self.etcd {
            if e.data_dir == Path::new(KUBEADM_ETCD_DATA) {
                clash(
                    "etcd",
                    "data_dir",
                    format!("{KUBEADM_ETCD_DATA} is kubeadm's production etcd data directory"),
                );
            }
            let urls: Vec<&str> = e
                .initial_advertise_peer_urls
                .iter()
                .flat_map(|u| u.split(','))
                .chain(
                    e.initial_cluster
                        .iter()
                        .flat_map(|c| c.split(','))
                        .filter_map(|m| m.split_once('=').map(|(_, u)| u)),
                )
                .collect();
            for (job, s) in &prod.sources {
                let SourceSpec::Etcd(src) = s else { continue };
                let Some((host, port)) = host_port(&src.endpoint) else {
                    continue;
                };
                for u in &urls {
                    let Some((h, p)) = host_port(u) else { continue };
                    // etcd's peer port is the client port + 1 by convention
                    // (2379/2380, etcd's and kubeadm's defaults).
                    if h == host && (p == port || p == port + 1) {
                        clash(
                            "etcd",
                            if e.initial_advertise_peer_urls.is_some() {
                                "initial_advertise_peer_urls"
                            } else {
                                "initial_cluster"
                            },
                            format!(
                                "{u} is the production etcd member of job `{job}` ({}) in {}",
                                src.endpoint, prod.origin
                            ),
                        );
                    }
                }
            }
        }
        if let Some(v) = &self.vm {
            // The production VMs are the platform file's; a staging range
            // must not hold one, nor may staging use their bridges.
            // An unreadable platform file is said by `unchecked`.
            if let Ok(p) = crate::proxmox::platform::load(&v.platform) {
                let (a, b) = v.range();
                for pv in &p.vms {
                    if (a..=b).contains(&pv.vmid) {
                        clash(
                            "vm",
                            "vmid_range",
                            format!(
                                "{} holds VMID {} ({}), a production VM of {}",
                                v.vmid_range,
                                pv.vmid,
                                pv.name,
                                v.platform.display()
                            ),
                        );
                    }
                    if pv
                        .networks
                        .iter()
                        .any(|(_, net)| net.split(',').any(|f| f == format!("bridge={}", v.bridge)))
                    {
                        clash(
                            "vm",
                            "bridge",
                            format!(
                                "bridge {} carries production VM {} ({}): staging needs an isolated bridge",
                                v.bridge,
                                pv.name,
                                v.platform.display()
                            ),
                        );
                    }
                }
            }
        }
        if let Some(k) = &self.kube {
            self.kube_clashes(k, prod, &mut clash);
        }
        if let Some(p) = &self.pvc {
            // Claims restored into production's cluster must land in
            // namespaces renamed away from production's.
            let as_cluster = ClusterTarget {
                kubeconfig: p.kubeconfig.clone(),
                context: p.context.clone(),
                namespace_map: p.namespace_map.clone(),
                existing: crate::sources::kube::Existing::Skip,
                cluster_resources: false,
            };
            let mut renamed = vec![];
            self.kube_clashes(&as_cluster, prod, &mut |_, key, why| {
                renamed.push((key.to_string(), why))
            });
            for (key, why) in renamed {
                let key = if key == "context" {
                    "context"
                } else {
                    "namespace_map"
                };
                clash("pvc", key, why);
            }
        }
        if let Some(m) = &self.mlflow {
            for (job, s) in &prod.sources {
                let SourceSpec::Mlflow(src) = s else { continue };
                if let (Some(a), Some(b)) =
                    (server_database(&src.backend_store_uri), m.server_database())
                {
                    if a == b {
                        clash(
                            "mlflow",
                            "backend_store_uri",
                            format!(
                                "{} is the production MLflow database job `{job}` backs up ({})",
                                crate::util::redact_url(&m.backend_store_uri),
                                prod.origin
                            ),
                        );
                    }
                }
                let prod_db = PathBuf::from(
                    src.backend_store_uri
                        .strip_prefix("sqlite:///")
                        .unwrap_or_default(),
                );
                if m.server_database().is_none() && prod_db == m.database() {
                    clash(
                        "mlflow",
                        "backend_store_uri",
                        format!(
                            "{} is the production MLflow database job `{job}` backs up ({})",
                            prod_db.display(),
                            prod.origin
                        ),
                    );
                }
                let prod_art = PathBuf::from(
                    src.artifacts
                        .strip_prefix("file://")
                        .unwrap_or(&src.artifacts),
                );
                if overlaps(&m.artifacts, &prod_art) {
                    clash(
                        "mlflow",
                        "artifacts",
                        format!(
                            "{} overlaps the production artifact root {} of job `{job}` ({})",
                            m.artifacts.display(),
                            prod_art.display(),
                            prod.origin
                        ),
                    );
                }
            }
        }
        if let Some(k) = &self.kubeflow_pipelines {
            for (job, s) in &prod.sources {
                let SourceSpec::KubeflowPipelines(src) = s else {
                    continue;
                };
                let prod_server = crate::util::dbclient::MyTarget::parse(&src.mysql, None)
                    .ok()
                    .map(|t| (t.host, t.port));
                if prod_server.is_some() && prod_server == k.server() {
                    clash(
                        "kubeflow_pipelines",
                        "mysql",
                        format!(
                            "{} is the production MySQL server job `{job}` dumps Kubeflow Pipelines from ({}): the restore would create its databases there",
                            crate::util::redact_url(&k.mysql),
                            prod.origin
                        ),
                    );
                }
                let bucket = |u: &str| {
                    u.trim_start_matches("s3://")
                        .split('/')
                        .next()
                        .unwrap_or("")
                        .to_string()
                };
                if bucket(&src.bucket) == bucket(&k.bucket) && src.s3_endpoint == k.s3_endpoint {
                    clash(
                        "kubeflow_pipelines",
                        "bucket",
                        format!(
                            "{} is the production bucket job `{job}` backs up ({})",
                            k.bucket, prod.origin
                        ),
                    );
                }
            }
        }
        if let Some(s) = &self.stream {
            for (name, c) in &s.commands {
                let mine = database_targets(&c.command);
                for (job, src) in &prod.sources {
                    let SourceSpec::Stream(p) = src else { continue };
                    for db in database_targets(&p.command) {
                        if mine.contains(&db) {
                            clash(
                                "stream",
                                name,
                                format!(
                                    "the command loads database {db:?}, which job `{job}`'s stream `{}` dumps from production ({})",
                                    p.name, prod.origin
                                ),
                            );
                        }
                    }
                }
            }
        }
        out
    }

    /// A staging `kube:` target in a cluster production's kube jobs back
    /// up (same kubeconfig and context) must rename every namespace it
    /// restores away from production's, and must leave cluster-scoped
    /// objects alone (they are production's).
    fn kube_clashes(
        &self,
        k: &ClusterTarget,
        prod: &Production,
        clash: &mut dyn FnMut(&str, &str, String),
    ) {
        let map = crate::sources::kube::NamespaceMap::parse(&k.map_pairs()).unwrap_or_default();
        for (job, s) in &prod.sources {
            let src = match s {
                SourceSpec::Kube(k) => k.clone(),
                SourceSpec::Pvc(p) => crate::sources::kube::KubeSource {
                    namespace: p.namespace.iter().cloned().collect(),
                    all_namespaces: p.namespace.is_none(),
                    kubeconfig: p.kubeconfig.clone(),
                    context: p.context.clone(),
                    ..Default::default()
                },
                _ => continue,
            };
            let src = &src;
            // Another cluster only when provably so: both name a kubeconfig
            // (or a context) and they differ; an unnamed one is whatever
            // the host's default is, which may be production's.
            fn differ<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
                matches!((a, b), (Some(x), Some(y)) if x != y)
            }
            if differ(&src.kubeconfig, &k.kubeconfig) || differ(&src.context, &k.context) {
                continue;
            }
            let cluster = format!(
                "context {} of job `{job}` in {}",
                k.context.as_deref().unwrap_or("(current)"),
                prod.origin
            );
            if k.cluster_resources {
                clash(
                    "kube",
                    "cluster_resources",
                    format!("the cluster is production's ({cluster}): its cluster-scoped objects must not be applied from staging"),
                );
            }
            if map.0.is_empty() {
                clash(
                    "kube",
                    if k.context.is_some() { "context" } else { "namespace_map" },
                    format!("the cluster is production's ({cluster}) and no namespace_map renames its namespaces: the restore would write into production's namespaces"),
                );
                continue;
            }
            let prod_ns: Vec<&String> = src.namespace.iter().collect();
            for (from, to) in &map.0 {
                let identity = if from == "*" { to == "*" } else { from == to };
                if identity
                    || prod_ns
                        .iter()
                        .any(|n| map.map(n).as_deref() == Some(n.as_str()) || *n == to)
                {
                    clash(
                        "kube",
                        "namespace_map",
                        format!("{from}: {to} restores into a namespace production backs up ({cluster})"),
                    );
                }
            }
        }
    }

    /// What [`Self::clashes`] could not check here: the VM target's
    /// platform file, when it cannot be read on this machine.
    pub fn unchecked(&self) -> Vec<String> {
        match &self.vm {
            Some(v) if self.environment == Environment::Staging => {
                match crate::proxmox::platform::load(&v.platform) {
                    Ok(_) => vec![],
                    Err(e) => vec![format!(
                        "vm: the VMID range and bridge were not checked against the production VMs: {e}"
                    )],
                }
            }
            _ => vec![],
        }
    }

    /// [`Self::clashes`] as one refusal naming every clash (exit 6).
    ///
    /// # Errors
    /// The refusal.
    pub fn refuse_clashes(&self, prod: &Production) -> crate::error::Result<()> {
        let c = self.clashes(prod);
        if c.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = c
            .iter()
            .map(|c| {
                format!(
                    "{}:{}: field `{}`: {}",
                    self.file.display(),
                    c.line,
                    c.field,
                    c.why
                )
            })
            .collect();
        Err(LabError::refused(format!(
            "the staging plan points at production, nothing was written:\n  {}",
            lines.join("\n  ")
        ))
        .into())
    }
}

/// kubeadm's etcd data directory on a control-plane node.
const KUBEADM_ETCD_DATA: &str = "/var/lib/etcd";

/// `p` re-rooted under `root` (`/srv/x` under `/stage` is `/stage/srv/x`).
pub fn under(root: &Path, p: &Path) -> PathBuf {
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(rel)
}

/// One path is the other or inside it.
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Host and port of a URL (`https://10.0.0.1:2379`); the scheme's default
/// port when none is written.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h.to_string(), p.parse().ok()?)
        }
        _ => (
            authority.to_string(),
            if scheme == "https" { 443 } else { 80 },
        ),
    };
    let host = match host.as_str() {
        "localhost" | "127.0.0.1" | "[::1]" => "loopback".to_string(),
        _ => host.to_ascii_lowercase(),
    };
    Some((host, port))
}

/// The databases a dump or load command names: `--dbname=X`, `--dbname X`,
/// `-d X`, `--database=X` and any `scheme://` URI (without its password).
fn database_targets(argv: &[String]) -> Vec<String> {
    let mut out = vec![];
    let mut it = argv.iter().skip(1).peekable();
    while let Some(a) = it.next() {
        let v = if let Some(v) = a
            .strip_prefix("--dbname=")
            .or_else(|| a.strip_prefix("--database="))
        {
            Some(v.to_string())
        } else if a == "--dbname" || a == "-d" || a == "--database" {
            it.next().cloned()
        } else if a.contains("://") {
            Some(a.clone())
        } else {
            None
        };
        if let Some(v) = v {
            out.push(strip_password(&v));
        }
    }
    out
}

fn strip_password(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let (auth, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match auth.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or(user);
            format!("{scheme}://{user}@{host}{tail}")
        }
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> crate::error::Result<RestorePlan> {
        parse(text, Path::new("p.yaml"))
    }

    #[test]
    fn fields_are_checked_with_file_line_and_field() {
        let e = plan("environment: staging\npath:\n  root: rel/dir\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "p.yaml:3: field `path.root`: rel/dir must be an absolute path without `..`"
        );
        let e = plan("environment: qa\n").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:1:14: field `environment`"), "{e}");
        let e = plan("environment: staging\netcd:\n  data_dir: /x\n  nmae: a\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.yaml:4:3: field `etcd.nmae`: unknown field `nmae`"),
            "{e}"
        );
        let e = plan("environment: staging\nrto_objective: soon\npath: {root: /s}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.yaml:2: field `rto_objective`"), "{e}");
        let e = plan("environment: staging\n").unwrap_err().to_string();
        assert!(e.contains("no target"), "{e}");
        let e = plan(
            "environment: staging\netcd:\n  data_dir: /x\n  name: a\n  initial_cluster: b=http://h:2380\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("p.yaml:5: field `etcd.initial_cluster`"),
            "{e}"
        );
        let p = plan("environment: staging\nrto_objective: 30m\npath: {root: /s}\n").unwrap();
        assert_eq!(p.rto_objective, Some(Duration::from_secs(1800)));
        assert!(!p.keep_setuid());
    }

    #[test]
    fn urls_and_database_names_compare_as_production_would() {
        assert_eq!(
            host_port("https://127.0.0.1:2379"),
            Some(("loopback".into(), 2379))
        );
        assert_eq!(host_port("http://Node1"), Some(("node1".into(), 80)));
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            database_targets(&argv("pg_dump --format=custom --dbname=mlflow")),
            ["mlflow"]
        );
        assert_eq!(
            database_targets(&argv("pg_restore -d postgresql://u:secret@db/mlflow")),
            ["postgresql://u@db/mlflow"]
        );
        assert_eq!(
            under(Path::new("/s"), Path::new("/srv/x")),
            Path::new("/s/srv/x")
        );
    }
}
