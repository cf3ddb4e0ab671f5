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
    let need_data =
        matches!(&job.action, Action::Check(r) if *r != crate::repo::check::ReadData::None);
    let repo = ctx.open_repo(need_data)?;
    cancel.check()?;
    match &job.action {
        Action::Backup(sources) if sources.len() == 1 => {
            let out = sources[0].backup(crate::sources::SourceContext {
                repo: &repo,
                opts: backup_options(job, cancel),
                progress: crate::util::progress::Progress::hidden(),
                stdin: None,
            })?;
            finish_backup(&repo, job, out)
        }
        Action::Backup(sources) => backup_point(&repo, job, cancel, sources),
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
    use crate::repo::select::{POINT_INDEX, POINT_SOURCES};
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .expect("a UTC time formats");
    let point = format!("{}-{stamp}-{:04x}", job.name, rand::random::<u16>());
    let kinds: Vec<&str> = sources.iter().map(|s| s.kind()).collect();
    let mut facts = RunFacts::default();
    let mut written = vec![];
    let mut done = vec![];
    let mut failed = vec![];
    for (i, src) in sources.iter().enumerate() {
        cancel.check()?;
        let mut opts = backup_options(job, cancel);
        opts.restore_point = Some(point.clone());
        opts.facts
            .insert(POINT_SOURCES.into(), serde_json::json!(kinds));
        opts.facts.insert(POINT_INDEX.into(), serde_json::json!(i));
        let out = src.backup(crate::sources::SourceContext {
            repo,
            opts,
            progress: crate::util::progress::Progress::hidden(),
            stdin: None,
        });
        match out {
            Ok(out) => {
                let s = &out.summary;
                facts.bytes_read += s.bytes_read;
                facts.bytes_added += s.bytes_added;
                facts.partial |= !s.is_complete();
                facts.snapshots.push(out.snapshot_id.to_string());
                done.push(format!(
                    "#{} {} {}",
                    i + 1,
                    kinds[i],
                    out.snapshot_id.short()
                ));
                written.push(out.snapshot_id);
            }
            Err(e) if e.is_cancelled() => return Err(e),
            Err(e) => failed.push(format!("#{} {}: {e:#}", i + 1, kinds[i])),
        }
    }
    if !failed.is_empty() {
        return Err(LabError::failed(format!(
            "restore point {point} is partial: {} of {} source(s) failed: {}{}",
            failed.len(),
            sources.len(),
            failed.join("; "),
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
