//! PostgreSQL and MySQL/MariaDB through their standard client programs
//! (`psql`, `pg_dump`, `pg_restore`; `mysql`, `mysqldump`), for sources
//! that dump SQL stores (MLflow's backend store, Kubeflow Pipelines'
//! databases): a connection URI parsed into the client's settings, the
//! password kept out of argv and logs (PostgreSQL: a 0600 file's content
//! handed over as `PGPASSWORD` in the child's environment, which other
//! users cannot read, or libpq's own `PGPASSWORD`/`PGPASSFILE`/`~/.pgpass`;
//! MySQL: a 0600 option file given with `--defaults-extra-file`, or the
//! client's own `~/.my.cnf`), missing programs named with the Debian
//! package that provides them, and the clients' failures sorted into
//! labctl's exit codes (a refused login is a key error, an unreachable
//! server a failure).

use crate::error::LabError;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A PostgreSQL database named by a `postgresql://user@host:port/db?...`
/// URI (SQLAlchemy's `postgresql+psycopg2://` too). The URI must not hold
/// a password.
#[derive(Clone)]
pub struct PgTarget {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub database: String,
    /// libpq parameters from the query string (`sslmode`, ...), as env.
    params: Vec<(String, String)>,
    password: Option<Arc<secrecy::SecretString>>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTarget({})", self.display())
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq parameters a URI's query may set, and their environment names
/// (libpq's "Environment Variables" chapter).
const PARAMS: &[(&str, &str)] = &[
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("options", "PGOPTIONS"),
];

impl PgTarget {
    /// Whether `uri` names a PostgreSQL database.
    pub fn is_uri(uri: &str) -> bool {
        let scheme = uri.split("://").next().unwrap_or("");
        uri.contains("://")
            && (scheme == "postgresql" || scheme == "postgres" || scheme.starts_with("postgresql+"))
    }

    /// Parses `uri`; the password, if any, comes from `password_file`
    /// (refused when other users can read it).
    ///
    /// # Errors
    /// `(field, why)` for a malformed URI or one holding a password (the
    /// message never repeats it); a key error for the file.
    pub fn parse(uri: &str, password_file: Option<&Path>) -> Result<PgTarget, LabError> {
        let u = split_uri(
            uri,
            Self::is_uri,
            "postgresql://user@host:5432/database",
            "libpq's PGPASSWORD, PGPASSFILE or ~/.pgpass",
            5432,
        )?;
        let (shown, query) = (&u.shown, &u.query);
        let (host, port, user) = (u.host.clone(), u.port, u.user.clone());
        let database = u.database.clone();
        if database.is_empty() {
            return Err(LabError::usage(format!(
                "'{shown}' names no database (postgresql://user@host:5432/database)"
            )));
        }
        let mut params = vec![];
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k == "password" {
                return Err(LabError::usage(format!(
                    "'{shown}' holds a password parameter: put the password in a 0600 password file (password_file / --password-file) or PGPASSWORD instead"
                )));
            }
            match PARAMS.iter().find(|(p, _)| *p == k) {
                Some((_, env)) => params.push(((*env).to_string(), pct_decode(v))),
                None => {
                    return Err(LabError::usage(format!(
                        "'{shown}': parameter '{k}' is not one labctl passes on (it takes {})",
                        PARAMS
                            .iter()
                            .map(|(p, _)| *p)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        let password = password_file.map(read_password).transpose()?;
        Ok(PgTarget {
            host,
            port,
            user,
            database,
            params,
            password,
        })
    }

    /// The target in words (never a password).
    pub fn display(&self) -> String {
        format!(
            "postgresql://{}{}:{}/{}",
            self.user
                .as_deref()
                .map(|u| format!("{u}@"))
                .unwrap_or_default(),
            self.host,
            self.port,
            self.database
        )
    }

    /// `program` (a PostgreSQL client) set up to talk to this database:
    /// the libpq environment, never prompting for a password (`-w` is up
    /// to the caller's arguments; `PGCONNECT_TIMEOUT` bounds the connect).
    ///
    /// # Errors
    /// A usage error naming the Debian package when `program` is missing.
    pub fn command(&self, program: &str) -> Result<Command, LabError> {
        let path = find_program(program).ok_or_else(|| {
            LabError::usage(format!(
                "{program} is not installed (or not on PATH): install Debian's postgresql-client (its major version at least the server's)"
            ))
        })?;
        let mut c = Command::new(path);
        c.env("PGHOST", &self.host)
            .env("PGPORT", self.port.to_string())
            .env("PGDATABASE", &self.database)
            .env("PGAPPNAME", "labctl")
            .env("PGCONNECT_TIMEOUT", "15");
        if let Some(u) = &self.user {
            c.env("PGUSER", u);
        }
        for (k, v) in &self.params {
            c.env(k, v);
        }
        if let Some(p) = &self.password {
            use secrecy::ExposeSecret;
            c.env("PGPASSWORD", p.expose_secret());
        }
        c.stdin(Stdio::null());
        Ok(c)
    }

    /// Runs one SQL statement through `psql` and returns its rows (fields
    /// split on the unit separator; NULL is an empty field).
    ///
    /// # Errors
    /// [`classify`]'s errors.
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<String>>, LabError> {
        let out = self
            .command("psql")?
            .args([
                "-X",
                "-w",
                "-q",
                "-A",
                "-t",
                "-F",
                "\u{1f}",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg(sql)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| LabError::failed(format!("running psql: {e}")))?;
        if !out.status.success() {
            return Err(self.classify("psql", &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(rows_of(&String::from_utf8_lossy(&out.stdout)))
    }

    /// A client's failure (its stderr) as labctl's error: a refused login
    /// is a key error (exit 5), everything else a failure (exit 1), both
    /// naming the database (never a password).
    pub fn classify(&self, program: &str, stderr: &str) -> LabError {
        let msg = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_prefix(&format!("{program}: ")).unwrap_or(l))
            .map(|l| l.strip_prefix("error: ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("; ");
        let msg = self
            .password
            .as_ref()
            .map(|p| {
                use secrecy::ExposeSecret;
                msg.replace(p.expose_secret(), "***")
            })
            .unwrap_or(msg);
        let what = self.display();
        if msg.contains("password authentication failed")
            || msg.contains("no password supplied")
            || msg.contains("authentication failed")
        {
            LabError::key(format!(
                "PostgreSQL {what} refused the login: {msg} (the password comes from the password file, or PGPASSWORD/PGPASSFILE/~/.pgpass)"
            ))
        } else if msg.contains("Connection refused")
            || msg.contains("could not connect")
            || msg.contains("could not translate host name")
            || msg.contains("timeout expired")
            || msg.contains("No route to host")
        {
            LabError::failed(format!("cannot reach PostgreSQL {what}: {msg}"))
        } else {
            LabError::failed(format!("{program} on {what} failed: {msg}"))
        }
    }
}

/// A database URI's parts (`scheme://[user@]host[:port][/database][?query]`).
struct UriParts {
    /// The URI as messages show it: no password, no query.
    shown: String,
    user: Option<String>,
    host: String,
    port: u16,
    database: String,
    query: String,
}

/// Splits a database URI that `is_uri` accepts; refuses one holding a
/// password (saying where it goes instead, never repeating it), a
/// non-numeric port or no host.
fn split_uri(
    uri: &str,
    is_uri: fn(&str) -> bool,
    example: &str,
    password_elsewhere: &str,
    default_port: u16,
) -> Result<UriParts, LabError> {
    // Never the password, nor the query (it may hold one).
    let shown = crate::util::redact_url(uri.split('?').next().unwrap_or(uri));
    let scheme = example.split("://").next().unwrap_or("");
    let rest = uri
        .split_once("://")
        .map(|(_, r)| r)
        .filter(|_| is_uri(uri))
        .ok_or_else(|| LabError::usage(format!("'{shown}' is not a {scheme}:// URI")))?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (auth_host, db) = main.split_once('/').unwrap_or((main, ""));
    let (auth, hostport) = match auth_host.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, auth_host),
    };
    let user = match auth {
        Some(a) if a.contains(':') => {
            return Err(LabError::usage(format!(
                "'{shown}' holds a password: a URI lands in argv and config files; put the password in a 0600 password file (password_file / --password-file) or {password_elsewhere}"
            )))
        }
        Some(a) if !a.is_empty() => Some(pct_decode(a)),
        _ => None,
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| LabError::usage(format!("'{shown}': port '{p}' is not a number")))?;
            (h.to_string(), port)
        }
        _ => (hostport.to_string(), default_port),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(LabError::usage(format!(
            "'{shown}' names no host ({example})"
        )));
    }
    Ok(UriParts {
        shown,
        user,
        host,
        port,
        database: pct_decode(db),
        query: query.to_string(),
    })
}

/// `psql -A -t -F US` output as rows.
fn rows_of(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\u{1f}').map(String::from).collect())
        .collect()
}

/// `program` on PATH (unset: the usual system directories, as a shell
/// would search them).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// One `psql` session holding a transaction open: a `REPEATABLE READ`
/// snapshot exported with `pg_export_snapshot()`, so `pg_dump
/// --snapshot=ID` dumps exactly what the session's queries see.
pub struct PgSession {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    target: PgTarget,
    pub snapshot: String,
}

const END: &str = "@@labctl-end@@";

impl PgSession {
    /// Connects and exports a snapshot.
    ///
    /// # Errors
    /// [`PgTarget::classify`]'s errors.
    pub fn open(target: &PgTarget) -> Result<PgSession, LabError> {
        let mut child = target
            .command("psql")?
            .args([
                "-X",
                "-w",
                "-q",
                "-A",
                "-t",
                "-F",
                "\u{1f}",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::failed(format!("running psql: {e}")))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut e, s2) = (child.stderr.take().expect("piped"), stderr.clone());
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s2.lock().expect("stderr").push_str(&s);
        });
        let mut s = PgSession {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            stderr,
            target: target.clone(),
            snapshot: String::new(),
        };
        s.rows("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
        let r = s.rows("SELECT pg_export_snapshot()")?;
        s.snapshot = first_cell(&r)
            .map(String::from)
            .ok_or_else(|| LabError::failed("PostgreSQL exported no snapshot"))?;
        Ok(s)
    }

    /// Runs `sql` in the session's transaction; its rows.
    ///
    /// # Errors
    /// The session ended (the statement failed: psql stops on errors).
    pub fn rows(&mut self, sql: &str) -> Result<Vec<Vec<String>>, LabError> {
        let sent = self.stdin.as_mut().map(|w| {
            writeln!(w, "{};\n\\echo {END}", sql.trim_end_matches(';')).and_then(|()| w.flush())
        });
        let mut out = String::new();
        if matches!(sent, Some(Ok(()))) {
            let mut line = String::new();
            loop {
                line.clear();
                match self.stdout.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.trim_end() == END => return Ok(rows_of(&out)),
                    Ok(_) => out.push_str(&line),
                }
            }
        }
        // psql stopped: wait for it and say why.
        self.stdin = None;
        let _ = self.child.wait();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let err = self.stderr.lock().expect("stderr").clone();
        Err(self.target.classify("psql", &err))
    }

    /// Ends the transaction and the session.
    pub fn close(mut self) {
        let _ = self.rows("COMMIT");
        self.stdin = None;
        let _ = self.child.wait();
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        self.stdin = None;
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The first field of the first row of a query's result.
pub fn first_cell(rows: &[Vec<String>]) -> Option<&str> {
    rows.first().and_then(|r| r.first()).map(String::as_str)
}

/// A SQL string literal (single quotes doubled).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A password read from a 0600 file (trailing newline dropped).
fn read_password(p: &Path) -> Result<Arc<secrecy::SecretString>, LabError> {
    let raw = crate::util::secret::read_private(p)?;
    let s = String::from_utf8(raw)
        .map_err(|_| LabError::key(format!("{} is not UTF-8 text", p.display())))?;
    let s = s.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        return Err(LabError::key(format!("{} is empty", p.display())));
    }
    Ok(Arc::new(secrecy::SecretString::from(s)))
}

/// A MySQL/MariaDB server named by `mysql://user@host:3306[/db]`
/// (`mariadb://` and SQLAlchemy's `mysql+pymysql://` too); the URI must not
/// hold a password.
#[derive(Clone)]
pub struct MyTarget {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub database: Option<String>,
    password: Option<Arc<secrecy::SecretString>>,
}

impl std::fmt::Debug for MyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MyTarget({})", self.display())
    }
}

/// A client option file (mode 0600, removed when dropped): how the
/// password reaches `mysql`/`mysqldump` without argv or environment.
pub struct OptionFile(PathBuf);

impl Drop for OptionFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A MySQL client program with its option file (kept alive with it).
pub struct MyCommand {
    pub command: Command,
    file: OptionFile,
}

impl MyCommand {
    /// The command and the option file it reads (keep the file until the
    /// command has ended).
    pub fn into_parts(self) -> (Command, OptionFile) {
        (self.command, self.file)
    }
}

/// A value in a MySQL option file: double-quoted, `\` and `"` escaped.
fn option_value(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

impl MyTarget {
    /// Whether `uri` names a MySQL/MariaDB server.
    pub fn is_uri(uri: &str) -> bool {
        let scheme = uri.split("://").next().unwrap_or("");
        uri.contains("://")
            && (scheme == "mysql" || scheme == "mariadb" || scheme.starts_with("mysql+"))
    }

    /// Parses `uri`; the password, if any, comes from `password_file`.
    ///
    /// # Errors
    /// A usage error for a malformed URI or one holding a password (never
    /// repeated); a key error for the file.
    pub fn parse(uri: &str, password_file: Option<&Path>) -> Result<MyTarget, LabError> {
        let u = split_uri(
            uri,
            Self::is_uri,
            "mysql://user@host:3306",
            "the client's ~/.my.cnf",
            3306,
        )?;
        if !u.query.is_empty() {
            return Err(LabError::usage(format!(
                "'{}': labctl passes no URI parameters to the MySQL client; drop the ?... part",
                u.shown
            )));
        }
        let (host, port, user) = (u.host, u.port, u.user);
        let database = Some(u.database).filter(|d| !d.is_empty());
        let password = password_file.map(read_password).transpose()?;
        Ok(MyTarget {
            host,
            port,
            user,
            database,
            password,
        })
    }

    /// The target in words (never a password).
    pub fn display(&self) -> String {
        format!(
            "mysql://{}{}:{}{}",
            self.user
                .as_deref()
                .map(|u| format!("{u}@"))
                .unwrap_or_default(),
            self.host,
            self.port,
            self.database
                .as_deref()
                .map(|d| format!("/{d}"))
                .unwrap_or_default()
        )
    }

    /// `program` set up to talk to this server: an option file with host,
    /// port, user and password (`--defaults-extra-file`, which must come
    /// first), TCP always (so `localhost` is not a socket).
    ///
    /// # Errors
    /// A usage error naming the Debian package when `program` is missing;
    /// I/O errors writing the option file.
    pub fn command(&self, program: &str) -> Result<MyCommand, LabError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = find_program(program).ok_or_else(|| {
            LabError::usage(format!(
                "{program} is not installed (or not on PATH): install Debian's mariadb-client (or default-mysql-client)"
            ))
        })?;
        let mut text = format!(
            "[client]\nhost={}\nport={}\nprotocol=tcp\n",
            option_value(&self.host),
            self.port
        );
        if let Some(u) = &self.user {
            text.push_str(&format!("user={}\n", option_value(u)));
        }
        if let Some(p) = &self.password {
            use secrecy::ExposeSecret;
            text.push_str(&format!("password={}\n", option_value(p.expose_secret())));
        }
        // mysqldump knows no connect timeout (an unknown option in its
        // groups is an error): only the mysql client gets one.
        text.push_str("[mysql]\nconnect-timeout=15\n");
        let file = std::env::temp_dir().join(format!(
            ".labctl-my-{}-{:016x}.cnf",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(|e| LabError::failed(format!("writing a MySQL option file: {e}")))?;
        let file = OptionFile(file);
        f.write_all(text.as_bytes())
            .map_err(|e| LabError::failed(format!("writing a MySQL option file: {e}")))?;
        let mut c = Command::new(path);
        c.arg(format!("--defaults-extra-file={}", file.0.display()));
        c.stdin(Stdio::null());
        Ok(MyCommand { command: c, file })
    }

    /// Runs SQL (one or more statements) through `mysql` and returns the
    /// rows of its result sets (tab-separated, `NULL` for NULL).
    ///
    /// # Errors
    /// [`MyTarget::classify`]'s errors.
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<String>>, LabError> {
        let mut c = self.command("mysql")?;
        let out = c
            .command
            .args(["--batch", "--skip-column-names", "-e"])
            .arg(sql)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| LabError::failed(format!("running mysql: {e}")))?;
        if !out.status.success() {
            return Err(self.classify("mysql", &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('\t').map(String::from).collect())
            .collect())
    }

    /// Runs an SQL script (read from standard input, so its size is not
    /// bound by argv) in `db`; the rows of its result sets.
    ///
    /// # Errors
    /// As [`MyTarget::query`].
    pub fn script(&self, db: &str, sql: &str) -> Result<Vec<Vec<String>>, LabError> {
        let (mut cmd, _file) = self.command("mysql")?.into_parts();
        let mut child = cmd
            .args(["--batch", "--skip-column-names"])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::failed(format!("running mysql: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let body = sql.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(body.as_bytes());
        });
        let out = child
            .wait_with_output()
            .map_err(|e| LabError::failed(format!("running mysql: {e}")))?;
        let _ = writer.join();
        if !out.status.success() {
            return Err(self.classify("mysql", &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('\t').map(String::from).collect())
            .collect())
    }

    /// [`MyTarget::query`] with `db` as the current database.
    ///
    /// # Errors
    /// As [`MyTarget::query`].
    pub fn query_in(&self, db: &str, sql: &str) -> Result<Vec<Vec<String>>, LabError> {
        self.query(&format!("USE {}; {sql}", my_ident(db)))
    }

    /// A client's failure as labctl's error (see [`PgTarget::classify`]).
    pub fn classify(&self, program: &str, stderr: &str) -> LabError {
        let mut msg = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        if let Some(p) = &self.password {
            use secrecy::ExposeSecret;
            msg = msg.replace(p.expose_secret(), "***");
        }
        let what = self.display();
        if msg.contains("Access denied for user") {
            LabError::key(format!(
                "MySQL {what} refused the login: {msg} (the password comes from the password file, or ~/.my.cnf)"
            ))
        } else if msg.contains("Can't connect to")
            || msg.contains("Unknown MySQL server host")
            || msg.contains("Unknown server host")
            || msg.contains("Connection refused")
        {
            LabError::failed(format!("cannot reach MySQL {what}: {msg}"))
        } else {
            LabError::failed(format!("{program} on {what} failed: {msg}"))
        }
    }
}

/// A MySQL identifier in backquotes.
pub fn my_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_uris_parse_and_the_password_reaches_the_client_only_in_a_private_option_file() {
        use std::os::unix::fs::PermissionsExt;
        let t = MyTarget::parse("mysql://root@db.kubeflow:3307", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.clone()),
            ("db.kubeflow", 3307, None)
        );
        for (bad, why) in [
            ("mysql://root:s3cret@db", "password"),
            ("mysql://db/x?ssl=1", "parameters"),
            ("mysql://root@:3306", "no host"),
        ] {
            let e = MyTarget::parse(bad, None).unwrap_err().to_string();
            assert!(e.contains(why) && !e.contains("s3cret"), "{bad}: {e}");
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "we\"ird\\pw\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = MyTarget::parse("mysql://root@127.0.0.1", Some(&f)).unwrap();
        let c = t.command("sh").unwrap();
        let arg = c
            .command
            .get_args()
            .next()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let file = arg
            .strip_prefix("--defaults-extra-file=")
            .unwrap()
            .to_string();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("password=\"we\\\"ird\\\\pw\"\n"), "{text}");
        assert!(c
            .command
            .get_args()
            .all(|a| !a.to_str().unwrap().contains("ird")));
        drop(c);
        assert!(!std::path::Path::new(&file).exists());
        let e = t.classify(
            "mysqldump",
            "mysqldump: Got error: 1045: \"Access denied for user 'root'@'localhost' (using password: YES)\" when trying to connect",
        );
        assert_eq!(e.exit_code(), crate::error::ExitCode::Key);
        let e = t.classify(
            "mysql",
            "ERROR 2002 (HY000): Can't connect to server on '127.0.0.1' (115)",
        );
        assert!(e.to_string().contains("cannot reach MySQL"), "{e}");
        assert!(t
            .command("no-such-program-here")
            .err()
            .unwrap()
            .to_string()
            .contains("mariadb-client"));
    }

    #[test]
    fn uris_parse_into_the_libpq_environment_and_passwords_are_refused() {
        let t = PgTarget::parse(
            "postgresql+psycopg2://ml%40lab@db.lab:6543/mlflow?sslmode=require",
            None,
        )
        .unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_deref(),
                t.database.as_str()
            ),
            ("db.lab", 6543, Some("ml@lab"), "mlflow")
        );
        assert_eq!(t.params, [("PGSSLMODE".to_string(), "require".to_string())]);
        let t = PgTarget::parse("postgresql://127.0.0.1/m", None).unwrap();
        assert_eq!((t.port, t.user), (5432, None));
        for bad in [
            "postgresql://ml:s3cret@db/mlflow",
            "postgresql://ml@db/mlflow?password=s3cret",
        ] {
            let e = PgTarget::parse(bad, None).unwrap_err().to_string();
            assert!(e.contains("password") && !e.contains("s3cret"), "{e}");
        }
        for (bad, why) in [
            ("postgresql://ml@db", "no database"),
            ("postgresql://ml@db:x/m", "not a number"),
            ("postgresql://db/m?sslmod=require", "sslmod"),
            ("mysql://db/m", "not a postgresql"),
        ] {
            let e = PgTarget::parse(bad, None).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_password_file_others_can_read_is_refused_and_failures_never_show_it() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pw");
        std::fs::write(&f, "hunter2-pw\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PgTarget::parse("postgresql://u@h/d", Some(&f)).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = PgTarget::parse("postgresql://u@h/d", Some(&f)).unwrap();
        let e = t.classify(
            "psql",
            "psql: error: connection to server at \"h\", port 5432 failed: FATAL:  password authentication failed for user \"u\" hunter2-pw\n",
        );
        assert_eq!(e.exit_code(), crate::error::ExitCode::Key);
        assert!(!e.to_string().contains("hunter2-pw"), "{e}");
        assert!(!format!("{t:?}").contains("hunter2"));
        let e = t.classify("pg_dump", "pg_dump: error: connection to server at \"h\" (127.0.0.1), port 5432 failed: Connection refused\n");
        assert_eq!(e.exit_code(), crate::error::ExitCode::Failure);
        assert!(e.to_string().contains("cannot reach"), "{e}");
    }
}
