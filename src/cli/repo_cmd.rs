//! `labctl repo`, `labctl key` and `labctl demo`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::repo::chunker::ChunkerParams;
use crate::repo::keys::{read_passphrase_file, KeyRole};
use crate::repo::{self, InitOptions};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Create a repository and write its two key files (mode 0600).
    ///
    /// The BACKUP key goes on backup hosts: it backs up, deduplicates, lists
    /// and checks, and cannot decrypt any backed-up data. The RESTORE key
    /// stays with administrators (offline): it restores. An escrow copy of
    /// the restore key is stored in the repository, encrypted to
    /// --admin-recipient and/or --passphrase-file.
    Init(InitCmd),
}

#[derive(Args, Debug)]
pub struct InitCmd {
    /// Where to write the backup key file (must not exist).
    #[arg(long, value_name = "FILE")]
    pub backup_key: PathBuf,
    /// Administrator age recipient (age1...) for the escrow copy; repeatable.
    #[arg(long, value_name = "AGE1...")]
    pub admin_recipient: Vec<String>,
    /// File holding a passphrase for an escrow copy (first line; mode 0600).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Create the repository without any escrow copy of the restore key.
    #[arg(long)]
    pub no_escrow: bool,
    /// zstd level for files, streams and trees (0 stores raw).
    #[arg(long, default_value_t = 3)]
    pub compression: i32,
    /// zstd level for fixed-size disk image chunks (0 stores raw). Random
    /// regions are detected by a quick probe and stored raw at any level.
    #[arg(long, default_value_t = 3)]
    pub image_compression: i32,
    /// Fixed chunk size for disk images, in KiB (power of two).
    #[arg(long, default_value_t = 256, value_name = "KIB")]
    pub fixed_chunk_kib: u32,
    /// Average content-defined chunk size, in KiB (min = avg/4, max = avg*4).
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    pub cdc_avg_kib: u32,
    /// Write every object with S3 Object Lock retention of N days (the bucket
    /// must have Object Lock enabled; init fails otherwise).
    #[arg(long, value_name = "N")]
    pub object_lock_days: Option<u32>,
    /// Object Lock mode: compliance (nobody can shorten it) or governance.
    #[arg(long, default_value = "compliance", value_parser = ["compliance", "governance"])]
    pub object_lock_mode: String,
    /// Target pack size, in MiB.
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    pub pack_mib: u32,
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Recover the restore (or backup) key file from the escrow copy in the repository.
    Recover(RecoverCmd),
}

#[derive(Args, Debug)]
pub struct RecoverCmd {
    /// Passphrase file used at init (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// An administrator's age identity file (AGE-SECRET-KEY-1..., mode 0600).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Write this kind of key file.
    #[arg(long, value_enum, default_value = "restore")]
    pub role: RoleArg,
    /// Where to write the key file (must not exist).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RoleArg {
    Backup,
    Restore,
}

#[derive(Args, Debug)]
pub struct DemoCmd {
    /// State directory for the demo repository, sample and staging tree.
    #[arg(long, value_name = "DIR", default_value = "labctl-demo")]
    pub state_dir: PathBuf,
    /// Size of the generated sample in MiB.
    #[arg(long, default_value_t = 64)]
    pub sample_mib: u64,
}

pub fn run_repo(g: &GlobalArgs, cmd: RepoCmd) -> crate::error::Result<ExitCode> {
    match cmd {
        RepoCmd::Init(c) => init(g, c),
    }
}

fn init(g: &GlobalArgs, c: InitCmd) -> crate::error::Result<ExitCode> {
    // `--restore-key` (a global flag) names where the new restore key goes.
    let restore_out = g.restore_key.clone().ok_or_else(|| {
        LabError::usage("repo init needs --restore-key <file> (where to write the restore key)")
    })?;
    if c.admin_recipient.is_empty() && c.passphrase_file.is_none() && !c.no_escrow {
        return Err(LabError::usage(
            "give --admin-recipient age1... and/or --passphrase-file F for an escrow copy of the restore key, or --no-escrow to accept that losing the restore key file loses the data",
        )
        .into());
    }
    for p in [&c.backup_key, &restore_out] {
        if p.exists() {
            return Err(LabError::refused(format!(
                "{} exists; labctl never overwrites a key file",
                p.display()
            ))
            .into());
        }
    }
    let admin_recipients = c
        .admin_recipient
        .iter()
        .map(|r| {
            r.parse::<age::x25519::Recipient>().map_err(|e| {
                LabError::usage(format!(
                    "--admin-recipient {r}: not an age X25519 recipient ({e})"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let passphrase = c
        .passphrase_file
        .as_deref()
        .map(read_passphrase_file)
        .transpose()?;
    let avg = c.cdc_avg_kib * 1024;
    let opts = InitOptions {
        chunker: ChunkerParams {
            cdc_min: avg / 4,
            cdc_avg: avg,
            cdc_max: avg * 4,
            fixed_size: c.fixed_chunk_kib * 1024,
        },
        compression_level: c.compression,
        image_compression_level: c.image_compression,
        pack_size: c.pack_mib << 20,
        admin_recipients,
        passphrase,
        object_lock: c
            .object_lock_days
            .map(|days| crate::repo::config::ObjectLockConfig {
                days,
                mode: c.object_lock_mode.clone(),
            }),
    };
    let backend = g.spec().open_backend()?;
    let keys = repo::init(&*backend, &opts)?;
    keys.to_backup().save(&c.backup_key)?;
    keys.save(&restore_out)?;
    if g.json {
        print_json(&serde_json::json!({
            "repository": backend.location(),
            "repo-id": keys.repo_id,
            "backup-key": c.backup_key,
            "restore-key": restore_out,
            "escrow": !c.no_escrow,
        }))?;
    } else {
        println!(
            "created repository {} at {}",
            keys.repo_id,
            backend.location()
        );
        println!("  backup key  {}  -> copy to each backup host (LABCTL_KEY); it cannot decrypt backed-up data", c.backup_key.display());
        println!("  restore key {}  -> keep offline with the administrators (LABCTL_RESTORE_KEY); needed to restore", restore_out.display());
        if c.no_escrow {
            println!("  no escrow copy: losing the restore key file loses every backup");
        } else {
            println!("  escrow copy of the restore key stored under keys/ (recover with `labctl key recover`)");
        }
    }
    Ok(ExitCode::Success)
}

pub fn run_key(g: &GlobalArgs, cmd: KeyCmd) -> crate::error::Result<ExitCode> {
    let KeyCmd::Recover(c) = cmd;
    let passphrase = c
        .passphrase_file
        .as_deref()
        .map(read_passphrase_file)
        .transpose()?;
    let identity = match &c.identity {
        Some(p) => {
            let meta =
                std::fs::metadata(p).map_err(|e| LabError::key(format!("{}: {e}", p.display())))?;
            crate::util::secret::check_private(p, &meta)?;
            let text = std::fs::read_to_string(p)
                .map_err(|e| LabError::key(format!("{}: {e}", p.display())))?;
            let line = text
                .lines()
                .find(|l| l.starts_with("AGE-SECRET-KEY-"))
                .ok_or_else(|| LabError::key(format!("{}: no AGE-SECRET-KEY line", p.display())))?;
            Some(
                line.parse::<age::x25519::Identity>()
                    .map_err(|_| LabError::key(format!("{}: malformed identity", p.display())))?,
            )
        }
        None => None,
    };
    if passphrase.is_none() && identity.is_none() {
        return Err(LabError::usage("give --passphrase-file or --identity").into());
    }
    let backend = g.spec().open_backend()?;
    let keys = repo::recover_key(&*backend, passphrase.as_deref(), identity.as_ref())?;
    let keys = match c.role {
        RoleArg::Restore => keys,
        RoleArg::Backup => keys.to_backup(),
    };
    keys.save(&c.out)?;
    if !g.quiet {
        let role = if keys.role == KeyRole::Restore {
            "restore"
        } else {
            "backup"
        };
        eprintln!(
            "wrote {role} key for repository {} to {} (mode 0600)",
            keys.repo_id,
            c.out.display()
        );
    }
    Ok(ExitCode::Success)
}

pub fn run_demo(g: &GlobalArgs, c: DemoCmd) -> crate::error::Result<ExitCode> {
    let report = crate::demo::run(&c.state_dir, c.sample_mib, !g.json && !g.quiet)?;
    if g.json {
        print_json(&report)?;
    } else if !g.quiet {
        println!(
            "demo complete: restore point {} ({} source(s){}) restored into staging and verified in {:.1}s; the tree is in {} (state in {})",
            report.point,
            report.sources.len(),
            if report.skipped.is_empty() {
                String::new()
            } else {
                format!("; left out: {}", report.skipped.join(", "))
            },
            report.restore.seconds,
            report.staging.display(),
            c.state_dir.display()
        );
    }
    Ok(if report.verified {
        ExitCode::Success
    } else {
        ExitCode::Integrity
    })
}
