//! Job metrics in the Prometheus text format (version 0.0.4), and the small
//! HTTP server that serves them with `/healthz`.

use crate::records::jobs::Outcome;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

/// What the daemon knows about one job.
#[derive(Debug, Clone, Default)]
pub struct JobMetrics {
    pub kind: String,
    pub last_success: Option<DateTime<Utc>>,
    pub last_run_end: Option<DateTime<Utc>>,
    pub last_duration_s: Option<f64>,
    pub last_bytes_read: u64,
    pub last_bytes_added: u64,
    pub bytes_read_total: u64,
    pub bytes_added_total: u64,
    pub outcomes: BTreeMap<Outcome, u64>,
    pub running: bool,
    pub next_run: Option<DateTime<Utc>>,
    /// A multi-source backup job: its last success is its newest complete
    /// restore point.
    pub writes_points: bool,
    /// Drill jobs: when the last drill passed, its restore time per source
    /// (`kind:name`) and in total, and the plan's objective.
    pub drill_last_success: Option<DateTime<Utc>>,
    pub drill_rto: Vec<(String, f64)>,
    pub drill_rto_objective: Option<f64>,
}

/// Shared metrics state.
#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs: BTreeMap<String, JobMetrics>,
    pub started: Option<DateTime<Utc>>,
    pub shutting_down: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The repository's packs and their bytes, as of the last job run.
    pub repository: Option<(u64, u64)>,
}

pub type SharedMetrics = Arc<Mutex<Metrics>>;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

impl Metrics {
    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let job_rows = |f: &dyn Fn(&JobMetrics) -> Option<f64>| -> Vec<(String, f64)> {
            self.jobs
                .iter()
                .filter_map(|(n, j)| {
                    f(j).map(|v| {
                        (
                            format!("{{job=\"{}\",kind=\"{}\"}}", label(n), label(&j.kind)),
                            v,
                        )
                    })
                })
                .collect()
        };
        family(
            "labctl_job_last_success_timestamp_seconds",
            "gauge",
            "Unix time the job last finished successfully (absent: never since history began).",
            job_rows(&|j| j.last_success.map(ts)),
        );
        family(
            "labctl_job_last_run_timestamp_seconds",
            "gauge",
            "Unix time the job's last run ended, whatever its outcome.",
            job_rows(&|j| j.last_run_end.map(ts)),
        );
        family(
            "labctl_job_last_duration_seconds",
            "gauge",
            "Duration of the job's last run.",
            job_rows(&|j| j.last_duration_s),
        );
        family(
            "labctl_job_last_bytes_read",
            "gauge",
            "Bytes the job's last run read from its source.",
            job_rows(&|j| Some(j.last_bytes_read as f64)),
        );
        family(
            "labctl_job_last_bytes_added",
            "gauge",
            "Bytes the job's last run added to the repository.",
            job_rows(&|j| Some(j.last_bytes_added as f64)),
        );
        family(
            "labctl_job_bytes_read_total",
            "counter",
            "Bytes read by the job's runs since the daemon started.",
            job_rows(&|j| Some(j.bytes_read_total as f64)),
        );
        family(
            "labctl_job_bytes_added_total",
            "counter",
            "Bytes added by the job's runs since the daemon started.",
            job_rows(&|j| Some(j.bytes_added_total as f64)),
        );
        let mut outcome_rows = vec![];
        for (n, j) in &self.jobs {
            for o in Outcome::ALL {
                if o == Outcome::Running || o == Outcome::Interrupted {
                    continue;
                }
                outcome_rows.push((
                    format!(
                        "{{job=\"{}\",kind=\"{}\",outcome=\"{o}\"}}",
                        label(n),
                        label(&j.kind)
                    ),
                    *j.outcomes.get(&o).unwrap_or(&0) as f64,
                ));
            }
        }
        family(
            "labctl_job_runs_total",
            "counter",
            "Job runs by outcome (history in the catalog included).",
            outcome_rows,
        );
        family(
            "labctl_job_running",
            "gauge",
            "1 while the job runs.",
            job_rows(&|j| Some(if j.running { 1.0 } else { 0.0 })),
        );
        family(
            "labctl_job_next_run_timestamp_seconds",
            "gauge",
            "Unix time of the job's next scheduled run.",
            job_rows(&|j| j.next_run.map(ts)),
        );
        let now = ts(Utc::now());
        family(
            "labctl_restore_point_age_seconds",
            "gauge",
            "Seconds since the multi-source backup job last wrote a complete restore point.",
            self.jobs
                .iter()
                .filter(|(_, j)| j.writes_points)
                .filter_map(|(n, j)| {
                    j.last_success
                        .map(|t| (format!("{{job=\"{}\"}}", label(n)), (now - ts(t)).max(0.0)))
                })
                .collect(),
        );
        family(
            "labctl_drill_last_success_timestamp_seconds",
            "gauge",
            "Unix time the drill job last restored a point into staging and verified it.",
            self.jobs
                .iter()
                .filter_map(|(n, j)| {
                    j.drill_last_success
                        .map(|t| (format!("{{job=\"{}\"}}", label(n)), ts(t)))
                })
                .collect(),
        );
        family(
            "labctl_drill_rto_seconds",
            "gauge",
            "Restore time of the last passed drill, per source (kind:name) and in total (source=\"total\").",
            self.jobs
                .iter()
                .flat_map(|(n, j)| {
                    j.drill_rto.iter().map(move |(src, v)| {
                        (
                            format!("{{job=\"{}\",source=\"{}\"}}", label(n), label(src)),
                            *v,
                        )
                    })
                })
                .collect(),
        );
        family(
            "labctl_drill_rto_objective_seconds",
            "gauge",
            "The drill plan's rto_objective.",
            self.jobs
                .iter()
                .filter_map(|(n, j)| {
                    j.drill_rto_objective
                        .map(|v| (format!("{{job=\"{}\"}}", label(n)), v))
                })
                .collect(),
        );
        family(
            "labctl_repository_size_bytes",
            "gauge",
            "Bytes of packs in the repository (as of the last job run).",
            self.repository
                .map(|(_, b)| vec![(String::new(), b as f64)])
                .unwrap_or_default(),
        );
        family(
            "labctl_repository_packs",
            "gauge",
            "Packs in the repository (as of the last job run).",
            self.repository
                .map(|(p, _)| vec![(String::new(), p as f64)])
                .unwrap_or_default(),
        );
        family(
            "labctl_daemon_start_time_seconds",
            "gauge",
            "Unix time the daemon started.",
            self.started
                .map(|t| vec![(String::new(), ts(t))])
                .unwrap_or_default(),
        );
        family(
            "labctl_daemon_config_reloads_total",
            "counter",
            "Configuration reloads (SIGHUP) by result.",
            vec![
                ("{result=\"ok\"}".into(), self.reloads_ok as f64),
                ("{result=\"failed\"}".into(), self.reloads_failed as f64),
            ],
        );
        family(
            "labctl_build_info",
            "gauge",
            "labctl version.",
            vec![(
                format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
                1.0,
            )],
        );
        o
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: SharedMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Request, Response, StatusCode};
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, ctype, body) = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => (
                            StatusCode::OK,
                            "text/plain; version=0.0.4; charset=utf-8",
                            metrics.lock().expect("metrics").render(),
                        ),
                        (&Method::GET, "/healthz") => {
                            if metrics.lock().expect("metrics").shutting_down {
                                (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    "shutting down\n".into(),
                                )
                            } else {
                                (StatusCode::OK, "text/plain", "ok\n".into())
                            }
                        }
                        (_, "/metrics" | "/healthz") => (
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "use GET\n".into(),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "labctl daemon: try /metrics or /healthz\n".into(),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("a valid response"),
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
