//! `labctl points`: restore points (the snapshots one run of a
//! multi-source job wrote), complete or partial.

use super::{print_json, GlobalArgs};
use crate::error::ExitCode;
use crate::repo::select::{restore_points, RestorePoint};
use crate::util::units::human_bytes;
use clap::{Args, Subcommand};

/// `labctl points [show ID]`.
#[derive(Args, Debug)]
pub struct PointsCmd {
    #[command(subcommand)]
    pub show: Option<PointsSub>,
}

#[derive(Subcommand, Debug)]
pub enum PointsSub {
    /// One restore point: each source's snapshot, size and what is missing.
    Show {
        /// The point's ID (or a unique prefix), or `latest` (the newest
        /// complete point).
        id: String,
    },
}

fn load(g: &GlobalArgs) -> crate::error::Result<Vec<RestorePoint>> {
    let snaps = g.open(false)?.catalog.snapshot_manifests()?;
    Ok(restore_points(snaps.iter().map(|(i, s)| (i, s))))
}

fn state(p: &RestorePoint) -> String {
    if p.complete {
        "complete".into()
    } else {
        format!("partial (missing {})", p.missing.join(", "))
    }
}

pub fn run(g: &GlobalArgs, c: PointsCmd) -> crate::error::Result<ExitCode> {
    let points = load(g)?;
    match c.show {
        None => {
            if g.json {
                return print_json(&points).map(|_| ExitCode::Success);
            }
            println!(
                "{:<36} {:<20} {:>7} {:>10}  STATE",
                "POINT", "TIME", "SOURCES", "SIZE"
            );
            for p in &points {
                let size: u64 = p.members.iter().map(|m| m.bytes_total).sum();
                println!(
                    "{:<36} {:<20} {:>7} {:>10}  {}",
                    p.id,
                    p.time.get(..19).unwrap_or(&p.time),
                    p.members.len(),
                    human_bytes(size),
                    state(p)
                );
            }
            Ok(ExitCode::Success)
        }
        Some(PointsSub::Show { id }) => {
            let p = crate::repo::select::find_point(&points, &id)?;
            if g.json {
                return print_json(p).map(|_| ExitCode::Success);
            }
            println!("restore point {} ({}), {}", p.id, p.time, state(p));
            for m in &p.members {
                println!(
                    "  {} {:<8} {:<40} snapshot {}  {} ({} added)",
                    m.index.map(|i| format!("#{}", i + 1)).unwrap_or_default(),
                    m.kind,
                    m.name,
                    m.snapshot.short(),
                    human_bytes(m.bytes_total),
                    human_bytes(m.bytes_added)
                );
            }
            Ok(ExitCode::Success)
        }
    }
}
