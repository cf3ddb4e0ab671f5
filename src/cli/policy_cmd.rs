//! `labctl policy validate | render | expiring`, `labctl profile who-has-access`,
//! `labctl access`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::policy;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct PoliciesArg {
    /// The policy folder (YAML files, any layout).
    #[arg(
        long,
        env = "LABCTL_POLICIES",
        default_value = "policies",
        value_name = "DIR"
    )]
    pub policies: PathBuf,
    /// Evaluate expiry as of this date (YYYY-MM-DD) instead of today.
    #[arg(long, value_name = "DATE", hide = true)]
    pub today: Option<String>,
}

impl PoliciesArg {
    fn today(&self) -> crate::error::Result<time::Date> {
        match &self.today {
            Some(d) => Ok(policy::parse_date(d).map_err(LabError::usage)?),
            None => Ok(time::OffsetDateTime::now_utc().date()),
        }
    }
    fn load(&self, g: &GlobalArgs) -> crate::error::Result<(policy::Policy, time::Date)> {
        let today = self.today()?;
        let p = policy::load(&self.policies, today)?;
        if !g.quiet && !g.json {
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
        }
        Ok((p, today))
    }
}

/// Who and why, for the audit trail.
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Who is applying (default: the local user).
    #[arg(long)]
    pub actor: Option<String>,
    /// The append-only, hash-chained audit file.
    #[arg(long, env = "LABCTL_AUDIT_LOG", value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
}

impl AuditArgs {
    fn path(&self, g: &GlobalArgs) -> PathBuf {
        self.audit_log.clone().unwrap_or_else(|| {
            g.cache_dir
                .clone()
                .unwrap_or_else(crate::repo::default_cache_dir)
                .join("policy-audit.jsonl")
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check the policy audit trail's hash chain; exit 4 when an entry was
    /// altered, removed or reordered.
    Verify {
        #[command(flatten)]
        a: AuditArgs,
    },
}

pub fn run_audit(g: &GlobalArgs, c: AuditCmd) -> crate::error::Result<ExitCode> {
    let AuditCmd::Verify { a } = c;
    let path = a.path(g);
    let n = crate::records::policy_audit::verify(&path)?;
    if g.json {
        print_json(&serde_json::json!({"file": path, "entries": n, "intact": true}))?;
    } else if !g.quiet {
        println!(
            "{}: {n} entr{}, chain intact",
            path.display(),
            if n == 1 { "y" } else { "ies" }
        );
    }
    Ok(ExitCode::Success)
}

/// How to reach the cluster (the usual kubeconfig rules apply when not given).
pub type KubeArgs = crate::k8s::KubeTarget;

fn print_plan(plan: &policy::cluster::Plan) {
    for s in &plan.steps {
        let id = match &s.namespace {
            Some(n) => format!("{} {n}/{}", s.kind, s.name),
            None => format!("{} {}", s.kind, s.name),
        };
        match s.action.as_str() {
            "create" => println!("+ create {id}"),
            "update" => {
                println!("~ update {id}: {}", s.changes.join(", "));
                if let Some((old, new)) = &s.owner_transfer {
                    println!("    owner transfer {old} → {new}: the namespace annotation is updated and namespaceAdmin / ns-owner-access-istio are recreated by the controller");
                }
            }
            "delete" if s.kind == "Profile" => println!(
                "- delete {id} — DATA LOSS: its namespace goes, with PVCs: {}",
                if s.pvcs.is_empty() {
                    "none".to_string()
                } else {
                    s.pvcs.join(", ")
                }
            ),
            "delete" => println!("- delete {id}"),
            _ => {}
        }
    }
    for m in &plan.drift {
        println!("! drift {m}");
    }
    for m in &plan.missing {
        println!("! missing {m}");
    }
    for u in &plan.unmanaged {
        println!(
            "! unmanaged {} {}/{}: {} — remove with apply --prune-unmanaged, or adopt with policy import",
            u.kind,
            u.namespace,
            u.name,
            u.grants.join("; ")
        );
    }
    let unchanged = plan.steps.len() - plan.changes();
    println!("{} change(s), {unchanged} unchanged", plan.changes());
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Check every policy file: unknown fields, unknown people or groups,
    /// malformed emails, duplicates, quota keys, LimitRange defaults, GPU
    /// capacity, grant length, expired entries. Errors name file, line, field.
    Validate {
        #[command(flatten)]
        p: PoliciesArg,
    },
    /// Print every object labctl would apply (YAML, or --json as a list);
    /// no cluster needed, so a GitOps pipeline can use it.
    Render {
        #[command(flatten)]
        p: PoliciesArg,
    },
    /// Compare the rendered objects with the live cluster: create, update
    /// (the fields that differ: drift), delete (managed objects the policy no
    /// longer has), and controller-created objects that are missing.
    Plan {
        #[command(flatten)]
        p: PoliciesArg,
        #[command(flatten)]
        k: KubeArgs,
    },
    /// Make the cluster match the policy: server-side apply (field manager
    /// labctl), then prune objects labelled as managed by labctl. Never
    /// deletes a Profile (its namespace and data) without --allow-data-loss.
    Apply {
        #[command(flatten)]
        p: PoliciesArg,
        #[command(flatten)]
        k: KubeArgs,
        /// Allow deleting Profiles the policy no longer has (their namespaces and PVCs go too).
        #[arg(long)]
        allow_data_loss: bool,
        /// Also delete the RoleBindings and AuthorizationPolicies in profile
        /// namespaces that give people access the policy does not grant
        /// (the plan lists them as unmanaged: dashboard-made contributors
        /// above their policy role, notebook access left after
        /// `notebooks: false`). Each deletion is in the audit entry. To
        /// keep such access instead, adopt it with `policy import`.
        #[arg(long)]
        prune_unmanaged: bool,
        /// Why (recorded in the audit trail).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        a: AuditArgs,
    },
    /// Adopt contributor bindings made in the Kubeflow dashboard (KFAM) into
    /// the policy files: each becomes a grant (the person a Researcher if
    /// new). A later apply then manages those objects.
    Import {
        #[command(flatten)]
        p: PoliciesArg,
        #[command(flatten)]
        k: KubeArgs,
        /// Only list what would be imported.
        #[arg(long)]
        dry_run: bool,
    },
    /// List access that lapses within the given time (grants, groups, people).
    Expiring {
        #[command(flatten)]
        p: PoliciesArg,
        /// How far ahead to look, in days (30d) or weeks (4w).
        #[arg(long, default_value = "30d")]
        within: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// Give a person a role on a profile by editing the policy files in
    /// place (comments and all other text untouched). A person not yet in
    /// the policy is added as a Researcher. The edit is validated first.
    Grant {
        /// The person's email (as the user-id header carries it).
        email: String,
        /// The profile (namespace).
        #[arg(long)]
        profile: String,
        /// view, edit or admin.
        #[arg(long, value_parser = ["view", "edit", "admin"])]
        role: String,
        /// Last day of access (YYYY-MM-DD).
        #[arg(long, value_name = "DATE")]
        expires: Option<String>,
        /// Why (recorded in the policy and on the objects).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        p: PoliciesArg,
        /// Apply the whole policy to the cluster right after editing.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        k: KubeArgs,
        #[command(flatten)]
        a: AuditArgs,
    },
    /// List the profiles: owner, quota class, and how many people can reach each.
    List {
        #[command(flatten)]
        p: PoliciesArg,
    },
    /// Remove a person's direct grant on a profile (editing the files in
    /// place). With --apply, also delete every KFAM binding pair of theirs
    /// in that namespace (RoleBinding and AuthorizationPolicy, whoever made
    /// them: labctl or the dashboard, with or without notebooks), then apply
    /// the whole policy (which puts back what a group still grants).
    Revoke {
        email: String,
        #[arg(long)]
        profile: String,
        #[command(flatten)]
        p: PoliciesArg,
        /// Delete their binding pairs and apply the policy right after editing.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        k: KubeArgs,
        #[command(flatten)]
        a: AuditArgs,
    },
    /// Who can reach a profile, with which role, through which grant or group.
    WhoHasAccess {
        profile: String,
        #[command(flatten)]
        p: PoliciesArg,
    },
}

#[derive(Args, Debug)]
pub struct AccessCmd {
    /// The person's email.
    pub email: String,
    #[command(flatten)]
    pub p: PoliciesArg,
}

/// Plan, apply and audit (shared by `policy apply` and `profile grant --apply`).
fn apply_policy(
    g: &GlobalArgs,
    p: &PoliciesArg,
    k: &KubeArgs,
    (allow_data_loss, prune_unmanaged): (bool, bool),
    a: &AuditArgs,
    reason: Option<&str>,
) -> crate::error::Result<(policy::cluster::Plan, Vec<policy::cluster::Done>)> {
    let (pol, today) = p.load(g)?;
    let actor = a
        .actor
        .clone()
        .unwrap_or_else(crate::records::policy_audit::local_user);
    policy::workflow::apply_recorded(
        &pol,
        today,
        k,
        allow_data_loss,
        prune_unmanaged,
        &policy::workflow::AuditEntry {
            log: &a.path(g),
            actor: &actor,
            reason,
            policies: &p.policies,
        },
    )
}

pub fn run_policy(g: &GlobalArgs, c: PolicyCmd) -> crate::error::Result<ExitCode> {
    match c {
        PolicyCmd::Validate { p } => {
            let (pol, today) = p.load(g)?;
            let objects = policy::render::render(&pol, today);
            if g.json {
                print_json(&serde_json::json!({
                    "valid": true,
                    "researchers": pol.researchers.len(),
                    "groups": pol.groups.len(),
                    "quota-classes": pol.quota_classes.len(),
                    "profiles": pol.profiles.len(),
                    "objects": objects.len(),
                    "warnings": pol.warnings,
                }))?;
            } else if !g.quiet {
                println!(
                    "{}: valid: {} researcher(s), {} group(s), {} quota class(es), {} profile(s) → {} object(s)",
                    p.policies.display(),
                    pol.researchers.len(),
                    pol.groups.len(),
                    pol.quota_classes.len(),
                    pol.profiles.len(),
                    objects.len()
                );
            }
            Ok(ExitCode::Success)
        }
        PolicyCmd::Render { p } => {
            let (pol, today) = p.load(g)?;
            let objects = policy::render::render(&pol, today);
            if g.json {
                print_json(&objects)?;
            } else {
                print!("{}", policy::render::to_yaml(&objects)?);
            }
            Ok(ExitCode::Success)
        }
        PolicyCmd::Plan { p, k } => {
            let (pol, today) = p.load(g)?;
            let plan = policy::workflow::plan(&pol, today, &k)?;
            if g.json {
                print_json(&plan)?;
            } else {
                print_plan(&plan);
            }
            Ok(ExitCode::Success)
        }
        PolicyCmd::Apply {
            p,
            k,
            allow_data_loss,
            prune_unmanaged,
            reason,
            a,
        } => {
            let (plan, done) = apply_policy(
                g,
                &p,
                &k,
                (allow_data_loss, prune_unmanaged),
                &a,
                reason.as_deref(),
            )?;
            if g.json {
                print_json(&serde_json::json!({"plan": plan, "applied": done}))?;
            } else if !g.quiet {
                print_plan(&plan);
                println!("applied {} change(s)", done.len());
            }
            Ok(ExitCode::Success)
        }
        PolicyCmd::Import { p, k, dry_run } => {
            let (pol, today) = p.load(g)?;
            let imported =
                policy::workflow::import_bindings(&p.policies, &pol, today, &k, dry_run)?;
            if g.json {
                print_json(&imported)?;
            } else if !g.quiet {
                for f in &imported {
                    println!(
                        "{} {} {} on {} (RoleBinding {})",
                        if dry_run { "would import" } else { "imported" },
                        f.user,
                        f.role,
                        f.profile,
                        f.binding
                    );
                }
                if imported.is_empty() {
                    println!(
                        "nothing to import: every contributor binding is already in the policy"
                    );
                }
            }
            Ok(ExitCode::Success)
        }
        PolicyCmd::Expiring { p, within } => {
            let (pol, today) = p.load(g)?;
            let days: i64 = within
                .strip_suffix('d')
                .and_then(|d| d.parse().ok())
                .or_else(|| {
                    within
                        .strip_suffix('w')
                        .and_then(|w| w.parse::<i64>().ok())
                        .map(|w| w * 7)
                })
                .ok_or_else(|| {
                    LabError::usage(format!("--within {within}: use days (30d) or weeks (4w)"))
                })?;
            let until = today + time::Duration::days(days);
            let mut rows = vec![];
            for a in pol.accesses(today) {
                if let Some(e) = a.expires.filter(|e| *e <= until) {
                    rows.push(serde_json::json!({"user": a.user, "profile": a.profile, "role": a.role, "expires": e.to_string(), "group": a.group}));
                }
            }
            for (email, (r, _)) in &pol.researchers {
                if let Some(e) = r
                    .expires
                    .as_deref()
                    .and_then(|d| policy::parse_date(d).ok())
                    .filter(|e| *e >= today && *e <= until)
                {
                    rows.push(serde_json::json!({"user": email, "profile": null, "role": null, "expires": e.to_string(), "group": null, "what": "researcher"}));
                }
            }
            if g.json {
                print_json(&rows)?;
            } else {
                for r in &rows {
                    println!(
                        "{}  {:<28} {:<16} {:<6} {}",
                        r["expires"].as_str().unwrap_or(""),
                        r["user"].as_str().unwrap_or(""),
                        r["profile"].as_str().unwrap_or("(everything)"),
                        r["role"].as_str().unwrap_or(""),
                        r["group"]
                            .as_str()
                            .map(|g| format!("via group {g}"))
                            .unwrap_or_default()
                    );
                }
                if rows.is_empty() && !g.quiet {
                    println!("nothing lapses before {until}");
                }
            }
            Ok(ExitCode::Success)
        }
    }
}

#[derive(Args, Debug)]
pub struct OffboardCmd {
    /// The person's email.
    pub email: String,
    #[command(flatten)]
    pub p: PoliciesArg,
}

pub fn run_offboard(g: &GlobalArgs, c: OffboardCmd) -> crate::error::Result<ExitCode> {
    let done = policy::edit::offboard(&c.p.policies, c.p.today()?, &c.email)?;
    if g.json {
        print_json(&done)?;
    } else if !g.quiet {
        if done.is_empty() {
            println!("{} is not in {}", c.email, c.p.policies.display());
        }
        for d in &done {
            println!("removed {}: {d}", c.email);
        }
    }
    Ok(ExitCode::Success)
}

pub fn run_profile(g: &GlobalArgs, c: ProfileCmd) -> crate::error::Result<ExitCode> {
    let (profile, p) = match c {
        ProfileCmd::Grant {
            email,
            profile,
            role,
            expires,
            reason,
            p,
            apply,
            k,
            a,
        } => {
            let ch = policy::edit::grant(
                &p.policies,
                p.today()?,
                &email,
                &profile,
                &role,
                expires.as_deref(),
                reason.as_deref(),
            )?;
            if g.json {
                print_json(&ch)?;
            } else if !g.quiet {
                if ch.added_researcher {
                    println!("added {email} as a Researcher");
                }
                println!(
                    "{} grant: {email} {role} on {profile} ({})",
                    ch.action,
                    ch.file.display()
                );
            }
            if apply {
                let why = reason
                    .clone()
                    .unwrap_or_else(|| format!("grant {role} on {profile} to {email}"));
                let (plan, done) = apply_policy(g, &p, &k, (false, false), &a, Some(&why))?;
                if !g.quiet && !g.json {
                    print_plan(&plan);
                    println!("applied {} change(s)", done.len());
                }
            }
            return Ok(ExitCode::Success);
        }
        ProfileCmd::Revoke {
            email,
            profile,
            p,
            apply,
            k,
            a,
        } => {
            let f = policy::edit::revoke(&p.policies, p.today()?, &email, &profile)?;
            if !g.quiet && !g.json {
                println!("revoked: {email} on {profile} ({})", f.display());
            }
            if apply {
                let (pol, today) = p.load(g)?;
                let actor = a
                    .actor
                    .clone()
                    .unwrap_or_else(crate::records::policy_audit::local_user);
                let why = format!("revoke {email} on {profile}");
                let (deleted, plan, done) = policy::workflow::revoke_recorded(
                    &pol,
                    today,
                    &k,
                    &profile,
                    &email,
                    &policy::workflow::AuditEntry {
                        log: &a.path(g),
                        actor: &actor,
                        reason: Some(&why),
                        policies: &p.policies,
                    },
                )?;
                if g.json {
                    print_json(&serde_json::json!({
                        "deleted": deleted.iter().map(|(kind, name)| serde_json::json!({"kind": kind, "namespace": profile, "name": name})).collect::<Vec<_>>(),
                        "applied": done.len(),
                    }))?;
                } else if !g.quiet {
                    for (kind, name) in &deleted {
                        println!("  - {kind} {profile}/{name}");
                    }
                    print_plan(&plan);
                    println!("applied {} change(s)", done.len());
                }
            }
            return Ok(ExitCode::Success);
        }
        ProfileCmd::List { p } => {
            let (pol, today) = p.load(g)?;
            let access = pol.accesses(today);
            let rows: Vec<serde_json::Value> = pol
                .profiles
                .iter()
                .map(|(name, (pr, _))| {
                    let people = access.iter().filter(|a| &a.profile == name).count();
                    serde_json::json!({"profile": name, "owner": pr.owner, "quota-class": pr.quota_class, "contributors": people})
                })
                .collect();
            if g.json {
                print_json(&rows)?;
            } else {
                println!(
                    "{:<20} {:<28} {:<14} CONTRIBUTORS",
                    "PROFILE", "OWNER", "QUOTA"
                );
                for r in &rows {
                    println!(
                        "{:<20} {:<28} {:<14} {}",
                        r["profile"].as_str().unwrap_or(""),
                        r["owner"].as_str().unwrap_or(""),
                        r["quota-class"].as_str().unwrap_or("-"),
                        r["contributors"]
                    );
                }
            }
            return Ok(ExitCode::Success);
        }
        ProfileCmd::WhoHasAccess { profile, p } => (profile, p),
    };
    let (pol, today) = p.load(g)?;
    let Some((pr, _)) = pol.profiles.get(&profile) else {
        return Err(LabError::usage(format!(
            "no Profile '{profile}' in {}",
            p.policies.display()
        ))
        .into());
    };
    let mut rows = vec![owner_row(&pr.owner, &profile)];
    rows.extend(
        pol.accesses(today)
            .iter()
            .filter(|a| a.profile == profile)
            .map(access_row),
    );
    print_access(g, &rows, "user", 30)
}

/// A "who can reach what, and why" row for `who-has-access` and `access`.
fn access_row(a: &policy::Access) -> serde_json::Value {
    serde_json::json!({
        "user": a.user, "profile": a.profile, "role": a.role,
        "via": a.group.as_ref().map(|g| format!("group {g}")).unwrap_or_else(|| "direct grant".into()),
        "expires": a.expires.map(|e| e.to_string()), "notebooks": a.notebooks,
    })
}

fn owner_row(user: &str, profile: &str) -> serde_json::Value {
    serde_json::json!({"user": user, "profile": profile, "role": "owner", "via": "profile owner"})
}

/// Prints rows (JSON, or a table led by the `first` column).
fn print_access(
    g: &GlobalArgs,
    rows: &[serde_json::Value],
    first: &str,
    width: usize,
) -> crate::error::Result<ExitCode> {
    if g.json {
        print_json(&rows)?;
        return Ok(ExitCode::Success);
    }
    for r in rows {
        println!(
            "{:<width$} {:<6} {}{}",
            r[first].as_str().unwrap_or(""),
            r["role"].as_str().unwrap_or(""),
            r["via"].as_str().unwrap_or(""),
            r["expires"]
                .as_str()
                .map(|e| format!(", until {e}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::Success)
}

pub fn run_access(g: &GlobalArgs, c: AccessCmd) -> crate::error::Result<ExitCode> {
    let (pol, today) = c.p.load(g)?;
    let mut rows: Vec<serde_json::Value> = pol
        .profiles
        .iter()
        .filter(|(_, (pr, _))| pr.owner == c.email)
        .map(|(name, _)| owner_row(&c.email, name))
        .collect();
    rows.extend(
        pol.accesses(today)
            .iter()
            .filter(|a| a.user == c.email)
            .map(access_row),
    );
    if rows.is_empty() && !g.json {
        println!("{} has no access in {}", c.email, c.p.policies.display());
        return Ok(ExitCode::Success);
    }
    print_access(g, &rows, "profile", 20)
}
