//! The two key roles: the backup key cannot read backed-up data.

use crate::common::*;
use labctl::repo::keys::Keys;
use labctl::repo::{crypto, pack};
use std::fs;
use std::os::unix::fs::PermissionsExt;

#[test]
fn backup_key_alone_cannot_restore_or_read_verify() {
    let env = Env::new();
    let src = env.path("src");
    write(&src.join("a.bin"), &noise(300_000, 1));
    env.backup(&src);
    for args in [
        vec![
            "restore",
            "latest",
            "--target",
            env.path("out").to_str().unwrap(),
        ],
        vec!["restore", "latest", "--stdout", "--path", "a.bin"],
        vec!["check", "--read-data"],
        vec!["ls", "latest"],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("restore key"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!env.path("out").exists());
    // What the backup key can do: back up, list, check.
    env.ok(&["snapshots"]);
    env.ok(&["check"]);
}

#[test]
fn backup_key_cannot_decrypt_any_blob() {
    let env = Env::new();
    let src = env.path("src");
    for i in 0..5u64 {
        write(&src.join(format!("f{i}")), &noise(400_000, i));
    }
    write(
        &src.join("text.txt"),
        "lab notes ".repeat(10_000).as_bytes(),
    );
    env.backup(&src);
    let backup = Keys::load(&env.backup_key).unwrap();
    let restore = Keys::load(&env.restore_key).unwrap();
    assert!(backup.data_identity.is_none());
    let backup_text = fs::read_to_string(&env.backup_key).unwrap();
    let data_secret = crypto::identity_to_string(restore.data_identity.as_ref().unwrap().x25519());
    assert!(
        !backup_text.contains(&data_secret),
        "the backup key file holds no DATA identity"
    );
    let mut blobs = 0;
    for p in env.packs() {
        let bytes = fs::read(&p).unwrap();
        // The backup key reads the trailer (META) ...
        let entries =
            pack::parse_trailer(&bytes, bytes.len() as u64, &backup.meta_identity, "pack")
                .unwrap()
                .unwrap();
        for e in entries {
            let blob = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            // ... but no blob opens with the only secret identity it holds ...
            let err = crypto::decrypt(&backup.meta_identity, blob, "blob").unwrap_err();
            assert_eq!(err.exit_code(), labctl::error::ExitCode::Key);
            // ... while the restore key opens every one, through labctl's
            // caching identity and as a plain age identity (standard age).
            let data = restore.data_identity.as_ref().unwrap();
            let plain = crypto::decrypt(data, blob, "blob").unwrap();
            assert_eq!(crypto::decrypt(data.x25519(), blob, "blob").unwrap(), plain);
            blobs += 1;
        }
    }
    assert!(blobs >= 7);
}

#[test]
fn escrowed_restore_key_recovers_with_passphrase() {
    let env = Env::empty();
    let pass = env.path("pass");
    fs::write(&pass, "correct horse battery staple\n").unwrap();
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).unwrap();
    assert_success(
        &env.init(&["--passphrase-file", pass.to_str().unwrap()]),
        &["repo", "init"],
    );
    let src = env.path("src");
    write(&src.join("x"), b"recover me");
    env.backup(&src);
    let recovered = env.path("recovered.key");
    env.ok(&[
        "key",
        "recover",
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--out",
        recovered.to_str().unwrap(),
    ]);
    assert_eq!(
        fs::metadata(&recovered).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = env
        .cmd()
        .env("LABCTL_RESTORE_KEY", &recovered)
        .args(["restore", "latest", "--stdout", "--path", "x"])
        .output()
        .unwrap();
    assert_success(&out, &["restore"]);
    assert_eq!(out.stdout, b"recover me");
    // A wrong passphrase is a key error.
    let bad = env.path("bad");
    fs::write(&bad, "wrong\n").unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
    let out = env.run(&[
        "key",
        "recover",
        "--passphrase-file",
        bad.to_str().unwrap(),
        "--out",
        env.path("k2").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    // A passphrase file others can read is refused.
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&[
        "key",
        "recover",
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--out",
        env.path("k3").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn escrowed_restore_key_recovers_with_admin_identity() {
    let env = Env::empty();
    let admin = age::x25519::Identity::generate();
    let id_file = env.path("admin.agekey");
    fs::write(
        &id_file,
        format!("# admin\n{}\n", crypto::identity_to_string(&admin)),
    )
    .unwrap();
    fs::set_permissions(&id_file, fs::Permissions::from_mode(0o600)).unwrap();
    let recipient = admin.to_public().to_string();
    assert_success(
        &env.init(&["--admin-recipient", &recipient]),
        &["repo", "init"],
    );
    let out_key = env.path("r.key");
    env.ok(&[
        "key",
        "recover",
        "--identity",
        id_file.to_str().unwrap(),
        "--out",
        out_key.to_str().unwrap(),
    ]);
    let a = Keys::load(&out_key).unwrap();
    let b = Keys::load(&env.restore_key).unwrap();
    assert_eq!(a.to_json(), b.to_json());
}
