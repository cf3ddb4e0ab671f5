//! The policy workflows that reach the cluster: plan, apply with its audit
//! record, and importing bindings made in the Kubeflow dashboard into the
//! policy files. `labctl policy ...` and `labctl profile grant --apply` call
//! these; they print nothing.
//!
//! Must not parse command lines or print: it returns what happened.

use super::cluster::{self, Done, Found, Plan};
use super::Policy;
use crate::k8s::KubeTarget;
use std::path::Path;
use time::Date;

/// Names the API server in errors that happened talking to it (a
/// classified error already says what went wrong and is left alone).
fn reach(e: crate::error::Error, url: &str) -> crate::error::Error {
    if e.downcast_ref::<crate::error::LabError>().is_some() {
        return e;
    }
    e.context(format!("Kubernetes API server {url}"))
}

/// Compares the rendered policy with the cluster.
///
/// # Errors
/// Connection or API errors, naming the server.
pub fn plan(pol: &Policy, today: Date, kube: &KubeTarget) -> crate::error::Result<Plan> {
    crate::util::runtime()?.block_on(async { Ok(connect_and_plan(pol, today, kube).await?.1) })
}

/// Connects and plans the rendered policy (the client stays usable for
/// applying that plan).
async fn connect_and_plan(
    pol: &Policy,
    today: Date,
    kube: &KubeTarget,
) -> crate::error::Result<(kube::Client, Plan)> {
    let objects = super::render::render(pol, today);
    let (c, url) = kube.connect().await?;
    let scope = cluster::Scope {
        set: &pol.settings.name,
        user_header: &pol.settings.user_id_header,
        user_prefix: &pol.settings.user_id_prefix,
    };
    let plan = cluster::plan(&c, &objects, &scope)
        .await
        .map_err(|e| reach(e, &url))?;
    Ok((c, plan))
}

/// Who made a change and why, for the audit chain.
pub struct AuditEntry<'a> {
    /// The audit log (`policy-audit.jsonl`, hash-chained).
    pub log: &'a Path,
    pub actor: &'a str,
    pub reason: Option<&'a str>,
    /// The policy folder the change came from.
    pub policies: &'a Path,
}

/// `(kind, name)` of objects deleted.
pub type Deleted = Vec<(String, String)>;

/// Removes `user`'s KFAM binding pairs in `profile` from the cluster
/// (see [`cluster::delete_kfam_pairs`]) and records what went in the audit
/// chain; then [`apply_recorded`] puts back what the policy still grants.
///
/// # Errors
/// Connection, API and audit write errors.
pub fn revoke_recorded(
    pol: &Policy,
    today: Date,
    kube: &KubeTarget,
    profile: &str,
    user: &str,
    audit: &AuditEntry<'_>,
) -> crate::error::Result<(Deleted, Plan, Vec<Done>)> {
    let deleted = crate::util::runtime()?.block_on(async {
        let (c, url) = kube.connect().await?;
        cluster::delete_kfam_pairs(&c, profile, user)
            .await
            .map_err(|e| reach(e, &url))
    })?;
    if !deleted.is_empty() {
        crate::records::policy_audit::record(
            audit.log,
            audit.actor,
            audit.reason,
            audit.policies,
            serde_json::json!(deleted
                .iter()
                .map(|(kind, name)| serde_json::json!({"action": "delete", "kind": kind, "namespace": profile, "name": name, "why": format!("revoke {user}")}))
                .collect::<Vec<_>>()),
        )?;
    }
    let (plan, done) = apply_recorded(pol, today, kube, false, false, audit)?;
    Ok((deleted, plan, done))
}

/// Plans, applies, and records every applied change (with the fields that
/// changed) in the audit chain. Nothing is recorded when nothing changed.
///
/// # Errors
/// Connection, API or refusal errors (deleting data needs
/// `allow_data_loss`); audit write errors.
pub fn apply_recorded(
    pol: &Policy,
    today: Date,
    kube: &KubeTarget,
    allow_data_loss: bool,
    prune_unmanaged: bool,
    audit: &AuditEntry<'_>,
) -> crate::error::Result<(Plan, Vec<Done>)> {
    let (plan, applied) = crate::util::runtime()?.block_on(async {
        let (c, plan) = connect_and_plan(pol, today, kube).await?;
        let applied = cluster::apply(&c, &plan, allow_data_loss, prune_unmanaged).await?;
        Ok::<_, crate::error::Error>((plan, applied))
    })?;
    let cluster::Applied { done, failed } = applied;
    // What was applied is recorded also when a later step failed, with the
    // step that failed and why.
    if !done.is_empty() || failed.is_some() {
        let mut changes: Vec<serde_json::Value> = done
            .iter()
            .map(|d| {
                let step = plan
                    .steps
                    .iter()
                    .find(|s| s.kind == d.kind && s.name == d.name && s.namespace == d.namespace);
                let unmanaged = plan.unmanaged.iter().find(|u| {
                    d.action == "prune-unmanaged"
                        && u.kind == d.kind
                        && Some(&u.namespace) == d.namespace.as_ref()
                        && u.name == d.name
                });
                match unmanaged {
                    Some(u) => serde_json::json!({"action": d.action, "kind": d.kind, "namespace": d.namespace, "name": d.name,
                        "why": "access the policy does not grant", "grants": u.grants}),
                    None => serde_json::json!({"action": d.action, "kind": d.kind, "namespace": d.namespace, "name": d.name,
                        "fields": step.map(|s| s.changes.clone()).unwrap_or_default()}),
                }
            })
            .collect();
        if let Some((d, e)) = &failed {
            changes.push(serde_json::json!({"action": d.action, "kind": d.kind, "namespace": d.namespace, "name": d.name,
                "failed": format!("{e:#}")}));
        }
        crate::records::policy_audit::record(
            audit.log,
            audit.actor,
            audit.reason,
            audit.policies,
            serde_json::json!(changes),
        )?;
    }
    if let Some((d, e)) = failed {
        return Err(e.context(format!(
            "{} {} {}{} failed after {} change(s) were applied (the audit log records them and the failure); nothing after it was tried",
            d.action,
            d.kind,
            d.namespace.map(|n| format!("{n}/")).unwrap_or_default(),
            d.name,
            done.len()
        )));
    }
    Ok((plan, done))
}

/// Contributor bindings made outside labctl (in the dashboard) that the
/// policy does not already grant (at that role or higher, or as owner) are
/// written into the policy files as grants (unless `dry_run`). Returns them.
///
/// # Errors
/// Connection, API or policy-file errors.
pub fn import_bindings(
    policies: &Path,
    pol: &Policy,
    today: Date,
    kube: &KubeTarget,
    dry_run: bool,
) -> crate::error::Result<Vec<Found>> {
    let names: Vec<String> = pol.profiles.keys().cloned().collect();
    let found = crate::util::runtime()?.block_on(async {
        let (c, url) = kube.connect().await?;
        cluster::unmanaged_contributors(&c, &names)
            .await
            .map_err(|e| reach(e, &url))
    })?;
    let have = pol.accesses(today);
    let rank = |r: &str| ["view", "edit", "admin"].iter().position(|x| *x == r);
    let mut imported = vec![];
    for f in found {
        let covered = have
            .iter()
            .any(|a| a.user == f.user && a.profile == f.profile && rank(&a.role) >= rank(&f.role))
            || pol
                .profiles
                .get(&f.profile)
                .is_some_and(|(pr, _)| pr.owner == f.user);
        if covered {
            continue;
        }
        if !dry_run {
            super::edit::grant(
                policies,
                today,
                &f.user,
                &f.profile,
                &f.role,
                None,
                Some("imported from a dashboard-made binding"),
            )?;
        }
        imported.push(f);
    }
    Ok(imported)
}
