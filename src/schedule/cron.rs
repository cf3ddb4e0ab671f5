//! Cron schedules: the classic 5-field form and the `cron` crate's 6/7-field
//! form (with seconds, and optionally years).
//!
//! Two traps of the classic form are handled here rather than left to
//! surprise someone at 2 a.m.:
//! - day of week: classic cron counts 0–7 with 0 and 7 = Sunday, 1 = Monday;
//!   the `cron` crate counts 1–7 with 1 = Sunday. Classic fields are rewritten
//!   to day names, so `1-5` still means Monday to Friday.
//! - classic cron runs a job when *either* a restricted day-of-month *or* a
//!   restricted day-of-week matches; the `cron` crate requires both. A
//!   schedule restricting both is refused with an explanation.

use chrono::{DateTime, Utc};
use std::str::FromStr;

const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    inner: cron::Schedule,
}

/// Parses one classic day-of-week field into the set of days (0 = Sunday).
fn classic_dow(field: &str) -> Result<[bool; 7], String> {
    let mut set = [false; 7];
    let day = |s: &str| -> Result<usize, String> {
        if let Ok(n) = s.parse::<usize>() {
            if n <= 7 {
                return Ok(n % 7);
            }
            return Err(format!("day of week '{s}' is out of range 0-7"));
        }
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("'{s}' is not a day of week (0-7 or SUN..SAT)"))
    };
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<usize>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("bad step in '{part}'"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (day(a)?, day(b)?);
            // `5-7` (Friday to Sunday): 7 is Sunday at the end of the week.
            let b = if b == 0 && a > 0 { 7 } else { b };
            if b < a {
                return Err(format!("day-of-week range '{range}' runs backwards"));
            }
            (a, b)
        } else {
            let a = day(range)?;
            (a, if step > 1 { 6 } else { a })
        };
        let mut d = lo;
        while d <= hi {
            set[d % 7] = true;
            d += step;
        }
    }
    Ok(set)
}

impl CronSchedule {
    /// Parses a schedule.
    ///
    /// # Errors
    /// A message saying what is wrong with the expression.
    pub fn parse(text: &str) -> Result<CronSchedule, String> {
        let t = text.trim();
        let fields: Vec<&str> = t.split_whitespace().collect();
        let expr = if t.starts_with('@') {
            t.to_string()
        } else {
            match fields.len() {
                5 => {
                    let (dom, dow) = (fields[2], fields[4]);
                    let restricted = |f: &str| f != "*" && f != "?";
                    if restricted(dom) && restricted(dow) {
                        return Err(format!(
                            "'{t}' restricts both day of month ({dom}) and day of week ({dow}); classic cron runs when either matches but labctl's scheduler needs both to match — split it into two jobs, or set one of them to *"
                        ));
                    }
                    let dow = if restricted(dow) {
                        let set = classic_dow(dow).map_err(|e| format!("'{t}': {e}"))?;
                        DAYS.iter()
                            .zip(set)
                            .filter(|(_, on)| *on)
                            .map(|(d, _)| *d)
                            .collect::<Vec<_>>()
                            .join(",")
                    } else {
                        "*".into()
                    };
                    format!("0 {} {} {} {} {}", fields[0], fields[1], dom, fields[3], dow)
                }
                6 | 7 => t.to_string(),
                n => {
                    return Err(format!(
                        "'{t}' has {n} fields; use 5 (min hour day-of-month month day-of-week) or 6/7 (with seconds first, years last)"
                    ))
                }
            }
        };
        let inner = cron::Schedule::from_str(&expr)
            .map_err(|e| format!("'{t}' is not a valid cron schedule: {e}"))?;
        if inner.upcoming(Utc).next().is_none() {
            return Err(format!("'{t}' never fires"));
        }
        Ok(CronSchedule { inner })
    }

    /// The first time strictly after `after`, read in UTC or local time.
    pub fn next_after(&self, after: DateTime<Utc>, local: bool) -> Option<DateTime<Utc>> {
        if local {
            self.inner
                .after(&after.with_timezone(&chrono::Local))
                .next()
                .map(|t| t.with_timezone(&Utc))
        } else {
            self.inner.after(&after).next()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn next(expr: &str, from: &str) -> String {
        let s = CronSchedule::parse(expr).unwrap();
        let t = DateTime::parse_from_rfc3339(from)
            .unwrap()
            .with_timezone(&Utc);
        s.next_after(t, false).unwrap().to_rfc3339()
    }

    #[test]
    fn classic_five_fields() {
        assert_eq!(
            next("30 2 * * *", "2026-11-26T03:00:00Z"),
            "2026-11-27T02:30:00+00:00"
        );
        // 2026-11-28 is a Saturday: weekdays 1-5 skip to Monday the 30th.
        assert_eq!(
            next("0 2 * * 1-5", "2026-11-27T03:00:00Z"),
            "2026-11-30T02:00:00+00:00"
        );
        // 0 and 7 are both Sunday (the 29th).
        assert_eq!(
            next("0 2 * * 0", "2026-11-27T03:00:00Z"),
            "2026-11-29T02:00:00+00:00"
        );
        assert_eq!(
            next("0 2 * * 7", "2026-11-27T03:00:00Z"),
            "2026-11-29T02:00:00+00:00"
        );
        assert_eq!(
            next("0 2 * * 5-7", "2026-11-28T03:00:00Z"),
            "2026-11-29T02:00:00+00:00"
        );
        assert_eq!(
            next("0 2 * * sat", "2026-11-26T03:00:00Z"),
            "2026-11-28T02:00:00+00:00"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-11-26T03:01:00Z"),
            "2026-11-26T03:15:00+00:00"
        );
        assert_eq!(
            next("@daily", "2026-11-26T03:01:00Z"),
            "2026-11-27T00:00:00+00:00"
        );
    }

    #[test]
    fn six_and_seven_fields() {
        assert_eq!(
            next("* * * * * *", "2026-11-26T03:00:00Z"),
            "2026-11-26T03:00:01+00:00"
        );
        assert_eq!(
            next("0 0 4 1 1 * 2027", "2026-11-26T03:00:00Z"),
            "2027-01-01T04:00:00+00:00"
        );
    }

    #[test]
    fn refusals_explain() {
        assert!(CronSchedule::parse("0 2 * *")
            .unwrap_err()
            .contains("4 fields"));
        assert!(CronSchedule::parse("0 2 1 * 1")
            .unwrap_err()
            .contains("either matches"));
        assert!(CronSchedule::parse("0 2 * * 8")
            .unwrap_err()
            .contains("out of range"));
        assert!(CronSchedule::parse("0 25 * * *").is_err());
        assert!(CronSchedule::parse("0 0 0 1 1 * 2020")
            .unwrap_err()
            .contains("never"));
    }

    #[test]
    fn local_time_is_accepted() {
        let s = CronSchedule::parse("0 2 * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap();
        assert!(s.next_after(t, true).unwrap() > t);
    }
}
