//! Backup sources: what labctl reads and how it becomes a snapshot. One
//! file per kind; [`SourceSpec`] is the one place kinds are listed.
//!
//! A source file owns, for its kind: the settings struct (which is at once
//! the `labctl backup <kind>` subcommand's arguments and the `backup = {
//! source = "<kind>", ... }` table of a `labctl.toml` job), the checks on
//! those settings, the snapshot's `source.kind`, and the backup itself,
//! written against the engine's public [`crate::repo::backup::BackupRun`].
//! Restore and verify entry points for a kind live beside it as they land.
//!
//! Must not reach into the engine's internals (packs, index, catalog
//! tables) nor import from `cli/`, `schedule/` or `restore/`.

pub(crate) mod bucket;
pub mod etcd;
pub mod kfp;
pub mod kube;
pub mod mlflow;
pub mod path;
pub mod pvc;
pub mod stream;
pub mod vm;

use crate::error::CancelFlag;
use crate::repo::backup::{BackupOptions, BackupOutcome};
use crate::repo::Repository;
use crate::util::progress::Progress;

/// What a source needs to run: the open repository, the snapshot options
/// (tags, host, restore point, facts, encoder threads), progress and the
/// cancel flag (the daemon's timeout and shutdown).
pub struct SourceContext<'a> {
    pub repo: &'a Repository,
    pub opts: BackupOptions,
    pub progress: Progress,
    /// Where a stream source reads when it runs no command (the CLI's stdin).
    pub stdin: Option<Box<dyn std::io::Read + 'a>>,
}

impl SourceContext<'_> {
    /// The cancel flag, if any.
    pub fn cancel(&self) -> Option<&CancelFlag> {
        self.opts.cancel.as_ref()
    }
}

/// Stores the listing of a snapshot that holds one file (a stream, an
/// etcd snapshot) whose `content` was just added, counting it in the
/// summary; returns the root tree's chunks for `finish`.
///
/// # Errors
/// Storage errors.
pub(crate) fn one_file_root(
    run: &mut crate::repo::backup::BackupRun<'_>,
    name: &[u8],
    content: Vec<crate::repo::tree::ContentRef>,
) -> crate::error::Result<Vec<crate::repo::Id>> {
    use crate::repo::tree::{Node, NodeType, Tree};
    let size = run.summary_mut().bytes_read;
    run.summary_mut().bytes_total = size;
    run.summary_mut().files_new = 1;
    let mut node = Node::new(
        name,
        NodeType::File,
        0o100600,
        // SAFETY: getuid/getgid cannot fail.
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
        time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
    );
    node.size = size;
    node.content = content;
    run.add_tree(&Tree {
        v: 1,
        nodes: vec![node],
    })
}

/// A file of a snapshot being built from memory or from streams.
pub(crate) enum Leaf {
    /// Bytes to store.
    Bytes(Vec<u8>),
    /// Content already stored (`BackupRun::add_stream`) and its size.
    Stored {
        size: u64,
        content: Vec<crate::repo::tree::ContentRef>,
    },
}

/// A folder of a snapshot being built (a tree of YAML files, a bucket's
/// objects): insert files by path, then store it as trees.
#[derive(Default)]
pub(crate) struct Folder {
    dirs: std::collections::BTreeMap<String, Folder>,
    files: std::collections::BTreeMap<String, Leaf>,
}

impl Folder {
    pub(crate) fn insert(&mut self, path: &[String], leaf: Leaf) {
        match path {
            [file] => {
                self.files.insert(file.clone(), leaf);
            }
            [dir, rest @ ..] => self.dirs.entry(dir.clone()).or_default().insert(rest, leaf),
            [] => {}
        }
    }

    /// Stores the folder (directories 0700, files 0600, owned by labctl's
    /// user, all with `mtime`); its tree's chunks.
    ///
    /// # Errors
    /// Storage errors; cancellation.
    pub(crate) fn store(
        self,
        run: &mut crate::repo::backup::BackupRun<'_>,
        mtime: i128,
    ) -> crate::error::Result<Vec<crate::repo::Id>> {
        use crate::repo::chunker::ChunkerKind;
        use crate::repo::tree::{Node, NodeType, Tree};
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut nodes = vec![];
        for (name, dir) in self.dirs {
            run.check_cancel()?;
            let ids = dir.store(run, mtime)?;
            run.summary_mut().dirs += 1;
            let mut n = Node::new(name.as_bytes(), NodeType::Dir, 0o040700, uid, gid, mtime);
            n.subtree = Some(ids);
            nodes.push(n);
        }
        for (name, leaf) in self.files {
            let (size, content) = match leaf {
                Leaf::Bytes(data) => (
                    data.len() as u64,
                    run.add_stream(&data[..], ChunkerKind::Cdc, &name)?,
                ),
                Leaf::Stored { size, content } => (size, content),
            };
            run.summary_mut().files_new += 1;
            let mut n = Node::new(name.as_bytes(), NodeType::File, 0o100600, uid, gid, mtime);
            n.size = size;
            n.content = content;
            nodes.push(n);
        }
        nodes.sort_by_key(Node::name_bytes);
        run.add_tree(&Tree { v: 1, nodes })
    }
}

/// What one run of several sources wrote as one restore point.
#[derive(Debug)]
pub struct PointRun {
    /// `<label>-<YYYYMMDDTHHMMSSZ>-<hex4>`.
    pub point: String,
    /// Each source that was written: its position, kind and outcome.
    pub written: Vec<(usize, &'static str, BackupOutcome)>,
    /// Each source that failed: `#N kind: why`.
    pub failed: Vec<String>,
}

/// Backs up `sources` one after another as one restore point: every
/// snapshot gets the point's ID, the kinds the run was to write and its
/// position (so whether the point is complete is known from the snapshots
/// alone, see [`crate::repo::select`]). A failed source does not stop the
/// others; `progress` gives each source its progress display.
///
/// # Errors
/// Only cancellation (through `base.cancel`); a source's own failure is
/// in [`PointRun::failed`].
pub fn backup_point(
    repo: &Repository,
    label: &str,
    sources: &[SourceSpec],
    base: &BackupOptions,
    progress: &dyn Fn(&SourceSpec) -> Progress,
) -> crate::error::Result<PointRun> {
    use crate::repo::select::{POINT_INDEX, POINT_SOURCES};
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .expect("a UTC time formats");
    let point = base
        .restore_point
        .clone()
        .unwrap_or_else(|| format!("{label}-{stamp}-{:04x}", rand::random::<u16>()));
    let kinds: Vec<&str> = sources.iter().map(|s| s.kind()).collect();
    let mut run = PointRun {
        point: point.clone(),
        written: vec![],
        failed: vec![],
    };
    for (i, src) in sources.iter().enumerate() {
        if let Some(c) = &base.cancel {
            c.check()?;
        }
        let mut opts = base.clone();
        opts.restore_point = Some(point.clone());
        opts.facts
            .insert(POINT_SOURCES.into(), serde_json::json!(kinds));
        opts.facts.insert(POINT_INDEX.into(), serde_json::json!(i));
        let out = src.backup(SourceContext {
            repo,
            opts,
            progress: progress(src),
            stdin: None,
        });
        match out {
            Ok(out) => run.written.push((i, src.kind(), out)),
            Err(e) if e.is_cancelled() => return Err(e),
            Err(e) => run.failed.push(format!("#{} {}: {e:#}", i + 1, kinds[i])),
        }
    }
    Ok(run)
}

/// Every source kind, as a CLI subcommand (`labctl backup <kind>`) and as a
/// `labctl.toml` job table (`backup = { source = "<kind>", ... }`). Adding
/// a kind is a new file in this folder and one line here (and in the
/// `match`es below, which the compiler points at).
#[derive(Debug, Clone, clap::Subcommand, serde::Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum SourceSpec {
    /// Back up a directory tree (files, directories, symlinks, hard links,
    /// FIFOs and device nodes, modes, owners, times).
    ///
    /// Files whose size, mtime, ctime and inode are unchanged since the last
    /// backup of the same directory are not read again. Unreadable files are
    /// reported and skipped; the snapshot is still written (exit code 3).
    Path(path::PathSource),
    /// Back up one stream: standard input, or the output of a command given
    /// after `--` (a dump, an archive, a disk image).
    ///
    /// With a command, its exit status is checked: a command that fails (or
    /// a stream that ends early) commits nothing, and its last line of
    /// stderr is in the error.
    Stream(stream::StreamSource),
    /// Back up an etcd member through the v3 snapshot API (the whole
    /// Kubernetes control-plane state).
    ///
    /// The stream's sha256 trailer is checked as it arrives: a stream cut
    /// short or with a wrong checksum commits nothing. The snapshot holds
    /// one file, `snapshot.db`, as `etcdctl snapshot save` writes it, and
    /// records the member and cluster ID, revision, key count, db size and
    /// etcd version. Restore it with `labctl restore SNAP --etcd-data-dir
    /// DIR` (and `--verify` to start a member on it).
    Etcd(etcd::EtcdSource),
    /// Back up a Proxmox VE VM: `vzdump --stdout --compress 0` run on its
    /// node over SSH (host keys pinned in the platform file's `ssh:`),
    /// streamed into the repository with its config from the API.
    ///
    /// vzdump failing, the stream ending early, a node whose host key is
    /// not the pinned one: nothing is committed. Restore with `labctl
    /// restore SNAP --to-vm --node N --vmid NEW [--storage S] [--bridge B]`.
    Vm(vm::VmSource),
    /// Back up Kubernetes objects through the API: discovery (CRDs
    /// included), paginated lists, each object cleaned of what the server
    /// owns and stored as `<namespace or _cluster>/<group>/<Kind>/<name>.yaml`.
    ///
    /// Left out by default, each with its reason in the snapshot's facts:
    /// events, endpoints and endpointslices, leases, metrics, pods,
    /// replicasets and jobs owned by a controller, service-account token
    /// Secrets, kube-root-ca.crt (name a kind in --include-kinds to keep
    /// it). Secrets are kept: the repository is encrypted. Restore with
    /// `labctl restore SNAP --to-cluster [--namespace-map FROM=TO]`.
    Kube(kube::KubeSource),
    /// Back up the data of PersistentVolumeClaims of Rancher's local-path
    /// provisioner that live on this node: each bound claim's volume
    /// directory (`hostPath`/`local`) as a tree snapshot `pvc/NS/NAME`
    /// with the claim's spec, volume, node, class and capacity as facts.
    ///
    /// A claim on another node is left to that node's agent
    /// (deploy/kubernetes/labctl-agent.yaml); unbound claims and other
    /// volume types (CSI, NFS) are reported by name and type. Several
    /// claims are written as one restore point. Restore with `--target
    /// DIR`, or `--to-pvc NS/NAME` (a new claim filled by a Job).
    Pvc(pvc::PvcSource),
    /// Back up an MLflow tracking server's state as one snapshot: its
    /// backend store (SQLite: a consistent copy through the online backup
    /// API; PostgreSQL: pg_dump at an exported snapshot; taken first) and
    /// its artifact root (read after), with the alembic revision, counts
    /// and a sample of runs as facts.
    ///
    /// Restore with `labctl restore SNAP --mlflow-backend-store-uri URI
    /// --mlflow-artifacts DIR` (stored artifact URIs rewritten to the new
    /// root) and check it through a server on the restored store with
    /// `--verify-tracking-uri URL`.
    Mlflow(mlflow::MlflowSource),
    /// Back up Kubeflow Pipelines' metadata as one snapshot: its MySQL
    /// databases (mlpipeline, metadb, cachedb: one mysqldump
    /// --single-transaction, taken first) and every object of its bucket
    /// (listed after, so it holds what the databases name), with every
    /// table's row count as facts.
    ///
    /// With --quiesce, the ml-pipeline API server and persistence agent in
    /// kubeflow are scaled to 0 for the dump and back afterwards (also when
    /// it fails). Restore with `labctl restore SNAP --kfp-mysql URI
    /// --kfp-bucket s3://BUCKET` (loaded into scratch databases, checked,
    /// then renamed into place in one step).
    KubeflowPipelines(kfp::KfpSource),
}

impl SourceSpec {
    /// The snapshot's `source.kind` (the `source = "..."` of the config).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Path(_) => path::KIND,
            SourceSpec::Stream(_) => stream::KIND,
            SourceSpec::Etcd(_) => etcd::KIND,
            SourceSpec::Vm(_) => vm::KIND,
            SourceSpec::Kube(_) => kube::KIND,
            SourceSpec::Pvc(_) => pvc::KIND,
            SourceSpec::Mlflow(_) => mlflow::KIND,
            SourceSpec::KubeflowPipelines(_) => kfp::KIND,
        }
    }

    /// What the source reads, in words (a path, a stream's name, an
    /// endpoint, a VM).
    pub fn what(&self) -> String {
        match self {
            SourceSpec::Path(s) => s.path.display().to_string(),
            SourceSpec::Stream(s) => s.name.clone(),
            SourceSpec::Etcd(s) => s.endpoint.clone(),
            SourceSpec::Vm(s) => s.vm.join(","),
            SourceSpec::Kube(s) => s.what(),
            SourceSpec::Pvc(s) => s.what(),
            SourceSpec::Mlflow(s) => s.what(),
            SourceSpec::KubeflowPipelines(s) => s.what(),
        }
    }

    /// Checks the settings without touching the machine's data: for `labctl
    /// config validate` and before a run.
    ///
    /// # Errors
    /// `(field, why)` for the first setting that is wrong.
    pub fn validate(&self, from_config: bool) -> Result<(), (String, String)> {
        match self {
            SourceSpec::Path(s) => s.validate(from_config),
            SourceSpec::Stream(s) => s.validate(from_config),
            SourceSpec::Etcd(s) => s.validate(from_config),
            SourceSpec::Vm(s) => s.validate(from_config),
            SourceSpec::Kube(s) => s.validate(from_config),
            SourceSpec::Pvc(s) => s.validate(from_config),
            SourceSpec::Mlflow(s) => s.validate(from_config),
            SourceSpec::KubeflowPipelines(s) => s.validate(from_config),
        }
    }

    /// Checks what the source needs on this host (for `labctl config
    /// validate --host`): for etcd, the TLS files present and the client key
    /// private.
    ///
    /// # Errors
    /// The first problem, typed (a too-open key is a key error).
    pub fn check_host(&self) -> Result<(), crate::error::LabError> {
        match self {
            SourceSpec::Path(_) | SourceSpec::Stream(_) => Ok(()),
            SourceSpec::Etcd(s) => s.check_host(),
            SourceSpec::Vm(s) => s.check_host(),
            SourceSpec::Kube(s) => s.check_host(),
            SourceSpec::Pvc(s) => s.check_host(),
            SourceSpec::Mlflow(s) => s.check_host(),
            SourceSpec::KubeflowPipelines(s) => s.check_host(),
        }
    }

    /// The source with what labctl.toml's `[platform]` supplies filled in
    /// where its table is silent (the cluster of a kube source).
    pub fn with_platform(&self, kube_target: &crate::k8s::KubeTarget) -> SourceSpec {
        match self {
            SourceSpec::Kube(s) => SourceSpec::Kube(s.with_default_target(kube_target)),
            SourceSpec::Pvc(s) => SourceSpec::Pvc(s.with_default_target(kube_target)),
            SourceSpec::KubeflowPipelines(s) => {
                SourceSpec::KubeflowPipelines(s.with_default_target(kube_target))
            }
            other => other.clone(),
        }
    }

    /// One source per snapshot: a selection that stands for several (every
    /// PVC on this node) resolved, with notes on what was left out and why.
    /// A VM list becomes one source per VM.
    ///
    /// # Errors
    /// What resolving needs (the cluster) failing.
    pub fn expand(&self) -> crate::error::Result<(Vec<SourceSpec>, Vec<String>)> {
        match self {
            SourceSpec::Pvc(s) => {
                let (list, notes) = s.expand()?;
                Ok((list.into_iter().map(SourceSpec::Pvc).collect(), notes))
            }
            SourceSpec::Vm(v) => Ok((v.each().into_iter().map(SourceSpec::Vm).collect(), vec![])),
            other => Ok((vec![other.clone()], vec![])),
        }
    }

    /// Runs the backup, writing one snapshot.
    ///
    /// # Errors
    /// Whatever stopped the source or the repository; nothing is committed
    /// then (partial reads of a directory tree are in the summary instead).
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        match self {
            SourceSpec::Path(s) => s.backup(ctx),
            SourceSpec::Stream(s) => s.backup(ctx),
            SourceSpec::Etcd(s) => s.backup(ctx),
            SourceSpec::Vm(s) => s.backup(ctx),
            SourceSpec::Kube(s) => s.backup(ctx),
            SourceSpec::Pvc(s) => s.backup(ctx),
            SourceSpec::Mlflow(s) => s.backup(ctx),
            SourceSpec::KubeflowPipelines(s) => s.backup(ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_table_selects_its_source_by_kind() {
        #[derive(serde::Deserialize)]
        struct Job {
            backup: SourceSpec,
        }
        let j: Job =
            toml::from_str("backup = { source = \"path\", path = \"/etc\", chunker = \"fixed\" }")
                .unwrap();
        assert_eq!(j.backup.kind(), "path");
        let e =
            toml::from_str::<Job>("backup = { source = \"path\", path = \"/etc\", name = \"x\" }")
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("unknown field `name`"), "{e}");
        let e = toml::from_str::<Job>("backup = { source = \"kfp\" }")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown variant `kfp`"), "{e}");
        let e = toml::from_str::<Job>("backup = { source = \"vm\" }")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing field `vm`"), "{e}");
    }
}
