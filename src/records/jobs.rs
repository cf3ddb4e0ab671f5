//! The daemon's job history (`jobs.db` beside the catalog): one row per
//! job run with its trigger, outcome, bytes and snapshots.
//!
//! Not derived from the repository, so it lives in its own file that cache
//! resets never touch (and a backup's open transaction on the catalog never
//! blocks it). Must not schedule anything: the daemon writes, commands read.

use anyhow::Context;
use rusqlite::{params, Connection};
use std::path::Path;

const JOBS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS job_runs(id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
    trigger TEXT NOT NULL, scheduled_ms INTEGER, started_ms INTEGER NOT NULL, finished_ms INTEGER,
    outcome TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_added INTEGER NOT NULL DEFAULT 0, snapshots TEXT NOT NULL DEFAULT '', error TEXT);
CREATE INDEX IF NOT EXISTS job_runs_by_job ON job_runs(job, id);
CREATE TABLE IF NOT EXISTS drills(id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
    started_ms INTEGER NOT NULL, point TEXT NOT NULL, outcome TEXT NOT NULL,
    seconds REAL NOT NULL, report TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS drills_by_job ON drills(job, id);
";

/// One drill's report as recorded (the report itself is the JSON the
/// restore layer wrote; records does not interpret it).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DrillRecord {
    pub id: i64,
    pub job: String,
    pub started_ms: i64,
    pub point: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// The measured restore time (RTO).
    pub seconds: f64,
    pub report: serde_json::Value,
}

/// The daemon's job history (`jobs.db` beside the catalog).
pub struct JobHistory {
    conn: Connection,
}

impl JobHistory {
    /// Opens (creating if needed) the history database at `path`.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> crate::error::Result<JobHistory> {
        crate::util::sqlite::private_file(path)?;
        let conn = Connection::open(path)
            .with_context(|| format!("opening job history {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        crate::util::sqlite::set_wal(&conn)?;
        conn.execute_batch(JOBS_SCHEMA)?;
        Ok(JobHistory { conn })
    }

    /// Records the start of a job run (outcome `running`); returns its row id.
    pub fn job_run_start(
        &self,
        job: &str,
        trigger: &str,
        scheduled_ms: Option<i64>,
        started_ms: i64,
    ) -> crate::error::Result<i64> {
        self.conn.execute(
            "INSERT INTO job_runs(job,trigger,scheduled_ms,started_ms,outcome) VALUES(?1,?2,?3,?4,'running')",
            params![job, trigger, scheduled_ms, started_ms],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records how a job run ended.
    pub fn job_run_finish(&self, id: i64, r: &JobRun) -> crate::error::Result<()> {
        self.conn.execute(
            "UPDATE job_runs SET finished_ms=?2, outcome=?3, attempts=?4, bytes_read=?5, bytes_added=?6,
             snapshots=?7, error=?8 WHERE id=?1",
            params![
                id,
                r.finished_ms,
                r.outcome.as_str(),
                r.attempts,
                r.bytes_read as i64,
                r.bytes_added as i64,
                r.snapshots.join(","),
                r.error
            ],
        )?;
        Ok(())
    }

    /// Marks `running` rows of `job` as `interrupted` (their process died).
    pub fn job_runs_interrupted(&self, job: &str, now_ms: i64) -> crate::error::Result<usize> {
        Ok(self.conn.execute(
            "UPDATE job_runs SET outcome='interrupted', finished_ms=?2,
             error='the process running it stopped before it finished' WHERE job=?1 AND outcome='running'",
            params![job, now_ms],
        )?)
    }

    fn job_rows(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> crate::error::Result<Vec<JobRun>> {
        let mut st = self.conn.prepare_cached(sql)?;
        let rows = st.query_map(args, |r| {
            let snaps: String = r.get(10)?;
            Ok(JobRun {
                id: r.get(0)?,
                job: r.get(1)?,
                trigger: r.get(2)?,
                scheduled_ms: r.get(3)?,
                started_ms: r.get(4)?,
                finished_ms: r.get(5)?,
                outcome: Outcome::parse(&r.get::<_, String>(6)?),
                attempts: r.get(7)?,
                bytes_read: r.get::<_, i64>(8)? as u64,
                bytes_added: r.get::<_, i64>(9)? as u64,
                snapshots: snaps
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                error: r.get(11)?,
                detail: None,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest runs of a job (all jobs with `None`), newest first.
    pub fn job_runs(&self, job: Option<&str>, limit: usize) -> crate::error::Result<Vec<JobRun>> {
        const COLS: &str = "id,job,trigger,scheduled_ms,started_ms,finished_ms,outcome,attempts,bytes_read,bytes_added,snapshots,error";
        match job {
            Some(j) => self.job_rows(
                &format!("SELECT {COLS} FROM job_runs WHERE job=?1 ORDER BY id DESC LIMIT ?2"),
                params![j, limit as i64],
            ),
            None => self.job_rows(
                &format!("SELECT {COLS} FROM job_runs ORDER BY id DESC LIMIT ?1"),
                params![limit as i64],
            ),
        }
    }

    /// The newest finished run of a job with one of `outcomes`.
    pub fn job_last_with(
        &self,
        job: &str,
        outcomes: &[Outcome],
    ) -> crate::error::Result<Option<JobRun>> {
        const COLS: &str = "id,job,trigger,scheduled_ms,started_ms,finished_ms,outcome,attempts,bytes_read,bytes_added,snapshots,error";
        let list = outcomes
            .iter()
            .map(|o| format!("'{}'", o.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        Ok(self
            .job_rows(
                &format!("SELECT {COLS} FROM job_runs WHERE job=?1 AND outcome IN ({list}) ORDER BY id DESC LIMIT 1"),
                params![job],
            )?
            .pop())
    }

    /// The latest scheduled time the daemon handled for a job (ran or skipped).
    pub fn job_last_scheduled(&self, job: &str) -> crate::error::Result<Option<i64>> {
        Ok(self.conn.query_row(
            "SELECT MAX(scheduled_ms) FROM job_runs WHERE job=?1",
            [job],
            |r| r.get(0),
        )?)
    }

    /// Keeps only the newest `keep` runs of a job.
    pub fn job_runs_trim(&self, job: &str, keep: usize) -> crate::error::Result<()> {
        self.conn.execute(
            "DELETE FROM job_runs WHERE job=?1 AND id < (SELECT MIN(id) FROM
             (SELECT id FROM job_runs WHERE job=?1 ORDER BY id DESC LIMIT ?2))",
            params![job, keep as i64],
        )?;
        Ok(())
    }

    /// Records a drill's report (`d.id` is ignored); keeps the newest
    /// `keep` of the job.
    pub fn drill_record(&self, d: &DrillRecord, keep: usize) -> crate::error::Result<()> {
        let job = d.job.as_str();
        self.conn.execute(
            "INSERT INTO drills(job,started_ms,point,outcome,seconds,report) VALUES(?1,?2,?3,?4,?5,?6)",
            params![job, d.started_ms, d.point, d.outcome, d.seconds, d.report.to_string()],
        )?;
        self.conn.execute(
            "DELETE FROM drills WHERE job=?1 AND id < (SELECT MIN(id) FROM
             (SELECT id FROM drills WHERE job=?1 ORDER BY id DESC LIMIT ?2))",
            params![job, keep as i64],
        )?;
        Ok(())
    }

    /// The newest drills (of one job, or all), newest first; with
    /// `success_only`, only drills that passed.
    pub fn drills(
        &self,
        job: Option<&str>,
        success_only: bool,
        limit: usize,
    ) -> crate::error::Result<Vec<DrillRecord>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id,job,started_ms,point,outcome,seconds,report FROM drills
             WHERE (?1 IS NULL OR job=?1) AND (?2=0 OR outcome='success') ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![job, success_only as i64, limit as i64], |r| {
            let report: String = r.get(6)?;
            Ok(DrillRecord {
                id: r.get(0)?,
                job: r.get(1)?,
                started_ms: r.get(2)?,
                point: r.get(3)?,
                outcome: r.get(4)?,
                seconds: r.get(5)?,
                report: serde_json::from_str(&report).unwrap_or(serde_json::Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many runs of a job ended with each outcome.
    pub fn job_outcome_counts(&self, job: &str) -> crate::error::Result<Vec<(Outcome, u64)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT outcome, COUNT(*) FROM job_runs WHERE job=?1 AND outcome<>'running' GROUP BY outcome",
        )?;
        let rows = st.query_map([job], |r| {
            Ok((
                Outcome::parse(&r.get::<_, String>(0)?),
                r.get::<_, i64>(1)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// How a job run ended (or `Running` while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Running,
    Success,
    /// The backup finished but some files could not be read (snapshot written).
    Partial,
    Failure,
    Timeout,
    /// Stopped by a shutdown.
    Cancelled,
    /// Not run: another run of the job held its lock.
    Skipped,
    /// The process running it stopped before it finished.
    Interrupted,
}

impl Outcome {
    /// Every outcome, in the order metrics list them.
    pub const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::Partial,
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::Cancelled,
        Outcome::Skipped,
        Outcome::Interrupted,
        Outcome::Running,
    ];

    /// The name stored in `jobs.db` and shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Success => "success",
            Outcome::Partial => "partial",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// Parses a stored name (an unknown one reads as `Failure`).
    pub fn parse(s: &str) -> Outcome {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .unwrap_or(Outcome::Failure)
    }

    /// A run that ended badly (notifications, alerts).
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            Outcome::Failure | Outcome::Partial | Outcome::Timeout | Outcome::Interrupted
        )
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One row of job history.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRun {
    pub id: i64,
    pub job: String,
    /// `schedule`, `missed` (run at start-up for a time that passed) or `manual`.
    pub trigger: String,
    pub scheduled_ms: Option<i64>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// `running`, `success`, `partial`, `failure`, `timeout`, `cancelled`,
    /// `skipped` or `interrupted`.
    pub outcome: Outcome,
    pub attempts: u32,
    pub bytes_read: u64,
    pub bytes_added: u64,
    pub snapshots: Vec<String>,
    pub error: Option<String>,
    /// What the run did, in words (a point's members, what a source left
    /// out and why); in the daemon's log, not kept in the history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_history_records_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let h = JobHistory::open(&dir.path().join("jobs.db")).unwrap();
        for i in 0..5i64 {
            let id = h
                .job_run_start("a", "schedule", Some(i * 1000), i * 1000)
                .unwrap();
            let outcome = if i == 3 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            h.job_run_finish(
                id,
                &JobRun {
                    finished_ms: Some(i * 1000 + 10),
                    outcome,
                    attempts: 1,
                    snapshots: vec![format!("s{i}")],
                    ..Default::default()
                },
            )
            .unwrap();
        }
        h.job_run_start("a", "manual", None, 9000).unwrap();
        assert_eq!(h.job_last_scheduled("a").unwrap(), Some(4000));
        let last_fail = h.job_last_with("a", &[Outcome::Failure]).unwrap().unwrap();
        assert_eq!(last_fail.snapshots, ["s3"]);
        assert_eq!(h.job_runs_interrupted("a", 9500).unwrap(), 1);
        let counts: std::collections::BTreeMap<_, _> =
            h.job_outcome_counts("a").unwrap().into_iter().collect();
        assert_eq!(counts[&Outcome::Success], 4);
        assert_eq!(counts[&Outcome::Interrupted], 1);
        h.job_runs_trim("a", 2).unwrap();
        let left = h.job_runs(Some("a"), 10).unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].outcome, "interrupted");
        assert_eq!(left[1].snapshots, ["s4"]);
    }
}
