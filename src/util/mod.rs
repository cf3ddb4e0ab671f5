//! Small helpers every layer may use: units (durations, sizes, percentages:
//! one grammar each), secret files, locks, direct I/O, progress display.
//!
//! Owns no domain knowledge: nothing here imports from any other labctl
//! module except [`crate::error`].

pub mod dbclient;
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

/// A URL with any password in its user part removed (`scheme://user:pw@host`
/// becomes `scheme://user@host`): what may appear in names, facts and
/// messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{scheme}://{user}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn passwords_leave_urls() {
        assert_eq!(
            super::redact_url("postgresql://ml:s3cret@db:5432/mlflow"),
            "postgresql://ml@db:5432/mlflow"
        );
        assert_eq!(
            super::redact_url("sqlite:////srv/m.db"),
            "sqlite:////srv/m.db"
        );
    }
}
