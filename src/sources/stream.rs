//! The `stream` source: one byte stream (standard input, or a command's
//! stdout) stored as a snapshot holding one file. A command's exit status
//! and stderr are checked: a failing command commits nothing.
//!
//! Must not interpret the bytes (a dump, an archive, an image are all one
//! file); sources that understand a format get their own file.

use super::SourceContext;
use crate::error::{CancelFlag, Cancelled, LabError};
use crate::repo::backup::{BackupOptions, BackupOutcome, BackupRun, ChunkerChoice};
use crate::repo::chunker::ChunkerKind;
use crate::repo::snapshot::Source;
use crate::repo::Repository;
use crate::util::progress::Progress;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The snapshot's `source.kind`.
pub const KIND: &str = "stream";

/// `labctl backup stream --name N [-- COMMAND ARGS...]` /
/// `backup = { source = "stream", name = "db", command = ["pg_dump", "lab"] }`.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSource {
    /// Name of the stream (recorded as the source name).
    #[arg(long)]
    pub name: String,
    /// The program and its arguments whose stdout is backed up (no shell;
    /// use `sh -c '...'` for one). Without it, standard input is read. In
    /// labctl.toml it is required.
    #[arg(last = true, value_name = "COMMAND")]
    #[serde(default)]
    pub command: Vec<String>,
    /// Chunker: auto (FastCDC), cdc, fixed (for raw disk images).
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default)]
    pub chunker: ChunkerChoice,
}

impl StreamSource {
    /// A name is required; in labctl.toml a command too (the daemon has no
    /// standard input to read).
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, from_config: bool) -> Result<(), (String, String)> {
        if self.name.is_empty() {
            return Err(("name".into(), "source 'stream' needs a name".into()));
        }
        if from_config && self.command.first().is_none_or(|c| c.is_empty()) {
            return Err((
                "command".into(),
                "source 'stream' needs command = [\"program\", \"arg\", ...]".into(),
            ));
        }
        Ok(())
    }

    /// Backs up the command's stdout, or the context's stdin.
    ///
    /// # Errors
    /// A command that cannot start or fails, a read error, storage errors:
    /// nothing is committed then.
    pub fn backup(&self, mut ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        if self.command.is_empty() {
            let stdin = ctx.stdin.take().ok_or_else(|| {
                LabError::usage("source 'stream' needs a command (there is no standard input here)")
            })?;
            return backup_stream(
                ctx.repo,
                &self.name,
                stdin,
                self.chunker,
                &ctx.opts,
                ctx.progress,
            );
        }
        let cancel = ctx.cancel().cloned().unwrap_or_default();
        let reader = CommandReader::spawn(&self.command, &cancel)?;
        backup_stream(
            ctx.repo,
            &self.name,
            reader,
            self.chunker,
            &ctx.opts,
            ctx.progress,
        )
    }
}

/// Backs up one stream (stdin, a command's stdout) as a single file node.
///
/// # Errors
/// Read errors of the stream fail the backup (nothing is committed).
pub fn backup_stream(
    repo: &Repository,
    name: &str,
    reader: impl Read,
    chunker: ChunkerChoice,
    opts: &BackupOptions,
    progress: Progress,
) -> crate::error::Result<BackupOutcome> {
    backup_stream_as(repo, KIND, name, name, reader, chunker, opts, progress)
}

/// [`backup_stream`] for another source kind that is one stream (a VM
/// archive): the snapshot's kind and name, and the file's name in it.
///
/// # Errors
/// As [`backup_stream`].
#[allow(clippy::too_many_arguments)]
pub fn backup_stream_as(
    repo: &Repository,
    kind: &str,
    name: &str,
    file_name: &str,
    reader: impl Read,
    chunker: ChunkerChoice,
    opts: &BackupOptions,
    progress: Progress,
) -> crate::error::Result<BackupOutcome> {
    let started = Instant::now();
    let mut run = BackupRun::start(repo, opts.threads, progress)?;
    run.set_cancel(opts.cancel.clone());
    let chunker_kind = match chunker {
        ChunkerChoice::Fixed => ChunkerKind::Fixed,
        _ => ChunkerKind::Cdc,
    };
    let content = run
        .add_stream(reader, chunker_kind, &format!("{kind} {name}"))
        .map_err(|e| {
            if e.downcast_ref::<crate::error::Cancelled>().is_some() {
                return e;
            }
            LabError::failed(format!(
                "reading the stream failed, nothing was committed: {e}"
            ))
            .into()
        })?;
    let root = super::one_file_root(&mut run, file_name.as_bytes(), content)?;
    run.finish(
        Source {
            kind: kind.into(),
            name: name.into(),
        },
        root,
        opts,
        started,
    )
}

/// Asks for a 1 MiB pipe buffer on `fd` when it is a pipe (Linux's default
/// is 64 KiB: a fast producer and labctl then take turns in 64 KiB steps,
/// which halves a stream's throughput). Errors are ignored: the default
/// buffer still works.
pub fn widen_pipe(fd: std::os::fd::RawFd) {
    // SAFETY: fstat and fcntl on a descriptor the caller owns.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
}

/// How a program fed with a snapshot's stream ended.
pub struct Fed {
    /// The bytes written, or why writing stopped (the program may have
    /// exited early: its status says why).
    pub written: crate::error::Result<u64>,
    pub status: std::process::ExitStatus,
    /// The last line of its standard error.
    pub last_line: String,
}

/// Streams the one file of snapshot `id` (a stream, a VM archive) into the
/// standard input of `argv` (program and arguments, no shell), through a
/// 1 MiB pipe, and waits for it. The caller judges the outcome.
///
/// # Errors
/// A usage error when the program cannot start; waiting errors.
pub fn feed_command(
    repo: &Repository,
    id: &crate::repo::Id,
    argv: &[String],
    threads: usize,
) -> crate::error::Result<Fed> {
    use std::os::fd::AsRawFd;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::usage(format!("cannot run {}: {e}", argv[0])))?;
    let stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let mut stdin = child.stdin.take().expect("piped");
    widen_pipe(stdin.as_raw_fd());
    let written = crate::repo::extract::restore_to_writer(repo, id, None, &mut stdin, threads);
    drop(stdin);
    let status = child.wait()?;
    let err = err_reader.join().unwrap_or_default();
    Ok(Fed {
        written,
        status,
        last_line: err.trim().lines().last().unwrap_or("").to_string(),
    })
}

/// A command's stdout as a reader. At end of output it waits for the
/// command, and turns a non-zero exit into a read error (so the backup
/// commits nothing). Cancelling kills the command.
pub struct CommandReader {
    child: Arc<Mutex<Child>>,
    stdout: std::process::ChildStdout,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
    /// Closed when the stderr reader has seen the end of the command's stderr.
    stderr_done: crossbeam_channel::Receiver<()>,
    program: String,
    done: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancelFlag,
}

impl CommandReader {
    /// Starts `command` (program and arguments, no shell) in its own
    /// process group; `cancel` kills the group.
    ///
    /// # Errors
    /// A usage error when the program cannot be started.
    pub fn spawn(command: &[String], cancel: &CancelFlag) -> crate::error::Result<CommandReader> {
        let mut c = Command::new(&command[0]);
        c.args(&command[1..]);
        Self::from_command(c, &command[0], cancel)
    }

    /// [`CommandReader::spawn`] for a command set up by the caller (its
    /// environment, say); `program` names it in errors.
    ///
    /// # Errors
    /// A usage error when the program cannot be started.
    pub fn from_command(
        mut command: Command,
        program: &str,
        cancel: &CancelFlag,
    ) -> crate::error::Result<CommandReader> {
        use std::os::unix::process::CommandExt;
        // Its own process group, so cancelling kills what it started too
        // (a shell's children would otherwise keep the pipe open).
        let mut child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LabError::usage(format!("cannot start `{program}`: {e}")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        {
            use std::os::fd::AsRawFd;
            widen_pipe(stdout.as_raw_fd());
        }
        let mut stderr = child.stderr.take().expect("piped stderr");
        let tail = Arc::new(Mutex::new(Vec::new()));
        let t2 = tail.clone();
        let (stderr_done_tx, stderr_done) = crossbeam_channel::bounded::<()>(0);
        std::thread::spawn(move || {
            let _done = stderr_done_tx; // dropped (channel closed) at the end
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut t = t2.lock().expect("stderr tail");
                t.extend_from_slice(&buf[..n]);
                let excess = t.len().saturating_sub(2048);
                t.drain(..excess);
            }
        });
        let child = Arc::new(Mutex::new(child));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Kill the command when the job is cancelled (a command that blocks
        // without writing would otherwise hold the job forever).
        let (c2, d2, flag) = (child.clone(), done.clone(), cancel.clone());
        std::thread::spawn(move || loop {
            if d2.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if flag.is_cancelled() {
                let c = c2.lock().expect("child");
                // SAFETY: kill(2) on the command's own process group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        });
        Ok(CommandReader {
            child,
            stdout,
            stderr_tail: tail,
            stderr_done,
            program: program.to_string(),
            done,
            cancel: cancel.clone(),
        })
    }
}

impl Read for CommandReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        let status = self.child.lock().expect("child").wait()?;
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other(Cancelled.to_string()));
        }
        if status.success() {
            return Ok(0);
        }
        // The command has exited: give the stderr reader a moment to take
        // its last lines (a grandchild holding stderr open must not hang us).
        let _ = self
            .stderr_done
            .recv_timeout(std::time::Duration::from_secs(2));
        let tail = String::from_utf8_lossy(&self.stderr_tail.lock().expect("tail"))
            .trim()
            .to_string();
        let last = tail.lines().last().unwrap_or("").to_string();
        Err(std::io::Error::other(format!(
            "`{}` exited with {status}{}",
            self.program,
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        )))
    }
}

impl Drop for CommandReader {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut c) = self.child.lock() {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) on the command's own process group.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                let _ = c.wait();
            }
        }
    }
}
