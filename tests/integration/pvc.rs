//! The `pvc` source: local-path claims resolved through the Kubernetes
//! double to directories on "this node", backed up as trees, restored into
//! a directory and into a new claim through a Job (schema-checked by the
//! double), and every claim that is not ours reported with its reason.

use crate::common::*;
use crate::kube_sim::KubeSim;
use serde_json::{json, Value};
use std::path::Path;

fn out_json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

fn affinity(node: &str) -> Value {
    json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}})
}

/// Claims as local-path provisions them: hostPath (or local) volumes under
/// the provisioner's directory, pinned to a node.
fn claims(sim: &KubeSim, root: &Path) {
    let pvc = |ns: &str, name: &str, pv: Option<&str>| {
        let mut c = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "nb"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path", "resources": {"requests": {"storage": "5Gi"}}, "volumeMode": "Filesystem"},
            "status": {"phase": "Pending"}});
        if let Some(pv) = pv {
            c["spec"]["volumeName"] = json!(pv);
            c["status"]["phase"] = json!("Bound");
        }
        c
    };
    let dir = |n: &str| root.join(n).display().to_string();
    sim.with(|s| {
        for ns in ["nlp-lab", "vision", "nlp-lab-staging"] {
            s.put(
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            );
        }
        s.put("persistentvolumeclaims", pvc("nlp-lab", "nb1-data", Some("pvc-1")));
        s.put("persistentvolumes", json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-1"},
            "spec": {"capacity": {"storage": "5Gi"}, "storageClassName": "local-path", "hostPath": {"path": dir("pvc-1_nlp-lab_nb1-data"), "type": "DirectoryOrCreate"}, "nodeAffinity": affinity("nodo1")}}));
        s.put("persistentvolumeclaims", pvc("vision", "dataset", Some("pvc-4")));
        s.put("persistentvolumes", json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-4"},
            "spec": {"capacity": {"storage": "20Gi"}, "storageClassName": "local-path", "local": {"path": dir("pvc-4_vision_dataset")}, "nodeAffinity": affinity("nodo1")}}));
        s.put("persistentvolumeclaims", pvc("nlp-lab", "elsewhere", Some("pvc-2")));
        s.put("persistentvolumes", json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-2"},
            "spec": {"storageClassName": "local-path", "hostPath": {"path": "/opt/local-path-provisioner/pvc-2"}, "nodeAffinity": affinity("nodo2")}}));
        s.put("persistentvolumeclaims", pvc("nlp-lab", "waiting", None));
        s.put("persistentvolumeclaims", pvc("nlp-lab", "shared", Some("pvc-3")));
        s.put("persistentvolumes", json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-3"},
            "spec": {"nfs": {"server": "10.0.0.5", "path": "/export"}}}));
        s.put("persistentvolumeclaims", pvc("nlp-lab", "ceph", Some("pvc-5")));
        s.put("persistentvolumes", json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pvc-5"},
            "spec": {"csi": {"driver": "rook-ceph.rbd.csi.ceph.com", "volumeHandle": "x"}}}));
    });
    let nb = root.join("pvc-1_nlp-lab_nb1-data");
    write(&nb.join("notebook.ipynb"), &noise(200_000, 3));
    write(&nb.join(".jupyter/config.json"), b"{}");
    let ds = root.join("pvc-4_vision_dataset");
    for i in 0..20 {
        write(&ds.join(format!("shard-{i}.bin")), &noise(10_000, i));
    }
}

#[test]
fn pvcs_on_this_node_are_backed_up_as_trees_and_the_rest_reported() {
    let env = Env::new();
    let sim = KubeSim::start();
    let root = env.path("local-path");
    claims(&sim, &root);
    let kc = sim.kubeconfig(env.dir.path());
    let kcs = kc.to_str().unwrap();
    let out = env.ok(&[
        "--json",
        "backup",
        "pvc",
        "--all",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]);
    let r = out_json(&out);
    let snaps = r["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{r}");
    assert!(r["restore-point"].as_str().unwrap().starts_with("pvcs-"));
    let notes = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "PVC nlp-lab/elsewhere: belongs to node nodo2",
        "PVC nlp-lab/waiting: not bound to a volume (phase Pending)",
        "PVC nlp-lab/shared: volume pvc-3 is of type nfs",
        "PVC nlp-lab/ceph: volume pvc-5 is of type csi (driver rook-ceph.rbd.csi.ceph.com)",
    ] {
        assert!(notes.contains(want), "{want} not in {notes}");
    }
    let list = out_json(&env.ok(&["--json", "snapshots"]));
    let nb = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"]["name"] == "pvc/nlp-lab/nb1-data")
        .unwrap()
        .clone();
    assert_eq!(nb["source"]["kind"], "pvc");
    assert_eq!(nb["facts"]["pvc.node"], "nodo1");
    assert_eq!(nb["facts"]["pvc.storage_class"], "local-path");
    assert_eq!(nb["facts"]["pvc.capacity"], "5Gi");
    assert_eq!(nb["facts"]["pvc.volume"], "pvc-1");
    assert_eq!(
        nb["facts"]["pvc.spec"]["resources"]["requests"]["storage"],
        "5Gi"
    );
    // The tree round trip.
    let id = nb["id"].as_str().unwrap().to_string();
    let t = env.path("restored");
    env.ok_restore(&["restore", &id, "--target", t.to_str().unwrap()]);
    assert_same_tree(&root.join("pvc-1_nlp-lab_nb1-data"), &t);

    // The daemon's job: the claims resolved at run time, one complete
    // point, what was left out in the run's detail.
    let cfg = crate::common::daemon_config(
        &env,
        &format!("[[job]]\nname = \"pvc-data\"\nschedule = \"30 2 * * *\"\nbackup = {{ source = \"pvc\", all = true, node = \"nodo1\", kubeconfig = \"{kcs}\" }}\n"),
    );
    let c = cfg.to_str().unwrap();
    env.ok(&["config", "validate", "--config", c]);
    let out = env.ok(&["jobs", "run", "pvc-data", "--config", c]);
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        all.contains("complete") && all.contains("belongs to node nodo2"),
        "{all}"
    );
    let points = out_json(&env.ok(&["--json", "points"]));
    let p = points
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"].as_str().unwrap().starts_with("pvc-data-"))
        .unwrap();
    assert_eq!(p["complete"], true, "{p}");
    assert_eq!(p["members"].as_array().unwrap().len(), 2);

    // One claim by name; one on another node is left to its agent; one
    // that does not exist is an error.
    let r = out_json(&env.ok(&[
        "--json",
        "backup",
        "pvc",
        "-n",
        "nlp-lab",
        "--name",
        "nb1-data",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]));
    assert!(r["snapshot-id"].is_string(), "{r}");
    let out = env.ok(&[
        "backup",
        "pvc",
        "-n",
        "nlp-lab",
        "--name",
        "elsewhere",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]);
    assert!(
        stderr(&out).contains("belongs to node nodo2")
            && stderr(&out).contains("nothing to back up here"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&[
        "backup",
        "pvc",
        "-n",
        "nlp-lab",
        "--name",
        "ghost",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("PVC nlp-lab/ghost does not exist"));
    let out = env.run(&["backup", "pvc", "--kubeconfig", kcs]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // A directory that vanished: that claim fails, naming it; nothing of
    // it is committed.
    let n = out_json(&env.ok(&["--json", "snapshots"]))
        .as_array()
        .unwrap()
        .len();
    std::fs::remove_dir_all(root.join("pvc-4_vision_dataset")).unwrap();
    let out = env.run(&[
        "backup",
        "pvc",
        "-n",
        "vision",
        "--name",
        "dataset",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("PVC vision/dataset: its directory")
            && stderr(&out).contains("pvc-4_vision_dataset"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        out_json(&env.ok(&["--json", "snapshots"]))
            .as_array()
            .unwrap()
            .len(),
        n
    );

    // --to-pvc needs a repository the cluster reaches.
    let out = env.run_restore(&[
        "restore",
        &id,
        "--to-pvc",
        "nlp-lab-staging/nb1-data",
        "--kubeconfig",
        kcs,
        "--restore-key",
        env.restore_key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("use an s3:// repository"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_pvc_restore_creates_the_claim_and_a_job_that_mounts_it() {
    let s3 = crate::s3::S3Env::new(false);
    assert_success(&s3.init(&["--no-escrow"]), &["repo init"]);
    let sim = KubeSim::start();
    let root = s3.path("local-path");
    claims(&sim, &root);
    let kc = sim.kubeconfig(&s3.path(""));
    let kcs = kc.to_str().unwrap();
    let r = out_json(&s3.ok(&[
        "--json",
        "backup",
        "pvc",
        "-n",
        "nlp-lab",
        "--name",
        "nb1-data",
        "--node",
        "nodo1",
        "--kubeconfig",
        kcs,
    ]));
    let id = r["snapshot-id"].as_str().unwrap().to_string();
    let rk = s3.restore_key.to_str().unwrap().to_string();
    let restore = |target: &str| {
        s3.run_restore(&[
            "--json",
            "restore",
            &id,
            "--to-pvc",
            target,
            "--storage-class",
            "local-path-staging",
            "--image",
            "labctl:test",
            "--job-timeout",
            "20s",
            "--kubeconfig",
            kcs,
            "--restore-key",
            &rk,
        ])
    };
    // Under exactly the shipped restore role.
    let role = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/labctl-restore-rbac.yaml"),
    )
    .unwrap();
    sim.with(|s| {
        s.job_outcome = Some(true);
        s.rbac = Some(crate::kube_sim::Rule::from_cluster_roles(&role));
    });
    let out = restore("nlp-lab-staging/nb1-data");
    assert_success(&out, &["restore --to-pvc"]);
    let r = out_json(&out)["pvc"].clone();
    assert_eq!(r["outcome"], "restored");
    let claim = sim
        .get("persistentvolumeclaims", "nlp-lab-staging", "nb1-data")
        .unwrap();
    assert_eq!(claim["spec"]["storageClassName"], "local-path-staging");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "5Gi");
    assert!(claim["spec"].get("volumeName").is_none());
    let job_name = r["job"].as_str().unwrap();
    let job = sim.get("jobs", "nlp-lab-staging", job_name).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "nb1-data"
    );
    assert_eq!(pod["containers"][0]["image"], "labctl:test");
    assert_eq!(
        pod["containers"][0]["args"],
        json!(["restore", id, "--target", "/data", "--overwrite"])
    );
    let text = job.to_string();
    let key = std::fs::read_to_string(&s3.restore_key).unwrap();
    assert!(
        !text.contains(key.trim()) && !text.contains("testing"),
        "no secret in the Job itself"
    );
    // The key travelled in a Secret that is gone once the Job finished.
    let reqs = sim.with(|s| s.requests.clone());
    let secret = format!("/api/v1/namespaces/nlp-lab-staging/secrets/{job_name}");
    assert!(
        reqs.contains(&format!("PATCH {secret}")) && reqs.contains(&format!("DELETE {secret}")),
        "{reqs:?}"
    );
    assert!(sim.get("secrets", "nlp-lab-staging", job_name).is_none());
    assert!(!stdout(&out).contains(key.trim()) && !stderr(&out).contains(key.trim()));

    // The claim exists now: refused, nothing changed.
    let out = restore("nlp-lab-staging/nb1-data");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // A Job that fails: exit 1 naming it, the half-filled claim deleted.
    sim.with(|s| s.job_outcome = Some(false));
    let out = restore("nlp-lab-staging/second");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("failed: Job has reached the specified backoff limit"),
        "{}",
        stderr(&out)
    );
    assert!(sim
        .get("persistentvolumeclaims", "nlp-lab-staging", "second")
        .is_none());
    // A namespace that does not exist: the double refuses the writes.
    sim.with(|s| s.job_outcome = Some(true));
    let out = restore("no-such-ns/x");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("namespaces \"no-such-ns\" not found"),
        "{}",
        stderr(&out)
    );
}

/// The agent DaemonSet is what the API accepts (typed round trip, as the
/// double checks Jobs), takes its node name from the downward API, mounts
/// local-path's directory read-only, and carries a config labctl accepts;
/// the image runs as the user the manifests expect.
#[test]
fn the_agent_daemonset_and_the_image_are_sound() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/labctl-agent.yaml")).unwrap();
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let typed: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(ds.clone()).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    fn covered(want: &Value, got: &Value, path: &str) {
        match (want, got) {
            (Value::Object(w), Value::Object(g)) => {
                for (k, v) in w {
                    let p = format!("{path}.{k}");
                    covered(
                        v,
                        g.get(k)
                            .unwrap_or_else(|| panic!("{p}: field not in the DaemonSet schema")),
                        &p,
                    );
                }
            }
            (Value::Array(w), Value::Array(g)) => {
                for (i, (a, b)) in w.iter().zip(g).enumerate() {
                    covered(a, b, &format!("{path}[{i}]"));
                }
            }
            _ => {}
        }
    }
    covered(ds, &back, "");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert!(c["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    let m = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "local-path")
        .unwrap();
    assert_eq!(m["readOnly"], true);
    let v = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "local-path")
        .unwrap();
    assert_eq!(
        v["hostPath"]["path"], m["mountPath"],
        "the PV's hostPath must be the path read"
    );
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("labctl.toml");
    std::fs::write(&cfg, cm["data"]["labctl.toml"].as_str().unwrap()).unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args(["config", "validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_success(&out, &["config validate (agent)"]);
    let cf = std::fs::read_to_string(root.join("deploy/container/Containerfile")).unwrap();
    assert!(cf.matches("\nFROM ").count() >= 2, "multi-stage");
    assert!(cf.contains("\nUSER 10001:10001\n"), "non-root");
    assert!(cf.contains("etcd-client") && cf.contains("cargo build --release --locked"));
}
