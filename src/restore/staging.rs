//! `labctl restore --to staging|production`: runs a restore plan on one
//! restore point. [`prepare`] picks the point and says what goes where, in
//! order, with the bytes (that is `--dry-run`, and it writes nothing);
//! [`execute`] restores source after source, verifies each as its kind
//! defines, goes on past a failed source, and returns a [`Report`] with the
//! measured restore time (the RTO). [`cleanup`] removes what a run created
//! (drills).
//!
//! Targets are never half-overwritten: a target that holds data is refused,
//! or with `existing: replace` restored beside it, verified, and swapped in.

use super::plan::{Environment, Existing, Production, RestorePlan};
use crate::error::{CancelFlag, ExitCode, LabError};
use crate::repo::extract::{self, RestoreOptions};
use crate::repo::select::{restore_points, RestorePoint};
use crate::repo::{Id, Repository};
use crate::sources::{etcd, kfp, kube, mlflow, path, pvc, stream, vm};
use crate::util::progress::Progress;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The order kinds are restored in: the platform's layers bottom up
/// (VMs, etcd, Kubernetes objects, PVC data, then databases and files).
/// Kinds land here as their sources do.
pub const ORDER: &[&str] = &[
    vm::KIND,
    etcd::KIND,
    kube::KIND,
    pvc::KIND,
    path::KIND,
    mlflow::KIND,
    kfp::KIND,
    stream::KIND,
];

/// How to pick the point and what to restore.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A point ID, a unique prefix, or `latest` (default: the newest
    /// complete point).
    pub point: Option<String>,
    /// The newest complete point taken at or before this time.
    pub at: Option<String>,
    /// Only these kinds.
    pub only: Vec<String>,
    /// For production: the point ID, typed again.
    pub confirm: Option<String>,
    pub threads: usize,
    /// Progress bars on a terminal.
    pub progress: bool,
    pub cancel: Option<CancelFlag>,
    /// The repository URL and restore key file that restore Jobs in the
    /// cluster read with (PVC data).
    pub job_access: Option<(String, PathBuf)>,
}

/// One source of the point, and where it goes.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Step {
    pub kind: String,
    pub name: String,
    pub snapshot: Id,
    /// Where it goes, in words (a directory, a command, a data directory).
    pub target: String,
    /// The snapshot's size (what the restore writes).
    pub bytes: u64,
    /// What the target holds now: `empty`, `absent`, `will be replaced`.
    pub state: String,
    /// For a VM: the VMID it is restored as (the plan's range, in order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u32>,
    /// Why this step cannot run (no target in the plan, a target that
    /// holds data and `existing: refuse`); it fails when executed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip)]
    problem_code: Option<ExitCode>,
}

/// A plan applied to a point: the steps, in order.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Prepared {
    pub plan: PathBuf,
    pub environment: Environment,
    pub point: String,
    pub point_time: String,
    pub point_complete: bool,
    pub steps: Vec<Step>,
    pub bytes: u64,
    /// Sources of the point left out by `--only`.
    pub left_out: Vec<String>,
}

/// How one source's restore went.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StepReport {
    pub kind: String,
    pub name: String,
    pub snapshot: String,
    pub target: String,
    /// `restored` (and verified, when the plan verifies it) or `failed`.
    pub outcome: String,
    pub bytes: u64,
    pub seconds: f64,
    /// Of `seconds`, the time verification took.
    #[serde(default)]
    pub verify_seconds: f64,
    /// What verification checked, when it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Paths this run created (what cleanup removes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<PathBuf>,
    /// A VM this run created (what cleanup destroys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_vm: Option<CreatedVm>,
    /// Namespaces this run created in a cluster (what cleanup deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_namespaces: Option<CreatedInCluster>,
    /// A claim this run created (`NS/NAME`; what cleanup deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_claim: Option<CreatedInCluster>,
    /// Databases and objects this run created on a staging MySQL server
    /// and bucket (what cleanup drops and deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_kfp: Option<CreatedKfp>,
}

/// What a Kubeflow Pipelines restore created, and where.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreatedKfp {
    pub mysql: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub databases: Vec<String>,
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_credentials_file: Option<PathBuf>,
    pub objects: Vec<String>,
}

/// What a run created in a cluster (labelled `labctl.io/restore`):
/// namespaces, or claims as `NS/NAME`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreatedInCluster {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    pub names: Vec<String>,
}

impl CreatedInCluster {
    /// The cluster they are in.
    fn cluster(&self) -> crate::k8s::KubeTarget {
        crate::k8s::KubeTarget {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }
}

/// A VM a run restored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreatedVm {
    pub platform: PathBuf,
    pub node: String,
    pub vmid: u32,
}

/// What a plan's run did: per source, and the total restore time.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub plan: PathBuf,
    pub environment: String,
    pub point: String,
    pub point_time: String,
    pub started: String,
    /// `success` when every source restored and verified, else `failure`.
    pub outcome: String,
    /// Wall time from the first restore to the last verification: the RTO.
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_objective_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_objective: Option<bool>,
    pub bytes: u64,
    pub steps: Vec<StepReport>,
    /// Set by [`cleanup`]: whether it ran, and what it could not remove.
    #[serde(default)]
    pub cleaned_up: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cleanup_errors: Vec<String>,
}

impl Report {
    /// The first failed source's exit code, or success.
    pub fn exit_code(&self) -> ExitCode {
        self.steps
            .iter()
            .find_map(|s| s.exit_code)
            .map(ExitCode::from_code)
            .unwrap_or(ExitCode::Success)
    }

    /// The failed sources, `kind name: error` each.
    pub fn failures(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| s.outcome != "restored")
            .map(|s| {
                format!(
                    "{} {}: {}",
                    s.kind,
                    s.name,
                    s.error.as_deref().unwrap_or("failed")
                )
            })
            .collect()
    }
}

/// Parses `--at`: RFC 3339, or `YYYY-MM-DD[THH:MM[:SS]]` in UTC.
fn parse_at(text: &str) -> crate::error::Result<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let t = text.replace(' ', "T");
    let full = match t.len() {
        10 => format!("{t}T23:59:59Z"),
        16 => format!("{t}:59Z"),
        19 => format!("{t}Z"),
        _ => t.clone(),
    };
    time::OffsetDateTime::parse(&full, &Rfc3339).map_err(|_| {
        LabError::usage(format!(
            "--at {text:?} is not a time like 2026-12-01, 2026-12-01T03:00 or 2026-12-01T03:00:00Z"
        ))
        .into()
    })
}

fn choose_point<'a>(
    points: &'a [RestorePoint],
    opts: &Options,
) -> crate::error::Result<&'a RestorePoint> {
    if let Some(at) = &opts.at {
        let at = parse_at(at)?;
        let before = |p: &&RestorePoint| {
            time::OffsetDateTime::parse(&p.time, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|t| t <= at)
        };
        return points
            .iter()
            .rev()
            .filter(|p| p.complete)
            .find(before)
            .ok_or_else(|| {
                LabError::usage(format!(
                    "no complete restore point at or before {at} (see `labctl points`)"
                ))
                .into()
            });
    }
    crate::repo::select::find_point(points, opts.point.as_deref().unwrap_or("latest"))
}

/// Is the directory or file at `p` absent, empty, or holding data?
fn holds_data(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Err(_) => false,
        Ok(m) if m.is_dir() => std::fs::read_dir(p).map_or(true, |mut d| d.next().is_some()),
        Ok(_) => true,
    }
}

fn state_of(p: &Path, existing: Existing) -> (String, Option<String>) {
    if !p.exists() {
        return ("absent".into(), None);
    }
    if !holds_data(p) {
        return ("empty".into(), None);
    }
    match existing {
        Existing::Replace => ("holds data: will be replaced".into(), None),
        Existing::Refuse => (
            "holds data".into(),
            Some(format!(
                "{} holds data and the plan says `existing: refuse` (set `existing: replace` to swap it)",
                p.display()
            )),
        ),
    }
}

/// Picks the point and lays out the steps. Reads the repository's
/// manifests and looks at the targets; writes nothing.
///
/// # Errors
/// A staging plan that names production (exit 6, every clash listed), a
/// production restore without the right `--confirm` (exit 6), no such
/// point, an unknown `--only` kind (exit 2).
pub fn prepare(
    repo: &Repository,
    plan: &RestorePlan,
    prod: &Production,
    opts: &Options,
) -> crate::error::Result<Prepared> {
    plan.refuse_clashes(prod)?;
    for k in &opts.only {
        if !ORDER.contains(&k.as_str()) {
            return Err(LabError::usage(format!(
                "--only {k}: not a source kind labctl restores (kinds: {})",
                ORDER.join(", ")
            ))
            .into());
        }
    }
    let snaps = repo.catalog.snapshot_manifests()?;
    let points = restore_points(snaps.iter().map(|(i, s)| (i, s)));
    let point = choose_point(&points, opts)?;
    if plan.environment == Environment::Production && opts.confirm.as_deref() != Some(&point.id) {
        return Err(LabError::refused(format!(
            "restoring over production needs --confirm {} (the point's ID, typed again); nothing was written",
            point.id
        ))
        .into());
    }
    let mut members: Vec<_> = point.members.iter().collect();
    let rank = |k: &str| ORDER.iter().position(|o| *o == k).unwrap_or(ORDER.len());
    members.sort_by_key(|m| (rank(&m.kind), m.index));
    let mut steps = vec![];
    let mut left_out = vec![];
    // VMs take the plan's VMIDs in order; the cluster says which exist.
    let wants_vms = members
        .iter()
        .any(|m| m.kind == vm::KIND && (opts.only.is_empty() || opts.only.contains(&m.kind)));
    let existing = match (&plan.vm, wants_vms) {
        (Some(t), true) => Some(vm::existing_vmids(&t.platform).map_err(|e| format!("{e:#}"))),
        _ => None,
    };
    let mut next_vmid = plan.vm.as_ref().map(|t| t.range().0);
    for m in members {
        if !opts.only.is_empty() && !opts.only.contains(&m.kind) {
            left_out.push(format!("{} {}", m.kind, m.name));
            continue;
        }
        let (mut target, mut state, mut problem, mut code) = target_of(plan, &m.kind, &m.name);
        let mut vmid = None;
        if let (true, Some(t), Some(id)) = (m.kind == vm::KIND, &plan.vm, next_vmid) {
            let (_, last) = t.range();
            next_vmid = Some(id + 1);
            target = format!("VM {id} on {} (bridge {})", t.node, t.bridge);
            vmid = Some(id);
            let refuse = |why: String| (Some(why), Some(ExitCode::Refused));
            (problem, code) = if id > last {
                refuse(format!(
                    "the plan's range {} has no VMID left for this VM",
                    t.vmid_range
                ))
            } else {
                match existing.as_ref().expect("looked up") {
                    Err(e) => (
                        Some(format!("cannot list the cluster's VMs: {e}")),
                        Some(ExitCode::Failure),
                    ),
                    Ok(map) => match map.get(&id) {
                        Some(n) => refuse(format!(
                            "VMID {id} exists (on node {n}): free it or widen vm.vmid_range"
                        )),
                        None => (None, None),
                    },
                }
            };
            state = if problem.is_none() {
                "free".into()
            } else {
                "taken".into()
            };
        }
        steps.push(Step {
            kind: m.kind.clone(),
            name: m.name.clone(),
            snapshot: m.snapshot,
            target,
            bytes: m.bytes_total,
            state,
            vmid,
            problem,
            problem_code: code,
        });
    }
    Ok(Prepared {
        plan: plan.file.clone(),
        environment: plan.environment,
        point: point.id.clone(),
        point_time: point.time.clone(),
        point_complete: point.complete,
        bytes: steps.iter().map(|s| s.bytes).sum(),
        steps,
        left_out,
    })
}

/// Where a source of `kind` named `name` goes under `plan`: (target in
/// words, its state, the problem if it cannot go, the problem's code).
fn target_of(
    plan: &RestorePlan,
    kind: &str,
    name: &str,
) -> (String, String, Option<String>, Option<ExitCode>) {
    let missing = |section: &str| {
        (
            "-".to_string(),
            "-".to_string(),
            Some(format!(
                "the plan {} has no `{section}:` target",
                plan.file.display()
            )),
            Some(ExitCode::Usage),
        )
    };
    let refused = |(state, problem): (String, Option<String>)| {
        let code = problem.as_ref().map(|_| ExitCode::Refused);
        (state, problem, code)
    };
    match kind {
        k if k == etcd::KIND => match &plan.etcd {
            None => missing("etcd"),
            Some(e) => {
                let (s, p, c) = refused(state_of(&e.data_dir, e.existing));
                (format!("data dir {}", e.data_dir.display()), s, p, c)
            }
        },
        k if k == path::KIND => match &plan.path {
            None => missing("path"),
            Some(t) => {
                let dest = super::plan::under(&t.root, Path::new(name));
                let (s, p, c) = refused(state_of(&dest, t.existing));
                (dest.display().to_string(), s, p, c)
            }
        },
        k if k == stream::KIND => match &plan.stream {
            None => missing("stream"),
            Some(t) => {
                if let Some(c) = t.commands.get(name) {
                    return (
                        format!("stdin of `{}`", c.command.join(" ")),
                        "-".into(),
                        None,
                        None,
                    );
                }
                match &t.dir {
                    Some(d) => {
                        let dest = d.join(name);
                        let (s, p, c) = refused(state_of(&dest, t.existing));
                        (dest.display().to_string(), s, p, c)
                    }
                    None => (
                        "-".into(),
                        "-".into(),
                        Some(format!(
                            "the plan {} has no stream.commands entry `{name}` and no stream.dir",
                            plan.file.display()
                        )),
                        Some(ExitCode::Usage),
                    ),
                }
            }
        },
        k if k == pvc::KIND => match &plan.pvc {
            None => missing("pvc"),
            Some(t) => {
                // The snapshot is named pvc/<namespace>/<claim>.
                let Some((ns, claim)) = name.strip_prefix("pvc/").and_then(|r| r.split_once('/'))
                else {
                    return (
                        "-".into(),
                        "-".into(),
                        Some(format!("'{name}' is not a pvc/<namespace>/<name> snapshot")),
                        Some(ExitCode::Usage),
                    );
                };
                match t.map().map(ns) {
                    Some(to) => (
                        format!("PVC {to}/{claim} (a Job restores into it)"),
                        "-".into(),
                        None,
                        None,
                    ),
                    None => (
                        "-".into(),
                        "-".into(),
                        Some(format!(
                            "namespace {ns} is not in pvc.namespace_map of {}",
                            plan.file.display()
                        )),
                        Some(ExitCode::Usage),
                    ),
                }
            }
        },
        k if k == mlflow::KIND => match &plan.mlflow {
            None => missing("mlflow"),
            Some(t) => {
                // The database and the artifact root are one target: either
                // holding data is the target holding data.
                let db = t.database();
                // A PostgreSQL store's tables are checked when it is
                // restored into (refused with tables unless `replace`).
                let (s1, p1) = match t.server_database() {
                    Some(_) => state_of(&t.artifacts, t.existing),
                    None => state_of(&db, t.existing),
                };
                let (s2, p2) = state_of(&t.artifacts, t.existing);
                let state = if s1 == s2 {
                    s1
                } else {
                    format!("database {s1}, artifacts {s2}")
                };
                let problem = p1.or(p2);
                let code = problem.as_ref().map(|_| ExitCode::Refused);
                (
                    format!(
                        "database {}, artifacts {}",
                        if t.server_database().is_some() {
                            crate::util::redact_url(&t.backend_store_uri)
                        } else {
                            db.display().to_string()
                        },
                        t.artifacts.display()
                    ),
                    state,
                    problem,
                    code,
                )
            }
        },
        k if k == kfp::KIND => match &plan.kubeflow_pipelines {
            None => missing("kubeflow_pipelines"),
            Some(t) => (
                format!(
                    "MySQL {}, bucket {}",
                    crate::util::redact_url(&t.mysql),
                    t.bucket
                ),
                "-".into(),
                None,
                None,
            ),
        },
        k if k == kube::KIND => match &plan.kube {
            None => missing("kube"),
            Some(t) => (t.describe(), "-".into(), None, None),
        },
        k if k == vm::KIND => match &plan.vm {
            None => missing("vm"),
            Some(_) => ("-".into(), "-".into(), None, None),
        },
        other => (
            "-".into(),
            "-".into(),
            Some(format!(
                "labctl cannot restore '{other}' snapshots with a plan yet"
            )),
            Some(ExitCode::Usage),
        ),
    }
}

/// Runs the prepared steps in order; a failed source does not stop the
/// others. `log` receives one line per event (start, done, failure).
///
/// # Errors
/// Only for what stops every source (the report itself); a source's own
/// failure is in its [`StepReport`].
pub fn execute(
    repo: &Repository,
    plan: &RestorePlan,
    prep: &Prepared,
    opts: &Options,
    log: &mut dyn FnMut(String),
) -> crate::error::Result<Report> {
    let started_at = crate::util::now_rfc3339();
    let started = Instant::now();
    let mut steps = vec![];
    for (i, step) in prep.steps.iter().enumerate() {
        let t0 = Instant::now();
        log(format!(
            "[{}/{}] {} {} -> {}",
            i + 1,
            prep.steps.len(),
            step.kind,
            step.name,
            step.target
        ));
        let mut created = Created::default();
        let mut verify_seconds = 0.0;
        let result = if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            Err(crate::error::Cancelled.into())
        } else if let Some(p) = &step.problem {
            Err(LabError::new(step.problem_code.unwrap_or(ExitCode::Failure), p.clone()).into())
        } else {
            run_step(repo, plan, step, opts, &mut created, &mut verify_seconds)
        };
        let seconds = t0.elapsed().as_secs_f64();
        let r = match result {
            Ok((bytes, verified)) => {
                log(format!(
                    "      restored {}{} in {seconds:.1}s",
                    crate::util::units::human_bytes(bytes),
                    verified
                        .as_ref()
                        .map(|v| format!(", verified: {v}"))
                        .unwrap_or_default()
                ));
                StepReport {
                    kind: step.kind.clone(),
                    name: step.name.clone(),
                    snapshot: step.snapshot.hex(),
                    target: step.target.clone(),
                    outcome: "restored".into(),
                    bytes,
                    seconds,
                    verify_seconds,
                    verified,
                    error: None,
                    exit_code: None,
                    created: created.paths.clone(),
                    created_vm: created.vm.clone(),
                    created_namespaces: created.namespaces.clone(),
                    created_claim: created.claim.clone(),
                    created_kfp: created.kfp.clone(),
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                log(format!("      FAILED: {msg}"));
                StepReport {
                    kind: step.kind.clone(),
                    name: step.name.clone(),
                    snapshot: step.snapshot.hex(),
                    target: step.target.clone(),
                    outcome: "failed".into(),
                    bytes: 0,
                    seconds,
                    verify_seconds,
                    verified: None,
                    error: Some(msg),
                    exit_code: Some(e.exit_code().code()),
                    created: created.paths.clone(),
                    created_vm: created.vm.clone(),
                    created_namespaces: created.namespaces.clone(),
                    created_claim: created.claim.clone(),
                    created_kfp: created.kfp.clone(),
                }
            }
        };
        steps.push(r);
    }
    let seconds = started.elapsed().as_secs_f64();
    let objective = plan.rto_objective.map(|d| d.as_secs());
    let ok = steps.iter().all(|s| s.outcome == "restored");
    Ok(Report {
        plan: plan.file.clone(),
        environment: plan.environment.as_str().into(),
        point: prep.point.clone(),
        point_time: prep.point_time.clone(),
        started: started_at,
        outcome: if ok { "success" } else { "failure" }.into(),
        seconds,
        rto_objective_seconds: objective,
        within_objective: objective.map(|o| seconds <= o as f64),
        bytes: steps.iter().map(|s| s.bytes).sum(),
        steps,
        cleaned_up: false,
        cleanup_errors: vec![],
    })
}

/// Removes what a run created (its targets that did not exist before),
/// deepest first, and notes it in the report (with what could not be
/// removed). Nothing else is touched: a target that existed before the run
/// (`existing: replace`) stays, and what a stream command loaded is the
/// command's.
pub fn cleanup(report: &mut Report) {
    report.cleanup_errors = remove_created(report);
    report.cleaned_up = true;
}

fn remove_created(report: &Report) -> Vec<String> {
    let mut errors: Vec<String> = report
        .steps
        .iter()
        .filter_map(|s| s.created_vm.as_ref())
        .filter_map(|v| {
            vm::destroy(&v.platform, &v.node, v.vmid)
                .err()
                .map(|e| format!("VM {} on {}: {e:#}", v.vmid, v.node))
        })
        .collect();
    // Claims before namespaces (a namespace's deletion takes its claims
    // along; claims in namespaces the run did not create stay otherwise).
    for s in &report.steps {
        if let Some(c) = &s.created_claim {
            match pvc::delete_restored_claims(&c.cluster(), &c.names) {
                Ok(e) => errors.extend(e),
                Err(e) => errors.push(format!("claims {}: {e:#}", c.names.join(", "))),
            }
        }
    }
    for s in &report.steps {
        if let Some(c) = &s.created_namespaces {
            match kube::delete_restored_namespaces(&c.cluster(), &c.names) {
                Ok(e) => errors.extend(e),
                Err(e) => errors.push(format!("namespaces {}: {e:#}", c.names.join(", "))),
            }
        }
    }
    for s in &report.steps {
        if let Some(k) = &s.created_kfp {
            let args = crate::sources::kfp::KfpRestore {
                kfp_mysql: Some(k.mysql.clone()),
                kfp_password_file: k.password_file.clone(),
                kfp_bucket: Some(k.bucket.clone()),
                kfp_s3_endpoint: k.s3_endpoint.clone(),
                kfp_s3_credentials_file: k.s3_credentials_file.clone(),
            };
            errors.extend(kfp::remove_restored(&args, &k.databases, &k.objects));
        }
    }
    errors.extend(remove_created_paths(report));
    errors
}

fn remove_created_paths(report: &Report) -> Vec<String> {
    let mut paths: Vec<&PathBuf> = report.steps.iter().flat_map(|s| &s.created).collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut errors = vec![];
    for p in paths {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", p.display())),
        }
    }
    errors
}

/// The topmost missing ancestor of `p` (itself when its parent exists):
/// what creating `p` creates, and what cleanup removes.
fn first_missing(p: &Path) -> Option<PathBuf> {
    let mut top = None;
    let mut cur = Some(p);
    while let Some(c) = cur {
        if c.exists() {
            break;
        }
        top = Some(c.to_path_buf());
        cur = c.parent();
    }
    top
}

/// A sibling of `target` on the same filesystem, for restoring beside it.
fn sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    target.with_file_name(format!(
        ".labctl-{tag}-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Puts `new` in place of `target`: the old one is renamed aside first and
/// removed after (so `target` is always whole: the old or the new).
fn swap_in(new: &Path, target: &Path) -> crate::error::Result<()> {
    let old = sibling(target, "old");
    let had_old = target.exists();
    if had_old {
        std::fs::rename(target, &old)?;
    }
    if let Err(e) = std::fs::rename(new, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(LabError::failed(format!(
            "cannot move the restore into {}: {e}",
            target.display()
        ))
        .into());
    }
    if had_old {
        if old.is_dir() {
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::remove_file(&old)?;
        }
    }
    Ok(())
}

/// Removes a half-done sibling when dropped (a failed restore or verify).
struct Leftover(Option<PathBuf>);

impl Drop for Leftover {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
}

/// Where to write: the target itself (absent or empty) or a sibling to
/// swap in afterwards (`existing: replace` on a target with data).
fn write_place(target: &Path) -> (PathBuf, bool) {
    if holds_data(target) {
        (sibling(target, "new"), true)
    } else {
        (target.to_path_buf(), false)
    }
}

/// What one step created (what cleanup removes).
#[derive(Default)]
struct Created {
    paths: Vec<PathBuf>,
    vm: Option<CreatedVm>,
    namespaces: Option<CreatedInCluster>,
    claim: Option<CreatedInCluster>,
    kfp: Option<CreatedKfp>,
}

/// Restores and verifies one step; returns (bytes, what was verified).
fn run_step(
    repo: &Repository,
    plan: &RestorePlan,
    step: &Step,
    opts: &Options,
    created: &mut Created,
    verify_seconds: &mut f64,
) -> crate::error::Result<(u64, Option<String>)> {
    let id = &step.snapshot;
    match step.kind.as_str() {
        k if k == path::KIND => {
            let t = plan.path.as_ref().expect("prepared with a target");
            let target = super::plan::under(&t.root, Path::new(&step.name));
            let (place, swap) = write_place(&target);
            let top = first_missing(&target);
            let mut leftover = Leftover(swap.then(|| place.clone()).or(top.clone()));
            let ropts = RestoreOptions {
                threads: opts.threads,
                no_setuid: !plan.keep_setuid(),
                ..Default::default()
            };
            let progress = Progress::bytes(opts.progress, "restore", Some(step.bytes));
            let summary = extract::restore_to_dir(repo, id, &place, &ropts, progress)?;
            if !summary.failed.is_empty() {
                return Err(LabError::integrity(format!(
                    "{} of the snapshot's files could not be restored: {}",
                    summary.failed.len(),
                    summary.failed.join("; ")
                ))
                .into());
            }
            let vt = Instant::now();
            let verified = if t.verify {
                Some(super::verify::tree_against_snapshot(repo, id, &place)?)
            } else {
                None
            };
            *verify_seconds += vt.elapsed().as_secs_f64();
            if swap {
                swap_in(&place, &target)?;
            }
            leftover.0 = None;
            created.paths.extend(top);
            Ok((summary.bytes, verified))
        }
        k if k == stream::KIND => {
            let t = plan.stream.as_ref().expect("prepared with a target");
            if let Some(c) = t.commands.get(&step.name) {
                let n = pipe_to_command(repo, id, &c.command, opts.threads)?;
                let vt = Instant::now();
                let verified = if c.verify.is_empty() {
                    None
                } else {
                    run_check(&c.verify)?;
                    Some(format!("`{}` exited 0", c.verify.join(" ")))
                };
                *verify_seconds += vt.elapsed().as_secs_f64();
                return Ok((n, verified));
            }
            let dir = t.dir.as_ref().expect("prepared with a target");
            let target = dir.join(&step.name);
            let top = first_missing(dir);
            std::fs::create_dir_all(dir)?;
            let tmp = sibling(&target, "new");
            let mut leftover = Leftover(Some(tmp.clone()));
            let f = std::fs::File::create(&tmp)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let n = extract::restore_to_writer(repo, id, None, &mut w, opts.threads)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            if n != step.bytes {
                return Err(LabError::integrity(format!(
                    "wrote {n} bytes, the snapshot records {}",
                    step.bytes
                ))
                .into());
            }
            swap_in(&tmp, &target)?;
            leftover.0 = None;
            created.paths.push(top.unwrap_or(target));
            Ok((
                n,
                Some(format!("{n} bytes, every chunk checked against its ID")),
            ))
        }
        k if k == etcd::KIND => {
            let t = plan.etcd.as_ref().expect("prepared with a target");
            let (place, swap) = write_place(&t.data_dir);
            let top = first_missing(&t.data_dir);
            let mut leftover = Leftover(swap.then(|| place.clone()).or(top.clone()));
            let args = t.restore_args();
            let r = etcd::restore(repo, id, &args, &place, opts.threads)?;
            let vt = Instant::now();
            let verified = if t.verify {
                let v = etcd::verify_data_dir(repo, id, &args, &r)?;
                *verify_seconds += vt.elapsed().as_secs_f64();
                Some(format!(
                    "a member started on it serves {} keys at revision {}{}",
                    v.keys,
                    v.revision,
                    v.sentinel_key
                        .map(|k| format!(", sentinel key {k:?} present"))
                        .unwrap_or_default()
                ))
            } else {
                None
            };
            if swap {
                swap_in(&place, &t.data_dir)?;
            }
            leftover.0 = None;
            created.paths.extend(top);
            Ok((r.bytes, verified))
        }
        k if k == pvc::KIND => {
            let t = plan.pvc.as_ref().expect("prepared with a target");
            let (ns, claim) = step
                .name
                .strip_prefix("pvc/")
                .and_then(|r| r.split_once('/'))
                .expect("prepared");
            let to = t.map().map(ns).expect("prepared");
            let (url, key) = opts.job_access.clone().ok_or_else(|| {
                LabError::usage("restoring PVC data runs Jobs that read the repository: they need its URL and the restore key")
            })?;
            let args = pvc::PvcRestore {
                to_pvc: Some(format!("{to}/{claim}")),
                storage_class: t.storage_class.clone(),
                image: t.image.clone(),
                job_timeout: t.job_timeout.clone(),
                adopt_restored: true,
            };
            let access = pvc::JobAccess {
                repo_url: &url,
                restore_key: &key,
            };
            let cluster = t.cluster();
            let r = pvc::restore_to_pvc(repo, id, &args, &cluster, &access)?;
            created.claim = Some(CreatedInCluster {
                kubeconfig: t.kubeconfig.clone(),
                context: t.context.clone(),
                names: vec![format!("{to}/{claim}")],
            });
            if !r.warnings.is_empty() {
                return Err(LabError::failed(r.warnings.join("; ")).into());
            }
            Ok((
                step.bytes,
                Some(format!(
                    "Job {} restored it into PVC {}/{} and exited 0 (every chunk checked against its ID)",
                    r.job, r.namespace, r.pvc
                )),
            ))
        }
        k if k == mlflow::KIND => {
            let t = plan.mlflow.as_ref().expect("prepared with a target");
            let db = t.database();
            // A drill's cleanup removes the files it created; a PostgreSQL
            // staging database stays (loaded; the next drill replaces it).
            let db_top = if t.server_database().is_none() {
                first_missing(&db)
            } else {
                None
            };
            let tops: Vec<PathBuf> = [db_top, first_missing(&t.artifacts)]
                .into_iter()
                .flatten()
                .collect();
            let r = mlflow::restore(
                repo,
                id,
                &t.restore_args(),
                t.existing == Existing::Replace,
                opts.threads,
            )?;
            created.paths.extend(tops);
            let vt = Instant::now();
            let verified = match &t.verify_tracking_uri {
                Some(url) => {
                    let _server = if t.verify_server.is_empty() {
                        None
                    } else {
                        Some(Server::start(&t.verify_server, url)?)
                    };
                    let v = mlflow::verify(repo, id, url, opts.threads)?;
                    Some(format!(
                        "MLflow {} on the restored store serves {} experiments, {} runs, {} registered models, {} versions as backed up; {} metric histories and {} artifacts compared",
                        v.server_version, v.experiments, v.runs, v.registered_models, v.model_versions, v.metric_histories, v.artifacts
                    ))
                }
                None => Some(format!(
                    "alembic {}; {} artifact URI(s) rewritten",
                    r.alembic_revision,
                    r.rewritten.values().sum::<usize>()
                )),
            };
            *verify_seconds += vt.elapsed().as_secs_f64();
            Ok((r.bytes, verified))
        }
        k if k == kfp::KIND => {
            let t = plan
                .kubeflow_pipelines
                .as_ref()
                .expect("prepared with a target");
            let args = t.restore_args();
            let r = kfp::restore(
                repo,
                id,
                &args,
                t.existing == Existing::Replace,
                opts.threads,
            )?;
            created.kfp = Some(CreatedKfp {
                mysql: t.mysql.clone(),
                password_file: t.password_file.clone(),
                databases: r.created_databases.clone(),
                bucket: t.bucket.clone(),
                s3_endpoint: t.s3_endpoint.clone(),
                s3_credentials_file: t.s3_credentials_file.clone(),
                objects: r.uploaded.clone(),
            });
            *verify_seconds += r.verify_seconds;
            let r = r.verified()?;
            Ok((r.bytes, Some(r.summary())))
        }
        k if k == kube::KIND => {
            let t = plan.kube.as_ref().expect("prepared with a target");
            let args = t.restore_args();
            let r = kube::restore(repo, id, &[], &args, false)?;
            if !r.created_namespaces.is_empty() {
                created.namespaces = Some(CreatedInCluster {
                    kubeconfig: t.kubeconfig.clone(),
                    context: t.context.clone(),
                    names: r.created_namespaces.clone(),
                });
            }
            *verify_seconds += r.verify_seconds;
            let failures = r.failures();
            if !failures.is_empty() {
                return Err(LabError::failed(format!(
                    "{} of {} objects failed: {}{}",
                    failures.len(),
                    r.objects.len(),
                    failures
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; "),
                    if failures.len() > 5 { "; ..." } else { "" }
                ))
                .into());
            }
            Ok((
                step.bytes,
                Some(format!(
                    "{} objects created, {} updated, {} skipped; {} read back equal, {} owner references re-linked",
                    r.created, r.updated, r.skipped, r.verified, r.owner_links
                )),
            ))
        }
        k if k == vm::KIND => {
            let t = plan.vm.as_ref().expect("prepared with a target");
            let vmid = step.vmid.expect("prepared with a VMID");
            let args = vm::VmRestore {
                to_vm: true,
                node: Some(t.node.clone()),
                vmid: Some(vmid),
                vmid_range: Some(t.vmid_range.clone()),
                storage: t.storage.clone(),
                bridge: Some(t.bridge.clone()),
                start: t.start,
                platform: t.platform.clone(),
            };
            let r = vm::restore(repo, id, &args, opts.threads);
            // The VMID was free when prepared: if it exists now, this run
            // made it (whole or not), and cleanup may destroy it.
            let exists = match &r {
                Ok(_) => true,
                Err(_) => vm::existing_vmids(&t.platform)
                    .map(|m| m.contains_key(&vmid))
                    .unwrap_or(false),
            };
            if exists {
                created.vm = Some(CreatedVm {
                    platform: t.platform.clone(),
                    node: t.node.clone(),
                    vmid,
                });
            }
            let r = r?;
            Ok((
                r.bytes,
                Some(format!("VM {vmid} on {}: {}", r.node, r.verified)),
            ))
        }
        other => Err(LabError::usage(format!("cannot restore '{other}' snapshots")).into()),
    }
}

/// A server a plan starts to verify a restore through (MLflow on the
/// restored store), stopped (its whole process group) when dropped.
struct Server(std::process::Child);

impl Server {
    /// Starts `argv` and waits (up to 2 minutes) until `url` answers.
    fn start(argv: &[String], url: &str) -> crate::error::Result<Server> {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::usage(format!("cannot start {}: {e}", argv[0])))?;
        let mut server = Server(child);
        let addr = url
            .split("://")
            .nth(1)
            .unwrap_or(url)
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let end = Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(Some(st)) = server.0.try_wait() {
                return Err(LabError::failed(format!(
                    "the verification server `{}` exited ({st}) before answering at {url}",
                    argv.join(" ")
                ))
                .into());
            }
            // Ready when /health answers 200 (MLflow's readiness endpoint).
            if let Ok(mut c) = std::net::TcpStream::connect(&addr) {
                use std::io::{Read, Write};
                let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let _ = write!(c, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                let mut head = [0u8; 12];
                if c.read_exact(&mut head).is_ok() && head.ends_with(b" 200") {
                    return Ok(server);
                }
            }
            if Instant::now() > end {
                return Err(LabError::failed(format!(
                    "the verification server `{}` did not answer at {url} within 2 minutes",
                    argv.join(" ")
                ))
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this Server started.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Streams a snapshot into a program's standard input; its exit status
/// and the stream's end are checked.
fn pipe_to_command(
    repo: &Repository,
    id: &Id,
    argv: &[String],
    threads: usize,
) -> crate::error::Result<u64> {
    let fed = stream::feed_command(repo, id, argv, threads)?;
    if !fed.status.success() {
        return Err(LabError::failed(format!(
            "`{}` exited with {}: {}",
            argv[0], fed.status, fed.last_line
        ))
        .into());
    }
    fed.written
}

/// Runs a check program; exit status 0 passes.
fn run_check(argv: &[String]) -> crate::error::Result<()> {
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| LabError::usage(format!("cannot run {}: {e}", argv[0])))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(LabError::integrity(format!(
            "the check `{}` exited with {}: {}",
            argv.join(" "),
            out.status,
            err.trim().lines().last().unwrap_or("")
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_accepts_dates_and_times() {
        let t = parse_at("2026-12-01").unwrap();
        assert_eq!(t.hour(), 23);
        assert_eq!(parse_at("2026-12-01T03:00").unwrap().minute(), 0);
        assert!(parse_at("2026-12-01T03:00:00+01:00").is_ok());
        assert!(parse_at("yesterday").is_err());
    }

    #[test]
    fn a_swap_leaves_the_target_whole() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("old"), b"1").unwrap();
        let n = sibling(&t, "new");
        std::fs::create_dir(&n).unwrap();
        std::fs::write(n.join("new"), b"2").unwrap();
        swap_in(&n, &t).unwrap();
        assert!(t.join("new").exists() && !t.join("old").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(
            first_missing(&d.path().join("a/b")),
            Some(d.path().join("a"))
        );
    }
}
