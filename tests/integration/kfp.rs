//! The `kubeflow-pipelines` source against two real MariaDB servers
//! (production and staging, Debian's mariadb-server; KFP 1.8's schemas from
//! tests/fixtures/kfp-1.8-schema.sql), buckets on the suite's S3 server
//! (moto) and the Kubernetes double for the quiesce.

use crate::common::*;
use crate::kube_sim::{KubeSim, Rule};
use crate::mariadb::MariaDb;
use crate::s3::{create_bucket, list_sizes, moto_port};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// PUT an object with a raw request (moto does not check signatures).
fn put_object(port: u16, bucket: &str, key: &str, data: &[u8]) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )
    .unwrap();
    s.write_all(data).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "PUT {key}: {resp}");
}

/// A PATH directory whose `mysql` and `mysqldump` record their argv in
/// `argv.log` and run the real programs.
fn recording_my_tools(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let shims = dir.join("my-shims");
    std::fs::create_dir_all(&shims).unwrap();
    for p in ["mysql", "mysqldump"] {
        let f = shims.join(p);
        std::fs::write(
            &f,
            format!(
                "#!/bin/sh\necho \"{p} $*\" >> {}\nexec /usr/bin/{p} \"$@\"\n",
                dir.join("argv.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    shims
}

fn replicas(sim: &KubeSim, name: &str) -> i64 {
    sim.get("deployments", "kubeflow", name).unwrap()["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

#[test]
fn kubeflow_pipelines_databases_and_bucket_restore_into_staging_as_backed_up() {
    use std::os::unix::fs::PermissionsExt;
    const PW: &str = "kfp-Pw-91c2";
    // Started side by side; a panic in one still stops the other.
    let (prod, staging) = std::thread::scope(|s| {
        let a = s.spawn(MariaDb::start);
        let b = MariaDb::start();
        (a.join().unwrap(), b)
    });
    prod.load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kfp-1.8-schema.sql"));
    for db in [&prod, &staging] {
        db.root_ok(&format!(
            "CREATE USER 'kfp'@'%' IDENTIFIED BY '{PW}'; GRANT ALL ON *.* TO 'kfp'@'%';"
        ));
    }
    let port = moto_port();
    let tag = format!("{:08x}", rand::random::<u32>());
    let (b_prod, b_stage) = (
        format!("mlpipeline-{tag}"),
        format!("mlpipeline-staging-{tag}"),
    );
    create_bucket(port, &b_prod, false);
    create_bucket(port, &b_stage, false);
    let model = noise(200_000, 7);
    put_object(
        port,
        &b_prod,
        "pipelines/v-1",
        b"pipelineInfo: {name: train-bert}\n",
    );
    put_object(
        port,
        &b_prod,
        "v2/artifacts/train-bert/r-1/model/model.bin",
        &model,
    );
    put_object(
        port,
        &b_prod,
        "artifacts/eval-abc14/metrics.tgz",
        &noise(3000, 8),
    );

    let sim = KubeSim::start();
    sim.with(|s| {
        s.put(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}),
        );
        for (name, n) in [("ml-pipeline", 1), ("ml-pipeline-persistenceagent", 2)] {
            s.put(
                "deployments",
                json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": "kubeflow"},
                "spec": {"replicas": n, "selector": {"matchLabels": {"app": name}}}}),
            );
        }
        // labctl's identity has exactly the shipped RBAC.
        s.rbac = Some(Rule::from_roles(
            &std::fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/kubernetes/labctl-backup-rbac.yaml"),
            )
            .unwrap(),
            &["ClusterRole", "Role"],
        ));
    });
    let env = Env::new();
    let home = env.path("kfp");
    std::fs::create_dir_all(&home).unwrap();
    let kc = sim.kubeconfig(&home);
    let pw = home.join("mysql.pw");
    std::fs::write(&pw, format!("{PW}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let creds = home.join("minio.credentials");
    std::fs::write(
        &creds,
        "[default]\naws_access_key_id = minio-kfp\naws_secret_access_key = minio-Secret-55\n",
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let shims = recording_my_tools(&home);
    let path = format!("{}:/usr/bin:/bin", shims.display());
    let labctl = |restore: bool, path: &str, args: &[&str]| {
        let mut c = env.cmd();
        c.env("PATH", path);
        if restore {
            c.env("LABCTL_RESTORE_KEY", &env.restore_key);
        } else {
            c.env("LABCTL_KEY", &env.backup_key);
        }
        c.args(args).output().unwrap()
    };
    let prod_uri = prod.uri("kfp");
    let bucket_url = format!("s3://{b_prod}");
    let backup_args = |uri: &str, pwfile: &Path, bucket: &str| -> Vec<String> {
        [
            "--json",
            "backup",
            "kubeflow-pipelines",
            "--mysql",
            uri,
            "--password-file",
            pwfile.to_str().unwrap(),
            "--bucket",
            bucket,
            "--s3-endpoint",
            &endpoint,
            "--s3-credentials-file",
            creds.to_str().unwrap(),
            "--quiesce",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let args = backup_args(&prod_uri, &pw, &bucket_url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = labctl(false, &path, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut said = stdout(&out) + &stderr(&out);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot-id"]
        .as_str()
        .unwrap()
        .to_string();
    // Quiesced for the dump, and back to 1 and 2 after it.
    assert_eq!(replicas(&sim, "ml-pipeline"), 1);
    assert_eq!(replicas(&sim, "ml-pipeline-persistenceagent"), 2);
    let scaled: Vec<String> = sim.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.ends_with("/scale"))
            .cloned()
            .collect()
    });
    assert_eq!(scaled.len(), 4, "{scaled:?}");
    let snaps = env.ok(&["--json", "snapshots"]);
    said += &stdout(&snaps);
    let snaps: Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let facts = &snaps[0]["facts"];
    assert_eq!(snaps[0]["source"]["kind"], "kubeflow-pipelines");
    assert_eq!(facts["kfp.counts"]["mlpipeline.run_details"], 4, "{facts}");
    assert_eq!(facts["kfp.counts"]["mlpipeline.pipelines"], 2, "{facts}");
    assert_eq!(
        facts["kfp.counts"]["mlpipeline.pipeline_versions"], 3,
        "{facts}"
    );
    assert_eq!(facts["kfp.counts"]["metadb.Execution"], 2, "{facts}");
    assert_eq!(
        facts["kfp.counts"]["cachedb.execution_caches"], 1,
        "{facts}"
    );
    assert!(facts.get("kfp.counts_after").is_none(), "{facts}");
    assert_eq!(facts["kfp.objects"]["count"], 3, "{facts}");
    assert_eq!(
        facts["kfp.quiesced"],
        json!({"kubeflow/ml-pipeline": 1, "kubeflow/ml-pipeline-persistenceagent": 2})
    );
    let ls = stdout(&env.ok_restore(&["ls", &id]));
    assert!(
        ls.contains("mysql/kfp.sql")
            && ls.contains("bucket/v2/artifacts/train-bert/r-1/model/model.bin"),
        "{ls}"
    );

    // Into the staging server and bucket.
    let stage_uri = staging.uri("kfp");
    let stage_bucket = format!("s3://{b_stage}");
    let restore_args: Vec<String> = [
        "--json",
        "restore",
        &id,
        "--kfp-mysql",
        &stage_uri,
        "--kfp-password-file",
        pw.to_str().unwrap(),
        "--kfp-bucket",
        &stage_bucket,
        "--kfp-s3-endpoint",
        &endpoint,
        "--kfp-s3-credentials-file",
        creds.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let ra: Vec<&str> = restore_args.iter().map(String::as_str).collect();
    let out = labctl(true, &path, &ra);
    assert!(out.status.success(), "{}", stderr(&out));
    said += &(stdout(&out) + &stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restore"]["rows"]["mlpipeline.run_details"], 4, "{r}");
    assert_eq!(r["restore"]["rows"]["metadb.Artifact"], 1, "{r}");
    assert_eq!(r["restore"]["objects"], 3, "{r}");
    assert_eq!(r["restore"]["objects_verified"], 3, "{r}");
    for q in [
        "SELECT HEX(proto_value) FROM metadb.ArtifactProperty WHERE name = 'metadata'",
        "SELECT Description FROM mlpipeline.pipelines WHERE UUID = 'p-2'",
        "SELECT Description FROM mlpipeline.run_details WHERE UUID = 'r-3'",
        "SELECT COUNT(*) FROM metadb.Event",
    ] {
        assert_eq!(staging.root_ok(q), prod.root_ok(q), "{q}");
    }
    assert_eq!(staging.root_ok("SHOW DATABASES LIKE 'labctl%'"), "");
    assert_eq!(
        list_sizes(port, &b_stage, ""),
        list_sizes(port, &b_prod, "")
    );
    // Again: the databases have tables now (exit 6), nothing touched.
    let out = labctl(true, &path, &ra);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // --overwrite replaces the databases whole.
    staging.root_ok("DELETE FROM mlpipeline.run_details; CREATE TABLE mlpipeline.stray (x int);");
    let mut again = ra.clone();
    again.push("--overwrite");
    let out = labctl(true, &path, &again);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        staging.root_ok("SELECT COUNT(*) FROM mlpipeline.run_details"),
        "4"
    );
    assert_eq!(
        staging.root_ok("SHOW TABLES FROM mlpipeline LIKE 'stray'"),
        "",
        "the replaced database holds only what was backed up"
    );
    assert_eq!(staging.root_ok("SHOW DATABASES LIKE 'labctl%'"), "");

    // The password and the S3 keys never left their files.
    let argv = std::fs::read_to_string(home.join("argv.log")).unwrap();
    for secret in [PW, "minio-Secret-55"] {
        assert!(
            !argv.contains(secret) && !said.contains(secret),
            "{secret} leaked:\n{argv}\n{said}"
        );
    }

    // A dump that fails: exit 1 naming it, nothing committed, and the
    // pipelines scaled back all the same.
    let failing = home.join("failing-bin");
    std::fs::create_dir_all(&failing).unwrap();
    std::os::unix::fs::symlink("/usr/bin/mysql", failing.join("mysql")).unwrap();
    let f = failing.join("mysqldump");
    std::fs::write(
        &f,
        "#!/bin/sh\necho 'mysqldump: Error 2013: Lost connection to server during query when dumping table `run_details` at row: 2' >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = labctl(
        false,
        &format!("{}:/usr/bin:/bin", failing.display()),
        &args,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("Lost connection"), "{}", stderr(&out));
    assert_eq!(replicas(&sim, "ml-pipeline"), 1);
    assert_eq!(replicas(&sim, "ml-pipeline-persistenceagent"), 2);
    // A wrong password (exit 5), a bucket that does not exist and missing
    // client programs (exit 2): nothing scaled, nothing committed.
    let bad = home.join("bad.pw");
    std::fs::write(&bad, "nope\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = sim.with(|s| s.requests.len());
    for (a, code, says) in [
        (
            backup_args(&prod_uri, &bad, &bucket_url),
            5,
            "refused the login",
        ),
        (
            backup_args(&prod_uri, &pw, &format!("s3://no-such-bucket-{tag}")),
            2,
            "does not exist",
        ),
    ] {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = labctl(false, &path, &a);
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    let empty = home.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = labctl(false, empty.to_str().unwrap(), &args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("mariadb-client"), "{}", stderr(&out));
    assert_eq!(sim.with(|s| s.requests.len()), before, "nothing was scaled");
    let snaps: Value = serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");

    // Without the shipped Role, quiesce is forbidden (exit 5) and says
    // which RBAC it needs.
    sim.with(|s| {
        s.rbac = Some(Rule::from_cluster_roles(
            &std::fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/kubernetes/labctl-backup-rbac.yaml"),
            )
            .unwrap(),
        ))
    });
    let out = labctl(false, &path, &args);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("deployments/scale"),
        "{}",
        stderr(&out)
    );

    // A nightly drill: the daemon backs KFP up as a restore point, restores
    // it into the staging server and an empty bucket through a plan,
    // verifies it, and its cleanup drops and deletes what it created.
    staging.root_ok("DROP DATABASE mlpipeline; DROP DATABASE metadb; DROP DATABASE cachedb;");
    let b_drill = format!("mlpipeline-drill-{tag}");
    create_bucket(port, &b_drill, false);
    let plan = home.join("staging.yaml");
    std::fs::write(
        &plan,
        format!(
            "environment: staging\nkubeflow_pipelines:\n  mysql: {stage_uri}\n  password_file: {}\n  bucket: s3://{b_drill}\n  s3_endpoint: {endpoint}\n  s3_credentials_file: {}\npath:\n  root: {}\n",
            pw.display(),
            creds.display(),
            home.join("stage-files").display()
        ),
    )
    .unwrap();
    let notes = home.join("notes");
    write(&notes.join("README"), b"the KFP backup's notes\n");
    let config = home.join("labctl.toml");
    std::fs::write(
        &config,
        format!(
            r#"[repository]
url = "{}"
backup_key = "{}"
restore_key = "{}"
cache_dir = "{}"

[daemon]
metrics_listen = ""

[[job]]
name = "kfp"
schedule = "*/3 * * * * *"
backup = [
  {{ source = "kubeflow-pipelines", mysql = "{prod_uri}", password_file = "{}", bucket = "{bucket_url}", s3_endpoint = "{endpoint}", s3_credentials_file = "{}" }},
  {{ source = "path", path = "{}" }},
]

[[job]]
name = "drill"
schedule = "*/4 * * * * *"
drill = {{ plan = "{}", cleanup = true }}
"#,
            env.repo.display(),
            env.backup_key.display(),
            env.restore_key.display(),
            env.cache.display(),
            pw.display(),
            creds.display(),
            notes.display(),
            plan.display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    env.ok(&[
        "restore-plan",
        "validate",
        plan.to_str().unwrap(),
        "--config",
        cfg,
    ]);
    let mut d = crate::drill::Daemon::spawn(env.cmd(), &config, "http://127.0.0.1:9/unused");
    d.wait_for(|l| l.contains("job=kfp finished outcome=success"));
    // (A drill that starts before the first point exists fails, saying so.)
    d.wait_for(|l| l.contains("job=drill finished outcome=success"));
    d.stop();
    let drills: Vec<Value> =
        serde_json::from_slice(&env.ok(&["--json", "drills", "--config", cfg]).stdout).unwrap();
    let report = drills.iter().find(|r| r["outcome"] == "success").unwrap();
    assert_eq!(report["outcome"], "success", "{report}");
    // After the path step: the order puts databases after files.
    let step = &report["report"]["steps"][1];
    assert_eq!(step["kind"], "kubeflow-pipelines", "{report}");
    assert!(
        step["verified"]
            .as_str()
            .unwrap()
            .contains("mlpipeline.run_details 4"),
        "{report}"
    );
    assert_eq!(report["report"]["cleaned-up"], true, "{report}");
    assert_eq!(
        staging.root_ok(
            "SHOW DATABASES WHERE `Database` IN ('mlpipeline', 'metadb', 'cachedb') OR `Database` LIKE 'labctl%'"
        ),
        "",
        "the drill's cleanup drops the databases it created"
    );
    assert!(
        list_sizes(port, &b_drill, "").is_empty(),
        "and deletes its objects"
    );
    // --dry-run lays the point out and writes nothing.
    let out = env.ok_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        plan.to_str().unwrap(),
        "--config",
        cfg,
        "--dry-run",
    ]);
    assert!(
        stdout(&out).contains("kubeflow-pipelines") && stdout(&out).contains(&b_drill),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        staging.root_ok("SHOW DATABASES WHERE `Database` IN ('mlpipeline', 'metadb', 'cachedb') OR `Database` LIKE 'labctl%'"),
        ""
    );
    assert!(list_sizes(port, &b_drill, "").is_empty());
}
