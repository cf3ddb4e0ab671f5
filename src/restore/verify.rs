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
