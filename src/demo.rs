//! `labctl demo`: the main job end to end on an embedded default.
//!
//! In a state directory: create a local repository (once) with its key
//! files, generate a sample tree (once) shaped like the lab's data (a disk
//! image with zero runs, text, repeated blocks, nested directories, a
//! symlink, unicode names), back it up, restore the latest snapshot into a
//! fresh staging directory, and verify the restore byte for byte.

use crate::backend::fs::FsBackend;
use crate::repo::backup::BackupOptions;
use crate::repo::extract::{restore_to_dir, RestoreOptions};
use crate::repo::keys::Keys;
use crate::repo::snapshot::BackupSummary;
use crate::repo::{self, InitOptions, Repository};
use crate::restore::verify::compare_trees;
use crate::sources::path::backup_path;
use crate::util::progress::Progress;
use anyhow::Context;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DemoReport {
    pub repository: PathBuf,
    pub sample: PathBuf,
    pub sample_bytes: u64,
    pub snapshot: String,
    pub backup: BackupSummary,
    pub staging: PathBuf,
    pub restored_files: u64,
    pub verified: bool,
    pub differences: Vec<String>,
}

/// Runs the demo in `state`.
///
/// # Errors
/// Any failure of init, backup or restore.
pub fn run(state: &Path, sample_mib: u64, talk: bool) -> crate::error::Result<DemoReport> {
    let say = |s: String| {
        if talk {
            eprintln!("demo: {s}");
        }
    };
    fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    fs::set_permissions(state, fs::Permissions::from_mode(0o700))?;
    let repo_dir = state.join("repository");
    let restore_key = state.join("restore.key");
    let backup_key = state.join("backup.key");
    if !restore_key.exists() {
        let pass = state.join("escrow.pass");
        let passphrase = format!("demo-{:032x}", rand::random::<u128>());
        fs::write(&pass, format!("{passphrase}\n"))?;
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o600))?;
        let backend = FsBackend::new(&repo_dir);
        let keys = repo::init(
            &backend,
            &InitOptions {
                passphrase: Some(passphrase),
                ..Default::default()
            },
        )?;
        keys.to_backup().save(&backup_key)?;
        keys.save(&restore_key)?;
        say(format!(
            "created repository {} with backup key {} and restore key {}",
            repo_dir.display(),
            backup_key.display(),
            restore_key.display()
        ));
    } else {
        say(format!("using existing repository {}", repo_dir.display()));
    }
    let sample = state.join("sample");
    if !sample.exists() {
        let n = generate_sample(&sample, sample_mib)?;
        say(format!(
            "generated a {} MiB sample tree in {}",
            n >> 20,
            sample.display()
        ));
    }
    let cache = state.join("cache");
    // Back up with the backup key only, as a backup host would.
    let backend: Arc<dyn crate::backend::Backend> = Arc::new(FsBackend::new(&repo_dir));
    let repo = Repository::open(backend.clone(), Keys::load(&backup_key)?, &cache)?;
    let progress = Progress::bytes(talk, "backup", None);
    let out = backup_path(
        &repo,
        &sample,
        &BackupOptions {
            tags: vec!["demo".into()],
            ..Default::default()
        },
        progress,
    )?;
    let s = &out.summary;
    say(format!(
        "backed up {} ({} new, {} changed, {} unchanged files) as snapshot {}: {} added to the repository",
        crate::util::units::human_bytes(s.bytes_total),
        s.files_new,
        s.files_changed,
        s.files_unchanged,
        out.snapshot_id.short(),
        crate::util::units::human_bytes(s.bytes_added)
    ));
    drop(repo);
    // Restore with the restore key into a fresh staging directory.
    let staging = state.join("staging");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    let repo = Repository::open(backend, Keys::load(&restore_key)?, &cache)?;
    let progress = Progress::bytes(talk, "restore", Some(s.bytes_total));
    let rs = restore_to_dir(
        &repo,
        &out.snapshot_id,
        &staging,
        &RestoreOptions::default(),
        progress,
    )?;
    say(format!(
        "restored {} files into {}",
        rs.files,
        staging.display()
    ));
    let differences = compare_trees(&sample, &staging)?;
    let verified = differences.is_empty() && rs.failed.is_empty();
    say(if verified {
        "verified: the staging tree is byte-identical to the sample (content, modes, mtimes, symlinks)".to_string()
    } else {
        format!("VERIFY FAILED: {} difference(s)", differences.len())
    });
    Ok(DemoReport {
        repository: repo_dir,
        sample: sample.clone(),
        sample_bytes: s.bytes_total,
        snapshot: out.snapshot_id.hex(),
        backup: out.summary.clone(),
        staging,
        restored_files: rs.files,
        verified,
        differences,
    })
}

/// Writes a reproducible sample tree of about `mib` MiB; returns its size.
///
/// # Errors
/// I/O errors.
pub fn generate_sample(dir: &Path, mib: u64) -> crate::error::Result<u64> {
    fs::create_dir_all(dir.join("vm"))?;
    fs::create_dir_all(dir.join("mlflow/artifacts/run-1"))?;
    fs::create_dir_all(dir.join("notebooks/ünïcødé"))?;
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let mut total = 0u64;
    // A disk image: half zero runs, random blocks and repeated blocks.
    let img_size = (mib / 2).max(1) << 20;
    let mut f = fs::File::create(dir.join("vm/disk.img"))?;
    let block = 64 * 1024;
    let mut repeated = vec![0u8; block];
    rng.fill(&mut repeated);
    let mut buf = vec![0u8; block];
    for i in 0..img_size / block as u64 {
        match i % 4 {
            0 | 1 => buf.fill(0),
            2 => rng.fill(&mut buf),
            _ => buf.copy_from_slice(&repeated),
        }
        f.write_all(&buf)?;
    }
    total += img_size;
    // Text-like files.
    let words = [
        "epoch",
        "loss",
        "accuracy",
        "model",
        "gpu",
        "batch",
        "learning-rate",
        "kubeflow",
        "mlflow",
        "run",
    ];
    let text_total = (mib / 2).max(1) << 20;
    let mut written = 0u64;
    let mut n = 0;
    while written < text_total {
        let mut s = String::new();
        let size = 1000 + (rng.next() % 200_000) as usize;
        while s.len() < size {
            s.push_str(words[(rng.next() % words.len() as u64) as usize]);
            s.push(if rng.next().is_multiple_of(12) {
                '\n'
            } else {
                ' '
            });
        }
        let sub = if n % 3 == 0 {
            "mlflow/artifacts/run-1"
        } else {
            "notebooks/ünïcødé"
        };
        fs::write(dir.join(sub).join(format!("file-{n:04}.txt")), &s)?;
        written += s.len() as u64;
        n += 1;
    }
    total += written;
    fs::write(dir.join("empty"), b"")?;
    std::os::unix::fs::symlink("vm/disk.img", dir.join("current-disk"))?;
    fs::set_permissions(dir.join("notebooks"), fs::Permissions::from_mode(0o750))?;
    Ok(total)
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
