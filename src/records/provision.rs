//! What `labctl provision` applied, when and by whom (`provision.db` in the
//! cache directory), and the lock that keeps two applies on one host apart.

use rusqlite::{params, Connection};
use std::collections::BTreeMap;
use std::path::Path;

/// One VM's line in the record of an apply or destroy.
#[derive(Debug, Clone)]
pub struct AppliedVm {
    pub name: String,
    pub vmid: u32,
    /// `create`, `update`, `destroy`, ... (`unchanged` is not recorded).
    pub action: String,
    /// What changed, as shown by `provision plan`.
    pub changes: serde_json::Value,
    pub ok: bool,
    pub error: Option<String>,
}

fn open(path: &Path) -> crate::error::Result<Connection> {
    crate::util::sqlite::private_file(path)?;
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS applied(id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
         user TEXT NOT NULL, host TEXT NOT NULL, platform TEXT NOT NULL, vm TEXT NOT NULL, vmid INTEGER NOT NULL,
         action TEXT NOT NULL, changes TEXT NOT NULL, ok INTEGER NOT NULL, error TEXT);",
    )?;
    Ok(c)
}

fn user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

/// Records one apply (or destroy).
///
/// # Errors
/// SQLite errors.
pub fn record(
    path: &Path,
    platform_file: &Path,
    applied: &[AppliedVm],
) -> crate::error::Result<()> {
    let c = open(path)?;
    let now = crate::util::now_rfc3339();
    let host = gethostname::gethostname().to_string_lossy().to_string();
    let user = user();
    for a in applied.iter().filter(|a| a.action != "unchanged") {
        c.execute(
            "INSERT INTO applied(time,user,host,platform,vm,vmid,action,changes,ok,error) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
            params![
                now,
                user,
                host,
                platform_file.display().to_string(),
                a.name,
                a.vmid,
                a.action,
                a.changes.to_string(),
                a.ok,
                a.error
            ],
        )?;
    }
    Ok(())
}

/// The newest record per VM name.
///
/// # Errors
/// SQLite errors.
pub fn last_per_vm(path: &Path) -> crate::error::Result<BTreeMap<String, serde_json::Value>> {
    let c = open(path)?;
    let mut st = c.prepare(
        "SELECT vm, vmid, time, user, host, action, changes, ok, error FROM applied
         WHERE id IN (SELECT MAX(id) FROM applied GROUP BY vm)",
    )?;
    let rows = st.query_map([], |r| {
        let changes: String = r.get(6)?;
        Ok((
            r.get::<_, String>(0)?,
            serde_json::json!({
                "vmid": r.get::<_, i64>(1)?,
                "time": r.get::<_, String>(2)?,
                "user": r.get::<_, String>(3)?,
                "host": r.get::<_, String>(4)?,
                "action": r.get::<_, String>(5)?,
                "changes": serde_json::from_str::<serde_json::Value>(&changes).unwrap_or_default(),
                "ok": r.get::<_, bool>(7)?,
                "error": r.get::<_, Option<String>>(8)?,
            }),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Holds `provision.lock` beside the audit database: one apply or destroy
/// at a time on this host.
///
/// # Errors
/// A refusal when another one runs.
pub fn lock(db: &Path) -> crate::error::Result<std::fs::File> {
    let path = db.with_extension("lock");
    let Some(f) = crate::util::lock::try_exclusive(&path)? else {
        return Err(crate::error::LabError::refused(format!(
            "another labctl provision apply/destroy is running on this host ({} is locked)",
            path.display()
        ))
        .into());
    };
    Ok(f)
}
