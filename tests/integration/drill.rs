//! Nightly drills end to end: the `labctl daemon` binary with a multi-source
//! job (a real etcd member, a tree, a stream) and a drill job on
//! second-level schedules, against the S3 server; the drill restores the
//! newest complete point into staging, verifies it, records the RTO,
//! cleans up, exports the drill metrics; a pack deleted from the bucket
//! makes the next drill fail and alert, naming the source and the file.

use crate::common::*;
use crate::daemon::{http_get, webhook_receiver};
use crate::etcd::{free_port, Etcd};
use crate::s3::{delete_object, list_sizes, S3Env};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

/// The daemon binary, its log lines as they come.
pub struct Daemon {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Daemon {
    fn start(s3: &S3Env, config: &Path, hook: &str) -> Daemon {
        Self::spawn(s3.cmd(), config, hook)
    }

    /// `labctl daemon --config CONFIG` from `cmd` (its environment set).
    pub fn spawn(mut cmd: std::process::Command, config: &Path, hook: &str) -> Daemon {
        let mut child = cmd
            .env("HOOK", hook)
            .env("LABCTL_PVE_POLL_MS", "50")
            .args(["daemon", "--config", config.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        Daemon {
            child,
            rx,
            log: vec![],
        }
    }

    /// The first line (from now on) that `pred` accepts.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let line = self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("daemon log so far:\n{}", self.log.join("\n")));
            self.log.push(line.clone());
            if pred(&line) {
                return line;
            }
        }
    }

    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_for(|l| l.contains("daemon stopped"));
        assert!(self.child.wait().unwrap().success());
    }
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_daemon_makes_points_drills_them_into_staging_and_alerts_when_a_point_is_broken() {
    let s3 = S3Env::new(false);
    assert_success(&s3.init(&["--no-escrow"]), &["repo init"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = Etcd::start(&s3.path("etcd-prod"), "cp1", free_port(), None);
    let mut c = crate::etcd::client(&rt, &etcd.url(), None);
    let kv: std::collections::BTreeMap<String, Vec<u8>> = (0..200)
        .map(|i| (format!("/registry/secrets/lab/s{i}"), vec![b'k'; 64]))
        .collect();
    crate::etcd::put_all(&rt, &mut c, &kv);
    let data = s3.path("data");
    write(&data.join("notebooks/big.ipynb"), &noise(3_000_000, 7));
    write(&data.join("notebooks/small.py"), b"print('hi')\n");
    let dump = s3.path("dump.sql");
    fs::write(&dump, b"CREATE TABLE runs (id int);\n").unwrap();
    // The cluster (the Kubernetes double): a Kubeflow profile namespace.
    let kube = crate::kube_sim::KubeSim::start();
    crate::kube::lab(&kube);
    // Backup and drill (restore and cleanup) under the shipped roles.
    let roles = ["labctl-backup-rbac.yaml", "labctl-restore-rbac.yaml"]
        .iter()
        .flat_map(|f| {
            crate::kube_sim::Rule::from_cluster_roles(
                &fs::read_to_string(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("deploy/kubernetes")
                        .join(f),
                )
                .unwrap(),
            )
        })
        .collect();
    kube.with(|s| s.rbac = Some(roles));
    // The notebook's claim: a local-path volume on this "node".
    let pv_dir = s3.path("local-path/pvc-1234");
    write(&pv_dir.join("data.csv"), &noise(50_000, 11));
    kube.with(|s| {
        s.job_outcome = Some(true);
        s.put("persistentvolumes", serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-1234"},
            "spec": {"capacity": {"storage": "5Gi"}, "storageClassName": "local-path", "hostPath": {"path": pv_dir.display().to_string()},
                     "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["nodo1"]}]}]}}}}));
    });
    let kc = kube.kubeconfig(&s3.path(""));
    // MLflow on SQLite with runs, metrics, artifacts and a model.
    let ml = s3.path("ml");
    fs::create_dir_all(ml.join("artifacts")).unwrap();
    let ml_db = ml.join("mlflow.db");
    let ml_prod = crate::mlflow::MlflowServer::start(&ml, &ml_db, &ml.join("artifacts"));
    crate::mlflow::log_runs(&ml, &ml_prod.url);
    let ml_port = free_port();
    // A Proxmox VM: the PVE simulator and a real sshd whose vzdump and
    // qmrestore are the test programs.
    let node = crate::vm::Node::start();
    let pve = crate::vm::sim_with_vm(&node, "16M");
    let plat = crate::vm::platform(&s3.path("pve"), &pve, &node, &node.known_hosts);
    let stage = s3.path("stage");
    let plan = s3.path("staging.yaml");
    fs::write(
        &plan,
        format!(
            "environment: staging\nrto_objective: 10m\nvm:\n  node: pve1\n  vmid_range: 9701-9703\n  bridge: vmbr99\n  platform: {plat}\netcd:\n  data_dir: {s}/etcd\n  name: staging\n  initial_advertise_peer_urls: http://127.0.0.1:{p}\npath:\n  root: {s}/files\nstream:\n  dir: {s}/streams\nkube:\n  kubeconfig: {kc}\n  namespace_map:\n    \"*\": \"*-staging\"\npvc:\n  kubeconfig: {kc}\n  namespace_map:\n    \"*\": \"*-staging\"\n  image: labctl:test\n  job_timeout: 30s\nmlflow:\n  backend_store_uri: sqlite:///{s}/mlflow/mlflow.db\n  artifacts: {s}/mlflow/artifacts\n  verify_tracking_uri: http://127.0.0.1:{mp}\n  verify_server: [/usr/bin/env, MLFLOW_DISABLE_TELEMETRY=true, DO_NOT_TRACK=1, {mlbin}, server, --backend-store-uri, \"sqlite:///{s}/mlflow/mlflow.db\", --default-artifact-root, {s}/mlflow/artifacts, --host, 127.0.0.1, --port, \"{mp}\", --workers, \"1\"]\n",
            s = stage.display(),
            p = free_port(),
            kc = kc.display(),
            mp = ml_port,
            plat = plat.display(),
            mlbin = crate::mlflow::venv_bin("mlflow").display()
        ),
    )
    .unwrap();
    let repo_url = s3
        .extra_env
        .iter()
        .find(|(k, _)| k == "LABCTL_REPO")
        .unwrap()
        .1
        .clone();
    let config = s3.path("labctl.toml");
    fs::write(
        &config,
        format!(
            "[repository]
url = \"{repo_url}\"
backup_key = \"{bk}\"
restore_key = \"{rk}\"
cache_dir = \"{cache}\"

[daemon]
metrics_listen = \"127.0.0.1:0\"
shutdown_grace = \"1s\"
missed_runs = \"skip\"

[notify]
webhook_url_env = \"HOOK\"

[[job]]
name = \"platform\"
schedule = \"*/3 * * * * *\"
backup = [
  {{ source = \"vm\", vm = \"controlador\", platform = \"{plat}\" }},
  {{ source = \"etcd\", endpoint = \"{etcd}\" }},
  {{ source = \"path\", path = \"{data}\" }},
  {{ source = \"kube\", namespace = [\"nlp-lab\"], kubeconfig = \"{kc}\" }},
  {{ source = \"pvc\", all = true, node = \"nodo1\", kubeconfig = \"{kc}\" }},
  {{ source = \"mlflow\", backend_store_uri = \"sqlite:///{mldb}\", artifacts = \"{mlart}\" }},
  {{ source = \"stream\", name = \"mlflow-db\", command = [\"cat\", \"{dump}\"] }},
]

[[job]]
name = \"drill\"
schedule = \"*/4 * * * * *\"
drill = {{ plan = \"{plan}\", cleanup = true }}
",
            bk = s3.backup_key.display(),
            rk = s3.restore_key.display(),
            cache = s3.cache.display(),
            etcd = etcd.url(),
            data = data.display(),
            dump = dump.display(),
            plan = plan.display(),
            kc = kc.display(),
            mldb = ml_db.display(),
            mlart = ml.join("artifacts").display(),
            plat = plat.display(),
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    s3.ok(&["config", "validate", "--config", cfg]);
    let (hook, got) = webhook_receiver();

    // Night one: points are made, a drill restores the newest one into
    // staging, verifies each source, records the RTO and cleans up.
    let mut d = Daemon::start(&s3, &config, &hook);
    let ready = d.wait_for(|l| l.contains("daemon ready"));
    let addr = ready
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .to_string();
    d.wait_for(|l| l.contains("job=platform finished outcome=success"));
    d.wait_for(|l| l.contains("job=drill finished outcome=success"));
    let (_, metrics) = http_get(&addr, "/metrics");
    let last = metric(
        &metrics,
        "labctl_drill_last_success_timestamp_seconds{job=\"drill\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!(last > 1.7e9, "{metrics}");
    let rto = metric(
        &metrics,
        "labctl_drill_rto_seconds{job=\"drill\",source=\"total\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!(rto > 0.0 && rto < 600.0, "{metrics}");
    assert!(
        metrics.contains("labctl_drill_rto_seconds{job=\"drill\",source=\"etcd:"),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "labctl_drill_rto_objective_seconds{job=\"drill\"}"
        ),
        Some(600.0)
    );
    assert!(
        metric(
            &metrics,
            "labctl_restore_point_age_seconds{job=\"platform\"}"
        )
        .is_some(),
        "{metrics}"
    );
    assert!(metric(&metrics, "labctl_repository_size_bytes").unwrap() > 3e6);
    d.stop();
    assert!(!stage.exists(), "cleanup removes what the drill created");
    let drills: Vec<serde_json::Value> =
        serde_json::from_slice(&s3.ok(&["--json", "drills", "--config", cfg]).stdout).unwrap();
    let passed = drills.iter().find(|r| r["outcome"] == "success").unwrap();
    let steps = passed["report"]["steps"].as_array().unwrap();
    let kinds: Vec<&str> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["vm", "etcd", "kube", "pvc", "path", "mlflow", "stream"],
        "{passed}"
    );
    // The VM came back as 9701 on the isolated bridge; cleanup destroyed
    // it and nothing else.
    let vstep = steps.iter().find(|s| s["kind"] == "vm").unwrap();
    assert!(
        vstep["verified"].as_str().unwrap().contains("VM 9701"),
        "{vstep}"
    );
    assert!(pve.with(|s| !s.vms.contains_key(&9701) && s.vms.contains_key(&701)));
    // The claim the Kubernetes step made was filled by a restore Job.
    let pstep = steps.iter().find(|s| s["kind"] == "pvc").unwrap();
    assert!(
        pstep["verified"]
            .as_str()
            .unwrap()
            .contains("into PVC nlp-lab-staging/nb1-data"),
        "{pstep}"
    );
    let reqs = kube.with(|s| s.requests.clone());
    assert!(
        reqs.iter().any(|r| r
            .starts_with("PATCH /apis/batch/v1/namespaces/nlp-lab-staging/jobs/labctl-restore-")),
        "{reqs:?}"
    );
    let mstep = steps.iter().find(|s| s["kind"] == "mlflow").unwrap();
    assert!(
        mstep["verified"]
            .as_str()
            .unwrap()
            .contains("serves 3 experiments, 6 runs, 1 registered models, 2 versions as backed up"),
        "{mstep}"
    );
    // The Kubernetes objects went into nlp-lab-staging (created, labelled)
    // and cleanup deleted the Profile and the namespace it made, nothing else.
    let reqs = kube.with(|s| s.requests.clone());
    assert!(
        reqs.iter()
            .any(|r| r == "PATCH /api/v1/namespaces/nlp-lab-staging"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r == "DELETE /apis/kubeflow.org/v1/profiles/nlp-lab-staging"),
        "{reqs:?}"
    );
    assert!(kube.get("namespaces", "", "nlp-lab-staging").is_none());
    assert!(kube.get("notebooks", "nlp-lab-staging", "nb1").is_none());
    assert!(kube.get("notebooks", "nlp-lab", "nb1").is_some());
    assert!(kube.get("profiles", "", "nlp-lab").is_some());
    let kstep = steps.iter().find(|s| s["kind"] == "kube").unwrap();
    assert!(
        kstep["verified"]
            .as_str()
            .unwrap()
            .contains("read back equal"),
        "{kstep}"
    );
    assert!(steps.iter().all(|s| s["verified"].is_string()), "{passed}");
    assert_eq!(passed["report"]["cleaned-up"], true);

    // A pack is lost from the bucket: the next drill fails, alerts, and
    // names the source and the file it could not bring back.
    let packs = list_sizes(s3.port, &s3.bucket, "repo/packs/");
    let (biggest, _) = packs.iter().max_by_key(|(_, n)| *n).unwrap();
    delete_object(s3.port, &s3.bucket, biggest);
    let mut d = Daemon::start(&s3, &config, &hook);
    let line = d.wait_for(|l| l.contains("job=drill finished outcome=failure"));
    d.stop();
    assert!(line.contains("big.ipynb"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let alert = loop {
        if let Some(a) = got.lock().unwrap().iter().find(|b| {
            b["job"] == "drill"
                && b["event"] == "failure"
                && b["text"].as_str().unwrap().contains("big.ipynb")
        }) {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no failure alert: {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = alert["text"].as_str().unwrap();
    assert!(
        text.contains("path ") && text.contains("big.ipynb"),
        "{text}"
    );
    let drills: Vec<serde_json::Value> =
        serde_json::from_slice(&s3.ok(&["--json", "drills", "--config", cfg]).stdout).unwrap();
    assert_eq!(drills[0]["outcome"], "failure", "{:?}", drills[0]);
    assert!(
        !stage.join("files").exists(),
        "a failed drill leaves no half-restored tree"
    );
    drop(etcd);
    drop(ml_prod);
}

/// Every query of the shipped Grafana dashboard names metrics labctl
/// exports, and the shipped alert rules for drills and points do too.
#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let exported = labctl::schedule::metrics::Metrics::default().render();
    let names: std::collections::BTreeSet<String> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let metric_names = |expr: &str| -> Vec<String> {
        let mut out = vec![];
        let b = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("labctl_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            out.push(expr[start..end].to_string());
            i = end;
        }
        out
    };
    let dash: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root.join("grafana/labctl.json")).unwrap())
            .unwrap();
    let mut used = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let m = metric_names(expr);
            assert!(!m.is_empty(), "{expr} names no labctl metric");
            for n in m {
                assert!(names.contains(&n), "{n} (in {expr:?}) is not exported");
                used.insert(n);
            }
        }
    }
    for needed in [
        "labctl_job_last_success_timestamp_seconds",
        "labctl_job_bytes_added_total",
        "labctl_repository_size_bytes",
        "labctl_drill_rto_seconds",
        "labctl_job_runs_total",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    let alerts = fs::read_to_string(root.join("prometheus/labctl-alerts.yaml")).unwrap();
    let rules: serde_json::Value = serde_norway::from_str(&alerts).unwrap();
    for r in rules["groups"][0]["rules"].as_array().unwrap() {
        for n in metric_names(r["expr"].as_str().unwrap()) {
            assert!(
                names.contains(&n),
                "alert {}: {n} is not exported",
                r["alert"]
            );
        }
    }
    for alert in [
        "LabctlNoSuccessfulDrill",
        "LabctlDrillRTOAboveObjective",
        "LabctlRestorePointStale",
    ] {
        assert!(alerts.contains(alert), "{alert}");
    }
    // The staging daemon's shipped config (restore key, drill job, linked
    // production config) validates against the shipped plans.
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["config", "validate", "--config"])
        .arg(root.join("labctl-staging.toml"))
        .output()
        .unwrap();
    assert_success(&out, &["config validate deploy/labctl-staging.toml"]);
    assert!(stdout(&out).contains("drill-staging"), "{}", stdout(&out));
}
