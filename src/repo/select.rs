//! Choosing snapshots: the filter `snapshots`, `forget` and restore plans
//! share (source, tags, host), and restore points (the snapshots one run
//! of a multi-source job wrote, grouped by their `restore_point` ID).
//!
//! A run that writes a restore point records in every snapshot's facts the
//! kinds it was to write (`point.sources`, in order) and the snapshot's own
//! position (`point.index`), so whether a point is complete is known from
//! the snapshots alone, on any machine, with no extra object to keep.
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

/// Facts key: the kinds a restore point's run was to write, in order.
pub const POINT_SOURCES: &str = "point.sources";
/// Facts key: this snapshot's position in [`POINT_SOURCES`].
pub const POINT_INDEX: &str = "point.index";

/// One snapshot of a restore point.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PointMember {
    pub index: Option<usize>,
    pub kind: String,
    pub name: String,
    pub snapshot: crate::repo::Id,
    pub time: String,
    pub bytes_total: u64,
    pub bytes_added: u64,
}

/// The snapshots that share a restore point ID.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestorePoint {
    pub id: String,
    /// The earliest snapshot's time.
    pub time: String,
    /// Every source the run was to write has its snapshot (a point made by
    /// hand with `--restore-point`, which records no list, counts as
    /// complete).
    pub complete: bool,
    /// The kinds the run was to write, when it recorded them.
    pub expected: Option<Vec<String>>,
    /// What is missing: `#2 etcd`, ...
    pub missing: Vec<String>,
    pub members: Vec<PointMember>,
}

/// The restore point `spec` names: its ID, a unique prefix of it, or
/// `latest` (the newest complete point).
///
/// # Errors
/// A usage error when none or several match.
pub fn find_point<'a>(
    points: &'a [RestorePoint],
    spec: &str,
) -> crate::error::Result<&'a RestorePoint> {
    let found: Vec<&RestorePoint> = if spec == "latest" {
        points.iter().rev().filter(|p| p.complete).take(1).collect()
    } else if let Some(p) = points.iter().find(|p| p.id == spec) {
        vec![p]
    } else {
        points.iter().filter(|p| p.id.starts_with(spec)).collect()
    };
    match found.as_slice() {
        [p] => Ok(p),
        [] if spec == "latest" => Err(crate::error::LabError::usage(
            "there is no complete restore point yet (see `labctl points`)",
        )
        .into()),
        [] => Err(crate::error::LabError::usage(format!(
            "no restore point {spec} (see `labctl points`)"
        ))
        .into()),
        _ => Err(crate::error::LabError::usage(format!(
            "{spec} matches {} restore points; give more of the ID",
            found.len()
        ))
        .into()),
    }
}

/// Groups snapshots into restore points, oldest first.
pub fn restore_points<'a>(
    snaps: impl IntoIterator<Item = (&'a crate::repo::Id, &'a Snapshot)>,
) -> Vec<RestorePoint> {
    let mut by_id: std::collections::BTreeMap<String, RestorePoint> = Default::default();
    for (id, s) in snaps {
        let Some(pid) = &s.restore_point else {
            continue;
        };
        let expected: Option<Vec<String>> = s
            .facts
            .get(POINT_SOURCES)
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        let p = by_id.entry(pid.clone()).or_insert_with(|| RestorePoint {
            id: pid.clone(),
            time: s.time.clone(),
            complete: false,
            expected: None,
            missing: vec![],
            members: vec![],
        });
        if s.time < p.time {
            p.time = s.time.clone();
        }
        if p.expected.is_none() {
            p.expected = expected;
        }
        p.members.push(PointMember {
            index: s
                .facts
                .get(POINT_INDEX)
                .and_then(|v| v.as_u64())
                .map(|i| i as usize),
            kind: s.source.kind.clone(),
            name: s.source.name.clone(),
            snapshot: *id,
            time: s.time.clone(),
            bytes_total: s.summary.bytes_total,
            bytes_added: s.summary.bytes_added,
        });
    }
    let mut out: Vec<RestorePoint> = by_id
        .into_values()
        .map(|mut p| {
            p.members.sort_by_key(|m| (m.index, m.time.clone()));
            if let Some(exp) = &p.expected {
                p.missing = exp
                    .iter()
                    .enumerate()
                    .filter(|(i, kind)| {
                        !p.members
                            .iter()
                            .any(|m| m.index == Some(*i) && &m.kind == *kind)
                    })
                    .map(|(i, kind)| format!("#{} {kind}", i + 1))
                    .collect();
            }
            p.complete = p.missing.is_empty();
            p
        })
        .collect();
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    out
}
