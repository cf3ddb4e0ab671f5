//! Choosing snapshots: the filter `snapshots`, `forget` and restore plans
//! share (source, tags, host).
//!
//! Must not read storage: it decides on snapshot manifests already loaded.

use crate::repo::snapshot::Snapshot;

/// Which snapshots a command looks at (shared by `snapshots` and `forget`).
#[derive(clap::Args, Debug, Clone, Default)]
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
    /// Whether `snap` passes every given condition.
    pub fn matches(&self, snap: &Snapshot) -> bool {
        let source_ok = self.source.as_ref().is_none_or(|src| {
            *src == snap.source.name || *src == format!("{}:{}", snap.source.kind, snap.source.name)
        });
        source_ok
            && self.tags.iter().all(|t| snap.tags.contains(t))
            && self.host.as_ref().is_none_or(|h| *h == snap.host)
    }
}
