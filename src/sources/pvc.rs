//! The `pvc` source: the data of PersistentVolumeClaims provisioned by
//! Rancher's local-path provisioner, read from the node's disk. Each bound
//! claim resolves (through the API) to its PersistentVolume, whose
//! `spec.hostPath.path` or `spec.local.path` is a directory on the node
//! that `spec.nodeAffinity` names; a claim on this node is backed up as a
//! tree snapshot `pvc/<namespace>/<name>` whose facts keep the claim's
//! spec, the volume, node, storage class and capacity. A claim on another
//! node is left to the agent on that node (`deploy/kubernetes/
//! labctl-agent.yaml`, a DaemonSet); unbound claims and volumes of other
//! types (CSI, NFS, ...) are reported by name and type.
//!
//! Restore: `--target DIR` (any tree restore), or `--to-pvc NS/NAME`, which
//! creates the claim from the stored spec and runs a Job (labctl's image,
//! the claim mounted) that restores into it, and waits for the Job.
//!
//! Contract: local-path-provisioner creates `hostPath` volumes (or `local`
//! ones, with `nodePath` configs) with `nodeAffinity` on
//! `kubernetes.io/hostname`; Kubernetes API for claims, volumes, Secrets
//! and Jobs (`batch/v1`: `status.succeeded`, `status.failed`, conditions
//! `Complete` and `Failed`).

use super::kube::{api_error, v1_resource, FIELD_MANAGER};
use super::SourceContext;
use crate::error::LabError;
use crate::k8s::KubeTarget;
use crate::repo::backup::{BackupOutcome, ChunkerChoice};
use crate::repo::{Id, Repository};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The snapshot's `source.kind`.
pub const KIND: &str = "pvc";
/// The node label local-path's volumes are pinned with.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// `labctl backup pvc` / `{ source = "pvc", all = true }`.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PvcSource {
    /// Only claims in this namespace.
    #[arg(long, short = 'n', value_name = "NS")]
    #[serde(default)]
    pub namespace: Option<String>,
    /// These claims (repeatable; needs --namespace).
    #[arg(long = "name", value_name = "PVC", requires = "namespace")]
    #[serde(default)]
    pub name: Vec<String>,
    /// Every claim (of --namespace, or of the cluster) on this node.
    #[arg(long)]
    #[serde(default)]
    pub all: bool,
    /// This node's name, as Kubernetes knows it (default: $NODE_NAME, set
    /// from the downward API in the agent DaemonSet, else the host name).
    #[arg(long, value_name = "NODE")]
    #[serde(default)]
    pub node: Option<String>,
    /// Kubeconfig file (default: labctl.toml's platform.kubeconfig,
    /// $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    #[serde(default)]
    pub context: Option<String>,
    /// A claim already resolved to its directory (one snapshot).
    #[arg(skip)]
    #[serde(skip)]
    pub resolved: Option<Resolved>,
}

/// One claim on this node: where its data is, and what the snapshot
/// records about it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub namespace: String,
    pub name: String,
    pub dir: PathBuf,
    pub facts: Vec<(String, Value)>,
}

impl PvcSource {
    /// Something must be selected.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, _from_config: bool) -> Result<(), (String, String)> {
        if !self.all && self.name.is_empty() {
            return Err((
                "all".into(),
                "say which claims: all = true (--all, optionally with a namespace) or namespace and name (--namespace N --name PVC)".into(),
            ));
        }
        if self.all && !self.name.is_empty() {
            return Err(("name".into(), "give names or all, not both".into()));
        }
        if !self.name.is_empty() && self.namespace.is_none() {
            return Err(("namespace".into(), "names need their namespace".into()));
        }
        for n in self.namespace.iter().chain(&self.name) {
            if !crate::k8s::validation::is_dns1123_subdomain(n) {
                return Err(("name".into(), format!("'{n}' is not a Kubernetes name")));
            }
        }
        Ok(())
    }

    /// The kubeconfig file, when one is named, must exist.
    ///
    /// # Errors
    /// A usage error naming it.
    pub fn check_host(&self) -> Result<(), LabError> {
        match &self.kubeconfig {
            Some(k) if !k.is_file() => Err(LabError::usage(format!(
                "kubeconfig {} does not exist",
                k.display()
            ))),
            _ => Ok(()),
        }
    }

    /// The source in words.
    pub fn what(&self) -> String {
        if let Some(r) = &self.resolved {
            return format!("pvc {}/{}", r.namespace, r.name);
        }
        match (&self.namespace, self.all) {
            (Some(n), true) => format!("every PVC of {n} on this node"),
            (None, _) => "every PVC on this node".into(),
            (Some(n), false) => format!("PVCs {n}/{}", self.name.join(",")),
        }
    }

    /// Fills the cluster from labctl.toml's `[platform]`.
    pub fn with_default_target(&self, t: &KubeTarget) -> PvcSource {
        let KubeTarget {
            kubeconfig,
            context,
        } = self.target().or(t);
        PvcSource {
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

    /// This node's name.
    pub fn this_node(&self) -> String {
        self.node
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// Resolves the selection into one source per claim on this node, and
    /// notes on the claims left out (another node's, unbound, of an
    /// unsupported volume type).
    ///
    /// # Errors
    /// An unreachable cluster, credentials or RBAC refused (exit 5), a
    /// named claim that does not exist (exit 2).
    pub fn expand(&self) -> crate::error::Result<(Vec<PvcSource>, Vec<String>)> {
        if self.resolved.is_some() {
            return Ok((vec![self.clone()], vec![]));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(self.resolve())
    }

    async fn resolve(&self) -> crate::error::Result<(Vec<PvcSource>, Vec<String>)> {
        let (client, server) = self.target().connect().await?;
        let node = self.this_node();
        let pvcs: Api<DynamicObject> = match &self.namespace {
            Some(n) => Api::namespaced_with(
                client.clone(),
                n,
                &v1_resource("", "persistentvolumeclaims", "PersistentVolumeClaim"),
            ),
            None => Api::all_with(
                client.clone(),
                &v1_resource("", "persistentvolumeclaims", "PersistentVolumeClaim"),
            ),
        };
        let pvs: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &v1_resource("", "persistentvolumes", "PersistentVolume"),
        );
        let mut claims = vec![];
        if self.name.is_empty() {
            let list = pvcs
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, &format!("listing PVCs at {server}")))?;
            claims.extend(list.items);
        } else {
            for n in &self.name {
                match pvcs
                    .get_opt(n)
                    .await
                    .map_err(|e| api_error(e, &format!("reading PVC {n}")))?
                {
                    Some(c) => claims.push(c),
                    None => {
                        return Err(LabError::usage(format!(
                            "PVC {}/{n} does not exist",
                            self.namespace.as_deref().unwrap_or("")
                        ))
                        .into())
                    }
                }
            }
        }
        let mut out = vec![];
        let mut notes = vec![];
        for c in claims {
            let ns = c.metadata.namespace.clone().unwrap_or_default();
            let name = c.metadata.name.clone().unwrap_or_default();
            let who = format!("PVC {ns}/{name}");
            let Some(pv_name) = c.data["spec"]["volumeName"]
                .as_str()
                .filter(|_| c.data["status"]["phase"] == "Bound")
            else {
                notes.push(format!(
                    "{who}: not bound to a volume (phase {}), nothing to back up",
                    c.data["status"]["phase"].as_str().unwrap_or("unknown")
                ));
                continue;
            };
            let Some(pv) = pvs
                .get_opt(pv_name)
                .await
                .map_err(|e| api_error(e, &format!("reading PersistentVolume {pv_name}")))?
            else {
                notes.push(format!("{who}: its volume {pv_name} does not exist"));
                continue;
            };
            let spec = &pv.data["spec"];
            let (path, vtype) = if let Some(p) = spec["hostPath"]["path"].as_str() {
                (p, "hostPath")
            } else if let Some(p) = spec["local"]["path"].as_str() {
                (p, "local")
            } else {
                let kind = spec
                    .as_object()
                    .and_then(|o| {
                        [
                            "csi",
                            "nfs",
                            "iscsi",
                            "rbd",
                            "cephfs",
                            "awsElasticBlockStore",
                            "gcePersistentDisk",
                            "azureDisk",
                            "fc",
                        ]
                        .iter()
                        .find(|k| o.contains_key(**k))
                    })
                    .map(|k| match spec["csi"]["driver"].as_str() {
                        Some(d) if *k == "csi" => format!("csi (driver {d})"),
                        _ => (*k).to_string(),
                    })
                    .unwrap_or_else(|| "unknown".into());
                notes.push(format!("{who}: volume {pv_name} is of type {kind}, which labctl does not read (only hostPath and local volumes, as local-path provisions)"));
                continue;
            };
            let pv_node = node_of(spec);
            match &pv_node {
                Some(n) if *n != node => {
                    notes.push(format!(
                        "{who}: belongs to node {n} (its agent backs it up), not this node {node}"
                    ));
                    continue;
                }
                None => {
                    notes.push(format!("{who}: volume {pv_name} names no node ({HOSTNAME_LABEL} affinity); not read from here"));
                    continue;
                }
                _ => {}
            }
            let mut kept = c.data["spec"].clone();
            if let Some(o) = kept.as_object_mut() {
                o.retain(|k, _| {
                    ["accessModes", "resources", "storageClassName", "volumeMode"]
                        .contains(&k.as_str())
                });
            }
            let facts = vec![
                ("pvc.namespace".to_string(), json!(ns)),
                ("pvc.name".into(), json!(name)),
                ("pvc.spec".into(), kept),
                (
                    "pvc.labels".into(),
                    json!(c.metadata.labels.clone().unwrap_or_default()),
                ),
                ("pvc.volume".into(), json!(pv_name)),
                ("pvc.volume_type".into(), json!(vtype)),
                ("pvc.node".into(), json!(pv_node)),
                ("pvc.storage_class".into(), spec["storageClassName"].clone()),
                ("pvc.capacity".into(), spec["capacity"]["storage"].clone()),
                ("pvc.path".into(), json!(path)),
            ];
            out.push(PvcSource {
                namespace: Some(ns.clone()),
                name: vec![name.clone()],
                all: false,
                resolved: Some(Resolved {
                    namespace: ns,
                    name,
                    dir: PathBuf::from(path),
                    facts,
                }),
                ..self.clone()
            });
        }
        Ok((out, notes))
    }

    /// Backs up one claim's directory (a resolved source, or a selection
    /// that resolves to exactly one claim on this node).
    ///
    /// # Errors
    /// A claim not on this node or not readable here (the reason), a
    /// directory that does not exist; read errors of files are listed in
    /// the snapshot (exit 3) as for any tree.
    pub fn backup(&self, mut ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        let one = match &self.resolved {
            Some(_) => self.clone(),
            None => {
                let (mut list, notes) = self.expand()?;
                if list.len() != 1 {
                    return Err(LabError::usage(format!(
                        "{} resolves to {} claims on this node; back them up as a restore point (labctl backup pvc does){}",
                        self.what(),
                        list.len(),
                        if notes.is_empty() { String::new() } else { format!(": {}", notes.join("; ")) }
                    ))
                    .into());
                }
                list.remove(0)
            }
        };
        let r = one.resolved.as_ref().expect("resolved");
        if !r.dir.is_dir() {
            return Err(LabError::failed(format!(
                "PVC {}/{}: its directory {} is not on this host (is the local-path directory mounted here?)",
                r.namespace,
                r.name,
                r.dir.display()
            ))
            .into());
        }
        for (k, v) in &r.facts {
            ctx.opts.facts.insert(k.clone(), v.clone());
        }
        super::path::backup_tree_as(
            ctx,
            &r.dir,
            KIND,
            &format!("pvc/{}/{}", r.namespace, r.name),
            ChunkerChoice::Auto,
        )
    }
}

/// The node a volume's `nodeAffinity` pins it to (`kubernetes.io/hostname
/// In [node]`, as local-path writes it).
fn node_of(spec: &Value) -> Option<String> {
    spec["nodeAffinity"]["required"]["nodeSelectorTerms"]
        .as_array()?
        .iter()
        .flat_map(|t| {
            t["matchExpressions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|e| e["key"] == HOSTNAME_LABEL && e["operator"] == "In")
        .and_then(|e| e["values"][0].as_str().map(String::from))
}

// ---------------------------------------------------------------- restore

/// `labctl restore SNAP --to-pvc NS/NAME` (the cluster: --kubeconfig,
/// --context).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "PVC data (pvc snapshots)")]
pub struct PvcRestore {
    /// Create the claim NS/NAME from the snapshot's stored spec and restore
    /// the data into it with a Job running labctl's image (the claim
    /// mounted at /data); wait for the Job. An existing claim is refused.
    /// The Job reads the repository with the restore key, passed in a
    /// Secret that lives only while the Job runs.
    #[arg(long, value_name = "NS/NAME")]
    pub to_pvc: Option<String>,
    /// The new claim's storage class (default: the stored one).
    #[arg(long, value_name = "CLASS", requires = "to_pvc")]
    pub storage_class: Option<String>,
    /// labctl's container image for the Job (deploy/container/Containerfile).
    #[arg(long, value_name = "IMAGE", requires = "to_pvc", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// How long to wait for the Job.
    #[arg(
        long,
        value_name = "DURATION",
        requires = "to_pvc",
        default_value = "2h"
    )]
    pub job_timeout: String,
    /// Restore into a claim a restore of Kubernetes objects just created
    /// (restore plans: the kube step makes the claims, this one fills them).
    #[arg(skip)]
    pub adopt_restored: bool,
}

/// The image the shipped manifests use.
pub const DEFAULT_IMAGE: &str = concat!(
    "registry.example.edu/lab/labctl:",
    env!("CARGO_PKG_VERSION")
);

/// What a restore into a claim did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PvcRestoreReport {
    pub namespace: String,
    pub pvc: String,
    pub storage_class: Option<String>,
    pub job: String,
    pub outcome: String,
    pub seconds: f64,
    /// What needs a person (a Secret that could not be deleted).
    pub warnings: Vec<String>,
}

/// The repository the Job reads, and the key it reads it with.
pub struct JobAccess<'a> {
    pub repo_url: &'a str,
    pub restore_key: &'a Path,
}

/// The Job that restores snapshot `snap` into claim `pvc` (also used by
/// tests and docs to show its shape).
pub fn restore_job(ns: &str, job: &str, pvc: &str, secret: &str, image: &str, snap: &str) -> Value {
    let env: Vec<Value> = std::iter::once(json!({"name": "LABCTL_RESTORE_KEY", "value": "/keys/restore.key"}))
        .chain(JOB_ENV.iter().map(|k| {
            json!({"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": true}}})
        }))
        .chain(std::iter::once(json!({"name": "LABCTL_CACHE_DIR", "value": "/tmp/labctl-cache"})))
        .collect();
    let hardened = json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}});
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job, "namespace": ns, "labels": {"app.kubernetes.io/name": "labctl", super::kube::RESTORE_LABEL: snap}},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "labctl", super::kube::RESTORE_LABEL: snap}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "initContainers": [{
                        "name": "private-key",
                        "image": image,
                        "command": ["sh", "-c", "install -m 0600 /secret/restore.key /keys/restore.key"],
                        "securityContext": hardened,
                        "volumeMounts": [{"name": "secret", "mountPath": "/secret", "readOnly": true}, {"name": "keys", "mountPath": "/keys"}]
                    }],
                    "containers": [{
                        "name": "restore",
                        "image": image,
                        "args": ["restore", snap, "--target", "/data", "--overwrite"],
                        "env": env,
                        "securityContext": hardened,
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data"},
                            {"name": "keys", "mountPath": "/keys", "readOnly": true},
                            {"name": "tmp", "mountPath": "/tmp"}
                        ]
                    }],
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": pvc}},
                        {"name": "secret", "secret": {"secretName": secret, "defaultMode": 0o440}},
                        {"name": "keys", "emptyDir": {"medium": "Memory"}},
                        {"name": "tmp", "emptyDir": {}}
                    ]
                }
            }
        }
    })
}

/// The variables of this process the Job gets (through its Secret).
const JOB_ENV: &[&str] = &[
    "LABCTL_REPO",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
];

/// Restores snapshot `id` into a new claim as `args` says.
///
/// # Errors
/// Not a pvc snapshot or a bad NS/NAME (exit 2); a claim that exists
/// (exit 6); a repository the cluster cannot reach (a local path, exit 2);
/// the cluster refusing; the Job failing or timing out (exit 1, the claim
/// it filled is deleted).
pub fn restore_to_pvc(
    repo: &Repository,
    id: &Id,
    args: &PvcRestore,
    cluster: &KubeTarget,
    access: &JobAccess<'_>,
) -> crate::error::Result<PvcRestoreReport> {
    let started = Instant::now();
    let target = args.to_pvc.as_deref().expect("--to-pvc given");
    let (ns, name) = target
        .split_once('/')
        .filter(|(n, p)| {
            crate::k8s::validation::is_dns1123_label(n)
                && crate::k8s::validation::is_dns1123_subdomain(p)
        })
        .ok_or_else(|| LabError::usage(format!("--to-pvc {target:?}: expected NAMESPACE/NAME")))?;
    let timeout = crate::util::units::parse_duration(&args.job_timeout)
        .map_err(|e| LabError::usage(format!("--job-timeout: {}", e.message())))?;
    let (snap, _) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a {} snapshot; --to-pvc restores pvc snapshots (use --target DIR for any tree)",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    if !access.repo_url.starts_with("s3://") {
        return Err(LabError::usage(format!(
            "--to-pvc runs the restore in the cluster, which cannot reach the repository {}: use an s3:// repository (or --target DIR here)",
            access.repo_url
        ))
        .into());
    }
    let mut spec = snap
        .facts
        .get("pvc.spec")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(c) = &args.storage_class {
        spec["storageClassName"] = json!(c);
    }
    let key = crate::util::secret::read_private(access.restore_key)?;
    let short = id.short();
    let job = format!("labctl-restore-{}", &short);
    let secret = job.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, _) = cluster.connect().await?;
        let pp = PatchParams::apply(FIELD_MANAGER);
        let claims: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &v1_resource("", "persistentvolumeclaims", "PersistentVolumeClaim"));
        // A claim that exists is refused, unless a restore plan's Kubernetes
        // step created it a moment ago (it carries the restored-from
        // annotation and holds nothing yet): then the data goes into it.
        let adopted = match claims.get_opt(name).await.map_err(|e| api_error(e, &format!("reading PVC {target}")))? {
            Some(c)
                if args.adopt_restored
                    && c.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(super::kube::RESTORED_FROM)) =>
            {
                true
            }
            Some(_) => {
                return Err(LabError::refused(format!("PVC {target} exists: restore into a new claim (or into a directory with --target); nothing was changed")).into())
            }
            None => false,
        };
        let secrets: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &v1_resource("", "secrets", "Secret"));
        let jobs: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &v1_resource("batch", "jobs", "Job"));
        let mut string_data = serde_json::Map::new();
        string_data.insert("restore.key".into(), json!(String::from_utf8_lossy(&key)));
        for k in JOB_ENV {
            let v = if *k == "LABCTL_REPO" { Some(access.repo_url.to_string()) } else { std::env::var(k).ok() };
            if let Some(v) = v {
                string_data.insert((*k).into(), json!(v));
            }
        }
        let labels = json!({"app.kubernetes.io/name": "labctl", super::kube::RESTORE_LABEL: short});
        let secret_obj = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": ns, "labels": labels}, "type": "Opaque", "stringData": string_data});
        secrets.patch(&secret, &pp, &Patch::Apply(&secret_obj)).await.map_err(|e| api_error(e, &format!("creating Secret {ns}/{secret}")))?;
        // The restore key must not outlive the Job: a Secret that cannot
        // be deleted is said, with the command that removes it.
        let cleanup_secret = || async {
            secrets
                .delete(&secret, &Default::default())
                .await
                .err()
                .map(|e| {
                    format!(
                        "the Secret {ns}/{secret} holding the restore key could not be deleted ({:#}): delete it now (kubectl delete secret -n {ns} {secret})",
                        api_error(e, "deleting it")
                    )
                })
        };
        let mut claim_labels = snap.facts.get("pvc.labels").cloned().unwrap_or_else(|| json!({}));
        claim_labels[super::kube::RESTORE_LABEL] = json!(short);
        let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "labels": claim_labels, "annotations": {super::kube::RESTORED_FROM: short}},
            "spec": spec});
        if !adopted {
            if let Err(e) = claims.patch(name, &pp, &Patch::Apply(&claim)).await {
                let _ = cleanup_secret().await;
                return Err(api_error(e, &format!("creating PVC {target}")));
            }
        }
        let job_obj = restore_job(ns, &job, name, &secret, &args.image, &id.hex());
        if let Err(e) = jobs.patch(&job, &pp, &Patch::Apply(&job_obj)).await {
            let _ = cleanup_secret().await;
            if !adopted {
                let _ = claims.delete(name, &Default::default()).await;
            }
            return Err(api_error(e, &format!("creating Job {ns}/{job}")));
        }
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            let j = jobs.get(&job).await.map_err(|e| api_error(e, &format!("reading Job {ns}/{job}")))?;
            let st = &j.data["status"];
            let cond = |t: &str| {
                st["conditions"].as_array().and_then(|c| {
                    c.iter().find(|c| c["type"] == t && c["status"] == "True").map(|c| {
                        c["message"].as_str().or(c["reason"].as_str()).unwrap_or("").to_string()
                    })
                })
            };
            if st["succeeded"].as_u64().unwrap_or(0) > 0 || cond("Complete").is_some() {
                break Ok(());
            }
            if let Some(m) = cond("Failed") {
                break Err(format!("Job {ns}/{job} failed: {m}"));
            }
            if st["failed"].as_u64().unwrap_or(0) > 0 {
                break Err(format!("Job {ns}/{job} failed (see `kubectl logs -n {ns} job/{job}`)"));
            }
            if Instant::now() > deadline {
                break Err(format!("Job {ns}/{job} did not finish within {}", args.job_timeout));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let lingering = cleanup_secret().await;
        if let Err(why) = outcome {
            let claim_gone = if adopted {
                format!("the claim {target} (made by this restore's Kubernetes step) holds a partial restore")
            } else {
                match claims.delete(name, &Default::default()).await {
                    Ok(_) => format!("the half-filled claim {target} was deleted"),
                    Err(e) => format!("the half-filled claim {target} could not be deleted ({:#})", api_error(e, "deleting it")),
                }
            };
            return Err(LabError::failed(format!(
                "{why}; {claim_gone}{}",
                lingering.map(|l| format!("; {l}")).unwrap_or_default()
            ))
            .into());
        }
        Ok(PvcRestoreReport {
            namespace: ns.to_string(),
            pvc: name.to_string(),
            storage_class: spec["storageClassName"].as_str().map(String::from),
            job,
            outcome: "restored".into(),
            seconds: started.elapsed().as_secs_f64(),
            warnings: lingering.into_iter().collect(),
        })
    })
}

/// Deletes claims a restore created (only those still labelled
/// `labctl.io/restore`); returns what could not be deleted.
///
/// # Errors
/// An unreachable cluster or credentials refused.
pub fn delete_restored_claims(
    cluster: &KubeTarget,
    claims: &[String],
) -> crate::error::Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, _) = cluster.connect().await?;
        let mut errors = vec![];
        for c in claims {
            let Some((ns, name)) = c.split_once('/') else {
                continue;
            };
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                ns,
                &v1_resource("", "persistentvolumeclaims", "PersistentVolumeClaim"),
            );
            match api.get_opt(name).await {
                Ok(Some(o))
                    if o.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(super::kube::RESTORE_LABEL)) =>
                {
                    if let Err(e) = api.delete(name, &Default::default()).await {
                        errors.push(format!("PVC {c}: {:#}", api_error(e, "deleting it")));
                    }
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("PVC {c}: {:#}", api_error(e, "reading it"))),
            }
        }
        Ok(errors)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_path_volume_names_its_node() {
        let spec = json!({"hostPath": {"path": "/opt/local-path-provisioner/pvc-1_ns_x"}, "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["nodo1"]}]}]}}});
        assert_eq!(node_of(&spec).as_deref(), Some("nodo1"));
        assert_eq!(node_of(&json!({})), None);
    }

    #[test]
    fn the_restore_job_mounts_the_claim_and_keeps_the_key_private() {
        let j = restore_job("ns", "labctl-restore-ab12", "data", "sec", "img:1", "abcd");
        let pod = &j["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data"
        );
        assert_eq!(
            pod["containers"][0]["args"],
            json!(["restore", "abcd", "--target", "/data", "--overwrite"])
        );
        assert_eq!(pod["restartPolicy"], "Never");
        assert!(pod["initContainers"][0]["command"][2]
            .as_str()
            .unwrap()
            .contains("-m 0600"));
    }
}
