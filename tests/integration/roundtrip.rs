//! Property tests: any tree or stream round-trips byte-identical.

use crate::common::*;
use labctl::backend::fs::FsBackend;
use labctl::repo::backup::{BackupOptions, ChunkerChoice};
use labctl::repo::chunker::ChunkerParams;
use labctl::repo::extract::{restore_to_dir, restore_to_writer, ReadOrder, RestoreOptions};
use labctl::repo::{init, InitOptions, Repository};
use labctl::sources::path::backup_path;
use labctl::sources::stream::backup_stream;
use labctl::util::progress::Progress;
use proptest::prelude::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

/// A small-chunk repository so that small inputs still span many chunks.
fn repo(dir: &Path) -> Repository {
    let backend = Arc::new(FsBackend::new(dir.join("repo")));
    let opts = InitOptions {
        chunker: ChunkerParams {
            cdc_min: 1024,
            cdc_avg: 4096,
            cdc_max: 16384,
            fixed_size: 4096,
        },
        pack_size: 64 * 1024,
        ..Default::default()
    };
    let keys = init(&*backend, &opts).unwrap();
    Repository::open(backend, keys, &dir.join("cache")).unwrap()
}

#[derive(Debug, Clone)]
enum Entry {
    File {
        data: Vec<u8>,
        mode: u32,
        mtime: i64,
    },
    Symlink(String),
    Dir(u32),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}(\\.[a-z]{1,3})?",
        "[a-zé日本 _-]{1,6}",
        Just("ünïcødé name".to_string()),
        Just("disk.img".to_string()),
    ]
}

fn content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![]),
        prop::collection::vec(any::<u8>(), 0..300),
        (0usize..40_000, any::<u64>()).prop_map(|(n, s)| noise(n, s)),
        // zero runs with data islands, as in disk images
        (2usize..12, any::<u64>()).prop_map(|(n, s)| {
            let mut v = vec![0u8; n * 4096 + 100];
            let isl = noise(3000, s);
            v[4096..7096].copy_from_slice(&isl);
            v
        }),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        4 => (content(), prop::sample::select(vec![0o644u32, 0o600, 0o755, 0o400, 0o4755]), 0i64..2_000_000_000).prop_map(|(data, mode, mtime)| Entry::File { data, mode, mtime }),
        1 => "[a-z/.]{1,12}".prop_map(Entry::Symlink),
        1 => prop::sample::select(vec![0o755u32, 0o700, 0o750]).prop_map(Entry::Dir),
    ]
}

fn tree() -> impl Strategy<Value = Vec<(Vec<String>, Entry)>> {
    prop::collection::vec((prop::collection::vec(name(), 1..4), entry()), 0..14)
}

fn materialise(root: &Path, entries: &[(Vec<String>, Entry)]) {
    fs::create_dir_all(root).unwrap();
    let mut dirs = vec![];
    for (path, e) in entries {
        let mut p = root.to_path_buf();
        for part in &path[..path.len() - 1] {
            p.push(part);
        }
        // Parents must be directories; skip entries that collide with files.
        if fs::create_dir_all(&p).is_err() {
            continue;
        }
        let p = p.join(path.last().unwrap());
        if fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        match e {
            Entry::File { data, mode, mtime } => {
                fs::write(&p, data).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
                filetime::set_file_mtime(
                    &p,
                    filetime::FileTime::from_unix_time(*mtime, 123_456_789),
                )
                .unwrap();
            }
            Entry::Symlink(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
            Entry::Dir(mode) => {
                fs::create_dir(&p).unwrap();
                dirs.push((p, *mode));
            }
        }
    }
    for (p, mode) in dirs {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_tree_round_trips(entries in tree(), by_pack in any::<bool>(), batch_kib in 0u64..4) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        materialise(&src, &entries);
        let repo = repo(dir.path());
        let out = backup_path(&repo, &src, &BackupOptions::default(), Progress::hidden()).unwrap();
        prop_assert!(out.summary.errors.is_empty(), "{:?}", out.summary.errors);
        let target = dir.path().join("target");
        let opts = RestoreOptions {
            read_order: if by_pack { ReadOrder::Pack } else { ReadOrder::File },
            // Tiny batches: packs split between batches, reading while planning.
            batch_bytes: batch_kib * 16 * 1024,
            ..Default::default()
        };
        let rs = restore_to_dir(&repo, &out.snapshot_id, &target, &opts, Progress::hidden()).unwrap();
        prop_assert!(rs.failed.is_empty(), "{:?}", rs.failed);
        let diffs = labctl::restore::verify::compare_trees(&src, &target).unwrap();
        prop_assert!(diffs.is_empty(), "{:?}", diffs);
        // Directory mtimes of the root's children were restored too (compare_trees checks them).
    }

    #[test]
    fn any_stream_round_trips(data in content(), fixed in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let chunker = if fixed { ChunkerChoice::Fixed } else { ChunkerChoice::Cdc };
        let out = backup_stream(&repo, "dump.sql", &data[..], chunker, &BackupOptions::default(), Progress::hidden()).unwrap();
        let mut restored = vec![];
        let n = restore_to_writer(&repo, &out.snapshot_id, None, &mut restored, 0).unwrap();
        prop_assert_eq!(n as usize, data.len());
        prop_assert!(restored == data);
    }
}

#[test]
fn stream_backup_and_restore_via_cli() {
    let env = Env::new();
    let data = noise(3 << 20, 42);
    let mut child = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .args([
            "--json", "backup", "stream", "--name", "etcd.db", "--tag", "etcd",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out, &["backup", "stream"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["snapshot-id"].as_str().unwrap();
    let out = env.ok_restore(&["restore", &id[..12], "--stdout"]);
    assert!(out.stdout == data);
}

#[test]
fn a_relative_directory_on_the_command_line_is_taken_from_the_current_one() {
    let env = Env::new();
    write(&env.path("rel/f"), b"relative");
    let out = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .current_dir(env.dir.path())
        .args(["--json", "backup", "path", "rel", "--tag", "t"])
        .output()
        .unwrap();
    assert_success(&out, &["backup", "path", "rel"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["files-new"], 1, "{v}");
}

#[test]
fn stream_from_a_command_checks_its_exit_status() {
    let env = Env::new();
    let data = env.path("dump");
    write(&data, &noise(1 << 20, 43));
    let out = env.ok(&[
        "--json",
        "backup",
        "stream",
        "--name",
        "db",
        "--",
        "cat",
        data.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["snapshot-id"].as_str().unwrap();
    let restored = env.ok_restore(&["restore", &id[..12], "--stdout"]);
    assert!(restored.stdout == std::fs::read(&data).unwrap());
    // A dump command that fails half-way commits nothing, and says why.
    let out = env.run(&[
        "backup",
        "stream",
        "--name",
        "db",
        "--",
        "sh",
        "-c",
        "head -c 100000 /dev/urandom; echo 'connection lost' >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("connection lost"), "{}", stderr(&out));
    let snaps = env.ok(&["--json", "snapshots"]);
    let list: serde_json::Value = serde_json::from_slice(&snaps.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn partial_restore_of_selected_paths() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a/keep.txt"), b"keep");
    write(&src.join("a/deeper/also.txt"), b"also");
    write(&src.join("b/skip.txt"), b"skip");
    env.backup(&src);
    let target = env.path("t");
    env.ok_restore(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--path",
        "a/deeper",
        "--path",
        "b/skip.txt",
    ]);
    assert_eq!(fs::read(target.join("a/deeper/also.txt")).unwrap(), b"also");
    assert_eq!(fs::read(target.join("b/skip.txt")).unwrap(), b"skip");
    assert!(!target.join("a/keep.txt").exists());
}

/// Owner and mode come back exactly, whichever of them the new file
/// already had: a restore looks first and sets only what differs, and a
/// `chown` (which clears set-user-ID and set-group-ID) is always followed
/// by the mode. Owners only as root.
#[test]
fn owners_and_special_modes_are_restored_exactly() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let root = is_root();
    let me = unsafe { (libc::geteuid(), libc::getegid()) };
    let files: [(&str, u32, (u32, u32)); 5] = [
        ("as-created.txt", 0o644, me),
        ("private.txt", 0o600, me),
        ("setuid-other", 0o4755, if root { (1234, 5678) } else { me }),
        ("setgid-mine", 0o2750, me),
        ("other-plain", 0o644, if root { (4321, 8765) } else { me }),
    ];
    for (name, mode, (uid, gid)) in files {
        write(&src.join(name), name.as_bytes());
        if root {
            std::os::unix::fs::chown(src.join(name), Some(uid), Some(gid)).unwrap();
        }
        fs::set_permissions(src.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    for target in backup_and_restore_both_ways(dir.path(), &src) {
        for (name, mode, (uid, gid)) in files {
            let m = fs::metadata(target.join(name)).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{name} mode");
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{name} owner");
        }
    }
}

/// Subdirectory listings are read ahead in batches as the walk reaches
/// them (not a whole level at once); identical directories share one
/// listing, read again when its batch has passed.
#[test]
fn many_directories_some_identical_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for d in 0..60 {
        let sub = src.join(format!("d{d:02}"));
        fs::create_dir_all(&sub).unwrap();
        match d % 3 {
            0 => {} // empty: all share one listing
            1 => write(&sub.join("same.txt"), b"identical directories"),
            _ => write(&sub.join(format!("f{d}")), &noise(3000, d)),
        }
        write(&sub.join("deeper/x"), format!("{}", d % 2).as_bytes());
    }
    for target in backup_and_restore_both_ways(dir.path(), &src) {
        assert_same_tree(&src, &target);
    }
}

/// Backs `src` up into a repository under `dir` and restores it in both
/// read orders (nothing may fail); the two targets.
fn backup_and_restore_both_ways(dir: &Path, src: &Path) -> Vec<std::path::PathBuf> {
    let repo = repo(dir);
    let out = backup_path(&repo, src, &BackupOptions::default(), Progress::hidden()).unwrap();
    [ReadOrder::File, ReadOrder::Pack]
        .into_iter()
        .enumerate()
        .map(|(i, order)| {
            let target = dir.join(format!("t{i}"));
            let opts = RestoreOptions {
                read_order: order,
                ..Default::default()
            };
            let rs = restore_to_dir(&repo, &out.snapshot_id, &target, &opts, Progress::hidden())
                .unwrap();
            assert!(rs.failed.is_empty(), "{:?}", rs.failed);
            target
        })
        .collect()
}
