//! Repositories of synthetic packs for unit tests of the metadata passes
//! (`check`, `prune`): packs that exist with their recorded sizes (zeros),
//! indexed, and snapshots of given chunk lists.

use crate::backend::fs::FsBackend;
use crate::backend::Backend;
use crate::repo::index::IndexedPack;
use crate::repo::keys::Keys;
use crate::repo::snapshot::{self, Snapshot, Source};
use crate::repo::{format, Id, Repository};
use std::path::Path;
use std::sync::Arc;

/// A blob ID for a test number.
pub(crate) fn blob(i: u32) -> Id {
    Id(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// A new repository under `dir` holding `packs` (written as zeros of
/// their sizes) and an index of them, opened with a catalog in `dir/c`.
pub(crate) fn repo_of(dir: &Path, packs: &[IndexedPack]) -> (Repository, Keys, Arc<dyn Backend>) {
    let backend: Arc<dyn Backend> = Arc::new(FsBackend::new(dir.join("repo")));
    let keys = crate::repo::init(backend.as_ref(), &Default::default()).unwrap();
    for p in packs {
        backend
            .put(&format::pack_name(&p.id), &vec![0; p.size as usize])
            .unwrap();
    }
    let repo = Repository::open(backend.clone(), keys.clone(), &dir.join("c")).unwrap();
    repo.publish_packs(packs).unwrap();
    (repo, keys, backend)
}

/// Stores a snapshot at `time` with `root` and the chunk list `chunks`
/// (sorted here); returns its ID. The catalog learns it at its next sync.
pub(crate) fn put_snapshot(
    backend: &dyn Backend,
    keys: &Keys,
    time: &str,
    root: Id,
    mut chunks: Vec<Id>,
) -> Id {
    chunks.sort();
    let s = Snapshot {
        version: 1,
        time: time.into(),
        source: Source {
            kind: "path".into(),
            name: "x".into(),
        },
        host: "h".into(),
        tags: vec![],
        restore_point: None,
        facts: Default::default(),
        root: vec![root],
        summary: Default::default(),
        labctl_version: "t".into(),
    };
    let (id, bytes) = snapshot::encode(&s, chunks, &keys.meta_recipient());
    backend.put(&format::snapshot_name(&id), &bytes).unwrap();
    id
}
