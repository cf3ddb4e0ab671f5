//! `labctl restore --to staging` and restore plans: a point of a real etcd
//! member, a tree and a stream goes into staging in order, each verified,
//! with the RTO reported; a plan that names production is refused before
//! anything is written; `--dry-run` writes nothing for any target kind.

use crate::common::daemon_config as config;
use crate::common::*;
use crate::etcd::{free_port, Etcd};
use std::fs;
use std::path::{Path, PathBuf};

/// A job backing up an etcd member, a tree and a database dump (a stream).
fn platform_job(etcd_url: &str, data: &Path, dump: &Path) -> String {
    format!(
        "[[job]]\nname = \"platform\"\nschedule = \"0 2 * * *\"\nbackup = [\n  {{ source = \"etcd\", endpoint = \"{etcd_url}\" }},\n  {{ source = \"path\", path = \"{}\" }},\n  {{ source = \"stream\", name = \"db\", command = [\"cat\", \"{}\"] }},\n]\n",
        data.display(),
        dump.display()
    )
}

fn plan(env: &Env, name: &str, stage: &Path, extra_etcd: &str, existing: &str) -> PathBuf {
    let p = env.path(name);
    fs::write(
        &p,
        format!(
            "environment: staging
rto_objective: 10m
etcd:
  data_dir: {stage}/etcd
  name: staging
  initial_advertise_peer_urls: http://127.0.0.1:{peer}
  sentinel_key: /registry/namespaces/kube-system
  existing: {existing}
{extra_etcd}path:
  root: {stage}/files
  existing: {existing}
stream:
  commands:
    db:
      command: [sh, -c, 'cat > {stage}-db.loaded']
      verify: [grep, -q, 'INSERT INTO runs', {stage}-db.loaded]
",
            stage = stage.display(),
            peer = free_port(),
        ),
    )
    .unwrap();
    p
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

#[test]
fn restore_to_staging_restores_a_point_in_order_verifies_each_source_and_reports_the_rto() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = Etcd::start(&env.path("etcd-prod"), "cp1", free_port(), None);
    let mut c = crate::etcd::client(&rt, &etcd.url(), None);
    let kv: std::collections::BTreeMap<String, Vec<u8>> = (0..300)
        .map(|i| {
            (
                format!("/registry/configmaps/ns/cm{i}"),
                vec![b'x'; 100 + i],
            )
        })
        .chain([(
            "/registry/namespaces/kube-system".to_string(),
            b"{}".to_vec(),
        )])
        .collect();
    crate::etcd::put_all(&rt, &mut c, &kv);
    let data = env.path("data");
    write(&data.join("notebooks/a.ipynb"), &noise(300_000, 1));
    write(&data.join("etc/config"), b"setting = 1\n");
    std::os::unix::fs::symlink("etc/config", data.join("link")).unwrap();
    let dump = env.path("dump.sql");
    fs::write(&dump, b"INSERT INTO runs VALUES (1);\n").unwrap();
    let cfg = config(&env, &platform_job(&etcd.url(), &data, &dump));
    let c = cfg.to_str().unwrap();
    env.ok(&["jobs", "run", "platform", "--config", c]);
    let stage = env.path("stage");
    let p = plan(&env, "staging.yaml", &stage, "", "refuse");
    let pl = p.to_str().unwrap();
    env.ok(&["restore-plan", "validate", pl, "--config", c]);

    // The dry run lays out the point in dependency order and writes nothing.
    let out = env.ok_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        pl,
        "--config",
        c,
        "--dry-run",
    ]);
    let prep = json(&out);
    let kinds: Vec<&str> = prep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["etcd", "path", "stream"], "{prep}");
    assert!(prep["bytes"].as_u64().unwrap() > 300_000, "{prep}");
    assert!(!stage.exists() && !env.path("stage-db.loaded").exists());
    // The backup key may look at a plan, but not restore one.
    let out = env.run(&["restore", "--to", "staging", "--plan", pl, "--config", c]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(!stage.exists());

    // The restore: every source restored and verified, the RTO measured.
    let out = env.run_restore(&[
        "--json", "restore", "--to", "staging", "--plan", pl, "--config", c,
    ]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report}\n{}", stderr(&out));
    assert_eq!(report["outcome"], "success", "{report}");
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(report["within-objective"], true);
    let steps = report["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["outcome"] == "restored"), "{report}");
    let verified: Vec<&str> = steps
        .iter()
        .map(|s| s["verified"].as_str().unwrap())
        .collect();
    assert!(
        verified[0].contains(&format!("serves {} keys", kv.len())),
        "{verified:?}"
    );
    assert!(verified[0].contains("sentinel key"), "{verified:?}");
    assert!(verified[1].contains("entries present"), "{verified:?}");
    assert!(verified[2].contains("exited 0"), "{verified:?}");
    let restored_tree = labctl::restore::plan::under(&stage.join("files"), &data);
    assert_same_tree(&data, &restored_tree);
    assert_eq!(
        fs::read(env.path("stage-db.loaded")).unwrap(),
        fs::read(&dump).unwrap()
    );
    // The staging member is a real etcd data directory: start it, read it.
    let member = Etcd::start(&stage.join("etcd"), "staging", free_port(), None);
    let mut sc = crate::etcd::client(&rt, &member.url(), None);
    let got = rt
        .block_on(sc.get("/registry/namespaces/kube-system", None))
        .unwrap();
    assert_eq!(got.count(), 1);
    drop(member);

    // Again with `existing: refuse`: the targets holding data fail and are
    // left alone, the stream (a command) still loads; exit 6.
    let before = fs::read_dir(&restored_tree).unwrap().count();
    let out = env.run_restore(&[
        "--json", "restore", "--to", "staging", "--plan", pl, "--config", c,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["outcome"], "failure");
    let outcomes: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "restored"], "{report}");
    assert!(
        report["steps"][1]["error"]
            .as_str()
            .unwrap()
            .contains("holds data"),
        "{report}"
    );
    assert_eq!(fs::read_dir(&restored_tree).unwrap().count(), before);

    // With `existing: replace` the old copies are swapped out whole.
    write(&restored_tree.join("stale"), b"from an older drill");
    let p2 = plan(&env, "replace.yaml", &stage, "", "replace");
    let out = env.run_restore(&[
        "restore",
        "--to",
        "staging",
        "--plan",
        p2.to_str().unwrap(),
        "--config",
        c,
        "--only",
        "path,etcd",
    ]);
    assert_success(&out, &["restore --to staging (replace)"]);
    assert!(
        stdout(&out).contains("left out by --only: stream db"),
        "{}",
        stdout(&out)
    );
    assert_same_tree(&data, &restored_tree);
    let leftovers: Vec<_> = fs::read_dir(&stage)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".labctl"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Production needs the point's ID typed again.
    let prod = env.path("production.yaml");
    fs::write(
        &prod,
        format!(
            "environment: production\npath:\n  root: {}\n",
            env.path("prod-root").display()
        ),
    )
    .unwrap();
    let out = env.run_restore(&[
        "restore",
        "--to",
        "production",
        "--plan",
        prod.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs --confirm platform-"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("prod-root").exists());
    let out = env.run_restore(&[
        "restore",
        "--to",
        "staging",
        "--plan",
        prod.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is a plan for production"),
        "{}",
        stderr(&out)
    );

    // A damaged point: the packs of a newer point's tree are gone. The
    // source whose data is missing fails, named with its pack; the others
    // are still restored.
    let packs_before: std::collections::BTreeSet<_> = env.packs().into_iter().collect();
    write(&data.join("notebooks/b.ipynb"), &noise(2_000_000, 2));
    env.ok(&["jobs", "run", "platform", "--config", c]);
    let largest_new = env
        .packs()
        .into_iter()
        .filter(|p| !packs_before.contains(p))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    fs::remove_file(&largest_new).unwrap();
    let stage2 = env.path("stage2");
    let p3 = plan(&env, "damaged.yaml", &stage2, "", "refuse");
    let out = env.run_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        p3.to_str().unwrap(),
        "--config",
        c,
        "--only",
        "path,stream",
    ]);
    let report = json(&out);
    assert_ne!(out.status.code(), Some(0), "{report}");
    let path_step = &report["steps"][0];
    assert_eq!(path_step["kind"], "path");
    assert_eq!(path_step["outcome"], "failed", "{report}");
    assert!(
        path_step["error"].as_str().unwrap().contains("b.ipynb"),
        "{report}"
    );
    assert_eq!(report["steps"][1]["outcome"], "restored", "{report}");
}

#[test]
fn a_staging_plan_that_names_production_is_refused_before_anything_is_written() {
    let env = Env::new();
    let data = env.path("prod-data");
    write(&data.join("f"), b"production");
    let cfg = config(
        &env,
        &format!(
            "[[job]]\nname = \"platform\"\nschedule = \"0 2 * * *\"\nbackup = [\n  {{ source = \"etcd\", endpoint = \"https://127.0.0.1:2379\" }},\n  {{ source = \"path\", path = \"{}\" }},\n  {{ source = \"stream\", name = \"mlflow\", command = [\"pg_dump\", \"--format=custom\", \"--dbname=mlflow\"] }},\n  {{ source = \"kube\", all_namespaces = true }},\n  {{ source = \"mlflow\", backend_store_uri = \"sqlite:////srv/mlflow/mlflow.db\", artifacts = \"/srv/mlflow/artifacts\" }},\n]\n",
            data.display()
        ),
    );
    let c = cfg.to_str().unwrap();
    let p = env.path("bad.yaml");
    fs::write(
        &p,
        format!(
            "environment: staging
etcd:
  data_dir: {stage}/etcd
  name: staging
  initial_advertise_peer_urls: http://localhost:2380
path:
  root: {data}/staging
stream:
  dir: {stage}/streams
  commands:
    mlflow:
      command: [pg_restore, --clean, --dbname=mlflow]
kube:
  namespace_map:
    \"nlp-lab\": \"nlp-lab\"
  cluster_resources: true
mlflow:
  backend_store_uri: sqlite:////srv/mlflow/mlflow.db
  artifacts: /srv/mlflow/artifacts/staging
",
            stage = env.path("stage").display(),
            data = data.display()
        ),
    )
    .unwrap();
    let pl = p.to_str().unwrap();
    let out = env.run(&["restore-plan", "validate", pl, "--config", c]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let e = stderr(&out);
    let file = p.display().to_string();
    assert!(e.contains(&format!("{file}:5: field `etcd.initial_advertise_peer_urls`: http://localhost:2380 is the production etcd member of job `platform`")), "{e}");
    assert!(e.contains(&format!("{file}:7: field `path.root`")), "{e}");
    assert!(e.contains("which job `platform` of"), "{e}");
    assert!(
        e.contains(&format!(
            "{file}:11: field `stream.mlflow`: the command loads database \"mlflow\""
        )),
        "{e}"
    );

    assert!(e.contains(&format!("{file}:14: field `kube.namespace_map`: nlp-lab: nlp-lab restores into a namespace production backs up")), "{e}");
    assert!(
        e.contains(&format!(
            "{file}:16: field `kube.cluster_resources`: the cluster is production's"
        )),
        "{e}"
    );
    assert!(e.contains(&format!("{file}:18: field `mlflow.backend_store_uri`: /srv/mlflow/mlflow.db is the production MLflow database job `platform` backs up")), "{e}");
    assert!(e.contains(&format!("{file}:19: field `mlflow.artifacts`: /srv/mlflow/artifacts/staging overlaps the production artifact root")), "{e}");
    // No map at all in production's cluster: refused too; a map that
    // renames every namespace is fine.
    let kube_only = |body: &str| {
        let p = env.path("kube.yaml");
        fs::write(&p, format!("environment: staging\nkube:\n{body}")).unwrap();
        env.run(&[
            "restore-plan",
            "validate",
            p.to_str().unwrap(),
            "--config",
            c,
        ])
    };
    let out = kube_only("  context: lab\n");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("field `kube.context`: the cluster is production's"),
        "{}",
        stderr(&out)
    );
    let out = kube_only("  namespace_map:\n    \"*\": \"*\"\n");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_success(
        &kube_only("  context: lab\n  namespace_map:\n    \"*\": \"*-staging\"\n"),
        &["kube plan"],
    );
    // PVC data into production's cluster without renamed namespaces: refused.
    let p = env.path("pvc.yaml");
    fs::write(&p, "environment: staging\npvc:\n  context: lab\n").unwrap();
    let out = env.run(&[
        "restore-plan",
        "validate",
        p.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("pvc.yaml:3: field `pvc.context`: the cluster is production's"),
        "{}",
        stderr(&out)
    );
    let out = kube_only("  namespace_map:\n    \"*\": \"staging\"\n");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kube.yaml:3: field `kube.namespace_map`"),
        "{}",
        stderr(&out)
    );

    // restore --to staging with it: refused before any read or write.
    env.ok(&[
        "backup",
        "path",
        data.to_str().unwrap(),
        "--restore-point",
        "p1",
    ]);
    let out = env.run_restore(&["restore", "--to", "staging", "--plan", pl, "--config", c]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("points at production, nothing was written"));
    assert!(!env.path("stage").exists() && !data.join("staging").exists());

    // The shipped plans are valid against the shipped daemon config.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut plans: Vec<String> = fs::read_dir(root.join("restore-plans"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(!plans.is_empty());
    plans.sort();
    let mut args = vec!["restore-plan", "validate", "--config"];
    let shipped_cfg = root.join("deploy/labctl.toml");
    args.push(shipped_cfg.to_str().unwrap());
    args.extend(plans.iter().map(|s| s.as_str()));
    let out = env.ok(&args);
    assert!(
        stdout(&out).contains(
            "staging.yaml: ok (staging; targets: vm, etcd, kube, pvc, path, mlflow, kubeflow-pipelines, stream; RTO objective 30m)"
        ),
        "{}",
        stdout(&out)
    );
    // Against the shipped platform file: the staging range and bridge are
    // not production's; production's bridge or a range holding VMID 701 is.
    let platform = root.join("deploy/platform.yaml");
    let shipped = fs::read_to_string(root.join("restore-plans/staging.yaml"))
        .unwrap()
        .replace(
            "platform: /etc/labctl/platform.yaml",
            &format!("platform: {}", platform.display()),
        );
    let here = env.path("shipped-staging.yaml");
    fs::write(&here, &shipped).unwrap();
    let out = env.ok(&[
        "restore-plan",
        "validate",
        here.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert!(!stderr(&out).contains("not checked"), "{}", stderr(&out));
    let bad = env.path("bad-vm.yaml");
    fs::write(
        &bad,
        shipped
            .replace("vmid_range: 9701-9703", "vmid_range: 700-710")
            .replace("bridge: vmbr99", "bridge: vmbr0"),
    )
    .unwrap();
    let out = env.run(&[
        "restore-plan",
        "validate",
        bad.to_str().unwrap(),
        "--config",
        c,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("field `vm.vmid_range`: 700-710 holds VMID 701 (controlador)"),
        "{e}"
    );
    assert!(
        e.contains("field `vm.bridge`: bridge vmbr0 carries production VM"),
        "{e}"
    );
    // ... and the shipped staging plan against a config whose job backs up
    // the staging MLflow database (as production) is refused.
    let clash = config(
        &env,
        "[[job]]\nname = \"oops\"\nschedule = \"0 2 * * *\"\nbackup = { source = \"mlflow\", backend_store_uri = \"postgresql://mlflow@mlflow-db.lab.internal:5432/mlflow_staging\", artifacts = \"/srv/elsewhere\" }\n",
    );
    let out = env.run(&[
        "restore-plan",
        "validate",
        "--config",
        clash.to_str().unwrap(),
        &plans[0],
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
}

#[test]
fn staging_clears_setuid_bits_production_keeps_them_and_at_picks_the_point_by_time() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let data = env.path("data");
    write(&data.join("bin/tool"), b"#!/bin/sh\n");
    fs::set_permissions(data.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    let d = data.to_str().unwrap();
    env.ok(&["backup", "path", d, "--restore-point", "night-1"]);
    let stage = env.path("stage");
    let plan = env.path("staging.yaml");
    fs::write(
        &plan,
        format!("environment: staging\npath:\n  root: {}\n", stage.display()),
    )
    .unwrap();
    let pl = plan.to_str().unwrap();
    let out = env.ok_restore(&["--json", "restore", "--to", "staging", "--plan", pl]);
    assert_eq!(json(&out)["point"], "night-1");
    let restored = labctl::restore::plan::under(&stage, &fs::canonicalize(&data).unwrap());
    let mode = fs::metadata(restored.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "staging restores clear setuid");

    // --at: the newest complete point at or before a time; none before the first.
    let out = env.run_restore(&[
        "restore",
        "--to",
        "staging",
        "--plan",
        pl,
        "--at",
        "2001-01-01",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no complete restore point at or before"));
    let out = env.run_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        pl,
        "--at",
        "2999-01-01",
        "--dry-run",
    ]);
    // A dry run that finds a target it would refuse says so with exit 6.
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let prep = json(&out);
    assert_eq!(prep["point"], "night-1");
    assert!(prep["steps"][0]["state"]
        .as_str()
        .unwrap()
        .contains("holds data"));
    assert!(prep["steps"][0]["problem"]
        .as_str()
        .unwrap()
        .contains("existing: refuse"));

    // Production keeps the bits, and needs the point typed again.
    let prod_root = env.path("prod");
    let prod = env.path("production.yaml");
    fs::write(
        &prod,
        format!(
            "environment: production\npath:\n  root: {}\n",
            prod_root.display()
        ),
    )
    .unwrap();
    env.ok_restore(&[
        "restore",
        "--to",
        "production",
        "--plan",
        prod.to_str().unwrap(),
        "--confirm",
        "night-1",
    ]);
    let restored = labctl::restore::plan::under(&prod_root, &fs::canonicalize(&data).unwrap());
    let mode = fs::metadata(restored.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o4755, "a production restore keeps setuid");
}

#[test]
fn a_staging_plan_that_loads_into_production_databases_or_buckets_is_refused() {
    let env = Env::new();
    let cfg = config(
        &env,
        "[[job]]\nname = \"platform\"\nschedule = \"0 2 * * *\"\nbackup = [\n  { source = \"mlflow\", backend_store_uri = \"postgresql://mlflow@db.lab:5432/mlflow\", artifacts = \"/srv/mlflow/artifacts\" },\n  { source = \"kubeflow-pipelines\", mysql = \"mysql://root@mysql.kubeflow:3306\", bucket = \"s3://mlpipeline\", s3_endpoint = \"http://minio.kubeflow:9000\" },\n]\n",
    );
    let c = cfg.to_str().unwrap();
    let validate = |name: &str, body: &str| {
        let p = env.path(name);
        fs::write(&p, format!("environment: staging\n{body}")).unwrap();
        env.run(&[
            "restore-plan",
            "validate",
            p.to_str().unwrap(),
            "--config",
            c,
        ])
    };
    let out = validate(
        "prod.yaml",
        "mlflow:
  backend_store_uri: postgresql://stager@db.lab:5432/mlflow
  artifacts: /srv/staging/artifacts
kubeflow_pipelines:
  mysql: mysql://stager@mysql.kubeflow:3306
  bucket: s3://mlpipeline
  s3_endpoint: http://minio.kubeflow:9000
",
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let e = stderr(&out);
    for want in [
        "prod.yaml:3: field `mlflow.backend_store_uri`: postgresql://stager@db.lab:5432/mlflow is the production MLflow database job `platform` backs up",
        "prod.yaml:6: field `kubeflow_pipelines.mysql`: mysql://stager@mysql.kubeflow:3306 is the production MySQL server job `platform` dumps Kubeflow Pipelines from",
        "prod.yaml:7: field `kubeflow_pipelines.bucket`: s3://mlpipeline is the production bucket job `platform` backs up",
    ] {
        assert!(e.contains(want), "{want}\n{e}");
    }
    // Another database on the same server, another MySQL server, the same
    // bucket name on another endpoint: staging's own.
    assert_success(
        &validate(
            "ok.yaml",
            "mlflow:
  backend_store_uri: postgresql://stager@db.lab:5432/mlflow_staging
  password_file: /etc/labctl/stager.pw
  artifacts: /srv/staging/artifacts
kubeflow_pipelines:
  mysql: mysql://stager@mysql-staging.lab:3306
  bucket: s3://mlpipeline
  s3_endpoint: http://minio-staging.lab:9000
",
        ),
        &["ok plan"],
    );
    // Malformed targets: file, line and field; never the password.
    let bad = [
        (
            "kubeflow_pipelines:\n  mysql: mysql://root:hunter2@x:3306\n  bucket: s3://b\n",
            "bad1.yaml:3: field `kubeflow_pipelines.mysql`",
        ),
        (
            "kubeflow_pipelines:\n  mysql: mysql://root@x:3306\n  bucket: mlpipeline\n",
            "bad2.yaml:4: field `kubeflow_pipelines.bucket`",
        ),
        (
            "mlflow:\n  backend_store_uri: sqlite:////srv/s/m.db\n  password_file: /etc/pw\n  artifacts: /srv/s/a\n",
            "bad3.yaml:4: field `mlflow.password_file`",
        ),
        (
            "kubeflow_pipelines:\n  mysql: mysql://root@x:3306\n  bucket: s3://b\n  passwd_file: /x\n",
            "bad4.yaml:5",
        ),
    ];
    for (i, (body, want)) in bad.iter().enumerate() {
        let out = validate(&format!("bad{}.yaml", i + 1), body);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(want) && !stderr(&out).contains("hunter2"),
            "{want}\n{}",
            stderr(&out)
        );
    }
}
