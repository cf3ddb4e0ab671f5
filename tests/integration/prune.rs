//! Retention (forget) and garbage collection (prune).

use crate::common::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

fn snapshot_ids(env: &Env) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn prune(env: &Env, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "prune"];
    args.extend_from_slice(extra);
    serde_json::from_slice(&env.ok(&args).stdout).unwrap()
}

fn files(dir: &Path, n: u64, size: usize, seed: u64) {
    for i in 0..n {
        write(&dir.join(format!("f{i:03}")), &noise(size, seed * 1000 + i));
    }
}

#[test]
fn forget_keeps_by_rules_and_explains() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..4u64 {
        write(&src.join("f"), &noise(1000, i));
        env.backup(&src);
    }
    let out = env.ok(&["--json", "forget", "--keep-last", "2", "--dry-run"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = v["decisions"].as_array().unwrap();
    assert_eq!(d.len(), 4);
    assert_eq!(d.iter().filter(|x| x["keep"] == true).count(), 2);
    assert_eq!(d[0]["reasons"][0], "last 2");
    assert_eq!(snapshot_ids(&env).len(), 4, "dry run changes nothing");
    let out = env.ok(&["forget", "--keep-last", "2"]);
    assert!(stdout(&out).contains("2 removed"), "{}", stdout(&out));
    assert_eq!(snapshot_ids(&env).len(), 2);
    // Refuses to forget without any rule.
    assert_eq!(env.run(&["forget"]).status.code(), Some(2));
}

#[test]
fn forget_groups_per_source() {
    let env = Env::new();
    for name in ["a", "b"] {
        let src = env.path(name);
        for i in 0..3u64 {
            write(&src.join("f"), &noise(100, i));
            env.backup(&src);
        }
    }
    env.ok(&["forget", "--keep-last", "1"]);
    assert_eq!(snapshot_ids(&env).len(), 2, "one per source");
}

#[test]
fn prune_marks_then_deletes_after_grace_with_backup_key_only() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    files(&a, 6, 400_000, 1);
    files(&b, 6, 400_000, 2);
    env.backup(&a);
    env.backup(&b);
    let before = env.packs().len();
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]); // one group: keeps b only
    let r = prune(&env, &[]);
    assert!(!r["packs-marked"].as_array().unwrap().is_empty(), "{r}");
    assert!(
        r["packs-deleted"].as_array().unwrap().is_empty(),
        "nothing deleted within the grace period: {r}"
    );
    assert_eq!(env.packs().len(), before);
    env.ok(&["check"]);
    // After the grace period (simulated with --grace 0s) the marked packs go.
    let r = prune(&env, &["--grace", "0s"]);
    let deleted = r["packs-deleted"].as_array().unwrap().len();
    assert!(deleted >= 2, "{r}");
    assert_eq!(env.packs().len(), before - deleted);
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&b, &out);
    // Nothing left to do.
    let r = prune(&env, &["--grace", "0s"]);
    assert!(
        r["packs-marked"].as_array().unwrap().is_empty()
            && r["packs-deleted"].as_array().unwrap().is_empty(),
        "{r}"
    );
}

#[test]
fn prune_repacks_partly_used_packs_by_copying_ciphertext() {
    let env = Env::new();
    let src = env.path("src");
    files(&src, 40, 60_000, 3); // ~2.4 MB in 1 MiB packs: every pack holds many files
    env.backup(&src);
    for i in (0..40).step_by(2) {
        fs::remove_file(src.join(format!("f{i:03}"))).unwrap();
    }
    env.backup(&src);
    env.ok(&["forget", "--keep-last", "1"]);
    let r = prune(&env, &["--repack-threshold", "30%"]);
    assert!(!r["packs-repacked"].as_array().unwrap().is_empty(), "{r}");
    assert!(!r["packs-written"].as_array().unwrap().is_empty(), "{r}");
    let r = prune(&env, &["--grace", "0s"]);
    assert!(!r["packs-deleted"].as_array().unwrap().is_empty(), "{r}");
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

#[test]
fn backups_do_not_deduplicate_against_marked_packs() {
    let env = Env::new();
    let a = env.path("a");
    files(&a, 3, 300_000, 4);
    env.backup(&a);
    env.ok(&["forget", "--keep-last", "1"]); // keeps it
    let b = env.path("b");
    write(&b.join("x"), b"other");
    env.backup(&b);
    // Forget a's snapshot by keeping only the newest overall.
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]);
    prune(&env, &[]); // marks a's packs
                      // Backing up a again stores its chunks anew instead of re-using marked packs...
    let v = env.backup(&a);
    assert!(v["summary"]["chunks-new"].as_u64().unwrap() >= 3, "{v}");
    // ... so the sweep can delete the marked packs without harm.
    let r = prune(&env, &["--grace", "0s"]);
    assert!(!r["packs-deleted"].as_array().unwrap().is_empty(), "{r}");
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&[
        "restore",
        v["snapshot-id"].as_str().unwrap(),
        "--target",
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&a, &out);
}

#[test]
fn a_snapshot_that_appears_during_the_grace_period_saves_its_packs() {
    let env = Env::new();
    let a = env.path("a");
    files(&a, 3, 300_000, 5);
    env.backup(&a);
    // Simulate a backup that deduplicated against these packs before they
    // were marked and wrote its snapshot after: keep the snapshot object aside.
    let snap = list_files(&env.repo.join("snapshots")).pop().unwrap();
    let saved = fs::read(&snap).unwrap();
    let b = env.path("b");
    write(&b.join("x"), b"x");
    env.backup(&b);
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]);
    let r = prune(&env, &[]);
    assert!(!r["packs-marked"].as_array().unwrap().is_empty(), "{r}");
    fs::write(&snap, saved).unwrap(); // the late snapshot lands
    let r = prune(&env, &["--grace", "0s"]);
    assert!(!r["packs-unmarked"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["packs-deleted"].as_array().unwrap().is_empty(), "{r}");
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&[
        "restore",
        &snap.file_name().unwrap().to_string_lossy()[..16],
        "--target",
        out.to_str().unwrap(),
    ]);
    assert_same_tree(&a, &out);
}

#[test]
fn prune_concurrent_with_backup_loses_nothing() {
    let env = Env::new();
    // Something for prune to mark, repack and (with a zero grace) delete.
    let old = env.path("old");
    files(&old, 20, 100_000, 6);
    env.backup(&old);
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]); // keeps it
    let stale = env.path("stale");
    files(&stale, 10, 200_000, 7);
    env.backup(&stale);
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]); // forgets `old`
    prune(&env, &[]); // marks old's packs before the backup starts
    let src = env.path("src");
    files(&src, 16, 2 << 20, 8);
    let mut child = spawn_backup(env.cmd(), &env.backup_key, &src);
    let started = Instant::now();
    let mut rounds = 0;
    while child.try_wait().unwrap().is_none() {
        // Sweeping packs marked before the backup began is safe at any grace.
        let out = env.run(&["-q", "prune", "--grace", "0s"]);
        assert_success(&out, &["prune"]);
        rounds += 1;
        assert!(started.elapsed() < Duration::from_secs(120));
    }
    assert!(child.wait().unwrap().success());
    assert!(rounds >= 1);
    prune(&env, &[]);
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    let out2 = env.path("out2");
    let ids = snapshot_ids(&env);
    env.ok_restore(&["restore", &ids[0], "--target", out2.to_str().unwrap()]);
    assert_same_tree(&stale, &out2);
}

#[test]
fn kill_during_prune_leaves_a_repository_that_passes_check() {
    let env = Env::new();
    let src = env.path("src");
    files(&src, 60, 50_000, 9);
    env.backup(&src);
    for i in (0..60).step_by(3) {
        fs::remove_file(src.join(format!("f{i:03}"))).unwrap();
    }
    env.backup(&src);
    env.ok(&["forget", "--keep-last", "1"]);
    prune(&env, &["--repack-threshold", "10%"]); // marks and repacks
    for delay_ms in (1u64..60).step_by(3) {
        let mut child = env
            .cmd()
            .env("LABCTL_KEY", &env.backup_key)
            .args(["-q", "prune", "--grace", "0s"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let out = env.run(&["check"]);
        assert_success(&out, &["check", "after kill", &delay_ms.to_string()]);
    }
    prune(&env, &["--grace", "0s"]);
    env.ok_restore(&["check", "--read-data"]);
    let out = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

#[test]
fn backups_never_adopt_packs_a_prune_is_deleting() {
    // The window inside a prune after the old index fragments are gone and
    // before the marked packs are: simulate it by removing the index.
    let env = Env::new();
    let a = env.path("a");
    files(&a, 3, 300_000, 11);
    env.backup(&a);
    let b = env.path("b");
    write(&b.join("x"), b"x");
    env.backup(&b);
    env.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]);
    let r = prune(&env, &[]);
    let marked: Vec<String> = r["packs-marked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(!marked.is_empty());
    // b's index survives; every fragment listing a marked pack goes, as in the sweep.
    for f in list_files(&env.repo.join("index")) {
        fs::remove_file(f).unwrap();
    }
    fs::remove_dir_all(&env.cache).unwrap();
    let c = env.path("c");
    write(&c.join("y"), b"y");
    env.backup(&c); // must not adopt the marked packs
    let out = env.ok(&["--json", "check"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = v["warnings"].to_string();
    for p in &marked {
        assert!(
            warnings.contains(p.as_str()),
            "marked pack {p} stays unindexed (not adopted): {warnings}"
        );
    }
}
