//! The repository on a real S3-compatible server (moto's server mode,
//! installed into `target/test-venv` by `scripts/test-all.sh`), directly and
//! through a fault-injecting proxy.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The moto server's port, started once for the whole test binary.
pub fn moto_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let server =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/moto_server");
        assert!(
            server.exists(),
            "moto is not installed: run scripts/test-all.sh (it creates target/test-venv)"
        );
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread that lives as long as the process: moto gets SIGKILL when it ends.
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            let mut cmd = Command::new(server);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("starting moto_server");
            tx.send(()).unwrap();
            // Lives until the process ends (then PDEATHSIG kills moto).
            let _ = child.wait();
        });
        rx.recv().unwrap();
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return port;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("moto_server did not start on port {port}");
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates a bucket with a raw HTTP request (moto does not check signatures).
pub fn create_bucket(port: u16, name: &str, object_lock: bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let lock = if object_lock {
        "x-amz-bucket-object-lock-enabled: true\r\n"
    } else {
        ""
    };
    write!(s, "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lock}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "creating bucket {name}: {resp}"
    );
}

/// An S3 repository environment: a fresh bucket on moto (optionally behind a proxy port).
pub struct S3Env {
    pub env: Env,
    /// moto's port and the bucket, for raw requests.
    pub port: u16,
    pub bucket: String,
}

impl S3Env {
    pub fn new(object_lock: bool) -> S3Env {
        Self::with_endpoint_port(object_lock, None)
    }

    /// `via`: a proxy port to talk through instead of moto directly.
    pub fn with_endpoint_port(object_lock: bool, via: Option<u16>) -> S3Env {
        let port = moto_port();
        let bucket = format!("lab-{:016x}", rand::random::<u64>());
        create_bucket(port, &bucket, object_lock);
        let url = format!("s3://{bucket}/repo");
        let endpoint = format!("http://127.0.0.1:{}", via.unwrap_or(port));
        let mut env = Env::empty();
        env.extra_env = [
            ("LABCTL_REPO", url.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("LABCTL_S3_TIMEOUT_SECS", "3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        S3Env { env, port, bucket }
    }

    /// `repo init` with small packs, so tests produce several.
    pub fn init(&self, extra: &[&str]) -> Output {
        let mut args = vec!["--pack-mib", "1"];
        args.extend_from_slice(extra);
        self.env.init(&args)
    }
}

/// Everything else (cmd, run, ok, ok_restore, backup) is [`Env`]'s, with the
/// S3 settings in its extra environment.
impl std::ops::Deref for S3Env {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

fn tree(env: &Env, n: u64, size: usize, seed: u64) -> PathBuf {
    let src = env.path(&format!("src{seed}"));
    for i in 0..n {
        write(
            &src.join(format!("d{}/f{i:03}", i % 4)),
            &noise(size, seed * 1000 + i),
        );
    }
    write(
        &src.join("text.txt"),
        "kubeflow mlflow ".repeat(20_000).as_bytes(),
    );
    std::os::unix::fs::symlink("text.txt", src.join("link")).unwrap();
    src
}

/// `tags` of every object under `prefix` (`Key`, `ETag`, `Size`...), by a
/// raw ListObjectsV2 (moto does not check signatures on reads).
fn list_objects(port: u16, bucket: &str, prefix: &str, tags: &[&str]) -> Vec<Vec<String>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /{bucket}?list-type=2&prefix={prefix} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let field = |c: &str, tag: &str| -> String {
        let open = format!("<{tag}>");
        let from = c.find(&open).map(|i| i + open.len()).unwrap_or(0);
        let to = c[from..].find('<').map(|i| from + i).unwrap_or(from);
        c[from..to]
            .replace("&#34;", "")
            .replace("&quot;", "")
            .replace('"', "")
    };
    resp.split("<Contents>")
        .skip(1)
        .map(|c| tags.iter().map(|t| field(c, t)).collect())
        .collect()
}

/// `(key, etag)` of every object under `prefix`.
fn list_etags(port: u16, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    list_objects(port, bucket, prefix, &["Key", "ETag"])
        .into_iter()
        .map(|v| (v[0].clone(), v[1].clone()))
        .collect()
}

/// `(key, size)` of every object under `prefix`.
pub fn list_sizes(port: u16, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    list_objects(port, bucket, prefix, &["Key", "Size"])
        .into_iter()
        .map(|v| (v[0].clone(), v[1].parse().unwrap()))
        .collect()
}

/// Deletes one object (damage, as an operator's mistake or a failing store
/// would do it), with boto3 from the test venv: moto refuses an unsigned
/// DELETE.
pub fn delete_object(port: u16, bucket: &str, key: &str) {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    let out = Command::new(py)
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args([
            "-c",
            "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').delete_object(Bucket=sys.argv[2], Key=sys.argv[3])",
            &format!("http://127.0.0.1:{port}"),
            bucket,
            key,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deleting {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn large_packs_go_up_as_multipart_uploads() {
    let mut s = S3Env::new(false);
    // 16 MiB packs reach a 16 MiB multipart threshold (8 MiB parts).
    s.env
        .extra_env
        .push(("LABCTL_S3_MULTIPART_MIB".into(), "16".into()));
    assert_success(&s.env.init(&["--no-escrow", "--pack-mib", "16"]), &["init"]);
    let src = s.env.path("big");
    for i in 0..3 {
        write(&src.join(format!("f{i}.bin")), &noise(8 << 20, 40 + i));
    }
    s.backup(&src);
    let url = s
        .env
        .extra_env
        .iter()
        .find(|(k, _)| k == "LABCTL_REPO")
        .unwrap()
        .1
        .clone();
    let bucket = url.trim_start_matches("s3://").split('/').next().unwrap();
    let packs = list_etags(moto_port(), bucket, "repo/packs/");
    assert!(!packs.is_empty());
    // A multipart object's ETag is "<md5 of part md5s>-<number of parts>".
    assert!(
        packs
            .iter()
            .any(|(_, etag)| etag.ends_with("-2") || etag.ends_with("-3")),
        "no pack was uploaded in parts: {packs:?}"
    );
    s.ok_restore(&["check", "--read-data"]);
    let out = s.env.path("out");
    s.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);

    // An upload a crash left unfinished is aborted by prune after the grace period.
    let port = moto_port();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "POST /{bucket}/repo/packs/aa/stale?uploads HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("<UploadId>"), "{resp}");
    let r: serde_json::Value = serde_json::from_slice(&s.ok(&["--json", "prune"]).stdout).unwrap();
    assert_eq!(
        r["uploads-aborted"], 0,
        "younger than the grace period: {r}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let r: serde_json::Value =
        serde_json::from_slice(&s.ok(&["--json", "prune", "--grace", "1s"]).stdout).unwrap();
    assert_eq!(r["uploads-aborted"], 1, "{r}");
    s.ok_restore(&["check", "--read-data"]);
}

#[test]
fn s3_backup_restore_check_forget_prune() {
    let s = S3Env::new(false);
    assert_success(&s.init(&["--no-escrow"]), &["init"]);
    let src = tree(&s.env, 12, 300_000, 1);
    let first = s.backup(&src);
    assert!(
        first["summary"]["packs-written"].as_u64().unwrap() >= 3,
        "{first}"
    );
    let second = s.backup(&src);
    assert_eq!(
        second["summary"]["packs-written"], 0,
        "unchanged data writes no pack: {second}"
    );
    let out = s.env.path("out");
    s.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
    s.ok_restore(&["check", "--read-data"]);
    // Retention and garbage collection on S3.
    let other = tree(&s.env, 4, 200_000, 2);
    s.backup(&other);
    s.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]);
    let r: serde_json::Value = serde_json::from_slice(&s.ok(&["--json", "prune"]).stdout).unwrap();
    assert!(!r["packs-marked"].as_array().unwrap().is_empty(), "{r}");
    let r: serde_json::Value =
        serde_json::from_slice(&s.ok(&["--json", "prune", "--grace", "0s"]).stdout).unwrap();
    assert!(!r["packs-deleted"].as_array().unwrap().is_empty(), "{r}");
    s.ok_restore(&["check", "--read-data"]);
    let out2 = s.env.path("out2");
    s.ok_restore(&["restore", "latest", "--target", out2.to_str().unwrap()]);
    assert_same_tree(&other, &out2);
    // Streams too.
    let mut child = s
        .cmd()
        .env("LABCTL_KEY", &s.env.backup_key)
        .args(["backup", "stream", "--name", "db"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let data = noise(2 << 20, 3);
    child.stdin.take().unwrap().write_all(&data).unwrap();
    assert!(child.wait().unwrap().success());
    let out = s.ok_restore(&["restore", "latest", "--stdout"]);
    assert!(out.stdout == data);
}

#[test]
fn s3_write_once_never_overwrites() {
    let s = S3Env::new(false);
    assert_success(&s.init(&["--no-escrow"]), &["init"]);
    // A second init on the same prefix is refused, the config untouched.
    let again = s.init(&["--no-escrow"]);
    assert_eq!(again.status.code(), Some(6), "{}", stderr(&again));
    s.ok(&["snapshots"]);
}

#[test]
fn s3_kill_during_backup_then_resume() {
    let s = S3Env::new(false);
    assert_success(&s.init(&["--no-escrow"]), &["init"]);
    let src = tree(&s.env, 24, 1 << 20, 4);
    let mut child = spawn_backup(s.cmd(), &s.env.backup_key, &src);
    std::thread::sleep(Duration::from_millis(1500));
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    s.ok(&["check"]);
    let v = s.backup(&src);
    if !finished {
        assert!(
            v["summary"]["bytes-new-raw"].as_u64().unwrap() < 24 << 20,
            "re-used uploaded packs: {v}"
        );
    }
    s.ok_restore(&["check", "--read-data"]);
    let out = s.env.path("out");
    s.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_same_tree(&src, &out);
}

#[test]
fn object_lock_needs_a_lock_enabled_bucket() {
    let s = S3Env::new(false);
    let out = s.init(&["--no-escrow", "--object-lock-days", "7"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("Object Lock"), "{}", stderr(&out));
    assert!(!s.env.backup_key.exists(), "nothing written");
}

#[test]
fn object_lock_protects_packs_from_prune() {
    let s = S3Env::new(true);
    assert_success(
        &s.init(&["--no-escrow", "--object-lock-days", "3"]),
        &["init"],
    );
    let a = tree(&s.env, 4, 300_000, 5);
    s.backup(&a);
    let b = tree(&s.env, 2, 10_000, 6);
    s.backup(&b);
    let out = s.ok(&["forget", "--keep-last", "1", "--group-by", "tags"]);
    assert!(
        stderr(&out).contains("Object Lock"),
        "locked snapshot stays: {}",
        stderr(&out)
    );
    s.ok(&["--json", "prune"]);
    let r: serde_json::Value =
        serde_json::from_slice(&s.ok(&["--json", "prune", "--grace", "0s"]).stdout).unwrap();
    assert!(
        r["packs-deleted"].as_array().unwrap().is_empty(),
        "locked packs are never deleted: {r}"
    );
    s.ok_restore(&["check", "--read-data"]);
    let out = s.env.path("out");
    s.ok_restore(&["restore", "latest", "--target", out.to_str().unwrap()]);
}

#[test]
fn tls_with_a_private_ca_file() {
    // A TLS moto server with a certificate from a private CA made here.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::make_private_ca(d);
    let port = free_port();
    let server = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/moto_server");
    let mut moto = Command::new(server)
        .args([
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            d.join("srv.pem").to_str().unwrap(),
            "-k",
            d.join("srv.key").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut moto);
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let env = Env::empty();
    let run = |ca: bool, args: &[&str]| {
        let mut c = env.cmd();
        c.env("LABCTL_REPO", "s3://tls-bucket/repo")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", format!("https://127.0.0.1:{port}"))
            .env("LABCTL_S3_TIMEOUT_SECS", "2");
        if ca {
            c.env("LABCTL_S3_CA_FILE", d.join("ca.pem"));
        }
        c.args(args).output().unwrap()
    };
    let (b, r) = (
        env.backup_key.to_str().unwrap(),
        env.restore_key.to_str().unwrap(),
    );
    // Without the CA the server is not trusted: a storage error, nothing written.
    let out = run(
        false,
        &[
            "repo",
            "init",
            "--no-escrow",
            "--backup-key",
            b,
            "--restore-key",
            r,
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(!env.backup_key.exists());
    // With it, everything works over TLS. (The bucket is made over TLS too.)
    let ok = Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python"))
        .args(["-c", &format!("import boto3; boto3.client('s3', endpoint_url='https://127.0.0.1:{port}', aws_access_key_id='t', aws_secret_access_key='t', region_name='us-east-1', verify='{}').create_bucket(Bucket='tls-bucket')", d.join("ca.pem").display())])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = run(
        true,
        &[
            "repo",
            "init",
            "--no-escrow",
            "--backup-key",
            b,
            "--restore-key",
            r,
        ],
    );
    assert_success(&out, &["init over TLS"]);
    let src = env.path("src");
    write(&src.join("a"), b"over tls");
    assert_success(
        &run(true, &["--key", b, "backup", "path", src.to_str().unwrap()]),
        &["backup"],
    );
    let out = run(
        true,
        &[
            "--restore-key",
            r,
            "restore",
            "latest",
            "--stdout",
            "--path",
            "a",
        ],
    );
    assert_success(&out, &["restore"]);
    assert_eq!(out.stdout, b"over tls");
}

#[test]
fn credentials_file_readable_by_others_is_refused() {
    let s = S3Env::new(false);
    let creds = s.env.path("credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = s3cr3t-value\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Credentials only from the file (none in the environment or flags).
    let init = || {
        s.cmd()
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_SHARED_CREDENTIALS_FILE", &creds)
            .args([
                "repo",
                "init",
                "--no-escrow",
                "--backup-key",
                s.env.backup_key.to_str().unwrap(),
                "--restore-key",
                s.env.restore_key.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = init();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("chmod 600") && !stderr(&out).contains("s3cr3t"),
        "{}",
        stderr(&out)
    );
    // Private, it is used (credentials from the file alone, none inline).
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = init();
    assert_success(&out, &["init with a credentials file"]);
}

#[test]
fn daemon_job_uses_the_credentials_file_named_in_the_config() {
    let s = S3Env::new(false);
    assert_success(&s.init(&["--no-escrow"]), &["repo", "init"]);
    let src = s.env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "from the daemon config").unwrap();
    let creds = s.env.path("s3-credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = &s
        .env
        .extra_env
        .iter()
        .find(|(k, _)| k == "LABCTL_REPO")
        .unwrap()
        .1;
    let config = s.env.path("labctl.toml");
    std::fs::write(
        &config,
        format!(
            "[repository]\nurl = \"{url}\"\nbackup_key = \"{}\"\ncredentials_file = \"{}\"\ncache_dir = \"{}\"\n\n[[job]]\nname = \"s3-nightly\"\nschedule = \"0 2 * * *\"\nbackup = {{ source = \"path\", path = \"{}\" }}\n",
            s.env.backup_key.display(),
            creds.display(),
            s.env.cache.display(),
            src.display()
        ),
    )
    .unwrap();
    // No credentials in the environment: only the file named in the config.
    let run = || {
        s.cmd()
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .args(["--json", "jobs", "run", "s3-nightly", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run();
    assert_success(&out, &["jobs", "run"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["outcome"], "success", "{r}");
    let out = s.ok(&["--json", "snapshots"]);
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snaps.len(), 1);
    // A credentials file others can read fails the run (recorded, exit 1) and
    // the message says why without printing the secret.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

/// An S3 endpoint that accepts connections and never answers: the error says
/// in words what happened, which operation, and which endpoint; no Rust
/// debug output.
#[test]
fn s3_errors_are_said_in_words_with_the_operation_and_endpoint() {
    let s = S3Env::new(false);
    assert_success(&s.init(&["--no-escrow"]), &["repo", "init"]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Hold every connection open without a byte of answer.
        let mut conns = vec![];
        listener.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while std::time::Instant::now() < until {
            match listener.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
            if conns.len() > 64 {
                break;
            }
        }
    });
    let out = s
        .cmd()
        .env("LABCTL_KEY", &s.backup_key)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("LABCTL_S3_TIMEOUT_SECS", "1")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        ["GET", "HEAD", "LIST"].iter().any(|op| err.contains(op)),
        "{err}"
    );
    assert!(
        err.contains("timed out") || err.contains("timeout"),
        "{err}"
    );
    for debug in ["Error {", "kind:", "{ ", "Some("] {
        assert!(!err.contains(debug), "debug output in: {err}");
    }
    drop(held);
}
