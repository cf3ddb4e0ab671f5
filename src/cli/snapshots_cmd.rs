//! `labctl snapshots` and `labctl ls`.

use super::{print_json, GlobalArgs};
use crate::error::ExitCode;
use crate::repo::extract::{included, Prefetch};
use crate::repo::snapshot::Snapshot;
use crate::repo::tree::{Node, NodeType};
use crate::repo::Id;
use crate::util::units::human_bytes;
use clap::Args;

#[derive(Args, Debug)]
pub struct SnapshotsCmd {
    #[command(flatten)]
    pub filter: SnapshotFilter,
}

use crate::repo::select::SnapshotFilter;

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

pub fn run_snapshots(g: &GlobalArgs, c: SnapshotsCmd) -> crate::error::Result<ExitCode> {
    let repo = g.open(false)?;
    let mut out = vec![];
    for (id, snap) in repo.catalog.snapshot_manifests()? {
        if !c.filter.matches(&snap) {
            continue;
        }
        out.push(Listed { id: id.hex(), snap });
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

/// One `ls` row. In `--json`, `path` (and `target`) are the names as
/// UTF-8 when they are valid UTF-8; otherwise they hold a lossy form (U+FFFD
/// for bad bytes) and `path-base64` (`target-base64`) the raw bytes.
#[derive(serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct Entry<'a> {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path_base64: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: String,
    size: u64,
    mtime_ns: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_base64: Option<String>,
    /// For a hard link: the path recorded first for the same file.
    #[serde(skip_serializing_if = "Option::is_none")]
    hardlink: Option<String>,
    #[serde(skip)]
    raw_path: &'a [u8],
    #[serde(skip)]
    raw_target: Option<Vec<u8>>,
}

/// A string for raw bytes, and the bytes in base64 when they are not UTF-8.
fn text_and_base64(raw: &[u8]) -> (String, Option<String>) {
    use base64::Engine;
    match std::str::from_utf8(raw) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (
            String::from_utf8_lossy(raw).into_owned(),
            Some(base64::engine::general_purpose::STANDARD.encode(raw)),
        ),
    }
}

/// Quotes a name as `ls --quoting-style=shell-escape` does: as it is when
/// every character is harmless, in single quotes when it has spaces or shell
/// characters, and as `$'...'` with escapes when it has control characters,
/// invalid UTF-8 or escape sequences (which would otherwise drive the
/// terminal).
pub fn shell_escape(raw: &[u8]) -> String {
    let text = std::str::from_utf8(raw).ok();
    let plain = |c: char| c.is_alphanumeric() || "%+,-./:=@_^".contains(c);
    if let Some(t) = text {
        if !t.is_empty() && t.chars().all(plain) {
            return t.to_string();
        }
        if !t.chars().any(|c| c.is_control()) {
            return format!("'{}'", t.replace('\'', "'\\''"));
        }
    }
    let mut out = String::from("$'");
    let mut rest = raw;
    while !rest.is_empty() {
        let (ok, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (a, b) = rest.split_at(e.valid_up_to());
                (std::str::from_utf8(a).unwrap_or(""), b)
            }
        };
        for c in ok.chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for byte in c.encode_utf8(&mut b).bytes() {
                        out.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        match bad.first() {
            Some(b) => {
                out.push_str(&format!("\\x{b:02x}"));
                rest = &bad[1..];
            }
            None => rest = &[],
        }
    }
    out.push('\'');
    out
}

/// Entries handed from the walk to the printing thread at a time.
const LS_BATCH: usize = 1024;

/// A listing's entries as the walk found them, on their way to be printed.
type Found = Vec<(Box<Node>, Vec<u8>)>;

pub fn run_ls(g: &GlobalArgs, c: LsCmd) -> crate::error::Result<ExitCode> {
    let repo = g.open(true)?;
    let id: Id = repo.resolve_snapshot(&c.snapshot)?;
    let (snap, _) = repo.load_snapshot(&id)?;
    let filter = c
        .path
        .as_deref()
        .map(|p| p.trim_matches('/').as_bytes().to_vec());
    // This thread walks the trees (reading each directory's subdirectory
    // trees ahead, a batch on worker threads: fetch, decrypt, decompress
    // and parse were two thirds of a million-entry listing's CPU) while
    // another formats and prints what it found, a bounded number of
    // batches behind. Printed batches come back to be freed here: freeing
    // on the printing thread what this one allocated contended for the
    // allocator's lock.
    let (tx, rx) = crossbeam_channel::bounded::<Found>(4);
    let (back_tx, back_rx) = crossbeam_channel::unbounded::<Found>();
    let json = g.json;
    // Sending fails only when the printer stopped; its error is the one
    // reported (below).
    let stopped = || std::io::Error::other("the listing's printer stopped");
    let (walked, printed) = std::thread::scope(|s| {
        let printer = s.spawn(move || print_ls(rx, back_tx, json));
        let mut batch = Vec::with_capacity(LS_BATCH);
        let mut walked = walk_in_path_order(&repo, snap.root, filter.as_deref(), &mut |n, p| {
            batch.push((n, p));
            if batch.len() == LS_BATCH {
                let next = match back_rx.try_recv() {
                    Ok(mut done) => {
                        done.clear();
                        done
                    }
                    Err(_) => Vec::with_capacity(LS_BATCH),
                };
                let full = std::mem::replace(&mut batch, next);
                tx.send(full).map_err(|_| stopped())?;
            }
            Ok(())
        });
        if walked.is_ok() && !batch.is_empty() && tx.send(batch).is_err() {
            walked = Err(stopped().into());
        }
        drop(tx);
        let printed = printer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the listing's printer panicked")));
        (walked, printed)
    });
    // A printer's failure (a closed pipe ends the listing quietly, see
    // main) is what stopped the walk, if anything did.
    printed?;
    walked?;
    Ok(ExitCode::Success)
}

/// Prints the entries `rx` brings, as text or (`json`) one JSON array.
/// Printed batches go back through `back`.
fn print_ls(
    rx: crossbeam_channel::Receiver<Found>,
    back: crossbeam_channel::Sender<Found>,
    json: bool,
) -> std::io::Result<()> {
    use serde::ser::{SerializeSeq as _, Serializer as _};
    use std::io::Write as _;
    // One write per 64 KiB, not per line (stdout is line-buffered: a
    // million-entry listing made a million write calls).
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let each = |print: &mut dyn FnMut(Entry) -> std::io::Result<()>| {
        for batch in &rx {
            for (n, path) in &batch {
                print(entry(n, path))?;
            }
            let _ = back.send(batch);
        }
        Ok::<_, std::io::Error>(())
    };
    if json {
        let mut ser = serde_json::Serializer::pretty(&mut out);
        let mut seq = ser.serialize_seq(None)?;
        each(&mut |e| Ok(seq.serialize_element(&e)?))?;
        seq.end()?;
        writeln!(out)?;
    } else {
        each(&mut |e| {
            let t = e
                .raw_target
                .as_ref()
                .map(|t| format!(" -> {}", shell_escape(t)))
                .or_else(|| {
                    e.hardlink
                        .as_ref()
                        .map(|h| format!(" => {}", shell_escape(h.as_bytes())))
                })
                .unwrap_or_default();
            writeln!(
                out,
                "{:<7} {:>5} {:>10}  {}{}",
                e.kind,
                e.mode,
                e.size,
                shell_escape(e.raw_path),
                t
            )
        })?;
    }
    out.flush()
}

/// What a directory listing holds for the path-ordered walk: an entry to
/// print, or the tree of a subdirectory the walk enters, standing for
/// everything below it.
enum Item {
    Entry(Box<Node>),
    Below(Vec<Id>),
}

/// Calls `emit` for every entry of the tree `root` (only `filter` and what
/// is below it, when given) in the byte order of the full paths, printing
/// as it goes: no list of every entry and no sort of it (a million-file
/// snapshot held 500 MiB and spent a third of its time sorting). Within a
/// directory, an entry sorts by its name and everything below a
/// subdirectory `d` by `d/`: every path below `d` starts with `d/` and no
/// name holds `/`, so the key sorts against each sibling exactly as each
/// of those full paths does (`a`, `a.txt`, `a/x` — `.` is below `/`).
/// Only the trees on the way to `filter` and below it are read.
fn walk_in_path_order(
    repo: &crate::repo::Repository,
    root: Vec<Id>,
    filter: Option<&[u8]>,
    emit: &mut dyn FnMut(Box<Node>, Vec<u8>) -> std::io::Result<()>,
) -> crate::error::Result<()> {
    let join = |prefix: &[u8], name: &[u8]| {
        let mut path = prefix.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        path
    };
    // Shown: the filter itself or below it; read: those and the trees on
    // the way to it (the rule of `restore --include`).
    let filter: Vec<&[u8]> = filter.into_iter().collect();
    // A directory's entries in walk order, with the subdirectories the
    // walk enters, and their trees to read ahead, a batch in parallel.
    let items_of = |tree: crate::repo::tree::Tree, path: &[u8]| {
        let mut items = Vec::with_capacity(tree.nodes.len() + 8);
        for mut n in tree.nodes {
            let name = n.name_bytes();
            if let Some(sub) = n.subtree.take() {
                if included(join(path, &name), &filter).1 {
                    let mut key = name.clone();
                    key.push(b'/');
                    items.push((key, Item::Below(sub)));
                }
            }
            items.push((name, Item::Entry(Box::new(n))));
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let wanted = items
            .iter()
            .filter_map(|(_, item)| match item {
                Item::Below(ids) => Some(ids.clone()),
                Item::Entry(_) => None,
            })
            .collect();
        (items.into_iter(), Prefetch::of(repo, wanted))
    };
    let (items, ahead) = items_of(repo.read_tree(&root)?, &[]);
    let mut stack = vec![(vec![], items, ahead)];
    while let Some((prefix, items, ahead)) = stack.last_mut() {
        let Some((key, item)) = items.next() else {
            stack.pop();
            continue;
        };
        match item {
            Item::Entry(n) => {
                let path = join(prefix, &key);
                if included(&path, &filter).0 {
                    emit(n, path)?;
                }
            }
            Item::Below(ids) => {
                let path = join(prefix, &key[..key.len() - 1]);
                // Not read ahead (or unreadable there): read here, which
                // names what is wrong.
                let tree = match ahead.take(repo, &ids) {
                    Some(t) => t,
                    None => repo.read_tree(&ids)?,
                };
                let (items, ahead) = items_of(tree, &path);
                stack.push((path, items, ahead));
            }
        }
    }
    Ok(())
}

/// One `ls` entry for the node at `path`.
fn entry<'a>(n: &Node, path: &'a [u8]) -> Entry<'a> {
    let kind = match n.node_type {
        NodeType::Dir => "dir",
        NodeType::File => "file",
        NodeType::Symlink => "symlink",
        NodeType::Fifo => "fifo",
        NodeType::Chardev => "chardev",
        NodeType::Blockdev => "blockdev",
    };
    let (text, b64) = text_and_base64(path);
    let raw_target = n.target_bytes();
    let (target, target_base64) = match &raw_target {
        Some(t) => {
            let (t, b) = text_and_base64(t);
            (Some(t), b)
        }
        None => (None, None),
    };
    Entry {
        path: text,
        path_base64: b64,
        kind,
        mode: format!("{:o}", n.mode & 0o7777),
        size: n.size,
        mtime_ns: n.mtime_ns,
        target,
        target_base64,
        hardlink: n
            .hardlink_bytes()
            .map(|h| String::from_utf8_lossy(&h).into_owned()),
        raw_path: path,
        raw_target,
    }
}

#[cfg(test)]
mod tests {
    use super::{shell_escape, text_and_base64};

    #[test]
    fn names_are_quoted_as_ls_shell_escape_does() {
        assert_eq!(shell_escape(b"plain-name_1.txt"), "plain-name_1.txt");
        assert_eq!(shell_escape(b"dir/sub"), "dir/sub");
        assert_eq!(shell_escape(b"with space"), "'with space'");
        assert_eq!(shell_escape(b"it's"), "'it'\\''s'");
        assert_eq!(shell_escape(b"$(rm -rf)"), "'$(rm -rf)'");
        assert_eq!(shell_escape(b"a\nb"), "$'a\\nb'");
        assert_eq!(shell_escape(b"\x1b[31mred"), "$'\\x1b[31mred'");
        assert_eq!(shell_escape(b"bad\xffbyte"), "$'bad\\xffbyte'");
        assert_eq!(shell_escape("café".as_bytes()), "café");
        assert_eq!(text_and_base64(b"ok"), ("ok".to_string(), None));
        assert_eq!(
            text_and_base64(b"\xff"),
            ("\u{fffd}".to_string(), Some("/w==".to_string()))
        );
    }
}
