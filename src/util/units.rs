//! Units as people write them in flags and files: durations, byte sizes and
//! percentages. ONE grammar each, used everywhere a value is read.
//!
//! Durations: one or more `<number><unit>` with no spaces, units
//! `s` (seconds), `m` or `min` (minutes), `h`, `d`, `w` (7 days),
//! `mo` (30 days) and `y` (365 days): `30s`, `5m`, `90min`, `2h`, `7d`,
//! `4w`, `1y6mo`, `1h30m`.
//!
//! Must not know what a value is for, except [`parse_retention_duration`]'s
//! guard for the old meaning of `m` in retention and grace periods.

use crate::error::LabError;
use std::time::Duration;

const DURATION_HELP: &str =
    "a duration like 30s, 5m, 2h, 7d, 4w, 1y6mo or 1h30m (units s, m or min, h, d, w, mo = 30 days, y = 365 days)";

/// Parses a duration in labctl's one grammar (see the module docs).
///
/// # Errors
/// A usage error naming the text and the grammar.
pub fn parse_duration(text: &str) -> Result<Duration, LabError> {
    parse_parts(text).map(|parts| total(&parts))
}

fn total(parts: &[(u64, u64, String)]) -> Duration {
    Duration::from_secs(parts.iter().fold(0u64, |t, (n, mult, _)| {
        t.saturating_add(n.saturating_mul(*mult))
    }))
}

/// [`parse_duration`] for retention windows and prune grace periods, where
/// labctl before version 0.2 read `m` as 30 days: a bare `m` is refused with
/// what it means now, instead of silently turning months into minutes.
///
/// # Errors
/// As [`parse_duration`], and for a bare `m`.
pub fn parse_retention_duration(text: &str) -> Result<Duration, LabError> {
    let parts = parse_parts(text)?;
    if parts.iter().any(|(_, _, unit)| unit == "m") {
        return Err(LabError::usage(format!(
            "'{text}': `m` means minutes in every labctl duration now; here it used to mean 30 days. Write `mo` for 30-day months (e.g. {}), or `min` if you meant minutes",
            text.replace('m', "mo")
        )));
    }
    Ok(total(&parts))
}

/// [`parse_duration`] as a `time::Duration` (for date arithmetic).
///
/// # Errors
/// As [`parse_duration`].
pub fn parse_time_duration(text: &str) -> Result<time::Duration, LabError> {
    let d = parse_retention_duration(text)?;
    Ok(time::Duration::seconds(
        d.as_secs().min(i64::MAX as u64) as i64
    ))
}

fn parse_parts(text: &str) -> Result<Vec<(u64, u64, String)>, LabError> {
    let bad = || LabError::usage(format!("'{text}' is not {DURATION_HELP}"));
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut parts = vec![];
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(char::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult = match unit {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "mo" => 30 * 86_400,
            "y" => 365 * 86_400,
            _ => return Err(bad()),
        };
        parts.push((n, mult, unit.to_string()));
    }
    Ok(parts)
}

/// Writes a duration back in the grammar, largest units first (`1h30m`).
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, mult) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= mult {
            out.push_str(&format!("{}{unit}", s / mult));
            s %= mult;
        }
    }
    out
}

/// Parses a percentage like `25%` (or `25`) into a share from 0.0 to 1.0.
///
/// # Errors
/// A usage error naming the text.
pub fn parse_percent(s: &str) -> Result<f64, LabError> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| LabError::usage(format!("'{s}' is not a percentage like 25%")))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(LabError::usage(format!(
            "'{s}' must be between 0% and 100%"
        )));
    }
    Ok(v / 100.0)
}

/// `n` and the noun, singular or plural: `1 copy`, `5 copies`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Byte counts for people: `512 B`, `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_for_every_duration() {
        for (text, secs) in [
            ("30s", 30),
            ("5m", 300),
            ("5min", 300),
            ("2h", 7200),
            ("7d", 7 * 86_400),
            ("4w", 28 * 86_400),
            ("1h30m", 5400),
            ("1h30min", 5400),
            ("1y6mo", (365 + 180) * 86_400),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration(text).unwrap().as_secs(), secs, "{text}");
        }
        for bad in ["", "5", "m5", "5 m", "5x", "1.5h", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(
            parse_duration(&format_duration(Duration::from_secs(93_784))).unwrap(),
            Duration::from_secs(93_784)
        );
    }

    #[test]
    fn the_old_month_m_in_retention_is_an_error_that_says_what_it_means_now() {
        let e = parse_retention_duration("1m").unwrap_err().to_string();
        assert!(e.contains("means minutes") && e.contains("1mo"), "{e}");
        assert!(parse_retention_duration("1y6m").is_err());
        assert_eq!(
            parse_retention_duration("1y6mo").unwrap().as_secs(),
            (365 + 180) * 86_400
        );
        assert_eq!(parse_retention_duration("90min").unwrap().as_secs(), 5400);
    }

    #[test]
    fn percentages_are_shares() {
        assert_eq!(parse_percent("25%").unwrap(), 0.25);
        assert_eq!(parse_percent("100").unwrap(), 1.0);
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("x").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
