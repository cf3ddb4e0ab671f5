//! Running one attempt of a job, synchronously, on the calling thread: open
//! the repository from the configuration, do the action, apply retention.
//! The same function serves the daemon and `labctl jobs run`.

use crate::error::{CancelFlag, Cancelled, LabError};
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
}

/// The catalog/cache directory for a configuration.
pub fn cache_dir(repo: &RepositoryConfig) -> PathBuf {
    repo.spec().cache_dir()
}

/// The repository ID, read from the backup key file (no storage access).
///
/// # Errors
/// Key errors (missing, unreadable, too open).
pub fn repo_id(repo: &RepositoryConfig) -> anyhow::Result<String> {
    Ok(Keys::load(&repo.backup_key)?.repo_id)
}

/// The repository's directory in the cache: catalog, `jobs.db` (job
/// history) and `locks/`.
///
/// # Errors
/// As [`repo_id`].
pub fn state_dir(repo: &RepositoryConfig) -> anyhow::Result<PathBuf> {
    Ok(cache_dir(repo).join(repo_id(repo)?))
}

/// Where the job history lives (beside the catalog).
///
/// # Errors
/// As [`repo_id`].
pub fn history_path(repo: &RepositoryConfig) -> anyhow::Result<PathBuf> {
    Ok(state_dir(repo)?.join("jobs.db"))
}

/// Runs one attempt of `job`.
///
/// # Errors
/// Whatever stopped the job ([`Cancelled`] when `cancel` was set).
pub fn execute(ctx: &super::ExecContext<'_>) -> anyhow::Result<RunFacts> {
    let (job, cancel) = (ctx.job, ctx.cancel);
    cancel.check()?;
    let need_data =
        matches!(&job.action, Action::Check(r) if *r != crate::repo::check::ReadData::None);
    let repo = ctx.open_repo(need_data)?;
    cancel.check()?;
    match &job.action {
        Action::Backup(source) => {
            let out = source.backup(crate::sources::SourceContext {
                repo: &repo,
                opts: backup_options(job, cancel),
                progress: crate::util::progress::Progress::hidden(),
                stdin: None,
            })?;
            finish_backup(&repo, job, out)
        }
        Action::Forget(policy) => {
            let r = crate::repo::forget::apply(&repo, policy, &["source"], |_| true, false)?;
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
                &repo,
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
        Action::Check(read) => {
            let r = crate::repo::check::check(&repo, *read)?;
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
) -> anyhow::Result<RunFacts> {
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
    if let Some(policy) = &job.retention {
        // Retention for this job's own source only (other sources are
        // other jobs' business).
        let snap = repo.load_snapshot(&out.snapshot_id)?.0;
        let (kind, name) = (snap.source.kind.clone(), snap.source.name.clone());
        let r = crate::repo::forget::apply(
            repo,
            policy,
            &["source"],
            |s| s.source.kind == kind && s.source.name == name,
            false,
        )?;
        let removed = r.decisions.iter().filter(|d| !d.keep).count() - r.locked.len();
        facts
            .detail
            .push_str(&format!("; retention removed {removed} snapshot(s)"));
    }
    Ok(facts)
}

/// True when `e` (or its cause) is a cancellation.
pub fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Cancelled>().is_some())
}
