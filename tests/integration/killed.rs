//! kill -9 during a backup leaves a consistent repository; the next backup
//! completes and re-uses what was written.

use crate::common::*;
use std::time::{Duration, Instant};

#[test]
fn kill_during_backup_then_check_and_resume() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..12u64 {
        write(&src.join(format!("f{i:02}.bin")), &noise(4 << 20, 100 + i));
    }
    let mut child = spawn_backup(env.cmd(), &env.backup_key, &src);
    let started = Instant::now();
    // Kill as soon as a few packs are stored, well before the end.
    while env.packs().len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "backup too slow to observe"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("backup finished ({status}) before it could be killed; enlarge the data");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let packs_left = env.packs().len();
    assert!(
        list_files(&env.repo.join("snapshots")).is_empty(),
        "no snapshot from a killed run"
    );
    // The repository is consistent: check passes (unindexed packs are only warnings).
    let out = env.ok(&["check"]);
    assert!(
        stderr(&out).contains("not in any index"),
        "{}",
        stderr(&out)
    );
    // The next backup completes and re-uses the packs written before the kill.
    let v = env.backup(&src);
    let new_raw = v["summary"]["bytes-new-raw"].as_u64().unwrap();
    assert!(
        new_raw < 48 << 20,
        "re-used the {packs_left} packs written before the kill: {v}"
    );
    let out = env.ok_restore(&["check", "--read-data"]);
    assert!(
        !stderr(&out).contains("not in any index"),
        "{}",
        stderr(&out)
    );
    let target = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &target);
}

/// A restore killed mid-way (no chance to clean up) leaves its marker in
/// the target, so the half-restored tree is recognisable; a new restore
/// is refused there without --overwrite, and with it completes and takes
/// the marker away. A restore that runs to its end leaves none.
#[test]
fn kill_during_restore_leaves_the_marker_and_overwrite_completes() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..6u64 {
        write(&src.join(format!("big{i}.bin")), &noise(6 << 20, 300 + i));
    }
    env.backup(&src);
    for order in ["file", "pack"] {
        let target = env.path(&format!("out-{order}"));
        let mut child = env
            .cmd()
            .env("LABCTL_RESTORE_KEY", &env.restore_key)
            .args(["-q", "restore", "latest", "--read-order", order, "--target"])
            .arg(&target)
            .spawn()
            .unwrap();
        let marker = target.join(".labctl-restore-incomplete");
        let started = Instant::now();
        // Kill once the marker and a first file are there.
        while !(marker.exists() && list_files(&target).len() >= 2) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{order}: too slow to observe"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{order}: restore finished ({status}) before it could be killed; enlarge the data");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(
            marker.exists(),
            "{order}: the killed restore's marker stays"
        );
        let text = std::fs::read_to_string(&marker).unwrap();
        assert!(text.contains("did not finish"), "{text}");
        let t = target.to_str().unwrap();
        let out = env.run_restore(&["restore", "latest", "--target", t]);
        assert_eq!(out.status.code(), Some(6), "{order}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("was killed before it finished"),
            "{}",
            stderr(&out)
        );
        env.ok_restore(&["restore", "latest", "--target", t, "--overwrite"]);
        assert!(
            !marker.exists(),
            "{order}: a finished restore takes it away"
        );
        assert_same_tree(&src, &target);
    }
}

/// The marker is never written through a symlink left under its name: the
/// restore is refused and the file the link points at keeps its bytes.
#[test]
fn marker_is_never_written_through_a_symlink() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a.txt"), b"data");
    env.backup(&src);
    let target = env.path("out");
    std::fs::create_dir_all(&target).unwrap();
    let victim = env.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, target.join(".labctl-restore-incomplete")).unwrap();
    let t = target.to_str().unwrap();
    let out = env.run_restore(&["restore", "latest", "--target", t, "--overwrite"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(".labctl-restore-incomplete"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!target.join("a.txt").exists(), "nothing restored");
}
