//! The daemon: scheduling with a manual clock (in-process), missed runs,
//! locks, retries, panics, timeouts, reload, shutdown; webhooks; the real
//! binary end to end with SIGTERM; `status`, `jobs run`, `config validate`;
//! the example files in deploy/.

use crate::common::{assert_success, Env, BIN};
use chrono::{DateTime, TimeZone, Utc};
use labctl::schedule::clock::ManualClock;
use labctl::schedule::config;
use labctl::schedule::{self, runner, Control, DaemonEvent, DaemonOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// A repository plus a labctl.toml pointing at it.
struct DEnv {
    env: Env,
    config: PathBuf,
    src: PathBuf,
}

impl DEnv {
    fn new() -> DEnv {
        let env = Env::new();
        let src = env.path("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a.txt"), "hello daemon\n".repeat(1000)).unwrap();
        std::fs::write(src.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
        let config = env.path("labctl.toml");
        DEnv { env, config, src }
    }

    fn header(&self, daemon: &str, notify: &str) -> String {
        format!(
            "[repository]\nurl = \"{}\"\nbackup_key = \"{}\"\ncache_dir = \"{}\"\n\n[daemon]\nmetrics_listen = \"\"\n{daemon}\n{notify}\n",
            self.env.repo.display(),
            self.env.backup_key.display(),
            self.env.cache.display()
        )
    }

    fn write(&self, text: &str) -> config::Loaded {
        std::fs::write(&self.config, text).unwrap();
        config::load(&self.config).unwrap()
    }

    fn history(&self, job: &str) -> Vec<labctl::records::jobs::JobRun> {
        let loaded = config::load(&self.config).unwrap();
        let cat = labctl::records::jobs::JobHistory::open(
            &runner::history_path(&loaded.raw.repository).unwrap(),
        )
        .unwrap();
        let mut v = cat.job_runs(Some(job), 100).unwrap();
        v.reverse();
        v
    }
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Running {
    ctl: mpsc::Sender<Control>,
    events: broadcast::Receiver<DaemonEvent>,
    metrics: labctl::schedule::metrics::SharedMetrics,
    handle: tokio::task::JoinHandle<labctl::error::Result<()>>,
}

fn start_with(
    loaded: config::Loaded,
    path: &Path,
    clock: &ManualClock,
    executor: schedule::Executor,
) -> Running {
    let (ctl, ctl_rx) = mpsc::channel(8);
    let (tx, events) = broadcast::channel(1024);
    let metrics: labctl::schedule::metrics::SharedMetrics = Default::default();
    let opts = DaemonOptions {
        config_path: path.to_path_buf(),
        clock: Arc::new(clock.clone()),
        events: tx,
        metrics: metrics.clone(),
        serve_metrics: false,
        log: true,
        executor,
    };
    let handle = tokio::spawn(schedule::run_daemon(loaded, opts, ctl_rx));
    Running {
        ctl,
        events,
        metrics,
        handle,
    }
}

fn start(loaded: config::Loaded, path: &Path, clock: &ManualClock) -> Running {
    start_with(loaded, path, clock, runner::execute)
}

impl Running {
    /// Waits (real time) for an event matching `pred`, returning it.
    async fn expect(&mut self, what: &str, pred: impl Fn(&DaemonEvent) -> bool) -> DaemonEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(ev)) if pred(&ev) => return ev,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("event stream broke while waiting for {what}: {e}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    async fn finished(&mut self, job: &str) -> labctl::records::jobs::JobRun {
        match self
            .expect(
                &format!("{job} to finish"),
                |e| matches!(e, DaemonEvent::Finished(r) if r.job == job),
            )
            .await
        {
            DaemonEvent::Finished(r) => r,
            _ => unreachable!(),
        }
    }

    /// Waits for each job in `jobs` to finish, in any order.
    async fn finished_all(&mut self, jobs: &[&str]) -> Vec<labctl::records::jobs::JobRun> {
        let mut out = vec![];
        while out.len() < jobs.len() {
            match self
                .expect(
                    "jobs to finish",
                    |e| matches!(e, DaemonEvent::Finished(r) if jobs.contains(&r.job.as_str())),
                )
                .await
            {
                DaemonEvent::Finished(r) => out.push(r),
                _ => unreachable!(),
            }
        }
        out
    }

    /// Asserts no job starts within a short real-time window.
    async fn quiet(&mut self, ms: u64) {
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(end, self.events.recv()).await {
            assert!(
                !matches!(ev, DaemonEvent::Started { .. } | DaemonEvent::Finished(_)),
                "nothing should run yet, got {ev:?}"
            );
        }
    }

    async fn stop(self) {
        self.ctl.send(Control::Shutdown).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("daemon stops")
            .unwrap()
            .unwrap();
    }
}

fn backup_job(d: &DEnv, name: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[[job]]\nname = \"{name}\"\nschedule = \"{schedule}\"\n{extra}\nbackup = {{ source = \"path\", path = \"{}\" }}\n",
        d.src.display()
    )
}

#[test]
fn runs_at_the_cron_time_and_records_history_and_metrics() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}{}",
        d.header("", ""),
        backup_job(
            &d,
            "nightly",
            "0 2 * * *",
            "tags = [\"nightly\"]\nretention = { keep_last = 1 }"
        )
    ));
    let clock = ManualClock::new(t("2026-01-01T01:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. })).await;
        clock.advance(Duration::from_secs(59));
        r.quiet(300).await;
        clock.advance(Duration::from_secs(1));
        let run = r.finished("nightly").await;
        assert_eq!(run.outcome, "success", "{run:?}");
        assert_eq!(run.trigger, "schedule");
        assert_eq!(run.snapshots.len(), 1);
        assert!(run.bytes_read >= 312_000);
        // A second night: retention keep_last=1 removes the first snapshot.
        clock.set(t("2026-01-02T02:00:00Z"));
        let run2 = r.finished("nightly").await;
        assert_eq!(run2.outcome, "success");
        let text = r.metrics.lock().unwrap().render();
        assert!(
            text.contains("labctl_job_runs_total{job=\"nightly\",kind=\"backup\",outcome=\"success\"} 2"),
            "{text}"
        );
        assert!(text.contains("labctl_job_last_success_timestamp_seconds{job=\"nightly\",kind=\"backup\"} 1767319200"), "{text}");
        assert!(text.contains("labctl_job_next_run_timestamp_seconds{job=\"nightly\",kind=\"backup\"} 1767405600"), "{text}");
        assert!(text.contains("labctl_job_running{job=\"nightly\",kind=\"backup\"} 0"));
        r.stop().await;
    });
    let h = d.history("nightly");
    assert_eq!(h.len(), 2);
    assert_eq!(
        h[0].scheduled_ms,
        Some(t("2026-01-01T02:00:00Z").timestamp_millis())
    );
    assert_eq!(
        h[0].started_ms,
        t("2026-01-01T02:00:00Z").timestamp_millis()
    );
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&d.env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.len(), 1, "retention kept one");
    assert_eq!(snaps[0]["id"], h[1].snapshots[0].as_str());
    assert_eq!(snaps[0]["tags"][0], "nightly");
    d.env.ok(&["check"]);
}

#[test]
fn missed_runs_run_once_or_skip_as_configured() {
    let d = DEnv::new();
    let text = format!(
        "{}{}{}",
        d.header("", ""),
        backup_job(&d, "once", "0 2 * * *", ""),
        backup_job(&d, "skipper", "0 2 * * *", "missed_runs = \"skip\"")
    );
    let loaded = d.write(&text);
    let clock = ManualClock::new(t("2026-01-01T01:59:59Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(1));
        r.finished_all(&["once", "skipper"]).await;
        r.stop().await;
    });
    // Down for three nights; start again at 10:00 on the 4th.
    let clock = ManualClock::new(t("2026-01-04T10:00:00Z"));
    rt().block_on(async {
        let mut r = start(config::load(&d.config).unwrap(), &d.config, &clock);
        let skipped = r
            .expect("missed skip", |e| {
                matches!(e, DaemonEvent::MissedSkipped { .. })
            })
            .await;
        assert!(
            matches!(&skipped, DaemonEvent::MissedSkipped { job, count: 3 } if job == "skipper"),
            "{skipped:?}"
        );
        let run = r.finished("once").await;
        assert_eq!(run.trigger, "missed");
        assert_eq!(
            run.scheduled_ms,
            Some(t("2026-01-04T02:00:00Z").timestamp_millis())
        );
        r.quiet(500).await;
        // Both follow the schedule again the next night.
        clock.set(t("2026-01-05T02:00:00Z"));
        for run in r.finished_all(&["once", "skipper"]).await {
            assert_eq!(run.trigger, "schedule");
        }
        r.stop().await;
    });
    assert_eq!(d.history("once").len(), 3, "one catch-up run, not three");
    assert_eq!(d.history("skipper").len(), 2);
}

fn flock(path: &Path) -> std::fs::File {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    f
}

fn lock_path(d: &DEnv, job: &str) -> PathBuf {
    let loaded = config::load(&d.config).unwrap();
    let repo = &loaded.raw.repository;
    runner::cache_dir(repo)
        .join(runner::repo_id(repo).unwrap())
        .join("locks")
        .join(format!("{job}.lock"))
}

#[test]
fn a_job_never_runs_twice_at_once() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}{}",
        d.header("", ""),
        backup_job(&d, "locked", "0 * * * *", "")
    ));
    // Another process (here: this test) holds the job's lock.
    let held = flock(&lock_path(&d, "locked"));
    let clock = ManualClock::new(t("2026-01-01T00:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(60));
        r.expect(
            "skip",
            |e| matches!(e, DaemonEvent::Skipped { job, .. } if job == "locked"),
        )
        .await;
        // A manual run waits for the lock instead of skipping.
        let mut manual = std::process::Command::new(BIN)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .args([
                "jobs",
                "run",
                "locked",
                "--config",
                d.config.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            manual.try_wait().unwrap().is_none(),
            "the manual run must wait for the lock"
        );
        drop(held);
        let out = manual.wait_with_output().unwrap();
        assert_success(&out, &["jobs", "run"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("waiting"));
        // With the lock free, the next hour runs.
        clock.advance(Duration::from_secs(3600));
        assert_eq!(r.finished("locked").await.outcome, "success");
        r.stop().await;
    });
    let h = d.history("locked");
    let outcomes: Vec<_> = h
        .iter()
        .map(|r| (r.trigger.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("schedule", "skipped"),
            ("manual", "success"),
            ("schedule", "success")
        ]
    );
    // --no-wait skips with exit 6 while the lock is held.
    let _held = flock(&lock_path(&d, "locked"));
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args([
            "jobs",
            "run",
            "locked",
            "--no-wait",
            "--config",
            d.config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny HTTP server collecting webhook bodies.
pub fn webhook_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/hooks/T000/SECRET",
        listener.local_addr().unwrap()
    );
    let got = Arc::new(Mutex::new(vec![]));
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if first {
                            assert!(line.starts_with("POST /hooks/T000/SECRET "), "{line}");
                            first = false;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    g.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
            });
        }
    });
    (url, got)
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn failures_retry_notify_and_recover_without_stopping_the_daemon() {
    let d = DEnv::new();
    let (url, got) = webhook_receiver();
    let url_file = d.env.path("webhook-url");
    write_private(&url_file, &url);
    let flag = d.env.path("db-is-up");
    let loaded = d.write(&format!(
        "{}[[job]]\nname = \"db\"\nschedule = \"0 3 * * *\"\nretries = 1\nretry_delay = \"1min\"\nbackup = {{ source = \"stream\", name = \"db\", command = [\"sh\", \"-c\", \"test -f {} || {{ echo connection refused >&2; exit 3; }}; echo dump\"] }}\n",
        d.header("", &format!("[notify]\nwebhook_url_file = \"{}\"\n", url_file.display())),
        flag.display()
    ));
    let clock = ManualClock::new(t("2026-01-01T02:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(60));
        let retry = r
            .expect("a retry", |e| matches!(e, DaemonEvent::Retrying { .. }))
            .await;
        assert!(
            format!("{retry:?}").contains("connection refused"),
            "{retry:?}"
        );
        clock.advance(Duration::from_secs(60));
        let run = r.finished("db").await;
        assert_eq!((run.outcome.as_str(), run.attempts), ("failure", 2));
        assert!(
            run.error
                .as_deref()
                .unwrap()
                .contains("exited with exit status: 3"),
            "{run:?}"
        );
        r.expect("notified", |e| matches!(e, DaemonEvent::Notified { .. }))
            .await;
        // The database comes back: the next night succeeds and says so.
        std::fs::write(&flag, "").unwrap();
        clock.set(t("2026-01-02T03:00:00Z"));
        assert_eq!(r.finished("db").await.outcome, "success");
        r.expect("notified", |e| matches!(e, DaemonEvent::Notified { .. }))
            .await;
        r.stop().await;
    });
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["event"], "failure");
    assert_eq!(got[0]["job"], "db");
    assert!(got[0]["text"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    assert_eq!(got[1]["event"], "recovery");
    assert!(got[1]["text"].as_str().unwrap().contains("recovered"));
    // Nothing was committed by the failed attempts.
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&d.env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.len(), 1);
}

static PANICS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn panics_once(ctx: &schedule::ExecContext<'_>) -> labctl::error::Result<runner::RunFacts> {
    if PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
        panic!("simulated bug in a job");
    }
    runner::execute(ctx)
}

#[test]
fn a_panicking_job_is_retried_and_the_daemon_lives_on() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}{}",
        d.header("", ""),
        backup_job(
            &d,
            "buggy",
            "0 2 * * *",
            "retries = 1\nretry_delay = \"10s\""
        )
    ));
    let clock = ManualClock::new(t("2026-01-01T01:59:00Z"));
    rt().block_on(async {
        let mut r = start_with(loaded, &d.config, &clock, panics_once);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(60));
        let retry = r
            .expect("a retry", |e| matches!(e, DaemonEvent::Retrying { .. }))
            .await;
        assert!(
            format!("{retry:?}").contains("panicked: simulated bug"),
            "{retry:?}"
        );
        clock.advance(Duration::from_secs(10));
        let run = r.finished("buggy").await;
        assert_eq!((run.outcome.as_str(), run.attempts), ("success", 2));
        r.stop().await;
    });
}

#[test]
fn a_timeout_cancels_the_backup_and_the_repository_stays_consistent() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}[[job]]\nname = \"slow\"\nschedule = \"0 4 * * *\"\ntimeout = \"30min\"\nbackup = {{ source = \"stream\", name = \"slow\", command = [\"sh\", \"-c\", \"head -c 3000000 /dev/urandom; sleep 60\"] }}\n",
        d.header("", "")
    ));
    let clock = ManualClock::new(t("2026-01-01T03:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(60));
        r.expect("start", |e| matches!(e, DaemonEvent::Started { .. }))
            .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        clock.advance(Duration::from_secs(30 * 60));
        let begun = std::time::Instant::now();
        let run = r.finished("slow").await;
        assert!(
            begun.elapsed() < Duration::from_secs(20),
            "the command was killed, not waited for"
        );
        assert_eq!(run.outcome, "timeout", "{run:?}");
        assert!(run
            .error
            .as_deref()
            .unwrap()
            .contains("timed out after 1800s"));
        r.stop().await;
    });
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&d.env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert!(snaps.is_empty(), "a cancelled backup commits no snapshot");
    d.env.ok(&["check"]);
}

#[test]
fn reload_keeps_the_old_config_when_the_new_one_is_bad() {
    let d = DEnv::new();
    let first = format!(
        "{}{}",
        d.header("", ""),
        backup_job(&d, "a", "0 2 * * *", "")
    );
    let loaded = d.write(&first);
    let clock = ManualClock::new(t("2026-01-01T01:00:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        std::fs::write(
            &d.config,
            format!("{first}\n[[job]]\nname = \"b\"\nschedule = \"99 * * * *\"\nprune = {{}}\n"),
        )
        .unwrap();
        r.ctl.send(Control::Reload).await.unwrap();
        let failed = r
            .expect("reload failure", |e| {
                matches!(e, DaemonEvent::ReloadFailed(_))
            })
            .await;
        assert!(format!("{failed:?}").contains("labctl.toml:"), "{failed:?}");
        assert!(
            format!("{failed:?}").contains("job[1].schedule"),
            "{failed:?}"
        );
        // The old configuration still runs.
        clock.set(t("2026-01-01T02:00:00Z"));
        assert_eq!(r.finished("a").await.outcome, "success");
        // A good new configuration replaces it: job b appears.
        std::fs::write(
            &d.config,
            format!("{first}{}", backup_job(&d, "b", "30 2 * * *", "")),
        )
        .unwrap();
        r.ctl.send(Control::Reload).await.unwrap();
        r.expect("reloaded", |e| matches!(e, DaemonEvent::Reloaded))
            .await;
        clock.set(t("2026-01-01T02:30:00Z"));
        assert_eq!(r.finished("b").await.outcome, "success");
        let m = r.metrics.lock().unwrap().render();
        assert!(
            m.contains("labctl_daemon_config_reloads_total{result=\"failed\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("labctl_daemon_config_reloads_total{result=\"ok\"} 1"),
            "{m}"
        );
        drop(m);
        r.stop().await;
    });
}

#[test]
fn shutdown_lets_jobs_finish_within_grace_then_cancels() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}[[job]]\nname = \"long\"\nschedule = \"0 4 * * *\"\nbackup = {{ source = \"stream\", name = \"long\", command = [\"sh\", \"-c\", \"head -c 1000000 /dev/urandom; sleep 60\"] }}\n",
        d.header("shutdown_grace = \"2min\"", "")
    ));
    let clock = ManualClock::new(t("2026-01-01T03:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.advance(Duration::from_secs(60));
        r.expect("start", |e| matches!(e, DaemonEvent::Started { .. }))
            .await;
        r.ctl.send(Control::Shutdown).await.unwrap();
        r.expect("shutting down", |e| matches!(e, DaemonEvent::ShuttingDown))
            .await;
        r.quiet(500).await; // within the grace period the job keeps running
        assert!(r.metrics.lock().unwrap().shutting_down);
        clock.advance(Duration::from_secs(120));
        let run = r.finished("long").await;
        assert_eq!(run.outcome, "cancelled", "{run:?}");
        r.expect("stopped", |e| matches!(e, DaemonEvent::Stopped))
            .await;
        r.handle.await.unwrap().unwrap();
    });
    d.env.ok(&["check"]);
}

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn end_to_end_binary_metrics_webhook_and_sigterm() {
    let d = DEnv::new();
    let (url, got) = webhook_receiver();
    let text = format!(
        "[repository]\nurl = \"{}\"\nbackup_key = \"{}\"\ncache_dir = \"{}\"\n\n[daemon]\nmetrics_listen = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nmax_concurrent_jobs = 2\n\n[notify]\nwebhook_url_env = \"HOOK\"\non_success = true\n\n{}[[job]]\nname = \"stream\"\nschedule = \"*/2 * * * * *\"\nbackup = {{ source = \"stream\", name = \"big\", command = [\"sh\", \"-c\", \"head -c 20000000 /dev/urandom; sleep 30\"] }}\n",
        d.env.repo.display(),
        d.env.backup_key.display(),
        d.env.cache.display(),
        backup_job(&d, "tree", "* * * * * *", "")
    );
    std::fs::write(&d.config, text).unwrap();
    let mut child = std::process::Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOOK", &url)
        .args(["daemon", "--config", d.config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let log: std::cell::RefCell<Vec<String>> = std::cell::RefCell::new(vec![]);
    // Finds a matching line already logged, or waits for one (jobs run
    // concurrently, so their lines come in any order).
    let wait_for = |pred: &dyn Fn(&str) -> bool| -> String {
        if let Some(l) = log.borrow().iter().find(|l| pred(l.as_str())) {
            return l.clone();
        }
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or_else(|_| panic!("daemon log so far:\n{}", log.borrow().join("\n")));
            log.borrow_mut().push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    };
    let ready = wait_for(&|l| l.contains("daemon ready"));
    let addr = ready
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"));
    wait_for(&|l| l.contains("job=tree finished outcome=success"));
    wait_for(&|l| l.contains("job=stream started"));
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, metrics) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("labctl_job_running{job=\"stream\",kind=\"backup\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("labctl_job_last_success_timestamp_seconds{job=\"tree\",kind=\"backup\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE labctl_job_runs_total counter"));
    assert_eq!(http_get(&addr, "/nope").0, 404);
    // SIGTERM while the stream backup runs: grace 1s, then it is cancelled.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_for(&|l| l.contains("shutting down"));
    wait_for(&|l| l.contains("job=stream finished outcome=cancelled"));
    wait_for(&|l| l.contains("daemon stopped"));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The webhook saw the successes (on_success), and nothing failed.
    let got = got.lock().unwrap();
    assert!(got.iter().all(|b| b["outcome"] != "failure"), "{got:?}");
    assert!(
        got.iter()
            .any(|b| b["job"] == "tree" && b["outcome"] == "success"),
        "{got:?}"
    );
    // The repository is consistent and has no snapshot of the cancelled stream.
    d.env.ok(&["check"]);
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&d.env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert!(!snaps.is_empty());
    assert!(
        snaps.iter().all(|s| s["source"]["name"] != "big"),
        "{snaps:?}\n{}",
        log.borrow().join("\n")
    );
    // status and history see the runs.
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["--json", "status", "--config", d.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out, &["status"]);
    let st: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let tree = st.iter().find(|s| s["job"] == "tree").unwrap();
    assert_eq!(tree["last-run"]["outcome"], "success");
    assert!(tree["last-success-age-seconds"].as_i64().unwrap() < 60);
    assert!(tree["next-run"].is_string());
    let stream = st.iter().find(|s| s["job"] == "stream").unwrap();
    assert_eq!(stream["last-run"]["outcome"], "cancelled");
    assert_eq!(stream["running"], false);
}

#[test]
fn config_validate_reports_file_line_and_field() {
    let d = DEnv::new();
    std::fs::write(
        &d.config,
        format!(
            "{}[[job]]\nname = \"x\"\nschedule = \"0 2 * * *\"\nbakcup = {{ source = \"path\", path = \"/etc\" }}\n",
            d.header("", "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["config", "validate", "--config", d.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("labctl.toml:13:1: field `job[0].bakcup`: unknown field `bakcup`"),
        "{err}"
    );
    // A webhook URL file others can read is refused (exit 5).
    let hook = d.env.path("hook");
    std::fs::write(&hook, "https://hooks.example/SECRET").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        &d.config,
        format!(
            "{}{}",
            d.header(
                "",
                &format!("[notify]\nwebhook_url_file = \"{}\"\n", hook.display())
            ),
            backup_job(&d, "x", "0 2 * * *", "")
        ),
    )
    .unwrap();
    // The file itself is fine: valid on any machine.
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["config", "validate", "--config", d.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out, &["config", "validate"]);
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args([
            "config",
            "validate",
            "--host",
            "--config",
            d.config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("SECRET"), "{err}");
}

#[test]
fn the_shipped_labctl_toml_validates_on_any_machine_and_host_checks_name_what_is_missing() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/labctl.toml");
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .env_clear()
            .env("LABCTL_CACHE_DIR", std::env::temp_dir())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["config", "validate", "--config", shipped.to_str().unwrap()]);
    assert_success(&out, &["config", "validate", "deploy/labctl.toml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--host"));
    // On a machine that is not the daemon's host the key file is missing:
    // --host says which file (exit 5).
    let out = run(&[
        "config",
        "validate",
        "--host",
        "--config",
        shipped.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/etc/labctl/"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rewrites an example's absolute paths into `root` and creates the key and
/// repository it names, then validates it with the binary.
fn validate_example(text: &str, name: &str) {
    let env = Env::empty();
    let root = env.dir.path();
    let text = text
        .replace("/etc/labctl/keys/", &format!("{}/etc/", root.display()))
        .replace("/etc/labctl/", &format!("{}/etc/", root.display()))
        .replace("/var/cache/labctl", &format!("{}/cache", root.display()))
        .replace("/srv/labctl/repo", &format!("{}/repo", root.display()))
        .replace(
            "/etc/kubernetes/pki/etcd/",
            &format!("{}/etc/pki/etcd/", root.display()),
        )
        .replace(
            "/srv/mlflow-course/",
            &format!("{}/srv/mlflow-course/", root.display()),
        )
        .replace("/srv/mlflow/", &format!("{}/srv/mlflow/", root.display()));
    std::fs::create_dir_all(root.join("etc/pki/etcd")).unwrap();
    // The lab MLflow's artifact root (its PostgreSQL store is reached
    // only when the job runs).
    std::fs::create_dir_all(root.join("srv/mlflow/artifacts")).unwrap();
    // The MLflow job's store, as `--host` checks it (database and artifact root present).
    std::fs::create_dir_all(root.join("srv/mlflow-course/artifacts")).unwrap();
    std::fs::write(root.join("srv/mlflow-course/mlflow.db"), b"").unwrap();
    // kubeadm's etcd client files, as `--host` checks them (present, key private).
    for f in ["ca.crt", "healthcheck-client.crt", "healthcheck-client.key"] {
        write_private(&root.join("etc/pki/etcd").join(f), "-----BEGIN X-----\n");
    }
    let path = root.join(name);
    std::fs::write(&path, &text).unwrap();
    // The shipped platform file (VM jobs read it), with its files here.
    let platform =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/platform.yaml"))
            .unwrap()
            .replace("/etc/labctl/", &format!("{}/etc/", root.display()));
    std::fs::write(root.join("etc/platform.yaml"), platform).unwrap();
    for f in [
        "pve-token",
        "pve-ssh.key",
        "pve-known_hosts",
        "pve-root-ca.pem",
    ] {
        write_private(&root.join("etc").join(f), "placeholder\n");
    }
    for f in ["mlflow-db.password", "kfp-mysql.password"] {
        write_private(&root.join("etc").join(f), "placeholder\n");
    }
    write_private(
        &root.join("etc/kfp-minio.credentials"),
        "[default]\naws_access_key_id = x\naws_secret_access_key = y\n",
    );
    write_private(
        &root.join("etc/s3-credentials"),
        "[default]\naws_access_key_id = x\naws_secret_access_key = y\n",
    );
    let key = root.join("etc/backup.key");
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("LABCTL_REPO", root.join("repo"))
        .env("LABCTL_CACHE_DIR", root.join("cache"))
        .args([
            "repo",
            "init",
            "--no-escrow",
            "--backup-key",
            key.to_str().unwrap(),
            "--restore-key",
            root.join("restore.key").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, &["repo", "init"]);
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env(
            "LABCTL_WEBHOOK_URL",
            "https://hooks.example.edu/services/T/B/X",
        )
        .args([
            "--json",
            "config",
            "validate",
            "--host",
            "--config",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, &["config", "validate", name]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["jobs"].as_array().unwrap().len() >= 3, "{v}");
    assert!(v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["next-run"].is_string()));
}

#[test]
fn deploy_examples_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    validate_example(
        &std::fs::read_to_string(root.join("labctl.toml")).unwrap(),
        "labctl.toml",
    );
    // The ConfigMap in the Kubernetes manifests carries its own labctl.toml.
    let k8s = std::fs::read_to_string(root.join("kubernetes/labctl-daemon.yaml")).unwrap();
    let mut lines = k8s
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("labctl.toml: |"));
    lines.next().expect("a labctl.toml key in the ConfigMap");
    let embedded: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect();
    validate_example(&embedded.join("\n"), "configmap-labctl.toml");
    // The systemd unit and the manifests call commands the CLI has.
    let unit = std::fs::read_to_string(root.join("systemd/labctl-daemon.service")).unwrap();
    for line in unit.lines().filter(|l| l.starts_with("ExecStart")) {
        let args: Vec<&str> = line
            .split_once('=')
            .unwrap()
            .1
            .split_whitespace()
            .skip(1)
            .collect();
        let mut help = args.clone();
        help.push("--help");
        let out = std::process::Command::new(BIN)
            .args(&help)
            .output()
            .unwrap();
        assert_success(&out, &help);
    }
    assert!(k8s.contains("args: [\"daemon\", \"--config\", \"/etc/labctl/labctl.toml\"]"));
    // The manifests parse, and the keys reach labctl with mode 0600 (secret
    // volumes are root-owned and group-readable, which labctl refuses).
    let docs: Vec<serde_json::Value> = k8s
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    assert!(pod["initContainers"][0]["command"][2]
        .as_str()
        .unwrap()
        .contains("install -m 0600"));
    let keys = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "keys")
        .unwrap();
    assert_eq!(keys["emptyDir"]["medium"], "Memory");
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["name"] == "keys" && m["mountPath"] == "/etc/labctl/keys"));
    assert!(
        !mounts.iter().any(|m| m["name"] == "secret"),
        "labctl never reads the group-readable secret volume"
    );
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"));
    let alerts = std::fs::read_to_string(root.join("prometheus/labctl-alerts.yaml")).unwrap();
    // Every metric an alert uses is one the daemon exports.
    let exported = labctl::schedule::metrics::Metrics::default().render();
    for metric in [
        "labctl_job_last_success_timestamp_seconds",
        "labctl_job_runs_total",
        "labctl_daemon_start_time_seconds",
    ] {
        assert!(
            alerts.contains(metric) && exported.contains(metric),
            "{metric}"
        );
    }
    assert!(alerts.contains("26 * 3600"));
}

#[test]
fn jitter_is_stable_and_bounded() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}{}",
        d.header("", ""),
        backup_job(&d, "j", "0 2 * * *", "jitter = \"10min\"")
    ));
    let job = &loaded.jobs[0];
    let at = Utc.with_ymd_and_hms(2026, 1, 1, 2, 0, 0).unwrap();
    let a = schedule::jitter_for(job, at);
    assert_eq!(a, schedule::jitter_for(job, at));
    assert!(a < Duration::from_secs(600));
    let spread: std::collections::HashSet<_> = (0..20)
        .map(|d| schedule::jitter_for(job, at + chrono::Duration::days(d)))
        .collect();
    assert!(spread.len() > 10, "jitter varies from night to night");
}

#[test]
fn forget_prune_and_read_data_check_jobs_run() {
    let d = DEnv::new();
    // Three snapshots of the source to forget from.
    for i in 0..3 {
        std::fs::write(d.src.join("a.txt"), format!("version {i}\n").repeat(5000)).unwrap();
        d.env.backup(&d.src);
    }
    let header = d.header("", "").replace(
        "[daemon]",
        &format!(
            "restore_key = \"{}\"\n\n[daemon]",
            d.env.restore_key.display()
        ),
    );
    let loaded = d.write(&format!(
        "{header}[[job]]\nname = \"forget\"\nschedule = \"0 1 * * *\"\nforget = {{ keep_last = 1 }}\n\n[[job]]\nname = \"prune\"\nschedule = \"0 2 * * *\"\nprune = {{ grace = \"0s\", repack_threshold = \"10%\" }}\n\n[[job]]\nname = \"verify\"\nschedule = \"0 3 * * *\"\ncheck = {{ read_data_subset = \"100%\" }}\n"
    ));
    assert!(
        loaded.warnings.iter().any(|w| w.contains("under 24h")),
        "{:?}",
        loaded.warnings
    );
    let clock = ManualClock::new(t("2026-01-01T00:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.set(t("2026-01-01T01:00:00Z"));
        assert_eq!(r.finished("forget").await.outcome, "success");
        clock.set(t("2026-01-01T02:00:00Z"));
        assert_eq!(r.finished("prune").await.outcome, "success");
        clock.set(t("2026-01-01T03:00:00Z"));
        assert_eq!(r.finished("verify").await.outcome, "success");
        r.stop().await;
    });
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&d.env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.len(), 1);
    // The check really reads data: damage the packs and the next check fails.
    use std::os::unix::fs::PermissionsExt;
    for pack in d.env.packs() {
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[40] ^= 0xff;
        std::fs::set_permissions(&pack, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&pack, bytes).unwrap();
    }
    let out = d.env.run_restore(&["check", "--read-data"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clock = ManualClock::new(t("2026-01-02T02:59:00Z"));
    rt().block_on(async {
        let mut r = start(config::load(&d.config).unwrap(), &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        clock.set(t("2026-01-02T03:00:00Z"));
        let run = r.finished("verify").await;
        assert_eq!(run.outcome, "failure", "{run:?}");
        assert!(
            run.error.as_deref().unwrap().contains("check found"),
            "{run:?}"
        );
        r.stop().await;
    });
}

#[test]
fn a_key_file_that_becomes_readable_by_others_fails_runs_visibly() {
    let d = DEnv::new();
    let loaded = d.write(&format!(
        "{}{}",
        d.header("", ""),
        backup_job(&d, "k", "0 2 * * *", "")
    ));
    let clock = ManualClock::new(t("2026-01-01T01:59:00Z"));
    rt().block_on(async {
        let mut r = start(loaded, &d.config, &clock);
        r.expect("ready", |e| matches!(e, DaemonEvent::Ready { .. }))
            .await;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d.env.backup_key, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        clock.advance(Duration::from_secs(60));
        let run = r.finished("k").await;
        assert_eq!(run.outcome, "failure");
        assert!(
            run.error.as_deref().unwrap().contains("chmod 600"),
            "{run:?}"
        );
        assert!(run.id > 0, "the failure is in the history");
        r.stop().await;
    });
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.env.backup_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(d.history("k")[0].outcome, "failure");
}
