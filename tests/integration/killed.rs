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
