//! The `path` source: a directory tree, walked in name order, with the
//! file cache (unchanged files are not read again), hard links recorded
//! once, FIFOs and device nodes, and files that change while read re-read
//! once and otherwise reported (exit 3).
//!
//! Must not touch packs, the index or catalog tables: it talks to the
//! engine through [`BackupRun`] only.

use super::SourceContext;
use crate::error::LabError;
use crate::repo::backup::{BackupOutcome, BackupRun, ChunkerChoice, SourceError};
use crate::repo::catalog::FileFacts;
use crate::repo::chunker::ChunkerKind;
use crate::repo::snapshot::Source;
use crate::repo::tree::{ContentRef, Node, NodeType, Tree};
use crate::repo::Id;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The snapshot's `source.kind`.
pub const KIND: &str = "path";

/// `labctl backup path DIR` / `backup = { source = "path", path = "/dir" }`.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSource {
    /// The directory to back up (absolute in labctl.toml).
    #[arg(value_name = "DIR")]
    pub path: PathBuf,
    /// Chunker: auto (fixed for disk images by extension, FastCDC otherwise), cdc, fixed.
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default)]
    pub chunker: ChunkerChoice,
}

impl PathSource {
    /// In labctl.toml the path must be absolute (the daemon's working
    /// directory is not the operator's); on the command line a relative one
    /// is taken from the current directory.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, from_config: bool) -> Result<(), (String, String)> {
        if from_config && !self.path.is_absolute() {
            return Err((
                "path".into(),
                format!("'{}' must be an absolute path", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Backs up the directory tree.
    ///
    /// # Errors
    /// Storage or catalog errors. Unreadable files do not fail the backup:
    /// they are listed in `summary.errors` (exit code 3 at the CLI).
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        backup_tree_as(ctx, &self.path, KIND, "", self.chunker)
    }
}

/// Backs up the tree at `dir` as a snapshot of `kind` named `name` (the
/// canonical path when empty): the path source, and sources whose data is
/// a directory (a PVC's).
///
/// # Errors
/// As [`PathSource::backup`].
pub(crate) fn backup_tree_as(
    ctx: SourceContext<'_>,
    dir: &Path,
    kind: &str,
    name: &str,
    chunker: ChunkerChoice,
) -> crate::error::Result<BackupOutcome> {
    let started = Instant::now();
    let abs = fs::canonicalize(dir)
        .map_err(|e| LabError::usage(format!("cannot back up {}: {e}", dir.display())))?;
    if !abs.is_dir() {
        return Err(LabError::usage(format!(
            "{} is not a directory; use `labctl backup stream` for a single stream",
            abs.display()
        ))
        .into());
    }
    let source_key = abs.to_string_lossy().to_string();
    let mut run = BackupRun::start(ctx.repo, ctx.opts.threads, ctx.progress)?;
    run.set_cancel(ctx.opts.cancel.clone());
    run.use_file_cache(&source_key)?;
    let mut walker = TreeWalker {
        links: Default::default(),
        run: &mut run,
        choice: chunker,
    };
    let root = walker.dir(&abs, b"")?;
    run.finish(
        Source {
            kind: kind.into(),
            name: if name.is_empty() {
                source_key.clone()
            } else {
                name.to_string()
            },
        },
        root,
        &ctx.opts,
        started,
    )
}

/// Stores the tree at `abs` (a canonical directory) in `run` as the folder
/// `rel` of the snapshot and returns its listing's chunks: for sources
/// whose snapshot holds a directory among other things (MLflow's artifact
/// root beside its database).
///
/// # Errors
/// Storage errors; unreadable files are in the run's summary.
pub(crate) fn walk_tree(
    run: &mut BackupRun<'_>,
    abs: &Path,
    rel: &[u8],
    chunker: ChunkerChoice,
) -> crate::error::Result<Vec<Id>> {
    let mut walker = TreeWalker {
        links: Default::default(),
        run,
        choice: chunker,
    };
    walker.dir(abs, rel)
}

/// Backs up `dir` with the automatic chunker: [`PathSource::backup`] for
/// library callers (the demo, tests) that have no [`SourceContext`].
///
/// # Errors
/// As [`PathSource::backup`].
pub fn backup_path(
    repo: &crate::repo::Repository,
    dir: &Path,
    opts: &crate::repo::backup::BackupOptions,
    progress: crate::util::progress::Progress,
) -> crate::error::Result<BackupOutcome> {
    PathSource {
        path: dir.to_path_buf(),
        chunker: ChunkerChoice::Auto,
    }
    .backup(SourceContext {
        repo,
        opts: opts.clone(),
        progress,
        stdin: None,
    })
}

struct TreeWalker<'a, 'r> {
    /// First path of each multiply-linked inode seen in this run.
    links: std::collections::HashMap<(u64, u64), Vec<u8>>,
    run: &'a mut BackupRun<'r>,
    choice: ChunkerChoice,
}

/// What was read of one file: its content, how many bytes that is, and the
/// facts to cache when it did not change while being read.
struct StableRead {
    content: Vec<ContentRef>,
    bytes: u64,
    stable: Option<FileFacts>,
}

fn file_facts(m: &fs::Metadata) -> FileFacts {
    FileFacts {
        size: m.len(),
        mtime_ns: mtime_ns(m) as i64,
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        ino: m.ino(),
    }
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// Entries of a directory looked at together: their `lstat`s, the file
/// cache's answers for their files and the chunk check of those answers.
const WINDOW: usize = 4096;

/// What the file cache says of one entry of a window.
enum Cached {
    /// Not a file, or no entry.
    None,
    /// An entry whose stat facts differ or whose chunks are not all stored:
    /// the file is read again.
    Stale,
    /// An entry whose facts match and whose chunks are all stored: its
    /// content, re-used (already referenced and counted).
    Reused(Vec<ContentRef>),
}

impl TreeWalker<'_, '_> {
    fn dir(&mut self, abs: &Path, rel: &[u8]) -> crate::error::Result<Vec<Id>> {
        let mut entries: Vec<_> =
            match fs::read_dir(abs).and_then(|rd| rd.collect::<Result<Vec<_>, _>>()) {
                Ok(v) => v,
                Err(e) => {
                    self.run
                        .summary_mut()
                        .errors
                        .push(format!("{}: {e}", abs.display()));
                    vec![]
                }
            };
        entries.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
        let mut nodes = vec![];
        for window in entries.chunks(WINDOW) {
            self.run.check_cancel()?;
            // lstat relative to the open directory (one name to look up,
            // not the whole path).
            let metas: Vec<_> = window.iter().map(|e| e.metadata()).collect();
            let rels: Vec<Vec<u8>> = window
                .iter()
                .map(|e| {
                    let mut child = rel.to_vec();
                    if !child.is_empty() {
                        child.push(b'/');
                    }
                    child.extend_from_slice(e.file_name().as_bytes());
                    child
                })
                .collect();
            let mut cached = self.look_up(&rels, &metas)?;
            for (i, entry) in window.iter().enumerate() {
                let path = entry.path();
                let name = entry.file_name();
                let meta = match &metas[i] {
                    Ok(m) => m,
                    Err(e) => {
                        self.run
                            .summary_mut()
                            .errors
                            .push(format!("{}: {e}", path.display()));
                        continue;
                    }
                };
                let c = std::mem::replace(&mut cached[i], Cached::None);
                match self.node(&path, &rels[i], name.as_bytes(), meta, c) {
                    Ok(Some(n)) => nodes.push(n),
                    Ok(None) => {}
                    Err(e)
                        if e.downcast_ref::<SourceError>().is_some()
                            || e.downcast_ref::<std::io::Error>().is_some() =>
                    {
                        self.run
                            .summary_mut()
                            .errors
                            .push(format!("{}: {e}", path.display()));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.run.add_tree(&Tree { v: 1, nodes })
    }

    /// The file cache's answer for each entry of a window: one lookup for
    /// the window's files, then one check of the chunks of those whose
    /// stat facts match (see [`BackupRun::reuse_cached_files`]). A later
    /// name of a hard-linked inode is left out: it is recorded as a link.
    fn look_up(
        &mut self,
        rels: &[Vec<u8>],
        metas: &[std::io::Result<fs::Metadata>],
    ) -> crate::error::Result<Vec<Cached>> {
        let mut seen = std::collections::HashSet::new();
        let files: Vec<usize> = (0..rels.len())
            .filter(|&i| match &metas[i] {
                Ok(m) if m.file_type().is_file() => {
                    m.nlink() <= 1
                        || (!self.links.contains_key(&(m.dev(), m.ino()))
                            && seen.insert((m.dev(), m.ino())))
                }
                _ => false,
            })
            .collect();
        let mut out: Vec<Cached> = rels.iter().map(|_| Cached::None).collect();
        if files.is_empty() {
            return Ok(out);
        }
        let asked: Vec<&[u8]> = files.iter().map(|&i| &rels[i][..]).collect();
        let entries = self.run.cached_files(&asked)?;
        let mut matching = vec![];
        for (&i, entry) in files.iter().zip(entries) {
            let Some(entry) = entry else { continue };
            let Ok(m) = &metas[i] else { continue };
            if entry.facts == file_facts(m) {
                matching.push((i, entry));
            } else {
                out[i] = Cached::Stale;
            }
        }
        let batch: Vec<(&[u8], &crate::repo::backup::CachedFile)> =
            matching.iter().map(|(i, e)| (&rels[*i][..], e)).collect();
        let reused = self.run.reuse_cached_files(&batch)?;
        for ((i, entry), ok) in matching.into_iter().zip(reused) {
            out[i] = if ok {
                Cached::Reused(entry.content)
            } else {
                Cached::Stale
            };
        }
        Ok(out)
    }

    fn node(
        &mut self,
        path: &Path,
        rel: &[u8],
        name: &[u8],
        meta: &fs::Metadata,
        cached: Cached,
    ) -> crate::error::Result<Option<Node>> {
        self.run.check_cancel()?;
        let ft = meta.file_type();
        let mut node = Node::new(
            name,
            NodeType::File,
            meta.mode(),
            meta.uid(),
            meta.gid(),
            mtime_ns(meta),
        );
        if ft.is_dir() {
            node.node_type = NodeType::Dir;
            node.subtree = Some(self.dir(path, rel)?);
            self.run.summary_mut().dirs += 1;
        } else if ft.is_symlink() {
            node.node_type = NodeType::Symlink;
            node.set_target(fs::read_link(path)?.as_os_str().as_bytes());
            self.run.summary_mut().symlinks += 1;
        } else if ft.is_file()
            && meta.nlink() > 1
            && self.links.contains_key(&(meta.dev(), meta.ino()))
        {
            // Recorded once: later names of the inode point at the first.
            node.set_hardlink(&self.links[&(meta.dev(), meta.ino())]);
            self.run.summary_mut().hardlinks += 1;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                self.links.insert((meta.dev(), meta.ino()), rel.to_vec());
            }
            let mut size = meta.len();
            node.content = self.file(path, rel, meta, cached, &mut size)?;
            node.size = size;
            self.run.summary_mut().bytes_total += size;
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                node.node_type = NodeType::Fifo;
            } else if ft.is_char_device() {
                node.node_type = NodeType::Chardev;
                node.rdev = Some(meta.rdev());
            } else if ft.is_block_device() {
                node.node_type = NodeType::Blockdev;
                node.rdev = Some(meta.rdev());
            } else {
                self.run
                    .summary_mut()
                    .skipped
                    .push(format!("{}: socket (not backed up)", path.display()));
                return Ok(None);
            }
            self.run.summary_mut().specials += 1;
        }
        Ok(Some(node))
    }

    fn file(
        &mut self,
        path: &Path,
        rel: &[u8],
        meta: &fs::Metadata,
        cached: Cached,
        size: &mut u64,
    ) -> crate::error::Result<Vec<ContentRef>> {
        let facts = file_facts(meta);
        let cached = match cached {
            Cached::Reused(content) => {
                self.run.summary_mut().files_unchanged += 1;
                return Ok(content);
            }
            Cached::Stale => true,
            Cached::None => false,
        };
        let mut f = fs::File::open(path).map_err(|e| SourceError(format!("cannot open: {e}")))?;
        let kind = self.choice.for_path(path);
        let read = self.read_stable(&mut f, path, kind, facts)?;
        *size = read.bytes;
        if cached {
            self.run.summary_mut().files_changed += 1;
        } else {
            self.run.summary_mut().files_new += 1;
        }
        // A file that changed while it was read is not cached: the next run
        // reads it again whatever its size and times say then.
        if let Some(facts) = read.stable {
            self.run.cache_file(rel, &facts, &read.content)?;
        }
        Ok(read.content)
    }

    /// Reads an open file whole, checking that it did not change meanwhile:
    /// size, mtime, ctime and inode through the descriptor after the read
    /// against `before` (the walk's `lstat`, taken before the open, so a
    /// change or a replacement in between is caught too, with one `statx`
    /// per file less than an `fstat` before the read), and the byte count
    /// against the size. A file that changed is read once more;
    /// if it changes again it is recorded as read (its recorded size is
    /// always the number of bytes its content holds) and named in
    /// `summary.changed`, which makes the backup incomplete (exit 3).
    fn read_stable(
        &mut self,
        f: &mut fs::File,
        path: &Path,
        kind: ChunkerKind,
        mut before: FileFacts,
    ) -> crate::error::Result<StableRead> {
        use std::io::{Seek, SeekFrom};
        let fstat = |f: &fs::File| -> crate::error::Result<FileFacts> {
            let m = f
                .metadata()
                .map_err(|e| SourceError(format!("cannot stat: {e}")))?;
            Ok(file_facts(&m))
        };
        let mut attempt = 0;
        loop {
            let start = self.run.summary_mut().bytes_read;
            let content = self.run.add_stream(&mut *f, kind, "read error")?;
            let bytes = self.run.summary_mut().bytes_read - start;
            let after = fstat(f)?;
            if bytes == before.size && after == before {
                return Ok(StableRead {
                    content,
                    bytes,
                    stable: Some(after),
                });
            }
            attempt += 1;
            if attempt >= 2 {
                self.run.summary_mut().changed.push(format!(
                    "{}: changed while it was read (twice); recorded as read: {bytes} bytes",
                    path.display()
                ));
                return Ok(StableRead {
                    content,
                    bytes,
                    stable: None,
                });
            }
            f.seek(SeekFrom::Start(0))
                .map_err(|e| SourceError(format!("cannot re-read: {e}")))?;
            before = after;
        }
    }
}
