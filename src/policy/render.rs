//! Rendering a policy into the objects a stock Kubeflow 1.8/1.9 expects.
//!
//! Per Profile: the `Profile` (owner, `resourceQuotaSpec`) and, with a quota
//! class that has defaults, a `LimitRange`. Per (user, profile) after
//! expanding groups: one `RoleBinding` and (unless notebook access is off)
//! one `AuthorizationPolicy`, named and annotated exactly as KFAM writes
//! them, with a single subject. Every object carries the label
//! `app.kubernetes.io/managed-by: labctl` and annotations with the reason,
//! the source group and the expiry.

use super::{Access, Policy};
use serde_json::{json, Value};
use time::Date;

/// The label on everything labctl manages (pruning looks only at these).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "labctl");

/// The label naming the policy set (Settings `name`) an object belongs to:
/// apply prunes only its own set's objects.
pub const POLICY_SET: &str = "labctl.io/policy-set";

/// KFAM's binding name: `user-<email with non-alphanumeric runs as ->-clusterrole-<role>`,
/// lowercased, runs of non-alphanumerics collapsed again.
pub fn kfam_name(email: &str, role: &str) -> String {
    fn collapse(s: &str) -> String {
        let mut out = String::new();
        let mut dash = false;
        for c in s.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c);
                dash = false;
            } else if !dash {
                out.push('-');
                dash = true;
            }
        }
        out
    }
    collapse(&format!("user-{}-clusterrole-{role}", collapse(email)).to_lowercase())
}

fn cluster_role(role: &str) -> &'static str {
    match role {
        "admin" => "kubeflow-admin",
        "edit" => "kubeflow-edit",
        _ => "kubeflow-view",
    }
}

fn managed_annotations(a: &Access) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("role".into(), json!(a.role));
    m.insert("user".into(), json!(a.user));
    if let Some(r) = &a.reason {
        m.insert("labctl.io/reason".into(), json!(r));
    }
    if let Some(g) = &a.group {
        m.insert("labctl.io/source-group".into(), json!(g));
    }
    if let Some(e) = &a.expires {
        m.insert("labctl.io/expires".into(), json!(e.to_string()));
    }
    if !a.notebooks {
        m.insert("labctl.io/notebooks".into(), json!("false"));
    }
    m
}

/// Quantities as the API server stores them (`1024Mi` as `1Gi`, `0.5` as
/// `500m`): the server canonicalises a LimitRange's values, and the profile
/// controller's update of the Profile writes its quota the same way, so a
/// value written otherwise would differ from the live object forever.
/// Validation has checked every value; one that does not parse stays as
/// written.
fn canonical(m: &std::collections::BTreeMap<String, String>) -> Value {
    use crate::k8s::validation::Quantity;
    Value::Object(
        m.iter()
            .map(|(k, v)| {
                let c = Quantity::parse(v)
                    .ok()
                    .and_then(|q| q.canonical())
                    .unwrap_or_else(|| v.clone());
                (k.clone(), json!(c))
            })
            .collect(),
    )
}

/// Every object labctl would apply, in a stable order.
pub fn render(p: &Policy, today: Date) -> Vec<Value> {
    let labels = if p.settings.name.is_empty() {
        json!({ MANAGED_BY.0: MANAGED_BY.1 })
    } else {
        json!({ MANAGED_BY.0: MANAGED_BY.1, POLICY_SET: p.settings.name })
    };
    let mut out = vec![];
    for (name, (pr, _)) in &p.profiles {
        let quota = pr
            .quota_class
            .as_ref()
            .and_then(|q| p.quota_classes.get(q))
            .map(|(q, _)| q);
        let mut spec = json!({ "owner": { "kind": "User", "name": pr.owner } });
        if let Some(q) = quota {
            if !q.hard.is_empty() {
                spec["resourceQuotaSpec"] = json!({ "hard": canonical(&q.hard) });
            }
        }
        let mut ann = serde_json::Map::new();
        if let Some(q) = &pr.quota_class {
            ann.insert("labctl.io/quota-class".into(), json!(q));
        }
        out.push(json!({
            "apiVersion": "kubeflow.org/v1",
            "kind": "Profile",
            "metadata": { "name": name, "labels": labels, "annotations": ann },
            "spec": spec,
        }));
        if let Some(lr) = quota.and_then(|q| q.limit_range.as_ref()) {
            let mut limit = json!({ "type": "Container" });
            if !lr.default.is_empty() {
                limit["default"] = canonical(&lr.default);
            }
            if !lr.default_request.is_empty() {
                limit["defaultRequest"] = canonical(&lr.default_request);
            }
            out.push(json!({
                "apiVersion": "v1",
                "kind": "LimitRange",
                "metadata": { "name": "labctl-defaults", "namespace": name, "labels": labels },
                "spec": { "limits": [limit] },
            }));
        }
    }
    for a in p.accesses(today) {
        let name = kfam_name(&a.user, &a.role);
        let ann = managed_annotations(&a);
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": { "name": name, "namespace": a.profile, "labels": labels, "annotations": ann },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role(&a.role) },
            "subjects": [{ "apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": a.user }],
        }));
        if a.notebooks {
            out.push(json!({
                "apiVersion": "security.istio.io/v1beta1",
                "kind": "AuthorizationPolicy",
                "metadata": { "name": name, "namespace": a.profile, "labels": labels, "annotations": ann },
                "spec": { "rules": [{
                    "from": [{ "source": { "principals": p.settings.gateway_principals } }],
                    "when": [{
                        "key": format!("request.headers[{}]", p.settings.user_id_header),
                        "values": [format!("{}{}", p.settings.user_id_prefix, a.user)],
                    }],
                }]},
            }));
        }
    }
    out
}

/// Objects as a YAML stream (`---` between documents).
///
/// # Errors
/// Serialisation errors (none expected).
pub fn to_yaml(objects: &[Value]) -> crate::error::Result<String> {
    let mut s = String::new();
    for o in objects {
        s.push_str("---\n");
        s.push_str(&serde_norway::to_string(o)?);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kfam_names_match_kfam() {
        // KFAM's own test vector.
        assert_eq!(
            kfam_name("lalith.vaka@zq.msds.kp.org", "edit"),
            "user-lalith-vaka-zq-msds-kp-org-clusterrole-edit"
        );
        assert_eq!(
            kfam_name("alice@uni.edu", "view"),
            "user-alice-uni-edu-clusterrole-view"
        );
        assert_eq!(
            kfam_name("Bob.O'Neil+ml@Uni.EDU", "admin"),
            "user-bob-o-neil-ml-uni-edu-clusterrole-admin"
        );
    }
}
