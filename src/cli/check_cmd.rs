//! `labctl check` and `labctl catalog`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::repo::check::{self, ReadData};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct CheckCmd {
    /// Download every pack, decrypt and re-hash every blob (needs the restore key).
    #[arg(long, conflicts_with = "read_data_subset")]
    pub read_data: bool,
    /// Like --read-data for a share of the packs, e.g. 10% (chosen anew each day).
    #[arg(long, value_name = "N%")]
    pub read_data_subset: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum CatalogCmd {
    /// Recreate the local catalog from the repository (index, snapshots, pack trailers).
    ///
    /// A damaged index fragment is reported and its packs are read from their
    /// own trailers instead. Also acknowledges snapshots that `check` reported
    /// as gone from storage.
    Rebuild,
}

#[derive(Subcommand, Debug)]
pub enum RepairCmd {
    /// Rebuild the index from the packs in storage and restore redundancy.
    ///
    /// Writes a new index fragment for every pack no readable fragment lists
    /// (read from the packs' trailers), drops from the index the packs that
    /// are missing from storage, and writes the second copy of every
    /// directory listing that has only one left. The backup key is enough.
    /// A damaged fragment is left in place, for you to delete once this has
    /// run: `labctl check` names it, and names any snapshot that lost data
    /// with a missing pack.
    Index,
}

pub fn run_check(g: &GlobalArgs, c: CheckCmd) -> crate::error::Result<ExitCode> {
    let read = match (&c.read_data, &c.read_data_subset) {
        (true, _) => ReadData::All,
        (false, Some(s)) => {
            let share = crate::util::units::parse_percent(s)
                .map_err(|e| LabError::usage(format!("--read-data-subset: {}", e.message())))?;
            if share == 0.0 {
                return Err(LabError::usage("--read-data-subset must be more than 0%").into());
            }
            ReadData::Subset(share * 100.0)
        }
        _ => ReadData::None,
    };
    let repo = g.open(read != ReadData::None)?;
    let report = check::check(&repo, read)?;
    if g.json {
        print_json(&report)?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        for d in &report.damage {
            eprintln!("error: pack {} is damaged: {}", d.pack, d.problem);
            for b in &d.blobs {
                eprintln!("  damaged blob {b}");
            }
            for (snap, files) in &d.affected {
                eprintln!("  snapshot {snap} affected:");
                for f in files {
                    eprintln!("    {f}");
                }
            }
        }
        if !g.quiet {
            println!(
                "checked {} pack(s), {} index file(s), {} snapshot(s); read {} pack(s), verified {} blob(s): {}",
                report.packs,
                report.index_files,
                report.snapshots,
                report.packs_read,
                report.blobs_verified,
                if report.is_clean() { "no errors" } else { "ERRORS FOUND" }
            );
        }
    }
    Ok(if report.is_clean() {
        ExitCode::Success
    } else {
        ExitCode::Integrity
    })
}

pub fn run_repair(g: &GlobalArgs, c: RepairCmd) -> crate::error::Result<ExitCode> {
    match c {
        RepairCmd::Index => {
            let repo = g.open(false)?;
            let report = repo.repair_index()?;
            let damaged: Vec<String> = repo
                .catalog
                .damaged_index()?
                .into_iter()
                .map(|(id, why)| format!("index/{}: {why}", id.hex()))
                .collect();
            if g.json {
                print_json(&serde_json::json!({
                    "index": report.index_written.iter().map(|id| id.hex()).collect::<Vec<_>>(),
                    "packs": report.packs_indexed,
                    "packs-dropped": report.packs_dropped.iter().map(|p| p.hex()).collect::<Vec<_>>(),
                    "tree-copies-written": report.tree_copies_written,
                    "damaged": damaged,
                }))?;
            } else {
                match report.index_written.as_slice() {
                    [] => println!("every pack is indexed"),
                    ids => println!(
                        "wrote {} listing {} pack(s)",
                        ids.iter()
                            .map(|id| format!("index/{}", id.hex()))
                            .collect::<Vec<_>>()
                            .join(", "),
                        report.packs_indexed
                    ),
                }
                for p in &report.packs_dropped {
                    println!(
                        "dropped pack {} from the index: it is missing from storage",
                        p.hex()
                    );
                }
                if report.tree_copies_written > 0 {
                    println!(
                        "wrote {} of directory listings into {} pack(s), so each has two",
                        crate::util::units::count(report.tree_copies_written, "copy", "copies"),
                        report.tree_packs_written
                    );
                }
                if !report.packs_dropped.is_empty() {
                    eprintln!("note: run `labctl check` to see which snapshots, if any, lost data with those packs");
                }
                for d in &damaged {
                    eprintln!("note: damaged fragment left in place (delete it): {d}");
                }
            }
            Ok(ExitCode::Success)
        }
    }
}

pub fn run_catalog(g: &GlobalArgs, c: CatalogCmd) -> crate::error::Result<ExitCode> {
    match c {
        CatalogCmd::Rebuild => {
            let repo = g.spec().open_unsynced()?;
            check::rebuild_catalog(&repo)?;
            let packs = repo.catalog.packs()?.len();
            let snaps = repo.catalog.snapshots()?.len();
            if g.json {
                print_json(
                    &serde_json::json!({"catalog": repo.catalog.path(), "packs": packs, "snapshots": snaps}),
                )?;
            } else if !g.quiet {
                println!(
                    "rebuilt catalog {}: {packs} pack(s), {snaps} snapshot(s)",
                    repo.catalog.path().display()
                );
            }
            for (id, why) in repo.catalog.damaged_index()? {
                eprintln!(
                    "warning: index/{} is damaged ({why}); its packs were read from their trailers. Run `labctl repair index`, then delete it",
                    id.hex()
                );
            }
            Ok(ExitCode::Success)
        }
    }
}
