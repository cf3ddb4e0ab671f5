//! The policy audit trail: every `labctl policy apply` that changes the
//! cluster appends one entry — who (the local user or `--actor`), when,
//! why (`--reason`), the git commit of the policy folder when there is one,
//! and every object created, updated or deleted — to an append-only JSON
//! lines file, and the same entry to an SQLite file beside it (`.db`).
//!
//! Entries are hash-chained: each carries the SHA-256 of the previous
//! entry's line and its own hash over its content, so editing, removing or
//! reordering any entry is detected by `labctl audit verify`.

use crate::error::LabError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hash_of(entry: &Value) -> String {
    // Canonical: serde_json sorts object keys (BTreeMap-backed Map).
    hex::encode(Sha256::digest(serde_json::to_vec(entry).expect("json")))
}

/// The git commit of the folder (and whether it has uncommitted changes).
pub fn git_commit(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--", "."])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{commit}+uncommitted")
    } else {
        commit
    })
}

/// The local user (or `SUDO_USER` behind sudo).
pub fn local_user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

fn last(path: &Path) -> crate::error::Result<(u64, String)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, GENESIS.into())),
        Err(e) => return Err(e.into()),
    };
    match text.lines().rfind(|l| !l.trim().is_empty()) {
        None => Ok((0, GENESIS.into())),
        Some(l) => {
            let v: Value = serde_json::from_str(l).map_err(|e| {
                LabError::integrity(format!(
                    "{}: the last entry is not JSON ({e}); run `labctl audit verify`",
                    path.display()
                ))
            })?;
            Ok((
                v["seq"].as_u64().unwrap_or(0),
                v["hash"].as_str().unwrap_or("").to_string(),
            ))
        }
    }
}

/// Appends one entry (fsynced) and mirrors it into `policy.db`.
///
/// # Errors
/// I/O errors; an integrity error when the file's last line is damaged.
pub fn record(
    path: &Path,
    actor: &str,
    reason: Option<&str>,
    policies: &Path,
    changes: Value,
) -> crate::error::Result<Value> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let (seq, prev) = last(path)?;
    let mut entry = json!({
        "seq": seq + 1,
        "time": crate::util::now_rfc3339(),
        "actor": actor,
        "host": gethostname::gethostname().to_string_lossy(),
        "reason": reason,
        "policies": policies.display().to_string(),
        "git-commit": git_commit(policies),
        "changes": changes,
        "prev": prev,
    });
    let h = hash_of(&entry);
    entry["hash"] = json!(h);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(&entry)?)?;
    f.sync_all()?;
    let db = rusqlite::Connection::open(path.with_extension("db"))?;
    db.busy_timeout(std::time::Duration::from_secs(10))?;
    db.execute_batch("CREATE TABLE IF NOT EXISTS audit(seq INTEGER PRIMARY KEY, time TEXT NOT NULL, actor TEXT NOT NULL, entry TEXT NOT NULL, hash TEXT NOT NULL)")?;
    db.execute(
        "INSERT OR REPLACE INTO audit(seq,time,actor,entry,hash) VALUES(?1,?2,?3,?4,?5)",
        rusqlite::params![
            entry["seq"].as_u64().unwrap_or(0) as i64,
            entry["time"].as_str(),
            actor,
            entry.to_string(),
            h
        ],
    )?;
    Ok(entry)
}

/// Checks the chain; returns the number of entries.
///
/// # Errors
/// An integrity error naming the first line that does not fit.
pub fn verify(path: &Path) -> crate::error::Result<u64> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LabError::usage(format!("{}: {e}", path.display())))?;
    let mut prev = GENESIS.to_string();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| -> crate::error::Error {
            LabError::integrity(format!(
                "{}:{}: {why}: the audit trail was altered at or before this entry",
                path.display(),
                i + 1
            ))
            .into()
        };
        let mut v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let claimed = v["hash"].as_str().unwrap_or("").to_string();
        v.as_object_mut().expect("object").remove("hash");
        if v["prev"].as_str() != Some(prev.as_str()) {
            return Err(bad(
                "does not follow the previous entry (prev hash mismatch)".into(),
            ));
        }
        if v["seq"].as_u64() != Some(n + 1) {
            return Err(bad(format!(
                "sequence number {} where {} was expected",
                v["seq"],
                n + 1
            )));
        }
        if hash_of(&v) != claimed {
            return Err(bad("its content does not match its hash".into()));
        }
        prev = claimed;
        n += 1;
    }
    Ok(n)
}
