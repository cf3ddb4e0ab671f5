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
