//! A Kubernetes API server test double (HTTP on 127.0.0.1).
//!
//! No Kubernetes API server can run here, so this speaks the Kubernetes REST
//! API for the kinds labctl's policy commands use, following its semantics:
//! a generic object store with `resourceVersion`, `uid` and
//! `creationTimestamp`; `404 NotFound` and `409 Conflict` as `Status`
//! objects; lists with label selectors (`k=v`, `k!=v`, `k`), across all
//! namespaces or in one; server-side apply (`PATCH` with
//! `application/apply-patch+yaml`, `fieldManager`, `force`) that merges
//! labels and annotations, removes what the same manager applied before and
//! no longer applies, and answers 409 when another manager owns a field and
//! `force` is off; bearer-token authentication (401 without it); discovery
//! for the CRD groups (`/apis/kubeflow.org/v1`,
//! `/apis/security.istio.io/v1beta1`). A small stand-in for the Kubeflow
//! profile controller creates, per Profile, its Namespace (with the `owner`
//! annotation), `namespaceAdmin` and `kf-resource-quota`, and deleting a
//! Profile deletes its namespace and everything in it — as upstream does.
//! labctl reaches it through kube with a kubeconfig file, exactly as in
//! production.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub const TOKEN: &str = "kube-sim-test-token";

/// (plural) → (group, version, kind, namespaced)
fn resources() -> BTreeMap<&'static str, (&'static str, &'static str, &'static str, bool)> {
    BTreeMap::from([
        ("profiles", ("kubeflow.org", "v1", "Profile", false)),
        (
            "rolebindings",
            ("rbac.authorization.k8s.io", "v1", "RoleBinding", true),
        ),
        (
            "authorizationpolicies",
            ("security.istio.io", "v1beta1", "AuthorizationPolicy", true),
        ),
        ("limitranges", ("", "v1", "LimitRange", true)),
        ("namespaces", ("", "v1", "Namespace", false)),
        ("resourcequotas", ("", "v1", "ResourceQuota", true)),
        (
            "persistentvolumeclaims",
            ("", "v1", "PersistentVolumeClaim", true),
        ),
    ])
}

/// Key: (plural, namespace or "", name).
type Key = (String, String, String);

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
                self.controller_for(&p);
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
    s.requests.push(format!("{method} {path}"));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if s.without_kubeflow && segs.get(1) == Some(&"kubeflow.org") {
        return reply(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    // Discovery for the CRD groups.
    if method == "GET" && segs.len() == 3 && segs[0] == "apis" {
        let list: Vec<Value> = resources()
            .iter()
            .filter(|(_, (g, v, _, _))| *g == segs[1] && *v == segs[2])
            .map(|(p, (_, _, k, n))| json!({"name": p, "kind": k, "namespaced": n, "verbs": ["get", "list", "patch", "delete", "create"]}))
            .collect();
        if list.is_empty() {
            return reply(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
        return reply((
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{}/{}", segs[1], segs[2]), "resources": list}),
        ));
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return reply(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ))
        }
    };
    let (ns, plural, name): (Option<&str>, &str, Option<&str>) = match rest {
        ["namespaces", n] if group.is_empty() => (None, "namespaces", Some(*n)),
        ["namespaces", n, p] => (Some(*n), *p, None),
        ["namespaces", n, p, name] => (Some(*n), *p, Some(*name)),
        [p] => (None, *p, None),
        [p, name] => (None, *p, Some(*name)),
        _ => {
            return reply(status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ))
        }
    };
    let table = resources();
    let Some(&(g, v, kind, namespaced)) = table.get(plural) else {
        return reply(status(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({plural})"),
        ));
    };
    if g != group || v != version {
        return reply(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let api_version = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    let ns_key = if namespaced {
        ns.unwrap_or("").to_string()
    } else {
        String::new()
    };
    let not_found = |n: &str| {
        status(
            404,
            "NotFound",
            &format!(
                "{plural}{} \"{n}\" not found",
                if g.is_empty() {
                    String::new()
                } else {
                    format!(".{g}")
                }
            ),
        )
    };
    // RBAC: a write the identity's Role does not allow is refused with 403
    // Forbidden and the authorizer's message (k8s.io/apiserver
    // pkg/endpoints/handlers/responsewriters/errors.go, forbiddenMessage).
    if method != "GET" && s.forbidden.iter().any(|f| f == plural) {
        let verb = match method.as_str() {
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "create",
        };
        return reply(status(
            403,
            "Forbidden",
            &format!(
                "{plural}{} \"{}\" is forbidden: User \"system:serviceaccount:labctl:labctl\" cannot {verb} resource \"{plural}\" in API group \"{g}\" in the namespace \"{}\"",
                if g.is_empty() { String::new() } else { format!(".{g}") },
                name.unwrap_or(""),
                ns.unwrap_or("")
            ),
        ));
    }
    match (method.as_str(), name) {
        ("GET", None) => {
            let sel = query.get("labelSelector").cloned().unwrap_or_default();
            let items: Vec<Value> = s
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
                .map(|(_, o)| o.clone())
                .collect();
            let rv = s.rv.to_string();
            reply((
                200,
                json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items}),
            ))
        }
        ("GET", Some(n)) => match s.objects.get(&(plural.into(), ns_key, n.into())) {
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
