//! `labctl forget` and `labctl prune`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::repo::forget;
use crate::repo::prune::{self, PruneOptions};
use crate::repo::Repository;
use crate::util::units::human_bytes;
use clap::Args;

#[derive(Args, Debug)]
pub struct ForgetCmd {
    #[command(flatten)]
    pub keep: forget::KeepRules,
    /// What makes a group, comma-separated: source (kind and name), host, tags.
    #[arg(long, default_value = "source", value_name = "KEYS")]
    pub group_by: String,
    #[command(flatten)]
    pub filter: crate::repo::select::SnapshotFilter,
    /// Show what would be removed and why each kept snapshot stays; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run `prune` afterwards.
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub prune_args: PruneCmd,
}

#[derive(Args, Debug)]
pub struct PruneCmd {
    /// Delete a marked pack only after its mark is this old. Must exceed the
    /// longest backup: shorter values can delete data a running backup uses.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub grace: String,
    /// Repack packs whose unused share reaches this percentage.
    #[arg(long, default_value = "25%", value_name = "PCT")]
    pub repack_threshold: String,
    /// Show what prune would do; change nothing. (With forget: applies to both.)
    #[arg(long = "prune-dry-run", hide = true)]
    pub prune_dry_run: bool,
}

pub fn run_forget(g: &GlobalArgs, c: ForgetCmd) -> crate::error::Result<ExitCode> {
    let policy = c.keep.policy().map_err(|(field, e)| {
        LabError::usage(format!("--{}: {}", field.replace('_', "-"), e.message()))
    })?;
    let by: Vec<&str> = c.group_by.split(',').map(|s| s.trim()).collect();
    if let Some(bad) = by.iter().find(|k| !["source", "host", "tags"].contains(k)) {
        return Err(LabError::usage(format!(
            "--group-by: unknown key '{bad}' (use source, host, tags)"
        ))
        .into());
    }
    let repo = g.open(false)?;
    let report = forget::apply(&repo, &policy, &by, |s| c.filter.matches(s), c.dry_run)?;
    let (decisions, locked) = (report.decisions, report.locked);
    let removed: Vec<_> = decisions.iter().filter(|d| !d.keep).collect();
    for l in &locked {
        eprintln!(
            "note: snapshot {l} is protected by Object Lock and stays; a later forget removes it"
        );
    }
    if g.json {
        print_json(&serde_json::json!({"dry-run": c.dry_run, "decisions": decisions}))?;
    } else if !g.quiet {
        let mut group = "";
        for d in &decisions {
            if d.group != group {
                println!("{}:", d.group);
                group = &d.group;
            }
            if d.keep {
                println!(
                    "  keep   {} {}  ({})",
                    d.id.short(),
                    d.time,
                    d.reasons.join(", ")
                );
            } else {
                println!(
                    "  {} {} {}",
                    if c.dry_run { "would remove" } else { "remove" },
                    d.id.short(),
                    d.time
                );
            }
        }
        println!(
            "{} snapshot(s) kept, {} {}",
            decisions.len() - removed.len(),
            removed.len(),
            if c.dry_run {
                "would be removed (dry run)"
            } else {
                "removed; run `labctl prune` to free their data"
            }
        );
    }
    if c.prune && !c.dry_run {
        return prune_with(g, &repo, &c.prune_args, false);
    }
    Ok(ExitCode::Success)
}

pub fn run_prune(g: &GlobalArgs, c: PruneCmd, dry_run: bool) -> crate::error::Result<ExitCode> {
    let repo = g.open(false)?;
    prune_with(g, &repo, &c, dry_run)
}

fn prune_with(
    g: &GlobalArgs,
    repo: &Repository,
    c: &PruneCmd,
    dry_run: bool,
) -> crate::error::Result<ExitCode> {
    let grace = crate::util::units::parse_time_duration(&c.grace)?;
    if grace < time::Duration::hours(24) && !g.quiet {
        eprintln!("warning: grace period {} is under 24h: a backup running longer than that can lose data it deduplicated", c.grace);
    }
    let opts = PruneOptions {
        grace,
        repack_threshold: crate::util::units::parse_percent(&c.repack_threshold)?,
        dry_run: dry_run || c.prune_dry_run,
        ..Default::default()
    };
    let r = prune::prune(repo, &opts)?;
    if g.json {
        print_json(&r)?;
    } else if !g.quiet {
        let verb = if r.dry_run { "would" } else { "did" };
        println!(
            "{} snapshot(s), {} pack(s) in use or marked",
            r.snapshots, r.packs
        );
        println!(
            "{verb} mark {} pack(s) as unused ({} repacked into {} new)",
            r.packs_marked.len(),
            r.packs_repacked.len(),
            r.packs_written.len()
        );
        println!(
            "{verb} delete {} pack(s) marked at least {} ago, freeing {}",
            r.packs_deleted.len(),
            c.grace,
            human_bytes(r.bytes_deleted)
        );
        if !r.packs_unmarked.is_empty() {
            println!(
                "unmarked {} pack(s) a snapshot needs again",
                r.packs_unmarked.len()
            );
        }
        if r.tree_copies_written > 0 {
            println!(
                "{verb} write {} of directory listings, so each is in two packs",
                crate::util::units::count(r.tree_copies_written, "copy", "copies")
            );
        }
        if r.uploads_aborted > 0 {
            println!(
                "aborted {} unfinished upload(s) older than {}",
                r.uploads_aborted, c.grace
            );
        }
        if let Some(next) = r.orphans_waiting.iter().map(|(_, t)| t).min() {
            println!(
                "{} pack(s) no index lists (left by a killed backup) are marked once unindexed for an hour and the grace period; the first after {next}",
                r.orphans_waiting.len()
            );
        }
        if let Some(next) = r.packs_waiting.iter().map(|(_, t)| t).min() {
            println!(
                "{} marked pack(s) wait for their grace period; the first can go after {next}",
                r.packs_waiting.len()
            );
        }
    }
    Ok(ExitCode::Success)
}
