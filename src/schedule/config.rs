//! `labctl.toml`: the daemon's configuration (repository, jobs, metrics,
//! notifications).
//!
//! Every table rejects unknown keys, and every error names the file, the
//! line and column, and the field (`job[2].backup.path`). Secrets never
//! appear inline: the repository keys, the S3 credentials file and the
//! webhook URL are referenced by path (or, for the webhook, an environment
//! variable), and those files are refused when other users can read them.
//!
//! ```toml
//! [repository]
//! url = "/srv/labctl/repo"            # or s3://bucket/prefix
//! backup_key = "/etc/labctl/backup.key"
//!
//! [[job]]
//! name = "etc"
//! schedule = "30 2 * * *"             # classic 5 fields, or 6/7 with seconds/years
//! backup = { source = "path", path = "/etc" }
//! retention = { keep_daily = 7, keep_weekly = 4 }
//! ```

use crate::error::LabError;
use crate::repo::forget::KeepPolicy;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub notify: Option<NotifyConfig>,
    #[serde(default)]
    pub platform: PlatformConfig,
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobConfig>,
    /// Where the file was read from (for messages); not a key.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[repository]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A local path, `file:///path` or `s3://bucket/prefix`.
    pub url: String,
    /// The backup key file (back up, forget, prune, structural check).
    pub backup_key: PathBuf,
    /// The restore key file; only jobs that read data (`check` with
    /// `read_data`) need it.
    #[serde(default)]
    pub restore_key: Option<PathBuf>,
    /// Directory for the catalog (and job history, locks).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// An AWS shared-credentials file for `s3://` repositories.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// A PEM CA file for an S3 endpoint with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What to do with runs whose time passed while the daemon was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MissedRuns {
    /// Run once at start-up (however many were missed), then follow the schedule.
    #[default]
    RunOnce,
    /// Skip them and wait for the next scheduled time.
    Skip,
}

/// Which clock cron schedules are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeZone {
    #[default]
    Utc,
    Local,
}

/// `[platform]`: what jobs reach beyond the repository (the Kubernetes
/// cluster, Proxmox VE, restore plans). Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformConfig {
    /// A kubeconfig file; default: `$KUBECONFIG`, `~/.kube/config`, in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// A context of that kubeconfig; default: its current context.
    pub kube_context: Option<String>,
    /// The platform file (deploy/platform.yaml): PVE endpoint, token, VMs.
    pub platform_file: Option<PathBuf>,
    /// The folder of restore plans (restore-plans/) drills use; relative
    /// to this file's folder.
    pub restore_plans: Option<PathBuf>,
    /// The production daemon's labctl.toml, when this one (a staging or
    /// drill host's) is another: its backup jobs are production too, and a
    /// drill's staging plan must not name what they read. Relative to this
    /// file's folder.
    pub production_config: Option<PathBuf>,
}

/// `[daemon]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Address of the `/metrics` and `/healthz` endpoint; loopback by default.
    /// An empty string turns the endpoint off.
    pub metrics_listen: String,
    /// At most this many jobs run at the same time.
    pub max_concurrent_jobs: usize,
    /// Policy for runs missed while the daemon was down (per job overridable).
    pub missed_runs: MissedRuns,
    /// On SIGTERM/SIGINT, running jobs get this long to finish before they are cancelled.
    pub shutdown_grace: String,
    /// `utc` (default) or `local`.
    pub timezone: TimeZone,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            metrics_listen: "127.0.0.1:9187".into(),
            max_concurrent_jobs: 1,
            missed_runs: MissedRuns::RunOnce,
            shutdown_grace: "5min".into(),
            timezone: TimeZone::Utc,
        }
    }
}

/// `[notify]`: a Slack/Mattermost-style incoming webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// A file (mode 0600) holding the webhook URL.
    #[serde(default)]
    pub webhook_url_file: Option<PathBuf>,
    /// Or an environment variable holding it.
    #[serde(default)]
    pub webhook_url_env: Option<String>,
    /// Also notify on success (failures and recoveries always notify).
    #[serde(default)]
    pub on_success: bool,
    /// Per-request timeout.
    #[serde(default = "default_notify_timeout")]
    pub timeout: String,
}

fn default_notify_timeout() -> String {
    "10s".into()
}

impl RepositoryConfig {
    /// How to open this repository (the daemon's side of
    /// [`crate::repo::open::RepoSpec`]).
    pub fn spec(&self) -> crate::repo::open::RepoSpec {
        crate::repo::open::RepoSpec {
            url: Some(self.url.clone()),
            backend: crate::backend::OpenOptions {
                credentials_file: self.credentials_file.clone(),
                ca_file: self.ca_file.clone(),
                endpoint_url: None,
            },
            // A job that reads data uses the restore key only.
            backup_key: Some(self.backup_key.clone()),
            restore_key: self.restore_key.clone(),
            cache_dir: self.cache_dir.clone(),
            hints: crate::repo::open::KeyHints::CONFIG,
        }
    }
}

/// `[[job]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub name: String,
    /// Cron: `min hour dom month dow` (classic), or with seconds (6) and years (7).
    pub schedule: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Cancel a run (leaving the repository consistent) after this long.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Extra attempts after a failure.
    #[serde(default)]
    pub retries: u32,
    /// Wait before the first retry; doubles for each further one.
    #[serde(default = "default_retry_delay")]
    pub retry_delay: String,
    /// Start up to this long after the scheduled time (spreads load; the
    /// delay is derived from the job name and time, so it is stable).
    #[serde(default)]
    pub jitter: Option<String>,
    /// Overrides `[daemon] missed_runs` for this job.
    #[serde(default)]
    pub missed_runs: Option<MissedRuns>,
    /// Exactly one of `backup`, `forget`, `prune`, `check`. `backup` is
    /// one source table, or an array of them: one run then writes one
    /// snapshot per source, all in one restore point.
    #[serde(default)]
    pub backup: Option<BackupSources>,
    #[serde(default)]
    pub forget: Option<RetentionConfig>,
    #[serde(default)]
    pub prune: Option<PruneJob>,
    #[serde(default)]
    pub check: Option<CheckJob>,
    #[serde(default)]
    pub drill: Option<DrillJob>,
    /// Retention applied to this job's source after each successful backup.
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
}

/// A job's `backup`: one source table, or an array of them (a restore
/// point).
#[derive(Debug, Clone)]
pub struct BackupSources(pub Vec<crate::sources::SourceSpec>);

impl<'de> serde::Deserialize<'de> for BackupSources {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = BackupSources;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a source table { source = \"...\", ... } or an array of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::Deserialize;
                crate::sources::SourceSpec::deserialize(MapAccessDeserializer::new(m))
                    .map(|s| BackupSources(vec![s]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                s: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::Deserialize;
                Vec::<crate::sources::SourceSpec>::deserialize(SeqAccessDeserializer::new(s))
                    .map(BackupSources)
            }
        }
        d.deserialize_any(V)
    }
}

fn default_retry_delay() -> String {
    "1min".into()
}

/// Keep rules, as for `labctl forget`.
pub type RetentionConfig = crate::repo::forget::KeepRules;

/// `prune = { grace = "24h", repack_threshold = "25%" }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneJob {
    #[serde(default = "default_grace")]
    pub grace: String,
    #[serde(default = "default_repack")]
    pub repack_threshold: String,
}

fn default_grace() -> String {
    "24h".into()
}
fn default_repack() -> String {
    "25%".into()
}

/// `check = { read_data_subset = "5%" }` (needs `restore_key`), or `{}` for structure only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckJob {
    #[serde(default)]
    pub read_data: bool,
    #[serde(default)]
    pub read_data_subset: Option<String>,
}

/// `drill = { plan = "staging.yaml", cleanup = true }`: restore the newest
/// complete restore point into staging as the plan says, verify it, record
/// the report and the RTO, and (with `cleanup`) remove what it created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillJob {
    /// The restore plan; a relative path is taken from
    /// `platform.restore_plans`, else from this file's folder.
    pub plan: PathBuf,
    /// Remove what the drill created once it is verified (or failed).
    #[serde(default)]
    pub cleanup: bool,
    /// Only these source kinds.
    #[serde(default)]
    pub only: Vec<String>,
}

/// A job's action, validated.
#[derive(Debug, Clone)]
pub enum Action {
    /// Back up one source, or several as one restore point (see
    /// [`crate::sources::SourceSpec`]).
    Backup(Vec<crate::sources::SourceSpec>),
    Forget(KeepPolicy),
    Prune {
        grace: time::Duration,
        repack_threshold: f64,
    },
    Check(crate::repo::check::ReadData),
    /// A restore drill: the plan (loaded and checked at load time, read
    /// again for each run), cleanup, and the kinds.
    Drill {
        plan: PathBuf,
        cleanup: bool,
        only: Vec<String>,
    },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Backup(_) => "backup",
            Action::Forget(_) => "forget",
            Action::Prune { .. } => "prune",
            Action::Check(_) => "check",
            Action::Drill { .. } => "drill",
        }
    }
}

/// A job, validated and ready to schedule.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub schedule_text: String,
    pub schedule: crate::schedule::cron::CronSchedule,
    pub tags: Vec<String>,
    pub timeout: Option<Duration>,
    pub retries: u32,
    pub retry_delay: Duration,
    pub jitter: Duration,
    pub missed_runs: MissedRuns,
    pub action: Action,
    pub retention: Option<KeepPolicy>,
}

/// Settings for the daemon, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub max_concurrent_jobs: usize,
    pub shutdown_grace: Duration,
    pub timezone: TimeZone,
    pub notify: Option<Notify>,
}

/// A resolved webhook target. The URL is a secret: it is never printed.
#[derive(Clone)]
pub struct Notify {
    pub url: secrecy::SecretString,
    pub on_success: bool,
    pub timeout: Duration,
    /// Where the URL came from, for messages.
    pub origin: String,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notify {{ url: <from {}> }}", self.origin)
    }
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub raw: Config,
    pub settings: Settings,
    pub jobs: Vec<Job>,
    /// The backup sources of `platform.production_config` (job name,
    /// source), and that file.
    pub linked_production: Option<(PathBuf, Vec<(String, crate::sources::SourceSpec)>)>,
    /// Non-fatal findings (printed by `config validate`).
    pub warnings: Vec<String>,
}

impl Loaded {
    /// What production is, for refusing a staging restore plan that
    /// points at it: every backup job's sources.
    pub fn production(&self) -> crate::restore::plan::Production {
        let mut origin = self.raw.path.display().to_string();
        let mut sources = self.backup_sources();
        if let Some((file, linked)) = &self.linked_production {
            origin = format!("{origin} (and {})", file.display());
            sources.extend(linked.iter().cloned());
        }
        crate::restore::plan::Production { origin, sources }
    }

    /// Every backup job's sources, with the job's name.
    fn backup_sources(&self) -> Vec<(String, crate::sources::SourceSpec)> {
        let mut sources = vec![];
        let cluster = crate::k8s::KubeTarget {
            kubeconfig: self.raw.platform.kubeconfig.clone(),
            context: self.raw.platform.kube_context.clone(),
        };
        for j in &self.jobs {
            if let Action::Backup(list) = &j.action {
                for s in list {
                    sources.push((j.name.clone(), s.with_platform(&cluster)));
                }
            }
        }
        sources
    }

    /// A path of this file, relative to its folder.
    pub fn relative(&self, p: &Path) -> PathBuf {
        relative_to(&self.raw.path, p)
    }
}

/// `p` taken from the folder of the file `config` (as is when absolute).
fn relative_to(config: &Path, p: &Path) -> PathBuf {
    match config.parent() {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// The default config file: `$LABCTL_CONFIG`, else `/etc/labctl/labctl.toml`.
pub fn default_path() -> PathBuf {
    std::env::var_os("LABCTL_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/labctl/labctl.toml"))
}

/// Parses a duration (labctl's one grammar, see [`crate::util::units`]),
/// with the error as text for `file:line: field:` messages.
fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::util::units::parse_duration(text).map_err(|e| e.message().to_string())
}

/// Finds where a `[[job]]` entry named `name` is declared, for messages.
fn job_line(text: &str, name: &str) -> usize {
    let needle_a = format!("name = \"{name}\"");
    let needle_b = format!("name=\"{name}\"");
    text.lines()
        .position(|l| {
            let l = l.trim();
            l.starts_with(&needle_a) || l.starts_with(&needle_b)
        })
        .map_or(0, |i| i + 1)
}

/// Reads, parses and validates a configuration file.
///
/// # Errors
/// A usage error `file:line:col: field: why` for anything wrong; a key error
/// for a secret file other users can read.
pub fn load(path: &Path) -> crate::error::Result<Loaded> {
    let text = read(path)?;
    parse(&text, path)
}

fn read(path: &Path) -> crate::error::Result<String> {
    Ok(std::fs::read_to_string(path)
        .map_err(|e| LabError::usage(format!("cannot read config file {}: {e}", path.display())))?)
}

/// [`load`] without reading the webhook secret (`settings.notify` is
/// `None`): for commands that only look (`status`, `jobs history`) and run
/// where the daemon's secrets are not.
///
/// # Errors
/// As [`load`].
pub fn load_without_secrets(path: &Path) -> crate::error::Result<Loaded> {
    let text = read(path)?;
    parse_inner(&text, path, false, true)
}

/// Parses and validates configuration text (`path` is for messages and
/// resolving relative paths).
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, path: &Path) -> crate::error::Result<Loaded> {
    parse_inner(text, path, true, true)
}

/// `follow`: load `platform.production_config` too (not from inside it).
fn parse_inner(
    text: &str,
    path: &Path,
    secrets: bool,
    follow: bool,
) -> crate::error::Result<Loaded> {
    let file = path.display().to_string();
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let (line, col) = e
            .span()
            .map_or((0, 0), |s| crate::util::located::line_col(text, s.start));
        LabError::usage(format!("{file}:{line}:{col}: {}", e.message().trim()))
    })?;
    let mut raw: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, col) = inner
            .span()
            .map_or((0, 0), |s| crate::util::located::line_col(text, s.start));
        crate::util::located::error(&file, line, Some(col), &field, inner.message().trim())
    })?;
    raw.path = path.to_path_buf();
    validate(raw, text, secrets, follow)
}

fn validate(raw: Config, text: &str, secrets: bool, follow: bool) -> crate::error::Result<Loaded> {
    let file = raw.path.display().to_string();
    let mut warnings = vec![];
    let at = |line: usize, field: &str, why: String| -> crate::error::Error {
        crate::util::located::error(&file, line, None, field, why).into()
    };
    let key_line = |key: &str| -> usize {
        text.lines()
            .position(|l| {
                let l = l.trim_start();
                l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
            })
            .map_or(0, |i| i + 1)
    };
    if raw.repository.url.trim().is_empty() {
        return Err(at(key_line("url"), "repository.url", "is empty".into()));
    }
    let d = &raw.daemon;
    let metrics_listen = if d.metrics_listen.is_empty() {
        None
    } else {
        let addr: std::net::SocketAddr = d.metrics_listen.parse().map_err(|_| {
            at(
                key_line("metrics_listen"),
                "daemon.metrics_listen",
                format!(
                    "'{}' is not an address like 127.0.0.1:9187",
                    d.metrics_listen
                ),
            )
        })?;
        if !addr.ip().is_loopback() {
            warnings.push(format!(
                "{file}:{}: daemon.metrics_listen {addr} is reachable from the network; the metrics carry job names and sizes",
                key_line("metrics_listen")
            ));
        }
        Some(addr)
    };
    if d.max_concurrent_jobs == 0 {
        return Err(at(
            key_line("max_concurrent_jobs"),
            "daemon.max_concurrent_jobs",
            "must be at least 1".into(),
        ));
    }
    let shutdown_grace = parse_duration(&d.shutdown_grace)
        .map_err(|e| at(key_line("shutdown_grace"), "daemon.shutdown_grace", e))?;
    let notify = match &raw.notify {
        None => None,
        Some(n) if !secrets => {
            check_notify_shape(
                n,
                &file,
                key_line("webhook_url_file").max(key_line("webhook_url_env")),
            )?;
            None
        }
        Some(n) => Some(resolve_notify(
            n,
            &file,
            key_line("webhook_url_file").max(key_line("webhook_url_env")),
        )?),
    };
    let mut jobs = vec![];
    let mut seen = std::collections::HashSet::new();
    for (i, j) in raw.jobs.iter().enumerate() {
        let line = job_line(text, &j.name);
        let f = |name: &str| format!("job[{i}].{name}");
        if j.name.is_empty()
            || !j
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(at(
                line,
                &f("name"),
                format!("'{}': use letters, digits, '-', '_' and '.' only (it names lock files and metrics)", j.name),
            ));
        }
        if !seen.insert(j.name.clone()) {
            return Err(at(
                line,
                &f("name"),
                format!("job '{}' is defined twice", j.name),
            ));
        }
        let schedule = crate::schedule::cron::CronSchedule::parse(&j.schedule)
            .map_err(|e| at(line, &f("schedule"), e))?;
        let dur = |v: &Option<String>, name: &str| -> crate::error::Result<Option<Duration>> {
            v.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| at(line, &f(name), e))
        };
        let timeout = dur(&j.timeout, "timeout")?;
        if timeout == Some(Duration::ZERO) {
            return Err(at(line, &f("timeout"), "must be longer than 0s".into()));
        }
        let retry_delay = dur(&Some(j.retry_delay.clone()), "retry_delay")?.unwrap_or_default();
        let jitter = dur(&j.jitter, "jitter")?.unwrap_or_default();
        let mut actions = vec![];
        if let Some(b) = &j.backup {
            actions.push(backup_action(b).map_err(|(fld, e)| {
                let fld = match fld.as_str() {
                    "" => "backup".to_string(),
                    f if f.starts_with('[') => format!("backup{f}"),
                    f => format!("backup.{f}"),
                };
                at(line, &f(&fld), e)
            })?);
        }
        if let Some(r) = &j.forget {
            let p = keep_policy(r).map_err(|(fld, e)| at(line, &f(&format!("forget.{fld}")), e))?;
            actions.push(Action::Forget(p));
        }
        if let Some(p) = &j.prune {
            let grace = crate::util::units::parse_time_duration(&p.grace)
                .map_err(|e| at(line, &f("prune.grace"), e.message().to_string()))?;
            if grace < time::Duration::hours(24) {
                warnings.push(format!("{file}:{line}: job '{}': prune grace {} is under 24h: a backup running longer than that can lose data it deduplicated", j.name, p.grace));
            }
            let repack_threshold = crate::util::units::parse_percent(&p.repack_threshold)
                .map_err(|e| at(line, &f("prune.repack_threshold"), e.to_string()))?;
            actions.push(Action::Prune {
                grace,
                repack_threshold,
            });
        }
        if let Some(c) = &j.check {
            let rd = match (&c.read_data_subset, c.read_data) {
                (Some(_), true) => {
                    return Err(at(
                        line,
                        &f("check"),
                        "give read_data or read_data_subset, not both".into(),
                    ))
                }
                (Some(s), false) => {
                    let share = crate::util::units::parse_percent(s)
                        .map_err(|e| at(line, &f("check.read_data_subset"), e.to_string()))?;
                    if share == 0.0 {
                        return Err(at(
                            line,
                            &f("check.read_data_subset"),
                            "must be more than 0%".into(),
                        ));
                    }
                    // ReadData::Subset takes a percentage (0–100].
                    crate::repo::check::ReadData::Subset(share * 100.0)
                }
                (None, true) => crate::repo::check::ReadData::All,
                (None, false) => crate::repo::check::ReadData::None,
            };
            if !matches!(rd, crate::repo::check::ReadData::None)
                && raw.repository.restore_key.is_none()
            {
                return Err(at(
                    line,
                    &f("check"),
                    "reading data needs repository.restore_key".into(),
                ));
            }
            actions.push(Action::Check(rd));
        }
        if let Some(dj) = &j.drill {
            if raw.repository.restore_key.is_none() {
                return Err(at(
                    line,
                    &f("drill"),
                    "a drill restores data: it needs repository.restore_key".into(),
                ));
            }
            let plan = match &raw.platform.restore_plans {
                Some(d) => relative_to(&raw.path, d).join(&dj.plan),
                None => relative_to(&raw.path, &dj.plan),
            };
            let loaded = crate::restore::plan::load(&plan)
                .map_err(|e| at(line, &f("drill.plan"), e.to_string()))?;
            if loaded.environment != crate::restore::plan::Environment::Staging {
                return Err(at(
                    line,
                    &f("drill.plan"),
                    format!(
                        "{} is a {} plan: drills restore into staging only",
                        plan.display(),
                        loaded.environment.as_str()
                    ),
                ));
            }
            for k in &dj.only {
                if !crate::restore::staging::ORDER.contains(&k.as_str()) {
                    return Err(at(
                        line,
                        &f("drill.only"),
                        format!(
                            "'{k}' is not a kind labctl restores ({})",
                            crate::restore::staging::ORDER.join(", ")
                        ),
                    ));
                }
            }
            actions.push(Action::Drill {
                plan,
                cleanup: dj.cleanup,
                only: dj.only.clone(),
            });
        }
        let action = match actions.len() {
            1 => actions.pop().expect("one action"),
            0 => {
                return Err(at(
                    line,
                    &format!("job[{i}]"),
                    format!("job '{}' has nothing to do: give one of backup, forget, prune, check, drill", j.name),
                ))
            }
            _ => {
                return Err(at(
                    line,
                    &format!("job[{i}]"),
                    format!("job '{}' has several actions: give exactly one of backup, forget, prune, check, drill (make one job each)", j.name),
                ))
            }
        };
        let retention = match &j.retention {
            None => None,
            Some(r) => {
                if action.kind() != "backup" {
                    return Err(at(
                        line,
                        &f("retention"),
                        "only backup jobs take retention (use a forget job)".into(),
                    ));
                }
                Some(
                    keep_policy(r)
                        .map_err(|(fld, e)| at(line, &f(&format!("retention.{fld}")), e))?,
                )
            }
        };
        jobs.push(Job {
            name: j.name.clone(),
            schedule_text: j.schedule.clone(),
            schedule,
            tags: j.tags.clone(),
            timeout,
            retries: j.retries,
            retry_delay,
            jitter,
            missed_runs: j.missed_runs.unwrap_or(d.missed_runs),
            action,
            retention,
        });
    }
    let settings = Settings {
        metrics_listen,
        max_concurrent_jobs: d.max_concurrent_jobs,
        shutdown_grace,
        timezone: d.timezone,
        notify,
    };
    let linked_production = match (&raw.platform.production_config, follow) {
        (Some(p), true) => {
            let file = relative_to(&raw.path, p);
            let other = read(&file)
                .and_then(|t| parse_inner(&t, &file, false, false))
                .map_err(|e| {
                    at(
                        key_line("production_config"),
                        "platform.production_config",
                        e.to_string(),
                    )
                })?;
            Some((file, other.backup_sources()))
        }
        _ => None,
    };
    let loaded = Loaded {
        raw,
        settings,
        jobs,
        warnings,
        linked_production,
    };
    // A drill's staging plan must not name what the backup jobs read.
    let production = loaded.production();
    for (i, j) in loaded.jobs.iter().enumerate() {
        if let Action::Drill { plan, .. } = &j.action {
            let p = crate::restore::plan::load(plan)?;
            p.refuse_clashes(&production).map_err(|e| {
                at(
                    job_line(text, &j.name),
                    &format!("job[{i}].drill.plan"),
                    e.to_string(),
                )
            })?;
        }
    }
    Ok(loaded)
}

type FieldError = (String, String);

fn backup_action(b: &BackupSources) -> Result<Action, FieldError> {
    match b.0.as_slice() {
        [] => Err((
            String::new(),
            "backup = [] lists no source: give one table, or an array of them".into(),
        )),
        [one] => {
            one.validate(true)?;
            Ok(Action::Backup(b.0.clone()))
        }
        many => {
            for (i, s) in many.iter().enumerate() {
                s.validate(true)
                    .map_err(|(f, e)| (format!("[{i}].{f}"), e))?;
            }
            Ok(Action::Backup(b.0.clone()))
        }
    }
}

fn keep_policy(r: &RetentionConfig) -> Result<KeepPolicy, FieldError> {
    r.policy()
        .map_err(|(field, e)| (field.to_string(), e.message().to_string()))
}

/// The parts of `[notify]` that need no secret: the timeout, and exactly
/// one of the webhook URL's file or variable. Returns the timeout.
fn check_notify_shape(n: &NotifyConfig, file: &str, line: usize) -> crate::error::Result<Duration> {
    let at = |field: &str, why: String| -> crate::error::Error {
        crate::util::located::error(file, line, None, &format!("notify.{field}"), why).into()
    };
    let timeout = parse_duration(&n.timeout).map_err(|e| at("timeout", e))?;
    match (&n.webhook_url_file, &n.webhook_url_env) {
        (Some(_), Some(_)) => Err(at(
            "webhook_url_file",
            "give webhook_url_file or webhook_url_env, not both".into(),
        )),
        (None, None) => Err(at(
            "webhook_url_file",
            "give webhook_url_file or webhook_url_env".into(),
        )),
        _ => Ok(timeout),
    }
}

fn resolve_notify(n: &NotifyConfig, file: &str, line: usize) -> crate::error::Result<Notify> {
    let at = |field: &str, why: String| -> crate::error::Error {
        crate::util::located::error(file, line, None, &format!("notify.{field}"), why).into()
    };
    let timeout = check_notify_shape(n, file, line)?;
    let (url, origin) = match (&n.webhook_url_file, &n.webhook_url_env) {
        (Some(_), Some(_)) | (None, None) => unreachable!("checked by check_notify_shape"),
        (Some(p), None) => {
            let meta = std::fs::metadata(p)
                .map_err(|e| at("webhook_url_file", format!("{}: {e}", p.display())))?;
            crate::util::secret::check_private(p, &meta)?;
            let text = std::fs::read_to_string(p)
                .map_err(|e| at("webhook_url_file", format!("{}: {e}", p.display())))?;
            (text.trim().to_string(), p.display().to_string())
        }
        (None, Some(var)) => {
            let v = std::env::var(var).map_err(|_| {
                at(
                    "webhook_url_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            (v.trim().to_string(), format!("${var}"))
        }
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        // Do not echo the value: it is a secret.
        return Err(at(
            if n.webhook_url_file.is_some() {
                "webhook_url_file"
            } else {
                "webhook_url_env"
            },
            format!("the webhook URL from {origin} does not start with http:// or https://"),
        ));
    }
    Ok(Notify {
        url: secrecy::SecretString::from(url),
        on_success: n.on_success,
        timeout,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30min"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    fn err_of(text: &str) -> String {
        parse(text, Path::new("lab.toml")).unwrap_err().to_string()
    }

    #[test]
    fn a_month_written_the_old_way_is_an_error_that_says_what_it_means_now() {
        let text = "[repository]\nurl = \"/r\"\nbackup_key = \"/k\"\n\n[[job]]\nname = \"a\"\nschedule = \"0 2 * * *\"\nforget = { keep_within = \"1m\" }\n";
        let e = err_of(text);
        assert!(e.contains("job[0].forget.keep_within"), "{e}");
        assert!(e.contains("means minutes") && e.contains("1mo"), "{e}");
        let ok = text.replace("\"1m\"", "\"1mo\"");
        parse(&ok, Path::new("lab.toml")).unwrap();
        // Elsewhere `m` is minutes, as everywhere.
        let timeout = text.replace(
            "forget = { keep_within = \"1m\" }",
            "timeout = \"90m\"\nprune = {}",
        );
        let l = parse(&timeout, Path::new("lab.toml")).unwrap();
        assert_eq!(l.jobs[0].timeout, Some(Duration::from_secs(5400)));
    }

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let text = "[repository]\nurl = \"/r\"\nbackup_key = \"/k\"\n\n[[job]]\nname = \"a\"\nschedule = \"0 2 * * *\"\nbackup = { source = \"path\", path = \"/etc\", exclude = [\"x\"] }\n";
        let e = err_of(text);
        assert!(e.starts_with("lab.toml:8:"), "{e}");
        assert!(e.contains("job[0].backup"), "{e}");
        assert!(e.contains("exclude"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_job_line() {
        let base =
            "[repository]\nurl = \"/r\"\nbackup_key = \"/k\"\n\n[[job]]\nname = \"nightly\"\n";
        let e = err_of(&format!(
            "{base}schedule = \"0 2 * *\"\nbackup = {{ source = \"path\", path = \"/etc\" }}\n"
        ));
        assert!(e.starts_with("lab.toml:6: field `job[0].schedule`"), "{e}");
        let e = err_of(&format!(
            "{base}schedule = \"0 2 * * *\"\nbackup = {{ source = \"kfp\" }}\n"
        ));
        assert!(
            e.starts_with("lab.toml:8:")
                && e.contains("job[0].backup")
                && e.contains(
                    "unknown variant `kfp`, expected one of `path`, `stream`, `etcd`, `vm`, `kube`, `pvc`, `mlflow`"
                ),
            "{e}"
        );
        let e = err_of(&format!("{base}schedule = \"0 2 * * *\"\n"));
        assert!(e.contains("nothing to do"), "{e}");
        let e = err_of(&format!(
            "{base}schedule = \"0 2 * * *\"\nprune = {{}}\nretention = {{ keep_last = 3 }}\n"
        ));
        assert!(e.contains("job[0].retention"), "{e}");
        let e = err_of(&format!("{base}schedule = \"0 2 * * *\"\nforget = {{}}\n"));
        assert!(e.contains("job[0].forget.keep_last"), "{e}");
        let e = err_of(&format!(
            "{base}schedule = \"0 2 * * *\"\ncheck = {{ read_data_subset = \"5%\" }}\n"
        ));
        assert!(e.contains("restore_key"), "{e}");
    }

    #[test]
    fn a_good_file_loads() {
        let text = "[repository]\nurl = \"/r\"\nbackup_key = \"/k\"\n[daemon]\nmax_concurrent_jobs = 2\n\n[[job]]\nname = \"etc\"\nschedule = \"30 2 * * 1-5\"\ntimeout = \"2h\"\nretries = 2\njitter = \"10min\"\nbackup = { source = \"path\", path = \"/etc\" }\nretention = { keep_daily = 7 }\n\n[[job]]\nname = \"db\"\nschedule = \"0 0 3 * * *\"\nbackup = { source = \"stream\", name = \"pg\", command = [\"pg_dumpall\"] }\n";
        let l = parse(text, Path::new("lab.toml")).unwrap();
        assert_eq!(l.jobs.len(), 2);
        assert_eq!(l.jobs[0].timeout, Some(Duration::from_secs(7200)));
        assert_eq!(l.jobs[0].jitter, Duration::from_secs(600));
        assert!(l.jobs[0].retention.is_some());
        assert_eq!(l.settings.max_concurrent_jobs, 2);
        assert_eq!(
            l.settings.metrics_listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
    }
}
