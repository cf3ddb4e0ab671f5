//! `labctl daemon`, `labctl config validate`, `labctl status`, `labctl jobs`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::records::jobs::Outcome;
use crate::schedule::config;
use crate::schedule::{self, clock::SystemClock, Control, DaemonOptions, JobContext, LockMode};
use crate::util::units::human_bytes;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the configuration file is.
#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// The daemon configuration (labctl.toml; see deploy/labctl.toml).
    #[arg(
        long,
        env = "LABCTL_CONFIG",
        default_value = "/etc/labctl/labctl.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
}

#[derive(Args, Debug)]
pub struct DaemonCmd {
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Check a configuration file: syntax, unknown keys, schedules,
    /// durations, sources; print each job's next run. Exit code 2 names the
    /// file, line and field of the first problem. Works on any machine.
    ///
    /// With --host, also what depends on this machine, as the daemon will
    /// need it: the key files present and private (exit 5), the webhook URL
    /// file or variable readable, the cache directory writable.
    Validate {
        #[command(flatten)]
        config: ConfigArg,
        /// Also check this machine: key files, webhook secret, cache directory.
        #[arg(long)]
        host: bool,
    },
}

#[derive(Args, Debug)]
pub struct StatusCmd {
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Run one job now, through the same code path as the daemon (lock,
    /// timeout, retries, history, notification). Waits if the job is running
    /// elsewhere, unless --no-wait. Exit 0 success, 3 partial backup, 6
    /// skipped (locked), 1 failure, timeout or cancel.
    Run {
        /// The job's name in the configuration.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Skip (exit 6) instead of waiting when the job is already running.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the job history (newest first).
    History {
        /// Only this job.
        name: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

pub fn run_config(g: &GlobalArgs, c: ConfigCmd) -> crate::error::Result<ExitCode> {
    let ConfigCmd::Validate { config, host } = c;
    let mut loaded = config::load_without_secrets(&config.config)?;
    let mut repo_id = None;
    if host {
        // The key files must be there and private, as the daemon will need
        // them; then the cache directory; then the webhook secret.
        repo_id = Some(schedule::runner::repo_id(&loaded.raw.repository)?);
        if let Some(k) = &loaded.raw.repository.restore_key {
            crate::repo::keys::Keys::load(k)?;
        }
        check_cache_dir(&schedule::runner::cache_dir(&loaded.raw.repository))?;
        for j in &loaded.jobs {
            if let config::Action::Backup(sources) = &j.action {
                for src in sources {
                    src.check_host().map_err(|e| {
                        LabError::new(e.exit_code(), format!("job {}: {e}", j.name))
                    })?;
                }
            }
        }
        loaded = config::load(&config.config)?;
    }
    let now = chrono::Utc::now();
    let local = loaded.settings.timezone == config::TimeZone::Local;
    let jobs: Vec<_> = loaded
        .jobs
        .iter()
        .map(|j| {
            serde_json::json!({
                "job": j.name,
                "kind": j.action.kind(),
                "schedule": j.schedule_text,
                "next-run": j.schedule.next_after(now, local).map(|t| t.to_rfc3339()),
            })
        })
        .collect();
    if g.json {
        print_json(&serde_json::json!({
            "config": config.config,
            "valid": true,
            "repository-id": repo_id,
            "host-checked": host,
            "jobs": jobs,
            "warnings": loaded.warnings,
        }))?;
    } else {
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        if !g.quiet {
            match &repo_id {
                Some(id) => println!(
                    "{}: valid on this host, repository {id}, {} job(s)",
                    config.config.display(),
                    loaded.jobs.len()
                ),
                None => println!(
                    "{}: valid, {} job(s) (add --host to check key files, the webhook secret and the cache directory on the host that runs the daemon)",
                    config.config.display(),
                    loaded.jobs.len()
                ),
            }
            for j in &jobs {
                println!(
                    "  {:<20} {:<7} {:<20} next {}",
                    j["job"].as_str().unwrap_or_default(),
                    j["kind"].as_str().unwrap_or_default(),
                    j["schedule"].as_str().unwrap_or_default(),
                    j["next-run"].as_str().unwrap_or("never")
                );
            }
        }
    }
    Ok(ExitCode::Success)
}

/// The cache directory exists (or can be made) and is writable.
fn check_cache_dir(dir: &std::path::Path) -> crate::error::Result<()> {
    let bad = |e: std::io::Error| {
        LabError::usage(format!(
            "cache directory {} is not writable: {e}",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(bad)?;
    let probe = dir.join(format!(".labctl-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(bad)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}min", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

pub fn run_status(g: &GlobalArgs, c: StatusCmd) -> crate::error::Result<ExitCode> {
    let loaded = config::load_without_secrets(&c.config.config)?;
    let st = schedule::status(&loaded, chrono::Utc::now())?;
    if g.json {
        print_json(&st)?;
        return Ok(ExitCode::Success);
    }
    println!(
        "{:<20} {:<7} {:<10} {:<21} {:<14} {:<21}",
        "JOB", "KIND", "LAST", "LAST RUN", "LAST SUCCESS", "NEXT RUN"
    );
    for s in &st {
        let last = s.last_run.as_ref();
        let when = last
            .and_then(|r| chrono::DateTime::from_timestamp_millis(r.started_ms))
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_else(|| "never".into());
        println!(
            "{:<20} {:<7} {:<10} {:<21} {:<14} {:<21}",
            s.job,
            s.kind,
            if s.running {
                "running".to_string()
            } else {
                last.map_or("-".into(), |r| r.outcome.to_string())
            },
            when,
            s.last_success_age_seconds
                .map_or("never".into(), |a| format!("{} ago", age(a))),
            s.next_run.as_deref().unwrap_or("never"),
        );
        if let Some(e) = last.and_then(|r| r.error.as_ref()) {
            println!("    last error: {e}");
        }
    }
    Ok(ExitCode::Success)
}

fn context(
    loaded: &config::Loaded,
    stop: tokio::sync::watch::Receiver<bool>,
) -> crate::error::Result<JobContext> {
    Ok(JobContext {
        state_dir: schedule::runner::state_dir(&loaded.raw.repository)?,
        env: schedule::JobEnv::from_config(loaded),
        notify: loaded.settings.notify.clone(),
        clock: Arc::new(SystemClock),
        events: tokio::sync::broadcast::channel(64).0,
        metrics: Default::default(),
        stop,
        permits: Arc::new(tokio::sync::Semaphore::new(1)),
        host: gethostname::gethostname().to_string_lossy().to_string(),
        log: false,
        executor: schedule::runner::execute,
    })
}

pub fn run_jobs(g: &GlobalArgs, c: JobsCmd) -> crate::error::Result<ExitCode> {
    match c {
        JobsCmd::Run {
            name,
            config: cfg,
            no_wait,
        } => {
            let loaded = config::load(&cfg.config)?;
            let job = loaded
                .jobs
                .iter()
                .find(|j| j.name == name)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<_> = loaded.jobs.iter().map(|j| j.name.as_str()).collect();
                    LabError::usage(format!(
                        "no job '{name}' in {} (jobs: {})",
                        cfg.config.display(),
                        names.join(", ")
                    ))
                })?;
            let rt = crate::util::runtime()?;
            let run = rt.block_on(async {
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let ctx = context(&loaded, stop_rx)?;
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!(
                            "labctl: interrupted; cancelling the job (nothing half-written stays)"
                        );
                        let _ = stop_tx.send(true);
                    }
                });
                let mode = if no_wait {
                    LockMode::Skip
                } else {
                    LockMode::Wait
                };
                schedule::run_job(&ctx, &job, "manual", None, mode).await
            })?;
            if g.json {
                print_json(&run)?;
            } else if !g.quiet {
                println!(
                    "job {}: {} after {} attempt(s); read {}, added {}{}",
                    run.job,
                    run.outcome,
                    run.attempts,
                    human_bytes(run.bytes_read),
                    human_bytes(run.bytes_added),
                    run.snapshots
                        .first()
                        .map(|s| format!("; snapshot {}", &s[..s.len().min(12)]))
                        .unwrap_or_default()
                );
            }
            if let Some(e) = &run.error {
                eprintln!("{}: {e}", run.outcome);
            } else if let (Some(d), false, false) = (&run.detail, g.json, g.quiet) {
                eprintln!("{d}");
            }
            Ok(match run.outcome {
                Outcome::Success => ExitCode::Success,
                Outcome::Partial => ExitCode::PartialBackup,
                Outcome::Skipped => ExitCode::Refused,
                _ => ExitCode::Failure,
            })
        }
        JobsCmd::History {
            name,
            config: cfg,
            limit,
        } => {
            let loaded = config::load_without_secrets(&cfg.config)?;
            let cat = crate::records::jobs::JobHistory::open(&schedule::runner::history_path(
                &loaded.raw.repository,
            )?)?;
            let runs = cat.job_runs(name.as_deref(), limit)?;
            if g.json {
                print_json(&runs)?;
                return Ok(ExitCode::Success);
            }
            for r in &runs {
                let t = chrono::DateTime::from_timestamp_millis(r.started_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_default();
                let dur = r
                    .finished_ms
                    .map(|f| format!("{:.1}s", (f - r.started_ms) as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{t}  {:<16} {:<9} {:<11} {:>7}  added {:>10}  {}",
                    r.job,
                    r.trigger,
                    r.outcome,
                    dur,
                    human_bytes(r.bytes_added),
                    r.error.as_deref().unwrap_or("")
                );
            }
            Ok(ExitCode::Success)
        }
    }
}

pub fn run_daemon(_g: &GlobalArgs, c: DaemonCmd) -> crate::error::Result<ExitCode> {
    let path = c.config.config;
    let loaded = config::load(&path)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let rt = crate::util::runtime()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel(8);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = term.recv() => Control::Shutdown,
                    _ = int.recv() => Control::Shutdown,
                    _ = hup.recv() => Control::Reload,
                };
                if ctl_tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        schedule::run_daemon(
            loaded,
            DaemonOptions {
                config_path: path,
                clock: Arc::new(SystemClock),
                events: tokio::sync::broadcast::channel(256).0,
                metrics: Default::default(),
                serve_metrics: true,
                log: true,
                executor: schedule::runner::execute,
            },
            ctl_rx,
        )
        .await
    })?;
    Ok(ExitCode::Success)
}

/// `labctl drills`.
#[derive(Args, Debug)]
pub struct DrillsCmd {
    /// Only this drill job.
    pub name: Option<String>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// How many drills.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

pub fn run_drills(g: &GlobalArgs, c: DrillsCmd) -> crate::error::Result<ExitCode> {
    let loaded = config::load_without_secrets(&c.config.config)?;
    let cat = crate::records::jobs::JobHistory::open(&schedule::runner::history_path(
        &loaded.raw.repository,
    )?)?;
    let drills = cat.drills(c.name.as_deref(), false, c.limit)?;
    if g.json {
        print_json(&drills)?;
        return Ok(ExitCode::Success);
    }
    if drills.is_empty() {
        println!("no drills recorded yet (a job with drill = {{ plan = ... }} runs them)");
    }
    for d in &drills {
        let t = chrono::DateTime::from_timestamp_millis(d.started_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_default();
        let objective = d.report["rto-objective-seconds"]
            .as_u64()
            .map(|o| {
                let met = d.report["within-objective"].as_bool() == Some(true);
                format!(" (objective {o}s{})", if met { " met" } else { " MISSED" })
            })
            .unwrap_or_default();
        println!(
            "{t}  {:<14} {:<8} point {}  RTO {:.1}s{objective}",
            d.job, d.outcome, d.point, d.seconds
        );
        for s in d.report["steps"].as_array().into_iter().flatten() {
            println!(
                "    {:<7} {:<32} {:<9} {:>10} {:>7.1}s  {}",
                s["kind"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or(""),
                s["outcome"].as_str().unwrap_or(""),
                human_bytes(s["bytes"].as_u64().unwrap_or(0)),
                s["seconds"].as_f64().unwrap_or(0.0),
                s["error"].as_str().or(s["verified"].as_str()).unwrap_or("")
            );
        }
    }
    Ok(ExitCode::Success)
}
