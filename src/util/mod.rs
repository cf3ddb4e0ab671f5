//! Small helpers every layer may use: units (durations, sizes, percentages:
//! one grammar each), secret files, locks, direct I/O, progress display.
//!
//! Owns no domain knowledge: nothing here imports from any other labctl
//! module except [`crate::error`].

pub mod directio;
pub mod located;
pub mod lock;
pub mod progress;
pub mod secret;
pub mod sqlite;
pub mod units;

/// Now, in RFC 3339 (UTC), as every record and snapshot writes times.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting a time")
}

/// The tokio runtime for commands that talk over the network (daemon, jobs,
/// provision, policy): two workers, as on the lab's 2-core hosts.
///
/// # Errors
/// When the runtime cannot start.
pub fn runtime() -> crate::error::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
