//! The `kube` source: Kubernetes objects, read through the API with
//! discovery (CRDs included, as the cluster serves them) and paginated
//! lists, stored cleaned as one YAML file each in a tree
//! `<namespace or _cluster>/<group or core>/<Kind>/<name>.yaml`, so `labctl
//! ls` and path restores work on it. Restore applies them back with
//! server-side apply in dependency order, optionally into mapped
//! namespaces, and verifies what it applied.
//!
//! Contract (Kubernetes API conventions, apimachinery): discovery at
//! `/api`, `/api/v1`, `/apis`, `/apis/{group}/{version}`; lists take
//! `limit` and `continue`, and an expired `continue` token is `410 Gone`
//! (reason `Expired`): the list is started again. Server-side apply is
//! `PATCH` with `application/apply-patch+yaml` and a `fieldManager`; a
//! field another manager owns is `409 Conflict` unless forced. `401` is a
//! credential problem, `403` a missing RBAC verb (exit 5 either way).

use super::SourceContext;
use crate::error::LabError;
use crate::k8s::KubeTarget;
use crate::repo::backup::{BackupOutcome, BackupRun};
use crate::repo::snapshot::Source;
use crate::repo::tree::{ContentRef, NodeType};
use crate::repo::{Id, Repository};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The snapshot's `source.kind`.
pub const KIND: &str = "kube";
/// The top folder of cluster-scoped objects in a kube snapshot.
pub const CLUSTER_DIR: &str = "_cluster";
/// The folder of the core API group (whose name is empty).
pub const CORE_DIR: &str = "core";
/// The field manager of restores (server-side apply).
pub const FIELD_MANAGER: &str = "labctl-restore";
/// The annotation every restored object carries: the snapshot it came from.
pub const RESTORED_FROM: &str = "labctl.io/restored-from";
/// The label of namespaces a restore created (what a drill's cleanup removes).
pub const RESTORE_LABEL: &str = "labctl.io/restore";
/// The RBAC files shipped for backup and restore.
pub const BACKUP_RBAC: &str = "deploy/kubernetes/labctl-backup-rbac.yaml";
pub const RESTORE_RBAC: &str = "deploy/kubernetes/labctl-restore-rbac.yaml";

/// Objects per list page.
const PAGE: u32 = 500;
/// Times a list is started again after its `continue` token expired.
const RESTARTS: usize = 5;

/// `labctl backup kube` / `{ source = "kube", all_namespaces = true }`.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeSource {
    /// A namespace to back up (repeatable): its objects and its Namespace
    /// (and a Kubeflow Profile of the same name, which owns it).
    #[arg(long = "namespace", short = 'n', value_name = "NS")]
    #[serde(default)]
    pub namespace: Vec<String>,
    /// Every namespace (and every Namespace and Profile object).
    #[arg(long, short = 'A', conflicts_with = "namespace")]
    #[serde(default)]
    pub all_namespaces: bool,
    /// Only objects with these labels (`app=x,tier!=db,owner`).
    #[arg(long, short = 'l', value_name = "SELECTOR")]
    #[serde(default)]
    pub selector: Option<String>,
    /// Only these kinds (Kind, plural or plural.group; comma-separated).
    /// Naming a kind left out by default (events, leases, ...) brings it in.
    #[arg(long, value_delimiter = ',', value_name = "KINDS")]
    #[serde(default)]
    pub include_kinds: Vec<String>,
    /// Leave these kinds out (Kind, plural or plural.group; comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "KINDS")]
    #[serde(default)]
    pub exclude_kinds: Vec<String>,
    /// Also cluster-scoped objects: CRDs, ClusterRoles and their bindings,
    /// Profiles, StorageClasses, ...
    #[arg(long)]
    #[serde(default)]
    pub cluster_resources: bool,
    /// Kubeconfig file (default: labctl.toml's platform.kubeconfig,
    /// $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: labctl.toml's platform.kube_context,
    /// or the kubeconfig's current context).
    #[arg(long)]
    #[serde(default)]
    pub context: Option<String>,
}

/// Why objects are left out by default (kinds named in --include-kinds
/// come back). Resources matched by `(group, plural)`.
const LEFT_OUT: &[(&str, &str, &str)] = &[
    (
        "",
        "events",
        "events: a record of what happened, expiring after an hour",
    ),
    (
        "events.k8s.io",
        "events",
        "events: a record of what happened, expiring after an hour",
    ),
    (
        "",
        "endpoints",
        "endpoints: derived from Services by the endpoints controller",
    ),
    (
        "discovery.k8s.io",
        "endpointslices",
        "endpointslices: derived from Services by the endpointslice controller",
    ),
    (
        "coordination.k8s.io",
        "leases",
        "leases: leader election and node heartbeats, meaningless elsewhere",
    ),
    (
        "metrics.k8s.io",
        "pods",
        "pod metrics: live usage figures, not state",
    ),
    (
        "metrics.k8s.io",
        "nodes",
        "node metrics: live usage figures, not state",
    ),
];

/// Kinds whose controller-owned objects are recreated by the controller.
const OWNED_KINDS: &[(&str, &str)] = &[("", "pods"), ("apps", "replicasets"), ("batch", "jobs")];

impl KubeSource {
    /// Something must be selected; names must be DNS labels.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, _from_config: bool) -> Result<(), (String, String)> {
        if self.namespace.is_empty() && !self.all_namespaces && !self.cluster_resources {
            return Err((
                "namespace".into(),
                "say what to back up: namespace = [\"NS\", ...] (--namespace), all_namespaces = true (--all-namespaces) or cluster_resources = true (--cluster-resources)".into(),
            ));
        }
        if self.all_namespaces && !self.namespace.is_empty() {
            return Err((
                "all_namespaces".into(),
                "give namespaces or all_namespaces, not both".into(),
            ));
        }
        for n in &self.namespace {
            if !crate::k8s::validation::is_dns1123_label(n) {
                return Err((
                    "namespace".into(),
                    format!("'{n}' is not a namespace name (a DNS-1123 label)"),
                ));
            }
        }
        for k in self.include_kinds.iter().chain(&self.exclude_kinds) {
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err((
                    "include_kinds".into(),
                    format!("'{k}' is not a kind (Kind, plural or plural.group)"),
                ));
            }
        }
        Ok(())
    }

    /// The kubeconfig file, when one is named, must exist.
    ///
    /// # Errors
    /// A usage error naming the file.
    pub fn check_host(&self) -> Result<(), LabError> {
        if let Some(k) = &self.kubeconfig {
            if !k.is_file() {
                return Err(LabError::usage(format!(
                    "kubeconfig {} does not exist",
                    k.display()
                )));
            }
        }
        Ok(())
    }

    /// The source in words (for job listings).
    pub fn what(&self) -> String {
        let mut w = if self.all_namespaces {
            "all namespaces".to_string()
        } else if self.namespace.is_empty() {
            String::new()
        } else {
            format!("namespaces {}", self.namespace.join(","))
        };
        if self.cluster_resources {
            if !w.is_empty() {
                w.push_str(" + ");
            }
            w.push_str("cluster resources");
        }
        w
    }

    /// Fills the cluster from labctl.toml's `[platform]` when the table
    /// names none.
    pub fn with_default_target(&self, t: &KubeTarget) -> KubeSource {
        let KubeTarget {
            kubeconfig,
            context,
        } = self.target().or(t);
        KubeSource {
            kubeconfig,
            context,
            ..self.clone()
        }
    }

    fn target(&self) -> KubeTarget {
        KubeTarget {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        }
    }

    fn names_kind(list: &[String], r: &ApiResource) -> bool {
        list.iter().any(|k| {
            let k = k.to_ascii_lowercase();
            k == r.kind.to_ascii_lowercase()
                || k == r.plural
                || (!r.group.is_empty() && k == format!("{}.{}", r.plural, r.group))
                || (!r.group.is_empty()
                    && k == format!("{}.{}", r.kind.to_ascii_lowercase(), r.group))
        })
    }

    /// Whether a resource is read, or why not.
    fn select(&self, r: &ApiResource) -> Result<(), String> {
        let included = Self::names_kind(&self.include_kinds, r);
        if !self.include_kinds.is_empty() && !included {
            return Err("not in --include-kinds".into());
        }
        if Self::names_kind(&self.exclude_kinds, r) {
            return Err("in --exclude-kinds".into());
        }
        if !included {
            if let Some((_, _, why)) = LEFT_OUT
                .iter()
                .find(|(g, p, _)| *g == r.group && *p == r.plural)
            {
                return Err((*why).into());
            }
        }
        Ok(())
    }

    /// Reads the selected objects and stores them as one tree snapshot.
    ///
    /// # Errors
    /// An unreachable API server (exit 1), credentials refused or a
    /// missing RBAC verb (exit 5), storage errors: nothing is committed
    /// then. An API group that does not answer discovery is recorded in
    /// the snapshot's errors (a partial snapshot, exit 3).
    pub fn backup(&self, ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let read = rt.block_on(self.read_objects(ctx.cancel()))?;
        let mut run = BackupRun::start(ctx.repo, ctx.opts.threads, ctx.progress)?;
        run.set_cancel(ctx.opts.cancel.clone());
        let mut root = super::Folder::default();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for (path, obj) in &read.objects {
            let yaml = serde_norway::to_string(obj)?;
            root.insert(path, super::Leaf::Bytes(yaml.into_bytes()));
            *kinds.entry(kind_key(obj)).or_default() += 1;
        }
        let mtime = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let root_ids = root.store(&mut run, mtime)?;
        run.summary_mut().errors.extend(read.unavailable.clone());
        run.summary_mut().bytes_total = run.summary_mut().bytes_read;
        let mut opts = ctx.opts.clone();
        let facts = &mut opts.facts;
        facts.insert("kube.server".into(), json!(read.server));
        facts.insert("kube.server_version".into(), json!(read.version));
        facts.insert("kube.objects".into(), json!(read.objects.len()));
        facts.insert("kube.kinds".into(), json!(kinds));
        facts.insert("kube.namespaces".into(), json!(read.namespaces));
        facts.insert(
            "kube.cluster_resources".into(),
            json!(self.cluster_resources),
        );
        if let Some(s) = &self.selector {
            facts.insert("kube.selector".into(), json!(s));
        }
        facts.insert("kube.left_out".into(), json!(read.left_out));
        facts.insert("kube.kinds_left_out".into(), json!(read.kinds_left_out));
        facts.insert("kube.list_restarts".into(), json!(read.restarts));
        run.finish(
            Source {
                kind: KIND.into(),
                name: self.snapshot_name(),
            },
            root_ids,
            &opts,
            started,
        )
    }

    fn snapshot_name(&self) -> String {
        let mut n = if self.all_namespaces {
            "all-namespaces".to_string()
        } else {
            self.namespace.join(",")
        };
        if self.cluster_resources {
            if !n.is_empty() {
                n.push('+');
            }
            n.push_str(CLUSTER_DIR);
        }
        n
    }

    async fn read_objects(
        &self,
        cancel: Option<&crate::error::CancelFlag>,
    ) -> crate::error::Result<Read> {
        let (client, server) = self.target().connect().await?;
        let version = client
            .apiserver_version()
            .await
            .map_err(|e| api_error(e, &format!("the API server at {server}")))?;
        let resources = discover(&client, &server).await?;
        let mut read = Read {
            server: server.clone(),
            version: version.git_version,
            ..Default::default()
        };
        read.unavailable = resources.unavailable.clone();
        let mut left_out: BTreeMap<String, u64> = BTreeMap::new();
        // The namespaces' own objects (Namespace, and a Profile that owns it).
        let companions: BTreeSet<&str> = self.namespace.iter().map(String::as_str).collect();
        for (r, namespaced) in &resources.list {
            if let Some(c) = cancel {
                c.check()?;
            }
            if let Err(why) = self.select(r) {
                if !why.starts_with("not in") && !why.starts_with("in --") {
                    let key = if r.group.is_empty() {
                        r.plural.clone()
                    } else {
                        format!("{}.{}", r.plural, r.group)
                    };
                    read.kinds_left_out.insert(key, why);
                }
                continue;
            }
            let companion = !namespaced
                && ((r.group.is_empty() && r.plural == "namespaces")
                    || (r.group == "kubeflow.org" && r.plural == "profiles"));
            let scopes: Vec<Option<&str>> = if *namespaced {
                if self.all_namespaces {
                    vec![None]
                } else {
                    self.namespace.iter().map(|n| Some(n.as_str())).collect()
                }
            } else if self.cluster_resources || (companion && self.all_namespaces) {
                vec![None]
            } else if companion && !companions.is_empty() {
                // Fetched by name below.
                vec![]
            } else {
                continue;
            };
            let mut items = vec![];
            for scope in &scopes {
                let (mut got, restarts) =
                    list_all(&client, r, *scope, self.selector.as_deref()).await?;
                read.restarts += restarts;
                items.append(&mut got);
            }
            if companion && scopes.is_empty() {
                let api: Api<DynamicObject> = Api::all_with(client.clone(), r);
                for n in &companions {
                    if let Some(o) = api
                        .get_opt(n)
                        .await
                        .map_err(|e| api_error(e, &format!("reading {} {n}", r.kind)))?
                    {
                        items.push(serde_json::to_value(o)?);
                    }
                }
            }
            for mut obj in items {
                obj["apiVersion"] = json!(r.api_version);
                obj["kind"] = json!(r.kind);
                if let Some(why) = left_out_object(r, &obj, &self.include_kinds) {
                    *left_out.entry(why.into()).or_default() += 1;
                    continue;
                }
                clean(&mut obj);
                let ns = obj["metadata"]["namespace"].as_str().map(String::from);
                let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
                if let Some(n) = &ns {
                    read.namespaces.insert(n.clone());
                }
                let group = if r.group.is_empty() {
                    CORE_DIR
                } else {
                    &r.group
                };
                read.objects.insert(
                    vec![
                        ns.unwrap_or_else(|| CLUSTER_DIR.into()),
                        group.to_string(),
                        r.kind.clone(),
                        format!("{name}.yaml"),
                    ],
                    obj,
                );
            }
        }
        read.left_out = left_out;
        Ok(read)
    }
}

/// What a backup read.
#[derive(Default)]
struct Read {
    server: String,
    version: String,
    /// Path in the tree → cleaned object.
    objects: BTreeMap<Vec<String>, Value>,
    namespaces: BTreeSet<String>,
    left_out: BTreeMap<String, u64>,
    /// Resources not read at all (plural.group → why).
    kinds_left_out: BTreeMap<String, String>,
    unavailable: Vec<String>,
    restarts: usize,
}

fn kind_key(obj: &Value) -> String {
    let av = obj["apiVersion"].as_str().unwrap_or("");
    let kind = obj["kind"].as_str().unwrap_or("");
    match av.split_once('/') {
        Some((g, _)) => format!("{kind}.{g}"),
        None => kind.to_string(),
    }
}

/// Why one object is left out (controller-owned workloads, token Secrets,
/// the root CA bundle), unless its kind was asked for by name.
fn left_out_object(r: &ApiResource, obj: &Value, include: &[String]) -> Option<&'static str> {
    if KubeSource::names_kind(include, r) {
        return None;
    }
    let owned = obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|o| o["controller"] == true));
    if owned
        && OWNED_KINDS
            .iter()
            .any(|(g, p)| *g == r.group && *p == r.plural)
    {
        return Some(
            "pods, replicasets and jobs owned by a controller: the controller recreates them",
        );
    }
    if r.group.is_empty()
        && r.plural == "secrets"
        && obj["type"] == "kubernetes.io/service-account-token"
    {
        return Some(
            "service-account token Secrets: minted by the token controller for its own cluster",
        );
    }
    if r.group.is_empty()
        && r.plural == "configmaps"
        && obj["metadata"]["name"] == "kube-root-ca.crt"
    {
        return Some("kube-root-ca.crt: published into every namespace by the root CA publisher");
    }
    None
}

/// Removes what the server owns (identity, versions, times, field
/// managers, status); `ownerReferences` stay.
fn clean(obj: &mut Value) {
    if let Some(m) = obj["metadata"].as_object_mut() {
        for k in [
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
            "selfLink",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            m.remove(k);
        }
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
            if a.is_empty() {
                m.remove("annotations");
            }
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
}

/// The listable resources the cluster serves (each group's preferred
/// version), and the groups that did not answer.
struct Resources {
    list: Vec<(ApiResource, bool)>,
    unavailable: Vec<String>,
}

/// One served resource: how to address it, whether it is namespaced,
/// and its verbs.
struct Served {
    resource: ApiResource,
    namespaced: bool,
    verbs: Vec<String>,
}

/// Every top-level resource the cluster serves, from the core group and
/// each API group (its preferred version, or every version with
/// `all_versions`), and the groups that did not answer: an aggregated API
/// whose backend is down (503) must not stop the rest.
async fn served(
    client: &kube::Client,
    server: &str,
    all_versions: bool,
) -> crate::error::Result<(Vec<Served>, Vec<String>)> {
    let what = format!("discovery at {server}");
    let mut lists = vec![];
    let mut unavailable = vec![];
    let core = client
        .list_core_api_versions()
        .await
        .map_err(|e| api_error(e, &what))?;
    for v in &core.versions {
        let l = client
            .list_core_api_resources(v)
            .await
            .map_err(|e| api_error(e, &what))?;
        lists.push((String::new(), l));
    }
    let groups = client
        .list_api_groups()
        .await
        .map_err(|e| api_error(e, &what))?;
    for g in groups.groups {
        let preferred = g
            .preferred_version
            .as_ref()
            .map(|p| p.group_version.clone())
            .or_else(|| g.versions.first().map(|v| v.group_version.clone()));
        let versions: Vec<String> = if all_versions {
            g.versions.iter().map(|v| v.group_version.clone()).collect()
        } else {
            preferred.into_iter().collect()
        };
        for gv in versions {
            match client.list_api_group_resources(&gv).await {
                Ok(l) => lists.push((g.name.clone(), l)),
                Err(kube::Error::Api(e)) if e.code != 401 && e.code != 403 => unavailable.push(
                    format!("API group {gv} did not answer discovery: {}", e.message),
                ),
                Err(e) => return Err(api_error(e, &what)),
            }
        }
    }
    let mut out = vec![];
    for (group, l) in lists {
        let version = l
            .group_version
            .rsplit_once('/')
            .map_or_else(|| l.group_version.clone(), |(_, v)| v.to_string());
        // Subresources (`pods/log`) are not objects of their own.
        for r in l.resources.iter().filter(|r| !r.name.contains('/')) {
            out.push(Served {
                resource: ApiResource {
                    group: group.clone(),
                    version: version.clone(),
                    api_version: l.group_version.clone(),
                    kind: r.kind.clone(),
                    plural: r.name.clone(),
                },
                namespaced: r.namespaced,
                verbs: r.verbs.clone(),
            });
        }
    }
    Ok((out, unavailable))
}

/// What a backup reads: each group's preferred version of every resource
/// that can be listed and read.
async fn discover(client: &kube::Client, server: &str) -> crate::error::Result<Resources> {
    let (all, unavailable) = served(client, server, false).await?;
    let can = |s: &Served, verb: &str| s.verbs.iter().any(|v| v == verb);
    Ok(Resources {
        list: all
            .into_iter()
            .filter(|s| can(s, "list") && can(s, "get"))
            .map(|s| (s.resource, s.namespaced))
            .collect(),
        unavailable,
    })
}

/// Lists every object of `r` (in `ns`, or everywhere), page by page; an
/// expired `continue` token (410) starts the list again. Returns the items
/// and how many times it started again.
async fn list_all(
    client: &kube::Client,
    r: &ApiResource,
    ns: Option<&str>,
    selector: Option<&str>,
) -> crate::error::Result<(Vec<Value>, usize)> {
    let api: Api<DynamicObject> = match ns {
        Some(n) => Api::namespaced_with(client.clone(), n, r),
        None => Api::all_with(client.clone(), r),
    };
    let what = format!(
        "listing {}{}",
        r.plural,
        ns.map(|n| format!(" in namespace {n}")).unwrap_or_default()
    );
    let mut restarts = 0;
    'again: loop {
        let mut items = vec![];
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().limit(PAGE);
            if let Some(s) = selector {
                lp = lp.labels(s);
            }
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            match api.list(&lp).await {
                Ok(page) => {
                    for o in page.items {
                        items.push(serde_json::to_value(o)?);
                    }
                    token = page.metadata.continue_.filter(|t| !t.is_empty());
                    if token.is_none() {
                        return Ok((items, restarts));
                    }
                }
                Err(kube::Error::Api(e)) if e.code == 410 && restarts < RESTARTS => {
                    restarts += 1;
                    continue 'again;
                }
                Err(e) => return Err(api_error(e, &what)),
            }
        }
    }
}

/// A typed error for a Kubernetes API failure: credentials (401) and RBAC
/// (403) are key errors, the rest failures; `what` names the operation.
pub fn api_error(e: kube::Error, what: &str) -> crate::error::Error {
    match &e {
        kube::Error::Api(ae) if ae.code == 401 => LabError::key(format!(
            "{what}: the API server refused labctl's credentials (401 {}); check the kubeconfig's token or client certificate",
            ae.message
        ))
        .into(),
        kube::Error::Api(ae) if ae.code == 403 => LabError::key(format!(
            "{what}: forbidden by RBAC (403): {}; grant labctl's ClusterRole ({BACKUP_RBAC} for backup, {RESTORE_RBAC} for restore)",
            ae.message
        ))
        .into(),
        kube::Error::Api(ae) => LabError::failed(format!(
            "{what}: {} ({} {})",
            ae.message, ae.code, ae.reason
        ))
        .into(),
        _ => LabError::failed(format!("{what}: {e}")).into(),
    }
}

// ---------------------------------------------------------------- restore

/// What to do with an object that exists in the target cluster.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Existing {
    /// Leave it as it is (reported as "exists").
    #[default]
    Skip,
    /// Server-side apply the stored object over it; a field another
    /// manager owns with a different value is a conflict (reported, the
    /// object is not changed).
    Update,
}

/// `labctl restore SNAP --to-cluster ...`.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Kubernetes objects (kube snapshots)")]
pub struct KubeRestore {
    /// Apply a kube snapshot's objects to a cluster with server-side apply
    /// (field manager labctl-restore), in dependency order: CRDs (waiting
    /// until established), Namespaces, Profiles, ServiceAccounts, Roles,
    /// bindings, ConfigMaps and Secrets, PVCs, workloads, the rest. Owner
    /// references are re-linked to the restored owners. --path limits it
    /// to part of the tree (a namespace, a kind).
    #[arg(long)]
    pub to_cluster: bool,
    /// Restore namespace FROM as TO (repeatable; `*=*-staging` maps every
    /// namespace to NAME-staging). With a map, namespaces it does not name
    /// are skipped. Rewrites metadata.namespace, Namespace and Kubeflow
    /// Profile names, and ServiceAccount subjects of bindings.
    #[arg(
        long = "namespace-map",
        value_name = "FROM=TO",
        requires = "to_cluster"
    )]
    pub namespace_map: Vec<String>,
    /// An object that exists in the cluster: skip it, or update it.
    #[arg(long, value_enum, default_value_t = Existing::Skip, requires = "to_cluster")]
    pub existing: Existing,
    /// Leave cluster-scoped objects out (CRDs, ClusterRoles, StorageClasses,
    /// ...), except the Namespaces and Profiles of restored namespaces: for
    /// staging namespaces inside the production cluster.
    #[arg(long, requires = "to_cluster")]
    pub skip_cluster_resources: bool,
    #[command(flatten)]
    pub cluster: KubeTarget,
}

/// `FROM=TO` pairs; `*=*-suffix` (or `*=prefix-*`) maps every namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NamespaceMap(pub Vec<(String, String)>);

impl NamespaceMap {
    /// Parses `FROM=TO` pairs.
    ///
    /// # Errors
    /// A usage error naming the bad pair.
    pub fn parse(pairs: &[String]) -> crate::error::Result<NamespaceMap> {
        let mut out = vec![];
        for p in pairs {
            let Some((from, to)) = p.split_once('=') else {
                return Err(LabError::usage(format!(
                    "--namespace-map {p:?}: expected FROM=TO (for example nlp-lab=nlp-lab-staging, or *=*-staging)"
                ))
                .into());
            };
            let ok = |s: &str| {
                crate::k8s::validation::is_dns1123_label(&s.replacen('*', "x", 1))
                    && s.matches('*').count() <= 1
            };
            if !ok(from)
                || !ok(to)
                || (from == "*") != to.contains('*')
                || (from != "*" && from.contains('*'))
            {
                return Err(LabError::usage(format!(
                    "--namespace-map {p:?}: FROM and TO must be namespace names, or * and a pattern with one * (*=*-staging)"
                ))
                .into());
            }
            out.push((from.to_string(), to.to_string()));
        }
        Ok(NamespaceMap(out))
    }

    /// The namespace `ns` is restored as (`None`: not mapped, skipped).
    pub fn map(&self, ns: &str) -> Option<String> {
        if self.0.is_empty() {
            return Some(ns.to_string());
        }
        if let Some((_, to)) = self.0.iter().find(|(f, _)| f == ns) {
            return Some(to.clone());
        }
        self.0
            .iter()
            .find(|(f, _)| f == "*")
            .map(|(_, to)| to.replacen('*', ns, 1))
    }
}

/// One object's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectOutcome {
    pub api_version: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// create, update, exists, skip, failed (a dry run says what it would do).
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ObjectOutcome {
    /// `Kind ns/name`.
    pub fn label(&self) -> String {
        match &self.namespace {
            Some(n) => format!("{} {n}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// What a restore to a cluster did (or, dry, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KubeRestoreReport {
    pub server: String,
    pub dry_run: bool,
    /// Created (a dry run: would create).
    pub created: usize,
    /// Updated (a dry run: would update).
    pub updated: usize,
    pub skipped: usize,
    pub failed: usize,
    /// Objects read back equal to what was applied.
    pub verified: usize,
    /// Owner references re-linked to the restored owners' new UIDs.
    pub owner_links: usize,
    /// Namespaces this restore created (labelled labctl.io/restore).
    pub created_namespaces: Vec<String>,
    pub objects: Vec<ObjectOutcome>,
    pub seconds: f64,
    /// Of `seconds`, the time reading back took.
    pub verify_seconds: f64,
}

impl KubeRestoreReport {
    /// The failures, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter(|o| o.action == "failed")
            .map(|o| format!("{}: {}", o.label(), o.reason.as_deref().unwrap_or("")))
            .collect()
    }
}

/// The order objects are applied in (CRDs first, the rest last).
fn rank(obj: &Value) -> u8 {
    let av = obj["apiVersion"].as_str().unwrap_or("");
    let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    match (group, obj["kind"].as_str().unwrap_or("")) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 0,
        ("", "Namespace") => 1,
        ("kubeflow.org", "Profile") => 2,
        ("", "ServiceAccount") => 3,
        ("rbac.authorization.k8s.io", "ClusterRole" | "Role") => 4,
        ("rbac.authorization.k8s.io", "ClusterRoleBinding" | "RoleBinding") => 5,
        ("", "ConfigMap" | "Secret") => 6,
        ("", "PersistentVolumeClaim") => 7,
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job" | "CronJob")
        | ("", "Pod" | "ReplicationController") => 8,
        _ => 9,
    }
}

/// Reads every object (YAML file) of a kube snapshot under `include`
/// paths (all when empty).
///
/// # Errors
/// A snapshot that is not a kube snapshot (usage), storage, key and
/// integrity errors, a file that is not an object.
pub fn read_snapshot(
    repo: &Repository,
    id: &Id,
    include: &[String],
) -> crate::error::Result<Vec<Value>> {
    repo.keys.data_identity("restore")?;
    let (snap, chunks) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a {} snapshot, not a kube one: --to-cluster restores Kubernetes objects",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    repo.ensure_indexed(&chunks)?;
    let mut out = vec![];
    let mut stack = vec![(String::new(), snap.root.clone())];
    while let Some((prefix, root)) = stack.pop() {
        for node in repo.read_tree(&root)?.nodes {
            let path = if prefix.is_empty() {
                node.name.clone()
            } else {
                format!("{prefix}/{}", node.name)
            };
            let (take, descend) = crate::repo::extract::included(&path, include);
            match node.node_type {
                NodeType::Dir if descend || take => {
                    stack.push((path, node.subtree.clone().unwrap_or_default()));
                }
                NodeType::File if take => {
                    let mut data = Vec::with_capacity(node.size as usize);
                    for c in &node.content {
                        match c {
                            ContentRef::Chunk(cid) => data.extend(repo.read_blob(cid)?),
                            ContentRef::Zero { zero } => {
                                data.resize(data.len() + *zero as usize, 0);
                            }
                        }
                    }
                    let obj: Value = serde_norway::from_slice(&data).map_err(|e| {
                        LabError::integrity(format!(
                            "snapshot {}: {path} is not a Kubernetes object: {e}",
                            id.short()
                        ))
                    })?;
                    out.push(obj);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// An object prepared for the target: mapped, stripped of what the
/// cluster assigns, its owner references set aside.
#[derive(Debug)]
struct Prepared {
    obj: Value,
    owners: Vec<Value>,
    outcome: ObjectOutcome,
}

fn outcome(obj: &Value, action: &str, reason: Option<String>) -> ObjectOutcome {
    ObjectOutcome {
        api_version: obj["apiVersion"].as_str().unwrap_or("").into(),
        kind: obj["kind"].as_str().unwrap_or("").into(),
        namespace: obj["metadata"]["namespace"].as_str().map(String::from),
        name: obj["metadata"]["name"].as_str().unwrap_or("").into(),
        action: action.into(),
        reason,
    }
}

/// Maps one object into the target; `Err` is why it is skipped.
fn prepare(
    mut obj: Value,
    map: &NamespaceMap,
    snap: &str,
    skip_cluster: bool,
) -> Result<Prepared, (Value, String)> {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    let av = obj["apiVersion"].as_str().unwrap_or("").to_string();
    if kind == "PersistentVolume" && av == "v1" {
        return Err((
            obj,
            "PersistentVolumes are not restored: the PVC's storage class provisions a new one"
                .into(),
        ));
    }
    if let Some(ns) = obj["metadata"]["namespace"].as_str().map(String::from) {
        match map.map(&ns) {
            Some(to) => obj["metadata"]["namespace"] = json!(to),
            None => return Err((obj, format!("namespace {ns} is not in --namespace-map"))),
        }
    }
    let with_namespace = (kind == "Namespace" && av == "v1")
        || (kind == "Profile" && av.starts_with("kubeflow.org/"));
    if skip_cluster && obj["metadata"].get("namespace").is_none() && !with_namespace {
        return Err((
            obj,
            "cluster-scoped, left out (--skip-cluster-resources)".into(),
        ));
    }
    if with_namespace {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        match map.map(&name) {
            Some(to) => obj["metadata"]["name"] = json!(to),
            None => return Err((obj, format!("namespace {name} is not in --namespace-map"))),
        }
    }
    if av == "rbac.authorization.k8s.io/v1"
        && (kind == "RoleBinding" || kind == "ClusterRoleBinding")
    {
        if let Some(subjects) = obj["subjects"].as_array_mut() {
            for s in subjects {
                if let Some(ns) = s["namespace"].as_str().and_then(|n| map.map(n)) {
                    s["namespace"] = json!(ns);
                }
            }
        }
    }
    if kind == "Service" && av == "v1" {
        if let Some(spec) = obj["spec"].as_object_mut() {
            if spec.get("clusterIP").and_then(Value::as_str) != Some("None") {
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
            }
        }
    }
    if kind == "PersistentVolumeClaim" && av == "v1" {
        if let Some(spec) = obj["spec"].as_object_mut() {
            spec.remove("volumeName");
        }
        if let Some(a) = obj["metadata"]["annotations"].as_object_mut() {
            for k in [
                "pv.kubernetes.io/bind-completed",
                "pv.kubernetes.io/bound-by-controller",
                "volume.kubernetes.io/selected-node",
            ] {
                a.remove(k);
            }
        }
    }
    let mut owners = obj["metadata"]
        .as_object_mut()
        .and_then(|m| m.remove("ownerReferences"))
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    // An owning Profile was renamed with its namespace.
    for o in &mut owners {
        if o["kind"] == "Profile"
            && o["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("kubeflow.org/"))
        {
            if let Some(to) = o["name"].as_str().and_then(|n| map.map(n)) {
                o["name"] = json!(to);
            }
        }
    }
    let m = obj["metadata"]
        .as_object_mut()
        .expect("an object has metadata");
    m.entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .map(|a| a.insert(RESTORED_FROM.into(), json!(snap)));
    let out = outcome(&obj, "create", None);
    Ok(Prepared {
        obj,
        owners,
        outcome: out,
    })
}

/// The cluster's resources by (apiVersion, kind), every served version.
async fn resource_map(
    client: &kube::Client,
    server: &str,
) -> crate::error::Result<BTreeMap<(String, String), (ApiResource, bool)>> {
    let (all, _) = served(client, server, true).await?;
    Ok(all
        .into_iter()
        .map(|s| {
            (
                (s.resource.api_version.clone(), s.resource.kind.clone()),
                (s.resource, s.namespaced),
            )
        })
        .collect())
}

fn api_for(
    client: &kube::Client,
    r: &ApiResource,
    namespaced: bool,
    obj: &Value,
) -> Api<DynamicObject> {
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) if namespaced => Api::namespaced_with(client.clone(), ns, r),
        _ => Api::all_with(client.clone(), r),
    }
}

/// Whether every field of `want` is in `live` with the same value (lists
/// compared whole; the server may add fields and defaults).
fn contained(want: &Value, live: &Value) -> bool {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => w
            .iter()
            .all(|(k, v)| l.get(k).is_some_and(|lv| contained(v, lv))),
        (Value::Array(w), Value::Array(l)) => {
            w.len() == l.len() && w.iter().zip(l).all(|(a, b)| contained(a, b))
        }
        (w, l) => w == l,
    }
}

/// Applies a kube snapshot's objects to the cluster `target` (see
/// [`KubeRestore`]); with `dry_run`, reads the cluster and says what it
/// would do. One failed object does not stop the others.
///
/// # Errors
/// An unreachable cluster, credentials refused, a snapshot that cannot be
/// read; per-object failures are in the report.
pub fn restore(
    repo: &Repository,
    id: &Id,
    include: &[String],
    args: &KubeRestore,
    dry_run: bool,
) -> crate::error::Result<KubeRestoreReport> {
    let started = Instant::now();
    let map = NamespaceMap::parse(&args.namespace_map)?;
    let objects = read_snapshot(repo, id, include)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = rt.block_on(apply_all(
        &args.cluster,
        objects,
        &map,
        (args.existing, args.skip_cluster_resources),
        dry_run,
        &id.short(),
    ))?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn apply_all(
    target: &KubeTarget,
    objects: Vec<Value>,
    map: &NamespaceMap,
    (existing, skip_cluster): (Existing, bool),
    dry_run: bool,
    snap: &str,
) -> crate::error::Result<KubeRestoreReport> {
    let (client, server) = target.connect().await?;
    let mut report = KubeRestoreReport {
        server: server.clone(),
        dry_run,
        ..Default::default()
    };
    let mut prepared = vec![];
    for o in objects {
        match prepare(o, map, snap, skip_cluster) {
            Ok(p) => prepared.push(p),
            Err((o, why)) => report.objects.push(outcome(&o, "skip", Some(why))),
        }
    }
    prepared.sort_by_key(|p| {
        (
            rank(&p.obj),
            p.outcome.namespace.clone(),
            p.outcome.kind.clone(),
            p.outcome.name.clone(),
        )
    });
    // CRDs the snapshot brings: their kinds are served once established.
    let coming: BTreeSet<(String, String)> = prepared
        .iter()
        .filter(|p| rank(&p.obj) == 0)
        .flat_map(|p| {
            let g = p.obj["spec"]["group"].as_str().unwrap_or("").to_string();
            let kind = p.obj["spec"]["names"]["kind"]
                .as_str()
                .unwrap_or("")
                .to_string();
            p.obj["spec"]["versions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |v| {
                    v["name"]
                        .as_str()
                        .map(|v| (format!("{g}/{v}"), kind.clone()))
                })
        })
        .collect();
    let mut resources = resource_map(&client, &server).await?;
    let pp = PatchParams::apply(FIELD_MANAGER);
    let mut applied: Vec<(Value, Vec<Value>, ApiResource, bool)> = vec![];
    let mut crds = vec![];
    let mut crds_waited = false;
    for p in prepared {
        let Prepared {
            obj,
            owners,
            mut outcome,
        } = p;
        if rank(&obj) > 0 && !crds_waited {
            crds_waited = true;
            if !crds.is_empty() && !dry_run {
                wait_established(&client, &crds).await?;
                resources = resource_map(&client, &server).await?;
            }
        }
        let key = (outcome.api_version.clone(), outcome.kind.clone());
        let Some((r, namespaced)) = resources.get(&key).cloned() else {
            if dry_run && coming.contains(&key) {
                outcome.reason = Some("after its CRD is established".into());
                report.created += 1;
            } else {
                outcome.action = "failed".into();
                outcome.reason = Some(format!(
                    "the cluster does not serve {} {}",
                    outcome.api_version, outcome.kind
                ));
                report.failed += 1;
            }
            report.objects.push(outcome);
            continue;
        };
        let api = api_for(&client, &r, namespaced, &obj);
        let exists = match api.get_opt(&outcome.name).await {
            Ok(o) => o.is_some(),
            Err(e) => {
                outcome.action = "failed".into();
                outcome.reason = Some(format!("{:#}", api_error(e, "reading it")));
                report.failed += 1;
                report.objects.push(outcome);
                continue;
            }
        };
        if exists && existing == Existing::Skip {
            outcome.action = "exists".into();
            outcome.reason = Some("exists in the cluster (--existing skip)".into());
            report.skipped += 1;
            report.objects.push(outcome);
            continue;
        }
        outcome.action = if exists { "update" } else { "create" }.into();
        let mut body = obj.clone();
        if !exists && outcome.kind == "Namespace" && outcome.api_version == "v1" {
            body["metadata"]
                .as_object_mut()
                .expect("metadata")
                .entry("labels")
                .or_insert_with(|| json!({}))[RESTORE_LABEL] = json!(snap);
        }
        if dry_run {
            if exists {
                report.updated += 1;
            } else {
                report.created += 1;
            }
            report.objects.push(outcome);
            continue;
        }
        match api.patch(&outcome.name, &pp, &Patch::Apply(&body)).await {
            Ok(_) => {
                if exists {
                    report.updated += 1;
                } else {
                    report.created += 1;
                    if outcome.kind == "Namespace" && outcome.api_version == "v1" {
                        report.created_namespaces.push(outcome.name.clone());
                    }
                }
                if rank(&body) == 0 {
                    crds.push(outcome.name.clone());
                }
                applied.push((body, owners, r, namespaced));
            }
            Err(e) => {
                outcome.action = "failed".into();
                outcome.reason = Some(match &e {
                    kube::Error::Api(ae) if ae.code == 409 => format!(
                        "conflict: {} (another field manager owns it; the object was left as it is)",
                        ae.message
                    ),
                    _ => format!("{:#}", api_error(e, "applying it")),
                });
                report.failed += 1;
            }
        }
        report.objects.push(outcome);
    }
    if !crds_waited && !crds.is_empty() && !dry_run {
        wait_established(&client, &crds).await?;
    }
    if dry_run {
        return Ok(report);
    }
    // Owner references: the owners were restored with new UIDs.
    for (body, owners, r, namespaced) in &applied {
        if owners.is_empty() {
            continue;
        }
        let mut linked = vec![];
        for o in owners {
            let key = (
                o["apiVersion"].as_str().unwrap_or("").to_string(),
                o["kind"].as_str().unwrap_or("").to_string(),
            );
            let Some((or, ons)) = resources.get(&key) else {
                continue;
            };
            let oapi = api_for(&client, or, *ons, body);
            if let Ok(Some(live)) = oapi.get_opt(o["name"].as_str().unwrap_or("")).await {
                let mut o = o.clone();
                o["uid"] = json!(live.metadata.uid);
                linked.push(o);
            }
        }
        if linked.is_empty() {
            continue;
        }
        let n = linked.len();
        let mut b = body.clone();
        b["metadata"]["ownerReferences"] = Value::Array(linked);
        let api = api_for(&client, r, *namespaced, &b);
        let name = b["metadata"]["name"].as_str().unwrap_or("").to_string();
        if api.patch(&name, &pp, &Patch::Apply(&b)).await.is_ok() {
            report.owner_links += n;
        }
    }
    // Verify: read each applied object back.
    let vt = Instant::now();
    for (body, _, r, namespaced) in &applied {
        let api = api_for(&client, r, *namespaced, body);
        let name = body["metadata"]["name"].as_str().unwrap_or("");
        let mut want = body.clone();
        if let Some(m) = want["metadata"].as_object_mut() {
            m.retain(|k, _| ["name", "namespace", "labels", "annotations"].contains(&k.as_str()));
        }
        let ok = match api.get_opt(name).await {
            Ok(Some(live)) => contained(&want, &serde_json::to_value(live)?),
            _ => false,
        };
        if ok {
            report.verified += 1;
        } else if let Some(o) = report.objects.iter_mut().find(|o| {
            o.name == name
                && o.kind == r.kind
                && o.namespace.as_deref() == body["metadata"]["namespace"].as_str()
        }) {
            o.action = "failed".into();
            o.reason = Some("read back, it differs from what was applied".into());
            report.failed += 1;
        }
    }
    report.verify_seconds = vt.elapsed().as_secs_f64();
    Ok(report)
}

/// Deletes namespaces a restore created: only those that still carry the
/// [`RESTORE_LABEL`] (a namespace someone else made is never touched), and
/// the Kubeflow Profiles of the same name that the restore made.
/// Returns one line per namespace that could not be deleted.
///
/// # Errors
/// An unreachable cluster or credentials refused.
pub fn delete_restored_namespaces(
    target: &KubeTarget,
    names: &[String],
) -> crate::error::Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, _) = target.connect().await?;
        let api: Api<DynamicObject> =
            Api::all_with(client.clone(), &v1_resource("", "namespaces", "Namespace"));
        let profiles: Api<DynamicObject> =
            Api::all_with(client, &v1_resource("kubeflow.org", "profiles", "Profile"));
        let mut errors = vec![];
        for n in names {
            // A Profile the restore made owns the namespace: the profile
            // controller would recreate a namespace deleted under it, so
            // the Profile goes first (and takes its namespace with it).
            if let Ok(Some(p)) = profiles.get_opt(n).await {
                let ours = p
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(RESTORED_FROM));
                if ours {
                    if let Err(e) = profiles.delete(n, &Default::default()).await {
                        errors.push(format!("profile {n}: {:#}", api_error(e, "deleting it")));
                    }
                }
            }
            match api.get_opt(n).await {
                Ok(Some(ns)) => {
                    let ours = ns
                        .metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(RESTORE_LABEL));
                    if !ours {
                        errors.push(format!(
                            "namespace {n}: no {RESTORE_LABEL} label any more, left alone"
                        ));
                    } else if let Err(e) = api.delete(n, &Default::default()).await {
                        errors.push(format!("namespace {n}: {:#}", api_error(e, "deleting it")));
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(format!("namespace {n}: {:#}", api_error(e, "reading it"))),
            }
        }
        Ok(errors)
    })
}

/// A resource of version `v1` of `group` (the core group when empty), for
/// the fixed kinds restores and cleanups address without discovery.
pub(crate) fn v1_resource(group: &str, plural: &str, kind: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: if group.is_empty() {
            "v1".into()
        } else {
            format!("{group}/v1")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Waits (up to a minute) until each CRD reports `Established`.
async fn wait_established(client: &kube::Client, names: &[String]) -> crate::error::Result<()> {
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &v1_resource(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in names {
        loop {
            let crd = api
                .get(n)
                .await
                .map_err(|e| api_error(e, &format!("reading CRD {n}")))?;
            let established = crd.data["status"]["conditions"]
                .as_array()
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(LabError::failed(format!(
                    "CRD {n} was not established within a minute; its custom resources were not restored"
                ))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_maps_rename_exactly_or_by_pattern() {
        let m = NamespaceMap::parse(&["nlp-lab=nlp-staging".into(), "*=*-staging".into()]).unwrap();
        assert_eq!(m.map("nlp-lab").as_deref(), Some("nlp-staging"));
        assert_eq!(m.map("vision").as_deref(), Some("vision-staging"));
        let only = NamespaceMap::parse(&["a=b".into()]).unwrap();
        assert_eq!(only.map("c"), None);
        assert_eq!(NamespaceMap::default().map("c").as_deref(), Some("c"));
        for bad in ["a", "a=B", "*=b", "a=*-x", "a*=b*", "*=**"] {
            assert!(NamespaceMap::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn prepare_rewrites_namespaces_bindings_and_drops_assigned_fields() {
        let m = NamespaceMap::parse(&["*=*-staging".into()]).unwrap();
        let rb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "x", "namespace": "nlp", "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "Profile", "name": "nlp", "uid": "old"}]},
            "subjects": [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "nlp"}, {"kind": "User", "name": "a@b"}]});
        let p = prepare(rb, &m, "abcd", false).unwrap();
        assert_eq!(p.obj["metadata"]["namespace"], "nlp-staging");
        assert_eq!(p.obj["subjects"][0]["namespace"], "nlp-staging");
        assert!(p.obj["subjects"][1].get("namespace").is_none());
        assert!(p.obj["metadata"].get("ownerReferences").is_none());
        assert_eq!(p.owners.len(), 1);
        assert_eq!(p.obj["metadata"]["annotations"][RESTORED_FROM], "abcd");
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "nlp"}, "spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "ports": []}});
        let p = prepare(svc, &m, "abcd", false).unwrap();
        assert!(
            p.obj["spec"].get("clusterIP").is_none() && p.obj["spec"].get("clusterIPs").is_none()
        );
        let headless = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "h", "namespace": "nlp"}, "spec": {"clusterIP": "None"}});
        assert_eq!(
            prepare(headless, &m, "x", false).unwrap().obj["spec"]["clusterIP"],
            "None"
        );
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d", "namespace": "nlp", "annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": "pvc-1"}});
        let p = prepare(pvc, &m, "x", false).unwrap();
        assert!(p.obj["spec"].get("volumeName").is_none());
        assert!(p.obj["metadata"]["annotations"]
            .get("pv.kubernetes.io/bind-completed")
            .is_none());
        let prof = json!({"apiVersion": "kubeflow.org/v1", "kind": "Profile", "metadata": {"name": "nlp"}, "spec": {"owner": {"kind": "User", "name": "a@b"}}});
        assert_eq!(
            prepare(prof, &m, "x", false).unwrap().obj["metadata"]["name"],
            "nlp-staging"
        );
        let pv =
            json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv"}});
        assert!(prepare(pv, &m, "x", false).is_err());
        let only = NamespaceMap::parse(&["a=b".into()]).unwrap();
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "z"}});
        assert!(prepare(cm, &only, "x", false)
            .unwrap_err()
            .1
            .contains("not in --namespace-map"));
    }

    #[test]
    fn clean_keeps_owner_references_and_drops_server_fields() {
        let mut o = json!({"apiVersion": "v1", "kind": "ConfigMap", "status": {}, "metadata": {"name": "c", "uid": "u", "resourceVersion": "1", "generation": 2, "creationTimestamp": "t", "managedFields": [], "ownerReferences": [{"name": "o"}], "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}});
        clean(&mut o);
        assert_eq!(
            o,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "ownerReferences": [{"name": "o"}]}})
        );
    }

    #[test]
    fn ranks_follow_dependencies() {
        let k = |av: &str, kind: &str| rank(&json!({"apiVersion": av, "kind": kind}));
        assert!(k("apiextensions.k8s.io/v1", "CustomResourceDefinition") < k("v1", "Namespace"));
        assert!(k("v1", "Namespace") < k("v1", "ServiceAccount"));
        assert!(
            k("rbac.authorization.k8s.io/v1", "Role")
                < k("rbac.authorization.k8s.io/v1", "RoleBinding")
        );
        assert!(k("v1", "Secret") < k("v1", "PersistentVolumeClaim"));
        assert!(k("v1", "PersistentVolumeClaim") < k("apps/v1", "StatefulSet"));
        assert!(k("apps/v1", "Deployment") < k("kubeflow.org/v1", "Notebook"));
    }
}
