//! The `kube` source against the Kubernetes API test double
//! (`kube_sim.rs`): discovery with CRDs, paginated lists that must restart
//! after an expired `continue` token, what is left out and why, restore
//! into mapped namespaces with server-side apply in dependency order,
//! owner references re-linked, CRDs waited for, dry runs, conflicts, and
//! RBAC checked against the shipped ClusterRoles.

use crate::common::*;
use crate::kube_sim::{KubeSim, Rule};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn rules(file: &str) -> Vec<Rule> {
    Rule::from_cluster_roles(
        &std::fs::read_to_string(format!("{ROOT}/deploy/kubernetes/{file}")).unwrap(),
    )
}

fn notebook_crd() -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "notebooks.kubeflow.org"},
        "spec": {"group": "kubeflow.org", "scope": "Namespaced",
                 "names": {"plural": "notebooks", "singular": "notebook", "kind": "Notebook"},
                 "versions": [{"name": "v1", "served": true, "storage": true}, {"name": "v1beta1", "served": false, "storage": false}]}})
}

/// A lab cluster: a Kubeflow profile namespace with a notebook and its
/// StatefulSet and pod, secrets, services, a PVC, the noise a real
/// namespace holds (events, endpoints, leases, token secrets, the root CA
/// bundle), and a second namespace with enough ConfigMaps to need pages.
pub fn lab(sim: &KubeSim) {
    sim.with(|s| {
        s.put("customresourcedefinitions", notebook_crd());
        s.put("profiles", json!({"apiVersion": "kubeflow.org/v1", "kind": "Profile", "metadata": {"name": "nlp-lab", "uid": "prof-uid"}, "spec": {"owner": {"kind": "User", "name": "alice@uni.edu"}}}));
        s.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "nlp-lab", "annotations": {"owner": "alice@uni.edu"},
            "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "Profile", "name": "nlp-lab", "uid": "prof-uid", "controller": true}]}, "status": {"phase": "Active"}}));
        s.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vision"}}));
        s.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}));
        let ns = "nlp-lab";
        s.put("serviceaccounts", json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default-editor", "namespace": ns}}));
        s.put("rolebindings", json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "default-editor", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "default-editor", "namespace": ns}]}));
        // A ServiceAccount and binding of the lab's own (the profile
        // controller makes default-editor/default-viewer itself).
        s.put("serviceaccounts", json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer", "namespace": ns}}));
        s.put("rolebindings", json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "trainer-edit", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer", "namespace": ns}]}));
        s.put("configmaps", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": ns, "labels": {"app": "nb"},
            "managedFields": [{"manager": "kubectl"}], "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}, "data": {"lr": "0.001"}}));
        s.put("configmaps", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt", "namespace": ns}, "data": {"ca.crt": "PEM"}}));
        s.put("secrets", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": ns}, "type": "Opaque", "data": {"token": "c2VjcmV0"}}));
        s.put("secrets", json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "default-editor-token-x", "namespace": ns}, "type": "kubernetes.io/service-account-token", "data": {"token": "eA=="}}));
        s.put("services", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nb1", "namespace": ns}, "spec": {"clusterIP": "10.96.0.17", "clusterIPs": ["10.96.0.17"], "ports": [{"port": 80}]}}));
        s.put("services", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "nb1-headless", "namespace": ns}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}));
        s.put("persistentvolumeclaims", json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "nb1-data", "namespace": ns,
            "annotations": {"pv.kubernetes.io/bind-completed": "yes", "volume.kubernetes.io/selected-node": "nodo1"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path", "resources": {"requests": {"storage": "5Gi"}}, "volumeName": "pvc-1234"}, "status": {"phase": "Bound"}}));
        s.put("notebooks", json!({"apiVersion": "kubeflow.org/v1", "kind": "Notebook", "metadata": {"name": "nb1", "namespace": ns, "uid": "nb-uid"}, "spec": {"template": {"spec": {"containers": [{"name": "nb1", "image": "jupyter"}]}}}}));
        s.put("statefulsets", json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "nb1", "namespace": ns, "uid": "sts-uid",
            "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "Notebook", "name": "nb1", "uid": "nb-uid", "controller": true, "blockOwnerDeletion": true}]},
            "spec": {"replicas": 1, "serviceName": "nb1-headless"}, "status": {"readyReplicas": 1}}));
        s.put("pods", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nb1-0", "namespace": ns,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "nb1", "uid": "sts-uid", "controller": true}]}, "spec": {"containers": [{"name": "nb1"}]}}));
        s.put("pods", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug", "namespace": ns}, "spec": {"containers": [{"name": "sh"}]}}));
        s.put("events", json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "nb1.1", "namespace": ns}, "reason": "Started"}));
        s.put("endpoints", json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "nb1", "namespace": ns}}));
        s.put("endpointslices", json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "nb1-x", "namespace": ns}}));
        s.put("leases", json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "nb", "namespace": ns}}));
        for i in 0..1200 {
            s.put("configmaps", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("shard-{i:04}"), "namespace": "vision"}, "data": {"i": i.to_string()}}));
        }
        s.put("clusterroles", json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kubeflow-edit"}, "rules": []}));
    });
}

fn json_out(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

fn restore_cluster(
    env: &Env,
    snap: &str,
    kc: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "--json",
        "restore",
        snap,
        "--to-cluster",
        "--kubeconfig",
        kc.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    env.run_restore(&args)
}

#[test]
fn namespaces_back_up_paginated_and_restore_into_mapped_namespaces() {
    let env = Env::new();
    let sim = KubeSim::start();
    lab(&sim);
    let kc = sim.kubeconfig(env.dir.path());
    let kcs = kc.to_str().unwrap();
    // The backup identity holds exactly the shipped read-only role, and the
    // first continue token it presents has expired (etcd compacted).
    sim.with(|s| {
        s.rbac = Some(rules("labctl-backup-rbac.yaml"));
        s.expire_continue = 1;
    });
    let out = env.ok(&[
        "--json",
        "backup",
        "kube",
        "-n",
        "nlp-lab",
        "-n",
        "vision",
        "--kubeconfig",
        kcs,
    ]);
    let b = json_out(&out);
    let snap = b["snapshot-id"].as_str().unwrap().to_string();
    let snaps = json_out(&env.ok(&["--json", "snapshots"]));
    let facts = &snaps[0]["facts"];
    assert_eq!(facts["kube.list_restarts"], 1, "{facts}");
    assert_eq!(facts["kube.kinds"]["ConfigMap"], 1201, "{facts}");
    assert_eq!(facts["kube.kinds"]["Notebook.kubeflow.org"], 1, "{facts}");
    let left = facts["kube.left_out"].as_object().unwrap();
    let kinds = facts["kube.kinds_left_out"].as_object().unwrap();
    for k in [
        "events",
        "events.events.k8s.io",
        "endpoints",
        "endpointslices.discovery.k8s.io",
        "leases.coordination.k8s.io",
        "pods.metrics.k8s.io",
    ] {
        assert!(kinds.contains_key(k), "{k} not in {kinds:?}");
    }
    for why in [
        "pods, replicasets and jobs owned",
        "service-account token",
        "kube-root-ca.crt",
    ] {
        assert!(
            left.keys().any(|k| k.starts_with(why)),
            "{why} not in {left:?}"
        );
    }
    // The tree: one cleaned YAML file per object.
    let ls = stdout(&env.ok_restore(&["ls", &snap]));
    for p in [
        "_cluster/core/Namespace/nlp-lab.yaml",
        "_cluster/kubeflow.org/Profile/nlp-lab.yaml",
        "nlp-lab/kubeflow.org/Notebook/nb1.yaml",
        "nlp-lab/apps/StatefulSet/nb1.yaml",
        "nlp-lab/core/Pod/debug.yaml",
        "nlp-lab/core/Secret/hf-token.yaml",
        "vision/core/ConfigMap/shard-1199.yaml",
    ] {
        assert!(ls.contains(p), "{p} not in the listing");
    }
    for p in [
        "nb1-0.yaml",
        "kube-root-ca.crt",
        "default-editor-token-x",
        "Event/",
        "Lease/",
        "_cluster/core/Namespace/kube-system",
    ] {
        assert!(!ls.contains(p), "{p} should be left out");
    }
    let t = env.path("tree");
    env.ok_restore(&[
        "restore",
        &snap,
        "--target",
        t.to_str().unwrap(),
        "--path",
        "nlp-lab",
    ]);
    let sts: Value = serde_norway::from_str(
        &std::fs::read_to_string(t.join("nlp-lab/apps/StatefulSet/nb1.yaml")).unwrap(),
    )
    .unwrap();
    assert!(
        sts["metadata"].get("uid").is_none() && sts["metadata"].get("resourceVersion").is_none()
    );
    assert!(sts.get("status").is_none() && sts["metadata"].get("creationTimestamp").is_none());
    assert_eq!(sts["metadata"]["ownerReferences"][0]["name"], "nb1");
    let cm: Value = serde_norway::from_str(
        &std::fs::read_to_string(t.join("nlp-lab/core/ConfigMap/settings.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        cm,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "nlp-lab", "labels": {"app": "nb"}}, "data": {"lr": "0.001"}})
    );

    // A dry run into staging namespaces reads and writes nothing.
    let before = sim.with(|s| s.requests.len());
    let out = restore_cluster(
        &env,
        &snap,
        &kc,
        &["--namespace-map", "*=*-staging", "--dry-run"],
    );
    assert_success(&out, &["restore --dry-run"]);
    let r = json_out(&out)["kube"].clone();
    assert_eq!(r["dry_run"], true);
    assert!(r["created"].as_u64().unwrap() > 1200, "{r}");
    assert!(sim.with(|s| s.requests[before..].iter().all(|q| q.starts_with("GET "))));
    assert!(sim.get("namespaces", "", "nlp-lab-staging").is_none());

    // With only the backup role, every write is refused by RBAC: each
    // object fails with the authorizer's reason, the others are tried.
    let out = restore_cluster(
        &env,
        &snap,
        &kc,
        &["--namespace-map", "nlp-lab=nlp-lab-staging"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let r = json_out(&out)["kube"].clone();
    assert_eq!(r["created"], 0);
    let reason = r["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["action"] == "failed")
        .unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("cannot patch resource") && reason.contains("labctl-restore-rbac.yaml"),
        "{reason}"
    );
    assert!(r["objects"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["action"] == "skip" && o["namespace"] == "vision"));

    // With the shipped restore role: nlp-lab comes back as nlp-lab-staging.
    sim.with(|s| s.rbac = Some(rules("labctl-restore-rbac.yaml")));
    let out = restore_cluster(
        &env,
        &snap,
        &kc,
        &["--namespace-map", "nlp-lab=nlp-lab-staging"],
    );
    assert_success(&out, &["restore --to-cluster"]);
    let r = json_out(&out)["kube"].clone();
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["verified"], r["created"], "{r}");
    assert_eq!(r["created_namespaces"], json!(["nlp-lab-staging"]));
    let ns = sim.get("namespaces", "", "nlp-lab-staging").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["labctl.io/restore"]
            .as_str()
            .unwrap()
            .len(),
        8
    );
    assert_eq!(ns["metadata"]["annotations"]["owner"], "alice@uni.edu");
    let prof = sim.get("profiles", "", "nlp-lab-staging").unwrap();
    assert_eq!(prof["spec"]["owner"]["name"], "alice@uni.edu");
    assert_eq!(
        ns["metadata"]["ownerReferences"][0]["uid"],
        prof["metadata"]["uid"]
    );
    let rb = sim
        .get("rolebindings", "nlp-lab-staging", "trainer-edit")
        .unwrap();
    assert_eq!(rb["subjects"][0]["namespace"], "nlp-lab-staging");
    assert_eq!(
        rb["metadata"]["managedFields"][0]["manager"],
        "labctl-restore"
    );
    let svc = sim.get("services", "nlp-lab-staging", "nb1").unwrap();
    assert!(svc["spec"].get("clusterIP").is_none(), "{svc}");
    assert_eq!(
        sim.get("services", "nlp-lab-staging", "nb1-headless")
            .unwrap()["spec"]["clusterIP"],
        "None"
    );
    let pvc = sim
        .get("persistentvolumeclaims", "nlp-lab-staging", "nb1-data")
        .unwrap();
    assert!(pvc["spec"].get("volumeName").is_none());
    assert!(pvc["metadata"]["annotations"]
        .get("volume.kubernetes.io/selected-node")
        .is_none());
    let nb = sim.get("notebooks", "nlp-lab-staging", "nb1").unwrap();
    let sts = sim.get("statefulsets", "nlp-lab-staging", "nb1").unwrap();
    assert_eq!(
        sts["metadata"]["ownerReferences"][0]["uid"],
        nb["metadata"]["uid"]
    );
    assert_ne!(nb["metadata"]["uid"], "nb-uid");
    assert_eq!(
        sim.get("secrets", "nlp-lab-staging", "hf-token").unwrap()["data"]["token"],
        "c2VjcmV0"
    );
    assert!(sim.get("pods", "nlp-lab-staging", "nb1-0").is_none());
    assert!(sim
        .get("configmaps", "vision-staging", "shard-0000")
        .is_none());
    // Applied in dependency order: the namespace before what is in it,
    // roles' subjects' ServiceAccount before the binding, workloads late.
    let order: Vec<String> = sim.with(|s| {
        s.requests
            .iter()
            .filter(|q| q.starts_with("PATCH"))
            .cloned()
            .collect()
    });
    let at = |frag: &str| {
        order
            .iter()
            .position(|q| q.contains(frag))
            .unwrap_or_else(|| panic!("{frag} not applied: {order:?}"))
    };
    assert!(at("/namespaces/nlp-lab-staging") < at("/serviceaccounts/trainer"));
    assert!(at("/serviceaccounts/trainer") < at("/rolebindings/trainer-edit"));
    assert!(at("/rolebindings/trainer-edit") < at("/configmaps/settings"));
    assert!(at("/persistentvolumeclaims/") < at("/statefulsets/"));

    // Again: everything exists and is skipped.
    let r = json_out(&restore_cluster(
        &env,
        &snap,
        &kc,
        &["--namespace-map", "nlp-lab=nlp-lab-staging"],
    ))["kube"]
        .clone();
    assert_eq!(r["created"], 0);
    assert_eq!(
        r["skipped"],
        r["objects"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["action"] == "exists")
            .count()
    );
    // --existing update: a field someone else applied differently is a
    // reported conflict (409), the rest is applied.
    sim.with(|s| {
        let key = ("configmaps".to_string(), "nlp-lab-staging".to_string(), "settings".to_string());
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"lr": "0.1"}});
        s.apply_as(key, "ConfigMap", "v1", cm, "kubectl");
    });
    let out = restore_cluster(
        &env,
        &snap,
        &kc,
        &[
            "--namespace-map",
            "nlp-lab=nlp-lab-staging",
            "--existing",
            "update",
            "--path",
            "nlp-lab/core",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let r = json_out(&out)["kube"].clone();
    let failed: Vec<&Value> = r["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["action"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{r}");
    assert_eq!(failed[0]["name"], "settings");
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("conflict"),
        "{r}"
    );
    assert!(r["updated"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(
        sim.get("configmaps", "nlp-lab-staging", "settings")
            .unwrap()["data"]["lr"],
        "0.1"
    );
}

#[test]
fn cluster_resources_crds_waited_for_and_failures_named() {
    let env = Env::new();
    let prod = KubeSim::start();
    lab(&prod);
    let d = tempfile::tempdir().unwrap();
    let kc = prod.kubeconfig(d.path());
    let kcs = kc.to_str().unwrap();
    // The metrics API's backend is down: the snapshot is written, partial,
    // naming the group (exit 3).
    prod.with(|s| s.metrics_down = true);
    let out = env.run(&[
        "--json",
        "backup",
        "kube",
        "--all-namespaces",
        "--cluster-resources",
        "--kubeconfig",
        kcs,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("metrics.k8s.io/v1beta1 did not answer discovery"),
        "{}",
        stdout(&out)
    );
    prod.with(|s| s.metrics_down = false);
    let b = json_out(&env.ok(&[
        "--json",
        "backup",
        "kube",
        "--all-namespaces",
        "--cluster-resources",
        "--kubeconfig",
        kcs,
    ]));
    let snap = b["snapshot-id"].as_str().unwrap().to_string();
    let ls = stdout(&env.ok_restore(&["ls", &snap]));
    assert!(
        ls.contains(
            "_cluster/apiextensions.k8s.io/CustomResourceDefinition/notebooks.kubeflow.org.yaml"
        ),
        "{ls}"
    );
    assert!(ls.contains("_cluster/rbac.authorization.k8s.io/ClusterRole/kubeflow-edit.yaml"));
    assert!(ls.contains("_cluster/core/Namespace/kube-system.yaml"));

    // A new, empty cluster: the CRD is applied first, its kind served only
    // once it is Established (the double takes a second), then the
    // notebooks follow.
    let staging = KubeSim::start();
    staging.with(|s| s.crd_delay = std::time::Duration::from_millis(1000));
    let d2 = tempfile::tempdir().unwrap();
    let kc2 = staging.kubeconfig(d2.path());
    let dry = json_out(&restore_cluster(&env, &snap, &kc2, &["--dry-run"]))["kube"].clone();
    let nb = dry["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "Notebook")
        .unwrap()
        .clone();
    assert_eq!(nb["action"], "create");
    assert_eq!(nb["reason"], "after its CRD is established");
    assert!(staging
        .get("customresourcedefinitions", "", "notebooks.kubeflow.org")
        .is_none());
    let out = restore_cluster(&env, &snap, &kc2, &[]);
    assert_success(&out, &["restore --to-cluster (new cluster)"]);
    let r = json_out(&out)["kube"].clone();
    assert_eq!(r["failed"], 0, "{r}");
    assert!(staging.get("notebooks", "nlp-lab", "nb1").is_some());
    assert!(staging
        .get("persistentvolumeclaims", "nlp-lab", "nb1-data")
        .is_some());

    // Kinds named: only they are read, default exclusions included.
    let b = json_out(&env.ok(&[
        "--json",
        "backup",
        "kube",
        "-n",
        "nlp-lab",
        "--include-kinds",
        "events,Lease",
        "--exclude-kinds",
        "leases.coordination.k8s.io",
        "--kubeconfig",
        kcs,
    ]));
    let ls = stdout(&env.ok_restore(&["ls", b["snapshot-id"].as_str().unwrap()]));
    assert!(ls.contains("nlp-lab/core/Event/nb1.1.yaml"), "{ls}");
    assert!(!ls.contains("ConfigMap") && !ls.contains("Lease/"), "{ls}");

    // Failures before anything is read: a wrong token (exit 5), a closed
    // port (exit 1), a kind the role may not list (exit 5, naming it);
    // none commits a snapshot.
    let count = || {
        json_out(&env.ok(&["--json", "snapshots"]))
            .as_array()
            .unwrap()
            .len()
    };
    let n = count();
    let bad = d.path().join("bad-kubeconfig");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&kc)
            .unwrap()
            .replace(crate::kube_sim::TOKEN, "wrong"),
    )
    .unwrap();
    let out = env.run(&[
        "backup",
        "kube",
        "-A",
        "--kubeconfig",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused labctl's credentials"),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("wrong"),
        "the token must not be printed"
    );
    let port = crate::etcd::free_port();
    let closed = d.path().join("closed-kubeconfig");
    std::fs::write(
        &closed,
        std::fs::read_to_string(&kc)
            .unwrap()
            .replace(&format!(":{}", prod.port), &format!(":{port}")),
    )
    .unwrap();
    let out = env.run(&[
        "backup",
        "kube",
        "-A",
        "--kubeconfig",
        closed.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
    prod.with(|s| {
        s.rbac = Some(vec![Rule {
            api_groups: vec!["*".into()],
            resources: vec![
                "namespaces".into(),
                "configmaps".into(),
                "secrets".into(),
                "profiles".into(),
            ],
            verbs: vec!["get".into(), "list".into()],
            resource_names: vec![],
        }]);
    });
    let out = env.run(&["backup", "kube", "-n", "nlp-lab", "--kubeconfig", kcs]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("forbidden by RBAC")
            && e.contains("cannot list resource")
            && e.contains("labctl-backup-rbac.yaml"),
        "{e}"
    );
    assert_eq!(count(), n);
    // Settings are checked before anything runs.
    let out = env.run(&["backup", "kube", "--kubeconfig", kcs]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.run(&["backup", "kube", "-n", "Bad_NS", "--kubeconfig", kcs]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.run_restore(&[
        "restore",
        &snap,
        "--to-cluster",
        "--kubeconfig",
        kcs,
        "--namespace-map",
        "nlp-lab",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
