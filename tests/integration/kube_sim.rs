//! A Kubernetes API server test double (HTTP on 127.0.0.1).
//!
//! No Kubernetes API server can run here, so this speaks the Kubernetes REST
//! API for the kinds labctl uses, following its semantics, each rule beside
//! the upstream code it follows:
//! - a generic object store with `resourceVersion`, `uid` and
//!   `creationTimestamp`; `404 NotFound` and `409 Conflict` as `Status`
//!   objects; bearer-token authentication (401 without it);
//! - discovery (`/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`, with
//!   subresources and create-only resources as the real server lists them;
//!   an aggregated `metrics.k8s.io` that can be down: 503), `/version`;
//! - lists with label selectors, across all namespaces or in one, paginated
//!   with `limit` and opaque `continue` tokens (an expired one is 410
//!   `Expired`, a malformed one 400); items of built-in kinds carry no
//!   `apiVersion`/`kind` (typed lists), custom resources do;
//! - server-side apply (`PATCH` with `application/apply-patch+yaml`,
//!   `fieldManager`, `force`) that merges labels and annotations, removes
//!   what the same manager applied before and no longer applies, and
//!   answers 409 when another manager owns a field and `force` is off;
//! - CustomResourceDefinitions: an applied CRD becomes `Established` after a
//!   short delay, and only then is its kind in discovery and served;
//! - RBAC: either single resources whose writes are forbidden, or a whole
//!   ClusterRole's rules (as shipped in deploy/kubernetes/) that every
//!   request's verb is checked against, with the authorizer's 403 message.
//!
//! A small stand-in for the Kubeflow profile controller creates, per
//! Profile, its Namespace (with the `owner` annotation), `namespaceAdmin`
//! and `kf-resource-quota`, and deleting a Profile deletes its namespace
//! and everything in it — as upstream does. labctl reaches it through kube
//! with a kubeconfig file, exactly as in production.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "kube-sim-test-token";

/// One served resource.
#[derive(Clone, Debug)]
pub struct Res {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    pub verbs: Vec<&'static str>,
    /// A custom resource (its list items keep apiVersion/kind).
    pub custom: bool,
}

/// The verbs of a regular stored resource (what `kubectl api-resources -o
/// wide` prints for, say, configmaps).
const RW: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The built-in resources of a Kubernetes 1.30 API server with Kubeflow's
/// and Istio's CRDs installed, plus subresources and create-only ones as
/// discovery lists them (k8s.io/kubernetes pkg/controlplane, `kubectl
/// api-resources`).
fn builtin() -> Vec<Res> {
    let r = |g: &str, v: &str, p: &str, k: &str, n: bool, verbs: &[&'static str]| Res {
        group: g.into(),
        version: v.into(),
        plural: p.into(),
        kind: k.into(),
        namespaced: n,
        verbs: verbs.to_vec(),
        custom: false,
    };
    let mut v = vec![
        r("", "v1", "namespaces", "Namespace", false, RW),
        r(
            "",
            "v1",
            "namespaces/status",
            "Namespace",
            false,
            &["get", "patch", "update"],
        ),
        r("", "v1", "configmaps", "ConfigMap", true, RW),
        r("", "v1", "secrets", "Secret", true, RW),
        r("", "v1", "serviceaccounts", "ServiceAccount", true, RW),
        r(
            "",
            "v1",
            "serviceaccounts/token",
            "TokenRequest",
            true,
            &["create"],
        ),
        r("", "v1", "services", "Service", true, RW),
        r("", "v1", "pods", "Pod", true, RW),
        r("", "v1", "pods/log", "Pod", true, &["get"]),
        r("", "v1", "events", "Event", true, RW),
        r("", "v1", "endpoints", "Endpoints", true, RW),
        r(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            RW,
        ),
        r("", "v1", "persistentvolumes", "PersistentVolume", false, RW),
        r("", "v1", "limitranges", "LimitRange", true, RW),
        r("", "v1", "resourcequotas", "ResourceQuota", true, RW),
        r("", "v1", "bindings", "Binding", true, &["create"]),
        r("apps", "v1", "deployments", "Deployment", true, RW),
        r(
            "apps",
            "v1",
            "deployments/scale",
            "Scale",
            true,
            &["get", "patch", "update"],
        ),
        r("apps", "v1", "statefulsets", "StatefulSet", true, RW),
        r("apps", "v1", "replicasets", "ReplicaSet", true, RW),
        r("batch", "v1", "jobs", "Job", true, RW),
        r("rbac.authorization.k8s.io", "v1", "roles", "Role", true, RW),
        r(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            RW,
        ),
        r(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            RW,
        ),
        r(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            RW,
        ),
        r("coordination.k8s.io", "v1", "leases", "Lease", true, RW),
        r(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
            RW,
        ),
        // events.k8s.io serves the same stored events as core v1.
        r("events.k8s.io", "v1", "events", "Event", true, RW),
        r(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            RW,
        ),
        r(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
            &["create"],
        ),
        r(
            "storage.k8s.io",
            "v1",
            "storageclasses",
            "StorageClass",
            false,
            RW,
        ),
        r(
            "metrics.k8s.io",
            "v1beta1",
            "pods",
            "PodMetrics",
            true,
            &["get", "list"],
        ),
        r("kubeflow.org", "v1", "profiles", "Profile", false, RW),
        r(
            "security.istio.io",
            "v1beta1",
            "authorizationpolicies",
            "AuthorizationPolicy",
            true,
            RW,
        ),
    ];
    for x in v
        .iter_mut()
        .filter(|x| x.group == "kubeflow.org" || x.group == "security.istio.io")
    {
        x.custom = true;
    }
    v
}

/// Key: (plural, namespace or "", name).
type Key = (String, String, String);

/// One rule of a ClusterRole (k8s.io/api rbac/v1 PolicyRule).
#[derive(Clone, Debug)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    /// Empty: every object; else only these names (PolicyRule
    /// resourceNames; pkg/apis/rbac/v1/evaluation_helpers.go
    /// ResourceNameMatches: a request without a name, such as a list,
    /// does not match a rule that names objects).
    pub resource_names: Vec<String>,
}

impl Rule {
    /// Every rule of the ClusterRoles in a YAML file (several documents).
    pub fn from_cluster_roles(yaml: &str) -> Vec<Rule> {
        Self::from_roles(yaml, &["ClusterRole"])
    }

    /// The rules of the ClusterRoles and (namespace ignored: the double's
    /// rules hold in every namespace) Roles in `yaml`.
    pub fn from_roles(yaml: &str, kinds: &[&str]) -> Vec<Rule> {
        let mut out = vec![];
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !kinds.iter().any(|k| v["kind"] == *k) {
                continue;
            }
            for r in v["rules"].as_array().cloned().unwrap_or_default() {
                let list = |k: &str| -> Vec<String> {
                    r[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                out.push(Rule {
                    api_groups: list("apiGroups"),
                    resources: list("resources"),
                    verbs: list("verbs"),
                    resource_names: list("resourceNames"),
                });
            }
        }
        out
    }

    /// k8s.io/kubernetes pkg/apis/rbac/v1/evaluation_helpers.go:
    /// VerbMatches, APIGroupMatches, ResourceMatches (`*` matches all).
    fn allows(&self, group: &str, plural: &str, verb: &str, name: Option<&str>) -> bool {
        let any = |l: &[String], x: &str| l.iter().any(|e| e == "*" || e == x);
        any(&self.verbs, verb)
            && any(&self.api_groups, group)
            && any(&self.resources, plural)
            && (self.resource_names.is_empty()
                || name.is_some_and(|n| self.resource_names.iter().any(|r| r == n)))
    }
}
/// How long the simulated deployment controller takes to bring a scaled
/// Deployment's pods to the new count.
const SCALE_LAG: std::time::Duration = std::time::Duration::from_millis(400);

#[derive(Default)]
pub struct Store {
    pub objects: BTreeMap<Key, Value>,
    /// Last applied configuration per (object, manager).
    applied: BTreeMap<(Key, String), Value>,
    rv: u64,
    /// Emulate the profile controller (tests switch it off to see drift).
    pub controller: bool,
    /// A cluster without Kubeflow: no kubeflow.org API group.
    pub without_kubeflow: bool,
    /// Resources (plurals) labctl's identity may read but not write, as when
    /// its RBAC Role lacks a verb: writes get the RBAC authorizer's 403.
    pub forbidden: Vec<String>,
    /// When set, every resource request is authorized against these rules
    /// (a ClusterRole bound to labctl's identity).
    pub rbac: Option<Vec<Rule>>,
    /// The next this-many `continue` tokens presented are refused with
    /// 410 Expired (as after etcd compacted their revision).
    pub expire_continue: usize,
    /// The metrics.k8s.io aggregated API's backend is down (503).
    pub metrics_down: bool,
    /// When each CRD (by name) is Established.
    crd_ready: BTreeMap<String, Instant>,
    /// How long an applied CRD takes to become Established.
    pub crd_delay: Duration,
    /// How long the profile controller takes to act on a new Profile (a
    /// real one reconciles from controller-runtime's work queue some time
    /// after the Profile appears: kubeflow/kubeflow components/
    /// profile-controller/controllers/profile_controller.go Reconcile;
    /// until then namespaced writes into its namespace get 404).
    pub controller_delay: Duration,
    /// Profiles the controller has yet to act on, and when it will.
    pending: Vec<(Instant, Value)>,
    /// A stand-in for the Job controller and kubelet: `Some(true)` makes
    /// every created Job succeed shortly after, `Some(false)` fail; `None`
    /// leaves Jobs running.
    pub job_outcome: Option<bool>,
    /// When each Job (namespace, name) finishes.
    job_done: BTreeMap<(String, String), Instant>,
    /// Deployments scaled through `deployments/scale`: when, and the pod
    /// count before. Their `status.replicas` follows `spec.replicas` after
    /// [`SCALE_LAG`], as the deployment controller's pods come and go.
    scaled: BTreeMap<(String, String), (Instant, i64)>,
    pub requests: Vec<String>,
}
pub struct KubeSim {
    pub store: Arc<Mutex<Store>>,
    pub port: u16,
    _rt: tokio::runtime::Runtime,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn selector_matches(sel: &str, labels: &Map<String, Value>) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).and_then(Value::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k.trim_end_matches('=')).and_then(Value::as_str) == Some(v)
        } else {
            labels.contains_key(term)
        }
    })
}

impl Store {
    /// What is served now: the built-in resources and each Established
    /// CRD's served versions (apiextensions-apiserver
    /// customresource_discovery_controller.go skips CRDs that are not
    /// Established; versions with `served: false` are not listed).
    pub fn registry(&self) -> Vec<Res> {
        let mut v: Vec<Res> = builtin()
            .into_iter()
            .filter(|r| !(self.without_kubeflow && r.group == "kubeflow.org"))
            .collect();
        let now = Instant::now();
        for ((p, _, name), crd) in &self.objects {
            if p != "customresourcedefinitions" || self.crd_ready.get(name).is_none_or(|t| *t > now)
            {
                continue;
            }
            let spec = &crd["spec"];
            let group = spec["group"].as_str().unwrap_or("").to_string();
            let plural = spec["names"]["plural"].as_str().unwrap_or("").to_string();
            for ver in spec["versions"].as_array().cloned().unwrap_or_default() {
                let version = ver["name"].as_str().unwrap_or("").to_string();
                if ver["served"] == false
                    || v.iter()
                        .any(|r| r.group == group && r.version == version && r.plural == plural)
                {
                    continue;
                }
                v.push(Res {
                    group: group.clone(),
                    version,
                    plural: plural.clone(),
                    kind: spec["names"]["kind"].as_str().unwrap_or("").to_string(),
                    namespaced: spec["scope"] == "Namespaced",
                    verbs: RW.to_vec(),
                    custom: true,
                });
            }
        }
        v
    }

    /// Runs the controller actions that are due.
    fn reconcile(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.pending = later;
        for (_, p) in due {
            self.controller_for(&p);
        }
    }

    /// A server-side apply by another field manager, forced (`kubectl
    /// apply --server-side --force-conflicts`).
    pub fn apply_as(
        &mut self,
        key: Key,
        kind: &str,
        api_version: &str,
        patch: Value,
        manager: &str,
    ) {
        self.apply(key, kind, api_version, patch, manager, true);
    }

    /// `deployments/{name}/scale` (k8s.io/kubernetes pkg/registry/apps/
    /// deployment/storage/storage.go, ScaleREST): GET shows the
    /// Deployment as an autoscaling/v1 Scale (scaleFromDeployment: spec.
    /// replicas, status.replicas and the selector as a string); a merge
    /// PATCH sets the Deployment's spec.replicas, refusing a negative count
    /// as pkg/apis/autoscaling/validation ValidateScale does (422).
    fn scale(
        &mut self,
        ns: String,
        name: &str,
        method: &str,
        ctype: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let key = ("deployments".to_string(), ns.clone(), name.to_string());
        let Some(d) = self.objects.get(&key).cloned() else {
            return status(
                404,
                "NotFound",
                &format!("deployments.apps \"{name}\" not found"),
            );
        };
        let as_scale = |d: &Value, st: &Store| {
            let d = st.with_deployment_status(d.clone());
            let sel = d["spec"]["selector"]["matchLabels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
                   "metadata": {"name": d["metadata"]["name"], "namespace": d["metadata"]["namespace"],
                                "uid": d["metadata"]["uid"], "resourceVersion": d["metadata"]["resourceVersion"],
                                "creationTimestamp": d["metadata"]["creationTimestamp"]},
                   "spec": {"replicas": d["spec"]["replicas"].as_i64().unwrap_or(1)},
                   "status": {"replicas": d["status"]["replicas"].as_i64().unwrap_or(0), "selector": sel}})
        };
        match method {
            "GET" => (200, as_scale(&d, self)),
            "PATCH" if ctype == "application/merge-patch+json" => {
                let mut sc = as_scale(&d, self);
                let patch: Value = match serde_json::from_slice(body) {
                    Ok(p) => p,
                    Err(e) => {
                        return status(400, "BadRequest", &format!("error decoding patch: {e}"))
                    }
                };
                merge(&mut sc, &patch);
                let Some(n) = sc["spec"]["replicas"].as_i64() else {
                    return status(
                        422,
                        "Invalid",
                        &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Required value"),
                    );
                };
                if n < 0 {
                    return status(
                        422,
                        "Invalid",
                        &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {n}: must be greater than or equal to 0"),
                    );
                }
                let before = self.with_deployment_status(d.clone())["status"]["replicas"]
                    .as_i64()
                    .unwrap_or(0);
                let mut d = d;
                d["spec"]["replicas"] = json!(n);
                self.scaled
                    .insert((ns, name.to_string()), (Instant::now(), before));
                self.put("deployments", d);
                (200, as_scale(&self.objects[&key].clone(), self))
            }
            "PATCH" => status(
                415,
                "UnsupportedMediaType",
                &format!("the simulator's scale takes merge patches, not {ctype}"),
            ),
            _ => status(
                405,
                "MethodNotAllowed",
                &format!("{method} is not supported on deployments/scale here"),
            ),
        }
    }

    /// A Deployment as the server shows it: `status.replicas` reaches
    /// `spec.replicas` [`SCALE_LAG`] after a scale (pkg/controller/
    /// deployment/sync.go calculateStatus counts the pods that exist).
    fn with_deployment_status(&self, mut d: Value) -> Value {
        let key = (
            d["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            d["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let live = match self.scaled.get(&key) {
            Some((at, before)) if at.elapsed() < SCALE_LAG => *before,
            _ => want,
        };
        d["status"]["replicas"] = json!(live);
        d["status"]["readyReplicas"] = json!(live);
        d
    }

    /// A Job as the server shows it once the Job controller has seen its
    /// pod finish (batch/v1 JobStatus: `succeeded`/`failed` counts and the
    /// `Complete`/`Failed` conditions).
    fn with_job_status(&self, mut job: Value) -> Value {
        let key = (
            job["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            job["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let done = self
            .job_done
            .get(&key)
            .is_some_and(|t| *t <= Instant::now());
        job["status"] = match (self.job_outcome, done) {
            (Some(true), true) => {
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            }
            (Some(false), true) => {
                json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
            }
            _ => json!({"active": 1}),
        };
        job
    }

    /// A CRD as the server shows it: `status.conditions` says whether it
    /// is Established (apiextensions-apiserver pkg/controller/establish).
    fn with_crd_status(&self, mut crd: Value) -> Value {
        let name = crd["metadata"]["name"].as_str().unwrap_or("");
        let established = self
            .crd_ready
            .get(name)
            .is_some_and(|t| *t <= Instant::now());
        crd["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": if established { "True" } else { "False" },
             "reason": if established { "InitialNamesAccepted" } else { "Installing" }}
        ]});
        crd
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// Inserts or replaces an object as a client would have created it.
    pub fn put(&mut self, plural: &str, mut obj: Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let rv = self.next_rv();
        let m = obj["metadata"].as_object_mut().unwrap();
        m.insert("resourceVersion".into(), json!(rv));
        m.entry("uid").or_insert(json!(format!("uid-{rv}")));
        m.entry("creationTimestamp")
            .or_insert(json!("2026-11-26T00:00:00Z"));
        if plural == "customresourcedefinitions" {
            // Objects put by a fixture are established already.
            self.crd_ready
                .entry(name.clone())
                .or_insert_with(Instant::now);
        }
        self.objects.insert((plural.into(), ns, name), obj);
    }

    fn controller_for(&mut self, profile: &Value) {
        if !self.controller {
            return;
        }
        let name = profile["metadata"]["name"].as_str().unwrap().to_string();
        let owner = profile["spec"]["owner"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if !self
            .objects
            .contains_key(&("namespaces".into(), String::new(), name.clone()))
        {
            self.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": {"owner": owner}, "labels": {"app.kubernetes.io/part-of": "kubeflow-profile"}}}));
        }
        if !self.objects.contains_key(&(
            "rolebindings".into(),
            name.clone(),
            "namespaceAdmin".into(),
        )) {
            self.put("rolebindings", json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "namespaceAdmin", "namespace": name, "annotations": {"user": owner, "role": "admin"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": owner}]}));
        }
        if !self.objects.contains_key(&(
            "authorizationpolicies".into(),
            name.clone(),
            "ns-owner-access-istio".into(),
        )) {
            self.put("authorizationpolicies", json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "ns-owner-access-istio", "namespace": name},
                "spec": {"rules": [{"when": [{"key": "request.headers[kubeflow-userid]", "values": [owner]}]}]}}));
        }
        // profile_controller.go: the namespace's ServiceAccounts and their
        // bindings to the Kubeflow roles.
        for (sa, role) in [
            ("default-editor", "kubeflow-edit"),
            ("default-viewer", "kubeflow-view"),
        ] {
            if !self
                .objects
                .contains_key(&("serviceaccounts".into(), name.clone(), sa.into()))
            {
                self.put("serviceaccounts", json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": name}}));
                self.put("rolebindings", json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": sa, "namespace": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": name}]}));
            }
        }
        if let Some(hard) = profile["spec"]["resourceQuotaSpec"]["hard"]
            .as_object()
            .filter(|h| !h.is_empty())
        {
            self.put("resourcequotas", json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "kf-resource-quota", "namespace": name}, "spec": {"hard": hard}}));
        }
    }

    fn apply(
        &mut self,
        key: Key,
        kind: &str,
        api_version: &str,
        patch: Value,
        manager: &str,
        force: bool,
    ) -> (u16, Value) {
        let prev = self
            .applied
            .get(&(key.clone(), manager.to_string()))
            .cloned();
        let existing = self.objects.get(&key).cloned();
        let mut obj = existing.clone().unwrap_or_else(
            || json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": key.2}}),
        );
        if !key.1.is_empty() {
            obj["metadata"]["namespace"] = json!(key.1);
        }
        // Conflicts: another manager applied a different value for a field.
        if !force {
            for ((k, m), other) in &self.applied {
                if *k != key || m == manager {
                    continue;
                }
                for (field, v) in patch.as_object().unwrap() {
                    if field != "metadata" && other.get(field).is_some_and(|o| o != v) {
                        return status(
                            409,
                            "Conflict",
                            &format!(
                                "Apply failed with 1 conflict: conflict with \"{m}\": .{field}"
                            ),
                        );
                    }
                }
            }
        }
        for section in ["labels", "annotations"] {
            let mut map = obj["metadata"][section]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if let Some(old) = prev
                .as_ref()
                .and_then(|p| p["metadata"][section].as_object())
            {
                for k in old.keys() {
                    if patch["metadata"][section].get(k).is_none() {
                        map.remove(k);
                    }
                }
            }
            if let Some(new) = patch["metadata"][section].as_object() {
                for (k, v) in new {
                    map.insert(k.clone(), v.clone());
                }
            }
            if map.is_empty() {
                obj["metadata"].as_object_mut().unwrap().remove(section);
            } else {
                obj["metadata"][section] = Value::Object(map);
            }
        }
        // metadata.ownerReferences is a list keyed by uid
        // (+listType=map): the applier's entries replace what it applied
        // before (a single manager here, as labctl applies it).
        match patch["metadata"].get("ownerReferences") {
            Some(refs) => obj["metadata"]["ownerReferences"] = refs.clone(),
            None if prev
                .as_ref()
                .is_some_and(|p| p["metadata"].get("ownerReferences").is_some()) =>
            {
                obj["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("ownerReferences");
            }
            None => {}
        }
        if let Some(old) = &prev {
            for k in old.as_object().unwrap().keys() {
                if !["apiVersion", "kind", "metadata"].contains(&k.as_str())
                    && patch.get(k).is_none()
                {
                    obj.as_object_mut().unwrap().remove(k);
                }
            }
        }
        for (k, v) in patch.as_object().unwrap() {
            if !["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                obj[k] = v.clone();
            }
        }
        if key.0 == "jobs" && existing.is_none() {
            self.job_done.insert(
                (key.1.clone(), key.2.clone()),
                Instant::now() + Duration::from_millis(300),
            );
        }
        if key.0 == "customresourcedefinitions" && existing.is_none() {
            // apiextensions-apiserver pkg/controller/establish: a new CRD is
            // Established by a controller shortly after it is created.
            self.crd_ready
                .insert(key.2.clone(), Instant::now() + self.crd_delay);
        }
        let changed = existing.as_ref() != Some(&obj);
        self.applied
            .insert((key.clone(), manager.to_string()), patch);
        if changed {
            obj["metadata"]["managedFields"] =
                json!([{"manager": manager, "operation": "Apply", "apiVersion": api_version}]);
            let plural = key.0.clone();
            self.put(&plural, obj);
            if kind == "Profile" {
                let p = self.objects[&key].clone();
                if self.controller_delay.is_zero() {
                    self.controller_for(&p);
                } else {
                    self.pending
                        .push((Instant::now() + self.controller_delay, p));
                }
            }
        }
        (
            if existing.is_some() { 200 } else { 201 },
            self.objects[&key].clone(),
        )
    }

    fn delete(&mut self, key: &Key) {
        self.objects.remove(key);
        self.applied.retain(|(k, _), _| k != key);
        // The controller recreates the objects it owns from the Profile.
        if (key.2 == "namespaceAdmin" || key.2 == "ns-owner-access-istio") && self.controller {
            if let Some(p) = self
                .objects
                .get(&("profiles".into(), String::new(), key.1.clone()))
                .cloned()
            {
                self.controller_for(&p);
            }
        }
        if key.0 == "namespaces" {
            // The namespace lifecycle controller deletes everything in a
            // deleted namespace (pkg/controller/namespace/deletion).
            let ns = key.2.clone();
            self.objects.retain(|(_, n, _), _| *n != ns);
        }
        if key.0 == "profiles" {
            // The namespace goes, and everything in it.
            let ns = key.2.clone();
            self.objects
                .retain(|(p, n, name), _| *n != ns && !(p == "namespaces" && *name == ns));
        }
    }
}

impl KubeSim {
    pub fn start() -> KubeSim {
        let store = Arc::new(Mutex::new(Store {
            controller: true,
            crd_delay: Duration::from_millis(300),
            ..Default::default()
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let st = store.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, &st).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        KubeSim {
            store,
            port,
            _rt: rt,
        }
    }

    /// A kubeconfig file for this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: labctl\n  user:\n    token: {TOKEN}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: labctl\ncurrent-context: sim\n",
                self.port
            ),
        )
        .unwrap();
        p
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.store.lock().unwrap())
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.with(|s| {
            s.objects
                .get(&(plural.into(), ns.into(), name.into()))
                .cloned()
        })
    }
}

type Resp = hyper::Response<http_body_util::Full<hyper::body::Bytes>>;

fn reply((code, body): (u16, Value)) -> Resp {
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.to_string(),
        )))
        .unwrap()
}

async fn handle(req: hyper::Request<hyper::body::Incoming>, st: &Mutex<Store>) -> Resp {
    use http_body_util::BodyExt;
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                urlencoding::decode(v)
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if auth != format!("Bearer {TOKEN}") {
        return reply(status(401, "Unauthorized", "Unauthorized"));
    }
    let mut s = st.lock().unwrap();
    s.reconcile();
    s.requests.push(format!("{method} {path}"));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_served = || {
        reply(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ))
    };
    let registry = s.registry();
    // Discovery and /version: non-resource URLs every authenticated user
    // may read (the system:discovery ClusterRole).
    if method == "GET" {
        let resource_list = |group: &str, version: &str| -> Option<Value> {
            let list: Vec<Value> = registry
                .iter()
                .filter(|r| r.group == group && r.version == version)
                .map(|r| json!({"name": r.plural, "singularName": "", "kind": r.kind, "namespaced": r.namespaced, "verbs": r.verbs}))
                .collect();
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            (!list.is_empty()).then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}))
        };
        match segs.as_slice() {
            ["version"] => {
                return reply((
                    200,
                    json!({"major": "1", "minor": "30", "gitVersion": "v1.30.4-kubesim", "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"}),
                ))
            }
            ["api"] => {
                return reply((
                    200,
                    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
                ))
            }
            ["api", v] => {
                return match resource_list("", v) {
                    Some(l) => reply((200, l)),
                    None => not_served(),
                }
            }
            ["apis"] => {
                let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for r in registry.iter().filter(|r| !r.group.is_empty()) {
                    let vs = groups.entry(&r.group).or_default();
                    if !vs.contains(&r.version.as_str()) {
                        vs.push(&r.version);
                    }
                }
                let groups: Vec<Value> = groups
                    .iter()
                    .map(|(g, vs)| {
                        let versions: Vec<Value> = vs
                            .iter()
                            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                            .collect();
                        json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                    })
                    .collect();
                return reply((
                    200,
                    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
                ));
            }
            ["apis", "metrics.k8s.io", _] if s.metrics_down => {
                // kube-aggregator: an APIService whose backend is unavailable.
                return reply(status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ));
            }
            ["apis", g, v] => {
                return match resource_list(g, v) {
                    Some(l) => reply((200, l)),
                    None => not_served(),
                }
            }
            _ => {}
        }
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return not_served(),
    };
    // A subresource is authorized and served as "resource/subresource"
    // (k8s.io/apiserver pkg/endpoints/request/requestinfo.go).
    let sub_plural;
    let (ns, plural, name): (Option<&str>, &str, Option<&str>) = match rest {
        ["namespaces", n] if group.is_empty() => (None, "namespaces", Some(*n)),
        ["namespaces", n, p] => (Some(*n), *p, None),
        ["namespaces", n, p, name] => (Some(*n), *p, Some(*name)),
        ["namespaces", n, p, name, sub] => {
            sub_plural = format!("{p}/{sub}");
            (Some(*n), sub_plural.as_str(), Some(*name))
        }
        [p] => (None, *p, None),
        [p, name] => (None, *p, Some(*name)),
        _ => return not_served(),
    };
    let Some(res) = registry
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
        .cloned()
    else {
        return reply(status(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({plural})"),
        ));
    };
    let (g, kind, namespaced) = (res.group.as_str(), res.kind.as_str(), res.namespaced);
    let api_version = if g.is_empty() {
        version.to_string()
    } else {
        format!("{g}/{version}")
    };
    let ns_key = if namespaced {
        ns.unwrap_or("").to_string()
    } else {
        String::new()
    };
    let qualified = if g.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{g}")
    };
    let not_found = |n: &str| status(404, "NotFound", &format!("{qualified} \"{n}\" not found"));
    // The request's verb (k8s.io/apiserver pkg/endpoints/request/
    // requestinfo.go: GET with a name is get, without one list; PATCH
    // patch; DELETE delete; POST create; PUT update).
    let verb = match (method.as_str(), name) {
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        ("PUT", _) => "update",
        _ => "create",
    };
    if !res.verbs.contains(&verb) {
        return reply(status(
            405,
            "MethodNotAllowed",
            &format!("the server does not allow this method on the requested resource ({verb} {qualified})"),
        ));
    }
    // RBAC (k8s.io/apiserver pkg/endpoints/handlers/responsewriters/
    // errors.go forbiddenMessage; apierrors.NewForbidden).
    let allowed = match &s.rbac {
        Some(rules) => rules.iter().any(|r| r.allows(g, plural, verb, name)),
        None => !(method != "GET" && s.forbidden.iter().any(|f| f == plural)),
    };
    if !allowed {
        let scope = match ns {
            Some(n) => format!("in the namespace \"{n}\""),
            None => "at the cluster scope".to_string(),
        };
        let subject = match name {
            Some(n) => format!("{qualified} \"{n}\""),
            None => qualified.clone(),
        };
        return reply(status(
            403,
            "Forbidden",
            &format!(
                "{subject} is forbidden: User \"system:serviceaccount:labctl:labctl\" cannot {verb} resource \"{plural}\" in API group \"{g}\" {scope}"
            ),
        ));
    }
    if plural == "deployments/scale" {
        return reply(s.scale(ns_key, name.unwrap_or(""), &method, &ctype, &body));
    }
    match (method.as_str(), name) {
        ("GET", None) => {
            let sel = query.get("labelSelector").cloned().unwrap_or_default();
            let limit: usize = query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            // Continue tokens (k8s.io/apiserver pkg/storage/continue.go):
            // base64 of {"v":"meta.k8s.io/v1","rv":N,"start":"key\u0000"};
            // a compacted revision is 410 Expired (storage/etcd3/store.go,
            // apierrors.NewResourceExpired), a bad token 400.
            let mut start = String::new();
            let mut list_rv = s.rv;
            if let Some(tok) = query.get("continue").filter(|t| !t.is_empty()) {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(tok)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
                let Some(c) = decoded.filter(|c| c["v"] == "meta.k8s.io/v1") else {
                    return reply(status(
                        400,
                        "BadRequest",
                        "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
                    ));
                };
                if s.expire_continue > 0 {
                    s.expire_continue -= 1;
                    return reply(status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                start = c["start"]
                    .as_str()
                    .unwrap_or("")
                    .trim_end_matches('\0')
                    .to_string();
                list_rv = c["rv"].as_u64().unwrap_or(list_rv);
            }
            let matching: Vec<(String, Value)> = s
                .objects
                .iter()
                .filter(|((p, n, _), _)| p == plural && (ns.is_none() || Some(n.as_str()) == ns))
                .filter(|(_, o)| {
                    selector_matches(
                        &sel,
                        &o["metadata"]["labels"]
                            .as_object()
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
                .map(|((_, n, name), o)| (format!("{n}/{name}"), o.clone()))
                .filter(|(k, _)| start.is_empty() || *k > start)
                .collect();
            let more = matching.len() > limit;
            let page: Vec<(String, Value)> = matching.into_iter().take(limit).collect();
            let mut meta = json!({"resourceVersion": list_rv.to_string()});
            if more {
                use base64::Engine;
                let last = &page.last().unwrap().0;
                let tok =
                    json!({"v": "meta.k8s.io/v1", "rv": list_rv, "start": format!("{last}\u{0}")});
                meta["continue"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(tok.to_string()));
            }
            let items: Vec<Value> = page
                .into_iter()
                .map(|(_, mut o)| {
                    if !res.custom {
                        // Typed lists encode items without TypeMeta.
                        let m = o.as_object_mut().unwrap();
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    if plural == "customresourcedefinitions" {
                        o = s.with_crd_status(o);
                    }
                    o
                })
                .collect();
            reply((
                200,
                json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": meta, "items": items}),
            ))
        }
        ("GET", Some(n)) => match s.objects.get(&(plural.into(), ns_key, n.into())) {
            Some(o) if plural == "customresourcedefinitions" => {
                reply((200, s.with_crd_status(o.clone())))
            }
            Some(o) if plural == "jobs" => reply((200, s.with_job_status(o.clone()))),
            Some(o) if plural == "deployments" => reply((200, s.with_deployment_status(o.clone()))),
            Some(o) => reply((200, o.clone())),
            None => reply(not_found(n)),
        },
        ("PATCH", Some(n)) if ctype == "application/merge-patch+json" => {
            let key = (plural.to_string(), ns_key, n.to_string());
            let Some(mut obj) = s.objects.get(&key).cloned() else {
                return reply(not_found(n));
            };
            let patch: Value = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return reply(status(
                        400,
                        "BadRequest",
                        &format!("error decoding patch: {e}"),
                    ))
                }
            };
            merge(&mut obj, &patch);
            s.put(plural, obj);
            reply((200, s.objects[&key].clone()))
        }
        ("PATCH", Some(n)) => {
            if ctype != "application/apply-patch+yaml" {
                return reply(status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the simulator supports only server-side apply, not {ctype}"),
                ));
            }
            let Some(manager) = query.get("fieldManager").cloned() else {
                return reply(status(
                    422,
                    "Invalid",
                    "fieldManager is required for apply requests",
                ));
            };
            let patch: Value = match serde_norway::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return reply(status(
                        400,
                        "BadRequest",
                        &format!("error decoding patch: {e}"),
                    ))
                }
            };
            if patch["kind"] != kind
                || patch["apiVersion"] != api_version.as_str()
                || patch["metadata"]["name"] != n
            {
                return reply(status(
                    400,
                    "BadRequest",
                    "apiVersion, kind and metadata.name of the patch must match the URL",
                ));
            }
            // A namespaced object needs its namespace to exist
            // (NamespaceLifecycle admission plugin).
            if namespaced
                && !s
                    .objects
                    .contains_key(&("namespaces".into(), String::new(), ns_key.clone()))
            {
                return reply(status(
                    404,
                    "NotFound",
                    &format!("namespaces \"{ns_key}\" not found"),
                ));
            }
            // metadata.uid of an owner reference must name a live object
            // the garbage collector can find; the server does not check it
            // on write, but an empty one is refused by validation
            // (apimachinery ValidateOwnerReferences: uid must not be empty).
            if let Some(refs) = patch["metadata"]["ownerReferences"].as_array() {
                if refs
                    .iter()
                    .any(|r| r["uid"].as_str().is_none_or(str::is_empty))
                {
                    return reply(status(
                        422,
                        "Invalid",
                        &format!("{kind} \"{n}\" is invalid: metadata.ownerReferences.uid: Invalid value: \"\": uid must not be empty"),
                    ));
                }
            }
            if let Some(why) = typed_problem(kind, &patch) {
                return reply(status(400, "BadRequest", &why));
            }
            let force = query.get("force").is_some_and(|f| f == "true");
            let key = (plural.to_string(), ns_key, n.to_string());
            reply(s.apply(key, kind, &api_version, patch, &manager, force))
        }
        ("DELETE", Some(n)) => {
            let key = (plural.to_string(), ns_key, n.to_string());
            if !s.objects.contains_key(&key) {
                return reply(not_found(n));
            }
            s.delete(&key);
            reply((
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ))
        }
        _ => reply(status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported here"),
        )),
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Server-side apply converts the patch to the kind's schema first
/// (k8s.io/apiserver pkg/endpoints/handlers/fieldmanager: "failed to create
/// typed patch object"; structured-merge-diff: "field not declared in
/// schema"), so an unknown field is refused, not dropped. For the kinds
/// labctl creates (Job, PersistentVolumeClaim, Secret) the schema is
/// k8s-openapi's typed struct: a field lost on the round trip is unknown.
/// Jobs are also validated as pkg/apis/batch/validation does for what
/// labctl sets (restartPolicy, containers' names and images).
fn typed_problem(kind: &str, patch: &Value) -> Option<String> {
    fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
        v: &Value,
    ) -> Result<Value, String> {
        let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(t).unwrap())
    }
    fn missing(want: &Value, got: &Value, path: &str) -> Option<String> {
        match (want, got) {
            (Value::Object(w), Value::Object(g)) => w.iter().find_map(|(k, v)| {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    None if !v.is_null() => Some(p),
                    None => None,
                    Some(gv) => missing(v, gv, &p),
                }
            }),
            (Value::Array(w), Value::Array(g)) => w
                .iter()
                .zip(g)
                .enumerate()
                .find_map(|(i, (a, b))| missing(a, b, &format!("{path}[{i}]"))),
            _ => None,
        }
    }
    let gvk = match kind {
        "Job" => "batch/v1, Kind=Job",
        "PersistentVolumeClaim" => "/v1, Kind=PersistentVolumeClaim",
        "Secret" => "/v1, Kind=Secret",
        _ => return None,
    };
    let back = match kind {
        "Job" => roundtrip::<k8s_openapi::api::batch::v1::Job>(patch),
        "PersistentVolumeClaim" => {
            roundtrip::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(patch)
        }
        _ => roundtrip::<k8s_openapi::api::core::v1::Secret>(patch),
    };
    let back = match back {
        Ok(b) => b,
        Err(e) => return Some(format!("failed to create typed patch object ({gvk}): {e}")),
    };
    if let Some(p) = missing(patch, &back, "") {
        return Some(format!(
            "failed to create typed patch object ({gvk}): {p}: field not declared in schema"
        ));
    }
    if kind == "Job" {
        let pod = &patch["spec"]["template"]["spec"];
        if !["Never", "OnFailure"].contains(&pod["restartPolicy"].as_str().unwrap_or("")) {
            return Some("Job.batch is invalid: spec.template.spec.restartPolicy: Required value: valid values: \"OnFailure\", \"Never\"".into());
        }
        for c in pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
        {
            if c["name"].as_str().is_none_or(str::is_empty)
                || c["image"].as_str().is_none_or(str::is_empty)
            {
                return Some(
                    "Job.batch is invalid: spec.template.spec.containers[0].image: Required value"
                        .into(),
                );
            }
        }
        let vols: Vec<&str> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for c in pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
        {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let n = m["name"].as_str().unwrap_or("");
                if !vols.contains(&n) {
                    return Some(format!("Job.batch is invalid: spec.template.spec.containers[0].volumeMounts[0].name: Not found: \"{n}\""));
                }
            }
        }
    }
    None
}
