//! Deduplication and the file cache.

use crate::common::*;

#[test]
fn unchanged_second_backup_writes_no_pack() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..20u64 {
        write(
            &src.join(format!("d{}/f{i}", i % 3)),
            &noise(50_000 + i as usize * 1000, i),
        );
    }
    let first = env.backup(&src);
    assert_eq!(first["summary"]["files-new"], 20);
    let packs = env.packs();
    let second = env.backup(&src);
    assert_eq!(second["summary"]["files-unchanged"], 20);
    assert_eq!(second["summary"]["chunks-new"], 0);
    assert_eq!(second["summary"]["packs-written"], 0);
    assert_eq!(env.packs(), packs, "no new pack");
    assert_ne!(first["snapshot-id"], second["snapshot-id"]);
}

/// A run's packs enter the catalog with their index fragment, not when
/// written: until then their chunks still deduplicate (a copy later in
/// the same run stores nothing), and afterwards the next run finds them.
#[test]
fn a_copy_later_in_the_run_and_in_the_next_run_is_stored_once() {
    let env = Env::new();
    let src = env.path("src");
    let data = noise(40 << 20, 5);
    write(&src.join("a.bin"), &data);
    write(&src.join("b-copy.bin"), &data);
    let first = env.backup(&src);
    let added = first["summary"]["bytes-added"].as_u64().unwrap();
    assert!(
        first["summary"]["packs-written"].as_u64().unwrap() >= 2,
        "{first}"
    );
    assert!(added < 41 << 20, "the copy was stored again: {first}");
    write(&src.join("c-copy.bin"), &data);
    let second = env.backup(&src);
    // Only the directory listing is new.
    assert!(
        second["summary"]["chunks-new"].as_u64().unwrap() <= 2,
        "{second}"
    );
    assert!(
        second["summary"]["bytes-added"].as_u64().unwrap() < 1 << 20,
        "{second}"
    );
    env.ok_restore(&["check", "--read-data"]);
}

#[test]
fn insertion_near_start_reuses_nearly_all_chunks() {
    let env = Env::new();
    let src = env.path("src");
    let data = noise(24 << 20, 99);
    write(&src.join("big.bin"), &data);
    let first = env.backup(&src);
    let chunks_first = first["summary"]["chunks-new"].as_u64().unwrap();
    assert!(chunks_first >= 10, "{first}");
    let mut changed = data[..5000].to_vec();
    changed.extend_from_slice(b"a few inserted bytes");
    changed.extend_from_slice(&data[5000..]);
    write(&src.join("big.bin"), &changed);
    let second = env.backup(&src);
    assert_eq!(second["summary"]["files-changed"], 1);
    let new = second["summary"]["chunks-new"].as_u64().unwrap();
    // Only the chunk(s) around the insertion (plus the directory tree) are new.
    assert!(new <= 3, "{new} new chunks of {chunks_first}: {second}");
    let raw = second["summary"]["bytes-new-raw"].as_u64().unwrap();
    assert!(raw < 9 << 20, "{raw} bytes new");
}

#[test]
fn changed_image_grows_by_touched_fixed_chunks_only() {
    let env = Env::new();
    let src = env.path("src");
    let mut img = vec![0u8; 16 << 20];
    img[..8 << 20].copy_from_slice(&noise(8 << 20, 5));
    write(&src.join("disk.img"), &img);
    let first = env.backup(&src);
    assert_eq!(
        first["summary"]["chunks-new"].as_u64().unwrap(),
        32 + 1,
        "8 MiB of 256 KiB chunks + tree; zeros elided: {first}"
    );
    // Two scattered 64 KiB writes touch two chunks.
    img[1 << 20..(1 << 20) + 65536].copy_from_slice(&noise(65536, 6));
    img[12 << 20..(12 << 20) + 65536].copy_from_slice(&noise(65536, 7));
    write(&src.join("disk.img"), &img);
    let second = env.backup(&src);
    assert_eq!(
        second["summary"]["chunks-new"].as_u64().unwrap(),
        2 + 1,
        "{second}"
    );
    let out = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("disk.img")).unwrap(), img);
}

#[test]
fn special_files_are_skipped_not_errors() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a.txt"), b"a");
    let sock = std::os::unix::net::UnixListener::bind(src.join("daemon.sock")).unwrap();
    let out = env.ok(&["--json", "backup", "path", src.to_str().unwrap()]);
    drop(sock);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["summary"]["skipped"].to_string().contains("daemon.sock"),
        "{v}"
    );
    assert_eq!(v["summary"]["errors"].as_array().unwrap().len(), 0);
}

/// The file cache is not rewritten per file by an unchanged backup: an
/// entry a run re-uses is marked again only once its mark is 64 runs old,
/// and an entry no run has marked for 128 runs (a deleted file's) goes.
#[test]
fn file_cache_entries_are_marked_rarely_and_dropped_when_stale() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..5u64 {
        write(&src.join(format!("f{i}")), &noise(10_000, i));
    }
    env.backup(&src);
    let db = list_files(&env.cache)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "catalog.db"))
        .unwrap();
    let rows = || -> Vec<(Vec<u8>, i64)> {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut st = c
            .prepare("SELECT path, run FROM file_cache ORDER BY path")
            .unwrap();
        let v = st
            .query_map([], |r| Ok((r.get(0).unwrap(), r.get(1).unwrap())))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        v
    };
    let first = rows();
    assert_eq!(first.len(), 5);
    let run1 = first[0].1;
    let second = env.backup(&src);
    assert_eq!(second["summary"]["files-unchanged"], 5);
    assert_eq!(rows(), first, "an unchanged backup re-uses without writing");
    // Many runs later (other sources count too): f4 is gone.
    std::fs::remove_file(src.join("f4")).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "UPDATE meta SET value=?1 WHERE key='last-run'",
        [(run1 + 200).to_string()],
    )
    .unwrap();
    drop(c);
    let third = env.backup(&src);
    assert_eq!(third["summary"]["files-unchanged"], 4);
    let now = rows();
    assert_eq!(now.len(), 4, "the deleted file's entry is dropped: {now:?}");
    assert!(
        now.iter().all(|(_, run)| *run == run1 + 201),
        "re-used entries are marked again: {now:?}"
    );
}

/// Re-using a file cache entry without looking up its chunks is right
/// only while the catalog has lost no blob and marked no pack since the
/// entry was written: a pack this catalog marks, and packs another host's
/// prune deletes (this catalog reloads the index it replaced), make the
/// files be read again, and the snapshot is whole.
#[test]
fn a_file_whose_chunks_prune_marked_or_deleted_is_read_again() {
    let env = Env::new();
    let src = env.path("src");
    let other = env.path("other");
    write(&src.join("a"), &noise(200_000, 31));
    write(&src.join("b"), &noise(200_000, 32));
    write(&other.join("c"), &noise(1_000, 33));
    let forget_src = |env: &Env, extra: &[&str]| {
        // The host's newest snapshot (other's) stays; src's go, while the
        // file cache keeps src's entries.
        env.backup(&other);
        let mut args = vec!["forget", "--keep-last", "1", "--group-by", "host"];
        args.extend_from_slice(extra);
        env.ok(&args);
    };
    assert_eq!(env.backup(&src)["summary"]["files-new"], 2);
    assert_eq!(env.backup(&src)["summary"]["files-unchanged"], 2);
    // This catalog's prune marks the packs of a and b.
    forget_src(&env, &[]);
    env.ok(&["prune", "--grace", "0s"]);
    let v = env.backup(&src);
    assert_eq!(v["summary"]["files-changed"], 2, "{v}");
    assert_eq!(env.backup(&src)["summary"]["files-unchanged"], 2);
    // Another host's catalog forgets and prunes (marks, then deletes).
    let elsewhere = env.path("other-host-cache");
    let elsewhere = elsewhere.to_str().unwrap();
    forget_src(&env, &["--cache-dir", elsewhere]);
    env.ok(&["prune", "--grace", "0s", "--cache-dir", elsewhere]);
    env.ok(&["prune", "--grace", "0s", "--cache-dir", elsewhere]);
    let v = env.backup(&src);
    assert_eq!(v["summary"]["files-changed"], 2, "{v}");
    // (The forget elsewhere is acknowledged; check reports it otherwise.)
    env.ok(&["catalog", "rebuild"]);
    env.ok_restore(&["check", "--read-data"]);
    let target = env.path("out");
    env.ok_restore(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &target);
}

/// A run that was killed may have cached files whose chunks it never
/// stored: the next run looks them up (and reads the file again). The
/// entries of a run that finished are re-used without a lookup (a finished
/// run stored every chunk it cached; here the chunk is made up, which is
/// how the test sees that no lookup was made).
#[test]
fn entries_of_a_killed_run_are_looked_up_and_a_finished_runs_are_not() {
    use labctl::repo::backup::{BackupOptions, BackupRun};
    use labctl::repo::catalog::FileFacts;
    use labctl::repo::tree::ContentRef;
    let env = Env::new();
    let facts = FileFacts {
        size: 5,
        mtime_ns: 1,
        ctime_ns: 2,
        ino: 3,
    };
    // A chunk no pack holds, as a run killed before storing it leaves.
    let never_stored = [ContentRef::Chunk(labctl::repo::Id([7; 32]))];
    let hidden = labctl::util::progress::Progress::hidden;
    let reused = |run: &mut BackupRun<'_>| {
        let cached = run.cached_files(&[b"f"]).unwrap().pop().flatten().unwrap();
        run.reuse_cached_files(&[(b"f", &cached)]).unwrap()[0]
    };
    for finished in [false, true] {
        let source = format!("finished={finished}");
        // Each run in a process of its own: a repository opened for it.
        let repo = env.open_lib();
        let mut run = BackupRun::start(&repo, 1, hidden()).unwrap();
        run.use_file_cache(&source).unwrap();
        run.cache_file(b"f", &facts, &never_stored).unwrap();
        if finished {
            let empty = labctl::repo::tree::Tree {
                v: 1,
                nodes: vec![],
            };
            let root = run.add_tree(&empty).unwrap();
            let src = labctl::repo::snapshot::Source {
                kind: "path".into(),
                name: source.clone(),
            };
            run.finish(
                src,
                root,
                &BackupOptions::default(),
                std::time::Instant::now(),
            )
            .unwrap();
        } else {
            // Killed after its batch of entries was committed.
            drop(run);
            repo.catalog.commit().unwrap();
        }
        // Each run in a process of its own: a repository opened for it.
        let repo = env.open_lib();
        let mut next = BackupRun::start(&repo, 1, hidden()).unwrap();
        next.use_file_cache(&source).unwrap();
        assert_eq!(reused(&mut next), finished, "{source}");
    }
}
