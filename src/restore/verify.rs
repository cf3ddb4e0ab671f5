//! Verification of a restore: the restored tree against the source (or an
//! expected tree), file by file: type, content, mode, symlink target and
//! modification time.
//!
//! Must not write anything: it only reads both trees.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Compares two trees: types, content, permission bits, file mtimes and
/// symlink targets. Returns the differences (empty when identical).
///
/// # Errors
/// I/O errors reading either tree.
pub fn compare_trees(a: &Path, b: &Path) -> crate::error::Result<Vec<String>> {
    let mut diffs = vec![];
    compare_dir(a, b, Path::new(""), &mut diffs)?;
    Ok(diffs)
}

fn compare_dir(
    a: &Path,
    b: &Path,
    rel: &Path,
    diffs: &mut Vec<String>,
) -> crate::error::Result<()> {
    let names = |d: &Path| -> crate::error::Result<Vec<std::ffi::OsString>> {
        let mut v: Vec<_> = fs::read_dir(d)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    };
    let (na, nb) = (names(a)?, names(b)?);
    if na != nb {
        diffs.push(format!(
            "{}: entries differ: {:?} vs {:?}",
            rel.display(),
            na,
            nb
        ));
        return Ok(());
    }
    for name in na {
        let (pa, pb, r) = (a.join(&name), b.join(&name), rel.join(&name));
        let (ma, mb) = (fs::symlink_metadata(&pa)?, fs::symlink_metadata(&pb)?);
        if ma.file_type() != mb.file_type() {
            diffs.push(format!("{}: type differs", r.display()));
            continue;
        }
        if ma.file_type().is_symlink() {
            if fs::read_link(&pa)? != fs::read_link(&pb)? {
                diffs.push(format!("{}: symlink target differs", r.display()));
            }
            continue;
        }
        if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
            diffs.push(format!(
                "{}: mode {:o} vs {:o}",
                r.display(),
                ma.mode() & 0o7777,
                mb.mode() & 0o7777
            ));
        }
        if ma.is_dir() {
            compare_dir(&pa, &pb, &r, diffs)?;
            if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
                diffs.push(format!("{}: directory mtime differs", r.display()));
            }
        } else {
            if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
                diffs.push(format!("{}: mtime differs", r.display()));
            }
            if ma.file_type().is_file() {
                if ma.len() != mb.len() || !same_content(&pa, &pb)? {
                    diffs.push(format!("{}: content differs", r.display()));
                }
            } else if ma.rdev() != mb.rdev() {
                diffs.push(format!("{}: device number differs", r.display()));
            }
        }
    }
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> crate::error::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }
}

/// Checks a restored tree against the snapshot's listing: every entry is
/// there with its type, size and permission bits (setuid/setgid may have
/// been cleared), and symlinks point where they did. File contents were
/// checked against their chunk IDs as they were written. Returns what was
/// checked, in words.
///
/// # Errors
/// An integrity error listing the first differences; storage and key
/// errors reading the listing.
pub fn tree_against_snapshot(
    repo: &crate::repo::Repository,
    id: &crate::repo::Id,
    dir: &Path,
) -> crate::error::Result<String> {
    let (snap, _) = repo.load_snapshot(id)?;
    let mut problems = vec![];
    let mut entries = 0u64;
    let mut stack = vec![(snap.root.clone(), dir.to_path_buf())];
    while let Some((chunks, at)) = stack.pop() {
        let tree = repo.read_tree(&chunks)?;
        for node in tree.nodes {
            use crate::repo::tree::NodeType;
            entries += 1;
            let p = at.join(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&node.name_bytes()),
            );
            let Ok(m) = fs::symlink_metadata(&p) else {
                problems.push(format!("{}: missing", p.display()));
                continue;
            };
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
            let type_ok = match node.node_type {
                NodeType::Dir => ft.is_dir(),
                NodeType::File => ft.is_file(),
                NodeType::Symlink => ft.is_symlink(),
                NodeType::Fifo => ft.is_fifo(),
                NodeType::Chardev => ft.is_char_device(),
                NodeType::Blockdev => ft.is_block_device(),
            };
            if !type_ok {
                problems.push(format!("{}: not a {:?}", p.display(), node.node_type));
                continue;
            }
            if !ft.is_symlink() && m.mode() & 0o777 != node.mode & 0o777 {
                problems.push(format!(
                    "{}: mode {:o}, the snapshot says {:o}",
                    p.display(),
                    m.mode() & 0o777,
                    node.mode & 0o777
                ));
            }
            match node.node_type {
                NodeType::File if node.hardlink.is_none() && m.len() != node.size => {
                    problems.push(format!(
                        "{}: {} bytes, the snapshot says {}",
                        p.display(),
                        m.len(),
                        node.size
                    ))
                }
                NodeType::Symlink => {
                    let want = node.target_bytes().unwrap_or_default();
                    let got = fs::read_link(&p)?;
                    if got.as_os_str().as_encoded_bytes() != want.as_slice() {
                        problems.push(format!("{}: symlink target differs", p.display()));
                    }
                }
                NodeType::Dir => {
                    if let Some(sub) = node.subtree {
                        stack.push((sub, p));
                    }
                }
                _ => {}
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(10);
        return Err(crate::error::LabError::integrity(format!(
            "the restored tree {} differs from snapshot {} in {n} entries: {}",
            dir.display(),
            id.short(),
            problems.join("; ")
        ))
        .into());
    }
    Ok(format!(
        "{entries} entries present with their type, size and mode"
    ))
}
