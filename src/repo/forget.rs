//! Retention: which snapshots to keep, and why.
//!
//! Snapshots are grouped (by default per source: kind and name; optionally
//! also by host and tags) and each group is decided on its own, newest
//! first, like restic: `keep-last N` keeps the N newest; `keep-hourly N` (and
//! daily, weekly, monthly, yearly) keeps the newest snapshot of each of the
//! N most recent hours (days, ISO weeks, months, years) that have one;
//! `keep-within D` keeps everything within D of the group's newest snapshot.
//! A snapshot kept by several rules lists every rule. Forgetting deletes only
//! snapshot manifests; the data they referenced goes with `labctl prune`.

use crate::error::LabError;
use crate::repo::Id;
use serde::Serialize;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// The keep rules. At least one must be set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeepPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    pub within: Option<time::Duration>,
}

/// The keep rules as written: `labctl forget --keep-*` flags and a job's
/// `retention`/`forget` table in `labctl.toml` are this one struct.
#[derive(Debug, Clone, Default, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct KeepRules {
    /// Keep the N newest snapshots of each group.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent hours.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot within this long of the group's newest (7d, 2w, 1y6mo, 36h).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
}

impl KeepRules {
    /// The validated policy.
    ///
    /// # Errors
    /// `(field, usage error)`: a malformed `keep_within`, or no rule at all
    /// (an empty policy would remove every snapshot).
    pub fn policy(&self) -> Result<KeepPolicy, (&'static str, LabError)> {
        let p = KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within: self
                .keep_within
                .as_deref()
                .map(crate::util::units::parse_time_duration)
                .transpose()
                .map_err(|e| ("keep_within", e))?,
        };
        if p.is_empty() {
            return Err((
                "keep_last",
                LabError::usage(
                    "give at least one keep rule (keep_last, keep_daily, ...); an empty policy would remove every snapshot",
                ),
            ));
        }
        Ok(p)
    }
}

impl KeepPolicy {
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// One snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: Id,
    pub time: OffsetDateTime,
    pub group: String,
}

/// The decision for one snapshot.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Decision {
    pub id: Id,
    pub time: String,
    pub group: String,
    pub keep: bool,
    /// The rules that keep it (empty when it goes).
    pub reasons: Vec<String>,
}

type BucketFn = fn(OffsetDateTime) -> String;

fn buckets(p: &KeepPolicy) -> Vec<(&'static str, u32, BucketFn)> {
    let mut out: Vec<(&'static str, u32, BucketFn)> = vec![];
    if let Some(n) = p.hourly {
        out.push(("hourly", n, |t| {
            format!(
                "{}-{:02}-{:02} {:02}h",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour()
            )
        }));
    }
    if let Some(n) = p.daily {
        out.push(("daily", n, |t| {
            format!("{}-{:02}-{:02}", t.year(), t.month() as u8, t.day())
        }));
    }
    if let Some(n) = p.weekly {
        out.push(("weekly", n, |t| {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y}-W{w:02}")
        }));
    }
    if let Some(n) = p.monthly {
        out.push(("monthly", n, |t| {
            format!("{}-{:02}", t.year(), t.month() as u8)
        }));
    }
    if let Some(n) = p.yearly {
        out.push(("yearly", n, |t| format!("{}", t.year())));
    }
    out
}

/// Decides every snapshot. Groups are independent; within a group the
/// newest snapshot is the reference for `within`.
pub fn decide(mut snaps: Vec<Candidate>, policy: &KeepPolicy) -> Vec<Decision> {
    snaps.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
    let mut groups: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for s in snaps {
        groups.entry(s.group.clone()).or_default().push(s);
    }
    let mut out = vec![];
    for (_, group) in groups {
        let newest = group[0].time;
        let rules = buckets(policy);
        let mut last_bucket: Vec<Option<String>> = vec![None; rules.len()];
        let mut kept: Vec<u32> = vec![0; rules.len()];
        for (i, s) in group.iter().enumerate() {
            let mut reasons = vec![];
            if let Some(n) = policy.last {
                if (i as u32) < n {
                    reasons.push(format!("last {n}"));
                }
            }
            for (r, (name, n, bucket)) in rules.iter().enumerate() {
                let b = bucket(s.time);
                if kept[r] < *n && last_bucket[r].as_deref() != Some(b.as_str()) {
                    kept[r] += 1;
                    reasons.push(format!("{name} {} ({b})", kept[r]));
                    last_bucket[r] = Some(b);
                }
            }
            if let Some(d) = policy.within {
                if s.time >= newest - d {
                    reasons.push(format!(
                        "within {} days of the newest",
                        d.whole_hours() as f64 / 24.0
                    ));
                }
            }
            out.push(Decision {
                id: s.id,
                time: s
                    .time
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                group: s.group.clone(),
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn snap(n: u8, t: OffsetDateTime, g: &str) -> Candidate {
        Candidate {
            id: Id([n; 32]),
            time: t,
            group: g.into(),
        }
    }

    #[test]
    fn daily_and_last_rules_with_reasons() {
        let snaps = vec![
            snap(1, datetime!(2026-11-26 02:00 UTC), "a"),
            snap(2, datetime!(2026-11-25 14:00 UTC), "a"),
            snap(3, datetime!(2026-11-25 02:00 UTC), "a"),
            snap(4, datetime!(2026-11-24 02:00 UTC), "a"),
            snap(5, datetime!(2026-11-20 02:00 UTC), "a"),
            snap(6, datetime!(2026-11-01 02:00 UTC), "b"),
        ];
        let p = KeepPolicy {
            last: Some(1),
            daily: Some(3),
            ..Default::default()
        };
        let d = decide(snaps, &p);
        let keep: Vec<(u8, bool)> = d.iter().map(|x| (x.id.0[0], x.keep)).collect();
        // Group a: newest (last 1 + daily), 25th 14:00 (daily), 24th (daily); 25th 02:00 is
        // a second one that day, 20th is beyond 3 days. Group b: its only snapshot.
        assert_eq!(
            keep,
            vec![
                (1, true),
                (2, true),
                (3, false),
                (4, true),
                (5, false),
                (6, true)
            ]
        );
        assert_eq!(
            d[0].reasons,
            vec!["last 1".to_string(), "daily 1 (2026-11-26)".to_string()]
        );
    }

    #[test]
    fn weekly_monthly_yearly_and_within() {
        let snaps: Vec<Candidate> = (0..60u8)
            .map(|i| {
                snap(
                    i,
                    datetime!(2026-11-26 00:00 UTC) - time::Duration::days(i as i64 * 7),
                    "g",
                )
            })
            .collect();
        let p = KeepPolicy {
            weekly: Some(4),
            monthly: Some(3),
            yearly: Some(2),
            within: Some(time::Duration::days(10)),
            ..Default::default()
        };
        let d = decide(snaps, &p);
        let kept: Vec<u8> = d.iter().filter(|x| x.keep).map(|x| x.id.0[0]).collect();
        // weekly 4: weeks 0-3; monthly 3: Nov (0), Oct (4: Oct 29), Sep (9: Sep 24);
        // yearly 2: 2026 (0) and the newest of 2025 (48: Dec 25); within 10d: 0, 1.
        assert_eq!(kept, vec![0, 1, 2, 3, 4, 9, 48]);
        assert!(d[1].reasons.iter().any(|r| r.starts_with("within")));
        assert!(!d[2].reasons.iter().any(|r| r.starts_with("within")));
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub decisions: Vec<Decision>,
    /// Snapshots that should go but are protected by Object Lock (short id and until when).
    pub locked: Vec<String>,
}

/// A complete restore point is never split: its snapshots are kept
/// together when any of them is kept, or when some of them are outside the
/// decisions (another source's selection); they go together only when
/// every one of them is decided and none is kept.
pub fn keep_points_whole(
    decisions: &mut [Decision],
    all: &[(Id, crate::repo::snapshot::Snapshot)],
) {
    let points = crate::repo::select::restore_points(all.iter().map(|(i, s)| (i, s)));
    let decided: std::collections::HashMap<Id, usize> = decisions
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id, i))
        .collect();
    for p in points.iter().filter(|p| p.complete && p.members.len() > 1) {
        let idx: Vec<usize> = p
            .members
            .iter()
            .filter_map(|m| decided.get(&m.snapshot).copied())
            .collect();
        if idx.is_empty() {
            continue;
        }
        let outside = p.members.len() - idx.len();
        let any_kept = idx.iter().any(|&i| decisions[i].keep);
        let reason = if outside > 0 {
            format!(
                "restore point {} is kept whole: {outside} of its snapshots are outside this selection (select all its sources to forget it)",
                p.id
            )
        } else if any_kept {
            format!("restore point {} is kept whole", p.id)
        } else {
            continue;
        };
        for i in idx {
            if !decisions[i].keep {
                decisions[i].keep = true;
                decisions[i].reasons.push(reason.clone());
            }
        }
    }
}

/// The group a snapshot belongs to under `by` (source, host, tags).
pub fn group_key(snap: &crate::repo::snapshot::Snapshot, by: &[&str]) -> String {
    let mut parts = vec![];
    for k in by {
        match *k {
            "source" => parts.push(format!("{}:{}", snap.source.kind, snap.source.name)),
            "host" => parts.push(format!("host={}", snap.host)),
            "tags" => {
                let mut t = snap.tags.clone();
                t.sort();
                parts.push(format!("tags={}", t.join(",")));
            }
            _ => {}
        }
    }
    parts.join(" ")
}

/// Applies `policy` to the snapshots `filter` selects, grouped by `by`, and
/// (unless `dry_run`) deletes the snapshot manifests it does not keep.
/// Snapshots under Object Lock stay and are listed in `locked`.
///
/// # Errors
/// Storage errors; an integrity error for a snapshot with a bad time.
pub fn apply(
    repo: &crate::repo::Repository,
    policy: &KeepPolicy,
    by: &[&str],
    filter: impl Fn(&crate::repo::snapshot::Snapshot) -> bool,
    dry_run: bool,
) -> crate::error::Result<ForgetReport> {
    if policy.is_empty() {
        return Err(LabError::usage(
            "give at least one keep rule; forget refuses to remove every snapshot",
        )
        .into());
    }
    let all = repo.catalog.snapshot_manifests()?;
    let mut candidates = vec![];
    for (id, snap) in &all {
        if filter(snap) {
            let time =
                OffsetDateTime::parse(&snap.time, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                    LabError::integrity(format!("snapshot {}: bad time {}", id.short(), snap.time))
                })?;
            candidates.push(Candidate {
                id: *id,
                time,
                group: group_key(snap, by),
            });
        }
    }
    let mut decisions = decide(candidates, policy);
    keep_points_whole(&mut decisions, &all);
    let mut locked = vec![];
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            let name = crate::repo::format::snapshot_name(&d.id);
            if let Some(until) = repo
                .backend
                .locked_until(&name)?
                .filter(|t| *t > OffsetDateTime::now_utc())
            {
                locked.push(format!("{} (locked until {until})", d.id.short()));
                continue;
            }
            // Out of the catalog first: a sync that sees the object gone
            // must not take this deletion for a vanished snapshot. Should
            // the delete fail, the next sync lists the snapshot again.
            repo.catalog.remove_snapshot(&d.id)?;
            repo.forget_loaded_snapshot(&d.id);
            repo.backend.delete(&name)?;
        }
    }
    Ok(ForgetReport { decisions, locked })
}
