//! The command line: clap definitions (one source for `--help`, man pages and
//! completions) and dispatch. Each command lives in its own file and calls
//! the library; nothing here is needed by the daemon.

mod backup_cmd;
mod check_cmd;
mod daemon_cmd;
mod points_cmd;
mod policy_cmd;
mod provision_cmd;
mod prune_cmd;
mod repo_cmd;
mod restore_cmd;
mod snapshots_cmd;

use crate::repo::{self, Repository};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

const AFTER_HELP: &str = "\
Environment:
  LABCTL_REPO          repository URL (same as --repo)
  LABCTL_KEY           backup key file (same as --key)
  LABCTL_RESTORE_KEY   restore key file (same as --restore-key)
  LABCTL_CACHE_DIR     where catalogs live (default ~/.cache/labctl)

Exit codes:
  0 success                      4 integrity problem (check failed, data damaged)
  1 unexpected failure           5 key problem (wrong key, too-open key file, role)
  2 usage (flags, arguments)     6 refused (non-empty target, existing object)
  3 backup incomplete: some      7 repository storage unreachable or failing
    source files were unreadable

Quick start:
  labctl demo                                    # everything on a local sample
  labctl repo init --repo /srv/backup --backup-key backup.key --restore-key restore.key \\
      --passphrase-file admin.pass
  LABCTL_REPO=/srv/backup LABCTL_KEY=backup.key labctl backup path /data --tag nightly
  LABCTL_REPO=/srv/backup LABCTL_RESTORE_KEY=restore.key labctl restore latest --target /tmp/r";

/// labctl: provision, back up, restore and govern the lab's ML platform.
///
/// The backup repository is encrypted and deduplicated. Two key files exist:
/// the BACKUP key (for backup hosts: back up, list, check, never decrypt data)
/// and the RESTORE key (for administrators: everything, including restore).
#[derive(Parser, Debug)]
#[command(name = "labctl", version, about, long_about, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Repository URL: a local path, file:///path, or s3://bucket/prefix (credentials and
    /// endpoint from the standard AWS environment).
    #[arg(long, global = true, env = "LABCTL_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// Backup key file (META identity; cannot decrypt backed-up data).
    #[arg(long, global = true, env = "LABCTL_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Restore key file (adds the DATA identity; needed to restore and read-verify).
    #[arg(long, global = true, env = "LABCTL_RESTORE_KEY", value_name = "FILE")]
    pub restore_key: Option<PathBuf>,
    /// Directory for the local catalog cache.
    #[arg(long, global = true, env = "LABCTL_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Machine-readable JSON on stdout; no progress display.
    #[arg(long, global = true)]
    pub json: bool,
    /// Only errors on stderr; no progress display.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository and its two key files.
    #[command(subcommand)]
    Repo(repo_cmd::RepoCmd),
    /// Back up a source (a directory tree, a stream, an etcd member) into one snapshot.
    Backup(backup_cmd::BackupCmd),
    /// List snapshots, newest last.
    Snapshots(snapshots_cmd::SnapshotsCmd),
    /// List the files in a snapshot (needs the restore key).
    Ls(snapshots_cmd::LsCmd),
    /// List restore points (one multi-source job run's snapshots): time,
    /// complete or partial, sources and sizes; `points show ID` for one.
    Points(points_cmd::PointsCmd),
    /// Restore a snapshot (into a directory, to stdout, as an etcd data
    /// directory) or a whole restore point through a plan (--to staging).
    Restore(Box<restore_cmd::RestoreCmd>),
    /// Restore plans (restore-plans/ENV.yaml): validate them.
    #[command(subcommand)]
    RestorePlan(restore_cmd::RestorePlanCmd),
    /// Verify the repository: structure, or with --read-data every byte.
    Check(check_cmd::CheckCmd),
    /// Remove snapshots by retention rules (per source); --dry-run explains each decision.
    Forget(prune_cmd::ForgetCmd),
    /// Free the space of forgotten data: mark unused packs, delete them after a grace period.
    Prune {
        #[command(flatten)]
        args: prune_cmd::PruneCmd,
        /// Show what would be marked, repacked and deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Manage the local catalog cache.
    #[command(subcommand)]
    Catalog(check_cmd::CatalogCmd),
    /// Repair the repository's index from the packs themselves.
    #[command(subcommand)]
    Repair(check_cmd::RepairCmd),
    /// Recover key files from the escrow copies in the repository.
    #[command(subcommand)]
    Key(repo_cmd::KeyCmd),
    /// Run the scheduled jobs of labctl.toml: backups, retention, prune, check, drills;
    /// Prometheus metrics, webhooks. SIGTERM stops gracefully, SIGHUP reloads.
    Daemon(daemon_cmd::DaemonCmd),
    /// Check the daemon configuration file.
    #[command(subcommand)]
    Config(daemon_cmd::ConfigCmd),
    /// Each configured job's last run, outcome, next run and backup age.
    Status(daemon_cmd::StatusCmd),
    /// Run a configured job now, or show job history.
    #[command(subcommand)]
    Jobs(daemon_cmd::JobsCmd),
    /// Restore drills the daemon ran (newest first): time, point, outcome,
    /// measured restore time (RTO) against the plan's objective, and each
    /// source's result.
    Drills(daemon_cmd::DrillsCmd),
    /// Researcher profiles, RBAC and quotas from policy files: validate, render, expiring.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCmd),
    /// Grant, revoke, and who has access to a profile.
    #[command(subcommand)]
    Profile(policy_cmd::ProfileCmd),
    /// What a person can reach, and through which grant or group.
    Access(policy_cmd::AccessCmd),
    /// The policy audit trail (hash-chained): verify it.
    #[command(subcommand)]
    Audit(policy_cmd::AuditCmd),
    /// Remove a person from every grant, group and the people list (policy files edited in place).
    Offboard(policy_cmd::OffboardCmd),
    /// Provision the platform's VMs on Proxmox VE from deploy/platform.yaml.
    #[command(subcommand)]
    Provision(provision_cmd::ProvisionCmd),
    /// Run the main job end to end on a local sample: init, back up, restore, verify.
    Demo(repo_cmd::DemoCmd),
    /// Print a shell completion script (from the same definitions as --help
    /// and the man pages). Bash: `labctl completions bash >
    /// /etc/bash_completion.d/labctl`; zsh: into a directory on `$fpath` as
    /// `_labctl`; fish: `~/.config/fish/completions/labctl.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (one per command) into a directory.
    #[command(hide = true)]
    GenerateMan {
        /// Output directory.
        dir: PathBuf,
    },
}

/// Runs a parsed command line.
///
/// # Errors
/// Any failure, classified for the exit code (see [`crate::error`]).
pub fn run(cli: Cli) -> crate::error::Result<crate::error::ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Repo(c) => repo_cmd::run_repo(g, c),
        Command::Backup(c) => backup_cmd::run(g, c),
        Command::Snapshots(c) => snapshots_cmd::run_snapshots(g, c),
        Command::Points(c) => points_cmd::run(g, c),
        Command::Ls(c) => snapshots_cmd::run_ls(g, c),
        Command::Restore(c) => restore_cmd::run(g, *c),
        Command::RestorePlan(c) => restore_cmd::run_restore_plan(g, c),
        Command::Check(c) => check_cmd::run_check(g, c),
        Command::Catalog(c) => check_cmd::run_catalog(g, c),
        Command::Repair(c) => check_cmd::run_repair(g, c),
        Command::Forget(c) => prune_cmd::run_forget(g, c),
        Command::Prune { args, dry_run } => prune_cmd::run_prune(g, args, dry_run),
        Command::Key(c) => repo_cmd::run_key(g, c),
        Command::Demo(c) => repo_cmd::run_demo(g, c),
        Command::Daemon(c) => daemon_cmd::run_daemon(g, c),
        Command::Provision(c) => provision_cmd::run(g, c),
        Command::Policy(c) => policy_cmd::run_policy(g, c),
        Command::Profile(c) => policy_cmd::run_profile(g, c),
        Command::Access(c) => policy_cmd::run_access(g, c),
        Command::Offboard(c) => policy_cmd::run_offboard(g, c),
        Command::Audit(c) => policy_cmd::run_audit(g, c),
        Command::Config(c) => daemon_cmd::run_config(g, c),
        Command::Status(c) => daemon_cmd::run_status(g, c),
        Command::Jobs(c) => daemon_cmd::run_jobs(g, c),
        Command::Drills(c) => daemon_cmd::run_drills(g, c),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "labctl", &mut std::io::stdout());
            Ok(crate::error::ExitCode::Success)
        }
        Command::GenerateMan { dir } => {
            write_man_pages(&dir)?;
            Ok(crate::error::ExitCode::Success)
        }
    }
}

/// Writes one man page per command and subcommand into `dir`.
///
/// # Errors
/// I/O errors.
pub fn write_man_pages(dir: &Path) -> crate::error::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    write_man_rec(dir, cmd, "labctl")
}

fn write_man_rec(dir: &Path, cmd: clap::Command, name: &str) -> crate::error::Result<()> {
    let cmd = cmd.name(name.to_string());
    let mut buf = vec![];
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_man_rec(dir, sub.clone(), &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}

impl GlobalArgs {
    fn progress_enabled(&self) -> bool {
        !self.json && !self.quiet
    }

    /// The repository these flags name (see [`repo::open::RepoSpec`]).
    fn spec(&self) -> repo::open::RepoSpec {
        repo::open::RepoSpec {
            url: self.repo.clone(),
            backend: Default::default(),
            backup_key: self.key.clone(),
            restore_key: self.restore_key.clone(),
            cache_dir: self.cache_dir.clone(),
            hints: repo::open::KeyHints::FLAGS,
        }
    }

    fn open(&self, need_data: bool) -> crate::error::Result<Repository> {
        self.spec().open(need_data)
    }
}

/// Prints `value` as pretty JSON on stdout.
fn print_json<T: serde::Serialize>(value: &T) -> crate::error::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
