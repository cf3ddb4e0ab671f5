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
//!   `fieldManager`, `force`, `dryRun=All`) field by field with
//!   `metadata.managedFields` per manager and operation (FieldsV1), as
//!   structured-merge-diff does: maps granular, lists atomic, 409 on a
//!   field another manager owns with another value unless forced, fields a
//!   manager stops applying removed unless someone else owns them; JSON
//!   merge patches and controller writes are Update operations that take
//!   over the fields they change (see `Store::apply`, `Store::update_as`);
//! - defaulting and canonical quantities for ResourceQuota and LimitRange
//!   (`SetDefaults_LimitRangeItem`, the `resource.Quantity` round trip)
//!   and their validation as 422 `Invalid` Status bodies;
//! - deletion with finalizers (`deletionTimestamp`, gone when the last
//!   finalizer is removed), namespaces that turn `Terminating` and refuse
//!   new objects (403) until the namespace controller has emptied them;
//! - CustomResourceDefinitions: an applied CRD becomes `Established` after a
//!   short delay, and only then is its kind in discovery and served;
//! - RBAC: either single resources whose writes are forbidden, or a whole
//!   ClusterRole's rules (as shipped in deploy/kubernetes/) that every
//!   request's verb is checked against, with the authorizer's 403 message.
//!
//! A small stand-in for the Kubeflow profile controller
//! (kubeflow/kubeflow components/profile-controller/controllers/
//! profile_controller.go) creates, per Profile, its Namespace (with the
//! `owner` annotation and the Profile as controller owner reference),
//! `namespaceAdmin`, `ns-owner-access-istio`, the `default-editor` and
//! `default-viewer` ServiceAccounts and bindings and `kf-resource-quota`;
//! refuses a namespace whose owner annotation names someone else (a Failed
//! condition, nothing created); registers `profile-finalizer` with a whole
//! Profile update (which writes `resourceQuotaSpec: {}` and canonical
//! quantities, as manager `manager`); and on deletion removes the
//! finalizer, after which the garbage collector deletes the namespace. labctl reaches it through kube
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
    /// Who owns which fields of each object (`metadata.managedFields`).
    owners: BTreeMap<Key, Vec<Owner>>,
    rv: u64,
    /// Emulate the profile controller (tests switch it off to see drift).
    pub controller: bool,
    /// A cluster without Kubeflow: no kubeflow.org API group.
    pub without_kubeflow: bool,
    /// Resources (plurals) labctl's identity may read but not write, as when
    /// its RBAC Role lacks a verb: writes get the RBAC authorizer's 403.
    pub forbidden: Vec<String>,
    /// Resources (plurals) whose stored writes fail in etcd (500
    /// "etcdserver: request timed out"); dry runs still succeed.
    pub fail_writes: Vec<String>,
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
    /// Objects marked for deletion and when their finalizers (or, for a
    /// namespace, the namespace controller) will be done.
    finalizing: Vec<(Instant, Key)>,
    /// How long finalizers and namespace deletion take.
    pub finalize_delay: Duration,
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
        self.finalize();
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
        self.apply(key, kind, api_version, patch, manager, true, false);
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
        let key: Key = (plural.into(), ns.clone(), name.clone());
        if let Some(owners) = self.owners.get(&key) {
            obj["metadata"]["managedFields"] = managed_fields(owners);
        }
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
        let pkey: Key = ("profiles".into(), String::new(), name.clone());
        let Some(live) = self.objects.get(&pkey).cloned() else {
            return;
        };
        if live["metadata"].get("deletionTimestamp").is_some() {
            return;
        }
        match self
            .objects
            .get(&("namespaces".into(), String::new(), name.clone()))
        {
            None => {
                let uid = live["metadata"]["uid"].clone();
                self.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": {"owner": owner},
                    "labels": {"app.kubernetes.io/part-of": "kubeflow-profile", "istio-injection": "enabled"},
                    "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "Profile", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                    "status": {"phase": "Active"}}));
            }
            Some(ns) if ns["metadata"].get("deletionTimestamp").is_some() => {
                // Writes into a terminating namespace fail; the work queue
                // retries the Profile with backoff until it is gone.
                self.pending
                    .push((Instant::now() + Duration::from_millis(200), live));
                return;
            }
            Some(ns) if ns["metadata"]["annotations"]["owner"] != owner.as_str() => {
                // profile_controller.go: an existing namespace whose owner
                // annotation names someone else is not taken over; the
                // Profile gets a Failed condition and nothing is created.
                let mut p = live;
                p["status"] = json!({"conditions": [{"type": "Failed", "message": format!("namespace already exist, but not owned by profile creator {owner}")}]});
                self.put("profiles", p);
                return;
            }
            Some(_) => {}
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
            // getAuthorizationPolicy in profile_controller.go: the owner
            // by the user-id header, workloads of the same namespace, and
            // Knative's probe paths.
            self.put("authorizationpolicies", json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "ns-owner-access-istio", "namespace": name, "annotations": {"user": owner, "role": "admin"}},
                "spec": {"action": "ALLOW", "rules": [
                    {"when": [{"key": "request.headers[kubeflow-userid]", "values": [owner]}]},
                    {"when": [{"key": "source.namespace", "values": [name]}]},
                    {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]}
                ]}}));
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
            let mut q = self.objects[&(
                "resourcequotas".into(),
                name.clone(),
                "kf-resource-quota".into(),
            )]
                .clone();
            normalise("ResourceQuota", &mut q);
            self.put("resourcequotas", q);
        }
        // Registering the finalizer: `r.Update(ctx, instance)` writes the
        // whole typed Profile back, so `resourceQuotaSpec` (a struct,
        // never omitted) appears as `{}` when the Profile had none, and its
        // quantities come back canonical. The controller (field manager
        // "manager", from its binary's name) owns what that changed.
        let mut p = self.objects[&pkey].clone();
        let has = p["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "profile-finalizer"));
        if !has {
            let mut f = p["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            f.push(json!("profile-finalizer"));
            p["metadata"]["finalizers"] = Value::Array(f);
            if p["spec"].get("resourceQuotaSpec").is_none() {
                p["spec"]["resourceQuotaSpec"] = json!({});
            }
            let mut rq = json!({"spec": {"hard": p["spec"]["resourceQuotaSpec"]["hard"].clone()}});
            if rq["spec"]["hard"].is_object() {
                normalise("ResourceQuota", &mut rq);
                p["spec"]["resourceQuotaSpec"]["hard"] = rq["spec"]["hard"].clone();
            }
            self.update_as("profiles", p, "manager");
        }
    }

    /// Server-side apply (k8s.io/apiserver pkg/endpoints/handlers/
    /// fieldmanager, sigs.k8s.io/structured-merge-diff merge/update.go
    /// `Updater.Apply`), field by field:
    /// - the fields a configuration sets are its leaf paths; maps are
    ///   granular and lists atomic, as they are for every list labctl
    ///   writes (RoleBinding `subjects` and LimitRange `limits` are
    ///   `+listType=atomic`; a CRD list without `x-kubernetes-list-type` is
    ///   atomic too; `metadata.ownerReferences` is one owner's here);
    /// - a field another manager owns with a different value is a conflict
    ///   (409, "Apply failed with N conflict(s)") unless `force`, which
    ///   takes the field over;
    /// - a field the manager applied before and no longer applies is
    ///   removed, unless another manager still owns it;
    /// - defaulting, canonical quantities and validation run on the result
    ///   as for any write; `dryRun=All` answers with the result and stores
    ///   nothing (apiserver `dryRun` handling in handlers/patch.go).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        key: Key,
        kind: &str,
        api_version: &str,
        patch: Value,
        manager: &str,
        force: bool,
        dry_run: bool,
    ) -> (u16, Value) {
        let existing = self.objects.get(&key).cloned();
        let mut obj = existing.clone().unwrap_or_else(
            || json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": key.2}}),
        );
        if !key.1.is_empty() {
            obj["metadata"]["namespace"] = json!(key.1);
        }
        let mut owners = self.owners.get(&key).cloned().unwrap_or_default();
        let new_set = field_set(&patch);
        let mut conflicts: Vec<(String, Path)> = vec![];
        for o in owners.iter().filter(|o| o.manager != manager) {
            for p in new_set.intersection(&o.fields) {
                if get_path(&obj, p) != get_path(&patch, p) {
                    conflicts.push((o.manager.clone(), p.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !force {
                let n = conflicts.len();
                let list: Vec<String> = conflicts
                    .iter()
                    .map(|(m, p)| format!("conflict with \"{m}\": .{}", p.join(".")))
                    .collect();
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Apply failed with {n} conflict{}: {}",
                        if n == 1 { "" } else { "s" },
                        list.join("; ")
                    ),
                );
            }
            for o in owners.iter_mut().filter(|o| o.manager != manager) {
                for (_, p) in &conflicts {
                    o.fields.remove(p);
                }
            }
        }
        let before: FieldSet = owners
            .iter()
            .find(|o| o.manager == manager && o.operation == "Apply")
            .map(|o| o.fields.clone())
            .unwrap_or_default();
        for p in before.difference(&new_set) {
            let still_owned = owners
                .iter()
                .any(|o| o.manager != manager && o.fields.iter().any(|f| f.starts_with(p)));
            if !still_owned {
                remove_path(&mut obj, p);
            }
        }
        for p in &new_set {
            set_path(
                &mut obj,
                p,
                get_path(&patch, p).cloned().unwrap_or(Value::Null),
            );
        }
        normalise(kind, &mut obj);
        if let Some(why) = invalid(kind, &obj) {
            return why;
        }
        owners.retain(|o| !(o.manager == manager && o.operation == "Apply"));
        owners.push(Owner {
            manager: manager.to_string(),
            operation: "Apply",
            api_version: api_version.to_string(),
            fields: new_set,
        });
        owners.retain(|o| !o.fields.is_empty());
        let code = if existing.is_some() { 200 } else { 201 };
        if dry_run {
            obj["metadata"]["managedFields"] = managed_fields(&owners);
            return (code, obj);
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
        let old_owners = self.owners.get(&key).cloned().unwrap_or_default();
        let changed =
            existing.as_ref().map(strip_meta) != Some(strip_meta(&obj)) || old_owners != owners;
        if changed {
            self.owners.insert(key.clone(), owners);
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
        (code, self.objects[&key].clone())
    }

    /// A write by `manager` with an Update operation (PUT, JSON merge
    /// patch, a controller's `r.Update`): the manager takes the fields whose
    /// values it changed from everyone else (structured-merge-diff
    /// `Updater.Update`), fields it removed leave every owner, and the
    /// object is defaulted, canonicalised and stored.
    pub fn update_as(&mut self, plural: &str, mut obj: Value, manager: &str) {
        let key: Key = (
            plural.to_string(),
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        normalise(&kind, &mut obj);
        let before = self.objects.get(&key).cloned().unwrap_or(json!({}));
        let new = field_set(&obj);
        let changed: FieldSet = new
            .iter()
            .filter(|p| get_path(&before, p) != get_path(&obj, p))
            .cloned()
            .collect();
        let gone: FieldSet = field_set(&before).difference(&new).cloned().collect();
        let mut owners = self.owners.get(&key).cloned().unwrap_or_default();
        for o in owners.iter_mut() {
            o.fields
                .retain(|f| !changed.contains(f) && !gone.contains(f));
        }
        if !changed.is_empty() {
            match owners
                .iter_mut()
                .find(|o| o.manager == manager && o.operation == "Update")
            {
                Some(o) => o.fields.extend(changed),
                None => owners.push(Owner {
                    manager: manager.to_string(),
                    operation: "Update",
                    api_version: obj["apiVersion"].as_str().unwrap_or("v1").to_string(),
                    fields: changed,
                }),
            }
        }
        owners.retain(|o| !o.fields.is_empty());
        self.owners.insert(key, owners);
        self.put(plural, obj);
    }

    /// DELETE (k8s.io/apiserver pkg/registry/generic/registry/store.go
    /// `Delete`): an object with finalizers is only marked with a
    /// `deletionTimestamp` and answered 200 with its body; it goes when the
    /// last finalizer is removed. A namespace turns `Terminating`, and
    /// the namespace controller removes everything in it and then the
    /// namespace (pkg/controller/namespace/deletion), `finalize_delay`
    /// later. Returns the body to answer with.
    fn delete(&mut self, key: &Key) -> Value {
        let Some(obj) = self.objects.get(key).cloned() else {
            return Value::Null;
        };
        let finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if finalizers || key.0 == "namespaces" {
            if obj["metadata"].get("deletionTimestamp").is_none() {
                let mut o = obj;
                o["metadata"]["deletionTimestamp"] = json!("2026-11-26T00:00:01Z");
                if key.0 == "namespaces" {
                    o["status"] = json!({"phase": "Terminating"});
                }
                self.put(&key.0.clone(), o);
                self.finalizing
                    .push((Instant::now() + self.finalize_delay, key.clone()));
            }
            return self.objects[key].clone();
        }
        self.remove_now(key);
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
    }

    /// The object leaves storage.
    fn remove_now(&mut self, key: &Key) {
        self.objects.remove(key);
        self.owners.remove(key);
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
        if key.0 == "profiles" {
            // The garbage collector deletes what the Profile owns: its
            // namespace carries the Profile as controller owner reference
            // (controllerutil.SetControllerReference in the controller).
            let uid = self.objects.iter().find_map(|(k, o)| {
                (k.0 == "namespaces"
                    && k.2 == key.2
                    && o["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|r| r["kind"] == "Profile" && r["name"] == key.2.as_str()))
                .then(|| k.clone())
            });
            if let Some(ns) = uid {
                self.delete(&ns);
            }
        }
    }

    /// Finalizers and namespace deletions that are due: the profile
    /// controller removes `profile-finalizer` from a deleted Profile (its
    /// `r.Update` after revoking plugins), and a terminating namespace is
    /// emptied and removed.
    fn finalize(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.finalizing)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.finalizing = later;
        for (_, key) in due {
            let Some(mut o) = self.objects.get(&key).cloned() else {
                continue;
            };
            if key.0 == "namespaces" {
                let ns = key.2.clone();
                let inside: Vec<Key> = self
                    .objects
                    .keys()
                    .filter(|(_, n, _)| *n == ns)
                    .cloned()
                    .collect();
                for k in inside {
                    self.objects.remove(&k);
                    self.owners.remove(&k);
                }
                self.remove_now(&key);
                continue;
            }
            if !self.controller {
                // Nobody removes the finalizer: the object stays Terminating.
                self.finalizing.push((now + self.finalize_delay, key));
                continue;
            }
            if let Some(f) = o["metadata"]["finalizers"].as_array_mut() {
                f.retain(|x| x != "profile-finalizer");
            }
            if o["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.is_empty())
            {
                self.remove_now(&key);
            } else {
                self.update_as(&key.0.clone(), o, "manager");
            }
        }
    }
}

impl KubeSim {
    pub fn start() -> KubeSim {
        let store = Arc::new(Mutex::new(Store {
            controller: true,
            crd_delay: Duration::from_millis(300),
            finalize_delay: Duration::from_millis(300),
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

    /// Runs `f` on the store, after the controllers have done what is due
    /// (they run in the background on a real cluster).
    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut s = self.store.lock().unwrap();
        s.reconcile();
        f(&mut s)
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
    let agent = req
        .headers()
        .get("user-agent")
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
            // An Update operation; without `fieldManager` the manager is
            // the user agent's first word (fieldmanager
            // prefixFromUserAgent).
            let manager = query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| agent.split('/').next().unwrap_or("unknown").to_string());
            s.update_as(plural, obj, &manager);
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
            // dryRun accepts only "All" (apiserver
            // pkg/apis/meta/v1/validation ValidateDryRun).
            let dry_run = match query.get("dryRun").map(String::as_str) {
                None => false,
                Some("All") => true,
                Some(other) => {
                    return reply(status(
                        400,
                        "BadRequest",
                        &format!(
                            "dryRun: Unsupported value: \"{other}\": supported values: \"All\""
                        ),
                    ))
                }
            };
            let force = query.get("force").is_some_and(|f| f == "true");
            let key = (plural.to_string(), ns_key.clone(), n.to_string());
            // No new objects in a namespace being deleted (the
            // NamespaceLifecycle admission plugin's Forbidden).
            if namespaced
                && !s.objects.contains_key(&key)
                && s.objects[&("namespaces".into(), String::new(), ns_key.clone())]["metadata"]
                    .get("deletionTimestamp")
                    .is_some()
            {
                return reply(status(
                    403,
                    "Forbidden",
                    &format!("{qualified} \"{n}\" is forbidden: unable to create new content in namespace {ns_key} because it is being terminated"),
                ));
            }
            // A write that reaches storage and times out there (what etcd
            // under load answers; a dry run never reaches storage).
            if !dry_run && s.fail_writes.iter().any(|f| f == plural) {
                return reply(status(
                    500,
                    "InternalError",
                    "Internal error occurred: etcdserver: request timed out",
                ));
            }
            reply(s.apply(key, kind, &api_version, patch, &manager, force, dry_run))
        }
        ("DELETE", Some(n)) => {
            let key = (plural.to_string(), ns_key, n.to_string());
            if !s.objects.contains_key(&key) {
                return reply(not_found(n));
            }
            let body = s.delete(&key);
            reply((200, body))
        }
        _ => reply(status(
            405,
            "MethodNotAllowed",
            &format!("{method} is not supported here"),
        )),
    }
}

/// A field path: the keys from the object's root to a leaf.
type Path = Vec<String>;
type FieldSet = std::collections::BTreeSet<Path>;

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
struct Owner {
    manager: String,
    operation: &'static str,
    api_version: String,
    fields: FieldSet,
}

/// The fields an object or configuration sets: every leaf path, maps
/// granular, lists atomic, an empty map a leaf of its own. Identity and
/// server-set metadata are not fields anyone owns (fieldmanager's
/// `stripMeta`: apiVersion, kind, name, namespace, uid, resourceVersion,
/// generation, creationTimestamp, deletionTimestamp, managedFields), nor is
/// `status` for these kinds.
fn field_set(obj: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    path.push(k.clone());
                    walk(c, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    let mut out = FieldSet::new();
    for (k, v) in obj.as_object().into_iter().flatten() {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if ["labels", "annotations", "ownerReferences", "finalizers"]
                        .contains(&mk.as_str())
                    {
                        walk(mv, &mut vec!["metadata".into(), mk.clone()], &mut out);
                    }
                }
            }
            _ => walk(v, &mut vec![k.clone()], &mut out),
        }
    }
    out
}

fn get_path<'a>(v: &'a Value, p: &[String]) -> Option<&'a Value> {
    p.iter().try_fold(v, |v, k| v.get(k))
}

fn set_path(v: &mut Value, p: &[String], val: Value) {
    let mut cur = v;
    for k in &p[..p.len() - 1] {
        if !cur.get(k).is_some_and(Value::is_object) {
            cur[k.as_str()] = json!({});
        }
        cur = cur.get_mut(k).unwrap();
    }
    cur[p[p.len() - 1].as_str()] = val;
}

/// Removes a field, and the maps it leaves empty (below the top level).
fn remove_path(v: &mut Value, p: &[String]) {
    fn rec(v: &mut Value, p: &[String], depth: usize) {
        let Some(m) = v.as_object_mut() else { return };
        if p.len() == 1 {
            m.remove(&p[0]);
            return;
        }
        if let Some(c) = m.get_mut(&p[0]) {
            rec(c, &p[1..], depth + 1);
            if depth >= 1 && c.as_object().is_some_and(|o| o.is_empty()) {
                m.remove(&p[0]);
            }
        }
    }
    rec(v, p, 0);
}

/// `metadata.managedFields` as the server writes it: one entry per
/// (manager, operation) with a FieldsV1 tree of `f:<key>` nodes.
fn managed_fields(owners: &[Owner]) -> Value {
    Value::Array(
        owners
            .iter()
            .map(|o| {
                let mut tree = json!({});
                for p in &o.fields {
                    let mut cur = &mut tree;
                    for k in p {
                        let f = format!("f:{k}");
                        if cur.get(&f).is_none() {
                            cur[f.as_str()] = json!({});
                        }
                        cur = cur.get_mut(&f).unwrap();
                    }
                }
                json!({"manager": o.manager, "operation": o.operation, "apiVersion": o.api_version,
                       "time": "2026-11-26T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": tree})
            })
            .collect(),
    )
}

/// The object without what changes on every write (to tell a no-op).
fn strip_meta(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o["metadata"].as_object_mut() {
        for k in ["resourceVersion", "managedFields"] {
            m.remove(k);
        }
    }
    o
}

/// What the API server does to every write of these kinds before storing
/// it: defaulting (k8s.io/kubernetes pkg/apis/core/v1/defaults.go
/// `SetDefaults_LimitRangeItem`: for a Container item, a missing default
/// limit is the max, a missing default request the default limit, else the
/// min) and quantities in canonical form (the typed `resource.Quantity`
/// round trip of every `ResourceList`).
fn normalise(kind: &str, obj: &mut Value) {
    fn canon(m: &mut Value) {
        if let Some(m) = m.as_object_mut() {
            for v in m.values_mut() {
                if let Some(c) = v
                    .as_str()
                    .and_then(|s| labctl::k8s::validation::Quantity::parse(s).ok())
                    .and_then(|q| q.canonical())
                {
                    *v = json!(c);
                }
            }
        }
    }
    match kind {
        "ResourceQuota" => canon(&mut obj["spec"]["hard"]),
        "LimitRange" => {
            for item in obj["spec"]["limits"].as_array_mut().into_iter().flatten() {
                if item["type"] == "Container" {
                    for (from, to) in [
                        ("max", "default"),
                        ("default", "defaultRequest"),
                        ("min", "defaultRequest"),
                    ] {
                        let src = item[from].as_object().cloned().unwrap_or_default();
                        for (k, v) in src {
                            if item[to].get(&k).is_none() {
                                item[to][k.as_str()] = v;
                            }
                        }
                    }
                }
                for f in [
                    "max",
                    "min",
                    "default",
                    "defaultRequest",
                    "maxLimitRequestRatio",
                ] {
                    canon(&mut item[f]);
                }
            }
        }
        _ => {}
    }
}

/// Validation after defaulting (pkg/apis/core/validation/validation.go
/// `ValidateResourceQuota` and `ValidateLimitRange`: quantities parse and
/// are not negative; per resource min <= default request <= default limit
/// <= max), as a 422 Invalid Status naming the field.
fn invalid(kind: &str, obj: &Value) -> Option<(u16, Value)> {
    use labctl::k8s::validation::Quantity;
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let fail = |field: String, value: &str, why: String| {
        let message =
            format!("{kind} \"{name}\" is invalid: {field}: Invalid value: \"{value}\": {why}");
        let (code, mut body) = status(422, "Invalid", &message);
        body["details"] = json!({"name": name, "kind": kind.to_lowercase() + "s",
            "causes": [{"reason": "FieldValueInvalid", "message": format!("Invalid value: \"{value}\": {why}"), "field": field}]});
        Some((code, body))
    };
    let maps: Vec<(String, &Value)> = match kind {
        "ResourceQuota" => vec![("spec.hard".into(), &obj["spec"]["hard"])],
        "LimitRange" => obj["spec"]["limits"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .flat_map(|(i, item)| {
                [
                    "max",
                    "min",
                    "default",
                    "defaultRequest",
                    "maxLimitRequestRatio",
                ]
                .into_iter()
                .map(move |f| (format!("spec.limits[{i}].{f}"), &item[f]))
            })
            .collect(),
        _ => return None,
    };
    for (field, m) in &maps {
        for (k, v) in m.as_object().into_iter().flatten() {
            let s = v
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| v.to_string());
            match Quantity::parse(&s) {
                Err(e) => return fail(format!("{field}[{k}]"), &s, e.to_string()),
                Ok(q) if q.is_negative() => {
                    return fail(
                        format!("{field}[{k}]"),
                        &s,
                        "must be greater than or equal to 0".into(),
                    )
                }
                Ok(_) => {}
            }
        }
    }
    if kind == "LimitRange" {
        for (i, item) in obj["spec"]["limits"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let q = |f: &str, k: &str| item[f][k].as_str().and_then(|s| Quantity::parse(s).ok());
            let keys: std::collections::BTreeSet<&String> =
                ["max", "min", "default", "defaultRequest"]
                    .iter()
                    .flat_map(|f| item[*f].as_object().into_iter().flat_map(|m| m.keys()))
                    .collect();
            for k in keys {
                for (lo, hi, what) in [
                    ("min", "max", "min value {a} is greater than max value {b}"),
                    (
                        "min",
                        "defaultRequest",
                        "min value {a} is greater than default request value {b}",
                    ),
                    (
                        "defaultRequest",
                        "max",
                        "default request value {a} is greater than max value {b}",
                    ),
                    (
                        "defaultRequest",
                        "default",
                        "default request value {a} is greater than default limit value {b}",
                    ),
                    (
                        "min",
                        "default",
                        "min value {a} is greater than default value {b}",
                    ),
                    (
                        "default",
                        "max",
                        "default value {a} is greater than max value {b}",
                    ),
                ] {
                    if let (Some(a), Some(b)) = (q(lo, k), q(hi, k)) {
                        if a.cmp_value(&b) == std::cmp::Ordering::Greater {
                            let (sa, sb) = (
                                item[lo][k].as_str().unwrap_or(""),
                                item[hi][k].as_str().unwrap_or(""),
                            );
                            return fail(
                                format!("spec.limits[{i}].{lo}[{k}]"),
                                sa,
                                what.replace("{a}", sa).replace("{b}", sb),
                            );
                        }
                    }
                }
            }
        }
    }
    None
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
