//! The layout's rules (docs/DEVELOPING.md), checked on the source itself:
//! which module may import which, no import cycles between top-level
//! modules, and a doc comment opening every module file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`repo` for src/repo/x.rs,
/// `error` for src/error.rs).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules a file names as `crate::<module>` in code (not in
/// comments).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    // module -> imported module -> files
    let mut g: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for f in files {
        let m = top_module(&src, &f);
        if m == "main" || m == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for i in imports(&text) {
            if i != m {
                g.entry(m.clone())
                    .or_default()
                    .entry(i)
                    .or_default()
                    .push(f.strip_prefix(&src).unwrap().display().to_string());
            }
        }
        g.entry(m).or_default();
    }
    g
}

#[test]
fn modules_import_only_downwards() {
    let g = graph();
    // What each module may import (besides itself). A module not listed
    // here fails the test: add it, with its place in docs/DEVELOPING.md.
    // `cli` sits on top and may import every module listed; none may
    // import it.
    let allowed: BTreeMap<&str, &[&str]> = [
        ("error", &[][..]),
        ("util", &["error"][..]),
        ("backend", &["error", "util"][..]),
        ("repo", &["error", "util", "backend"][..]),
        ("records", &["error", "util"][..]),
        ("k8s", &["error", "util"][..]),
        ("proxmox", &["error", "util"][..]),
        (
            "sources",
            &["error", "util", "backend", "repo", "k8s", "proxmox"][..],
        ),
        (
            "restore",
            &[
                "error", "util", "backend", "repo", "sources", "k8s", "proxmox",
            ][..],
        ),
        ("policy", &["error", "util", "records", "k8s"][..]),
        ("provision", &["error", "util", "records", "proxmox"][..]),
        (
            "schedule",
            &[
                "error",
                "util",
                "backend",
                "repo",
                "records",
                "sources",
                "restore",
                "k8s",
                "proxmox",
                "provision",
            ][..],
        ),
        (
            "demo",
            &["error", "util", "backend", "repo", "sources", "restore"][..],
        ),
    ]
    .into_iter()
    .collect();
    let mut bad = vec![];
    let everything: Vec<&str> = allowed.keys().copied().collect();
    for (m, deps) in &g {
        let ok = if m == "cli" {
            &everything[..]
        } else if let Some(ok) = allowed.get(m.as_str()) {
            *ok
        } else {
            bad.push(format!("module `{m}` has no place in the layout rules"));
            continue;
        };
        for (d, files) in deps {
            if !ok.contains(&d.as_str()) {
                bad.push(format!("`{m}` imports `{d}` in {}", files.join(", ")));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "layout rules broken:\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn no_import_cycles_between_top_level_modules() {
    let g = graph();
    // Depth-first search for a back edge.
    fn visit(
        g: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flat_map(|d| d.keys()) {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = visit(&g, m, &mut vec![], &mut done) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn every_module_file_opens_with_a_doc_comment() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            !std::fs::read_to_string(f)
                .unwrap()
                .trim_start()
                .starts_with("//!")
        })
        .map(|f| f.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` opening: {missing:?}"
    );
}

#[test]
fn the_rules_see_a_violation() {
    // The checker itself: a line importing upwards is found, comments are not.
    let found = imports("use crate::cli::GlobalArgs;\n// crate::schedule in a comment\n");
    assert_eq!(found, BTreeSet::from(["cli".to_string()]));
}
