//! `labctl policy plan | apply`: the rendered objects against the live
//! cluster, through kube with the usual kubeconfig / context / in-cluster
//! rules.
//!
//! - **Plan**: per object create, update (with the fields that differ — a
//!   managed object edited by hand shows up here as drift; computed from a
//!   server-side dry-run apply compared with the live object on the fields
//!   labctl owns, as `kubectl diff --server-side` does, so server defaults,
//!   canonical quantities and controller writes are not drift), unchanged, or
//!   delete (live objects labelled `app.kubernetes.io/managed-by: labctl`
//!   that the policy no longer renders). It also reports objects the profile
//!   controller should have created but that are missing (the namespace,
//!   `namespaceAdmin`, `kf-resource-quota`).
//! - **Apply**: server-side apply with field manager `labctl` (forced: the
//!   policy is the source of truth for the fields it sets), then deletes;
//!   only objects carrying the managed-by label are ever deleted. A Profile
//!   is never deleted (its namespace and all data go with it) without
//!   `--allow-data-loss`, and the plan lists the PVCs that would be lost.

use super::render::MANAGED_BY;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// The kinds labctl renders and prunes.
fn resource(kind: &str) -> Option<(ApiResource, bool)> {
    let (group, version, plural, namespaced) = match kind {
        "Profile" => ("kubeflow.org", "v1", "profiles", false),
        "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings", true),
        "AuthorizationPolicy" => (
            "security.istio.io",
            "v1beta1",
            "authorizationpolicies",
            true,
        ),
        "LimitRange" => ("", "v1", "limitranges", true),
        "Namespace" => ("", "v1", "namespaces", false),
        "ResourceQuota" => ("", "v1", "resourcequotas", true),
        "PersistentVolumeClaim" => ("", "v1", "persistentvolumeclaims", true),
        "ServiceAccount" => ("", "v1", "serviceaccounts", true),
        _ => return None,
    };
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some((
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version,
            kind: kind.into(),
            plural: plural.into(),
        },
        namespaced,
    ))
}

const MANAGED_KINDS: [&str; 4] = [
    "Profile",
    "RoleBinding",
    "AuthorizationPolicy",
    "LimitRange",
];

fn api(client: &kube::Client, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
    let (ar, namespaced) = resource(kind).expect("a known kind");
    match (namespaced, ns) {
        (true, Some(n)) => Api::namespaced_with(client.clone(), n, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// One step of the plan.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// create, update, unchanged, delete
    pub action: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// For updates: the fields that differ (drift when nobody changed the policy).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// For a Profile delete: the PVCs that would be lost with its namespace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pvcs: Vec<String>,
    /// For a Profile whose owner changes: (old, new). Apply then runs the
    /// sequence that works around the upstream bug (see KUBEFLOW.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_transfer: Option<(String, String)>,
    #[serde(skip)]
    pub object: Option<Value>,
}

/// The plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Objects the profile controller should have created but that are missing.
    pub missing: Vec<String>,
    /// Controller-made objects whose contents differ from what it makes
    /// from the Profile (hand edits; the controller restores them on its
    /// next reconcile, unless it is not running).
    pub drift: Vec<String>,
    /// Access in profile namespaces that the policy does not grant (made
    /// in the dashboard or by hand); `apply --prune-unmanaged` removes it,
    /// `policy import` adopts contributor bindings instead.
    pub unmanaged: Vec<Unmanaged>,
}

impl Plan {
    pub fn changes(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.action != "unchanged")
            .count()
    }
    pub fn profile_deletes(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| s.action == "delete" && s.kind == "Profile")
            .collect()
    }
}

fn meta_str<'a>(o: &'a Value, k: &str) -> Option<&'a str> {
    o["metadata"][k].as_str()
}

/// The fields `manager` owns by server-side apply, from an object's
/// `metadata.managedFields` (FieldsV1, as the API server writes it:
/// `f:<name>` nodes; a node whose members are `k:`/`v:`/`i:` list entries
/// is one field, the list; `.` is the node itself).
fn applied_fields(obj: &Value, manager: &str) -> BTreeSet<Vec<String>> {
    fn walk(node: &Value, path: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
        let Some(m) = node.as_object() else { return };
        let list = m
            .keys()
            .any(|k| k.starts_with("k:") || k.starts_with("v:") || k.starts_with("i:"));
        let fields: Vec<(&String, &Value)> =
            m.iter().filter(|(k, _)| k.starts_with("f:")).collect();
        if list || fields.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, c) in fields {
            path.push(k[2..].to_string());
            walk(c, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    for e in obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if e["manager"] == manager && e["operation"] == "Apply" {
            walk(&e["fieldsV1"], &mut vec![], &mut out);
        }
    }
    out
}

/// What applying would change, as `kubectl diff --server-side` sees it:
/// `dry` is the API server's answer to a dry-run apply (the object as it
/// would be stored: merged with what other managers own, defaulted, with
/// quantities canonical), `live` the object now. Only the fields labctl
/// owns before or after count, so a controller's `resourceQuotaSpec: {}`,
/// server defaults and fields other tools set are never drift, while a
/// hand edit of a field labctl set (which takes the field over) is.
fn managed_diff(dry: &Value, live: &Value) -> Vec<String> {
    let at = |v: &Value, p: &[String]| p.iter().try_fold(v, |v, k| v.get(k)).cloned();
    let mut fields = applied_fields(dry, FIELD_MANAGER);
    fields.extend(applied_fields(live, FIELD_MANAGER));
    fields
        .into_iter()
        .filter(|p| at(dry, p) != at(live, p))
        .map(|p| p.join("."))
        .collect()
}

/// labctl's field manager for policy objects.
const FIELD_MANAGER: &str = "labctl";

/// Whom the policy set answers for, and how people are named in
/// AuthorizationPolicies (Settings `name`, `userIdHeader`, `userIdPrefix`).
pub struct Scope<'a> {
    pub set: &'a str,
    pub user_header: &'a str,
    pub user_prefix: &'a str,
}

/// A RoleBinding or AuthorizationPolicy in a profile namespace, not made
/// by this policy set nor by the profile controller, that gives people
/// access the policy does not grant.
#[derive(Debug, Clone, Serialize)]
pub struct Unmanaged {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// What it gives whom beyond the policy, e.g. `eve@uni.edu: edit (the
    /// policy grants none)`.
    pub grants: Vec<String>,
}

/// The objects the profile controller makes in every profile namespace
/// (profile_controller.go): never someone else's extra access.
const CONTROLLER_MADE: [&str; 4] = [
    "namespaceAdmin",
    "default-editor",
    "default-viewer",
    "ns-owner-access-istio",
];

fn role_rank(cluster_role: &str) -> Option<u8> {
    match cluster_role {
        "kubeflow-view" => Some(1),
        "kubeflow-edit" => Some(2),
        "kubeflow-admin" => Some(3),
        _ => None,
    }
}

fn rank_name(rank: u8) -> &'static str {
    ["none", "view", "edit", "admin"][rank as usize]
}

/// Access for people in the namespaces of the rendered Profiles that the
/// rendered objects do not give: RoleBindings with User or Group subjects
/// whose role is above what the policy grants that person there (a Group
/// always: the policy grants groups only through their members; a role
/// other than kubeflow-view/edit/admin always), and AuthorizationPolicies
/// whose rules admit a user (the user-id header condition KFAM writes) the
/// policy gives no notebook and web access there. ServiceAccount subjects
/// and policies between services are not people's access and are left out.
async fn unmanaged_access(
    client: &kube::Client,
    objects: &[Value],
    scope: &Scope<'_>,
    wanted: &BTreeSet<(String, Option<String>, String)>,
) -> crate::error::Result<Vec<Unmanaged>> {
    use std::collections::{BTreeMap, BTreeSet as Set};
    let header = format!("request.headers[{}]", scope.user_header);
    let mut out = vec![];
    for p in objects.iter().filter(|o| o["kind"] == "Profile") {
        let ns = meta_str(p, "name").unwrap_or_default().to_string();
        if api(client, "Namespace", None).get_opt(&ns).await?.is_none() {
            continue;
        }
        let owner = p["spec"]["owner"]["name"].as_str().unwrap_or_default();
        let mut rank: BTreeMap<String, u8> = BTreeMap::new();
        rank.insert(owner.to_string(), 3);
        let mut web: Set<String> = Set::new();
        web.insert(format!("{}{owner}", scope.user_prefix));
        for o in objects
            .iter()
            .filter(|o| meta_str(o, "namespace") == Some(&ns))
        {
            if o["kind"] == "RoleBinding" {
                let user = o["metadata"]["annotations"]["user"]
                    .as_str()
                    .unwrap_or_default();
                let r = role_rank(o["roleRef"]["name"].as_str().unwrap_or_default()).unwrap_or(0);
                let e = rank.entry(user.to_string()).or_insert(0);
                *e = (*e).max(r);
            }
            if o["kind"] == "AuthorizationPolicy" {
                for v in o["spec"]["rules"].as_array().into_iter().flatten() {
                    for w in v["when"].as_array().into_iter().flatten() {
                        for u in w["values"].as_array().into_iter().flatten() {
                            web.insert(u.as_str().unwrap_or_default().to_string());
                        }
                    }
                }
            }
        }
        for kind in ["RoleBinding", "AuthorizationPolicy"] {
            let list = api(client, kind, Some(&ns))
                .list(&ListParams::default())
                .await?;
            for l in list.items {
                let name = l.metadata.name.clone().unwrap_or_default();
                let labels = l.metadata.labels.clone().unwrap_or_default();
                let ours = labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1);
                let other_set = labels
                    .get(super::render::POLICY_SET)
                    .is_some_and(|s| s != scope.set);
                if CONTROLLER_MADE.contains(&name.as_str())
                    || wanted.contains(&(kind.to_string(), Some(ns.clone()), name.clone()))
                    // This set's leftovers are delete steps already;
                    // another set's objects are that set's business.
                    || ours
                    || other_set
                {
                    continue;
                }
                let v = serde_json::to_value(&l)?;
                let mut grants = vec![];
                if kind == "RoleBinding" {
                    let role = v["roleRef"]["name"].as_str().unwrap_or_default();
                    let r = role_rank(role);
                    for s in v["subjects"].as_array().into_iter().flatten() {
                        let who = s["name"].as_str().unwrap_or_default();
                        let what = r.map(rank_name).unwrap_or(role);
                        match s["kind"].as_str() {
                            Some("User") => {
                                let granted = rank.get(who).copied().unwrap_or(0);
                                if r.is_none_or(|r| r > granted) {
                                    grants.push(format!(
                                        "{who}: {what} (the policy grants {})",
                                        rank_name(granted)
                                    ));
                                }
                            }
                            Some("Group") => grants.push(format!(
                                "group {who}: {what} (the policy grants groups only through their members)"
                            )),
                            _ => {}
                        }
                    }
                } else {
                    for rule in v["spec"]["rules"].as_array().into_iter().flatten() {
                        for w in rule["when"].as_array().into_iter().flatten() {
                            if w["key"].as_str() != Some(header.as_str()) {
                                continue;
                            }
                            for u in w["values"].as_array().into_iter().flatten() {
                                let u = u.as_str().unwrap_or_default();
                                if !web.contains(u) {
                                    grants.push(format!(
                                        "{u}: notebook and web access (the policy grants none here)"
                                    ));
                                }
                            }
                        }
                    }
                }
                if !grants.is_empty() {
                    out.push(Unmanaged {
                        kind: kind.into(),
                        namespace: ns.clone(),
                        name,
                        grants,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Computes the plan for `objects` (from [`super::render::render`]).
///
/// # Errors
/// Kubernetes API errors.
pub async fn plan(
    client: &kube::Client,
    objects: &[Value],
    scope: &Scope<'_>,
) -> crate::error::Result<Plan> {
    let set = scope.set;
    // The CRDs must be there (discovery), or nothing below makes sense.
    for (gv, plural, what) in [
        ("kubeflow.org/v1", "profiles", "Kubeflow's Profile CRD"),
        (
            "security.istio.io/v1beta1",
            "authorizationpolicies",
            "Istio's AuthorizationPolicy CRD",
        ),
    ] {
        let found = match client.list_api_group_resources(gv).await {
            Ok(list) => list.resources.iter().any(|r| r.name == plural),
            Err(kube::Error::Api(e)) if e.code == 404 => false,
            Err(e) => return Err(e.into()),
        };
        if !found {
            return Err(crate::error::LabError::usage(format!(
                "the cluster does not serve {gv} {plural} ({what}): is Kubeflow 1.8/1.9 installed, and is this the right context?"
            ))
            .into());
        }
    }
    // A new Profile must not take over a namespace someone else made: the
    // profile controller would adopt it only if its owner annotation says
    // the same owner, and labctl would write RoleBindings, LimitRanges and
    // AuthorizationPolicies into it either way.
    let mut foreign = vec![];
    for o in objects.iter().filter(|o| o["kind"] == "Profile") {
        let name = meta_str(o, "name").unwrap_or_default();
        if api(client, "Profile", None).get_opt(name).await?.is_some() {
            continue;
        }
        if let Some(n) = api(client, "Namespace", None).get_opt(name).await? {
            let owner = o["spec"]["owner"]["name"].as_str().unwrap_or_default();
            let ann = n.metadata.annotations.unwrap_or_default();
            if ann.get("owner").map(String::as_str) != Some(owner) {
                foreign.push(format!(
                    "{name} (exists, owner annotation {})",
                    ann.get("owner")
                        .map(|o| format!("'{o}'"))
                        .unwrap_or_else(|| "none".into())
                ));
            }
        }
    }
    if !foreign.is_empty() {
        return Err(crate::error::LabError::refused(format!(
            "namespace(s) {} already exist without a Profile of this owner: a new Profile there would take over someone else's namespace. Rename the profile, or delete the namespace if it is really unused. Nothing was applied",
            foreign.join("; ")
        ))
        .into());
    }
    let mut steps = vec![];
    let mut invalid = vec![];
    let mut wanted = BTreeSet::new();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        let ns = meta_str(o, "namespace").map(String::from);
        let name = meta_str(o, "name").unwrap_or_default().to_string();
        wanted.insert((kind.clone(), ns.clone(), name.clone()));
        let a = api(client, &kind, ns.as_deref());
        let live = a.get_opt(&name).await?;
        // The server's own answer to applying it: validation, defaults and
        // canonical values included. A new object in a namespace that does
        // not exist yet (a new Profile's) cannot be tried: 404.
        let dry_run = PatchParams::apply(FIELD_MANAGER).force().dry_run();
        let dry = match a.patch(&name, &dry_run, &Patch::Apply(o)).await {
            Ok(d) => Some(serde_json::to_value(&d)?),
            Err(kube::Error::Api(e)) if e.code == 404 && live.is_none() => None,
            // The namespace is still terminating (a Profile deleted and
            // made again): the NamespaceLifecycle admission plugin refuses
            // new objects until it is gone; apply waits for the new one.
            Err(kube::Error::Api(e))
                if e.code == 403
                    && live.is_none()
                    && e.message.contains("because it is being terminated") =>
            {
                None
            }
            Err(kube::Error::Api(e)) if e.code == 400 || e.code == 422 => {
                invalid.push(format!(
                    "{kind} {}{name}: {}",
                    ns.as_deref().map(|n| format!("{n}/")).unwrap_or_default(),
                    e.message
                ));
                continue;
            }
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(crate::error::Error::from(kube::Error::Api(e)).context(format!(
                    "planning {kind} {name} needs a server-side dry-run apply, which the API server authorizes as a patch: labctl's Role needs patch on it (deploy/kubernetes/labctl-policy-rbac.yaml); nothing was applied"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let mut owner_transfer = None;
        let (action, changes) = match live {
            None => ("create", vec![]),
            Some(l) => {
                let lv = serde_json::to_value(&l)?;
                let d = managed_diff(dry.as_ref().unwrap_or(o), &lv);
                if kind == "Profile" {
                    let old = lv["spec"]["owner"]["name"].as_str().unwrap_or("");
                    let new = o["spec"]["owner"]["name"].as_str().unwrap_or("");
                    if old != new {
                        owner_transfer = Some((old.to_string(), new.to_string()));
                    }
                }
                if d.is_empty() {
                    ("unchanged", d)
                } else {
                    ("update", d)
                }
            }
        };
        steps.push(Step {
            action: action.into(),
            kind,
            namespace: ns,
            name,
            changes,
            pvcs: vec![],
            owner_transfer,
            object: Some(o.clone()),
        });
    }
    if !invalid.is_empty() {
        return Err(crate::error::LabError::usage(format!(
            "the API server refuses {} object(s) the policy renders (a dry-run apply; nothing was applied):\n  {}",
            invalid.len(),
            invalid.join("\n  ")
        ))
        .into());
    }
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    for kind in MANAGED_KINDS {
        let list = api(client, kind, None)
            .list(&ListParams::default().labels(&selector))
            .await?;
        for l in list.items {
            let ns = l.metadata.namespace.clone();
            let name = l.metadata.name.clone().unwrap_or_default();
            if wanted.contains(&(kind.to_string(), ns.clone(), name.clone())) {
                continue;
            }
            // Another policy set's object is never ours to prune. One without
            // the set label was written before labctl labelled sets: the set
            // that applies first adopts (and may prune) it.
            let its_set = l
                .metadata
                .labels
                .as_ref()
                .and_then(|m| m.get(super::render::POLICY_SET));
            if its_set.is_some_and(|s| s != set) {
                continue;
            }
            let mut pvcs = vec![];
            if kind == "Profile" {
                let claims = api(client, "PersistentVolumeClaim", Some(&name))
                    .list(&ListParams::default())
                    .await?;
                pvcs = claims
                    .items
                    .iter()
                    .filter_map(|c| c.metadata.name.clone())
                    .collect();
            }
            steps.push(Step {
                action: "delete".into(),
                kind: kind.into(),
                namespace: ns,
                name,
                changes: vec![],
                pvcs,
                owner_transfer: None,
                object: None,
            });
        }
    }
    // What the profile controller should have made for live Profiles.
    let mut missing = vec![];
    let mut drift = vec![];
    for o in objects.iter().filter(|o| o["kind"] == "Profile") {
        let name = meta_str(o, "name").unwrap_or_default();
        if api(client, "Profile", None).get_opt(name).await?.is_none() {
            continue;
        }
        let owner = o["spec"]["owner"]["name"].as_str().unwrap_or_default();
        match api(client, "Namespace", None).get_opt(name).await? {
            None => missing.push(format!(
                "Namespace {name} (the profile controller has not created it)"
            )),
            Some(n) => {
                let ann = n.metadata.annotations.unwrap_or_default();
                if ann.get("owner").map(String::as_str) != Some(owner) {
                    missing.push(format!(
                        "Namespace {name} has owner annotation {:?}, the Profile says {owner} (the controller will refuse it)",
                        ann.get("owner")
                    ));
                }
            }
        }
        if api(client, "RoleBinding", Some(name))
            .get_opt("namespaceAdmin")
            .await?
            .is_none()
        {
            missing.push(format!("RoleBinding {name}/namespaceAdmin"));
        }
        // The controller's ServiceAccounts and the owner's access policy
        // (profile_controller.go: default-editor, default-viewer,
        // ns-owner-access-istio).
        for sa in ["default-editor", "default-viewer"] {
            if api(client, "ServiceAccount", Some(name))
                .get_opt(sa)
                .await?
                .is_none()
            {
                missing.push(format!("ServiceAccount {name}/{sa}"));
            }
        }
        if api(client, "AuthorizationPolicy", Some(name))
            .get_opt("ns-owner-access-istio")
            .await?
            .is_none()
        {
            missing.push(format!("AuthorizationPolicy {name}/ns-owner-access-istio"));
        }
        let want = o["spec"]["resourceQuotaSpec"]["hard"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        if !want.is_empty() {
            match api(client, "ResourceQuota", Some(name))
                .get_opt("kf-resource-quota")
                .await?
            {
                None => missing.push(format!("ResourceQuota {name}/kf-resource-quota")),
                Some(q) => {
                    let live = serde_json::to_value(&q)?["spec"]["hard"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default();
                    let d = quota_diff(&want, &live);
                    if !d.is_empty() {
                        drift.push(format!(
                            "ResourceQuota {name}/kf-resource-quota differs from the profile's quota class: {} (a hand edit? the profile controller puts the class back on its next reconcile)",
                            d.join(", ")
                        ));
                    }
                }
            }
        }
    }
    let unmanaged = unmanaged_access(client, objects, scope, &wanted).await?;
    Ok(Plan {
        steps,
        missing,
        drift,
        unmanaged,
    })
}

/// The keys whose quantities differ between the class (`want`) and the
/// live quota, compared as quantities (`1Gi` equals `1024Mi`, as the API
/// server canonicalises them).
fn quota_diff(
    want: &serde_json::Map<String, Value>,
    live: &serde_json::Map<String, Value>,
) -> Vec<String> {
    use crate::k8s::validation::Quantity;
    let q = |v: &Value| {
        let t = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Quantity::parse(&t).ok().map(|q| (q, t))
    };
    let mut out = vec![];
    for (k, w) in want {
        match (q(w), live.get(k).and_then(q)) {
            (Some((a, at)), Some((b, bt))) if a.cmp_value(&b) != std::cmp::Ordering::Equal => {
                out.push(format!("{k}: {bt} live, {at} in the class"))
            }
            (Some((_, at)), None) => out.push(format!("{k}: missing live, {at} in the class")),
            _ => {}
        }
    }
    for k in live.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("{k}: set live, not in the class"));
    }
    out
}

/// What apply did to one object.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub action: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

/// What an apply did: the changes made, in order, and the step it stopped
/// at when one failed (with the error); nothing after it was tried.
pub struct Applied {
    pub done: Vec<Done>,
    pub failed: Option<(Done, crate::error::Error)>,
}

/// Applies a plan (server-side apply, then deletes).
///
/// # Errors
/// A refusal for Profile deletes without `allow_data_loss`; API errors.
pub async fn apply(
    client: &kube::Client,
    plan: &Plan,
    allow_data_loss: bool,
    prune_unmanaged: bool,
) -> crate::error::Result<Applied> {
    let blocked = plan.profile_deletes();
    if !blocked.is_empty() && !allow_data_loss {
        let list: Vec<String> = blocked
            .iter()
            .map(|s| {
                format!(
                    "{} (PVCs: {})",
                    s.name,
                    if s.pvcs.is_empty() {
                        "none".to_string()
                    } else {
                        s.pvcs.join(", ")
                    }
                )
            })
            .collect();
        return Err(crate::error::LabError::refused(format!(
            "the policy no longer has Profile(s) {}; deleting a Profile deletes its namespace and every PVC in it. Nothing was applied. Re-run with --allow-data-loss if that is intended",
            list.join("; ")
        ))
        .into());
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut done = vec![];
    for s in &plan.steps {
        if !matches!(s.action.as_str(), "create" | "update" | "delete") {
            continue;
        }
        let step = Done {
            action: s.action.clone(),
            kind: s.kind.clone(),
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        };
        let a = api(client, &s.kind, s.namespace.as_deref());
        let result: crate::error::Result<()> = async {
            if s.action == "delete" {
                match a.delete(&s.name, &DeleteParams::default()).await {
                    // Already gone (a deleted Profile takes its namespace along).
                    Ok(_) | Err(kube::Error::Api(kube::core::ErrorResponse { code: 404, .. })) => {}
                    Err(e) => return Err(e.into()),
                }
                if s.kind == "Profile" {
                    // The profile controller's finalizer runs first; the
                    // Profile is deleted only when it is done.
                    wait_gone(&a, "Profile", &s.name).await?;
                }
            } else {
                let obj = s.object.as_ref().expect("rendered object");
                a.patch(&s.name, &pp, &Patch::Apply(obj)).await?;
                if s.kind == "Profile" && s.action == "create" {
                    // What follows lives in the namespace the profile
                    // controller makes for the Profile, some time later.
                    wait_for_namespace(client, &s.name).await?;
                }
                if let Some((_, new)) = &s.owner_transfer {
                    transfer_owner(client, &s.name, new).await?;
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => done.push(step),
            Err(e) => {
                return Ok(Applied {
                    done,
                    failed: Some((step, e)),
                })
            }
        }
    }
    if prune_unmanaged {
        for u in &plan.unmanaged {
            let step = Done {
                action: "prune-unmanaged".into(),
                kind: u.kind.clone(),
                namespace: Some(u.namespace.clone()),
                name: u.name.clone(),
            };
            match api(client, &u.kind, Some(&u.namespace))
                .delete(&u.name, &DeleteParams::default())
                .await
            {
                Ok(_) => done.push(step),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Ok(Applied {
                        done,
                        failed: Some((step, e.into())),
                    })
                }
            }
        }
    }
    Ok(Applied { done, failed: None })
}

/// Waits (bounded: `LABCTL_PROFILE_WAIT_SECS`, default 120) until the
/// profile controller has made a new Profile's namespace and its
/// `namespaceAdmin` binding: a real controller does so some time after the
/// Profile appears, and until then every namespaced apply gets 404 (the
/// NamespaceLifecycle admission plugin). Says what it waits for on stderr
/// when it takes more than a moment.
///
/// # Errors
/// A timeout naming what is missing; API errors.
async fn wait_for_namespace(client: &kube::Client, profile: &str) -> crate::error::Result<()> {
    let secs: u64 = std::env::var("LABCTL_PROFILE_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(secs);
    let mut said = false;
    loop {
        let ns = api(client, "Namespace", None).get_opt(profile).await?;
        // A namespace still terminating (the Profile was deleted and made
        // again) refuses new objects (403) until it is gone and remade.
        let terminating = ns
            .as_ref()
            .is_some_and(|n| n.metadata.deletion_timestamp.is_some());
        let admin = match ns {
            Some(_) if terminating => None,
            Some(_) => {
                api(client, "RoleBinding", Some(profile))
                    .get_opt("namespaceAdmin")
                    .await?
            }
            None => None,
        };
        let missing = match (&ns, &admin) {
            (None, _) => format!("namespace {profile}"),
            (Some(_), _) if terminating => {
                format!("namespace {profile} (the old one is still terminating)")
            }
            (Some(_), None) => format!("RoleBinding {profile}/namespaceAdmin"),
            (Some(_), Some(_)) => return Ok(()),
        };
        if std::time::Instant::now() >= deadline {
            return Err(crate::error::LabError::failed(format!(
                "the profile controller did not create {missing} within {secs}s of Profile {profile}: is Kubeflow's profile controller running? What was applied before is in the audit entry"
            ))
            .into());
        }
        if !said && started.elapsed() > std::time::Duration::from_secs(2) {
            eprintln!("waiting for the profile controller to create {missing} ...");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Waits (bounded like [`wait_for_namespace`]) until a deleted object has
/// left the API server: one with finalizers stays, marked with a
/// `deletionTimestamp`, until its controller has removed them.
///
/// # Errors
/// A timeout naming the object and its remaining finalizers; API errors.
async fn wait_gone(a: &Api<DynamicObject>, kind: &str, name: &str) -> crate::error::Result<()> {
    let secs: u64 = std::env::var("LABCTL_PROFILE_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        let Some(o) = a.get_opt(name).await? else {
            return Ok(());
        };
        let finalizers = o.metadata.finalizers.unwrap_or_default();
        if started.elapsed() >= std::time::Duration::from_secs(secs) {
            return Err(crate::error::LabError::failed(format!(
                "{kind} {name} is still there {secs}s after its deletion, waiting for finalizer(s) {}: is Kubeflow's profile controller running?",
                finalizers.join(", ")
            ))
            .into());
        }
        if !said && started.elapsed() > std::time::Duration::from_secs(2) {
            eprintln!(
                "waiting for {kind} {name} to be deleted (finalizers: {}) ...",
                finalizers.join(", ")
            );
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The owner-transfer sequence that works with a stock profile controller
/// (changing `spec.owner` alone is broken upstream): with the Profile already
/// carrying the new owner, set the namespace's `owner` annotation, then
/// delete `namespaceAdmin` and `ns-owner-access-istio` so the controller
/// recreates them for the new owner.
async fn transfer_owner(
    client: &kube::Client,
    profile: &str,
    new_owner: &str,
) -> crate::error::Result<()> {
    let patch = serde_json::json!({ "metadata": { "annotations": { "owner": new_owner } } });
    api(client, "Namespace", None)
        .patch(profile, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    for (kind, name) in [
        ("RoleBinding", "namespaceAdmin"),
        ("AuthorizationPolicy", "ns-owner-access-istio"),
    ] {
        match api(client, kind, Some(profile))
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A contributor binding found in the cluster that labctl does not manage.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub profile: String,
    pub user: String,
    pub role: String,
    pub binding: String,
}

/// Deletes every KFAM binding pair of `user` in `profile` — the
/// RoleBinding and the AuthorizationPolicy KFAM names
/// `user-<email>-clusterrole-<role>`, for each role — whether labctl or the
/// dashboard made them: KFAM's own delete (`bindings.go` Delete) expects
/// both, and a pair left half or whole keeps access the policy revoked.
/// Returns `(kind, name)` of what was deleted.
///
/// # Errors
/// Kubernetes API errors other than not-found.
pub async fn delete_kfam_pairs(
    client: &kube::Client,
    profile: &str,
    user: &str,
) -> crate::error::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for role in ["view", "edit", "admin"] {
        let name = super::render::kfam_name(user, role);
        for kind in ["RoleBinding", "AuthorizationPolicy"] {
            match api(client, kind, Some(profile))
                .delete(&name, &kube::api::DeleteParams::default())
                .await
            {
                Ok(_) => out.push((kind.to_string(), name.clone())),
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(out)
}

/// Contributor RoleBindings (KFAM's `user`/`role` annotations) in the
/// namespaces of `profiles` that are not labelled as managed by labctl.
///
/// # Errors
/// Kubernetes API errors.
pub async fn unmanaged_contributors(
    client: &kube::Client,
    profiles: &[String],
) -> crate::error::Result<Vec<Found>> {
    let mut out = vec![];
    for p in profiles {
        let list = api(client, "RoleBinding", Some(p))
            .list(&ListParams::default())
            .await?;
        for rb in list.items {
            let name = rb.metadata.name.clone().unwrap_or_default();
            let labels = rb.metadata.labels.clone().unwrap_or_default();
            if labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
                || name == "namespaceAdmin"
            {
                continue;
            }
            let ann = rb.metadata.annotations.clone().unwrap_or_default();
            let (Some(user), Some(role)) = (ann.get("user"), ann.get("role")) else {
                continue;
            };
            if !["view", "edit", "admin"].contains(&role.as_str()) {
                continue;
            }
            out.push(Found {
                profile: p.clone(),
                user: user.clone(),
                role: role.clone(),
                binding: name,
            });
        }
    }
    Ok(out)
}
