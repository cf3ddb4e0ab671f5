//! The daemon: cron-scheduled jobs from `labctl.toml`, on one tokio runtime.
//!
//! - **Locks.** Each run holds an exclusive `flock` on
//!   `<cache>/<repo-id>/locks/<job>.lock` for its whole life (all attempts).
//!   A scheduled run finding it held (another daemon, a manual
//!   `labctl jobs run`) is recorded as `skipped`; a manual run waits for it.
//! - **Concurrency.** At most `max_concurrent_jobs` runs do work at once; the
//!   rest queue. A job whose previous run is still going when its next time
//!   comes is recorded as `skipped` for that time.
//! - **Failures.** Each attempt runs on its own thread; an error or a panic
//!   becomes the attempt's outcome, is retried per the job's `retries`
//!   (`retry_delay`, doubling), logged, recorded and notified — and never
//!   stops the daemon.
//! - **Timeouts and shutdown** set the attempt's cancel flag: a backup stops
//!   at its next file or chunk without writing a snapshot (what it uploaded
//!   stays, and the next run re-uses it); a stream's command is killed.
//! - **Missed runs** (the daemon was down at a scheduled time, judged from
//!   the newest scheduled time in the job's history): `run-once` runs the job
//!   once at start-up, however many times were missed; `skip` waits for the
//!   next time. A job with no history has missed nothing.
//! - **History** of every run (trigger, start, end, outcome, attempts,
//!   bytes, snapshot IDs, error) goes to the catalog's `job_runs` table.

pub mod clock;
pub mod config;
pub mod cron;
pub mod metrics;
pub mod notify;
pub mod runner;

use crate::error::CancelFlag;
use crate::records::jobs::{JobHistory, JobRun, Outcome};
use crate::schedule::config::{Job, Loaded, MissedRuns, Notify, RepositoryConfig};
use chrono::{DateTime, Utc};
use clock::Clock;
use metrics::SharedMetrics;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};

/// Requests to a running daemon.
#[derive(Debug, Clone)]
pub enum Control {
    /// Re-read the configuration file (SIGHUP). A bad file is reported and
    /// the running configuration kept.
    Reload,
    /// Stop (SIGTERM/SIGINT): no new runs; running ones get the grace period.
    Shutdown,
}

/// What the daemon did, for logs, tests and scripting.
#[derive(Debug, Clone)]
pub enum DaemonEvent {
    Ready {
        metrics_addr: Option<std::net::SocketAddr>,
    },
    Started {
        job: String,
        trigger: String,
        scheduled: Option<DateTime<Utc>>,
    },
    Retrying {
        job: String,
        attempt: u32,
        error: String,
    },
    Finished(JobRun),
    Skipped {
        job: String,
        reason: String,
    },
    MissedSkipped {
        job: String,
        count: usize,
    },
    Notified {
        job: String,
        event: notify::Event,
    },
    NotifyFailed {
        job: String,
        error: String,
    },
    Reloaded,
    ReloadFailed(String),
    ShuttingDown,
    Stopped,
}

/// Runs of each job kept in the history (older ones are dropped).
pub const HISTORY_KEEP: usize = 2000;

/// How a run deals with a lock another run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Skip,
    Wait,
}

/// What a job run needs besides the job itself.
#[derive(Clone)]
pub struct JobContext {
    pub env: JobEnv,
    /// [`runner::state_dir`] of `repo`, resolved once (so a key file that
    /// later becomes unreadable fails runs visibly, recorded and notified,
    /// instead of failing before a run can be recorded).
    pub state_dir: PathBuf,
    pub notify: Option<Notify>,
    pub clock: Arc<dyn Clock>,
    pub events: broadcast::Sender<DaemonEvent>,
    pub metrics: SharedMetrics,
    /// Becomes `true` when running jobs must be cancelled.
    pub stop: watch::Receiver<bool>,
    pub permits: Arc<Semaphore>,
    pub host: String,
    /// Log lines on stderr.
    pub log: bool,
    /// Runs one attempt ([`runner::execute`]; tests substitute their own).
    pub executor: Executor,
}

/// The function that runs one attempt of a job on its own thread.
pub type Executor = fn(&ExecContext<'_>) -> crate::error::Result<runner::RunFacts>;

/// What jobs may reach, from labctl.toml: the repository, the cluster,
/// Proxmox VE and the restore plans. Replaced as a whole on reload.
#[derive(Debug, Clone)]
pub struct JobEnv {
    pub repo: RepositoryConfig,
    /// The Kubernetes client factory.
    pub kube: crate::k8s::KubeTarget,
    /// The platform file, from which the PVE client is made.
    pub platform_file: Option<PathBuf>,
    /// The folder of restore plans.
    pub restore_plans: Option<PathBuf>,
    /// What production is (every backup job's sources): a drill's staging
    /// plan must not name it.
    pub production: crate::restore::plan::Production,
}

impl JobEnv {
    /// The environment a configuration file describes.
    pub fn from_config(loaded: &crate::schedule::config::Loaded) -> JobEnv {
        let c = &loaded.raw;
        JobEnv {
            production: loaded.production(),
            repo: c.repository.clone(),
            kube: crate::k8s::KubeTarget {
                kubeconfig: c.platform.kubeconfig.clone(),
                context: c.platform.kube_context.clone(),
            },
            platform_file: c.platform.platform_file.clone(),
            restore_plans: c.platform.restore_plans.clone(),
        }
    }
}

/// One attempt of one job: what the executor receives. Multi-source
/// backups and drills reach everything through it.
pub struct ExecContext<'a> {
    pub env: &'a JobEnv,
    pub job: &'a Job,
    /// Set on timeout or shutdown; long work checks it.
    pub cancel: &'a CancelFlag,
}

impl ExecContext<'_> {
    /// Opens the repository (the restore key when `need_data`).
    ///
    /// # Errors
    /// Key, storage or integrity errors.
    pub fn open_repo(&self, need_data: bool) -> crate::error::Result<crate::repo::Repository> {
        self.env.repo.spec().open(need_data)
    }

    /// Connects to Proxmox VE as the platform file says (on the caller's
    /// runtime).
    ///
    /// # Errors
    /// A usage error when labctl.toml names no platform file; the platform
    /// file's own errors; connection errors.
    pub async fn pve(&self) -> crate::error::Result<crate::proxmox::Client> {
        let path = self.env.platform_file.as_ref().ok_or_else(|| {
            crate::error::LabError::usage(
                "this job needs Proxmox VE: set platform.platform_file in labctl.toml",
            )
        })?;
        let platform = crate::provision::platform::load(path)?;
        crate::provision::connect(&platform).await
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

impl JobContext {
    fn emit(&self, ev: DaemonEvent) {
        if self.log {
            log_event(&self.clock.now(), &ev);
        }
        let _ = self.events.send(ev);
    }

    fn catalog(&self) -> crate::error::Result<JobHistory> {
        JobHistory::open(&self.state_dir.join("jobs.db"))
    }

    fn lock_path(&self, job: &str) -> crate::error::Result<PathBuf> {
        Ok(self.state_dir.join("locks").join(format!("{job}.lock")))
    }
}

/// Prints one event as a log line.
pub fn log_event(now: &DateTime<Utc>, ev: &DaemonEvent) {
    let t = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let line = match ev {
        DaemonEvent::Ready { metrics_addr } => match metrics_addr {
            Some(a) => format!("daemon ready; metrics on http://{a}/metrics"),
            None => "daemon ready; metrics endpoint off".into(),
        },
        DaemonEvent::Started { job, trigger, .. } => format!("job={job} started ({trigger})"),
        DaemonEvent::Retrying {
            job,
            attempt,
            error,
        } => {
            format!("job={job} attempt {attempt} failed, will retry: {error}")
        }
        DaemonEvent::Finished(r) => format!(
            "job={} finished outcome={} attempts={} bytes_read={} bytes_added={}{}",
            r.job,
            r.outcome,
            r.attempts,
            r.bytes_read,
            r.bytes_added,
            r.error
                .as_ref()
                .map(|e| format!(" error={e}"))
                .or_else(|| r.detail.as_ref().map(|d| format!(" detail={d}")))
                .unwrap_or_default()
        ),
        DaemonEvent::Skipped { job, reason } => format!("job={job} skipped: {reason}"),
        DaemonEvent::MissedSkipped { job, count } => {
            format!("job={job} missed {count} scheduled run(s) while down; policy skip")
        }
        DaemonEvent::Notified { job, event } => format!("job={job} notified ({event:?})"),
        DaemonEvent::NotifyFailed { job, error } => {
            format!("job={job} notification failed: {error}")
        }
        DaemonEvent::Reloaded => "configuration reloaded".into(),
        DaemonEvent::ReloadFailed(e) => {
            format!("configuration NOT reloaded, keeping the old one: {e}")
        }
        DaemonEvent::ShuttingDown => "shutting down: no new runs; waiting for running jobs".into(),
        DaemonEvent::Stopped => "daemon stopped".into(),
    };
    eprintln!("{t} labctl: {line}");
}

/// An exclusive, non-blocking flock on a job's lock file (`None`: held elsewhere).
fn take_lock(path: &Path) -> crate::error::Result<Option<std::fs::File>> {
    crate::util::lock::try_exclusive(path)
}

/// Whether a job's lock is free right now (so no process runs it).
fn lock_is_free(path: &Path) -> bool {
    matches!(take_lock(path), Ok(Some(_)))
}

fn update_metrics(ctx: &JobContext, job: &Job, f: impl FnOnce(&mut metrics::JobMetrics)) {
    let mut m = ctx.metrics.lock().expect("metrics");
    let e = m.jobs.entry(job.name.clone()).or_default();
    e.kind = job.action.kind().into();
    e.writes_points = matches!(&job.action, config::Action::Backup(s) if s.len() > 1);
    f(e);
}

/// A drill job's metrics from its newest passed drill in the history.
fn seed_drill_metrics(ctx: &JobContext, job: &Job) -> crate::error::Result<()> {
    if !matches!(job.action, config::Action::Drill { .. }) {
        return Ok(());
    }
    let last = ctx.catalog()?.drills(Some(&job.name), true, 1)?.pop();
    let Some(d) = last else { return Ok(()) };
    let report: crate::restore::staging::Report = match serde_json::from_value(d.report) {
        Ok(r) => r,
        Err(_) => return Ok(()),
    };
    update_metrics(ctx, job, |m| {
        m.drill_last_success =
            DateTime::from_timestamp(d.started_ms / 1000 + report.seconds as i64, 0);
        m.drill_rto = report
            .steps
            .iter()
            .map(|s| (format!("{}:{}", s.kind, s.name), s.seconds))
            .chain([("total".to_string(), report.seconds)])
            .collect();
        m.drill_rto_objective = report.rto_objective_seconds.map(|o| o as f64);
    });
    Ok(())
}

/// Runs one job now: lock, attempts with timeout and retries, history,
/// metrics, notification. Used by the scheduler and by `labctl jobs run`.
///
/// # Errors
/// Only when the run cannot even be recorded (key or catalog unreadable);
/// job failures are in the returned record.
pub async fn run_job(
    ctx: &JobContext,
    job: &Job,
    trigger: &str,
    scheduled: Option<DateTime<Utc>>,
    lock: LockMode,
) -> crate::error::Result<JobRun> {
    run_job_marking(ctx, job, trigger, scheduled, lock, None).await
}

/// [`run_job`], clearing `busy` just before reporting the end of the run.
async fn run_job_marking(
    ctx: &JobContext,
    job: &Job,
    trigger: &str,
    scheduled: Option<DateTime<Utc>>,
    lock: LockMode,
    busy: Option<&std::sync::atomic::AtomicBool>,
) -> crate::error::Result<JobRun> {
    let clear = || {
        if let Some(b) = busy {
            b.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let lock_path = ctx.lock_path(&job.name)?;
    let held = match take_lock(&lock_path)? {
        Some(f) => f,
        None if lock == LockMode::Skip => {
            let now = ms(ctx.clock.now());
            let cat = ctx.catalog()?;
            let id = cat.job_run_start(&job.name, trigger, scheduled.map(ms), now)?;
            let run = JobRun {
                id,
                job: job.name.clone(),
                trigger: trigger.into(),
                scheduled_ms: scheduled.map(ms),
                started_ms: now,
                finished_ms: Some(now),
                outcome: Outcome::Skipped,
                error: Some("another run of this job holds its lock".into()),
                ..Default::default()
            };
            cat.job_run_finish(id, &run)?;
            update_metrics(ctx, job, |m| {
                *m.outcomes.entry(Outcome::Skipped).or_default() += 1
            });
            clear();
            ctx.emit(DaemonEvent::Skipped {
                job: job.name.clone(),
                reason: "another run of this job holds its lock".into(),
            });
            return Ok(run);
        }
        None => {
            eprintln!(
                "labctl: job {} is running elsewhere; waiting for it to finish",
                job.name
            );
            let mut stop = ctx.stop.clone();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stop.wait_for(|s| *s) => {
                        return Err(crate::error::Cancelled.into());
                    }
                }
                if let Some(f) = take_lock(&lock_path)? {
                    break f;
                }
            }
        }
    };
    let _permit = ctx.permits.clone().acquire_owned().await?;
    let previous = ctx
        .catalog()?
        .job_last_with(
            &job.name,
            &[
                Outcome::Success,
                Outcome::Partial,
                Outcome::Failure,
                Outcome::Timeout,
                Outcome::Interrupted,
            ],
        )?
        .map(|r| r.outcome);
    let started = ctx.clock.now();
    let id = ctx
        .catalog()?
        .job_run_start(&job.name, trigger, scheduled.map(ms), ms(started))?;
    update_metrics(ctx, job, |m| m.running = true);
    ctx.emit(DaemonEvent::Started {
        job: job.name.clone(),
        trigger: trigger.into(),
        scheduled,
    });
    let mut run = JobRun {
        id,
        job: job.name.clone(),
        trigger: trigger.into(),
        scheduled_ms: scheduled.map(ms),
        started_ms: ms(started),
        ..Default::default()
    };
    let mut facts = runner::RunFacts::default();
    let mut stop = ctx.stop.clone();
    for attempt in 0..=job.retries {
        run.attempts = attempt + 1;
        let attempt_start = if attempt == 0 {
            started
        } else {
            ctx.clock.now()
        };
        let (outcome, result, retry) = attempt_once(ctx, job, &mut stop, attempt_start).await;
        run.outcome = outcome;
        match result {
            Ok(f) => {
                run.error = None;
                facts = f;
                if facts.partial {
                    run.outcome = Outcome::Partial;
                    run.error = Some(facts.detail.clone());
                }
                break;
            }
            Err(e) => run.error = Some(e),
        }
        // A permanent error (a wrong key, a bad setting, damaged data) is
        // not retried: the next attempt would fail the same way.
        if !retry || attempt == job.retries || *stop.borrow() {
            break;
        }
        let delay = job.retry_delay * 2u32.saturating_pow(attempt);
        let until = ctx.clock.now() + chrono::Duration::from_std(delay).unwrap_or_default();
        ctx.emit(DaemonEvent::Retrying {
            job: job.name.clone(),
            attempt: attempt + 1,
            error: run.error.clone().unwrap_or_default(),
        });
        tokio::select! {
            _ = ctx.clock.sleep_until(until) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let finished = ctx.clock.now();
    run.finished_ms = Some(ms(finished));
    run.bytes_read = facts.bytes_read;
    run.bytes_added = facts.bytes_added;
    run.snapshots = facts.snapshots.clone();
    run.detail = (!facts.detail.is_empty() && run.error.is_none()).then(|| facts.detail.clone());
    let history = ctx.catalog()?;
    history.job_run_finish(id, &run)?;
    history.job_runs_trim(&job.name, HISTORY_KEEP)?;
    drop(held);
    let duration = (finished - started).num_milliseconds() as f64 / 1000.0;
    update_metrics(ctx, job, |m| {
        m.running = false;
        m.last_run_end = Some(finished);
        m.last_duration_s = Some(duration);
        m.last_bytes_read = run.bytes_read;
        m.last_bytes_added = run.bytes_added;
        m.bytes_read_total += run.bytes_read;
        m.bytes_added_total += run.bytes_added;
        *m.outcomes.entry(run.outcome).or_default() += 1;
        if run.outcome == Outcome::Success {
            m.last_success = Some(finished);
        }
    });
    if let Some(r) = facts.repository {
        ctx.metrics.lock().expect("metrics").repository = Some(r);
    }
    seed_drill_metrics(ctx, job)?;
    clear();
    ctx.emit(DaemonEvent::Finished(run.clone()));
    if let Some(n) = &ctx.notify {
        if let Some(ev) = notify::event_for(run.outcome, previous, n.on_success) {
            let body = notify::payload(ev, &run, &ctx.host, &facts.detail);
            match notify::send(n, &body).await {
                Ok(()) => ctx.emit(DaemonEvent::Notified {
                    job: job.name.clone(),
                    event: ev,
                }),
                Err(e) => ctx.emit(DaemonEvent::NotifyFailed {
                    job: job.name.clone(),
                    error: e,
                }),
            }
        }
    }
    Ok(run)
}

/// One attempt on its own thread, with the job's timeout and the daemon's
/// stop signal. Returns the outcome, the facts or error text, and whether
/// another attempt may help (timeouts and failures other than permanent
/// ones, see [`crate::error::is_retryable`]).
async fn attempt_once(
    ctx: &JobContext,
    job: &Job,
    stop: &mut watch::Receiver<bool>,
    start: DateTime<Utc>,
) -> (Outcome, Result<runner::RunFacts, String>, bool) {
    let cancel = CancelFlag::new();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    {
        let (env, job, cancel) = (ctx.env.clone(), job.clone(), cancel.clone());
        let exec = ctx.executor;
        let spawned = std::thread::Builder::new()
            .name(format!("job-{}", job.name))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    exec(&ExecContext {
                        env: &env,
                        job: &job,
                        cancel: &cancel,
                    })
                }));
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            return (
                Outcome::Failure,
                Err(format!("cannot start a thread: {e}")),
                true,
            );
        }
    }
    let deadline = job
        .timeout
        .map(|t| start + chrono::Duration::from_std(t).unwrap_or_default());
    let mut why: Option<Outcome> = None;
    let result = loop {
        tokio::select! {
            r = &mut rx => break r,
            _ = async {
                match deadline {
                    Some(d) => ctx.clock.sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if why.is_none() => {
                cancel.cancel();
                why = Some(Outcome::Timeout);
            }
            _ = stop.wait_for(|s| *s), if why.is_none() => {
                cancel.cancel();
                why = Some(Outcome::Cancelled);
            }
        }
    };
    match result {
        Ok(Ok(Ok(facts))) => (Outcome::Success, Ok(facts), false),
        Ok(Ok(Err(e))) => match why {
            Some(Outcome::Timeout) => (
                Outcome::Timeout,
                Err(format!(
                    "timed out after {}s and was cancelled; nothing was committed, uploaded data is re-used next time ({e:#})",
                    job.timeout.unwrap_or_default().as_secs()
                )),
                true,
            ),
            Some(_) => (
                Outcome::Cancelled,
                Err(format!("cancelled by shutdown; nothing was committed ({e:#})")),
                false,
            ),
            None => (
                Outcome::Failure,
                Err(format!("{e:#}")),
                e.is_retryable(),
            ),
        },
        Ok(Err(panic)) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (
                Outcome::Failure,
                Err(format!("the job panicked: {msg}")),
                true,
            )
        }
        Err(_) => (
            Outcome::Failure,
            Err("the job's thread ended without a result".into()),
            true,
        ),
    }
}

/// A stable delay in `[0, jitter)` for a job's run at `at`.
pub fn jitter_for(job: &Job, at: DateTime<Utc>) -> Duration {
    let max = job.jitter.as_millis() as u64;
    if max == 0 {
        return Duration::ZERO;
    }
    let h = blake3::hash(format!("{}\0{}", job.name, at.timestamp()).as_bytes());
    let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    Duration::from_millis(v % max)
}

struct Slot {
    job: Job,
    /// The next scheduled time (before jitter).
    next: Option<DateTime<Utc>>,
    /// `missed` for a catch-up run at start-up (no jitter).
    trigger: &'static str,
    /// Set while a run is spawned; cleared by the run itself just before it
    /// reports `Finished` (so a next time right after it is not "skipped").
    busy: Arc<std::sync::atomic::AtomicBool>,
}

impl Slot {
    fn running(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Slot {
    fn due_at(&self) -> Option<DateTime<Utc>> {
        let n = self.next?;
        if self.trigger == "missed" {
            return Some(n);
        }
        Some(n + chrono::Duration::from_std(jitter_for(&self.job, n)).unwrap_or_default())
    }
}

/// Options for [`run_daemon`].
pub struct DaemonOptions {
    /// Re-read on [`Control::Reload`].
    pub config_path: PathBuf,
    pub clock: Arc<dyn Clock>,
    pub events: broadcast::Sender<DaemonEvent>,
    pub metrics: SharedMetrics,
    /// Bind the metrics endpoint (tests may pass port 0 via the config).
    pub serve_metrics: bool,
    /// Log lines on stderr.
    pub log: bool,
    /// Runs one attempt; [`runner::execute`] except in tests.
    pub executor: Executor,
}

fn local(loaded: &Loaded) -> bool {
    loaded.settings.timezone == crate::schedule::config::TimeZone::Local
}

fn initial_slot(
    ctx: &JobContext,
    job: &Job,
    loaded: &Loaded,
    now: DateTime<Utc>,
) -> crate::error::Result<Slot> {
    let local = local(loaded);
    let cat = ctx.catalog()?;
    if lock_is_free(&ctx.lock_path(&job.name)?) {
        cat.job_runs_interrupted(&job.name, ms(now))?;
    }
    let mut slot = Slot {
        job: job.clone(),
        next: job.schedule.next_after(now, local),
        trigger: "schedule",
        busy: Default::default(),
    };
    if let Some(last) = cat.job_last_scheduled(&job.name)?.map(from_ms) {
        let mut missed = vec![];
        let mut t = last;
        while let Some(n) = job.schedule.next_after(t, local) {
            if n > now || missed.len() >= 100_000 {
                break;
            }
            missed.push(n);
            t = n;
        }
        if let Some(latest) = missed.last() {
            match job.missed_runs {
                MissedRuns::RunOnce => {
                    slot.next = Some(*latest);
                    slot.trigger = "missed";
                }
                MissedRuns::Skip => ctx.emit(DaemonEvent::MissedSkipped {
                    job: job.name.clone(),
                    count: missed.len(),
                }),
            }
        }
    }
    Ok(slot)
}

fn seed_metrics(ctx: &JobContext, job: &Job) -> crate::error::Result<()> {
    let cat = ctx.catalog()?;
    let last_success = cat.job_last_with(&job.name, &[Outcome::Success])?;
    let last = cat.job_runs(Some(&job.name), 1)?.pop();
    let counts = cat.job_outcome_counts(&job.name)?;
    update_metrics(ctx, job, |m| {
        m.last_success = last_success.and_then(|r| r.finished_ms).map(from_ms);
        if let Some(l) = &last {
            m.last_run_end = l.finished_ms.map(from_ms);
            m.last_duration_s = l.finished_ms.map(|f| (f - l.started_ms) as f64 / 1000.0);
            m.last_bytes_read = l.bytes_read;
            m.last_bytes_added = l.bytes_added;
        }
        for (o, n) in counts {
            m.outcomes.insert(o, n);
        }
    });
    seed_drill_metrics(ctx, job)
}

/// Runs the daemon until [`Control::Shutdown`] (or the control channel
/// closes). The library entry point of `labctl daemon`.
///
/// # Errors
/// Start-up errors only (unreadable key, catalog, metrics address in use);
/// job failures never end the daemon.
pub async fn run_daemon(
    loaded: Loaded,
    opts: DaemonOptions,
    mut control: mpsc::Receiver<Control>,
) -> crate::error::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loaded = loaded;
    let mut ctx = JobContext {
        state_dir: runner::state_dir(&loaded.raw.repository)?,
        env: JobEnv::from_config(&loaded),
        notify: loaded.settings.notify.clone(),
        clock: opts.clock.clone(),
        events: opts.events.clone(),
        metrics: opts.metrics.clone(),
        stop: stop_rx.clone(),
        permits: Arc::new(Semaphore::new(loaded.settings.max_concurrent_jobs)),
        host: gethostname::gethostname().to_string_lossy().to_string(),
        log: opts.log,
        executor: opts.executor,
    };
    let now = ctx.clock.now();
    opts.metrics.lock().expect("metrics").started = Some(now);
    let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
    for job in &loaded.jobs {
        seed_metrics(&ctx, job)?;
        slots.insert(job.name.clone(), initial_slot(&ctx, job, &loaded, now)?);
    }
    let metrics_addr = match (opts.serve_metrics, loaded.settings.metrics_listen) {
        (true, Some(addr)) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                crate::error::LabError::usage(format!(
                    "cannot listen on {addr} for metrics (daemon.metrics_listen): {e}"
                ))
            })?;
            let bound = listener.local_addr()?;
            tokio::spawn(metrics::serve(
                listener,
                opts.metrics.clone(),
                stop_rx.clone(),
            ));
            Some(bound)
        }
        _ => None,
    };
    ctx.emit(DaemonEvent::Ready { metrics_addr });
    let mut tasks: tokio::task::JoinSet<String> = tokio::task::JoinSet::new();
    loop {
        {
            let mut m = ctx.metrics.lock().expect("metrics");
            for (name, s) in &slots {
                if let Some(j) = m.jobs.get_mut(name) {
                    j.next_run = s.due_at();
                }
            }
        }
        let wake = slots.values().filter_map(Slot::due_at).min();
        tokio::select! {
            _ = async {
                match wake {
                    Some(w) => ctx.clock.sleep_until(w).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = ctx.clock.now();
                let local = local(&loaded);
                for slot in slots.values_mut() {
                    let Some(due) = slot.due_at() else { continue };
                    if due > now {
                        continue;
                    }
                    let scheduled = slot.next.expect("due implies next");
                    let trigger = slot.trigger;
                    slot.trigger = "schedule";
                    slot.next = slot.job.schedule.next_after(now.max(scheduled), local);
                    if slot.running() {
                        let reason = format!(
                            "the run for {} was skipped: the previous run is still going",
                            scheduled.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        );
                        if let Ok(cat) = ctx.catalog() {
                            let n = ms(now);
                            if let Ok(id) = cat.job_run_start(&slot.job.name, trigger, Some(ms(scheduled)), n) {
                                let _ = cat.job_run_finish(id, &JobRun {
                                    finished_ms: Some(n),
                                    outcome: Outcome::Skipped,
                                    error: Some(reason.clone()),
                                    ..Default::default()
                                });
                            }
                        }
                        update_metrics(&ctx, &slot.job, |m| *m.outcomes.entry(Outcome::Skipped).or_default() += 1);
                        ctx.emit(DaemonEvent::Skipped { job: slot.job.name.clone(), reason });
                        continue;
                    }
                    slot.busy.store(true, std::sync::atomic::Ordering::SeqCst);
                    let (c, job, busy) = (ctx.clone(), slot.job.clone(), slot.busy.clone());
                    tasks.spawn(async move {
                        let r = run_job_marking(&c, &job, trigger, Some(scheduled), LockMode::Skip, Some(&busy)).await;
                        busy.store(false, std::sync::atomic::Ordering::SeqCst);
                        if let Err(e) = r {
                            c.emit(DaemonEvent::Finished(JobRun {
                                job: job.name.clone(),
                                trigger: trigger.into(),
                                outcome: Outcome::Failure,
                                error: Some(format!("could not run or record the job: {e:#}")),
                                ..Default::default()
                            }));
                        }
                        job.name
                    });
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    // run_job itself panicked (attempt panics are caught
                    // earlier); the daemon carries on.
                    eprintln!("labctl: a job task failed: {e}");
                    if tasks.is_empty() {
                        for s in slots.values() {
                            s.busy.store(false, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }
            ctl = control.recv() => match ctl {
                None | Some(Control::Shutdown) => break,
                Some(Control::Reload) => match crate::schedule::config::load(&opts.config_path) {
                    Err(e) => {
                        ctx.metrics.lock().expect("metrics").reloads_failed += 1;
                        ctx.emit(DaemonEvent::ReloadFailed(format!("{e:#}")));
                    }
                    Ok(new) => {
                        if new.settings.metrics_listen != loaded.settings.metrics_listen {
                            eprintln!("labctl: daemon.metrics_listen changed; it takes effect at the next restart");
                        }
                        match runner::state_dir(&new.raw.repository) {
                            Ok(d) => ctx.state_dir = d,
                            Err(e) => {
                                ctx.metrics.lock().expect("metrics").reloads_failed += 1;
                                ctx.emit(DaemonEvent::ReloadFailed(format!("{e:#}")));
                                continue;
                            }
                        }
                        ctx.env = JobEnv::from_config(&new);
                        ctx.notify = new.settings.notify.clone();
                        if new.settings.max_concurrent_jobs != loaded.settings.max_concurrent_jobs {
                            ctx.permits = Arc::new(Semaphore::new(new.settings.max_concurrent_jobs));
                        }
                        let now = ctx.clock.now();
                        let mut next_slots = BTreeMap::new();
                        for job in &new.jobs {
                            let old = slots.remove(&job.name);
                            let keep_time = old.as_ref().is_some_and(|o| {
                                o.job.schedule_text == job.schedule_text && o.job.jitter == job.jitter
                            });
                            let slot = Slot {
                                job: job.clone(),
                                next: if keep_time {
                                    old.as_ref().and_then(|o| o.next)
                                } else {
                                    job.schedule.next_after(now, new.settings.timezone == crate::schedule::config::TimeZone::Local)
                                },
                                trigger: if keep_time { old.as_ref().map_or("schedule", |o| o.trigger) } else { "schedule" },
                                busy: old.as_ref().map(|o| o.busy.clone()).unwrap_or_default(),
                            };
                            if old.is_none() {
                                let _ = seed_metrics(&ctx, job);
                            }
                            next_slots.insert(job.name.clone(), slot);
                        }
                        {
                            let mut m = ctx.metrics.lock().expect("metrics");
                            m.jobs.retain(|k, _| next_slots.contains_key(k));
                            m.reloads_ok += 1;
                        }
                        slots = next_slots;
                        loaded = new;
                        ctx.emit(DaemonEvent::Reloaded);
                    }
                },
            },
        }
    }
    // Shutdown: no new runs; running ones get the grace period, then are
    // cancelled (they stop at their next file or chunk).
    ctx.metrics.lock().expect("metrics").shutting_down = true;
    ctx.emit(DaemonEvent::ShuttingDown);
    let grace_end = ctx.clock.now()
        + chrono::Duration::from_std(loaded.settings.shutdown_grace).unwrap_or_default();
    loop {
        tokio::select! {
            r = tasks.join_next() => if r.is_none() { break },
            _ = ctx.clock.sleep_until(grace_end) => {
                let _ = stop_tx.send(true);
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!("labctl: a job did not stop within 120 s of being cancelled; exiting anyway (the repository stays consistent)");
    }
    ctx.emit(DaemonEvent::Stopped);
    Ok(())
}

/// One job's state for `labctl status`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobStatus {
    pub job: String,
    pub kind: String,
    pub schedule: String,
    pub running: bool,
    pub next_run: Option<String>,
    pub last_run: Option<JobRun>,
    pub last_success: Option<String>,
    /// Seconds since the last successful run ended.
    pub last_success_age_seconds: Option<i64>,
}

/// The status of every configured job, from the catalog's history.
///
/// # Errors
/// Key or catalog errors.
pub fn status(loaded: &Loaded, now: DateTime<Utc>) -> crate::error::Result<Vec<JobStatus>> {
    let repo = &loaded.raw.repository;
    let cat = JobHistory::open(&runner::history_path(repo)?)?;
    let locks = runner::cache_dir(repo)
        .join(runner::repo_id(repo)?)
        .join("locks");
    let mut out = vec![];
    for job in &loaded.jobs {
        let last = cat.job_runs(Some(&job.name), 1)?.pop();
        let success = cat.job_last_with(&job.name, &[Outcome::Success])?;
        let success_end = success.and_then(|r| r.finished_ms).map(from_ms);
        let fmt = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        out.push(JobStatus {
            job: job.name.clone(),
            kind: job.action.kind().into(),
            schedule: job.schedule_text.clone(),
            // Probe the lock only when the history says a run is going (so
            // `status` never makes a starting run find its lock taken).
            running: last.as_ref().is_some_and(|r| r.outcome == Outcome::Running)
                && !lock_is_free(&locks.join(format!("{}.lock", job.name))),
            next_run: job.schedule.next_after(now, local(loaded)).map(fmt),
            last_run: last,
            last_success: success_end.map(fmt),
            last_success_age_seconds: success_end.map(|t| (now - t).num_seconds()),
        });
    }
    Ok(out)
}
