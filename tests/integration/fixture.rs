//! A repository written by format version 1, committed under
//! `tests/fixtures/repo-v1`, must stay readable by every later labctl.
//! (Regenerate only for a new format version, with
//! `LABCTL_WRITE_FIXTURE=1 cargo test --test integration write_fixture -- --ignored`.)

use crate::common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1")
}

/// The tree the fixture holds (deterministic).
fn fixture_tree(root: &Path) {
    write(
        &root.join("notes/readme.txt"),
        "labctl fixture v1\n".repeat(50).as_bytes(),
    );
    write(&root.join("data/random.bin"), &noise(300_000, 2026));
    let mut img = vec![0u8; 64 * 1024];
    img[10_000..10_100].copy_from_slice(&[7u8; 100]);
    write(&root.join("vm/disk.img"), &img);
    write(&root.join("empty"), b"");
    std::os::unix::fs::symlink("notes/readme.txt", root.join("link")).unwrap();
    for (p, mode) in [
        ("notes/readme.txt", 0o644),
        ("data/random.bin", 0o600),
        ("vm/disk.img", 0o640),
        ("empty", 0o644),
    ] {
        fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap();
        filetime::set_file_mtime(
            root.join(p),
            filetime::FileTime::from_unix_time(1_790_000_000, 0),
        )
        .unwrap();
    }
    for d in ["notes", "data", "vm"] {
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        filetime::set_file_mtime(
            root.join(d),
            filetime::FileTime::from_unix_time(1_790_000_000, 0),
        )
        .unwrap();
    }
}

#[test]
#[ignore]
fn write_fixture() {
    if std::env::var("LABCTL_WRITE_FIXTURE").is_err() {
        return;
    }
    let dir = fixture_dir();
    assert!(
        !dir.exists(),
        "remove {} first (only for a new format version)",
        dir.display()
    );
    fs::create_dir_all(&dir).unwrap();
    let env = Env::empty();
    let (b, r) = (dir.join("backup.key"), dir.join("restore.key"));
    let out = env
        .cmd()
        .env("LABCTL_REPO", dir.join("repo"))
        .args([
            "repo",
            "init",
            "--no-escrow",
            "--backup-key",
            b.to_str().unwrap(),
            "--restore-key",
            r.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, &["init"]);
    let src = env.path("src");
    fixture_tree(&src);
    let out = env
        .cmd()
        .env("LABCTL_REPO", dir.join("repo"))
        .env("LABCTL_KEY", &b)
        .args([
            "backup",
            "path",
            src.to_str().unwrap(),
            "--host",
            "fixture",
            "--tag",
            "v1",
        ])
        .output()
        .unwrap();
    assert_success(&out, &["backup"]);
}

#[test]
fn format_v1_repository_still_reads() {
    let env = Env::empty();
    // Copy the fixture (git does not keep 0600 on key files).
    let copy = env.path("fixture");
    let status = std::process::Command::new("cp")
        .args([
            "-r",
            fixture_dir().to_str().unwrap(),
            copy.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    for k in ["backup.key", "restore.key"] {
        fs::set_permissions(copy.join(k), fs::Permissions::from_mode(0o600)).unwrap();
    }
    let run = |args: &[&str]| {
        let out = env
            .cmd()
            .env("LABCTL_REPO", copy.join("repo"))
            .env("LABCTL_RESTORE_KEY", copy.join("restore.key"))
            .args(args)
            .output()
            .unwrap();
        assert_success(&out, args);
        out
    };
    run(&["check", "--read-data"]);
    let snaps: serde_json::Value =
        serde_json::from_slice(&run(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps[0]["host"], "fixture");
    assert_eq!(snaps[0]["tags"][0], "v1");
    let expected = env.path("expected");
    fixture_tree(&expected);
    // Both read orders: this repository predates tree blobs in packs of
    // their own, so its packs mix trees and data.
    for order in ["file", "pack"] {
        let target = env.path(&format!("restored-{order}"));
        run(&[
            "restore",
            "latest",
            "--read-order",
            order,
            "--target",
            target.to_str().unwrap(),
        ]);
        assert_same_tree(&expected, &target);
    }
}
