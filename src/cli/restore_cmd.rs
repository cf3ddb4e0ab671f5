//! `labctl restore`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::repo::extract::{self, RestoreOptions};
use crate::util::progress::Progress;
use crate::util::units::human_bytes;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("dest")
        .required(true)
        .multiple(true)
        .args(["target", "stdout", "etcd_data_dir", "verify"])
))]
pub struct RestoreCmd {
    /// Snapshot ID (or a unique prefix), or `latest`.
    pub snapshot: String,
    /// Directory to restore into (created if missing; must be empty unless --overwrite).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["stdout", "etcd_data_dir", "verify"])]
    pub target: Option<PathBuf>,
    /// Write one file to stdout: a stream snapshot's data, an etcd
    /// snapshot's `snapshot.db` (as `etcdctl snapshot save` writes it), or
    /// the file named by --path.
    #[arg(long, conflicts_with_all = ["etcd_data_dir", "verify"])]
    pub stdout: bool,
    /// Verify the restore on a live service: for an etcd snapshot, restore
    /// it into a scratch directory, start etcd on free loopback ports,
    /// compare its key count and revision with the snapshot's facts (and
    /// read --sentinel-key), stop it. Alone or with --etcd-data-dir.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub etcd: crate::sources::etcd::EtcdRestore,
    /// Restore only this path (and what is below it); repeatable. With --stdout: the file to write.
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Allow a non-empty target. Existing files are replaced whole (written
    /// to a temporary name, then renamed), never half-overwritten.
    #[arg(long)]
    pub overwrite: bool,
    /// Fetch threads (0 = default: the backend's request parallelism, 16
    /// for S3 (LABCTL_S3_REQUESTS), 4 for local storage).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Read order for --target. `pack` reads every pack once with a few
    /// large streamed requests and writes blobs into their files out of
    /// order (best for object stores); `file` restores file after file,
    /// writing each sequentially (best for local disks). `auto` picks by
    /// the repository's location. Either way a file appears only when
    /// complete and verified.
    #[arg(long, value_enum, default_value_t = ReadOrderArg::Auto)]
    pub read_order: ReadOrderArg,
    /// Restore files without their setuid and setgid bits. A full restore
    /// as root keeps them (a system needs them back); a restore into a
    /// staging or scratch area should not leave setuid-root programs there.
    #[arg(long)]
    pub no_setuid: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ReadOrderArg {
    Auto,
    Pack,
    File,
}

pub fn run(g: &GlobalArgs, c: RestoreCmd) -> crate::error::Result<ExitCode> {
    let repo = g.open(true)?;
    let id = repo.resolve_snapshot(&c.snapshot)?;
    if c.stdout {
        if c.paths.len() > 1 {
            return Err(
                LabError::usage("--stdout writes one file: give at most one --path").into(),
            );
        }
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        let n = extract::restore_to_writer(
            &repo,
            &id,
            c.paths.first().map(|s| s.as_str()),
            &mut out,
            c.threads,
        )?;
        if !g.quiet && !g.json {
            eprintln!("restored {} from snapshot {}", human_bytes(n), id.short());
        }
        return Ok(ExitCode::Success);
    }
    if c.etcd.etcd_data_dir.is_some() || c.verify {
        return run_etcd(g, &repo, &id, &c);
    }
    let target = c.target.expect("clap requires --target or --stdout");
    let opts = RestoreOptions {
        include: c.paths,
        overwrite: c.overwrite,
        threads: c.threads,
        read_order: match c.read_order {
            ReadOrderArg::Auto => extract::ReadOrder::Auto,
            ReadOrderArg::Pack => extract::ReadOrder::Pack,
            ReadOrderArg::File => extract::ReadOrder::File,
        },
        no_setuid: c.no_setuid,
        ..Default::default()
    };
    let (snap, _) = repo.load_snapshot(&id)?;
    let progress = Progress::bytes(
        g.progress_enabled(),
        "restore",
        Some(snap.summary.bytes_total),
    );
    let started = std::time::Instant::now();
    let summary = extract::restore_to_dir(&repo, &id, &target, &opts, progress)?;
    if g.json {
        print_json(
            &serde_json::json!({"snapshot": id.hex(), "target": target, "summary": summary, "seconds": started.elapsed().as_secs_f64()}),
        )?;
    } else if !g.quiet {
        eprintln!(
            "restored snapshot {} into {}: {} files, {} dirs, {} symlinks, {} in {:.1}s",
            id.short(),
            target.display(),
            summary.files,
            summary.dirs,
            summary.symlinks,
            human_bytes(summary.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    for f in &summary.failed {
        eprintln!("error: {f}");
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::Integrity
    })
}

/// `--etcd-data-dir` and/or `--verify` on an etcd snapshot.
fn run_etcd(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    id: &crate::repo::Id,
    c: &RestoreCmd,
) -> crate::error::Result<ExitCode> {
    use crate::sources::etcd;
    let mut report = serde_json::json!({"snapshot": id.hex()});
    if let Some(dir) = &c.etcd.etcd_data_dir {
        let r = etcd::restore(repo, id, &c.etcd, dir, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "restored etcd snapshot {} into {} with {} {}{}",
                id.short(),
                r.data_dir.display(),
                r.tool,
                r.tool_version,
                if r.revision_bumped {
                    format!(
                        " (revision bumped by {}, marked compacted)",
                        etcd::REVISION_BUMP
                    )
                } else {
                    String::new()
                }
            );
        }
        report["restore"] = serde_json::to_value(&r)?;
    }
    if c.verify {
        let near = c
            .etcd
            .etcd_data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("labctl-verify"));
        let v = etcd::verify(repo, id, &c.etcd, &near, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "verified on a live etcd member: {} keys at revision {}{} in {:.1}s",
                v.keys,
                v.revision,
                v.sentinel_key
                    .as_ref()
                    .map(|k| format!(", sentinel key {k:?} present"))
                    .unwrap_or_default(),
                v.seconds
            );
        }
        report["verify"] = serde_json::to_value(&v)?;
    }
    if g.json {
        print_json(&report)?;
    }
    Ok(ExitCode::Success)
}
