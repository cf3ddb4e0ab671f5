//! `labctl backup path` and `labctl backup stream`.

use super::{human_bytes, print_json, GlobalArgs};
use crate::error::ExitCode;
use crate::progress::Progress;
use crate::repo::backup::{self, BackupOptions, BackupOutcome, ChunkerChoice};
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// Back up a directory tree (files, directories, symlinks, modes, owners, times).
    ///
    /// Files whose size, mtime, ctime and inode are unchanged since the last
    /// backup of the same directory are not read again. Unreadable files are
    /// reported and skipped; the snapshot is still written (exit code 3).
    Path(PathCmd),
    /// Back up standard input as one stream (a dump, an archive, a disk image).
    Stream(StreamCmd),
}

#[derive(Args, Debug)]
pub struct CommonBackupArgs {
    /// Tag for the snapshot; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Host name recorded in the snapshot (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
    /// Chunker: auto (fixed for disk images by extension, FastCDC otherwise), cdc, fixed.
    #[arg(long, value_enum, default_value = "auto")]
    pub chunker: ChunkerArg,
    /// Restore point (set) this snapshot belongs to.
    #[arg(long, value_name = "ID")]
    pub restore_point: Option<String>,
    /// Encoder threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ChunkerArg {
    Auto,
    Cdc,
    Fixed,
}

#[derive(Args, Debug)]
pub struct PathCmd {
    /// The directory to back up.
    pub dir: PathBuf,
    #[command(flatten)]
    pub common: CommonBackupArgs,
}

#[derive(Args, Debug)]
pub struct StreamCmd {
    /// Name of the stream (recorded as the source name).
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub common: CommonBackupArgs,
}

fn options(c: &CommonBackupArgs) -> BackupOptions {
    let mut o = BackupOptions {
        tags: c.tags.clone(),
        restore_point: c.restore_point.clone(),
        threads: c.threads,
        ..Default::default()
    };
    if let Some(h) = &c.host {
        o.host = h.clone();
    }
    o.chunker = match c.chunker {
        ChunkerArg::Auto => ChunkerChoice::Auto,
        ChunkerArg::Cdc => ChunkerChoice::Cdc,
        ChunkerArg::Fixed => ChunkerChoice::Fixed,
    };
    o
}

pub fn run(g: &GlobalArgs, cmd: BackupCmd) -> anyhow::Result<ExitCode> {
    let repo = g.open(false)?;
    let outcome = match &cmd {
        BackupCmd::Path(c) => {
            let progress = Progress::bytes(g.progress_enabled(), "backup", None);
            backup::backup_path(&repo, &c.dir, &options(&c.common), progress)?
        }
        BackupCmd::Stream(c) => {
            let progress = Progress::bytes(g.progress_enabled(), "backup", None);
            let stdin = std::io::stdin().lock();
            backup::backup_stream(&repo, &c.name, stdin, &options(&c.common), progress)?
        }
    };
    report(g, &outcome)?;
    Ok(if outcome.summary.is_complete() {
        ExitCode::Success
    } else {
        ExitCode::PartialBackup
    })
}

fn report(g: &GlobalArgs, o: &BackupOutcome) -> anyhow::Result<()> {
    let s = &o.summary;
    if g.json {
        return print_json(o);
    }
    if !g.quiet {
        eprintln!(
            "files: {} new, {} changed, {} unchanged; {} dirs, {} symlinks",
            s.files_new, s.files_changed, s.files_unchanged, s.dirs, s.symlinks
        );
        eprintln!(
            "data: {} read of {}, {} new chunks ({} raw), {} added to the repository in {} pack(s), {:.1}s",
            human_bytes(s.bytes_read),
            human_bytes(s.bytes_total),
            s.chunks_new,
            human_bytes(s.bytes_new_raw),
            human_bytes(s.bytes_added),
            s.packs_written,
            s.duration_ms as f64 / 1000.0
        );
    }
    for e in &s.skipped {
        eprintln!("note: skipped {e}");
    }
    for e in &s.errors {
        eprintln!("warning: not backed up: {e}");
    }
    for e in &s.changed {
        eprintln!("warning: changed during backup: {e}");
    }
    println!("snapshot {}", o.snapshot_id.hex());
    Ok(())
}
