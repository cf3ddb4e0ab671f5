//! The `vm` source: a Proxmox VE VM, as `vzdump --stdout` streams it on
//! its node over SSH (the API refuses stdout), uncompressed so the fixed
//! chunker deduplicates night over night; its config (read through the
//! API) goes into the snapshot's facts. Restore streams the snapshot into
//! `qmrestore - NEWID --unique 1` on a node, then sets the network bridge
//! through the API (staging networks are isolated) and leaves the VM
//! stopped unless asked; verify compares the restored VM's config with the
//! backup's.
//!
//! Contract (PLATFORM.md, qemu-server): `vzdump <vmid> --mode snapshot
//! --stdout --compress 0`; `qmrestore - <vmid> --unique 1 [--storage S]`
//! refuses a VMID that exists; `GET /cluster/resources?type=vm`, `GET|PUT
//! /nodes/{node}/qemu/{vmid}/config` (with `digest`), `POST .../status/start`.

use super::stream::CommandReader;
use super::SourceContext;
use crate::error::LabError;
use crate::proxmox::platform::Platform;
use crate::proxmox::{Client, Ctx, PveError};
use crate::repo::backup::BackupOutcome;
use crate::repo::backup::ChunkerChoice;
use crate::repo::{Id, Repository};
use serde_json::Value;
use std::path::PathBuf;

/// The snapshot's `source.kind`.
pub const KIND: &str = "vm";

/// The platform file's default place.
pub const DEFAULT_PLATFORM: &str = "/etc/labctl/platform.yaml";

/// `labctl backup vm` / `{ source = "vm", vm = "controlador" }`.
#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSource {
    /// The VM: its name on the cluster (or in the platform file), or its
    /// VMID. On the command line several may be given: they are backed up
    /// one after another as one restore point. In labctl.toml, one per
    /// source table (list several tables for a point).
    #[arg(value_name = "NAME|VMID", required = true, num_args = 1..)]
    #[serde(deserialize_with = "one_vm")]
    pub vm: Vec<String>,
    /// The platform file: the PVE API endpoint and token, and `ssh:` (user,
    /// key file, pinned known_hosts) for the nodes.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_PLATFORM)]
    #[serde(default = "default_platform")]
    pub platform: PathBuf,
    /// Chunker: auto and fixed cut the uncompressed archive in fixed-size
    /// chunks (zero runs elided), which deduplicate a disk night over
    /// night; cdc for archives whose content shifts.
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default)]
    pub chunker: ChunkerChoice,
}

fn one_vm<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v: String = serde::Deserialize::deserialize(d)?;
    Ok(vec![v])
}

fn default_platform() -> PathBuf {
    DEFAULT_PLATFORM.into()
}

/// The config keys kept in the facts (what verify compares, and what an
/// operator wants to see); cloud-init secrets are never among them.
const CONFIG_KEYS: &[&str] = &[
    "name", "cores", "sockets", "cpu", "memory", "scsihw", "ostype", "agent", "onboot", "boot",
    "machine", "bios", "tags",
];

fn keep_key(k: &str) -> bool {
    let disk_or_net = [
        "scsi", "virtio", "sata", "ide", "net", "efidisk", "tpmstate",
    ]
    .iter()
    .any(|p| k.strip_prefix(p).is_some_and(|n| n.parse::<u32>().is_ok()));
    CONFIG_KEYS.contains(&k) || disk_or_net
}

impl VmSource {
    /// The VM must be named; the platform file is checked when used.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn validate(&self, _from_config: bool) -> Result<(), (String, String)> {
        if self.vm.is_empty() {
            return Err(("vm".into(), "name a VM".into()));
        }
        for v in &self.vm {
            if v.is_empty() || v.contains(char::is_whitespace) {
                return Err(("vm".into(), format!("'{v}' is not a VM name or VMID")));
            }
        }
        Ok(())
    }

    /// One source per VM (the command line's `backup vm a b c`).
    pub fn each(&self) -> Vec<VmSource> {
        self.vm
            .iter()
            .map(|v| VmSource {
                vm: vec![v.clone()],
                ..self.clone()
            })
            .collect()
    }

    /// The platform file and its SSH key and known_hosts (for `config
    /// validate --host`).
    ///
    /// # Errors
    /// The first problem.
    pub fn check_host(&self) -> Result<(), LabError> {
        let p = crate::proxmox::platform::load(&self.platform)
            .map_err(|e| LabError::usage(e.to_string()))?;
        let ssh = ssh_of(&p)?;
        crate::proxmox::ssh::command(ssh, "check", &[]).map(|_| ())
    }

    /// Streams `vzdump` of the VM from its node into one snapshot.
    ///
    /// # Errors
    /// A VM that does not exist (exit 2), a host key that does not match
    /// or a key refused (exit 5), a node that cannot be reached, vzdump
    /// failing or a stream cut short (exit 1): nothing is committed then.
    pub fn backup(&self, mut ctx: SourceContext<'_>) -> crate::error::Result<BackupOutcome> {
        let [spec] = self.vm.as_slice() else {
            return Err(LabError::usage(
                "one VM per snapshot: back up several as a restore point (one source each)",
            )
            .into());
        };
        let platform = crate::proxmox::platform::load(&self.platform)?;
        let ssh = ssh_of(&platform)?.clone();
        let rt = crate::util::runtime()?;
        let (vm, config) = rt.block_on(async {
            let pve = crate::proxmox::platform::connect(&platform).await?;
            let vm = find_vm(&pve, &platform, spec).await?;
            let config = vm_config(&pve, &vm).await?;
            Ok::<_, crate::error::Error>((vm, config))
        })?;
        let remote: Vec<String> = [
            "vzdump",
            &vm.vmid.to_string(),
            "--mode",
            "snapshot",
            "--stdout",
            "--compress",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let argv = crate::proxmox::ssh::command(&ssh, &vm.node, &remote)?;
        let cancel = ctx.cancel().cloned().unwrap_or_default();
        let reader = CommandReader::spawn(&argv, &cancel)?;
        let facts = &mut ctx.opts.facts;
        facts.insert("vm.vmid".into(), vm.vmid.into());
        facts.insert("vm.node".into(), vm.node.clone().into());
        facts.insert("vm.name".into(), vm.name.clone().into());
        facts.insert("vm.format".into(), "vzdump-vma-uncompressed".into());
        facts.insert("vm.config".into(), Value::Object(config));
        let chunker = match self.chunker {
            ChunkerChoice::Cdc => ChunkerChoice::Cdc,
            _ => ChunkerChoice::Fixed,
        };
        super::stream::backup_stream_as(
            ctx.repo,
            KIND,
            &vm.name,
            &format!("vzdump-qemu-{}.vma", vm.vmid),
            reader,
            chunker,
            &ctx.opts,
            ctx.progress,
        )
        .map_err(|e| {
            if e.is_cancelled() {
                return e;
            }
            let msg = format!("{e:#}");
            if crate::proxmox::ssh::is_ssh_error(&msg) {
                let said = msg
                    .split("exit status: 255: ")
                    .nth(1)
                    .unwrap_or(&msg)
                    .to_string();
                crate::proxmox::ssh::classify(&vm.node, &said).into()
            } else {
                LabError::failed(format!(
                    "backing up VM {} ({}) on node {}, nothing was committed: {msg}",
                    vm.vmid, vm.name, vm.node
                ))
                .into()
            }
        })
    }
}

fn ssh_of(p: &Platform) -> Result<&crate::proxmox::platform::SshConfig, LabError> {
    p.ssh.as_ref().ok_or_else(|| {
        LabError::usage(format!(
            "{} has no `ssh:` section: VM backups and restores run vzdump and qmrestore on the nodes over SSH",
            p.path.display()
        ))
    })
}

/// A VM as the cluster lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveVm {
    pub vmid: u32,
    pub name: String,
    pub node: String,
}

async fn cluster_vms(pve: &Client) -> crate::error::Result<Vec<LiveVm>> {
    let v = pve
        .get(
            "/cluster/resources",
            &[("type", "vm".into())],
            &Ctx::default(),
        )
        .await
        .map_err(PveError::into_lab)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["type"] == "qemu")
        .filter_map(|r| {
            Some(LiveVm {
                vmid: r["vmid"].as_u64()? as u32,
                name: r["name"].as_str().unwrap_or("").to_string(),
                node: r["node"].as_str()?.to_string(),
            })
        })
        .collect())
}

/// The VM `spec` names: a VMID, a name on the cluster, or a name in the
/// platform file.
async fn find_vm(pve: &Client, platform: &Platform, spec: &str) -> crate::error::Result<LiveVm> {
    let vms = cluster_vms(pve).await?;
    let by_platform = platform.vms.iter().find(|v| v.name == spec).map(|v| v.vmid);
    let found = vms.into_iter().find(|v| {
        spec.parse::<u32>().ok() == Some(v.vmid) || v.name == spec || by_platform == Some(v.vmid)
    });
    found.ok_or_else(|| {
        LabError::usage(format!(
            "VM {spec} does not exist on the cluster (GET /cluster/resources lists no such VMID or name)"
        ))
        .into()
    })
}

async fn vm_config(
    pve: &Client,
    vm: &LiveVm,
) -> crate::error::Result<serde_json::Map<String, Value>> {
    let c = pve
        .get(
            &format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid),
            &[],
            &Ctx::vm(&vm.node, vm.vmid),
        )
        .await
        .map_err(PveError::into_lab)?;
    Ok(c.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| keep_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// `labctl restore SNAP --to-vm ...`: where a VM snapshot goes.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "VM snapshots")]
pub struct VmRestore {
    /// Restore a VM snapshot as a new VM (qmrestore over SSH on --node,
    /// --unique 1: new MAC addresses), then set its bridge and leave it
    /// stopped.
    #[arg(long)]
    pub to_vm: bool,
    /// The node to restore on.
    #[arg(long, value_name = "NODE", requires = "to_vm")]
    pub node: Option<String>,
    /// The new VM's ID (refused when it exists or is outside --vmid-range).
    #[arg(long, value_name = "VMID", requires = "to_vm")]
    pub vmid: Option<u32>,
    /// The VMIDs a restore may use, FIRST-LAST (a staging range).
    #[arg(long, value_name = "FIRST-LAST", requires = "to_vm")]
    pub vmid_range: Option<String>,
    /// The storage for the disks (default: as in the backup).
    #[arg(long, value_name = "STORAGE", requires = "to_vm")]
    pub storage: Option<String>,
    /// Put every network interface on this bridge (an isolated staging
    /// network); default: as in the backup.
    #[arg(long, value_name = "BRIDGE", requires = "to_vm")]
    pub bridge: Option<String>,
    /// Start the VM after the restore and wait (up to 5 min) for its guest
    /// agent to report an address (default: left stopped).
    #[arg(long, requires = "to_vm")]
    pub start: bool,
    /// The platform file (PVE API and `ssh:`).
    #[arg(long = "platform", value_name = "FILE", default_value = DEFAULT_PLATFORM)]
    pub platform: PathBuf,
}

/// How long a started VM's guest agent may take to answer.
const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What a VM restore did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmRestoreReport {
    pub vmid: u32,
    pub node: String,
    pub bytes: u64,
    pub bridge: Option<String>,
    pub started: bool,
    /// What verification compared.
    pub verified: String,
}

/// Parses `FIRST-LAST`.
///
/// # Errors
/// A usage error.
pub fn parse_range(s: &str) -> Result<(u32, u32), LabError> {
    let bad = || LabError::usage(format!("'{s}' is not a VMID range like 9701-9703"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 100 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// A node, storage or bridge name as PVE writes them (also what goes into
/// the remote command line).
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Restores a VM snapshot as VM `args.vmid` on `args.node`, sets its
/// bridge, verifies its config against the backup's, and starts it when
/// asked.
///
/// # Errors
/// A snapshot of another kind, a VMID that exists or is outside the range
/// (exit 6), qmrestore failing (a full storage, a stream cut short: exit
/// 1, and no VM is left behind by qmrestore), host key trouble (exit 5),
/// a config that does not match (exit 4).
pub fn restore(
    repo: &Repository,
    id: &Id,
    args: &VmRestore,
    threads: usize,
) -> crate::error::Result<VmRestoreReport> {
    let (snap, _) = repo.load_snapshot(id)?;
    if snap.source.kind != KIND {
        return Err(LabError::usage(format!(
            "snapshot {} is a '{}' snapshot, not a VM",
            id.short(),
            snap.source.kind
        ))
        .into());
    }
    let node = args
        .node
        .clone()
        .ok_or_else(|| LabError::usage("--to-vm needs --node NODE"))?;
    let vmid = args
        .vmid
        .ok_or_else(|| LabError::usage("--to-vm needs --vmid VMID (the new VM's ID)"))?;
    if let Some(r) = &args.vmid_range {
        let (a, b) = parse_range(r)?;
        if !(a..=b).contains(&vmid) {
            return Err(LabError::refused(format!(
                "VMID {vmid} is outside the allowed range {a}-{b}; nothing was restored"
            ))
            .into());
        }
    }
    for (what, v) in [("--storage", &args.storage), ("--bridge", &args.bridge)] {
        if let Some(v) = v {
            if !is_name(v) {
                return Err(LabError::usage(format!(
                    "{what} '{v}' is not a storage or bridge name"
                ))
                .into());
            }
        }
    }
    if !is_name(&node) {
        return Err(LabError::usage(format!("--node '{node}' is not a node name")).into());
    }
    let platform = crate::proxmox::platform::load(&args.platform)?;
    let ssh = ssh_of(&platform)?.clone();
    let rt = crate::util::runtime()?;
    let pve = rt.block_on(crate::proxmox::platform::connect(&platform))?;
    if let Some(v) = rt
        .block_on(cluster_vms(&pve))?
        .into_iter()
        .find(|v| v.vmid == vmid)
    {
        return Err(LabError::refused(format!(
            "VMID {vmid} exists ({} on node {}): restore into a free VMID; nothing was restored",
            v.name, v.node
        ))
        .into());
    }
    let mut remote = vec![
        "qmrestore".to_string(),
        "-".into(),
        vmid.to_string(),
        "--unique".into(),
        "1".into(),
    ];
    if let Some(s) = &args.storage {
        remote.extend(["--storage".into(), s.clone()]);
    }
    let argv = crate::proxmox::ssh::command(&ssh, &node, &remote)?;
    let bytes = pipe_into(repo, id, &argv, &node, threads)?;
    // The restored VM, through the API.
    let path = format!("/nodes/{node}/qemu/{vmid}/config");
    let ctx = Ctx::vm(&node, vmid);
    let verified = rt.block_on(async {
        let conf = pve
            .get(&path, &[], &ctx)
            .await
            .map_err(PveError::into_lab)?;
        if let Some(bridge) = &args.bridge {
            let mut params: Vec<(&str, String)> = vec![];
            let nets: Vec<(String, String)> = conf
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("net") && k[3..].parse::<u32>().is_ok())
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            for (k, v) in &nets {
                let new: Vec<String> = v
                    .split(',')
                    .map(|p| {
                        if p.starts_with("bridge=") {
                            format!("bridge={bridge}")
                        } else {
                            p.to_string()
                        }
                    })
                    .collect();
                params.push((k.as_str(), new.join(",")));
            }
            if !params.is_empty() {
                params.push(("digest", conf["digest"].as_str().unwrap_or("").to_string()));
                pve.call(reqwest::Method::PUT, &path, &params, &ctx)
                    .await
                    .map_err(PveError::into_lab)?;
            }
        }
        let after = pve
            .get(&path, &[], &ctx)
            .await
            .map_err(PveError::into_lab)?;
        let mut verified = compare_config(&snap.facts, &after, args)?;
        if args.start {
            pve.task(
                reqwest::Method::POST,
                &format!("/nodes/{node}/qemu/{vmid}/status/start"),
                &[],
                &ctx,
            )
            .await
            .map_err(PveError::into_lab)?;
            // Booted means the guest agent answers with an address; a VM
            // without an agent can only be seen running.
            let agent = after["agent"]
                .as_str()
                .map(str::to_string)
                .or_else(|| after["agent"].as_i64().map(|n| n.to_string()))
                .unwrap_or_default();
            if agent.starts_with('1') || agent.contains("enabled=1") {
                let ips = crate::proxmox::wait_agent(&pve, &node, vmid, AGENT_TIMEOUT)
                    .await
                    .map_err(PveError::into_lab)?;
                verified.push_str(&format!(
                    "; started, the guest agent answered ({})",
                    ips.join(", ")
                ));
            } else {
                verified.push_str("; started (no guest agent configured to wait for)");
            }
        }
        Ok::<_, crate::error::Error>(verified)
    })?;
    Ok(VmRestoreReport {
        vmid,
        node,
        bytes,
        bridge: args.bridge.clone(),
        started: args.start,
        verified,
    })
}

/// The VMIDs the cluster has now, with their node (for a restore plan's
/// dry run and refusals).
///
/// # Errors
/// The platform file's, connection and API errors.
pub fn existing_vmids(
    platform: &std::path::Path,
) -> crate::error::Result<std::collections::BTreeMap<u32, String>> {
    let p = crate::proxmox::platform::load(platform)?;
    let rt = crate::util::runtime()?;
    rt.block_on(async {
        let pve = crate::proxmox::platform::connect(&p).await?;
        Ok(cluster_vms(&pve)
            .await?
            .into_iter()
            .map(|v| (v.vmid, v.node))
            .collect())
    })
}

/// Destroys a VM a restore created (drill cleanup): stops it if it runs,
/// then deletes it with its disks.
///
/// # Errors
/// API errors.
pub fn destroy(platform: &std::path::Path, node: &str, vmid: u32) -> crate::error::Result<()> {
    let p = crate::proxmox::platform::load(platform)?;
    let rt = crate::util::runtime()?;
    rt.block_on(async {
        let pve = crate::proxmox::platform::connect(&p).await?;
        let ctx = Ctx::vm(node, vmid);
        let status = pve
            .get(
                &format!("/nodes/{node}/qemu/{vmid}/status/current"),
                &[],
                &ctx,
            )
            .await
            .map_err(PveError::into_lab)?;
        if status["status"] == "running" {
            pve.task(
                reqwest::Method::POST,
                &format!("/nodes/{node}/qemu/{vmid}/status/stop"),
                &[],
                &ctx,
            )
            .await
            .map_err(PveError::into_lab)?;
        }
        pve.task(
            reqwest::Method::DELETE,
            &format!("/nodes/{node}/qemu/{vmid}"),
            &[
                ("purge", "1".into()),
                ("destroy-unreferenced-disks", "1".into()),
            ],
            &ctx,
        )
        .await
        .map_err(PveError::into_lab)?;
        Ok(())
    })
}

/// Streams the snapshot's archive into qmrestore on `node` (`argv` is
/// the ssh command).
fn pipe_into(
    repo: &Repository,
    id: &Id,
    argv: &[String],
    node: &str,
    threads: usize,
) -> crate::error::Result<u64> {
    let fed = super::stream::feed_command(repo, id, argv, threads)?;
    if crate::proxmox::ssh::is_ssh_error(&fed.last_line) {
        return Err(crate::proxmox::ssh::classify(node, &fed.last_line).into());
    }
    if !fed.status.success() {
        return Err(LabError::failed(format!(
            "qmrestore on node {node} failed ({}): {}",
            fed.status, fed.last_line
        ))
        .into());
    }
    fed.written
}

/// Compares the restored VM's config with the backup's facts: cores,
/// sockets, memory and each disk's slot and size (storage and VMID in the
/// volume name may be remapped; MACs are new with --unique; the bridge is
/// what the restore set).
fn compare_config(
    facts: &std::collections::BTreeMap<String, Value>,
    after: &Value,
    args: &VmRestore,
) -> crate::error::Result<String> {
    let before = facts
        .get("vm.config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let size_of = |v: &str| {
        v.split(',')
            .find_map(|p| p.strip_prefix("size="))
            .map(str::to_string)
    };
    let mut problems = vec![];
    let mut checked = vec![];
    for (k, v) in &before {
        let got = after.get(k).map(text);
        let want = text(v);
        let is_disk = ["scsi", "virtio", "sata", "efidisk"]
            .iter()
            .any(|p| k.strip_prefix(p).is_some_and(|n| n.parse::<u32>().is_ok()))
            && !want.contains("media=cdrom");
        if ["cores", "sockets", "memory"].contains(&k.as_str()) {
            checked.push(k.clone());
            if got.as_deref() != Some(want.as_str()) {
                problems.push(format!("{k} is {got:?}, the backup's is {want}"));
            }
        } else if is_disk {
            checked.push(k.clone());
            match &got {
                None => problems.push(format!("disk {k} is missing")),
                Some(g) if size_of(g) != size_of(&want) => problems.push(format!(
                    "disk {k} has size {:?}, the backup's {:?}",
                    size_of(g),
                    size_of(&want)
                )),
                _ => {}
            }
        } else if k.starts_with("net") && k[3..].parse::<u32>().is_ok() {
            checked.push(k.clone());
            match (&got, &args.bridge) {
                (None, _) => problems.push(format!("network {k} is missing")),
                (Some(g), Some(b)) if !g.split(',').any(|p| p == format!("bridge={b}")) => {
                    problems.push(format!("network {k} is not on bridge {b}: {g}"))
                }
                _ => {}
            }
        }
    }
    if !problems.is_empty() {
        return Err(LabError::integrity(format!(
            "the restored VM's config does not match the backup's: {}",
            problems.join("; ")
        ))
        .into());
    }
    Ok(format!(
        "config matches the backup's ({})",
        checked.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_kept_keys() {
        assert_eq!(parse_range("9701-9703").unwrap(), (9701, 9703));
        assert!(parse_range("9703-9701").is_err());
        assert!(parse_range("x").is_err());
        assert!(keep_key("scsi0") && keep_key("net1") && keep_key("cores"));
        assert!(!keep_key("cipassword") && !keep_key("sshkeys") && !keep_key("scsihw2"));
    }
}
