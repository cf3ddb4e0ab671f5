//! The `mlflow` source against a real MLflow tracking server (PyPI
//! `mlflow`, pinned, in `target/mlflow-venv`, made by scripts/test-all.sh)
//! on SQLite: runs, metrics, artifacts and a registered model logged
//! through its REST API; backed up; restored into a second store and
//! artifact root; a second server started on it; compared through REST.

use crate::common::*;
use crate::etcd::free_port;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn venv_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/mlflow-venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "MLflow is not installed: run scripts/test-all.sh (it creates target/mlflow-venv)"
    );
    p
}

/// A tracking server on a free loopback port (its own process group, so
/// its workers stop with it). Telemetry off: tests talk only to 127.0.0.1.
pub struct MlflowServer {
    child: Child,
    pub url: String,
}

impl MlflowServer {
    pub fn start(home: &Path, db: &Path, artifacts: &Path) -> MlflowServer {
        Self::start_on(home, &format!("sqlite:///{}", db.display()), artifacts, &[])
    }

    /// A server on any backend store URI, with extra environment (libpq's
    /// PGPASSWORD for a PostgreSQL store).
    pub fn start_on(
        home: &Path,
        store: &str,
        artifacts: &Path,
        env: &[(&str, &str)],
    ) -> MlflowServer {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = std::fs::File::create(home.join(format!("mlflow-{port}.log"))).unwrap();
        let child = Command::new(venv_bin("mlflow"))
            .args(["server", "--backend-store-uri"])
            .arg(store)
            .envs(env.iter().copied())
            .arg("--default-artifact-root")
            .arg(artifacts)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .env("HOME", home)
            .env("MLFLOW_DISABLE_TELEMETRY", "true")
            .env("DO_NOT_TRACK", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let s = MlflowServer { child, url };
        let end = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut b = String::new();
                let _ = c.read_to_string(&mut b);
                if b.starts_with("HTTP/1.1 200") || b.starts_with("HTTP/1.0 200") {
                    return s;
                }
            }
            assert!(
                Instant::now() < end,
                "the MLflow server did not start: {}",
                std::fs::read_to_string(home.join(format!("mlflow-{port}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Logs two experiments of three runs each (a metric with five steps, a
/// parameter, an artifact) and a registered model with two versions.
pub const LOG: &str = r#"
import os, sys, mlflow
from mlflow import MlflowClient
mlflow.set_tracking_uri(sys.argv[1])
c = MlflowClient()
for e in range(2):
    mlflow.set_experiment(f"thesis-{e}")
    for r in range(3):
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.01 * (r + 1))
            for step in range(5):
                mlflow.log_metric("loss", 1.0 / (step + 1 + r), step=step)
            p = os.path.join(sys.argv[2], f"out-{e}-{r}.bin")
            open(p, "wb").write(os.urandom(4096 + r))
            mlflow.log_artifact(p, artifact_path="outputs")
            if e == 0 and r < 2:
                if r == 0:
                    c.create_registered_model("bert-small")
                c.create_model_version("bert-small", f"{run.info.artifact_uri}/outputs", run_id=run.info.run_id)
print("logged")
"#;

pub fn log_runs(home: &Path, url: &str) {
    log_runs_with(home, url, &[]);
}

/// [`log_runs`] with extra environment (an S3 artifact root's endpoint and
/// keys: the client writes artifacts there itself).
pub fn log_runs_with(home: &Path, url: &str, env: &[(&str, &str)]) {
    let script = home.join("log.py");
    std::fs::write(&script, LOG).unwrap();
    let scratch = home.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = Command::new(venv_bin("python"))
        .arg(&script)
        .arg(url)
        .arg(&scratch)
        .env("HOME", home)
        .env("MLFLOW_DISABLE_TELEMETRY", "true")
        .env("DO_NOT_TRACK", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logging runs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(url: &str) -> Value {
    let out = Command::new("curl").args(["-sf", url]).output().unwrap();
    assert!(out.status.success(), "GET {url}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_mlflow_store_restores_into_a_second_store_and_a_server_on_it_agrees() {
    let env = Env::new();
    let home = env.path("ml");
    std::fs::create_dir_all(&home).unwrap();
    let db = home.join("prod/mlflow.db");
    let art = home.join("prod/artifacts");
    std::fs::create_dir_all(&art).unwrap();
    let prod = MlflowServer::start(&home, &db, &art);
    log_runs(&home, &prod.url);

    let out = env.ok(&[
        "--json",
        "backup",
        "mlflow",
        "--backend-store-uri",
        &format!("sqlite:///{}", db.display()),
        "--artifacts",
        art.to_str().unwrap(),
        "--tracking-uri",
        &prod.url,
    ]);
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = b["snapshot-id"].as_str().unwrap().to_string();
    let snaps: Value = serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    let facts = &snaps[0]["facts"];
    assert_eq!(facts["mlflow.server_version"], "3.17.2", "{facts}");
    assert!(
        facts["mlflow.alembic_revision"].as_str().unwrap().len() >= 8,
        "{facts}"
    );
    assert_eq!(facts["mlflow.counts"]["runs"], 6, "{facts}");
    assert_eq!(facts["mlflow.counts"]["experiments"], 3, "{facts}"); // Default + 2
    assert_eq!(facts["mlflow.counts"]["registered_models"], 1);
    assert_eq!(facts["mlflow.counts"]["model_versions"], 2);
    assert_eq!(facts["mlflow.sample"].as_array().unwrap().len(), 3);
    let ls = stdout(&env.ok_restore(&["ls", &id]));
    assert!(
        ls.contains("backend/mlflow.db") && ls.contains("/artifacts/outputs/out-"),
        "{ls}"
    );

    // Restore into a second store and artifact root; artifact URIs follow.
    let db2 = home.join("staging/mlflow.db");
    let art2 = home.join("staging/artifacts");
    let uri2 = format!("sqlite:///{}", db2.display());
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--mlflow-backend-store-uri",
        &uri2,
        "--mlflow-artifacts",
        art2.to_str().unwrap(),
    ]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rw = &r["restore"]["rewritten"];
    assert_eq!(rw["runs.artifact_uri"], 6, "{r}");
    assert_eq!(rw["experiments.artifact_location"], 3, "{r}");
    assert_eq!(rw["model_versions.source"], 2, "{r}");
    assert_eq!(rw["model_versions.storage_location"], 2, "{r}");
    assert!(r["restore"]["alembic_revision"] == facts["mlflow.alembic_revision"]);
    // Again: the store has tables now, refused and untouched.
    let out = env.run_restore(&[
        "restore",
        &id,
        "--mlflow-backend-store-uri",
        &uri2,
        "--mlflow-artifacts",
        art2.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));

    let staging = MlflowServer::start(&home, &db2, &art2);
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--verify-tracking-uri",
        &staging.url,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify"]["runs"], 6, "{v}");
    assert_eq!(v["verify"]["artifacts"], 3, "{v}");
    assert!(
        v["verify"]["metric_histories"].as_u64().unwrap() >= 3,
        "{v}"
    );
    // Same run IDs, versions and names; URIs under the new root.
    let q = |u: &str| {
        get(&format!(
            "{u}/api/2.0/mlflow/model-versions/search?max_results=100"
        ))
    };
    let mut a: Vec<(String, String, String)> = q(&prod.url)["model_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].to_string(),
                m["version"].to_string(),
                m["run_id"].to_string(),
            )
        })
        .collect();
    let mut bb: Vec<(String, String, String)> = q(&staging.url)["model_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].to_string(),
                m["version"].to_string(),
                m["run_id"].to_string(),
            )
        })
        .collect();
    a.sort();
    bb.sort();
    assert_eq!(a, bb);
    for m in q(&staging.url)["model_versions"].as_array().unwrap() {
        assert!(
            m["source"]
                .as_str()
                .unwrap()
                .starts_with(art2.to_str().unwrap()),
            "{m}"
        );
    }

    // A sampled run's artifact changed in staging: verification fails
    // naming it (exit 4).
    let s0 = &facts["mlflow.sample"][0];
    let rel = s0["artifacts"][0].as_str().unwrap();
    let f = art2
        .join(s0["experiment_id"].as_str().unwrap())
        .join(s0["run_id"].as_str().unwrap())
        .join("artifacts")
        .join(rel);
    std::fs::write(&f, b"not the backed-up bytes").unwrap();
    let out = env.run_restore(&["restore", &id, "--verify-tracking-uri", &staging.url]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("artifact {rel}: not what was backed up")),
        "{}",
        stderr(&out)
    );
    drop(staging);

    // Unsupported stores say what to do, a password in a URI is refused
    // (without repeating it); a database that is not MLflow's is refused.
    for (uri, says) in [
        (
            "mongodb://ml:hunter2@127.0.0.1/mlflow",
            "not an MLflow backend store URI",
        ),
        ("mysql://ml:hunter2@127.0.0.1/mlflow", "password file"),
        ("postgresql://ml:hunter2@127.0.0.1/mlflow", "password file"),
    ] {
        let out = env.run(&[
            "backup",
            "mlflow",
            "--backend-store-uri",
            uri,
            "--artifacts",
            art.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(says) && !stderr(&out).contains("hunter2"),
            "{}",
            stderr(&out)
        );
    }
    let other = home.join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x);")
        .unwrap();
    let out = env.run(&[
        "backup",
        "mlflow",
        "--backend-store-uri",
        &format!("sqlite:///{}", other.display()),
        "--artifacts",
        art.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is it an MLflow backend store"),
        "{}",
        stderr(&out)
    );
    drop(prod);
}

/// A PATH directory whose `psql`, `pg_dump` and `pg_restore` record their
/// argv (one line each) in `argv.log` and run the real programs.
fn recording_pg_tools(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let shims = dir.join("shims");
    std::fs::create_dir_all(&shims).unwrap();
    let log = dir.join("argv.log");
    for p in ["psql", "pg_dump", "pg_restore"] {
        let f = shims.join(p);
        std::fs::write(
            &f,
            format!(
                "#!/bin/sh\necho \"{p} $*\" >> {}\nexec /usr/bin/{p} \"$@\"\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    shims
}

#[test]
fn an_mlflow_store_on_postgresql_round_trips_through_pg_dump_and_a_server_on_it_agrees() {
    use crate::postgres::Postgres;
    use std::os::unix::fs::PermissionsExt;
    const PW: &str = "pg-Secret-7f3a";
    let pg = Postgres::start();
    pg.su_ok(
        "postgres",
        &format!("CREATE ROLE mlflow LOGIN PASSWORD '{PW}'"),
    );
    for db in ["mlflow", "mlflow_staging"] {
        pg.su_ok("postgres", &format!("CREATE DATABASE {db} OWNER mlflow"));
    }
    let env = Env::new();
    let home = env.path("ml");
    let art = home.join("prod/artifacts");
    std::fs::create_dir_all(&art).unwrap();
    let prod = MlflowServer::start_on(
        &home,
        &pg.uri("mlflow", "mlflow"),
        &art,
        &[("PGPASSWORD", PW)],
    );
    log_runs(&home, &prod.url);
    let pwfile = home.join("pg.pw");
    std::fs::write(&pwfile, format!("{PW}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let shims = recording_pg_tools(&home);
    let path = format!("{}:/usr/bin:/bin", shims.display());
    let run = |restore: bool, args: &[&str]| {
        let mut c = env.cmd();
        c.env("PATH", &path);
        if restore {
            c.env("LABCTL_RESTORE_KEY", &env.restore_key);
        } else {
            c.env("LABCTL_KEY", &env.backup_key);
        }
        c.args(args).output().unwrap()
    };
    let prod_uri = pg.uri("mlflow", "mlflow");
    let out = run(
        false,
        &[
            "--json",
            "backup",
            "mlflow",
            "--backend-store-uri",
            &prod_uri,
            "--password-file",
            pwfile.to_str().unwrap(),
            "--artifacts",
            art.to_str().unwrap(),
            "--tracking-uri",
            &prod.url,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut said = stdout(&out) + &stderr(&out);
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = b["snapshot-id"].as_str().unwrap().to_string();
    let snaps = env.ok(&["--json", "snapshots"]);
    said += &stdout(&snaps);
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let facts = &snaps[0]["facts"];
    assert_eq!(facts["mlflow.backend"], "postgresql", "{facts}");
    assert_eq!(facts["mlflow.database"], prod_uri.as_str(), "{facts}");
    assert_eq!(facts["mlflow.counts"]["runs"], 6, "{facts}");
    assert_eq!(facts["mlflow.counts"]["experiments"], 3, "{facts}");
    assert_eq!(facts["mlflow.counts"]["model_versions"], 2, "{facts}");
    assert_eq!(facts["mlflow.sample"].as_array().unwrap().len(), 3);
    let ls = stdout(&env.ok_restore(&["ls", &id]));
    assert!(ls.contains("backend/mlflow.pgdump"), "{ls}");
    // pg_dump dumped the very snapshot the facts were read from.
    let argv = std::fs::read_to_string(home.join("argv.log")).unwrap();
    assert!(
        argv.lines()
            .any(|l| l.starts_with("pg_dump ")
                && l.contains("--format=custom --compress=0 --snapshot=")),
        "{argv}"
    );

    // Into the staging database and a second artifact root, one transaction.
    let art2 = home.join("staging/artifacts");
    let stage_uri = pg.uri("mlflow", "mlflow_staging");
    let restore_args = [
        "--json",
        "restore",
        &id,
        "--mlflow-backend-store-uri",
        &stage_uri,
        "--mlflow-password-file",
        pwfile.to_str().unwrap(),
        "--mlflow-artifacts",
        art2.to_str().unwrap(),
    ];
    let out = run(true, &restore_args);
    assert!(out.status.success(), "{}", stderr(&out));
    said += &(stdout(&out) + &stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rw = &r["restore"]["rewritten"];
    assert_eq!(rw["runs.artifact_uri"], 6, "{r}");
    assert_eq!(rw["experiments.artifact_location"], 3, "{r}");
    assert_eq!(rw["model_versions.source"], 2, "{r}");
    assert_eq!(rw["model_versions.storage_location"], 2, "{r}");
    assert_eq!(
        r["restore"]["alembic_revision"],
        facts["mlflow.alembic_revision"]
    );
    assert_eq!(
        pg.su_ok(
            "mlflow_staging",
            "SELECT count(*) FROM runs WHERE artifact_uri NOT LIKE '%staging/artifacts%'"
        ),
        "0"
    );
    // Again: the database has tables now, refused and untouched (exit 6).
    let out = run(true, &restore_args);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // --overwrite replaces what the dump holds, in one transaction.
    let tags = pg.su_ok("mlflow_staging", "SELECT count(*) FROM tags");
    pg.su_ok("mlflow_staging", "DELETE FROM tags");
    let mut again = restore_args.to_vec();
    again.push("--overwrite");
    let out = run(true, &again);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pg.su_ok("mlflow_staging", "SELECT count(*) FROM tags"),
        tags
    );
    // A load that fails halfway changes nothing: the transaction rolls
    // back and the artifact root is put back as it was.
    let half = home.join("half-bin");
    std::fs::create_dir_all(&half).unwrap();
    std::os::unix::fs::symlink("/usr/bin/psql", half.join("psql")).unwrap();
    let f = half.join("pg_restore");
    std::fs::write(
        &f,
        "#!/bin/sh\necho 'DROP TABLE tags; CREATE TABLE half_loaded (x int);'\necho 'pg_restore: error: could not read from input file: end of file' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = art2.join("kept-by-a-failed-restore");
    std::fs::write(&marker, b"x").unwrap();
    let mut c = env.cmd();
    c.env("PATH", format!("{}:/usr/bin:/bin", half.display()))
        .env("LABCTL_RESTORE_KEY", &env.restore_key)
        .args(&again);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("end of file"), "{}", stderr(&out));
    assert_eq!(
        pg.su_ok("mlflow_staging", "SELECT count(*) FROM tags"),
        tags
    );
    assert_eq!(
        pg.su_ok(
            "mlflow_staging",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'half_loaded'"
        ),
        "0"
    );
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();

    let staging = MlflowServer::start_on(&home, &stage_uri, &art2, &[("PGPASSWORD", PW)]);
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--verify-tracking-uri",
        &staging.url,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify"]["runs"], 6, "{v}");
    assert_eq!(v["verify"]["model_versions"], 2, "{v}");
    assert_eq!(v["verify"]["artifacts"], 3, "{v}");
    let versions = |u: &str| {
        let mut v: Vec<String> = get(&format!(
            "{u}/api/2.0/mlflow/model-versions/search?max_results=100"
        ))["model_versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{} {} {}", m["name"], m["version"], m["run_id"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(versions(&prod.url), versions(&staging.url));
    drop(staging);

    // The password never left its file: not in any argv, output or fact.
    let argv = std::fs::read_to_string(home.join("argv.log")).unwrap();
    assert!(!argv.contains(PW) && !said.contains(PW), "{argv}\n{said}");

    // A wrong password is a key error (exit 5), nothing committed.
    let bad = home.join("bad.pw");
    std::fs::write(&bad, "not-it\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let backup = |uri: &str, pw: &Path, path: &str| {
        let mut c = env.cmd();
        c.env("PATH", path).env("LABCTL_KEY", &env.backup_key);
        c.args([
            "backup",
            "mlflow",
            "--backend-store-uri",
            uri,
            "--password-file",
            pw.to_str().unwrap(),
            "--artifacts",
            art.to_str().unwrap(),
        ])
        .output()
        .unwrap()
    };
    let out = backup(&prod_uri, &bad, &path);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the login"),
        "{}",
        stderr(&out)
    );
    // A too-open password file is refused.
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = backup(&prod_uri, &bad, &path);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    // An unreachable server, missing client programs (naming the package),
    // a dump that fails: each a clear error, nothing committed.
    let closed = format!("postgresql://mlflow@127.0.0.1:{}/mlflow", free_port());
    let out = backup(&closed, &pwfile, &path);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach PostgreSQL"),
        "{}",
        stderr(&out)
    );
    let empty = home.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = backup(&prod_uri, &pwfile, empty.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("postgresql-client"),
        "{}",
        stderr(&out)
    );
    let failing = home.join("failing-bin");
    std::fs::create_dir_all(&failing).unwrap();
    std::os::unix::fs::symlink("/usr/bin/psql", failing.join("psql")).unwrap();
    let f = failing.join("pg_dump");
    std::fs::write(&f, "#!/bin/sh\necho 'pg_dump: error: query failed: ERROR:  out of shared memory' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = backup(
        &prod_uri,
        &pwfile,
        &format!("{}:/usr/bin:/bin", failing.display()),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("out of shared memory"),
        "{}",
        stderr(&out)
    );
    let snaps: Value = serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    drop(prod);
}

#[test]
fn an_mlflow_store_on_mysql_restores_into_an_empty_database_and_a_server_on_it_agrees() {
    use crate::mariadb::MariaDb;
    use std::os::unix::fs::PermissionsExt;
    const PW: &str = "my-Secret-3c9e";
    let db = MariaDb::start();
    db.root_ok(&format!(
        "CREATE DATABASE mlflow; CREATE DATABASE mlflow_staging; CREATE DATABASE mlflow_half; CREATE USER 'mlflow'@'%' IDENTIFIED BY '{PW}'; GRANT ALL ON *.* TO 'mlflow'@'%';"
    ));
    let env = Env::new();
    let home = env.path("ml");
    let art = home.join("prod/artifacts");
    std::fs::create_dir_all(&art).unwrap();
    // The test's own servers take the password in their URI (PyMySQL
    // reads no environment); labctl never does.
    let server_uri =
        |name: &str| format!("mysql+pymysql://mlflow:{PW}@127.0.0.1:{}/{name}", db.port);
    let prod = MlflowServer::start_on(&home, &server_uri("mlflow"), &art, &[]);
    log_runs(&home, &prod.url);
    let pwfile = home.join("my.pw");
    std::fs::write(&pwfile, format!("{PW}\n")).unwrap();
    std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let uri = |name: &str| format!("{}/{name}", db.uri("mlflow"));
    let out = env.ok(&[
        "--json",
        "backup",
        "mlflow",
        "--backend-store-uri",
        &uri("mlflow"),
        "--password-file",
        pwfile.to_str().unwrap(),
        "--artifacts",
        art.to_str().unwrap(),
    ]);
    let mut said = stdout(&out) + &stderr(&out);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot-id"]
        .as_str()
        .unwrap()
        .to_string();
    let snaps = env.ok(&["--json", "snapshots"]);
    said += &stdout(&snaps);
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let facts = &snaps[0]["facts"];
    assert_eq!(facts["mlflow.backend"], "mysql", "{facts}");
    assert_eq!(facts["mlflow.counts"]["runs"], 6, "{facts}");
    assert!(facts.get("mlflow.counts_after").is_none(), "{facts}");
    assert!(stdout(&env.ok_restore(&["ls", &id])).contains("backend/mlflow.sql"));

    let art2 = home.join("staging/artifacts");
    let restore = |name: &str, extra: &[&str], path: &str| {
        let mut c = env.cmd();
        c.env("PATH", path)
            .env("LABCTL_RESTORE_KEY", &env.restore_key)
            .args([
                "--json",
                "restore",
                &id,
                "--mlflow-backend-store-uri",
                &uri(name),
                "--mlflow-password-file",
                pwfile.to_str().unwrap(),
                "--mlflow-artifacts",
                art2.to_str().unwrap(),
            ])
            .args(extra);
        c.output().unwrap()
    };
    // A load that fails halfway leaves the database empty and no artifacts.
    let half = home.join("half-bin");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(
        half.join("mysql"),
        "#!/bin/sh\nhead -c 40000 | /usr/bin/mysql \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(half.join("mysql"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = restore(
        "mlflow_half",
        &[],
        &format!("{}:/usr/bin:/bin", half.display()),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        db.root_ok(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'mlflow_half'"
        ),
        "0"
    );
    assert!(!art2.exists());

    let out = restore("mlflow_staging", &[], "/usr/bin:/bin");
    assert!(out.status.success(), "{}", stderr(&out));
    said += &(stdout(&out) + &stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restore"]["rewritten"]["runs.artifact_uri"], 6, "{r}");
    assert_eq!(r["restore"]["rewritten"]["model_versions.source"], 2, "{r}");
    assert_eq!(
        r["restore"]["alembic_revision"],
        facts["mlflow.alembic_revision"]
    );
    // Again: tables now (exit 6); --overwrite is not offered for MySQL (exit 2).
    let out = restore("mlflow_staging", &[], "/usr/bin:/bin");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let out = restore("mlflow_staging", &["--overwrite"], "/usr/bin:/bin");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only into an empty database"),
        "{}",
        stderr(&out)
    );

    let staging = MlflowServer::start_on(&home, &server_uri("mlflow_staging"), &art2, &[]);
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--verify-tracking-uri",
        &staging.url,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify"]["runs"], 6, "{v}");
    assert_eq!(v["verify"]["artifacts"], 3, "{v}");
    assert!(!said.contains(PW), "{said}");
    drop(staging);
    drop(prod);
}

#[test]
fn an_mlflow_artifact_root_in_s3_is_read_from_the_bucket_and_restores_into_a_directory() {
    use crate::s3::{create_bucket, moto_port};
    use std::os::unix::fs::PermissionsExt;
    let port = moto_port();
    let bucket = format!("mlflow-art-{:08x}", rand::random::<u32>());
    create_bucket(port, &bucket, false);
    let endpoint = format!("http://127.0.0.1:{port}");
    let root = format!("s3://{bucket}/mlartifacts");
    let env = Env::new();
    let home = env.path("ml");
    std::fs::create_dir_all(home.join("prod")).unwrap();
    let db = home.join("prod/mlflow.db");
    // The server and the client reach the bucket with boto3.
    let s3env = [
        ("MLFLOW_S3_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "mlflow-key"),
        ("AWS_SECRET_ACCESS_KEY", "mlflow-Secret-8d1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ];
    let prod = MlflowServer::start_on(
        &home,
        &format!("sqlite:///{}", db.display()),
        Path::new(&root),
        &s3env,
    );
    log_runs_with(&home, &prod.url, &s3env);
    let creds = home.join("s3.credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = mlflow-key\naws_secret_access_key = mlflow-Secret-8d1\n",
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let backup = |artifacts: &str| {
        env.run(&[
            "--json",
            "backup",
            "mlflow",
            "--backend-store-uri",
            &format!("sqlite:///{}", db.display()),
            "--artifacts",
            artifacts,
            "--s3-endpoint",
            &endpoint,
            "--s3-credentials-file",
            creds.to_str().unwrap(),
        ])
    };
    let out = backup(&root);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot-id"]
        .as_str()
        .unwrap()
        .to_string();
    let snaps: Value = serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    let facts = &snaps[0]["facts"];
    assert_eq!(facts["mlflow.artifact_root"], root.as_str(), "{facts}");
    assert!(
        !facts["mlflow.sample"][0]["artifacts"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{facts}"
    );
    let ls = stdout(&env.ok_restore(&["ls", &id]));
    assert!(ls.contains("/artifacts/outputs/out-"), "{ls}");
    assert!(
        !stdout(&out).contains("mlflow-Secret-8d1") && !stderr(&out).contains("mlflow-Secret-8d1")
    );

    // Into a directory: every s3:// URI under the root now names it.
    let db2 = home.join("staging/mlflow.db");
    let art2 = home.join("staging/artifacts");
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--mlflow-backend-store-uri",
        &format!("sqlite:///{}", db2.display()),
        "--mlflow-artifacts",
        art2.to_str().unwrap(),
    ]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restore"]["rewritten"]["runs.artifact_uri"], 6, "{r}");
    assert_eq!(r["restore"]["rewritten"]["model_versions.source"], 2, "{r}");
    let staging = MlflowServer::start(&home, &db2, &art2);
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--verify-tracking-uri",
        &staging.url,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify"]["runs"], 6, "{v}");
    assert_eq!(v["verify"]["artifacts"], 3, "{v}");
    drop(staging);

    // Into another prefix of the bucket: uploaded, URIs rewritten to it,
    // and a server reading it from S3 serves what was backed up.
    let db3 = home.join("staging3/mlflow.db");
    let root3 = format!("s3://{bucket}/staging-artifacts");
    let into_s3 = || {
        env.run_restore(&[
            "--json",
            "restore",
            &id,
            "--mlflow-backend-store-uri",
            &format!("sqlite:///{}", db3.display()),
            "--mlflow-artifacts",
            &root3,
            "--mlflow-s3-endpoint",
            &endpoint,
            "--mlflow-s3-credentials-file",
            creds.to_str().unwrap(),
        ])
    };
    let out = into_s3();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restore"]["rewritten"]["runs.artifact_uri"], 6, "{r}");
    let uploaded = crate::s3::list_sizes(port, &bucket, "staging-artifacts/");
    assert_eq!(
        uploaded.len(),
        crate::s3::list_sizes(port, &bucket, "mlartifacts/").len()
    );
    let staging3 = MlflowServer::start_on(
        &home,
        &format!("sqlite:///{}", db3.display()),
        Path::new(&root3),
        &s3env,
    );
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id,
        "--verify-tracking-uri",
        &staging3.url,
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verify"]["artifacts"], 3, "{v}");
    drop(staging3);
    // Again: the database has tables and the prefix objects (exit 6).
    let out = into_s3();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));

    // A bucket that does not exist: exit 2, nothing committed.
    let out = backup(&format!("s3://no-such-bucket-{bucket}/x"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    drop(prod);
}
