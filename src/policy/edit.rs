//! Editing policy files in place for `labctl profile grant | revoke` and
//! `labctl offboard`: only the lines that change are touched; comments and
//! every other byte stay as they were. Each edit is validated by loading the
//! whole policy again before the file is replaced (atomically); an edit that
//! would make the policy invalid is refused and nothing is written.

use super::{load, Origin, Policy};
use crate::error::LabError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use time::Date;

/// A block-style YAML list item inside a document: lines `[start, end)`.
#[derive(Debug, Clone, Copy)]
struct Item {
    start: usize,
    end: usize,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn is_blank_or_comment(l: &str) -> bool {
    let t = l.trim();
    t.is_empty() || t.starts_with('#')
}

/// The line range of the document that starts at `origin.line` (1-based).
fn doc_range(lines: &[String], origin: &Origin) -> (usize, usize) {
    let start = origin.line - 1;
    let end = lines[start..]
        .iter()
        .position(|l| l.trim_end() == "---")
        .map_or(lines.len(), |i| start + i);
    (start, end)
}

/// Finds `key:` at the top level of the document, and its list items.
fn list_items(
    lines: &[String],
    (start, end): (usize, usize),
    key: &str,
) -> crate::error::Result<Option<(usize, Vec<Item>)>> {
    let Some(k) = (start..end)
        .find(|&i| indent(&lines[i]) == 0 && lines[i].trim_end().starts_with(&format!("{key}:")))
    else {
        return Ok(None);
    };
    let rest = lines[k][key.len() + 1..].trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(LabError::usage(format!(
            "`{key}:` is written in flow style ({rest}); labctl edits only block lists (`- ` items, one per line)"
        ))
        .into());
    }
    let mut items = vec![];
    let mut i = k + 1;
    let mut item_indent = None;
    while i < end {
        let l = &lines[i];
        if is_blank_or_comment(l) {
            i += 1;
            continue;
        }
        let ind = indent(l);
        let t = l.trim_start();
        if ind == 0 {
            break;
        }
        if t.starts_with("- ") || t == "-" {
            let ii = *item_indent.get_or_insert(ind);
            if ind == ii {
                if let Some(last) = items.last_mut() {
                    let last: &mut Item = last;
                    last.end = i;
                }
                items.push(Item { start: i, end });
            }
        }
        i += 1;
    }
    // An item ends at the last non-blank line before the next item or key;
    // trailing blank lines and comments stay outside it.
    let stop = i;
    for (n, it) in items.iter_mut().enumerate() {
        let _ = n;
        let mut e = it.end.min(stop);
        while e > it.start + 1 && is_blank_or_comment(&lines[e - 1]) {
            e -= 1;
        }
        it.end = e;
    }
    Ok(Some((k, items)))
}

/// The value of `field:` inside an item (first line may carry `- field:`).
fn item_field(lines: &[String], it: Item, field: &str) -> Option<String> {
    for l in &lines[it.start..it.end] {
        let t = l.trim_start().trim_start_matches("- ").trim();
        if let Some(v) = t.strip_prefix(&format!("{field}:")) {
            let v = v.split(" #").next().unwrap_or(v).trim();
            return Some(v.trim_matches('"').trim_matches('\'').to_string());
        }
    }
    None
}

fn quote(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-+/".contains(c))
        && !v.starts_with(['-', '@']);
    if plain {
        v.to_string()
    } else {
        serde_json::to_string(v).expect("a string")
    }
}

struct Files {
    texts: BTreeMap<PathBuf, String>,
}

impl Files {
    fn lines(&mut self, f: &Path) -> crate::error::Result<Vec<String>> {
        if !self.texts.contains_key(f) {
            let t = std::fs::read_to_string(f)
                .map_err(|e| LabError::usage(format!("{}: {e}", f.display())))?;
            self.texts.insert(f.to_path_buf(), t);
        }
        Ok(self.texts[f].split('\n').map(String::from).collect())
    }
    fn set(&mut self, f: &Path, lines: Vec<String>) {
        self.texts.insert(f.to_path_buf(), lines.join("\n"));
    }
}

/// Writes the edited files only if the whole policy still validates.
fn commit(dir: &Path, files: &Files, today: Date) -> crate::error::Result<Policy> {
    let mut originals = vec![];
    for (f, text) in &files.texts {
        let old = std::fs::read_to_string(f).unwrap_or_default();
        if old == *text {
            continue;
        }
        let tmp = f.with_extension("yaml.labctl-tmp");
        std::fs::write(&tmp, text)?;
        originals.push((f.clone(), old, tmp));
    }
    for (f, _, tmp) in &originals {
        std::fs::rename(tmp, f)?;
    }
    match load(dir, today) {
        Ok(p) => Ok(p),
        Err(e) => {
            for (f, old, _) in &originals {
                std::fs::write(f, old)?;
            }
            Err(LabError::usage(format!(
                "the edit would make the policy invalid, nothing was changed: {e:#}"
            ))
            .into())
        }
    }
}

/// What a grant does.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrantChange {
    pub file: PathBuf,
    pub action: String,
    pub added_researcher: bool,
}

/// Adds or updates a direct grant of `role` on `profile` to `email`.
///
/// # Errors
/// A usage error when the profile does not exist or the edit is invalid.
#[allow(clippy::too_many_arguments)]
pub fn grant(
    dir: &Path,
    today: Date,
    email: &str,
    profile: &str,
    role: &str,
    expires: Option<&str>,
    reason: Option<&str>,
) -> crate::error::Result<GrantChange> {
    if !super::valid_email(email) {
        return Err(LabError::usage(format!("'{email}' is not an email address")).into());
    }
    let p = load(dir, today)?;
    let (_, origin) = p
        .profiles
        .get(profile)
        .ok_or_else(|| LabError::usage(format!("no Profile '{profile}' in {}", dir.display())))?;
    let mut files = Files {
        texts: BTreeMap::new(),
    };
    let mut added_researcher = false;
    if !p.researchers.contains_key(email) {
        // A new person: a Researcher document beside the others.
        let target = p
            .researchers
            .values()
            .map(|(_, o)| o.file.clone())
            .next()
            .unwrap_or_else(|| dir.join("people.yaml"));
        let mut lines = if target.exists() {
            files.lines(&target)?
        } else {
            vec![String::new()]
        };
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        if !lines.is_empty() {
            lines.push("---".into());
        }
        lines.push("kind: Researcher".into());
        lines.push(format!("email: {}", quote(email)));
        lines.push(String::new());
        files.set(&target, lines);
        added_researcher = true;
    }
    let file = origin.file.clone();
    let mut lines = files.lines(&file)?;
    let range = doc_range(&lines, origin);
    let mut body = vec![format!("role: {role}")];
    if let Some(e) = expires {
        body.push(format!("expires: {e}"));
    }
    if let Some(r) = reason {
        body.push(format!("reason: {}", quote(r)));
    }
    let action;
    match list_items(&lines, range, "grants")? {
        Some((k, items)) => {
            let existing = items
                .iter()
                .find(|it| item_field(&lines, **it, "user").as_deref() == Some(email))
                .copied();
            let ind = items.first().map_or(2, |it| indent(&lines[it.start]));
            let mut new_item = vec![format!("{}- user: {}", " ".repeat(ind), quote(email))];
            new_item.extend(body.iter().map(|b| format!("{}{b}", " ".repeat(ind + 2))));
            match existing {
                Some(it) => {
                    // Keep the item's other fields (notebooks) and comments.
                    let mut kept: Vec<String> = lines[it.start + 1..it.end]
                        .iter()
                        .filter(|l| {
                            let t = l.trim_start();
                            !(t.starts_with("role:")
                                || t.starts_with("expires:")
                                || t.starts_with("reason:"))
                        })
                        .cloned()
                        .collect();
                    let mut repl = new_item.clone();
                    repl.append(&mut kept);
                    lines.splice(it.start..it.end, repl);
                    action = "updated".into();
                }
                None => {
                    let at = items.last().map_or(k + 1, |it| it.end);
                    lines.splice(at..at, new_item);
                    action = "added".into();
                }
            }
        }
        None => {
            let mut at = range.1;
            while at > range.0 && lines[at - 1].trim().is_empty() {
                at -= 1;
            }
            let mut block = vec!["grants:".to_string(), format!("  - user: {}", quote(email))];
            block.extend(body.iter().map(|b| format!("    {b}")));
            lines.splice(at..at, block);
            action = "added".into();
        }
    }
    files.set(&file, lines);
    commit(dir, &files, today)?;
    Ok(GrantChange {
        file,
        action,
        added_researcher,
    })
}

/// Removes the direct grant of `profile` to `email`.
///
/// # Errors
/// A usage error when there is no such grant (naming the group if the
/// access comes through one).
pub fn revoke(
    dir: &Path,
    today: Date,
    email: &str,
    profile: &str,
) -> crate::error::Result<PathBuf> {
    let p = load(dir, today)?;
    let (pr, origin) = p
        .profiles
        .get(profile)
        .ok_or_else(|| LabError::usage(format!("no Profile '{profile}' in {}", dir.display())))?;
    let mut files = Files {
        texts: BTreeMap::new(),
    };
    let file = origin.file.clone();
    let mut lines = files.lines(&file)?;
    let range = doc_range(&lines, origin);
    let found = list_items(&lines, range, "grants")?.and_then(|(_, items)| {
        items
            .into_iter()
            .find(|it| item_field(&lines, *it, "user").as_deref() == Some(email))
    });
    let Some(it) = found else {
        let via: Vec<String> = pr
            .grants
            .iter()
            .filter_map(|g| g.group.as_ref())
            .filter(|g| {
                p.groups
                    .get(*g)
                    .is_some_and(|(grp, _)| grp.members.iter().any(|m| m == email))
            })
            .cloned()
            .collect();
        let why = if via.is_empty() {
            String::new()
        } else {
            format!(" (access comes through group {}: remove them from it, or revoke the group's grant)", via.join(", "))
        };
        return Err(
            LabError::usage(format!("{email} has no direct grant on {profile}{why}")).into(),
        );
    };
    lines.drain(it.start..it.end);
    files.set(&file, lines);
    commit(dir, &files, today)?;
    Ok(file)
}

/// Removes a person everywhere: direct grants, group memberships and their
/// Researcher document. Refused while they own a profile or group.
///
/// # Errors
/// A refusal naming what they own.
pub fn offboard(dir: &Path, today: Date, email: &str) -> crate::error::Result<Vec<String>> {
    let p = load(dir, today)?;
    let owns: Vec<String> = p
        .profiles
        .iter()
        .filter(|(_, (pr, _))| pr.owner == email)
        .map(|(n, _)| format!("profile {n}"))
        .chain(
            p.groups
                .iter()
                .filter(|(_, (g, _))| g.owner == email)
                .map(|(n, _)| format!("group {n}")),
        )
        .collect();
    if !owns.is_empty() {
        return Err(LabError::refused(format!(
            "{email} owns {}: transfer ownership first (owner transfer), then offboard",
            owns.join(", ")
        ))
        .into());
    }
    let mut files = Files {
        texts: BTreeMap::new(),
    };
    let mut done = vec![];
    // Edit bottom-up within each file so earlier line numbers stay valid.
    let mut edits: Vec<(PathBuf, Origin, &str, String)> = vec![];
    for (name, (pr, o)) in &p.profiles {
        if pr.grants.iter().any(|g| g.user.as_deref() == Some(email)) {
            edits.push((
                o.file.clone(),
                o.clone(),
                "grants",
                format!("grant on profile {name}"),
            ));
        }
    }
    for (name, (g, o)) in &p.groups {
        if g.members.iter().any(|m| m == email) {
            edits.push((
                o.file.clone(),
                o.clone(),
                "members",
                format!("member of group {name}"),
            ));
        }
    }
    if let Some((_, o)) = p.researchers.get(email) {
        edits.push((
            o.file.clone(),
            o.clone(),
            "researcher",
            "Researcher entry".into(),
        ));
    }
    edits.sort_by(|a, b| {
        (&a.0, std::cmp::Reverse(a.1.line)).cmp(&(&b.0, std::cmp::Reverse(b.1.line)))
    });
    for (file, origin, key, what) in edits {
        let mut lines = files.lines(&file)?;
        let range = doc_range(&lines, &origin);
        if key == "researcher" {
            // Remove the whole document with one of its separators.
            let (start, end) = range;
            let (from, to) = if end < lines.len() {
                (start, end + 1)
            } else if start > 0 && lines[start - 1].trim_end() == "---" {
                (start - 1, end)
            } else {
                (start, end)
            };
            lines.drain(from..to);
            files.set(&file, lines);
            done.push(what);
            continue;
        }
        if let Some((_, items)) = list_items(&lines, range, key)? {
            for it in items.iter().rev() {
                let matches = if key == "grants" {
                    item_field(&lines, *it, "user").as_deref() == Some(email)
                } else {
                    lines[it.start]
                        .trim_start()
                        .trim_start_matches("- ")
                        .split(" #")
                        .next()
                        .map(|v| v.trim().trim_matches('"'))
                        == Some(email)
                };
                if matches {
                    lines.drain(it.start..it.end);
                }
            }
        }
        files.set(&file, lines);
        done.push(what);
    }
    commit(dir, &files, today)?;
    Ok(done)
}
