//! Running one attempt of a job, synchronously, on the calling thread: open
//! the repository from the configuration, do the action, apply retention.
//! The same function serves the daemon and `labctl jobs run`.

use crate::error::{CancelFlag, LabError};
use crate::repo::keys::Keys;
use crate::repo::Repository;
use crate::schedule::config::{Action, Job, RepositoryConfig};
use std::path::PathBuf;

/// What one successful (or partial) attempt did.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunFacts {
    pub bytes_read: u64,
    pub bytes_added: u64,
    pub snapshots: Vec<String>,
    /// The backup finished but some files could not be read.
    pub partial: bool,
    /// One line for logs and notifications.
    pub detail: String,
    /// The repository's packs and bytes after the run (for `/metrics`).
    pub repository: Option<(u64, u64)>,
}

/// The catalog/cache directory for a configuration.
pub fn cache_dir(repo: &RepositoryConfig) -> PathBuf {
    repo.spec().cache_dir()
}

/// The repository ID, read from the backup key file (no storage access).
///
/// # Errors
/// Key errors (missing, unreadable, too open).
pub fn repo_id(repo: &RepositoryConfig) -> crate::error::Result<String> {
    Ok(Keys::load(&repo.backup_key)?.repo_id)
}

/// The repository's directory in the cache: catalog, `jobs.db` (job
/// history) and `locks/`.
///
/// # Errors
/// As [`repo_id`].
pub fn state_dir(repo: &RepositoryConfig) -> crate::error::Result<PathBuf> {
    Ok(cache_dir(repo).join(repo_id(repo)?))
}

/// Where the job history lives (beside the catalog).
///
/// # Errors
/// As [`repo_id`].
pub fn history_path(repo: &RepositoryConfig) -> crate::error::Result<PathBuf> {
    Ok(state_dir(repo)?.join("jobs.db"))
}

/// Runs one attempt of `job`.
///
/// # Errors
/// Whatever stopped the job ([`Cancelled`] when `cancel` was set).
pub fn execute(ctx: &super::ExecContext<'_>) -> crate::error::Result<RunFacts> {
    let (job, cancel) = (ctx.job, ctx.cancel);
    cancel.check()?;
    let need_data = match &job.action {
        Action::Check(r) => *r != crate::repo::check::ReadData::None,
        Action::Drill { .. } => true,
        _ => false,
    };
    let repo = ctx.open_repo(need_data)?;
    cancel.check()?;
    let mut facts = run_action(ctx, &repo)?;
    facts.repository = repo.catalog.packs_total().ok();
    Ok(facts)
}

fn run_action(ctx: &super::ExecContext<'_>, repo: &Repository) -> crate::error::Result<RunFacts> {
    let (job, cancel) = (ctx.job, ctx.cancel);
    match &job.action {
        Action::Backup(sources)
            if sources.len() == 1 && !matches!(sources[0], crate::sources::SourceSpec::Pvc(_)) =>
        {
            let out =
                sources[0]
                    .with_platform(&ctx.env.kube)
                    .backup(crate::sources::SourceContext {
                        repo,
                        opts: backup_options(job, cancel),
                        progress: crate::util::progress::Progress::hidden(),
                        stdin: None,
                    })?;
            finish_backup(repo, job, out)
        }
        Action::Backup(sources) => {
            // Selections of several (every PVC on this node) resolved now.
            let mut expanded = vec![];
            let mut notes = vec![];
            for s in sources {
                let (list, n) = s.with_platform(&ctx.env.kube).expand()?;
                expanded.extend(list);
                notes.extend(n);
            }
            let mut facts = if expanded.is_empty() {
                RunFacts {
                    detail: "nothing to back up on this host".into(),
                    ..Default::default()
                }
            } else {
                backup_point(repo, job, cancel, &expanded)?
            };
            if !notes.is_empty() {
                facts
                    .detail
                    .push_str(&format!("; left out: {}", notes.join("; ")));
            }
            Ok(facts)
        }
        Action::Forget(policy) => {
            let r = crate::repo::forget::apply(repo, policy, &["source"], |_| true, false)?;
            let removed = r.decisions.iter().filter(|d| !d.keep).count();
            Ok(RunFacts {
                detail: format!(
                    "forget: kept {}, removed {removed}{}",
                    r.decisions.len() - removed,
                    if r.locked.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} held by Object Lock)", r.locked.len())
                    }
                ),
                ..Default::default()
            })
        }
        Action::Prune {
            grace,
            repack_threshold,
        } => {
            let r = crate::repo::prune::prune(
                repo,
                &crate::repo::prune::PruneOptions {
                    grace: *grace,
                    repack_threshold: *repack_threshold,
                    ..Default::default()
                },
            )?;
            Ok(RunFacts {
                detail: format!(
                    "prune: marked {} pack(s), repacked {}, deleted {} ({} bytes)",
                    r.packs_marked.len(),
                    r.packs_repacked.len(),
                    r.packs_deleted.len(),
                    r.bytes_deleted
                ),
                ..Default::default()
            })
        }
        Action::Drill {
            plan,
            cleanup,
            only,
        } => drill(ctx, repo, plan, *cleanup, only),
        Action::Check(read) => {
            let r = crate::repo::check::check(repo, *read)?;
            if !r.is_clean() {
                let mut problems = r.errors.clone();
                problems.extend(
                    r.damage
                        .iter()
                        .map(|d| format!("pack {}: {}", d.pack, d.problem)),
                );
                return Err(LabError::integrity(format!(
                    "check found {} problem(s): {}",
                    problems.len(),
                    problems.join("; ")
                ))
                .into());
            }
            Ok(RunFacts {
                bytes_read: 0,
                detail: format!(
                    "check: {} pack(s), {} snapshot(s), {} pack(s) read, clean",
                    r.packs, r.snapshots, r.packs_read
                ),
                ..Default::default()
            })
        }
    }
}

fn backup_options(job: &Job, cancel: &CancelFlag) -> crate::repo::backup::BackupOptions {
    let mut facts = std::collections::BTreeMap::new();
    facts.insert(
        "job".to_string(),
        serde_json::Value::String(job.name.clone()),
    );
    crate::repo::backup::BackupOptions {
        tags: job.tags.clone(),
        facts,
        cancel: Some(cancel.clone()),
        ..Default::default()
    }
}

fn finish_backup(
    repo: &Repository,
    job: &Job,
    out: crate::repo::backup::BackupOutcome,
) -> crate::error::Result<RunFacts> {
    let s = &out.summary;
    let mut facts = RunFacts {
        bytes_read: s.bytes_read,
        bytes_added: s.bytes_added,
        snapshots: vec![out.snapshot_id.to_string()],
        partial: !s.is_complete(),
        detail: format!(
            "snapshot {}: {} new, {} changed, {} unchanged file(s); read {} bytes, added {}",
            out.snapshot_id.short(),
            s.files_new,
            s.files_changed,
            s.files_unchanged,
            s.bytes_read,
            s.bytes_added
        ),
        ..Default::default()
    };
    for (list, what) in [
        (&s.changed, "changed while being read"),
        (&s.errors, "could not be read"),
    ] {
        if !list.is_empty() {
            let first: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
            facts.detail.push_str(&format!(
                "; {} file(s) {what}: {}",
                list.len(),
                first.join("; ")
            ));
        }
    }
    retention(repo, job, &[out.snapshot_id], &mut facts)?;
    Ok(facts)
}

/// Retention for the sources of the snapshots this run wrote only (other
/// sources are other jobs' business); complete restore points are kept or
/// removed whole.
fn retention(
    repo: &Repository,
    job: &Job,
    written: &[crate::repo::Id],
    facts: &mut RunFacts,
) -> crate::error::Result<()> {
    let Some(policy) = &job.retention else {
        return Ok(());
    };
    let mut sources = vec![];
    for id in written {
        let snap = repo.load_snapshot(id)?.0;
        sources.push((snap.source.kind.clone(), snap.source.name.clone()));
    }
    let r = crate::repo::forget::apply(
        repo,
        policy,
        &["source"],
        |s| {
            sources
                .iter()
                .any(|(k, n)| s.source.kind == *k && s.source.name == *n)
        },
        false,
    )?;
    let removed = r.decisions.iter().filter(|d| !d.keep).count() - r.locked.len();
    facts
        .detail
        .push_str(&format!("; retention removed {removed} snapshot(s)"));
    Ok(())
}

/// A multi-source job: one snapshot per source, all in one restore point
/// whose snapshots record the kinds it was to hold (so its completeness is
/// known from the repository alone). A failing source does not stop the
/// others; the run then fails naming it, and the point stays partial.
fn backup_point(
    repo: &Repository,
    job: &Job,
    cancel: &CancelFlag,
    sources: &[crate::sources::SourceSpec],
) -> crate::error::Result<RunFacts> {
    let run = crate::sources::backup_point(
        repo,
        &job.name,
        sources,
        &backup_options(job, cancel),
        &|_| crate::util::progress::Progress::hidden(),
    )?;
    let point = &run.point;
    let mut facts = RunFacts::default();
    let mut written = vec![];
    let mut done = vec![];
    for (i, kind, out) in &run.written {
        let s = &out.summary;
        facts.bytes_read += s.bytes_read;
        facts.bytes_added += s.bytes_added;
        facts.partial |= !s.is_complete();
        facts.snapshots.push(out.snapshot_id.to_string());
        done.push(format!("#{} {kind} {}", i + 1, out.snapshot_id.short()));
        written.push(out.snapshot_id);
    }
    if !run.failed.is_empty() {
        return Err(LabError::failed(format!(
            "restore point {point} is partial: {} of {} source(s) failed: {}{}",
            run.failed.len(),
            sources.len(),
            run.failed.join("; "),
            if done.is_empty() {
                String::new()
            } else {
                format!(" (written: {})", done.join(", "))
            }
        ))
        .into());
    }
    facts.detail = format!(
        "restore point {point} complete: {}; read {} bytes, added {}",
        done.join(", "),
        facts.bytes_read,
        facts.bytes_added
    );
    retention(repo, job, &written, &mut facts)?;
    Ok(facts)
}

/// How many drill reports each job keeps in `jobs.db`.
const DRILLS_KEEP: usize = 400;

/// A restore drill: the newest complete point into staging as the plan
/// says, verified; the report recorded (whatever the outcome) with its RTO;
/// with `cleanup`, what it created removed. Fails naming each source that
/// failed and why.
fn drill(
    ctx: &super::ExecContext<'_>,
    repo: &Repository,
    plan_path: &std::path::Path,
    cleanup: bool,
    only: &[String],
) -> crate::error::Result<RunFacts> {
    use crate::restore::{plan, staging};
    let started_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let plan = plan::load(plan_path)?;
    if plan.environment != plan::Environment::Staging {
        return Err(LabError::refused(format!(
            "{} is not a staging plan: drills restore into staging only",
            plan_path.display()
        ))
        .into());
    }
    let opts = staging::Options {
        only: only.to_vec(),
        cancel: Some(ctx.cancel.clone()),
        job_access: ctx
            .env
            .repo
            .restore_key
            .clone()
            .map(|k| (ctx.env.repo.url.clone(), k)),
        ..Default::default()
    };
    let prep = staging::prepare(repo, &plan, &ctx.env.production, &opts)?;
    let mut report = staging::execute(repo, &plan, &prep, &opts, &mut |_| {})?;
    if cleanup {
        staging::cleanup(&mut report);
    }
    let history = crate::records::jobs::JobHistory::open(&history_path(&ctx.env.repo)?)?;
    history.drill_record(
        &crate::records::jobs::DrillRecord {
            id: 0,
            job: ctx.job.name.clone(),
            started_ms,
            point: report.point.clone(),
            outcome: report.outcome.clone(),
            seconds: report.seconds,
            report: serde_json::to_value(&report)?,
        },
        DRILLS_KEEP,
    )?;
    if report.outcome != "success" {
        return Err(LabError::new(
            report.exit_code(),
            format!(
                "drill of restore point {} failed: {}",
                report.point,
                report.failures().join("; ")
            ),
        )
        .into());
    }
    if !report.cleanup_errors.is_empty() {
        return Err(LabError::failed(format!(
            "drill of restore point {} passed, but cleanup could not remove: {}",
            report.point,
            report.cleanup_errors.join("; ")
        ))
        .into());
    }
    Ok(RunFacts {
        bytes_read: report.bytes,
        snapshots: report.steps.iter().map(|s| s.snapshot.clone()).collect(),
        detail: format!(
            "drill: restore point {} restored into staging and verified ({} source(s)) in {:.1}s{}",
            report.point,
            report.steps.len(),
            report.seconds,
            match (report.rto_objective_seconds, report.within_objective) {
                (Some(o), Some(true)) => format!(", within the {o}s objective"),
                (Some(o), Some(false)) => format!(", ABOVE the {o}s objective"),
                _ => String::new(),
            }
        ),
        ..Default::default()
    })
}
