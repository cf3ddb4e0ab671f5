//! Researcher profiles, RBAC and quotas from policy files (`policies/`).
//!
//! YAML files, several documents each, any layout under the folder. Kinds:
//! `Settings`, `Researcher`, `Group`, `QuotaClass`, `Profile`. Loading
//! validates everything and reports each problem with file, line and field;
//! [`render`] turns a valid policy into exactly the objects a stock
//! Kubeflow 1.8/1.9 expects (see `../shared/design/KUBEFLOW.md`).

pub mod cluster;
pub mod edit;
pub mod render;
pub mod workflow;

use crate::error::LabError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use time::Date;

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Settings {
    pub kind: String,
    /// The policy set's name (required): every object labctl applies is
    /// labelled with it (`labctl.io/policy-set`), and apply prunes only
    /// objects of this set, so two policy folders can share a cluster.
    pub name: String,
    #[serde(default = "default_version")]
    pub kubeflow_version: String,
    #[serde(default = "default_header")]
    pub user_id_header: String,
    #[serde(default)]
    pub user_id_prefix: String,
    #[serde(default = "default_principals")]
    pub gateway_principals: Vec<String>,
    /// GPUs in the cluster (`requests.nvidia.com/gpu` quotas are checked against it).
    #[serde(default)]
    pub gpu_capacity: Option<u32>,
    /// The longest grant allowed, in days from today.
    #[serde(default)]
    pub max_grant_days: Option<u32>,
    /// More namespaces no profile may use (beside [`RESERVED_NAMESPACES`]
    /// and every `kube-*` name).
    #[serde(default)]
    pub reserved_namespaces: Vec<String>,
}

/// Namespaces of Kubernetes, Kubeflow and its dependencies, and Kubeflow's
/// example profile: a profile there would put RoleBindings, LimitRanges and
/// namespace-wide ALLOW AuthorizationPolicies into them (in Istio's root
/// namespace such a policy applies mesh-wide). `kube-*` is reserved too
/// (Kubernetes keeps that prefix for the system).
pub const RESERVED_NAMESPACES: [&str; 11] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "default",
    "kubeflow",
    "istio-system",
    "cert-manager",
    "auth",
    "knative-serving",
    "knative-eventing",
    "kubeflow-user-example-com",
];

fn default_version() -> String {
    "1.8".into()
}
fn default_header() -> String {
    "kubeflow-userid".into()
}
fn default_principals() -> Vec<String> {
    vec![
        "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account".into(),
        "cluster.local/ns/kubeflow/sa/ml-pipeline-ui".into(),
    ]
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kind: "Settings".into(),
            name: String::new(),
            kubeflow_version: default_version(),
            user_id_header: default_header(),
            user_id_prefix: String::new(),
            gateway_principals: default_principals(),
            gpu_capacity: None,
            max_grant_days: None,
            reserved_namespaces: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Researcher {
    pub kind: String,
    pub email: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub kind: String,
    pub name: String,
    pub owner: String,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuotaClass {
    pub kind: String,
    pub name: String,
    /// ResourceQuota `spec.hard`.
    #[serde(default)]
    pub hard: BTreeMap<String, String>,
    #[serde(default)]
    pub limit_range: Option<LimitDefaults>,
}

/// LimitRange container defaults.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitDefaults {
    #[serde(default)]
    pub default_request: BTreeMap<String, String>,
    #[serde(default)]
    pub default: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Profile {
    pub kind: String,
    pub name: String,
    pub owner: String,
    #[serde(default)]
    pub quota_class: Option<String>,
    #[serde(default)]
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub role: String,
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Notebook (and other UI) access through the gateway; default true.
    #[serde(default)]
    pub notebooks: Option<bool>,
}

/// A loaded policy folder.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub settings: Settings,
    pub researchers: BTreeMap<String, (Researcher, Origin)>,
    pub groups: BTreeMap<String, (Group, Origin)>,
    pub quota_classes: BTreeMap<String, (QuotaClass, Origin)>,
    pub profiles: BTreeMap<String, (Profile, Origin)>,
    pub warnings: Vec<String>,
}

/// An access a person has to a profile after expanding groups.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Access {
    pub user: String,
    pub profile: String,
    pub role: String,
    /// The group it came through (the one giving the highest role).
    pub group: Option<String>,
    #[serde(serialize_with = "ser_date")]
    pub expires: Option<Date>,
    pub reason: Option<String>,
    pub notebooks: bool,
}

fn ser_date<S: serde::Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&d.to_string()),
        None => s.serialize_none(),
    }
}

fn rank(role: &str) -> u8 {
    match role {
        "view" => 1,
        "edit" => 2,
        "admin" => 3,
        _ => 0,
    }
}

/// Parses `YYYY-MM-DD`.
///
/// # Errors
/// A message naming the text.
pub fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| format!("'{s}' is not a date like 2027-01-31"))
}

/// Whether `email` is an address the lab's identity provider (Dex, OIDC)
/// puts in the user-id header: a dot-atom local part (RFC 5322 `atext`,
/// apostrophes included, single dots, none at either end) and a host name
/// of two or more labels (letters, digits and inner hyphens).
pub fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c);
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(atext));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && domain.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    local_ok && domain_ok
}

/// A ResourceQuota `spec.hard` key: the API server's rules
/// ([`crate::k8s::validation::quota_resource_problem`]), plus one of
/// labctl's: an extended resource (`nvidia.com/gpu`) is quota'd only with
/// the `requests.` prefix (Kubernetes accepts other spellings and then
/// limits nothing, because extended resources cannot be overcommitted).
fn quota_key_problem(key: &str) -> Option<String> {
    if let Some(p) = crate::k8s::validation::quota_resource_problem(key) {
        return Some(p);
    }
    // Object counts and per-StorageClass storage are quota names of their
    // own, not extended resources.
    if key.starts_with("count/") || key.contains(".storageclass.storage.k8s.io/") {
        return None;
    }
    let bare = key.strip_prefix("limits.").unwrap_or(key);
    if crate::k8s::validation::is_extended_resource(bare) {
        return Some(format!(
            "'{key}': an extended resource is quota'd only as requests.{bare} (Kubernetes would accept '{key}' and limit nothing)"
        ));
    }
    None
}

/// The first value of a LimitRange's container defaults that the API
/// server's `ValidateLimitRange` would refuse: `(section, key, value, why)`.
fn limit_range_problem(lr: &LimitDefaults) -> Option<(&'static str, String, String, String)> {
    use crate::k8s::validation::{container_resource_problem, quantity_problem, Quantity};
    for (section, map) in [
        ("default", &lr.default),
        ("defaultRequest", &lr.default_request),
    ] {
        for (k, v) in map {
            if let Some(why) = container_resource_problem(k) {
                return Some((section, k.clone(), String::new(), why));
            }
            if let Some(why) = quantity_problem(k, v) {
                return Some((section, k.clone(), v.clone(), why));
            }
        }
    }
    for (k, req) in &lr.default_request {
        if let Some(lim) = lr.default.get(k) {
            let (rq, lq) = (Quantity::parse(req).ok()?, Quantity::parse(lim).ok()?);
            if rq.cmp_value(&lq) == std::cmp::Ordering::Greater {
                return Some((
                    "defaultRequest",
                    k.clone(),
                    req.clone(),
                    format!("default request value {req} must be less than or equal to default limit value {lim}"),
                ));
            }
        }
    }
    None
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> crate::error::Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        LabError::usage(format!("cannot read policy folder {}: {e}", dir.display()))
    })?;
    let mut entries: Vec<_> = rd.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            yaml_files(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(p);
        }
    }
    Ok(())
}

/// Splits YAML text into documents with their first line (1-based).
pub fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![];
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            if cur.trim().lines().any(|l| !l.trim_start().starts_with('#')) {
                docs.push((start, std::mem::take(&mut cur)));
            }
            cur.clear();
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if cur.trim().lines().any(|l| !l.trim_start().starts_with('#')) {
        docs.push((start, cur));
    }
    docs
}

fn de<T: serde::de::DeserializeOwned>(doc: &str, origin: &Origin) -> crate::error::Result<T> {
    let d = serde_norway::Deserializer::from_str(doc);
    serde_path_to_error::deserialize(d).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.location().map_or(0, |l| l.line()) + origin.line - 1;
        let msg = crate::util::located::yaml_message(&inner);
        crate::util::located::error(origin.file.display(), line, None, &field, msg).into()
    })
}

/// The line (in the document at `origin`) of the first `key: value` entry
/// (quotes and trailing comments ignored; an empty key finds a list item).
fn line_of(text: &str, origin: &Origin, key: &str, value: &str) -> usize {
    crate::util::located::yaml_line(text, key, value).map_or(origin.line, |i| origin.line + i)
}

/// Adds a named document, refusing a second one with the same name.
fn insert_once<T>(
    map: &mut BTreeMap<String, (T, Origin)>,
    key: String,
    value: T,
    origin: Origin,
    dup: impl Fn(&str, &Origin) -> crate::error::Error,
) -> crate::error::Result<()> {
    if let Some((_, first)) = map.get(&key) {
        return Err(dup(&key, first));
    }
    map.insert(key, (value, origin));
    Ok(())
}

/// Loads and validates every policy file under `dir`.
///
/// # Errors
/// A usage error naming the file, line and field of the first problem.
pub fn load(dir: &Path, today: Date) -> crate::error::Result<Policy> {
    let mut files = vec![];
    yaml_files(dir, &mut files)?;
    let mut p = Policy::default();
    let mut settings_seen: Option<Origin> = None;
    let mut texts: BTreeMap<PathBuf, String> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| LabError::usage(format!("{}: {e}", file.display())))?;
        for (line, doc) in documents(&text) {
            let origin = Origin {
                file: file.clone(),
                line,
            };
            let v: serde_norway::Value = serde_norway::from_str(&doc).map_err(|e| {
                LabError::usage(format!(
                    "{}:{}: {}",
                    file.display(),
                    e.location().map_or(line, |l| l.line() + line - 1),
                    e
                ))
            })?;
            let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            let dup = |what: &str, name: &str, first: &Origin| -> crate::error::Error {
                let key = if what == "Researcher" {
                    "email"
                } else {
                    "name"
                };
                let line = line_of(&doc, &origin, key, name);
                LabError::usage(format!(
                    "{}:{line}: field `{key}`: {what} '{name}' is defined twice (first at {first})",
                    origin.file.display()
                ))
                .into()
            };
            match kind {
                "Settings" => {
                    if let Some(first) = &settings_seen {
                        return Err(LabError::usage(format!(
                            "{origin}: field `kind`: a second Settings document (the first is at {first})"
                        ))
                        .into());
                    }
                    p.settings = de(&doc, &origin)?;
                    let n = &p.settings.name;
                    if !crate::k8s::validation::is_label_value(n) {
                        let line = line_of(&doc, &origin, "name", n);
                        return Err(crate::util::located::error(
                            origin.file.display(),
                            line,
                            None,
                            "name",
                            format!("'{n}' is not a policy-set name (a Kubernetes label value: up to 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"),
                        )
                        .into());
                    }
                    settings_seen = Some(origin);
                }
                "Researcher" => {
                    let r: Researcher = de(&doc, &origin)?;
                    insert_once(&mut p.researchers, r.email.clone(), r, origin.clone(), |k, f| dup(kind, k, f))?;
                }
                "Group" => {
                    let g: Group = de(&doc, &origin)?;
                    insert_once(&mut p.groups, g.name.clone(), g, origin.clone(), |k, f| dup(kind, k, f))?;
                }
                "QuotaClass" => {
                    let q: QuotaClass = de(&doc, &origin)?;
                    insert_once(&mut p.quota_classes, q.name.clone(), q, origin.clone(), |k, f| dup(kind, k, f))?;
                }
                "Profile" => {
                    let pr: Profile = de(&doc, &origin)?;
                    insert_once(&mut p.profiles, pr.name.clone(), pr, origin.clone(), |k, f| dup(kind, k, f))?;
                }
                "" => {
                    return Err(LabError::usage(format!(
                        "{origin}: field `kind`: missing (Settings, Researcher, Group, QuotaClass or Profile)"
                    ))
                    .into())
                }
                other => {
                    return Err(LabError::usage(format!(
                        "{}:{}: field `kind`: unknown kind '{other}' (Settings, Researcher, Group, QuotaClass or Profile)",
                        origin.file.display(),
                        line_of(&doc, &origin, "kind", other)
                    ))
                    .into())
                }
            }
            texts.insert(file.clone(), text.clone());
        }
    }
    if settings_seen.is_none() {
        return Err(LabError::usage(format!(
            "{}: no Settings document: add one (kind: Settings) with the policy set's `name`; apply labels and prunes by it",
            dir.display()
        ))
        .into());
    }
    validate(&mut p, &texts, today)?;
    Ok(p)
}

fn validate(
    p: &mut Policy,
    texts: &BTreeMap<PathBuf, String>,
    today: Date,
) -> crate::error::Result<()> {
    let text_of = |o: &Origin| -> String {
        let t = texts.get(&o.file).cloned().unwrap_or_default();
        t.lines().skip(o.line - 1).collect::<Vec<_>>().join("\n")
    };
    let at =
        |o: &Origin, key: &str, value: &str, field: &str, why: String| -> crate::error::Error {
            let line = line_of(&text_of(o), o, key, value);
            crate::util::located::error(o.file.display(), line, None, field, why).into()
        };
    let mut warnings = vec![];
    let date = |o: &Origin,
                s: &Option<String>,
                field: &str,
                what: &str,
                warnings: &mut Vec<String>|
     -> crate::error::Result<Option<Date>> {
        let Some(s) = s else { return Ok(None) };
        let d = parse_date(s).map_err(|e| at(o, "expires", s, field, e))?;
        if d < today {
            warnings.push(format!(
                "{}:{}: {what} expired on {d}; apply removes the access it gave",
                o.file.display(),
                line_of(&text_of(o), o, "expires", s)
            ));
        }
        Ok(Some(d))
    };
    for (email, (r, o)) in &p.researchers {
        if !valid_email(email) {
            return Err(at(
                o,
                "email",
                email,
                "email",
                format!("'{email}' is not an email address (the user-id header carries it)"),
            ));
        }
        date(
            o,
            &r.expires,
            "expires",
            &format!("Researcher {email}"),
            &mut warnings,
        )?;
    }
    // KFAM names a person's RoleBinding after the email with every run of
    // other characters turned into one '-', lowercased: two people whose
    // names collapse alike would share one binding (the last apply wins).
    let mut stems: BTreeMap<String, (&String, &Origin)> = BTreeMap::new();
    for (email, (_, o)) in &p.researchers {
        let stem = render::kfam_name(email, "x");
        if let Some((first, fo)) = stems.get(&stem) {
            let first_line = line_of(&text_of(fo), fo, "email", first);
            return Err(at(
                o,
                "email",
                email,
                "email",
                format!("'{email}' and '{first}' ({}:{first_line}) get the same KFAM binding name ({}): one would silently lose access; Kubeflow cannot tell them apart", fo.file.display(), stem.trim_end_matches("-clusterrole-x")),
            ));
        }
        stems.insert(stem, (email, o));
    }
    let known = |e: &str| p.researchers.contains_key(e);
    for (name, (g, o)) in &p.groups {
        if !known(&g.owner) {
            return Err(at(
                o,
                "owner",
                &g.owner,
                "owner",
                format!("'{}' is not a Researcher in the policy", g.owner),
            ));
        }
        for (i, m) in g.members.iter().enumerate() {
            if !valid_email(m) {
                return Err(at(
                    o,
                    "",
                    m,
                    &format!("members[{i}]"),
                    format!("'{m}' is not an email address"),
                ));
            }
            if !known(m) {
                return Err(at(
                    o,
                    "",
                    m,
                    &format!("members[{i}]"),
                    format!("'{m}' is not a Researcher in the policy (add a Researcher document)"),
                ));
            }
        }
        date(
            o,
            &g.expires,
            "expires",
            &format!("Group {name}"),
            &mut warnings,
        )?;
    }
    for (name, (q, o)) in &p.quota_classes {
        for (k, v) in &q.hard {
            if let Some(why) = quota_key_problem(k) {
                return Err(at(o, k, "", &format!("hard.{k}"), why));
            }
            if let Some(why) = crate::k8s::validation::quantity_problem(k, v) {
                return Err(at(o, k, v, &format!("hard.{k}"), why));
            }
        }
        if let Some(lr) = &q.limit_range {
            limit_range_problem(lr).map_or(Ok(()), |(section, k, v, why)| {
                let line = crate::util::located::yaml_line_in(&text_of(o), section, &k, &v)
                    .map_or(o.line, |i| o.line + i);
                Err(crate::util::located::error(
                    o.file.display(),
                    line,
                    None,
                    &format!("limitRange.{section}.{k}"),
                    why,
                ))
            })?;
        }
        let cpu_mem = q.hard.keys().any(|k| {
            [
                "requests.cpu",
                "requests.memory",
                "limits.cpu",
                "limits.memory",
                "cpu",
                "memory",
            ]
            .contains(&k.as_str())
        });
        if cpu_mem
            && q.limit_range
                .as_ref()
                // The API server defaults a missing default request to the
                // default limit (SetDefaults_LimitRangeItem).
                .is_none_or(|l| l.default_request.is_empty() && l.default.is_empty())
        {
            return Err(at(o, "name", name, "limitRange", "a cpu/memory quota rejects pods that declare no requests: add limitRange.defaultRequest or default (a missing default request is the default limit) so they get some".into()));
        }
    }
    let mut gpu_total = 0.0;
    for (name, (pr, o)) in &p.profiles {
        if !crate::k8s::validation::is_dns1123_label(name) {
            return Err(at(
                o,
                "name",
                name,
                "name",
                format!("'{name}' is not a namespace name (lowercase letters, digits, '-')"),
            ));
        }
        let reserved = RESERVED_NAMESPACES.contains(&name.as_str())
            || name.starts_with("kube-")
            || p.settings.reserved_namespaces.iter().any(|r| r == name);
        if reserved {
            return Err(at(
                o,
                "name",
                name,
                "name",
                format!("'{name}' is a reserved namespace (Kubernetes, Kubeflow or Settings.reservedNamespaces): a profile there would write RoleBindings, LimitRanges and AuthorizationPolicies into it; choose another name"),
            ));
        }
        if !known(&pr.owner) {
            return Err(at(
                o,
                "owner",
                &pr.owner,
                "owner",
                format!("'{}' is not a Researcher in the policy", pr.owner),
            ));
        }
        if let Some(qc) = &pr.quota_class {
            let Some((q, _)) = p.quota_classes.get(qc) else {
                return Err(at(
                    o,
                    "quotaClass",
                    qc,
                    "quotaClass",
                    format!("no QuotaClass '{qc}'"),
                ));
            };
            if let Some(g) = q.hard.get("requests.nvidia.com/gpu") {
                gpu_total += g.parse::<f64>().unwrap_or(0.0);
            }
        }
        for (i, g) in pr.grants.iter().enumerate() {
            let f = |x: &str| format!("grants[{i}].{x}");
            let who = match (&g.user, &g.group) {
                (Some(u), None) => {
                    if !valid_email(u) {
                        return Err(at(
                            o,
                            "user",
                            u,
                            &f("user"),
                            format!("'{u}' is not an email address"),
                        ));
                    }
                    if !known(u) {
                        return Err(at(
                            o,
                            "user",
                            u,
                            &f("user"),
                            format!("'{u}' is not a Researcher in the policy"),
                        ));
                    }
                    u.clone()
                }
                (None, Some(gr)) => {
                    if !p.groups.contains_key(gr) {
                        return Err(at(o, "group", gr, &f("group"), format!("no Group '{gr}'")));
                    }
                    gr.clone()
                }
                _ => {
                    return Err(at(
                        o,
                        "role",
                        &g.role,
                        &format!("grants[{i}]"),
                        "give exactly one of user or group".into(),
                    ))
                }
            };
            if rank(&g.role) == 0 {
                return Err(at(
                    o,
                    "role",
                    &g.role,
                    &f("role"),
                    format!("'{}': use view, edit or admin", g.role),
                ));
            }
            if let Some(d) = date(
                o,
                &g.expires,
                &f("expires"),
                &format!("grant of {name} to {who}"),
                &mut warnings,
            )? {
                if let Some(max) = p.settings.max_grant_days {
                    let limit = today + time::Duration::days(i64::from(max));
                    if d > limit {
                        return Err(at(o, "expires", g.expires.as_deref().unwrap_or(""), &f("expires"), format!("{d} is more than {max} days away (Settings.maxGrantDays); the latest allowed is {limit}")));
                    }
                }
            } else if let Some(max) = p.settings.max_grant_days {
                let group_expires = g
                    .group
                    .as_ref()
                    .and_then(|gr| p.groups.get(gr))
                    .is_some_and(|(grp, _)| grp.expires.is_some());
                if g.role != "view" && !group_expires {
                    warnings.push(format!("{}: grant of {name} to {who} has no expiry; Settings.maxGrantDays is {max}", o));
                }
            }
        }
    }
    if let Some(cap) = p.settings.gpu_capacity {
        if gpu_total > f64::from(cap) {
            warnings.push(format!(
                "GPU quotas add up to {gpu_total} but Settings.gpuCapacity is {cap}: profiles can be promised GPUs the cluster does not have"
            ));
        }
    }
    p.warnings = warnings;
    Ok(())
}

impl Policy {
    /// Every (user, profile) access after expanding groups; the highest role
    /// wins, and expired grants, groups and people are left out as of `today`.
    pub fn accesses(&self, today: Date) -> Vec<Access> {
        let live = |e: &Option<String>| {
            e.as_deref()
                .and_then(|d| parse_date(d).ok())
                .is_none_or(|d| d >= today)
        };
        let mut out: BTreeMap<(String, String), Access> = BTreeMap::new();
        for (pname, (pr, _)) in &self.profiles {
            for g in &pr.grants {
                if !live(&g.expires) {
                    continue;
                }
                let (users, group): (Vec<String>, Option<String>) = match (&g.user, &g.group) {
                    (Some(u), _) => (vec![u.clone()], None),
                    (None, Some(gr)) => match self.groups.get(gr) {
                        Some((grp, _)) if live(&grp.expires) => {
                            (grp.members.clone(), Some(gr.clone()))
                        }
                        _ => continue,
                    },
                    _ => continue,
                };
                for u in users {
                    if u == pr.owner {
                        continue; // the owner has namespaceAdmin from the controller
                    }
                    if self
                        .researchers
                        .get(&u)
                        .is_some_and(|(r, _)| !live(&r.expires))
                    {
                        continue;
                    }
                    let expires = g
                        .expires
                        .as_deref()
                        .and_then(|d| parse_date(d).ok())
                        .or_else(|| {
                            group
                                .as_ref()
                                .and_then(|gr| self.groups.get(gr))
                                .and_then(|(grp, _)| grp.expires.as_deref())
                                .and_then(|d| parse_date(d).ok())
                        });
                    let a = Access {
                        user: u.clone(),
                        profile: pname.clone(),
                        role: g.role.clone(),
                        group: group.clone(),
                        expires,
                        reason: g.reason.clone(),
                        notebooks: g.notebooks.unwrap_or(true),
                    };
                    let key = (pname.clone(), u);
                    match out.get(&key) {
                        Some(old) if rank(&old.role) >= rank(&a.role) => {}
                        _ => {
                            out.insert(key, a);
                        }
                    }
                }
            }
        }
        out.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_follow_what_the_identity_provider_accepts() {
        for ok in [
            "alice@uni.edu",
            "o'neil@uni.edu",
            "a.b+c@mail.uni.edu",
            "x-@uni.edu",
            "a_b@x-y.org",
        ] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "alice@uni..edu",
            ".alice@uni.edu",
            "alice.@uni.edu",
            "a..b@uni.edu",
            "alice@-uni.edu",
            "alice@uni-.edu",
            "alice@localhost",
            "alice",
            "a@b@uni.edu",
            "al ice@uni.edu",
            "alice@uni.edu.",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
