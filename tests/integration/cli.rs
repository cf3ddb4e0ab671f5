//! The command-line surface: usage errors, help, man pages, exit codes.

use crate::common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

#[test]
fn wrong_flag_is_a_usage_error() {
    let env = Env::empty();
    let out = env
        .cmd()
        .args(["backup", "path", "--no-such-flag", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));
}

#[test]
fn missing_repository_says_what_to_do() {
    let env = Env::empty();
    let out = env
        .cmd()
        .env_remove("LABCTL_REPO")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out)); // no key given comes first
    let out = env
        .cmd()
        .env("LABCTL_KEY", env.path("nokey"))
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("nokey"), "{}", stderr(&out));
}

#[test]
fn no_repository_at_path_is_a_usage_error() {
    let env = Env::new();
    let out = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .env("LABCTL_REPO", env.path("elsewhere"))
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("repo init"), "{}", stderr(&out));
}

#[test]
fn init_refuses_existing_repository_and_key_files() {
    let env = Env::new();
    let out = env.run(&[
        "repo",
        "init",
        "--no-escrow",
        "--backup-key",
        env.path("b2").to_str().unwrap(),
        "--restore-key",
        env.path("r2").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let other = Env::empty();
    let out = other.run(&[
        "repo",
        "init",
        "--no-escrow",
        "--backup-key",
        env.backup_key.to_str().unwrap(),
        "--restore-key",
        other.restore_key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // Without escrow choice, init explains the choice.
    let out = other.init(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--no-escrow"));
}

#[test]
fn init_writes_private_key_files_and_says_where_they_go() {
    let env = Env::empty();
    let out = env.init(&["--no-escrow"]);
    assert_success(&out, &["repo", "init"]);
    for k in [&env.backup_key, &env.restore_key] {
        assert_eq!(fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let text = stdout(&out);
    assert!(
        text.contains("backup host") && text.contains("offline"),
        "{text}"
    );
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let env = Env::new();
    fs::set_permissions(&env.backup_key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(5));
    let err = stderr(&out);
    assert!(err.contains("chmod 600"), "{err}");
    // The error never shows key material.
    assert!(!err.contains("AGE-SECRET-KEY"), "{err}");
}

#[test]
fn help_teaches_and_lists_exit_codes() {
    let env = Env::empty();
    let out = env.cmd().arg("--help").output().unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("Exit codes")
            && text.contains("LABCTL_RESTORE_KEY")
            && text.contains("labctl demo"),
        "{text}"
    );
}

#[test]
fn completions_cover_every_command_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_success(&out, &["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        for word in [
            "backup",
            "restore",
            "provision",
            "profile",
            "restore-key",
            "keep-within",
        ] {
            assert!(text.contains(word), "{shell}: no {word}");
        }
    }
    let out = std::process::Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_are_current() {
    let dir = tempfile::tempdir().unwrap();
    labctl::cli::write_man_pages(dir.path()).unwrap();
    let man = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(dir.path()),
        names(&man),
        "man/ is stale: run `cargo run -- generate-man man`"
    );
    for name in names(dir.path()) {
        assert_eq!(
            fs::read(dir.path().join(&name)).unwrap(),
            fs::read(man.join(&name)).unwrap(),
            "man/{name} is stale: run `cargo run -- generate-man man`"
        );
    }
}

#[test]
fn json_outputs_parse() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a.txt"), b"hello");
    let summary = env.backup(&src);
    assert_eq!(summary["summary"]["files-new"], 1);
    let snaps: serde_json::Value =
        serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["id"], summary["snapshot-id"]);
    let ls: serde_json::Value =
        serde_json::from_slice(&env.ok_restore(&["--json", "ls", "latest"]).stdout).unwrap();
    assert_eq!(ls[0]["path"], "a.txt");
    let check: serde_json::Value =
        serde_json::from_slice(&env.ok(&["--json", "check"]).stdout).unwrap();
    assert_eq!(check["errors"].as_array().unwrap().len(), 0);
}

#[test]
fn snapshot_filters() {
    let env = Env::new();
    let a = env.path("a");
    let b = env.path("b");
    write(&a.join("f"), b"1");
    write(&b.join("f"), b"2");
    env.ok(&[
        "backup",
        "path",
        a.to_str().unwrap(),
        "--tag",
        "nightly",
        "--host",
        "h1",
    ]);
    env.ok(&[
        "backup",
        "path",
        b.to_str().unwrap(),
        "--tag",
        "weekly",
        "--host",
        "h2",
    ]);
    let count = |args: &[&str]| {
        let mut all = vec!["--json", "snapshots"];
        all.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_slice(&env.ok(&all).stdout).unwrap();
        v.as_array().unwrap().len()
    };
    assert_eq!(count(&[]), 2);
    assert_eq!(count(&["--tag", "nightly"]), 1);
    assert_eq!(count(&["--host", "h2"]), 1);
    assert_eq!(
        count(&["--source", fs::canonicalize(&a).unwrap().to_str().unwrap()]),
        1
    );
    assert_eq!(count(&["--tag", "none"]), 0);
}

#[test]
fn demo_runs_the_main_job() {
    let env = Env::empty();
    let state = env.path("state");
    let out = env
        .cmd()
        .args([
            "--json",
            "demo",
            "--state-dir",
            state.to_str().unwrap(),
            "--sample-mib",
            "4",
        ])
        .output()
        .unwrap();
    assert_success(&out, &["demo"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], true, "{v}");
    assert_same_tree(
        &state.join("sample"),
        std::path::Path::new(v["staging"].as_str().unwrap()),
    );
    // The whole story: one restore point of the tree, the dump and (etcd
    // is installed by the test command) a live etcd member, restored into
    // staging in order, each verified, with the RTO.
    let kinds: Vec<&str> = v["restore"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["etcd", "path", "stream"], "{v}");
    assert!(v["restore"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["outcome"] == "restored" && s["verified"].is_string()));
    assert!(v["restore"]["seconds"].as_f64().unwrap() > 0.0);
    assert!(v["point"].as_str().unwrap().starts_with("demo-"));
    // A second run reuses the repository and restores the new point.
    let out = env
        .cmd()
        .args(["--json", "demo", "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out, &["demo (again)"]);
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(w["point"], v["point"]);
    assert_eq!(w["verified"], true);
}

#[test]
fn catalog_rebuild_recreates_everything_from_the_repository() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..6u64 {
        write(&src.join(format!("f{i}")), &noise(300_000, i));
    }
    env.backup(&src);
    // Lose the catalog entirely (a new machine), then rebuild.
    fs::remove_dir_all(&env.cache).unwrap();
    let out = env.ok(&["--json", "catalog", "rebuild"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshots"], 1);
    assert!(v["packs"].as_u64().unwrap() >= 2);
    // The rebuilt index deduplicates: nothing new is stored.
    let packs = env.packs();
    let second = env.backup(&src);
    assert_eq!(second["summary"]["chunks-new"], 0, "{second}");
    assert_eq!(env.packs(), packs);
    env.ok(&["check"]);
}

#[test]
fn read_data_subset_reads_a_share_of_packs() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..10u64 {
        write(&src.join(format!("f{i}")), &noise(600_000, 70 + i));
    }
    env.backup(&src);
    let packs = env.packs().len() as u64;
    let read = |pct: &str| {
        let out = env.ok_restore(&["--json", "check", "--read-data-subset", pct]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["packs-read"].as_u64().unwrap()
    };
    assert_eq!(read("100%"), packs);
    assert!(read("0.001%") < packs);
    for bad in ["abc", "0%", "150%"] {
        let out = env.run_restore(&["check", "--read-data-subset", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
}

/// `ls` lists in the byte order of full paths (`.` and `-` sort below
/// `/`, so `a.txt` comes between the directory `a` and what is in it),
/// text and `--json` alike, and `--path` lists a subtree and nothing else.
#[test]
fn ls_lists_in_path_order_and_path_limits_it() {
    let env = Env::new();
    let src = env.path("src");
    for f in ["a/x", "a/y/z", "a.txt", "a-b", "a0", "b/c", "ab/q", "a/y.q"] {
        write(&src.join(f), f.as_bytes());
    }
    env.backup(&src);
    let paths = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.rsplit("  ").next().unwrap().to_string())
            .collect()
    };
    let text = paths(&stdout(&env.ok_restore(&["ls", "latest"])));
    let mut sorted = text.clone();
    sorted.sort();
    assert_eq!(text, sorted);
    assert_eq!(
        text,
        ["a", "a-b", "a.txt", "a/x", "a/y", "a/y.q", "a/y/z", "a0", "ab", "ab/q", "b", "b/c"]
    );
    let json: serde_json::Value =
        serde_json::from_slice(&env.ok_restore(&["--json", "ls", "latest"]).stdout).unwrap();
    let json: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(json, text);
    let sub = paths(&stdout(&env.ok_restore(&["ls", "latest", "--path", "a/y"])));
    assert_eq!(sub, ["a/y", "a/y/z"]);
    let none = env.ok_restore(&["--json", "ls", "latest", "--path", "nothing/here"]);
    assert_eq!(stdout(&none).trim(), "[]");
}

/// `ls` writes its listing in blocks; a reader that stops early (`| head`)
/// ends it quietly with exit 0, and a full listing has every entry.
#[test]
fn ls_of_many_entries_is_complete_and_a_closed_pipe_ends_it_quietly() {
    use std::io::{BufRead, Read};
    let env = Env::new();
    let src = env.path("src");
    // Two levels of more directories than `ls` reads ahead at once, and
    // more entries than it hands its printer at once.
    let mut want = std::collections::BTreeSet::new();
    for i in 0..3000 {
        let (d, e) = (format!("d{}", i % 7), format!("d{}/e{}", i % 7, i % 5));
        let f = format!("{e}/f{i:04}");
        write(&src.join(&f), b"x");
        want.extend([d, e, f]);
    }
    env.backup(&src);
    let all = stdout(&env.ok_restore(&["ls", "latest"]));
    let listed: Vec<&str> = all
        .lines()
        .map(|l| l.rsplit("  ").next().unwrap())
        .collect();
    assert_eq!(listed.len(), 3000 + 7 + 35, "every file and directory");
    assert!(
        listed.iter().copied().eq(want.iter().map(|p| p.as_str())),
        "every path once, in path order:\n{}",
        &all[..400]
    );
    let mut child = env
        .cmd()
        .env("LABCTL_RESTORE_KEY", &env.restore_key)
        .args(["ls", "latest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("dir"), "{first}");
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
}
