//! Located errors: the one message shape every file loader uses
//! (`labctl.toml`, `platform.yaml`, policy files), `file:line[:col]: field
//! `name`: why`, and the helpers that find the line.
//!
//! Must not know any file format's meaning: callers say which field.

use crate::error::LabError;
use std::fmt::Display;

/// A usage error `file:line[:col]: field `field`: why` (a line of 0 means
/// unknown and is still printed, so the shape never changes).
pub fn error(
    file: impl Display,
    line: usize,
    col: Option<usize>,
    field: &str,
    why: impl Display,
) -> LabError {
    match col {
        Some(c) => LabError::usage(format!("{file}:{line}:{c}: field `{field}`: {why}")),
        None => LabError::usage(format!("{file}:{line}: field `{field}`: {why}")),
    }
}

/// Line and column (1-based) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The index (0-based) of the first YAML line `key: value` (quotes and a
/// trailing comment ignored, a leading `- ` allowed; an empty `value`
/// matches any; an empty `key` finds the list item `- value`).
pub fn yaml_line(text: &str, key: &str, value: &str) -> Option<usize> {
    let unquote = |v: &str| v.trim().trim_matches('"').trim_matches('\'').to_string();
    // A quoted key (`"nvidia.com/gpu": 1`) is the same key.
    text.lines().position(|l| {
        let l = l.trim_start().trim_start_matches("- ");
        let l = l.split(" #").next().unwrap_or(l).trim();
        if key.is_empty() {
            return unquote(l) == value;
        }
        l.split_once(':')
            .is_some_and(|(k, v)| unquote(k) == key && (value.is_empty() || unquote(v) == value))
    })
}

/// As [`yaml_line`], for a key inside the block `section:` of the first
/// YAML document of `text` (keys that occur in several sections). A flow
/// mapping on the section's own line (`default: { cpu: "2" }`) is that
/// line; a key not found in the block gives the section's line.
pub fn yaml_line_in(text: &str, section: &str, key: &str, value: &str) -> Option<usize> {
    let doc: Vec<&str> = text.lines().take_while(|l| l.trim() != "---").collect();
    let start = yaml_line(&doc.join("\n"), section, "")?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let head = doc[start];
    if head.contains('{') {
        return Some(start);
    }
    let block: Vec<&str> = doc[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(head))
        .copied()
        .collect();
    Some(yaml_line(&block.join("\n"), key, value).map_or(start, |i| start + 1 + i))
}

/// serde_norway's message without its own location and path prefix (the
/// located error says both).
pub fn yaml_message(e: &serde_norway::Error) -> String {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    match msg.split_once(": ") {
        Some((head, rest)) if !head.contains(' ') => rest.to_string(),
        _ => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_messages() {
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
        let y = "a: 1\nvms:\n  - name: \"web\"  # front\n  - db\n";
        assert_eq!(yaml_line(y, "name", "web"), Some(2));
        assert_eq!(yaml_line(y, "", "db"), Some(3));
        assert_eq!(yaml_line(y, "vms", ""), Some(1));
        assert_eq!(yaml_line(y, "x", ""), None);
        assert_eq!(
            error("f.yaml", 3, None, "vms[0].name", "bad").to_string(),
            "f.yaml:3: field `vms[0].name`: bad"
        );
        assert_eq!(
            error("f.toml", 3, Some(7), "job", "bad").to_string(),
            "f.toml:3:7: field `job`: bad"
        );
    }
}
