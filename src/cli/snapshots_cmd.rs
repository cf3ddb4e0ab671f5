//! `labctl snapshots` and `labctl ls`.

use super::{human_bytes, print_json, GlobalArgs};
use crate::error::ExitCode;
use crate::repo::snapshot::Snapshot;
use crate::repo::tree::NodeType;
use crate::repo::Id;
use clap::Args;

#[derive(Args, Debug)]
pub struct SnapshotsCmd {
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

/// Which snapshots a command looks at (shared by `snapshots` and `forget`).
#[derive(Args, Debug)]
pub struct SnapshotFilter {
    /// Only snapshots of this source name (or kind:name).
    #[arg(long)]
    pub source: Option<String>,
    /// Only snapshots with this tag; repeatable (all must match).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Only snapshots taken on this host.
    #[arg(long)]
    pub host: Option<String>,
}

impl SnapshotFilter {
    pub fn matches(&self, snap: &Snapshot) -> bool {
        let source_ok = self.source.as_ref().is_none_or(|src| {
            *src == snap.source.name || *src == format!("{}:{}", snap.source.kind, snap.source.name)
        });
        source_ok
            && self.tags.iter().all(|t| snap.tags.contains(t))
            && self.host.as_ref().is_none_or(|h| *h == snap.host)
    }
}

#[derive(Args, Debug)]
pub struct LsCmd {
    /// Snapshot ID (or a unique prefix), or `latest`.
    pub snapshot: String,
    /// Only below this path.
    #[arg(long)]
    pub path: Option<String>,
}

#[derive(serde::Serialize)]
struct Listed {
    id: String,
    #[serde(flatten)]
    snap: Snapshot,
}

pub fn run_snapshots(g: &GlobalArgs, c: SnapshotsCmd) -> anyhow::Result<ExitCode> {
    let repo = g.open(false)?;
    let mut out = vec![];
    for row in repo.catalog.snapshots()? {
        let snap: Snapshot = serde_json::from_str(&row.json)?;
        if !c.filter.matches(&snap) {
            continue;
        }
        out.push(Listed {
            id: row.id.hex(),
            snap,
        });
    }
    if g.json {
        print_json(&out)?;
        return Ok(ExitCode::Success);
    }
    println!(
        "{:<10} {:<20} {:<12} {:<8} {:>10}  {:<16} source",
        "id", "time", "host", "kind", "size", "tags"
    );
    for l in &out {
        println!(
            "{:<10} {:<20} {:<12} {:<8} {:>10}  {:<16} {}",
            &l.id[..8],
            l.snap.time.get(..19).unwrap_or(&l.snap.time),
            l.snap.host,
            l.snap.source.kind,
            human_bytes(l.snap.summary.bytes_total),
            l.snap.tags.join(","),
            l.snap.source.name
        );
    }
    println!("{} snapshot(s)", out.len());
    Ok(ExitCode::Success)
}

#[derive(serde::Serialize)]
struct Entry {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: String,
    size: u64,
    mtime_ns: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

pub fn run_ls(g: &GlobalArgs, c: LsCmd) -> anyhow::Result<ExitCode> {
    let repo = g.open(true)?;
    let id: Id = repo.resolve_snapshot(&c.snapshot)?;
    let (snap, _) = repo.load_snapshot(&id)?;
    let mut stack = vec![(String::new(), snap.root)];
    let mut entries = vec![];
    let filter = c.path.as_deref().map(|p| p.trim_matches('/').to_string());
    while let Some((prefix, ids)) = stack.pop() {
        let tree = repo.read_tree(&ids)?;
        for n in tree.nodes.into_iter().rev() {
            let path = if prefix.is_empty() {
                n.name.clone()
            } else {
                format!("{prefix}/{}", n.name)
            };
            let kind = match n.node_type {
                NodeType::Dir => "dir",
                NodeType::File => "file",
                NodeType::Symlink => "symlink",
            };
            let show = filter
                .as_ref()
                .is_none_or(|f| path == *f || path.starts_with(&format!("{f}/")));
            if show {
                entries.push(Entry {
                    path: path.clone(),
                    kind,
                    mode: format!("{:o}", n.mode & 0o7777),
                    size: n.size,
                    mtime_ns: n.mtime_ns,
                    target: n.target.clone(),
                });
            }
            if let Some(sub) = n.subtree {
                stack.push((path, sub));
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    if g.json {
        print_json(&entries)?;
    } else {
        for e in &entries {
            let t = e
                .target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default();
            println!(
                "{:<7} {:>5} {:>10}  {}{}",
                e.kind, e.mode, e.size, e.path, t
            );
        }
    }
    Ok(ExitCode::Success)
}
