//! Policy files: the shipped example validates and renders exactly what
//! Kubeflow expects; every validation error names file, line and field.

use crate::common::{assert_success, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn labctl(policies: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .env_clear()
        .args(args)
        .arg("--policies")
        .arg(policies)
        .args(["--today", "2026-11-26"])
        .output()
        .unwrap()
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn find<'a>(
    objs: &'a [serde_json::Value],
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    objs.iter().find(|o| {
        o["kind"] == kind
            && o["metadata"]["name"] == name
            && (ns.is_empty() || o["metadata"]["namespace"] == ns)
    })
}

#[test]
fn the_example_policies_validate_and_render_what_kubeflow_expects() {
    let out = labctl(&example(), &["policy", "validate"]);
    assert_success(&out, &["policy validate"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).is_empty(),
        "no warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = labctl(&example(), &["--json", "policy", "render"]);
    assert_success(&out, &["policy render"]);
    let objs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    // Profile: owner and quota copied verbatim, managed label.
    let p = find(&objs, "Profile", "", "nlp-lab").unwrap();
    assert_eq!(
        p["spec"]["owner"],
        serde_json::json!({"kind": "User", "name": "maria.lopez@uni.edu"})
    );
    assert_eq!(
        p["spec"]["resourceQuotaSpec"]["hard"]["requests.nvidia.com/gpu"],
        "2"
    );
    assert_eq!(
        p["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "labctl"
    );
    assert!(
        p["spec"].get("contributors").is_none(),
        "Profile has no contributors field"
    );
    let lr = find(&objs, "LimitRange", "nlp-lab", "labctl-defaults").unwrap();
    assert_eq!(lr["spec"]["limits"][0]["defaultRequest"]["memory"], "2Gi");
    // Alice: KFAM-exact RoleBinding and AuthorizationPolicy, one subject.
    let rb = find(
        &objs,
        "RoleBinding",
        "nlp-lab",
        "user-alice-uni-edu-clusterrole-edit",
    )
    .unwrap();
    assert_eq!(
        rb["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"})
    );
    assert_eq!(
        rb["subjects"],
        serde_json::json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice@uni.edu"}])
    );
    assert_eq!(rb["metadata"]["annotations"]["role"], "edit");
    assert_eq!(rb["metadata"]["annotations"]["user"], "alice@uni.edu");
    assert_eq!(
        rb["metadata"]["annotations"]["labctl.io/expires"],
        "2027-09-30"
    );
    assert_eq!(
        rb["metadata"]["annotations"]["labctl.io/reason"],
        "PhD thesis, supervisor M. López"
    );
    let ap = find(
        &objs,
        "AuthorizationPolicy",
        "nlp-lab",
        "user-alice-uni-edu-clusterrole-edit",
    )
    .unwrap();
    assert_eq!(ap["apiVersion"], "security.istio.io/v1beta1");
    assert_eq!(
        ap["spec"]["rules"][0]["when"][0],
        serde_json::json!({"key": "request.headers[kubeflow-userid]", "values": ["alice@uni.edu"]})
    );
    assert_eq!(
        ap["spec"]["rules"][0]["from"][0]["source"]["principals"],
        serde_json::json!([
            "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
            "cluster.local/ns/kubeflow/sa/ml-pipeline-ui"
        ])
    );
    // The group is expanded into per-user bindings, with the source group.
    let bob = find(
        &objs,
        "RoleBinding",
        "nlp-lab",
        "user-bob-uni-edu-clusterrole-edit",
    )
    .unwrap();
    assert_eq!(
        bob["metadata"]["annotations"]["labctl.io/source-group"],
        "nlp-students-2027s1"
    );
    assert_eq!(
        bob["metadata"]["annotations"]["labctl.io/expires"],
        "2027-07-15"
    );
    // Highest role wins: Bob's direct view on nlp-teaching loses to the group's edit.
    assert!(find(
        &objs,
        "RoleBinding",
        "nlp-teaching",
        "user-bob-uni-edu-clusterrole-edit"
    )
    .is_some());
    assert!(find(
        &objs,
        "RoleBinding",
        "nlp-teaching",
        "user-bob-uni-edu-clusterrole-view"
    )
    .is_none());
    // The reviewer: view-only, no AuthorizationPolicy (no notebooks).
    assert!(find(
        &objs,
        "RoleBinding",
        "nlp-lab",
        "user-reviewer-partner-lab-org-clusterrole-view"
    )
    .is_some());
    assert!(find(
        &objs,
        "AuthorizationPolicy",
        "nlp-lab",
        "user-reviewer-partner-lab-org-clusterrole-view"
    )
    .is_none());
    // The owner gets no contributor binding (the controller's namespaceAdmin covers it).
    assert!(!objs
        .iter()
        .any(|o| o["metadata"]["annotations"]["user"] == "maria.lopez@uni.edu"));
    assert_eq!(objs.len(), 15);
    // YAML output carries the same objects.
    let out = labctl(&example(), &["policy", "render"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert_eq!(yaml.matches("\n---\n").count() + 1, 15);
}

#[test]
fn expiry_removes_access_and_expiring_lists_it() {
    // After the semester (and Bob's programme), the group's bindings are gone.
    let out = Command::new(BIN)
        .env_clear()
        .args(["--json", "policy", "render", "--policies"])
        .arg(example())
        .args(["--today", "2027-08-01"])
        .output()
        .unwrap();
    assert_success(&out, &["render after expiry"]);
    let objs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!objs
        .iter()
        .any(|o| o["metadata"]["annotations"]["labctl.io/source-group"] == "nlp-students-2027s1"));
    assert!(find(
        &objs,
        "RoleBinding",
        "nlp-lab",
        "user-alice-uni-edu-clusterrole-edit"
    )
    .is_some());
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    let out = labctl(
        &example(),
        &["--json", "policy", "expiring", "--within", "20w"],
    );
    assert_success(&out, &["expiring"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["user"] == "reviewer@partner-lab.org" && r["expires"] == "2027-03-31"),
        "{rows:?}"
    );
    assert!(
        !rows.iter().any(|r| r["user"] == "alice@uni.edu"),
        "{rows:?}"
    );
    // who-has-access and access explain the path.
    let out = labctl(
        &example(),
        &["--json", "profile", "who-has-access", "nlp-lab"],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["user"] == "carla@uni.edu" && r["via"] == "group nlp-students-2027s1"),
        "{rows:?}"
    );
    let out = labctl(&example(), &["--json", "access", "bob@uni.edu"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let out = labctl(&example(), &["--json", "profile", "list"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows[0],
        serde_json::json!({"profile": "nlp-lab", "owner": "maria.lopez@uni.edu", "quota-class": "gpu-small", "contributors": 4})
    );
}

/// Copies the example, applies `edit` to one file, validates; returns stderr.
fn broken(file: &str, edit: impl Fn(&str) -> String) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("p");
    for entry in [
        "settings.yaml",
        "people.yaml",
        "groups.yaml",
        "quotas.yaml",
        "profiles/nlp-lab.yaml",
        "profiles/teaching.yaml",
    ] {
        let text = std::fs::read_to_string(example().join(entry)).unwrap();
        let text = if entry == file { edit(&text) } else { text };
        std::fs::create_dir_all(dst.join(entry).parent().unwrap()).unwrap();
        std::fs::write(dst.join(entry), text).unwrap();
    }
    let out = labctl(&dst, &["policy", "validate"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", dst.display()), ""),
    )
}

#[test]
fn reserved_namespaces_and_kfam_name_collisions_are_refused() {
    for ns in [
        "kubeflow",
        "istio-system",
        "kube-system",
        "kube-anything",
        "default",
        "kubeflow-user-example-com",
    ] {
        let (code, err) = broken("profiles/teaching.yaml", |t| {
            t.replacen("name: nlp-teaching", &format!("name: {ns}"), 1)
        });
        assert_eq!(code, Some(2), "{ns}: {err}");
        assert!(
            err.contains(&format!(
                "profiles/teaching.yaml:3: field `name`: '{ns}' is a reserved namespace"
            )),
            "{ns}: {err}"
        );
    }
    // Settings.reservedNamespaces adds the lab's own.
    let (code, err) = broken("settings.yaml", |t| {
        format!("{t}reservedNamespaces: [nlp-teaching]\n")
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("'nlp-teaching' is a reserved namespace"),
        "{err}"
    );
    // Two people whose emails collapse to one KFAM binding name.
    for twin in ["alice-@uni.edu", "Alice@uni.edu", "-alice@uni.edu"] {
        let (code, err) = broken("people.yaml", |t| {
            format!("{t}---\nkind: Researcher\nemail: {twin}\nname: Twin\n")
        });
        assert_eq!(code, Some(2), "{twin}: {err}");
        assert!(err.contains("same KFAM binding name"), "{twin}: {err}");
        // Both entries' lines: alice's (7) and the twin's (25).
        assert!(err.contains("people.yaml:7"), "{twin}: {err}");
        assert!(err.contains("people.yaml:25"), "{twin}: {err}");
    }
    // An apostrophe is a valid address; a double dot is not.
    let (code, err) = broken("people.yaml", |t| {
        format!("{t}---\nkind: Researcher\nemail: o'neil@uni.edu\nname: O'Neil\n")
    });
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = broken("people.yaml", |t| {
        t.replacen("email: carla@uni.edu", "email: carla@uni..edu", 1)
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("people.yaml:16: field `email`: 'carla@uni..edu' is not an email address"),
        "{err}"
    );
}

#[test]
fn every_validation_error_names_file_line_and_field() {
    // (file, text, replacement, the error expected)
    let cases = [
        ("profiles/nlp-lab.yaml", "    role: edit\n    expires: 2027-09-30", "    role: edit\n    expire: 2027-09-30", "profiles/nlp-lab.yaml:9: field `grants[0].expire`: unknown field `expire`"),
        ("profiles/nlp-lab.yaml", "user: alice@uni.edu", "user: alicia@uni.edu", "profiles/nlp-lab.yaml:7: field `grants[0].user`: 'alicia@uni.edu' is not a Researcher"),
        ("profiles/nlp-lab.yaml", "group: nlp-students-2027s1", "group: nlp-students", "profiles/nlp-lab.yaml:11: field `grants[1].group`: no Group 'nlp-students'"),
        ("people.yaml", "email: carla@uni.edu", "email: carla(at)uni.edu", "people.yaml:16: field `email`: 'carla(at)uni.edu' is not an email address"),
        ("profiles/teaching.yaml", "name: nlp-teaching", "name: nlp-lab", "profiles/teaching.yaml:3: field `name`: Profile 'nlp-lab' is defined twice (first at"),
        ("quotas.yaml", "requests.nvidia.com/gpu: \"2\"", "nvidia.com/gpu: \"2\"", "quotas.yaml:19: field `hard.nvidia.com/gpu`: 'nvidia.com/gpu': an extended resource is quota'd only as requests.nvidia.com/gpu"),
        ("quotas.yaml", "limitRange:\n  defaultRequest: { cpu: 500m, memory: 1Gi }\n  default: { cpu: \"2\", memory: 4Gi }\n", "", "quotas.yaml:3: field `limitRange`: a cpu/memory quota rejects pods"),
        ("profiles/nlp-lab.yaml", "expires: 2027-09-30", "expires: 2029-09-30", "profiles/nlp-lab.yaml:9: field `grants[0].expires`: 2029-09-30 is more than 400 days away"),
        ("profiles/nlp-lab.yaml", "role: edit\n    expires", "role: owner\n    expires", "profiles/nlp-lab.yaml:8: field `grants[0].role`: 'owner': use view, edit or admin"),
        ("groups.yaml", "  - carla@uni.edu", "  - dave@uni.edu", "groups.yaml:7: field `members[1]`: 'dave@uni.edu' is not a Researcher"),
        ("settings.yaml", "kind: Settings", "kind: Setting", "settings.yaml:2: field `kind`: unknown kind 'Setting'"),
    ];
    for (file, from, to, want) in cases {
        let (code, err) = broken(file, |t| t.replacen(from, to, 1));
        assert_eq!(code, Some(2), "{want}\n{err}");
        assert!(err.contains(want), "want: {want}\ngot:  {err}");
    }
    // Warnings (exit 0): GPU quotas past capacity, entries already expired.
    let (code, err) = broken("settings.yaml", |t| {
        t.replace("gpuCapacity: 8", "gpuCapacity: 1")
    });
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("GPU quotas add up to 2 but Settings.gpuCapacity is 1"),
        "{err}"
    );
    let (code, err) = broken("people.yaml", |t| {
        t.replace("expires: 2027-03-31", "expires: 2026-01-31")
    });
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("people.yaml:22: Researcher reviewer@partner-lab.org expired on 2026-01-31"),
        "{err}"
    );
}

#[test]
fn quotas_and_limit_ranges_are_checked_as_the_api_server_checks_them() {
    // What ValidateResourceQuota / ValidateLimitRange refuse, at the line
    // of the offending key (quoted keys included).
    let hard = "  persistentvolumeclaims: \"10\"\n  requests.storage: 200Gi";
    let refused = [
        (hard.replace("\"10\"", "\"1.5\""), "quotas.yaml:8: field `hard.persistentvolumeclaims`: '1.5' must be an integer for persistentvolumeclaims"),
        (format!("{hard}\n  pods: 500m"), "quotas.yaml:10: field `hard.pods`: '500m' must be an integer for pods"),
        (format!("{hard}\n  \"requests.nvidia.com/GPU_x!\": \"1\""), "quotas.yaml:10: field `hard.requests.nvidia.com/GPU_x!`: 'requests.nvidia.com/GPU_x!' is not a resource name"),
        (format!("{hard}\n  count/foo!: \"1\""), "quotas.yaml:10: field `hard.count/foo!`: 'count/foo!' is not a resource name"),
        (format!("{hard}\n  limits.nvidia.com/gpu: \"1\""), "quotas.yaml:10: field `hard.limits.nvidia.com/gpu`: 'limits.nvidia.com/gpu': an extended resource is quota'd only as requests.nvidia.com/gpu"),
        (format!("{hard}\n  limits.ephemeral-storage: 8GB"), "quotas.yaml:10: field `hard.limits.ephemeral-storage`: '8GB' is not a quantity"),
    ];
    for (to, want) in &refused {
        let (code, err) = broken("quotas.yaml", |t| t.replacen(hard, to, 1));
        assert_eq!(code, Some(2), "{want}\n{err}");
        assert!(err.contains(want), "want: {want}\ngot:  {err}");
        assert!(!err.contains("requests.limits."), "{err}");
    }
    let lr = "limitRange:\n  defaultRequest: { cpu: 500m, memory: 1Gi }\n  default: { cpu: \"2\", memory: 4Gi }\n";
    let refused_lr = [
        ("limitRange:\n  defaultRequest:\n    cpu: 500m\n    memory: 8GB\n  default: { cpu: \"2\", memory: 4Gi }\n", "quotas.yaml:13: field `limitRange.defaultRequest.memory`: '8GB' is not a quantity"),
        ("limitRange:\n  defaultRequest: { cpu: 500m, memory: 1Gi }\n  default:\n    cpu: \"-1\"\n    memory: 4Gi\n", "quotas.yaml:13: field `limitRange.default.cpu`: '-1' must be greater than or equal to 0"),
        ("limitRange:\n  defaultRequest: { cpu: \"3\", memory: 1Gi }\n  default: { cpu: \"2\", memory: 4Gi }\n", "quotas.yaml:11: field `limitRange.defaultRequest.cpu`: default request value 3 must be less than or equal to default limit value 2"),
        ("limitRange:\n  defaultRequest: { cpu: 500m, memory: 1Gi, gpu: \"1\" }\n  default: { cpu: \"2\", memory: 4Gi }\n", "quotas.yaml:11: field `limitRange.defaultRequest.gpu`: 'gpu' is not a container resource"),
    ];
    for (to, want) in refused_lr {
        let (code, err) = broken("quotas.yaml", |t| t.replacen(lr, to, 1));
        assert_eq!(code, Some(2), "{want}\n{err}");
        assert!(err.contains(want), "want: {want}\ngot:  {err}");
    }
    // What the API server accepts is accepted.
    let accepted = format!(
        "{hard}\n  pods: 1e3\n  requests.ephemeral-storage: 1Ei\n  secrets: \"20\"\n  configmaps: \"20\"\n  services.loadbalancers: \"0\"\n  ephemeral-storage: 50Gi\n  requests.hugepages-2Mi: 1Gi\n  count/deployments.apps: \"5\"\n  gold.storageclass.storage.k8s.io/requests.storage: 100Gi"
    );
    let (code, err) = broken("quotas.yaml", |t| t.replacen(hard, &accepted, 1));
    assert_eq!(code, Some(0), "{err}");
}

/// A copy of the example policies in a temp dir.
fn copy_example() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in [
        "settings.yaml",
        "people.yaml",
        "groups.yaml",
        "quotas.yaml",
        "profiles/nlp-lab.yaml",
        "profiles/teaching.yaml",
    ] {
        std::fs::create_dir_all(dir.path().join(entry).parent().unwrap()).unwrap();
        std::fs::copy(example().join(entry), dir.path().join(entry)).unwrap();
    }
    dir
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

#[test]
fn grant_and_revoke_edit_the_files_keeping_everything_else() {
    let d = copy_example();
    let before = read(d.path(), "profiles/nlp-lab.yaml");
    let people_before = read(d.path(), "people.yaml");
    // A new person: added as a Researcher, granted view until a date.
    let out = labctl(
        d.path(),
        &[
            "profile",
            "grant",
            "dan@uni.edu",
            "--profile",
            "nlp-lab",
            "--role",
            "view",
            "--expires",
            "2027-01-31",
            "--reason",
            "summer intern: NER project",
        ],
    );
    assert_success(&out, &["grant"]);
    let after = read(d.path(), "profiles/nlp-lab.yaml");
    assert!(
        after.starts_with(&before.trim_end().to_string()),
        "untouched text stays byte for byte:\n{after}"
    );
    assert!(after.ends_with("  - user: dan@uni.edu\n    role: view\n    expires: 2027-01-31\n    reason: \"summer intern: NER project\"\n"), "{after}");
    let people = read(d.path(), "people.yaml");
    assert!(
        people.starts_with(&people_before)
            && people.ends_with("---\nkind: Researcher\nemail: dan@uni.edu\n"),
        "{people}"
    );
    let out = labctl(d.path(), &["--json", "policy", "render"]);
    let objs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let rb = find(
        &objs,
        "RoleBinding",
        "nlp-lab",
        "user-dan-uni-edu-clusterrole-view",
    )
    .unwrap();
    assert_eq!(
        rb["metadata"]["annotations"]["labctl.io/reason"],
        "summer intern: NER project"
    );
    // Changing an existing grant rewrites only that item, keeping its other keys and comments.
    let out = labctl(
        d.path(),
        &[
            "profile",
            "grant",
            "reviewer@partner-lab.org",
            "--profile",
            "nlp-lab",
            "--role",
            "view",
            "--expires",
            "2027-02-28",
        ],
    );
    assert_success(&out, &["grant update"]);
    let t = read(d.path(), "profiles/nlp-lab.yaml");
    assert!(t.contains("  - user: reviewer@partner-lab.org\n    role: view\n    expires: 2027-02-28\n    notebooks: false          # reads pipelines and runs; no notebook access\n"), "{t}");
    assert!(t.contains("# The NLP group's profile (namespace nlp-lab)."));
    // Revoke the new grant: the file is back to what it was plus nothing.
    let out = labctl(
        d.path(),
        &["profile", "revoke", "dan@uni.edu", "--profile", "nlp-lab"],
    );
    assert_success(&out, &["revoke"]);
    let t2 = read(d.path(), "profiles/nlp-lab.yaml");
    assert_eq!(t2, t.replace("  - user: dan@uni.edu\n    role: view\n    expires: 2027-01-31\n    reason: \"summer intern: NER project\"\n", ""));
    // Access through a group cannot be revoked directly: the error says why.
    let out = labctl(
        d.path(),
        &["profile", "revoke", "carla@uni.edu", "--profile", "nlp-lab"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("through group nlp-students-2027s1"));
    // An edit that would be invalid (past maxGrantDays) changes nothing.
    let snapshot = read(d.path(), "profiles/nlp-lab.yaml");
    let out = labctl(
        d.path(),
        &[
            "profile",
            "grant",
            "alice@uni.edu",
            "--profile",
            "nlp-lab",
            "--role",
            "admin",
            "--expires",
            "2030-01-01",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was changed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(d.path(), "profiles/nlp-lab.yaml"), snapshot);
}

#[test]
fn offboard_removes_a_person_everywhere_but_not_an_owner() {
    let d = copy_example();
    let out = labctl(d.path(), &["offboard", "bob@uni.edu"]);
    assert_success(&out, &["offboard"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("grant on profile nlp-teaching")
            && text.contains("member of group nlp-students-2027s1")
            && text.contains("Researcher entry"),
        "{text}"
    );
    assert!(!read(d.path(), "people.yaml").contains("bob@uni.edu"));
    assert!(!read(d.path(), "groups.yaml").contains("bob@uni.edu"));
    assert!(read(d.path(), "groups.yaml").contains("  - carla@uni.edu\nexpires: 2027-07-15"));
    assert!(read(d.path(), "profiles/teaching.yaml")
        .contains("  - group: nlp-students-2027s1\n    role: edit\n"));
    assert!(!read(d.path(), "profiles/teaching.yaml").contains("bob"));
    let out = labctl(d.path(), &["--json", "access", "bob@uni.edu"]);
    assert_success(&out, &["access after offboard"]);
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .unwrap()
            .len(),
        0
    );
    // The PI owns profiles: refused until ownership moves.
    let out = labctl(d.path(), &["offboard", "maria.lopez@uni.edu"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("owns profile nlp-lab"));
}

/// A real profile controller makes the namespace some time after the
/// Profile: apply waits for it instead of failing on the first namespaced
/// object (issue 20 point 5), and a controller that never comes is a
/// timeout naming what is missing.
#[test]
fn apply_waits_for_the_profile_controller_to_make_the_namespace() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    sim.with(|s| s.controller_delay = std::time::Duration::from_millis(1500));
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let out = json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2026-11-26",
    ));
    assert!(out["failed"].is_null(), "{out}");
    assert_eq!(out["applied"].as_array().unwrap().len(), 15, "{out}");
    assert!(sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-alice-uni-edu-clusterrole-edit"
        )
        .is_some());
    // No controller at all: a bounded wait, then the missing object named.
    let sim = KubeSim::start();
    sim.with(|s| s.controller = false);
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let out = Command::new(BIN)
        .env_clear()
        .env("LABCTL_PROFILE_WAIT_SECS", "1")
        .args(["policy", "apply", "--policies"])
        .arg(d.path())
        .args(["--today", "2026-11-26", "--kubeconfig"])
        .arg(&kc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("did not create namespace") && e.contains("profile controller"),
        "{e}"
    );
}

/// What the profile controller made is checked too (issue 20 point 9):
/// its ServiceAccounts and the owner's AuthorizationPolicy must exist, and
/// kf-resource-quota must hold the quota class, compared as quantities.
#[test]
fn plan_reports_hand_edits_of_controller_objects() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(plan["drift"], serde_json::json!([]), "{plan}");
    assert_eq!(plan["missing"], serde_json::json!([]), "{plan}");
    let key = (
        "resourcequotas".to_string(),
        "nlp-lab".to_string(),
        "kf-resource-quota".to_string(),
    );
    let quota = sim.get(&key.0, &key.1, &key.2).unwrap();
    let (k, v) = quota["spec"]["hard"]
        .as_object()
        .unwrap()
        .iter()
        .find_map(|(k, v)| {
            v.as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .map(|n| (k.clone(), n))
        })
        .expect("an integer quantity in the class");
    // The same quantity written another way is no drift (the API server
    // canonicalises quantities).
    let mut q = quota.clone();
    q["spec"]["hard"][&k] = serde_json::json!(format!("{}000m", v));
    sim.with(|s| s.put("resourcequotas", q.clone()));
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(plan["drift"], serde_json::json!([]), "{plan}");
    // A hand edit and a deleted ServiceAccount are reported.
    q["spec"]["hard"][&k] = serde_json::json!((v + 1).to_string());
    sim.with(|s| {
        s.put("resourcequotas", q);
        s.objects.remove(&(
            "serviceaccounts".to_string(),
            "nlp-lab".to_string(),
            "default-viewer".to_string(),
        ));
    });
    let out = kube(d.path(), &kc, &["policy", "plan"], today);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("! drift ResourceQuota nlp-lab/kf-resource-quota differs from the profile's quota class: {k}: {} live, {v} in the class", v + 1)), "{text}");
    assert!(
        text.contains("! missing ServiceAccount nlp-lab/default-viewer"),
        "{text}"
    );
}

fn kube(policies: &Path, kubeconfig: &Path, args: &[&str], today: &str) -> Output {
    Command::new(BIN)
        .env_clear()
        .args(args)
        .arg("--policies")
        .arg(policies)
        .args(["--today", today])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn plan_apply_drift_prune_expiry_and_the_data_loss_guard() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    // A contributor binding made by hand in the dashboard: not labctl's.
    sim.with(|s| {
        s.put("rolebindings", serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "user-eve-uni-edu-clusterrole-edit", "namespace": "nlp-lab", "annotations": {"user": "eve@uni.edu", "role": "edit"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "eve@uni.edu"}]}));
    });
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    let steps = plan["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 15);
    assert!(steps.iter().all(|s| s["action"] == "create"), "{plan}");
    let out = json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert_eq!(out["applied"].as_array().unwrap().len(), 15);
    let rb = sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-alice-uni-edu-clusterrole-edit",
        )
        .unwrap();
    assert_eq!(rb["metadata"]["managedFields"][0]["manager"], "labctl");
    assert_eq!(rb["subjects"][0]["name"], "alice@uni.edu");
    // The controller made the namespace; a second apply changes nothing.
    let rv = |sim: &KubeSim| {
        sim.with(|s| {
            s.objects
                .values()
                .map(|o| o["metadata"]["resourceVersion"].clone())
                .collect::<Vec<_>>()
        })
    };
    let before = rv(&sim);
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["action"] == "unchanged"),
        "{plan}"
    );
    assert!(plan["missing"].as_array().unwrap().is_empty(), "{plan}");
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert_eq!(rv(&sim), before, "a second apply writes nothing");
    // Drift: someone edits a managed binding by hand.
    sim.with(|s| {
        let key = (
            "rolebindings".to_string(),
            "nlp-lab".to_string(),
            "user-alice-uni-edu-clusterrole-edit".to_string(),
        );
        let mut o = s.objects[&key].clone();
        o["roleRef"]["name"] = serde_json::json!("kubeflow-admin");
        o["metadata"]["annotations"]["role"] = serde_json::json!("admin");
        s.put("rolebindings", o);
    });
    let out = kube(d.path(), &kc, &["policy", "plan"], today);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("~ update RoleBinding nlp-lab/user-alice-uni-edu-clusterrole-edit: metadata.annotations.role, roleRef"), "{text}");
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert_eq!(
        sim.get(
            "rolebindings",
            "nlp-lab",
            "user-alice-uni-edu-clusterrole-edit"
        )
        .unwrap()["roleRef"]["name"],
        "kubeflow-edit"
    );
    // Revoke: the binding and policy go; the hand-made binding stays.
    assert_success(
        &labctl(
            d.path(),
            &["profile", "revoke", "alice@uni.edu", "--profile", "nlp-lab"],
        ),
        &["revoke"],
    );
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    let deletes: Vec<String> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "delete")
        .map(|s| {
            format!(
                "{} {}",
                s["kind"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        deletes,
        [
            "RoleBinding user-alice-uni-edu-clusterrole-edit",
            "AuthorizationPolicy user-alice-uni-edu-clusterrole-edit"
        ]
    );
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert!(sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-alice-uni-edu-clusterrole-edit"
        )
        .is_none());
    assert!(
        sim.get(
            "rolebindings",
            "nlp-lab",
            "user-eve-uni-edu-clusterrole-edit"
        )
        .is_some(),
        "unlabelled objects are never pruned"
    );
    // Expiry: after the semester, apply removes the group's access.
    json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2027-08-01",
    ));
    assert!(sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-carla-uni-edu-clusterrole-edit"
        )
        .is_none());
    assert!(sim
        .get(
            "rolebindings",
            "nlp-teaching",
            "user-carla-uni-edu-clusterrole-edit"
        )
        .is_none());
    // Missing controller objects are reported.
    sim.with(|s| {
        s.objects.remove(&(
            "rolebindings".into(),
            "nlp-lab".into(),
            "namespaceAdmin".into(),
        ));
    });
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(
        plan["missing"],
        serde_json::json!(["RoleBinding nlp-lab/namespaceAdmin"])
    );
    // Removing a Profile from the policy: refused without --allow-data-loss, naming the PVCs.
    sim.with(|s| {
        s.put("persistentvolumeclaims", serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "workspace-carla", "namespace": "nlp-teaching"}}));
    });
    std::fs::remove_file(d.path().join("profiles/teaching.yaml")).unwrap();
    let out = kube(d.path(), &kc, &["policy", "apply"], today);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nlp-teaching (PVCs: workspace-carla)") && err.contains("Nothing was applied"),
        "{err}"
    );
    assert!(sim.get("profiles", "", "nlp-teaching").is_some());
    let out = kube(d.path(), &kc, &["policy", "plan"], today);
    assert!(String::from_utf8_lossy(&out.stdout).contains(
        "- delete Profile nlp-teaching — DATA LOSS: its namespace goes, with PVCs: workspace-carla"
    ));
    json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply", "--allow-data-loss"],
        today,
    ));
    assert!(sim.get("profiles", "", "nlp-teaching").is_none());
    // The namespace is Terminating, then the namespace controller empties
    // and removes it.
    let ns = sim.get("namespaces", "", "nlp-teaching");
    assert!(ns.is_none_or(|n| n["status"]["phase"] == "Terminating"));
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert!(sim.get("namespaces", "", "nlp-teaching").is_none());
    assert!(sim
        .get("persistentvolumeclaims", "nlp-teaching", "workspace-carla")
        .is_none());
    // A cluster without the Kubeflow CRDs: a clear error from discovery.
    let bare = KubeSim::start();
    bare.with(|s| s.without_kubeflow = true);
    let bare_dir = tempfile::tempdir().unwrap();
    let out = kube(
        d.path(),
        &bare.kubeconfig(bare_dir.path()),
        &["policy", "plan"],
        today,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not serve kubeflow.org/v1 profiles"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong token is refused by the API server.
    let bad = std::fs::read_to_string(&kc)
        .unwrap()
        .replace(crate::kube_sim::TOKEN, "wrong");
    std::fs::write(&kc, bad).unwrap();
    let out = kube(d.path(), &kc, &["policy", "plan"], today);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401")
            || String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rbac_for_labctl_covers_what_it_does_and_no_more() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/labctl-policy-rbac.yaml"),
    )
    .unwrap();
    let docs: Vec<serde_json::Value> = text
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let rules = role["rules"].as_array().unwrap();
    let allowed = |group: &str, res: &str, verb: &str| {
        rules.iter().any(|r| {
            r["apiGroups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == group)
                && r["resources"].as_array().unwrap().iter().any(|x| x == res)
                && r["verbs"].as_array().unwrap().iter().any(|v| v == verb)
        })
    };
    for (g, r) in [
        ("kubeflow.org", "profiles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("security.istio.io", "authorizationpolicies"),
        ("", "limitranges"),
    ] {
        for v in ["get", "list", "patch", "delete"] {
            assert!(allowed(g, r, v), "{g}/{r} {v}");
        }
    }
    for r in ["namespaces", "resourcequotas", "persistentvolumeclaims"] {
        assert!(allowed("", r, "list") && !allowed("", r, "delete"), "{r}");
    }
    assert!(
        allowed("", "namespaces", "patch"),
        "owner transfer patches the namespace"
    );
    assert!(allowed("rbac.authorization.k8s.io", "clusterroles", "bind"));
    assert!(!text.contains("\"*\""), "no wildcards");
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["subjects"][0]["name"], "labctl");
}

#[test]
fn a_profile_never_takes_over_a_namespace_someone_else_made() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    sim.with(|s| {
        s.put(
            "namespaces",
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "nlp-lab", "annotations": {"owner": "someone@else.org"}}}),
        )
    });
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    for cmd in ["plan", "apply"] {
        let out = kube(d.path(), &kc, &["policy", cmd], "2026-11-26");
        assert_eq!(
            out.status.code(),
            Some(6),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("nlp-lab (exists, owner annotation 'someone@else.org')"),
            "{err}"
        );
    }
    assert!(
        sim.get("profiles", "", "nlp-lab").is_none(),
        "nothing applied"
    );
    assert!(
        sim.get("profiles", "", "nlp-teaching").is_none(),
        "nothing applied"
    );
}

#[test]
fn two_policy_sets_share_a_cluster_without_pruning_each_other() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let a = copy_example();
    let kc = sim.kubeconfig(a.path());
    json_of(&kube(
        a.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2026-11-26",
    ));
    let profile = sim.get("profiles", "", "nlp-lab").expect("set A applied");
    assert_eq!(
        profile["metadata"]["labels"]["labctl.io/policy-set"],
        "lab-main"
    );
    // Set B: another name, other profiles.
    let b = copy_example();
    let edit = |rel: &str, from: &str, to: &str| {
        let path = b.path().join(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace(from, to)).unwrap();
    };
    edit("settings.yaml", "name: lab-main", "name: lab-b");
    edit("profiles/nlp-lab.yaml", "name: nlp-lab", "name: b-nlp");
    edit(
        "profiles/teaching.yaml",
        "name: nlp-teaching",
        "name: b-teaching",
    );
    let plan = json_of(&kube(
        b.path(),
        &kc,
        &["--json", "policy", "plan"],
        "2026-11-26",
    ));
    let deletes: Vec<&serde_json::Value> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "delete")
        .collect();
    assert!(deletes.is_empty(), "set B would prune set A: {deletes:?}");
    json_of(&kube(
        b.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2026-11-26",
    ));
    assert!(sim.get("profiles", "", "nlp-lab").is_some());
    assert!(sim.get("profiles", "", "b-nlp").is_some());
    // A set's name is required, and a label value.
    let (code, err) = broken("settings.yaml", |t| {
        t.replace("name: lab-main", "name: -bad-")
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("settings.yaml:3: field `name`: '-bad-' is not a policy-set name"),
        "{err}"
    );
    let (code, err) = broken("settings.yaml", |t| t.replace("name: lab-main", ""));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("missing field `name`"), "{err}");
}

#[test]
fn a_partial_apply_is_audited_with_the_step_that_failed() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    // labctl's Role may not write LimitRanges: the plan's dry-run apply
    // finds out before anything is applied.
    sim.with(|s| s.forbidden.push("limitranges".into()));
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let log = d.path().join("audit.jsonl");
    let out = kube(
        d.path(),
        &kc,
        &["policy", "apply", "--audit-log", log.to_str().unwrap()],
        "2026-11-26",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot patch resource \"limitranges\"") && err.contains("dry-run"),
        "{err}"
    );
    assert!(
        sim.get("profiles", "", "nlp-lab").is_none(),
        "nothing applied"
    );
    assert!(!log.exists());
    // Writes of LimitRanges time out in storage: the apply stops there.
    sim.with(|s| {
        s.forbidden.clear();
        s.fail_writes.push("limitranges".into());
    });
    let out = kube(
        d.path(),
        &kc,
        &["policy", "apply", "--audit-log", log.to_str().unwrap()],
        "2026-11-26",
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed after"), "{err}");
    assert!(err.contains("request timed out"), "{err}");
    let text = std::fs::read_to_string(&log).expect("an audit entry for the partial apply");
    let entry: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let changes = entry["changes"].as_array().unwrap();
    let last = changes.last().unwrap();
    assert_eq!(last["kind"], "LimitRange", "{entry}");
    assert!(
        last["failed"].as_str().unwrap().contains("timed out"),
        "{entry}"
    );
    assert!(
        changes.len() > 1,
        "what was applied before is recorded: {entry}"
    );
    assert!(changes[..changes.len() - 1]
        .iter()
        .all(|c| c["failed"].is_null()));
    // What the audit says was applied is on the server.
    for c in &changes[..changes.len() - 1] {
        if c["kind"] == "Profile" {
            assert!(sim
                .get("profiles", "", c["name"].as_str().unwrap())
                .is_some());
        }
    }
}

#[test]
fn applies_are_audited_in_a_hash_chain_that_detects_tampering() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let log = d.path().join("audit/policy-audit.jsonl");
    // The policy folder is a git repository: the commit is recorded.
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(d.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.email=t@example.org",
        "-c",
        "user.name=t",
        "add",
        ".",
    ]);
    git(&[
        "-c",
        "user.email=t@example.org",
        "-c",
        "user.name=t",
        "commit",
        "-qm",
        "policy",
    ]);
    let head = git(&["rev-parse", "HEAD"]);
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "policy",
            "apply",
            "--audit-log",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        json_of(&kube(d.path(), &kc, &args, "2026-11-26"))
    };
    apply(&[
        "--actor",
        "maria.lopez@uni.edu",
        "--reason",
        "semester start",
    ]);
    apply(&[]); // no change: no entry
    assert_success(
        &labctl(
            d.path(),
            &["profile", "revoke", "alice@uni.edu", "--profile", "nlp-lab"],
        ),
        &["revoke"],
    );
    apply(&["--reason", "Alice graduated"]);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["actor"], "maria.lopez@uni.edu");
    assert_eq!(lines[0]["reason"], "semester start");
    assert_eq!(lines[0]["git-commit"], head.as_str());
    assert_eq!(lines[0]["changes"].as_array().unwrap().len(), 15);
    assert_eq!(lines[1]["git-commit"], format!("{head}+uncommitted"));
    assert_eq!(lines[1]["changes"][0]["action"], "delete");
    assert_eq!(lines[1]["prev"], lines[0]["hash"]);
    let verify = || {
        Command::new(BIN)
            .env_clear()
            .args(["audit", "verify", "--audit-log"])
            .arg(&log)
            .output()
            .unwrap()
    };
    let out = verify();
    assert_success(&out, &["audit verify"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 entries, chain intact"));
    // Rewriting who did it is detected.
    std::fs::write(
        &log,
        text.replacen("maria.lopez@uni.edu", "someone@else.org", 1),
    )
    .unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("policy-audit.jsonl:1: its content does not match its hash"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // So is removing an entry.
    std::fs::write(&log, text.lines().nth(1).unwrap()).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1: does not follow the previous entry"));
    // The entries are mirrored in policy.db.
    let db = rusqlite::Connection::open(log.with_extension("db")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
}

#[test]
fn owner_transfer_runs_the_sequence_the_controller_needs() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2026-11-26",
    ));
    assert_eq!(
        sim.get("rolebindings", "nlp-teaching", "namespaceAdmin")
            .unwrap()["subjects"][0]["name"],
        "maria.lopez@uni.edu"
    );
    // The course moves to Alice.
    let f = d.path().join("profiles/teaching.yaml");
    let t = std::fs::read_to_string(&f).unwrap();
    std::fs::write(
        &f,
        t.replace("owner: maria.lopez@uni.edu", "owner: alice@uni.edu"),
    )
    .unwrap();
    let out = kube(d.path(), &kc, &["policy", "plan"], "2026-11-26");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("~ update Profile nlp-teaching: spec")
            && text.contains("owner transfer maria.lopez@uni.edu → alice@uni.edu"),
        "{text}"
    );
    json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply"],
        "2026-11-26",
    ));
    assert_eq!(
        sim.get("profiles", "", "nlp-teaching").unwrap()["spec"]["owner"]["name"],
        "alice@uni.edu"
    );
    assert_eq!(
        sim.get("namespaces", "", "nlp-teaching").unwrap()["metadata"]["annotations"]["owner"],
        "alice@uni.edu"
    );
    assert_eq!(
        sim.get("rolebindings", "nlp-teaching", "namespaceAdmin")
            .unwrap()["subjects"][0]["name"],
        "alice@uni.edu"
    );
    assert_eq!(
        sim.get(
            "authorizationpolicies",
            "nlp-teaching",
            "ns-owner-access-istio"
        )
        .unwrap()["spec"]["rules"][0]["when"][0]["values"][0],
        "alice@uni.edu"
    );
    let plan = json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "plan"],
        "2026-11-26",
    ));
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["action"] == "unchanged"),
        "{plan}"
    );
    assert!(plan["missing"].as_array().unwrap().is_empty(), "{plan}");
}

#[test]
fn import_adopts_dashboard_bindings_and_grant_can_apply_at_once() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    // Someone added Eve as a contributor through the dashboard (KFAM).
    sim.with(|s| {
        s.put("rolebindings", serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "user-eve-uni-edu-clusterrole-edit", "namespace": "nlp-lab", "annotations": {"user": "eve@uni.edu", "role": "edit"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "eve@uni.edu"}]}));
    });
    let dry = json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "import", "--dry-run"],
        today,
    ));
    assert_eq!(
        dry,
        serde_json::json!([{"profile": "nlp-lab", "user": "eve@uni.edu", "role": "edit", "binding": "user-eve-uni-edu-clusterrole-edit"}])
    );
    assert!(!read(d.path(), "people.yaml").contains("eve@uni.edu"));
    json_of(&kube(d.path(), &kc, &["--json", "policy", "import"], today));
    assert!(read(d.path(), "people.yaml").contains("email: eve@uni.edu"));
    assert!(read(d.path(), "profiles/nlp-lab.yaml").contains("  - user: eve@uni.edu\n    role: edit\n    reason: \"imported from a dashboard-made binding\"\n"));
    // Importing again finds nothing; applying takes the binding over (label added).
    let again = json_of(&kube(d.path(), &kc, &["--json", "policy", "import"], today));
    assert_eq!(again, serde_json::json!([]));
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let rb = sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-eve-uni-edu-clusterrole-edit",
        )
        .unwrap();
    assert_eq!(
        rb["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "labctl"
    );
    // grant --apply edits the file and applies in one step, audited.
    let log = d.path().join("audit.jsonl");
    let out = Command::new(BIN)
        .env_clear()
        .args([
            "profile",
            "grant",
            "frank@uni.edu",
            "--profile",
            "nlp-teaching",
            "--role",
            "view",
            "--expires",
            "2027-01-31",
            "--apply",
            "--actor",
            "maria.lopez@uni.edu",
        ])
        .arg("--policies")
        .arg(d.path())
        .args(["--today", today, "--kubeconfig"])
        .arg(&kc)
        .arg("--audit-log")
        .arg(&log)
        .output()
        .unwrap();
    assert_success(&out, &["grant --apply"]);
    assert!(sim
        .get(
            "rolebindings",
            "nlp-teaching",
            "user-frank-uni-edu-clusterrole-view"
        )
        .is_some());
    let entry: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(entry["actor"], "maria.lopez@uni.edu");
    assert_eq!(
        entry["reason"],
        "grant view on nlp-teaching to frank@uni.edu"
    );
}

#[test]
fn revoke_with_apply_removes_both_kfam_objects_whoever_made_them() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let rb = "user-reviewer-partner-lab-org-clusterrole-view";
    // The reviewer has notebooks: false, so labctl made only the
    // RoleBinding; the dashboard had made the AuthorizationPolicy earlier
    // (KFAM creates both), which no flag or prune of labctl's would touch.
    assert!(sim.get("rolebindings", "nlp-lab", rb).is_some());
    assert!(sim.get("authorizationpolicies", "nlp-lab", rb).is_none());
    sim.with(|s| {
        s.put("authorizationpolicies", serde_json::json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": rb, "namespace": "nlp-lab", "annotations": {"user": "reviewer@partner-lab.org", "role": "view"}},
            "spec": {"rules": [{"when": [{"key": "request.headers[kubeflow-userid]", "values": ["reviewer@partner-lab.org"]}]}]}}));
    });
    let log = d.path().join("audit.jsonl");
    let out = kube(
        d.path(),
        &kc,
        &[
            "--json",
            "profile",
            "revoke",
            "reviewer@partner-lab.org",
            "--profile",
            "nlp-lab",
            "--apply",
            "--audit-log",
            log.to_str().unwrap(),
        ],
        today,
    );
    assert_success(&out, &["revoke --apply"]);
    assert!(sim.get("rolebindings", "nlp-lab", rb).is_none());
    assert!(sim.get("authorizationpolicies", "nlp-lab", rb).is_none());
    let audit = std::fs::read_to_string(&log).unwrap();
    assert!(
        audit.contains("\"kind\":\"AuthorizationPolicy\"")
            && audit.contains("revoke reviewer@partner-lab.org"),
        "{audit}"
    );
    // Everyone else keeps their access.
    assert!(sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-bob-uni-edu-clusterrole-edit"
        )
        .is_some());
}

/// Issue 20 point 7: the plan is the API server's dry-run apply compared
/// on the fields labctl owns, so what the server and the profile
/// controller write on their own (canonical quantities, LimitRange
/// defaults, the controller's `resourceQuotaSpec: {}` and finalizer) and
/// fields other tools own are never drift, while a hand edit of a field
/// labctl set is, down to the field.
#[test]
fn the_plan_is_a_server_side_dry_run_and_server_writes_are_not_drift() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    let d = copy_example();
    let quotas = read(d.path(), "quotas.yaml")
        .replace("requests.memory: 128Gi", "requests.memory: 131072Mi")
        .replace("  defaultRequest: { cpu: \"1\", memory: 2Gi }\n", "")
        .replace(
            "default: { cpu: \"4\", memory: 8Gi }",
            "default: { cpu: \"4000m\", memory: 8Gi }",
        );
    std::fs::write(d.path().join("quotas.yaml"), quotas).unwrap();
    std::fs::write(
        d.path().join("profiles/solo.yaml"),
        "kind: Profile\nname: solo-lab\nowner: maria.lopez@uni.edu\ngrants:\n  - user: bob@uni.edu\n    role: view\n",
    )
    .unwrap();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    // What the server and the controller wrote on their own.
    let solo = sim.get("profiles", "", "solo-lab").unwrap();
    assert_eq!(solo["spec"]["resourceQuotaSpec"], serde_json::json!({}));
    assert_eq!(solo["metadata"]["finalizers"][0], "profile-finalizer");
    let lab = sim.get("profiles", "", "nlp-lab").unwrap();
    assert_eq!(
        lab["spec"]["resourceQuotaSpec"]["hard"]["requests.memory"],
        "128Gi"
    );
    let lr = sim
        .get("limitranges", "nlp-lab", "labctl-defaults")
        .unwrap();
    assert_eq!(
        lr["spec"]["limits"][0]["defaultRequest"],
        serde_json::json!({"cpu": "4", "memory": "8Gi"}),
        "defaulted from the default limit: {lr}"
    );
    let unchanged = |plan: &serde_json::Value| {
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["action"] != "unchanged")
            .cloned()
            .collect::<Vec<_>>()
    };
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(unchanged(&plan), Vec::<serde_json::Value>::new(), "{plan}");
    let rv = |sim: &KubeSim| {
        sim.with(|s| {
            s.objects
                .values()
                .map(|o| o["metadata"]["resourceVersion"].clone())
                .collect::<Vec<_>>()
        })
    };
    let before = rv(&sim);
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert_eq!(rv(&sim), before, "a second apply writes nothing");
    // Another tool adds a label of its own: not labctl's field, no drift,
    // and it stays through an apply.
    let name = "user-alice-uni-edu-clusterrole-edit";
    let mut rb = sim.get("rolebindings", "nlp-lab", name).unwrap();
    rb["metadata"]["labels"]["team"] = serde_json::json!("nlp");
    sim.with(|s| s.update_as("rolebindings", rb.clone(), "kubectl-label"));
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(unchanged(&plan), Vec::<serde_json::Value>::new(), "{plan}");
    // A hand edit of a field labctl set (kubectl edit takes the field
    // over) is drift, named to the field, and apply takes it back.
    rb["subjects"][0]["name"] = serde_json::json!("mallory@uni.edu");
    sim.with(|s| s.update_as("rolebindings", rb, "kubectl-edit"));
    let edited = sim.get("rolebindings", "nlp-lab", name).unwrap();
    assert!(
        edited["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["manager"] == "kubectl-edit" && m["fieldsV1"]["f:subjects"].is_object()),
        "{edited}"
    );
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    let changed = unchanged(&plan);
    assert_eq!(changed.len(), 1, "{plan}");
    assert_eq!(changed[0]["name"], name);
    assert_eq!(changed[0]["changes"], serde_json::json!(["subjects"]));
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let rb = sim.get("rolebindings", "nlp-lab", name).unwrap();
    assert_eq!(rb["subjects"][0]["name"], "alice@uni.edu");
    assert_eq!(rb["metadata"]["labels"]["team"], "nlp");
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(unchanged(&plan), Vec::<serde_json::Value>::new(), "{plan}");
}

/// Issue 20 point 8: access in a profile namespace that the policy does
/// not grant (a dashboard binding above the policy role, a notebook
/// AuthorizationPolicy left after `notebooks: false`, a person the policy
/// does not know, a Group subject) is listed by plan as unmanaged, stays
/// on a plain apply, and goes with `--prune-unmanaged`, audited; what the
/// policy covers and what is not people's access is never listed.
#[test]
fn plan_lists_access_the_policy_does_not_grant_and_prune_unmanaged_removes_it() {
    use crate::kube_sim::KubeSim;
    use serde_json::json;
    let sim = KubeSim::start();
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let rb = |name: &str, role: &str, subject: serde_json::Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": "nlp-lab", "annotations": {"role": role.trim_start_matches("kubeflow-")}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject]})
    };
    let user =
        |u: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u});
    let kfam_ap = |name: &str, u: &str| {
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "nlp-lab", "annotations": {"user": u, "role": "view"}},
            "spec": {"rules": [{"when": [{"key": "request.headers[kubeflow-userid]", "values": [u]}]}]}})
    };
    sim.with(|s| {
        // Beyond the policy:
        s.put("rolebindings", rb("user-alice-uni-edu-clusterrole-admin", "kubeflow-admin", user("alice@uni.edu")));
        s.put("rolebindings", rb("user-eve-uni-edu-clusterrole-edit", "kubeflow-edit", user("eve@uni.edu")));
        s.put("rolebindings", rb("students-edit", "kubeflow-edit", json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "students"})));
        s.put("authorizationpolicies", kfam_ap("user-reviewer-partner-lab-org-clusterrole-view", "reviewer@partner-lab.org"));
        // Covered by the policy, or not people's access:
        s.put("rolebindings", rb("user-alice-uni-edu-clusterrole-view", "kubeflow-view", user("alice@uni.edu")));
        s.put("rolebindings", rb("pipeline-runner", "kubeflow-edit", json!({"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"})));
        s.put("authorizationpolicies", json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "ml-pipeline-visualizationserver", "namespace": "nlp-lab"},
            "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/kubeflow/sa/ml-pipeline"]}}]}]}}));
        s.put("authorizationpolicies", kfam_ap("user-alice-uni-edu-clusterrole-view", "alice@uni.edu"));
    });
    let out = kube(d.path(), &kc, &["policy", "plan"], today);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "! unmanaged RoleBinding nlp-lab/user-alice-uni-edu-clusterrole-admin: alice@uni.edu: admin (the policy grants edit)",
        "! unmanaged RoleBinding nlp-lab/user-eve-uni-edu-clusterrole-edit: eve@uni.edu: edit (the policy grants none)",
        "! unmanaged RoleBinding nlp-lab/students-edit: group students: edit",
        "! unmanaged AuthorizationPolicy nlp-lab/user-reviewer-partner-lab-org-clusterrole-view: reviewer@partner-lab.org: notebook and web access",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(plan["unmanaged"].as_array().unwrap().len(), 4, "{plan}");
    // A plain apply leaves them; --prune-unmanaged removes them, audited.
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert!(sim
        .get(
            "rolebindings",
            "nlp-lab",
            "user-eve-uni-edu-clusterrole-edit"
        )
        .is_some());
    let log = d.path().join("audit.jsonl");
    let out = json_of(&kube(
        d.path(),
        &kc,
        &[
            "--json",
            "policy",
            "apply",
            "--prune-unmanaged",
            "--audit-log",
            log.to_str().unwrap(),
        ],
        today,
    ));
    assert_eq!(out["applied"].as_array().unwrap().len(), 4, "{out}");
    for (plural, name) in [
        ("rolebindings", "user-alice-uni-edu-clusterrole-admin"),
        ("rolebindings", "user-eve-uni-edu-clusterrole-edit"),
        ("rolebindings", "students-edit"),
        (
            "authorizationpolicies",
            "user-reviewer-partner-lab-org-clusterrole-view",
        ),
    ] {
        assert!(sim.get(plural, "nlp-lab", name).is_none(), "{name}");
    }
    for (plural, name) in [
        ("rolebindings", "user-alice-uni-edu-clusterrole-view"),
        ("rolebindings", "pipeline-runner"),
        ("authorizationpolicies", "ml-pipeline-visualizationserver"),
        (
            "authorizationpolicies",
            "user-alice-uni-edu-clusterrole-view",
        ),
        ("rolebindings", "namespaceAdmin"),
        ("authorizationpolicies", "ns-owner-access-istio"),
    ] {
        assert!(sim.get(plural, "nlp-lab", name).is_some(), "{name}");
    }
    let entry: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let pruned: Vec<&serde_json::Value> = entry["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] == "prune-unmanaged")
        .collect();
    assert_eq!(pruned.len(), 4, "{entry}");
    assert!(pruned.iter().any(|c| c["grants"][0]
        .as_str()
        .unwrap()
        .contains("eve@uni.edu: edit")));
    let plan = json_of(&kube(d.path(), &kc, &["--json", "policy", "plan"], today));
    assert_eq!(plan["unmanaged"], json!([]), "{plan}");
}

/// Deleting a Profile is asynchronous on a real cluster: the profile
/// controller's finalizer runs first, then the garbage collector deletes
/// the namespace, which stays Terminating (refusing new objects with 403)
/// until emptied. Apply waits for the Profile to go, and a Profile made
/// again at once waits for the old namespace to finish.
#[test]
fn a_profile_made_again_waits_for_its_old_namespace_to_finish_terminating() {
    use crate::kube_sim::KubeSim;
    let sim = KubeSim::start();
    sim.with(|s| s.finalize_delay = std::time::Duration::from_millis(1500));
    let d = copy_example();
    let kc = sim.kubeconfig(d.path());
    let today = "2026-11-26";
    json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    let teaching = read(d.path(), "profiles/teaching.yaml");
    std::fs::remove_file(d.path().join("profiles/teaching.yaml")).unwrap();
    let t = std::time::Instant::now();
    json_of(&kube(
        d.path(),
        &kc,
        &["--json", "policy", "apply", "--allow-data-loss"],
        today,
    ));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1400),
        "apply returned before the finalizer ran"
    );
    assert!(sim.get("profiles", "", "nlp-teaching").is_none());
    let ns = sim
        .get("namespaces", "", "nlp-teaching")
        .expect("terminating");
    assert_eq!(ns["status"]["phase"], "Terminating");
    // Made again at once: the writes wait for the new namespace.
    std::fs::write(d.path().join("profiles/teaching.yaml"), teaching).unwrap();
    let out = json_of(&kube(d.path(), &kc, &["--json", "policy", "apply"], today));
    assert!(out["failed"].is_null(), "{out}");
    let ns = sim.get("namespaces", "", "nlp-teaching").unwrap();
    assert!(ns["metadata"].get("deletionTimestamp").is_none(), "{ns}");
    assert!(sim
        .get(
            "rolebindings",
            "nlp-teaching",
            "user-carla-uni-edu-clusterrole-edit"
        )
        .is_some());
}

/// The Kubernetes double refuses LimitRanges and ResourceQuotas as the API
/// server does (422 Invalid after defaulting), defaults and canonicalises
/// what it stores, and a dry run stores nothing — through the kube client
/// labctl uses.
#[test]
fn the_double_validates_defaults_and_dry_runs_like_the_api_server() {
    use crate::kube_sim::KubeSim;
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    use serde_json::json;
    let sim = KubeSim::start();
    sim.with(|s| {
        s.put(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}}),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let kc = sim.kubeconfig(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&kc).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let ar = |kind: &str, plural: &str| ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let lr: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "lab", &ar("LimitRange", "limitranges"));
        let rq: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "lab", &ar("ResourceQuota", "resourcequotas"));
        let pp = PatchParams::apply("test").force();
        let refused = |r: kube::Result<DynamicObject>| match r {
            Err(kube::Error::Api(e)) => {
                assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{e:?}");
                e.message
            }
            other => panic!("accepted: {other:?}"),
        };
        let bad = json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "d"},
            "spec": {"limits": [{"type": "Container", "default": {"cpu": "1"}, "defaultRequest": {"cpu": "2"}}]}});
        let m = refused(lr.patch("d", &pp, &Patch::Apply(&bad)).await);
        assert!(
            m.contains("spec.limits[0].defaultRequest[cpu]")
                && m.contains("default request value 2 is greater than default limit value 1"),
            "{m}"
        );
        let neg = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q"},
            "spec": {"hard": {"requests.cpu": "-1"}}});
        let m = refused(rq.patch("q", &pp, &Patch::Apply(&neg)).await);
        assert!(m.contains("must be greater than or equal to 0"), "{m}");
        // Defaults from max, canonical quantities; a dry run stores nothing.
        let ok = json!({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "d"},
            "spec": {"limits": [{"type": "Container", "max": {"memory": "1024Mi", "cpu": "0.5"}}]}});
        let dry = lr
            .patch("d", &PatchParams::apply("test").force().dry_run(), &Patch::Apply(&ok))
            .await
            .unwrap();
        let item = &dry.data["spec"]["limits"][0];
        assert_eq!(item["max"], json!({"cpu": "500m", "memory": "1Gi"}));
        assert_eq!(item["default"], item["max"]);
        assert_eq!(item["defaultRequest"], item["max"]);
        assert!(sim.get("limitranges", "lab", "d").is_none());
        lr.patch("d", &pp, &Patch::Apply(&ok)).await.unwrap();
        let stored = sim.get("limitranges", "lab", "d").unwrap();
        assert_eq!(stored["spec"]["limits"][0]["defaultRequest"]["memory"], "1Gi");
        assert_eq!(stored["metadata"]["managedFields"][0]["manager"], "test");
    });
}
