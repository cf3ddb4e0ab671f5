//! Bad input and damage: clear errors, documented exit codes, nothing else harmed.

use crate::common::*;
use std::fs;
use std::io::{Seek, SeekFrom, Write};

/// A repository with several files spread over several 1 MiB packs.
fn populated() -> (Env, std::path::PathBuf) {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..8u64 {
        write(&src.join(format!("dir/file{i}.bin")), &noise(700_000, i));
    }
    write(&src.join("small.txt"), b"small file");
    env.backup(&src);
    assert!(env.packs().len() >= 4, "want several packs");
    (env, src)
}

fn pack_holding_most(env: &Env) -> std::path::PathBuf {
    env.packs()
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
}

#[test]
fn corrupted_pack_is_named_with_blobs_snapshots_and_files_and_others_restore() {
    let (env, src) = populated();
    let victim = pack_holding_most(&env);
    let pack_id = victim.file_name().unwrap().to_string_lossy().to_string();
    {
        let mut f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
        f.seek(SeekFrom::Start(2000)).unwrap();
        f.write_all(b"CORRUPTION").unwrap();
    }
    // The structural check cannot see inside packs; read-data does.
    let out = env.run_restore(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&pack_id), "names the pack: {err}");
    assert!(err.contains("damaged blob"), "names the blobs: {err}");
    assert!(
        err.contains("snapshot") && err.contains("dir/file"),
        "names snapshots and files: {err}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&env.run_restore(&["--json", "check", "--read-data"]).stdout)
            .unwrap();
    let damage = &json["damage"][0];
    assert_eq!(damage["pack"], pack_id.as_str());
    let affected: Vec<String> = damage["affected"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!affected.is_empty());
    // Restore, in both read orders: the damaged files are reported, every
    // other file restores intact.
    for order in ["file", "pack"] {
        restore_around_damage(&env, &src, &affected, order);
    }
}

fn restore_around_damage(env: &Env, src: &std::path::Path, affected: &[String], order: &str) {
    let out_dir = env.path(&format!("restored-{order}"));
    let out = env.run_restore(&[
        "restore",
        "latest",
        "--read-order",
        order,
        "--target",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(4), "{order}: {}", stderr(&out));
    let mut intact = 0;
    for i in 0..8u64 {
        let rel = format!("dir/file{i}.bin");
        let restored = out_dir.join(&rel);
        if affected.contains(&rel) {
            assert!(
                !restored.exists(),
                "{order}: {rel} must not be half-written"
            );
            assert!(stderr(&out).contains(&rel), "{}", stderr(&out));
        } else {
            assert_eq!(
                fs::read(&restored).unwrap(),
                fs::read(src.join(&rel)).unwrap(),
                "{order}: {rel}"
            );
            intact += 1;
        }
    }
    assert!(intact > 0);
    assert_eq!(fs::read(out_dir.join("small.txt")).unwrap(), b"small file");
    // No temporary files are left behind.
    assert!(list_files(&out_dir)
        .iter()
        .all(|p| !p.to_string_lossy().contains(".labctl-restore-")));
}

#[test]
fn truncated_pack_fails_check_naming_it() {
    let (env, _) = populated();
    let victim = pack_holding_most(&env);
    let len = fs::metadata(&victim).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(
        err.contains(&victim.file_name().unwrap().to_string_lossy().to_string())
            && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_pack_fails_check_and_names_snapshot() {
    let (env, _) = populated();
    let victim = pack_holding_most(&env);
    fs::remove_file(&victim).unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(4));
    let err = stderr(&out);
    assert!(
        err.contains("missing")
            && err.contains(&victim.file_name().unwrap().to_string_lossy().to_string()),
        "{err}"
    );
    assert!(err.contains("snapshot"), "{err}");
    // The snapshot that lost data is named with how much it lost.
    assert!(
        err.contains("chunk(s) whose data is missing from the repository"),
        "{err}"
    );
}

#[test]
fn missing_snapshot_object_is_an_integrity_error() {
    let (env, _) = populated();
    // A damaged snapshot object is named.
    let snap = list_files(&env.repo.join("snapshots")).pop().unwrap();
    let mut bytes = fs::read(&snap).unwrap();
    let n = bytes.len() - 5;
    bytes[n] ^= 0xff;
    fs::write(&snap, bytes).unwrap();
    fs::remove_dir_all(&env.cache).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&snap.file_name().unwrap().to_string_lossy().to_string()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn wrong_key_is_refused_with_key_exit_code() {
    let (env, _) = populated();
    let other = Env::new();
    let out = env
        .cmd()
        .env("LABCTL_KEY", &other.backup_key)
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));
    let out = env
        .cmd()
        .env("LABCTL_RESTORE_KEY", &other.restore_key)
        .args([
            "restore",
            "latest",
            "--target",
            env.path("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(!env.path("x").exists(), "nothing written");
}

#[test]
fn non_empty_target_is_refused_and_left_alone() {
    let (env, _) = populated();
    let target = env.path("target");
    write(&target.join("keep.txt"), b"precious");
    let out = env.run_restore(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6));
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(list_files(&target), vec![target.join("keep.txt")]);
    // With --overwrite the snapshot lands beside the existing file.
    env.ok_restore(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(fs::read(target.join("keep.txt")).unwrap(), b"precious");
    assert_eq!(fs::read(target.join("small.txt")).unwrap(), b"small file");
}

#[test]
fn a_directory_in_the_way_of_a_file_is_left_alone_in_both_read_orders() {
    let (env, _) = populated();
    for order in ["pack", "file"] {
        let target = env.path(&format!("target-{order}"));
        // small.txt (one blob) and dir/file3.bin (several) are directories here.
        write(&target.join("small.txt/inner"), b"mine");
        write(&target.join("dir/file3.bin/inner"), b"mine too");
        let out = env.run_restore(&[
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap(),
            "--overwrite",
            "--read-order",
            order,
        ]);
        assert_eq!(out.status.code(), Some(4), "{order}: {}", stderr(&out));
        let err = stderr(&out);
        for name in ["small.txt", "dir/file3.bin"] {
            assert!(
                err.contains(&format!("{name}: a directory is in the way")),
                "{order}: {err}"
            );
        }
        assert_eq!(fs::read(target.join("small.txt/inner")).unwrap(), b"mine");
        assert_eq!(
            fs::read(target.join("dir/file3.bin/inner")).unwrap(),
            b"mine too"
        );
        // The other files were restored, and no temporary file is left.
        assert_eq!(
            fs::read(target.join("dir/file0.bin")).unwrap(),
            noise(700_000, 0)
        );
        let names: Vec<String> = list_files(&target)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".labctl-restore")),
            "{names:?}"
        );
        assert_eq!(names.len(), 7 + 2, "{names:?}");
    }
}

#[test]
fn unreadable_source_file_is_reported_and_the_rest_backed_up() {
    // Root reads everything, so the backup runs as an unprivileged user then.
    let env = Env::empty();
    let src = env.path("src");
    write(&src.join("ok.txt"), b"fine");
    write(&src.join("secret.txt"), b"no access");
    let run_as = |args: &[&str]| {
        let mut c = if is_root() {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
            c
        } else {
            std::process::Command::new(BIN)
        };
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", env.dir.path())
            .env("LABCTL_REPO", &env.repo)
            .env("LABCTL_CACHE_DIR", &env.cache)
            .args(args)
            .output()
            .unwrap()
    };
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        for p in [&src, &src.join("ok.txt")] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        }
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o000)).unwrap();
    let (b, r) = (
        env.backup_key.to_str().unwrap(),
        env.restore_key.to_str().unwrap(),
    );
    let out = run_as(&[
        "repo",
        "init",
        "--no-escrow",
        "--backup-key",
        b,
        "--restore-key",
        r,
    ]);
    assert_success(&out, &["init"]);
    let out = run_as(&[
        "--key",
        b,
        "--json",
        "backup",
        "path",
        src.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["summary"]["errors"].to_string();
    assert!(errors.contains("secret.txt"), "{errors}");
    assert_eq!(v["summary"]["files-new"], 1);
    // The snapshot exists and holds the readable file.
    let out = run_as(&["--restore-key", r, "--json", "ls", "latest"]);
    assert_success(&out, &["ls"]);
    assert!(stdout(&out).contains("ok.txt") && !stdout(&out).contains("secret.txt"));
}

#[test]
fn unsupported_repository_scheme_is_a_usage_error() {
    let env = Env::new();
    let out = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .env("LABCTL_REPO", "gs://bucket/prefix")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not supported"), "{}", stderr(&out));
}

/// A small tmpfs mounted for one test (root only: CI runs as root).
struct SmallDisk(std::path::PathBuf);
impl SmallDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> Option<SmallDisk> {
        if !is_root() {
            eprintln!("full-disk test needs root to mount a small tmpfs; skipped");
            return None;
        }
        fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a tmpfs failed");
        Some(SmallDisk(path))
    }
}
impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_fails_cleanly_for_backup_and_restore() {
    let env = Env::empty();
    let Some(_disk) = SmallDisk::mount(env.repo.clone(), "3m") else {
        return;
    };
    assert_success(
        &env.init(&["--no-escrow", "--pack-mib", "1"]),
        &["repo", "init"],
    );
    let src = env.path("src");
    write(&src.join("big.bin"), &noise(8 << 20, 1));
    let out = env.run(&["backup", "path", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pack") && stderr(&out).to_lowercase().contains("space"),
        "{}",
        stderr(&out)
    );
    assert!(list_files(&env.repo.join("snapshots")).is_empty());
    // The repository is still consistent.
    env.ok(&["check"]);

    // Restore onto a full disk: clean failure, no partial or temporary files.
    let env2 = Env::new();
    write(&env2.path("src/big.bin"), &noise(8 << 20, 2));
    env2.backup(&env2.path("src"));
    let target = env2.path("target");
    let Some(_t) = SmallDisk::mount(target.clone(), "3m") else {
        return;
    };
    fs::write(target.join("existing.txt"), b"keep me").unwrap();
    for order in ["file", "pack"] {
        let out = env2.run_restore(&[
            "restore",
            "latest",
            "--read-order",
            order,
            "--target",
            target.to_str().unwrap(),
            "--overwrite",
        ]);
        assert_eq!(out.status.code(), Some(7), "{order}: {}", stderr(&out));
        assert_eq!(
            list_files(&target),
            vec![target.join("existing.txt")],
            "{order}: no partial or temporary files"
        );
        assert_eq!(fs::read(target.join("existing.txt")).unwrap(), b"keep me");
    }

    // Many files filling the disk part way: the writer that hits the full
    // disk stops the others (each removes the file it was writing), the
    // restore ends with the storage error instead of waiting for window
    // tokens that nobody gives back, and every file left is whole.
    let env3 = Env::new();
    for i in 0..48 {
        write(
            &env3.path(&format!("src/d{}/f{i:02}", i % 3)),
            &noise(150 << 10, 100 + i as u64),
        );
    }
    env3.backup(&env3.path("src"));
    let target = env3.path("many");
    let Some(_m) = SmallDisk::mount(target.clone(), "3m") else {
        return;
    };
    let out = env3.run_restore(&[
        "restore",
        "latest",
        "--read-order",
        "file",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let left = list_files(&target);
    assert!(!left.is_empty(), "some files fit before the disk filled");
    for f in left {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        assert!(!name.starts_with(".labctl-restore"), "left behind: {name}");
        let rel = f.strip_prefix(&target).unwrap();
        assert_eq!(
            fs::read(&f).unwrap(),
            fs::read(env3.path("src").join(rel)).unwrap(),
            "{} is cut short",
            rel.display()
        );
    }
}
