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
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = std::fs::File::create(home.join(format!("mlflow-{port}.log"))).unwrap();
        let child = Command::new(venv_bin("mlflow"))
            .args(["server", "--backend-store-uri"])
            .arg(format!("sqlite:///{}", db.display()))
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

    // Unsupported stores say what to do; a database that is not MLflow's is refused.
    let out = env.run(&[
        "backup",
        "mlflow",
        "--backend-store-uri",
        "postgresql://ml:hunter2@127.0.0.1/mlflow",
        "--artifacts",
        art.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not supported yet") && !stderr(&out).contains("hunter2"),
        "{}",
        stderr(&out)
    );
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
