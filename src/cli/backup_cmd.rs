//! `labctl backup <source>`: options, then the source's own arguments.

use super::{print_json, GlobalArgs};
use crate::error::ExitCode;
use crate::error::LabError;
use crate::repo::backup::{BackupOptions, BackupOutcome};
use crate::sources::{SourceContext, SourceSpec};
use crate::util::progress::Progress;
use crate::util::units::human_bytes;
use clap::Args;

/// `labctl backup <source> ...`: the options every source takes, then the
/// source (see [`crate::sources::SourceSpec`]).
#[derive(Args, Debug)]
pub struct BackupCmd {
    #[command(flatten)]
    pub common: CommonBackupArgs,
    #[command(subcommand)]
    pub source: SourceSpec,
}

#[derive(Args, Debug)]
pub struct CommonBackupArgs {
    /// Tag for the snapshot; repeatable.
    #[arg(long = "tag", value_name = "TAG", global = true)]
    pub tags: Vec<String>,
    /// Host name recorded in the snapshot (default: this machine's).
    #[arg(long, global = true)]
    pub host: Option<String>,
    /// Restore point (set) this snapshot belongs to.
    #[arg(long, value_name = "ID", global = true)]
    pub restore_point: Option<String>,
    /// Encoder threads (0 = one per core).
    #[arg(long, default_value_t = 0, global = true)]
    pub threads: usize,
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
    o
}

pub fn run(g: &GlobalArgs, cmd: BackupCmd) -> crate::error::Result<ExitCode> {
    cmd.source
        .validate(false)
        .map_err(|(field, why)| LabError::usage(format!("{field}: {why}")))?;
    let repo = g.open(false)?;
    let (specs, notes) = match &cmd.source {
        SourceSpec::Vm(_) | SourceSpec::Pvc(_) => cmd.source.expand()?,
        other => (vec![other.clone()], vec![]),
    };
    if !g.quiet {
        for n in &notes {
            eprintln!("note: {n}");
        }
    }
    if specs.is_empty() {
        if !g.quiet {
            eprintln!("nothing to back up here: {}", cmd.source.what());
        }
        if g.json {
            print_json(&serde_json::json!({"snapshots": [], "notes": notes}))?;
        }
        return Ok(ExitCode::Success);
    }
    if specs.len() > 1 {
        return backup_several(g, &repo, &specs, &notes, &cmd.common);
    }
    let outcome = specs[0].backup(SourceContext {
        repo: &repo,
        opts: options(&cmd.common),
        progress: Progress::bytes(g.progress_enabled(), "backup", None),
        stdin: Some({
            crate::sources::stream::widen_pipe(0);
            Box::new(std::io::stdin().lock())
        }),
    })?;
    report(g, &outcome)?;
    Ok(if outcome.summary.is_complete() {
        ExitCode::Success
    } else {
        ExitCode::PartialBackup
    })
}

/// `labctl backup vm a b c`, `labctl backup pvc --all`: one snapshot per
/// VM or claim, as one restore point.
fn backup_several(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    specs: &[SourceSpec],
    notes: &[String],
    common: &CommonBackupArgs,
) -> crate::error::Result<ExitCode> {
    let label = format!("{}s", specs[0].kind());
    let run = crate::sources::backup_point(repo, &label, specs, &options(common), &|s| {
        Progress::bytes(
            g.progress_enabled(),
            &format!("backup {} {}", s.kind(), s.what()),
            None,
        )
    })?;
    if g.json {
        print_json(&serde_json::json!({
            "restore-point": run.point,
            "snapshots": run.written.iter().map(|(_, _, o)| o).collect::<Vec<_>>(),
            "failed": run.failed,
            "notes": notes,
        }))?;
    } else {
        for (_, _, o) in &run.written {
            report(g, o)?;
        }
        if !g.quiet {
            eprintln!("restore point {}", run.point);
        }
    }
    if !run.failed.is_empty() {
        return Err(LabError::failed(format!(
            "restore point {} is partial: {}",
            run.point,
            run.failed.join("; ")
        ))
        .into());
    }
    Ok(ExitCode::Success)
}

fn report(g: &GlobalArgs, o: &BackupOutcome) -> crate::error::Result<()> {
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
