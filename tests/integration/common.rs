//! Shared helpers: a scratch environment, running the binary, tree builders.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_labctl");

/// A scratch directory with a repository, key files and a cache.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub backup_key: PathBuf,
    pub restore_key: PathBuf,
    pub cache: PathBuf,
    /// More environment for every command (an S3 repository's settings).
    pub extra_env: Vec<(String, String)>,
}

impl Env {
    /// A scratch dir without a repository.
    pub fn empty() -> Env {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().to_path_buf();
        Env {
            repo: p.join("repo"),
            backup_key: p.join("backup.key"),
            restore_key: p.join("restore.key"),
            cache: p.join("cache"),
            extra_env: vec![],
            dir,
        }
    }

    /// A scratch dir with an initialised repository (small packs so tests
    /// produce several of them).
    pub fn new() -> Env {
        let env = Env::empty();
        assert_success(
            &env.init(&["--no-escrow", "--pack-mib", "1"]),
            &["repo", "init"],
        );
        env
    }

    /// Runs `repo init` writing this env's key files, with `extra` flags.
    pub fn init(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "repo",
            "init",
            "--backup-key",
            self.backup_key.to_str().unwrap(),
            "--restore-key",
            self.restore_key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A command with a cleared environment, the repository and cache set,
    /// and no key (tests pass keys explicitly).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            .env("LABCTL_REPO", &self.repo)
            .env("LABCTL_CACHE_DIR", &self.cache)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Runs labctl with the backup key.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .env("LABCTL_KEY", &self.backup_key)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs labctl with the restore key only.
    pub fn run_restore(&self, args: &[&str]) -> Output {
        self.cmd()
            .env("LABCTL_RESTORE_KEY", &self.restore_key)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs with the backup key and asserts success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert_success(&out, args);
        out
    }

    pub fn ok_restore(&self, args: &[&str]) -> Output {
        let out = self.run_restore(args);
        assert_success(&out, args);
        out
    }

    /// Backs up `dir` and returns the JSON summary.
    pub fn backup(&self, dir: &Path) -> serde_json::Value {
        let out = self.ok(&["--json", "backup", "path", dir.to_str().unwrap()]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Opens the repository through the library with the backup key.
    pub fn open_lib(&self) -> labctl::repo::Repository {
        labctl::repo::Repository::open(
            std::sync::Arc::new(labctl::backend::fs::FsBackend::new(&self.repo)),
            labctl::repo::keys::Keys::load(&self.backup_key).unwrap(),
            &self.cache,
        )
        .unwrap()
    }

    pub fn packs(&self) -> Vec<PathBuf> {
        list_files(&self.repo.join("packs"))
    }
}

/// Starts a slow (one encoder thread) quiet backup of `dir` with `cmd`'s
/// environment and the given backup key, for tests that act during it.
pub fn spawn_backup(mut cmd: Command, key: &Path, dir: &Path) -> std::process::Child {
    cmd.env("LABCTL_KEY", key)
        .args([
            "-q",
            "backup",
            "path",
            dir.to_str().unwrap(),
            "--threads",
            "1",
        ])
        .spawn()
        .unwrap()
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "labctl {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// All regular files below `dir`, sorted.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// Writes a file, creating parent directories.
pub fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// Compares two trees (content, modes, mtimes, symlinks); panics with the differences.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let diffs = labctl::restore::verify::compare_trees(a, b).unwrap();
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs openssl in `dir`, asserting success.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA valid for two days: `{stem}.key` and
/// `{stem}.{cert_ext}`, subject `CN={cn}`.
pub fn new_ca(dir: &Path, stem: &str, cert_ext: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{stem}.key"),
            "-out",
            &format!("{stem}.{cert_ext}"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
}

/// A certificate the CA `ca_stem` signs: `{stem}.key` (mode 0600) and
/// `{stem}.{cert_ext}`, subject `CN={cn}`, with the X.509 extensions `ext`
/// (openssl extfile lines), valid for `days` (`-1`: expired yesterday).
pub fn issue_cert(
    dir: &Path,
    ca_stem: &str,
    stem: &str,
    cert_ext: &str,
    cn: &str,
    ext: &str,
    days: &str,
) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{stem}.key"),
            "-out",
            &format!("{stem}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    fs::write(dir.join(format!("{stem}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            &format!("{ca_stem}.{cert_ext}"),
            "-CAkey",
            &format!("{ca_stem}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{stem}.{cert_ext}"),
            "-days",
            days,
            "-extfile",
            &format!("{stem}.ext"),
        ],
    );
    fs::set_permissions(
        dir.join(format!("{stem}.key")),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

/// Makes a private CA (`ca.pem`) and a server certificate for 127.0.0.1 it
/// signed (`srv.pem`, `srv.key`) in `d`, with openssl.
pub fn make_private_ca(d: &Path) {
    new_ca(d, "ca", "pem", "labctl test CA");
    issue_cert(
        d,
        "ca",
        "srv",
        "pem",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        "2",
    );
}

/// A labctl.toml in `env` for its repository and cache (metrics off) with
/// the given `[[job]]` tables.
pub fn daemon_config(env: &Env, jobs: &str) -> PathBuf {
    let cfg = env.path("labctl.toml");
    fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\nbackup_key = \"{}\"\ncache_dir = \"{}\"\n\n[daemon]\nmetrics_listen = \"\"\n\n{jobs}",
            env.repo.display(),
            env.backup_key.display(),
            env.cache.display(),
        ),
    )
    .unwrap();
    cfg
}
