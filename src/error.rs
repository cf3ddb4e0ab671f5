//! Exit codes and the typed errors that map to them. Every library function
//! returns [`Result`], whose [`Error`] carries an [`ErrorKind`] (one per
//! exit code, plus cancellation) and the chain of context that names the
//! object. Inside, modules raise [`LabError`] (a kind and a message),
//! [`BackendError`] (storage, naming the object) or [`Cancelled`], and add
//! context with `anyhow` or [`ResultExt`]; [`Error`]'s `From` classifies a
//! chain once ([`exit_code_for`], the one place a chain becomes an exit
//! code), and [`Error::is_retryable`] is the one place the daemon asks
//! whether another attempt can help. The table below is the contract
//! documented in the README and the man pages; do not renumber.
//!
//! Must not import anything from labctl: every other module depends on it.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | unexpected failure (a bug or an unclassified I/O error) |
//! | 2 | usage: a wrong flag, argument or configuration value |
//! | 3 | backup finished, but some source files could not be read or changed while being read (snapshot written, incomplete) |
//! | 4 | integrity: check found problems, or data is corrupted, truncated or missing |
//! | 5 | key: wrong key, unreadable or too-open key file, or the key lacks the role needed |
//! | 6 | refused: the restore target is not empty (use `--overwrite`), or the object exists |
//! | 7 | repository storage unreachable or failing (I/O on the backend) |

use std::fmt;

/// Documented process exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success = 0,
    Failure = 1,
    Usage = 2,
    PartialBackup = 3,
    Integrity = 4,
    Key = 5,
    Refused = 6,
    Storage = 7,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The code for a number recorded earlier (an unknown one is a failure).
    pub fn from_code(code: i32) -> ExitCode {
        [
            ExitCode::Success,
            ExitCode::Failure,
            ExitCode::Usage,
            ExitCode::PartialBackup,
            ExitCode::Integrity,
            ExitCode::Key,
            ExitCode::Refused,
            ExitCode::Storage,
        ]
        .into_iter()
        .find(|c| c.code() == code)
        .unwrap_or(ExitCode::Failure)
    }
}

/// A classified error: what kind of failure (one variant per exit code),
/// and a message naming the object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A wrong flag, argument or setting (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Data or a check found corrupted, truncated or missing (exit 4).
    #[error("{0}")]
    Integrity(String),
    /// A wrong, unreadable or too-open key file, or one without the role
    /// needed (exit 5).
    #[error("{0}")]
    Key(String),
    /// Refused: a non-empty target, an existing object (exit 6).
    #[error("{0}")]
    Refused(String),
    /// Repository storage unreachable or failing (exit 7).
    #[error("{0}")]
    Storage(String),
    /// Something that fails the work without a more specific kind: a dump
    /// command that exited non-zero, a VM that did not come up (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl LabError {
    /// An error of the kind that exits with `code` (codes without a kind of
    /// their own, 0 and 3, become [`LabError::Failed`]).
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        let m = message.into();
        match code {
            ExitCode::Usage => LabError::Usage(m),
            ExitCode::Integrity => LabError::Integrity(m),
            ExitCode::Key => LabError::Key(m),
            ExitCode::Refused => LabError::Refused(m),
            ExitCode::Storage => LabError::Storage(m),
            ExitCode::Success | ExitCode::Failure | ExitCode::PartialBackup => LabError::Failed(m),
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        LabError::Usage(message.into())
    }
    pub fn integrity(message: impl Into<String>) -> Self {
        LabError::Integrity(message.into())
    }
    pub fn key(message: impl Into<String>) -> Self {
        LabError::Key(message.into())
    }
    pub fn refused(message: impl Into<String>) -> Self {
        LabError::Refused(message.into())
    }
    pub fn storage(message: impl Into<String>) -> Self {
        LabError::Storage(message.into())
    }
    pub fn failed(message: impl Into<String>) -> Self {
        LabError::Failed(message.into())
    }

    /// The documented exit code of this kind.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            LabError::Usage(_) => ExitCode::Usage,
            LabError::Integrity(_) => ExitCode::Integrity,
            LabError::Key(_) => ExitCode::Key,
            LabError::Refused(_) => ExitCode::Refused,
            LabError::Storage(_) => ExitCode::Storage,
            LabError::Failed(_) => ExitCode::Failure,
        }
    }

    /// Whether another attempt may succeed: storage trouble and plain
    /// failures may pass; usage, key, integrity and refusal errors are
    /// permanent.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LabError::Storage(_) | LabError::Failed(_))
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        match self {
            LabError::Usage(m)
            | LabError::Integrity(m)
            | LabError::Key(m)
            | LabError::Refused(m)
            | LabError::Storage(m)
            | LabError::Failed(m) => m,
        }
    }
}

/// Work stopped because it was asked to (a timeout or shutdown); what was
/// already written stays consistent and is re-used by the next run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cancelled before it finished; nothing was committed")
    }
}

impl std::error::Error for Cancelled {}

/// A shared flag that asks long work to stop at its next check.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once cancelled.
    ///
    /// # Errors
    /// [`Cancelled`].
    pub fn check(&self) -> std::result::Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A failed backend operation, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("object {name} does not exist in the repository")]
    NotFound { name: String },
    #[error("object {name} already exists; repository objects are never overwritten")]
    AlreadyExists { name: String },
    #[error("object {name}: asked for bytes {offset}..{end} but it holds only {size} bytes (truncated object?)")]
    ShortRead {
        name: String,
        offset: u64,
        end: u64,
        size: u64,
    },
    // The cause is part of the message, not a chained source, so the
    // printed error chain does not repeat it.
    #[error("storage error on {name}: {cause}")]
    Io { name: String, cause: std::io::Error },
}

impl BackendError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Io { cause, .. } => matches!(
                cause.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            BackendError::NotFound { .. } | BackendError::ShortRead { .. } => ExitCode::Integrity,
            BackendError::AlreadyExists { .. } => ExitCode::Refused,
            BackendError::Io { .. } => ExitCode::Storage,
        }
    }
}

/// Finds the exit code for an error chain: the first classified error wins.
/// The one place errors become exit codes.
pub fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<LabError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<BackendError>() {
            return e.exit_code();
        }
    }
    ExitCode::Failure
}

/// Whether retrying the whole operation may succeed. Usage, key, integrity
/// and refusal errors are permanent (the next attempt fails the same way);
/// storage trouble and unclassified failures (a dump command that exited
/// non-zero, a network error) may pass.
pub fn is_retryable(err: &anyhow::Error) -> bool {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<LabError>() {
            return e.is_retryable();
        }
        if let Some(e) = cause.downcast_ref::<BackendError>() {
            return e.is_retryable() || e.exit_code() == ExitCode::Storage;
        }
    }
    true
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// A wrong flag, argument or setting (exit 2).
    Usage,
    /// Corrupted, truncated or missing data (exit 4).
    Integrity,
    /// A key problem (exit 5).
    Key,
    /// Refused: a non-empty target, an existing object (exit 6).
    Refused,
    /// Repository storage unreachable or failing (exit 7).
    Storage,
    /// Stopped because it was asked to (a timeout or shutdown; exit 1).
    Cancelled,
    /// Anything else (exit 1).
    Failed,
}

/// The library's error: its [`ErrorKind`] and the chain of context that
/// names the object and what to do. Printed whole (`a: b: c`).
pub struct Error {
    kind: ErrorKind,
    chain: anyhow::Error,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The documented exit code of this error.
    pub fn exit_code(&self) -> ExitCode {
        match self.kind {
            ErrorKind::Usage => ExitCode::Usage,
            ErrorKind::Integrity => ExitCode::Integrity,
            ErrorKind::Key => ExitCode::Key,
            ErrorKind::Refused => ExitCode::Refused,
            ErrorKind::Storage => ExitCode::Storage,
            ErrorKind::Cancelled | ErrorKind::Failed => ExitCode::Failure,
        }
    }

    /// Whether another attempt may succeed (see [`is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        is_retryable(&self.chain)
    }

    /// Whether the work was cancelled (a timeout or shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }

    /// Each error of the chain, outermost first.
    pub fn chain(&self) -> anyhow::Chain<'_> {
        self.chain.chain()
    }

    /// The first error of type `E` in the chain.
    pub fn find<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.chain.chain().find_map(|c| c.downcast_ref::<E>())
    }

    /// The error (or context) of type `E` at the top of the chain, as
    /// `anyhow::Error::downcast_ref` finds it.
    pub fn downcast_ref<E>(&self) -> Option<&E>
    where
        E: fmt::Display + fmt::Debug + Send + Sync + 'static,
    {
        self.chain.downcast_ref::<E>()
    }

    /// Adds context (what was being done), keeping the kind.
    pub fn context<C>(self, context: C) -> Error
    where
        C: fmt::Display + Send + Sync + 'static,
    {
        Error {
            chain: self.chain.context(context),
            ..self
        }
    }

    /// The chain as an `anyhow::Error` (for code that collects errors).
    pub fn into_anyhow(self) -> anyhow::Error {
        self.chain
    }
}

impl<E: Into<anyhow::Error>> From<E> for Error {
    fn from(e: E) -> Self {
        let chain: anyhow::Error = e.into();
        let cancelled = chain
            .chain()
            .any(|c| c.downcast_ref::<Cancelled>().is_some());
        let kind = if cancelled {
            ErrorKind::Cancelled
        } else {
            match exit_code_for(&chain) {
                ExitCode::Usage => ErrorKind::Usage,
                ExitCode::Integrity => ErrorKind::Integrity,
                ExitCode::Key => ErrorKind::Key,
                ExitCode::Refused => ErrorKind::Refused,
                ExitCode::Storage => ErrorKind::Storage,
                _ => ErrorKind::Failed,
            }
        };
        Error { kind, chain }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.chain)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} error: {:?}", self.kind, self.chain)
    }
}

/// `.context()` / `.with_context()` on the library's own [`Result`] (for
/// other errors, `anyhow::Context` does the same and `?` classifies).
pub trait ResultExt<T> {
    /// Adds context, keeping the error's kind.
    ///
    /// # Errors
    /// The error, with the context on top.
    fn context<C>(self, context: C) -> Result<T>
    where
        C: fmt::Display + Send + Sync + 'static;

    /// Adds lazily built context, keeping the error's kind.
    ///
    /// # Errors
    /// The error, with the context on top.
    fn with_context<C, F>(self, f: F) -> Result<T>
    where
        C: fmt::Display + Send + Sync + 'static,
        F: FnOnce() -> C;
}

impl<T> ResultExt<T> for Result<T> {
    fn context<C>(self, context: C) -> Result<T>
    where
        C: fmt::Display + Send + Sync + 'static,
    {
        self.map_err(|e| e.context(context))
    }

    fn with_context<C, F>(self, f: F) -> Result<T>
    where
        C: fmt::Display + Send + Sync + 'static,
        F: FnOnce() -> C,
    {
        self.map_err(|e| e.context(f()))
    }
}

/// `return Err(...)` with a formatted message, for [`Result`] and
/// `anyhow::Result` alike.
macro_rules! bail {
    ($($t:tt)*) => {
        return ::std::result::Result::Err(::anyhow::anyhow!($($t)*).into())
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_not_retried_and_map_to_their_exit_codes() {
        let key: anyhow::Error = LabError::key("wrong key").into();
        assert!(!is_retryable(&key.context("opening")));
        let usage: anyhow::Error = LabError::usage("bad flag").into();
        assert!(!is_retryable(&usage));
        let failed: anyhow::Error = LabError::failed("pg_dump exited 1").into();
        assert!(is_retryable(&failed));
        let io: anyhow::Error = BackendError::Io {
            name: "packs/x".into(),
            cause: std::io::Error::from(std::io::ErrorKind::TimedOut),
        }
        .into();
        assert!(is_retryable(&io));
        assert_eq!(exit_code_for(&io), ExitCode::Storage);
        let gone: anyhow::Error = BackendError::NotFound {
            name: "packs/x".into(),
        }
        .into();
        assert!(!is_retryable(&gone));
        assert_eq!(exit_code_for(&gone.context("reading")), ExitCode::Integrity);
        assert!(is_retryable(&anyhow::anyhow!("connection reset")));
    }

    #[test]
    fn the_typed_error_keeps_its_kind_through_context_and_conversions() {
        fn inner() -> Result<()> {
            Err(LabError::refused("target not empty").into())
        }
        fn outer() -> Result<()> {
            inner().context("restoring into /srv")?;
            Ok(())
        }
        let e = outer().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused);
        assert_eq!(e.exit_code(), ExitCode::Refused);
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "restoring into /srv: target not empty");
        assert!(e.find::<LabError>().is_some());

        fn io() -> Result<Vec<u8>> {
            use anyhow::Context;
            Ok(std::fs::read("/nonexistent/labctl").context("reading x")?)
        }
        let e = io().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failed);
        assert!(e.is_retryable());
        assert!(e.find::<std::io::Error>().is_some());

        let c: Error = anyhow::Error::new(Cancelled).context("job x").into();
        assert!(c.is_cancelled());
        assert_eq!(c.exit_code(), ExitCode::Failure);
        let s: Error = BackendError::NotFound { name: "p".into() }.into();
        assert_eq!(s.kind(), ErrorKind::Integrity);
    }
}
