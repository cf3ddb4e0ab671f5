//! Integrity under change and tampering: what is recorded is what was read,
//! and a repository an attacker edited is refused, never trusted.

use crate::common::*;
use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The size `ls --json` shows for `path` in the latest snapshot.
fn recorded_size(env: &Env, path: &str) -> u64 {
    let out = env.ok_restore(&["--json", "ls", "latest"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in the snapshot: {v}"))["size"]
        .as_u64()
        .unwrap()
}

/// Appends to `path` until `stop` is set (at most 256 MiB).
fn appender(path: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        // Far slower than any backup reads (0.8 MB/s), so each read reaches
        // the end, yet every read of 24 MiB sees the file grow.
        let block = noise(4 << 10, 77);
        let mut written = 0usize;
        while !stop.load(Ordering::Relaxed) && written < 256 << 20 {
            f.write_all(&block).unwrap();
            written += block.len();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })
}

/// Backs up `src` (one encoder thread, `--json`) while `writer` changes it,
/// then stops the writer.
fn backup_while(
    env: &Env,
    src: &std::path::Path,
    writer: std::thread::JoinHandle<()>,
    stop: &AtomicBool,
) -> std::process::Output {
    let out = env.run(&[
        "--json",
        "backup",
        "path",
        src.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    out
}

/// Restores `latest` into `<prefix><order>` with that read order and
/// `extra` flags; asserts success when `ok`.
fn restore_in_order(
    env: &Env,
    prefix: &str,
    order: &str,
    extra: &[&str],
    ok: bool,
) -> (std::path::PathBuf, std::process::Output) {
    let t = env.path(&format!("{prefix}{order}"));
    let mut args = vec![
        "restore",
        "latest",
        "--target",
        t.to_str().unwrap(),
        "--read-order",
        order,
    ];
    args.extend_from_slice(extra);
    let out = if ok {
        env.ok_restore(&args)
    } else {
        env.run_restore(&args)
    };
    (t, out)
}

/// Restores `latest` three ways (pack order, file order, `--stdout`) and
/// returns the three copies of `name`.
fn restore_three_ways(env: &Env, name: &str) -> [Vec<u8>; 3] {
    let mut out = vec![];
    for order in ["pack", "file"] {
        let (target, _) = restore_in_order(env, "restored-", order, &[], true);
        out.push(fs::read(target.join(name)).unwrap());
    }
    let o = env.ok_restore(&["restore", "latest", "--stdout", "--path", name]);
    out.push(o.stdout);
    out.try_into().unwrap()
}

#[test]
fn a_file_growing_during_the_backup_is_recorded_as_read_and_reported() {
    let env = Env::new();
    let src = env.path("src");
    let log = src.join("app.log");
    write(&log, &noise(24 << 20, 1));
    write(&src.join("steady"), b"steady");
    let stop = Arc::new(AtomicBool::new(false));
    let t = appender(log.clone(), stop.clone());
    let out = backup_while(&env, &src, t, &stop);
    // The log grew during both reads: a warning, exit 3, the file named.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changed = summary["summary"]["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{summary}");
    assert!(changed[0].as_str().unwrap().contains("app.log"));
    let size = recorded_size(&env, "app.log");
    // Append-only: what was read is a prefix of what the file holds now.
    let now = fs::read(&log).unwrap();
    assert!(size >= 24 << 20 && (size as usize) <= now.len());
    for copy in restore_three_ways(&env, "app.log") {
        assert_eq!(copy.len() as u64, size);
        assert!(copy == now[..size as usize], "restored bytes differ");
    }
    env.ok_restore(&["check", "--read-data"]);
}

#[test]
fn a_file_truncated_and_refilled_during_the_backup_never_gets_invented_bytes() {
    let env = Env::new();
    let src = env.path("src");
    let f = src.join("data.bin");
    write(&f, &noise(40 << 20, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let big = noise(40 << 20, 2);
            while !stop.load(Ordering::Relaxed) {
                let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
                h.set_len(5 << 20).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(3));
                fs::write(&f, &big).unwrap();
            }
        })
    };
    let out = backup_while(&env, &src, t, &stop);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{}",
        stderr(&out)
    );
    let size = recorded_size(&env, "data.bin");
    let truth = noise(40 << 20, 2);
    for copy in restore_three_ways(&env, "data.bin") {
        // Whatever moment was read, the copy has the recorded size and is
        // a prefix of the real content: never zeros the file did not hold.
        assert_eq!(copy.len() as u64, size);
        assert!(copy == truth[..copy.len()], "restored bytes were invented");
    }
    env.ok_restore(&["check", "--read-data"]);
}

/// Rewrites the repository's config object with `f` applied to its text.
fn tamper_config(env: &Env, f: impl Fn(&str) -> String) {
    let path = env.repo.join("config");
    let text = fs::read_to_string(&path).unwrap();
    let new = f(&text);
    assert_ne!(new, text, "the edit changed nothing");
    fs::write(&path, new).unwrap();
}

#[test]
fn a_config_changed_in_storage_is_refused_by_every_command() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("disk.img"), &noise(1 << 20, 3));
    env.backup(&src);
    // A zero fixed chunk size would record images as all zeros.
    tamper_config(&env, |t| {
        t.replace("\"fixed-size\": 262144", "\"fixed-size\": 524288")
    });
    for args in [
        vec!["backup", "path", src.to_str().unwrap()],
        vec!["snapshots"],
        vec!["check"],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("not the one this key file was made with"),
            "{}",
            stderr(&out)
        );
    }
    let out = env.run_restore(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn an_impossible_config_is_refused_even_with_an_old_key_file() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a"), b"a");
    // A key file from before configs were pinned: no config-hash.
    for key in [&env.backup_key, &env.restore_key] {
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(key).unwrap()).unwrap();
        assert!(v.as_object_mut().unwrap().remove("config-hash").is_some());
        fs::write(key, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
    let out = env.ok(&["--json", "check"]);
    assert!(stdout(&out).contains("does not pin the repository config"));
    for (from, to, field) in [
        ("\"fixed-size\": 262144", "\"fixed-size\": 0", "chunker"),
        ("\"cdc-max\": 4194304", "\"cdc-max\": 1024", "chunker"),
        (
            "\"compression-level\": 3",
            "\"compression-level\": 99",
            "compression-level",
        ),
        ("\"pack-size\": 1048576", "\"pack-size\": 0", "pack-size"),
    ] {
        let original = fs::read(env.repo.join("config")).unwrap();
        tamper_config(&env, |t| t.replace(from, to));
        let out = env.run(&["backup", "path", src.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(4), "{to}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("field '{field}' is invalid")),
            "{to}: {}",
            stderr(&out)
        );
        fs::write(env.repo.join("config"), original).unwrap();
    }
    env.ok(&["backup", "path", src.to_str().unwrap()]);
}

#[test]
fn a_catalog_resync_never_shows_another_reader_an_empty_index() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..300u64 {
        write(&src.join(format!("f{i}")), &noise(2000, i));
    }
    env.backup(&src);
    let chunks = {
        let r = env.open_lib();
        let id = r.resolve_snapshot("latest").unwrap();
        r.load_snapshot(&id).unwrap().1
    };
    assert!(chunks.len() > 300);
    let stop = AtomicBool::new(false);
    let misses = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Another process's view of the same cache, reloading its index
            // as it does when prune replaced fragments.
            let w = env.open_lib();
            for _ in 0..40 {
                w.sync_index(true).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
        });
        s.spawn(|| {
            let r = env.open_lib();
            while !stop.load(Ordering::SeqCst) {
                for c in &chunks {
                    if r.catalog.blob(c).unwrap().is_none() {
                        misses.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    });
    assert_eq!(
        misses.load(Ordering::SeqCst),
        0,
        "a reader saw chunks vanish"
    );
}

#[test]
fn url_typos_and_credentials_in_repository_urls_are_refused() {
    let env = Env::empty();
    let init = |url: &str| {
        env.cmd()
            .current_dir(env.dir.path())
            .args([
                "repo",
                "init",
                "--no-escrow",
                "--repo",
                url,
                "--backup-key",
                env.backup_key.to_str().unwrap(),
                "--restore-key",
                env.restore_key.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    for (url, want) in [
        ("s3:/mybucket/lab", "did you mean s3://mybucket/lab?"),
        ("s3//mybucket/lab", "did you mean s3://mybucket/lab?"),
        ("s3:mybucket", "did you mean s3://mybucket?"),
        ("file:/srv/repo", "did you mean file:///srv/repo?"),
    ] {
        let out = init(url);
        assert_eq!(out.status.code(), Some(2), "{url}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{url}: {}", stderr(&out));
        for made in ["s3:", "s3", "file:"] {
            assert!(!env.dir.path().join(made).exists(), "{url} created {made}");
        }
    }
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLE";
    for url in [
        format!("s3://AKIAEXAMPLE:{secret}@bucket/prefix"),
        format!("s3:/AKIAEXAMPLE:{secret}@bucket/prefix"),
    ] {
        let out = init(&url);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(!stderr(&out).contains(secret), "{}", stderr(&out));
        assert!(stderr(&out).contains("credentials"), "{}", stderr(&out));
    }
    // A local directory with ':' in its name is still possible, spelled ./
    let out = init("./odd:name");
    assert_success(&out, &["repo", "init", "./odd:name"]);
}

/// Writes a snapshot whose root tree is `nodes` (JSON), with one data chunk
/// `data` that nodes may reference as `"CHUNK"`, through the library.
fn crafted_snapshot(env: &Env, nodes: serde_json::Value, data: &[u8]) {
    use labctl::repo::backup::{BackupOptions, BackupRun};
    use labctl::repo::blob::BlobKind;
    let repo = env.open_lib();
    let mut run = BackupRun::start(&repo, 1, labctl::util::progress::Progress::hidden()).unwrap();
    let chunk = run.add_chunk(BlobKind::Data, data.to_vec(), 3).unwrap();
    let text = serde_json::json!({"v": 1, "nodes": nodes})
        .to_string()
        .replace("\"CHUNK\"", &format!("\"{}\"", chunk.hex()));
    let root = run.add_chunk(BlobKind::Tree, text.into_bytes(), 3).unwrap();
    run.finish(
        labctl::repo::snapshot::Source {
            kind: "path".into(),
            name: "crafted".into(),
        },
        vec![root],
        &BackupOptions::default(),
        std::time::Instant::now(),
    )
    .unwrap();
}

fn file_node(name: &str, size: usize) -> serde_json::Value {
    serde_json::json!({"name": name, "type": "file", "mode": 0o100644, "uid": 0, "gid": 0,
        "mtime-ns": 0, "size": size, "content": ["CHUNK"]})
}

#[test]
fn a_name_with_a_nul_byte_is_skipped_and_the_rest_restored() {
    let env = Env::new();
    let data = b"hello";
    crafted_snapshot(
        &env,
        serde_json::json!([file_node("a\u{0}b", 5), file_node("ok", 5)]),
        data,
    );
    for order in ["pack", "file"] {
        let (target, out) = restore_in_order(&env, "t-", order, &[], false);
        assert_eq!(out.status.code(), Some(4), "{order}: {}", stderr(&out));
        assert!(stderr(&out).contains("unsafe name"), "{}", stderr(&out));
        assert_eq!(fs::read(target.join("ok")).unwrap(), data);
        assert_eq!(list_files(&target).len(), 1);
    }
}

#[test]
fn a_recorded_size_that_disagrees_with_the_content_is_reported_never_padded() {
    // As snapshots of labctl before 0.1 could hold for a file that shrank.
    let env = Env::new();
    crafted_snapshot(&env, serde_json::json!([file_node("short", 40)]), b"12345");
    for order in ["pack", "file"] {
        let (target, out) = restore_in_order(&env, "t-", order, &[], false);
        assert_eq!(out.status.code(), Some(4), "{order}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("records 40 bytes"),
            "{}",
            stderr(&out)
        );
        assert_eq!(fs::read(target.join("short")).unwrap(), b"12345");
    }
    let out = env.run_restore(&["restore", "latest", "--stdout"]);
    assert_eq!(out.status.code(), Some(4));
    let out = env.run_restore(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stdout(&out).contains("records 40 bytes but its chunks hold 5")
            || stderr(&out).contains("records 40 bytes but its chunks hold 5"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn the_catalog_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("secret-project-name.txt"), b"x");
    env.backup(&src);
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.cache), 0o700);
    let mut dbs = 0;
    for d in fs::read_dir(&env.cache).unwrap() {
        let d = d.unwrap().path();
        assert_eq!(mode(&d), 0o700, "{}", d.display());
        for f in fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            assert_eq!(mode(&f), 0o600, "{}", f.display());
            dbs += 1;
        }
    }
    assert!(dbs >= 1);
}

#[test]
fn check_notices_a_snapshot_deleted_behind_its_back() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a"), b"one");
    env.backup(&src);
    write(&src.join("a"), b"two");
    let second = env.backup(&src)["snapshot-id"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&["snapshots"]);
    fs::remove_file(env.repo.join("snapshots").join(&second)).unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains(&second) && text.contains("is gone"), "{text}");
    // Acknowledged by a rebuild.
    env.ok(&["catalog", "rebuild"]);
    env.ok(&["check"]);
    // A forget through labctl is not reported.
    write(&src.join("a"), b"three");
    env.backup(&src);
    env.ok(&["forget", "--keep-last", "1"]);
    env.ok(&["check"]);
}

#[test]
fn prune_removes_what_killed_backups_leave_after_the_grace_period() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("kept"), &noise(300_000, 1));
    env.backup(&src);
    let index_before: Vec<_> = list_files(&env.repo.join("index"));
    let packs_before = env.packs();
    // Packs written, then the process died before its index and snapshot:
    // written through the library, then the index fragment and snapshot
    // removed again (and the catalog told, as a fresh machine would be).
    {
        let dir = env.path("src2");
        write(&dir.join("lost"), &noise(3 << 20, 9));
        let repo = env.open_lib();
        let out = labctl::sources::path::backup_path(
            &repo,
            &dir,
            &Default::default(),
            labctl::util::progress::Progress::hidden(),
        )
        .unwrap();
        fs::remove_file(env.repo.join("snapshots").join(out.snapshot_id.hex())).unwrap();
    }
    for f in list_files(&env.repo.join("index")) {
        if !index_before.contains(&f) {
            fs::remove_file(f).unwrap();
        }
    }
    env.ok(&["catalog", "rebuild"]);
    let orphans = env.packs().len() - packs_before.len();
    assert!(orphans >= 2, "{orphans}");
    // A write killed before its rename.
    let tmp = env.repo.join("packs").join(".tmp-00112233aabbccdd");
    fs::write(&tmp, noise(1000, 5)).unwrap();
    let out = env.ok(&["check"]);
    assert!(stdout(&out).contains("not in any index") || stderr(&out).contains("not in any index"));
    // Unindexed for less than an hour: a backup could still be writing
    // them, so not even a zero grace period touches them.
    let out = env.ok(&["prune", "--grace", "0s"]);
    assert!(stdout(&out).contains("no index lists"), "{}", stdout(&out));
    env.ok(&["prune", "--grace", "0s"]);
    let left = env.packs();
    assert!(left.len() >= packs_before.len() + orphans, "{left:?}");
    assert!(tmp.exists(), "a fresh temporary file was removed");
    // An hour later (as the catalog saw it): marked, then swept.
    let db = list_files(&env.cache)
        .into_iter()
        .find(|p| p.file_name().unwrap() == "catalog.db")
        .unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("UPDATE uploads_seen SET first_seen = first_seen - 7200", [])
        .unwrap();
    let hour_ago = filetime::FileTime::from_unix_time(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 7200,
        0,
    );
    filetime::set_file_mtime(&tmp, hour_ago).unwrap();
    env.ok(&["prune", "--grace", "0s"]);
    env.ok(&["prune", "--grace", "0s"]);
    assert!(!tmp.exists(), "the temporary file survived");
    let mut left = env.packs();
    left.retain(|p| {
        !p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp-")
    });
    assert_eq!(left, packs_before, "orphan packs survived");
    let out = env.ok(&["check"]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!text.contains("not in any index"), "{text}");
    let restored = env.path("restored");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
}

#[test]
fn a_damaged_or_deleted_index_fragment_is_worked_around_and_repaired() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("big"), &noise(3 << 20, 4));
    write(&src.join("small"), b"small");
    env.backup(&src);
    let fragments = list_files(&env.repo.join("index"));
    assert_eq!(fragments.len(), 1);
    let frag = &fragments[0];
    let mut bytes = fs::read(frag).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    fs::write(frag, &bytes).unwrap();
    // A fresh cache: every command used to stop at "damaged ciphertext".
    fs::remove_dir_all(&env.cache).unwrap();
    let out = env.run(&["catalog", "rebuild"]);
    assert_success(&out, &["catalog", "rebuild"]);
    assert!(stderr(&out).contains("is damaged"), "{}", stderr(&out));
    let restored = env.path("r1");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("corrupted"), "{}", stderr(&out));
    // Repaired with the backup key; the damaged fragment stays for the operator.
    let out = env.ok(&["repair", "index"]);
    assert!(stdout(&out).contains("wrote index/"), "{}", stdout(&out));
    assert!(frag.exists());
    fs::remove_file(frag).unwrap();
    fs::remove_dir_all(&env.cache).unwrap();
    env.ok_restore(&["check", "--read-data"]);

    // A fragment deleted outright: restore still finds the packs.
    for f in list_files(&env.repo.join("index")) {
        fs::remove_file(f).unwrap();
    }
    fs::remove_dir_all(&env.cache).unwrap();
    let restored = env.path("r2");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
    let out = env.run_restore(&["restore", "latest", "--stdout", "--path", "small"]);
    assert_success(&out, &["restore --stdout"]);
    assert_eq!(out.stdout, b"small");
}

#[test]
fn no_setuid_restores_without_the_setuid_and_setgid_bits() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("tool"), b"#!/bin/sh\n");
    fs::set_permissions(src.join("tool"), fs::Permissions::from_mode(0o6755)).unwrap();
    env.backup(&src);
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let full = env.path("full");
    env.ok_restore(&["restore", "latest", "--target", full.to_str().unwrap()]);
    assert_eq!(mode(&full.join("tool")), 0o6755);
    for order in ["pack", "file"] {
        let (t, _) = restore_in_order(&env, "staging-", order, &["--no-setuid"], true);
        assert_eq!(mode(&t.join("tool")), 0o755);
    }
}

#[test]
fn sparse_files_come_back_sparse_in_both_read_orders() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // 64 MiB with 4 KiB of data in it, not named like an image.
    let f = fs::File::create(src.join("sparse.dat")).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(4096, 8), 40 << 20).unwrap();
    drop(f);
    env.backup(&src);
    for order in ["pack", "file"] {
        let (t, _) = restore_in_order(&env, "t-", order, &[], true);
        let m = fs::metadata(t.join("sparse.dat")).unwrap();
        assert_eq!(m.len(), 64 << 20);
        // Allocated: the data's blocks and the chunk around them at most.
        assert!(
            m.blocks() * 512 < 16 << 20,
            "{order}: {} bytes allocated",
            m.blocks() * 512
        );
        let back = fs::read(t.join("sparse.dat")).unwrap();
        assert_eq!(&back[40 << 20..(40 << 20) + 4096], &noise(4096, 8)[..]);
        assert!(back[..40 << 20].iter().all(|&b| b == 0));
    }
}

#[test]
fn fifos_and_device_nodes_are_recorded_and_recreated() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("plain"), b"x");
    let mk = |name: &str, kind: libc::mode_t, dev: libc::dev_t| {
        let c = std::ffi::CString::new(src.join(name).to_str().unwrap()).unwrap();
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), kind | 0o640, dev) },
            0,
            "{name}"
        );
    };
    mk("pipe", libc::S_IFIFO, 0);
    if is_root() {
        mk("null-like", libc::S_IFCHR, libc::makedev(1, 3));
        mk("loop-like", libc::S_IFBLK, libc::makedev(7, 42));
    }
    let summary = env.backup(&src);
    let expected = if is_root() { 3 } else { 1 };
    assert_eq!(summary["summary"]["specials"], expected, "{summary}");
    let out = env.ok_restore(&["ls", "latest"]);
    assert!(stdout(&out).contains("fifo"), "{}", stdout(&out));
    for order in ["pack", "file"] {
        let (t, _) = restore_in_order(&env, "t-", order, &[], true);
        assert_same_tree(&src, &t);
    }
}

#[test]
fn hard_links_are_recorded_once_and_restored_as_links() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a/data.bin"), &noise(500_000, 11));
    fs::create_dir_all(src.join("b")).unwrap();
    fs::hard_link(src.join("a/data.bin"), src.join("b/same.bin")).unwrap();
    fs::hard_link(src.join("a/data.bin"), src.join("zz-third")).unwrap();
    let summary = env.backup(&src);
    assert_eq!(summary["summary"]["hardlinks"], 2, "{summary}");
    assert_eq!(summary["summary"]["bytes-total"], 500_000, "{summary}");
    let out = env.ok_restore(&["ls", "latest"]);
    assert!(stdout(&out).contains("=> a/data.bin"), "{}", stdout(&out));
    for order in ["pack", "file"] {
        let (t, _) = restore_in_order(&env, "t-", order, &[], true);
        assert_same_tree(&src, &t);
        let ino = fs::metadata(t.join("a/data.bin")).unwrap().ino();
        assert_eq!(fs::metadata(t.join("b/same.bin")).unwrap().ino(), ino);
        assert_eq!(fs::metadata(t.join("zz-third")).unwrap().nlink(), 3);
    }
    let out = env.ok_restore(&["restore", "latest", "--stdout", "--path", "b/same.bin"]);
    assert_eq!(out.stdout, noise(500_000, 11));
    // Only the link's path restored: its first name is not part of the
    // restore, so the content comes back there as a file.
    let t = env.path("partial");
    env.ok_restore(&[
        "restore",
        "latest",
        "--target",
        t.to_str().unwrap(),
        "--path",
        "b",
    ]);
    assert_eq!(fs::read(t.join("b/same.bin")).unwrap(), noise(500_000, 11));
    assert!(!t.join("a").exists());
}

/// The packs holding only directory listings, read from the catalog.
fn tree_packs(env: &Env) -> Vec<std::path::PathBuf> {
    let repo = env.open_lib();
    env.packs()
        .into_iter()
        .filter(|p| {
            let id = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(labctl::repo::Id::from_hex);
            let entries = repo.catalog.pack_entries(&id.unwrap()).unwrap();
            !entries.is_empty()
                && entries
                    .iter()
                    .all(|e| e.kind == labctl::repo::blob::BlobKind::Tree)
        })
        .collect()
}

#[test]
fn losing_one_tree_pack_keeps_every_snapshot_restorable() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("big"), &noise(2 << 20, 13));
    for d in ["a", "a/b", "a/b/c", "d"] {
        write(&src.join(d).join("f"), d.as_bytes());
    }
    env.backup(&src);
    let trees = tree_packs(&env);
    assert_eq!(trees.len(), 2, "each listing is in two packs: {trees:?}");
    let out = env.ok(&["check"]);
    assert!(!stderr(&out).contains("single copy"), "{}", stderr(&out));

    // One tree pack lost: restore (with and without the catalog) and ls
    // still see every directory, and check says what is lost: nothing.
    fs::remove_file(&trees[0]).unwrap();
    let restored = env.path("r1");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
    fs::remove_dir_all(&env.cache).unwrap();
    let restored = env.path("r2");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
    let ls = stdout(&env.ok_restore(&["ls", "latest"]));
    assert!(ls.contains("a/b/c/f"), "{ls}");
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("missing from storage"), "{err}");
    assert!(err.contains("repair index"), "{err}");
    assert!(!err.contains("whose data is missing"), "{err}");
    assert!(
        err.contains("5 directory listing(s) have a single copy"),
        "{err}"
    );

    // repair index drops the lost pack and writes the second copies.
    let out = env.ok(&["repair", "index"]);
    let text = stdout(&out);
    assert!(text.contains("dropped pack"), "{text}");
    assert!(
        text.contains("wrote 5 copies of directory listings"),
        "{text}"
    );
    let out = env.ok_restore(&["check", "--read-data"]);
    assert!(!stderr(&out).contains("single copy"), "{}", stderr(&out));
    assert_eq!(tree_packs(&env).len(), 2);

    // The other original is lost too: the repaired copy serves.
    fs::remove_file(&trees[1]).unwrap();
    fs::remove_dir_all(&env.cache).unwrap();
    let restored = env.path("r3");
    env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    assert_same_tree(&src, &restored);
    // Prune, too, writes the copy a listing lacks (it keeps two of each).
    let out = env.ok(&["prune", "--grace", "0s"]);
    assert!(
        stdout(&out).contains("did write 5 copies of directory listings"),
        "{}",
        stdout(&out)
    );
    let out = env.ok(&["prune", "--grace", "0s"]);
    assert!(
        !stdout(&out).contains("of directory listings"),
        "{}",
        stdout(&out)
    );
    env.ok(&["repair", "index"]);
    env.ok_restore(&["check", "--read-data"]);
}

#[test]
fn prune_keeps_two_copies_of_listings_through_repacks() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..40 {
        write(&src.join(format!("d{i}/f")), format!("{i}").as_bytes());
    }
    env.backup(&src);
    // A second snapshot sharing half the listings, then the first forgotten:
    // the tree packs become partly unused and are repacked.
    for i in 0..20 {
        fs::remove_dir_all(src.join(format!("d{i}"))).unwrap();
    }
    env.backup(&src);
    env.ok(&["forget", "--keep-last", "1"]);
    let out = env.ok(&[
        "--json",
        "prune",
        "--grace",
        "0s",
        "--repack-threshold",
        "1%",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!r["packs-repacked"].as_array().unwrap().is_empty(), "{r}");
    let out = env.ok(&["prune", "--grace", "0s"]);
    assert!(stdout(&out).contains("did delete"), "{}", stdout(&out));
    let out = env.ok_restore(&["check", "--read-data"]);
    assert!(!stderr(&out).contains("single copy"), "{}", stderr(&out));
    // Every pack but one can go and the structure survives.
    for lost in tree_packs(&env) {
        let kept = env.path("kept");
        fs::rename(&lost, &kept).unwrap();
        fs::remove_dir_all(&env.cache).unwrap();
        let restored = env.path("r");
        env.ok_restore(&["restore", "latest", "--target", restored.to_str().unwrap()]);
        assert_same_tree(&src, &restored);
        fs::remove_dir_all(&restored).unwrap();
        fs::rename(&kept, &lost).unwrap();
    }
}
