//! `labctl provision`: the platform's VMs on Proxmox VE, declaratively.
//!
//! `plan` compares `deploy/platform.yaml` with `/cluster/resources` and each
//! VM's config: create, update (field: old → new), unchanged, or a conflict
//! (the VMID belongs to a VM labctl does not manage, a disk would shrink, the
//! VM sits on another node). `apply` executes the plan, VMs in parallel up
//! to `proxmox.parallelism`; one VM failing does not stop the others.
//! Every VM labctl creates carries the tag `labctl-managed`; only such VMs
//! are updated or destroyed.

pub mod bootstrap;
/// The platform file lives beside the PVE client (sources read it too).
pub use crate::proxmox::platform;

use crate::proxmox::{Client, Ctx, PveError};
use platform::{Platform, Vm, MANAGED_TAG};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// A VM as `/cluster/resources` lists it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LiveVm {
    /// `qemu` for a VM, `lxc` for a container (VMIDs are shared by both).
    pub kind: String,
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub status: String,
    pub tags: BTreeSet<String>,
    pub pool: Option<String>,
    pub template: bool,
}

/// One field to change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub old: String,
    pub new: String,
}

/// What `apply` would do to one VM.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Step {
    Create {
        name: String,
        vmid: u32,
        node: String,
    },
    Update {
        name: String,
        vmid: u32,
        node: String,
        changes: Vec<Change>,
        /// Config keys to set (PVE names and values).
        #[serde(skip)]
        set: Vec<(String, String)>,
        /// Disks to grow: slot → absolute size.
        #[serde(skip)]
        grow: Vec<(String, String)>,
        #[serde(skip)]
        digest: Option<String>,
        start: bool,
        /// Fields of `changes` that a running VM takes only when it
        /// restarts (PVE keeps them in the config's pending section).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        needs_reboot: Vec<String>,
        /// Values already written but pending until the VM restarts
        /// (`GET …/pending`, and `GET …/cloudinit` for the cloud-init drive).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        pending: Vec<Change>,
        /// Whether apply reboots the VM for them (`reboot_policy:
        /// when-needed` or `apply --reboot`).
        reboot: bool,
    },
    Unchanged {
        name: String,
        vmid: u32,
        node: String,
    },
    /// Cannot be applied; `reason` says what to fix.
    Conflict {
        name: String,
        vmid: u32,
        reason: String,
    },
}

impl Step {
    pub fn name(&self) -> &str {
        match self {
            Step::Create { name, .. }
            | Step::Update { name, .. }
            | Step::Unchanged { name, .. }
            | Step::Conflict { name, .. } => name,
        }
    }
}

/// The plan for the whole platform.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Managed VMs the platform file no longer lists (left alone; `destroy` removes them).
    pub orphans: Vec<LiveVm>,
}

impl Plan {
    pub fn conflicts(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Conflict { .. }))
            .collect()
    }
    pub fn is_noop(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s, Step::Unchanged { .. }))
    }
}

pub use crate::proxmox::platform::connect;

fn tags_of(v: &Value) -> BTreeSet<String> {
    v.as_str()
        .unwrap_or("")
        .split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// Lists the cluster's guests: VMs and containers (one VMID space:
/// `/cluster/resources` `type` `qemu` or `lxc`).
///
/// # Errors
/// PVE errors.
pub async fn live_vms(c: &Client) -> Result<BTreeMap<u32, LiveVm>, PveError> {
    let v = c
        .get(
            "/cluster/resources",
            &[("type", "vm".into())],
            &Ctx::default(),
        )
        .await?;
    let mut out = BTreeMap::new();
    for r in v.as_array().cloned().unwrap_or_default() {
        let kind = r.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "qemu" && kind != "lxc" {
            continue;
        }
        let vmid = r.get("vmid").and_then(Value::as_u64).unwrap_or(0) as u32;
        out.insert(
            vmid,
            LiveVm {
                kind: kind.into(),
                vmid,
                name: r.get("name").and_then(Value::as_str).unwrap_or("").into(),
                node: r.get("node").and_then(Value::as_str).unwrap_or("").into(),
                status: r.get("status").and_then(Value::as_str).unwrap_or("").into(),
                tags: tags_of(r.get("tags").unwrap_or(&Value::Null)),
                pool: r.get("pool").and_then(Value::as_str).map(String::from),
                template: r.get("template").and_then(Value::as_u64) == Some(1),
            },
        );
    }
    Ok(out)
}

fn s(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => u8::from(*b).to_string(),
        _ => String::new(),
    }
}

/// Parses a PVE property string into (positional, key → value).
fn prop(v: &str) -> (String, BTreeMap<String, String>) {
    let mut first = String::new();
    let mut map = BTreeMap::new();
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, val)) => {
                map.insert(k.to_string(), val.to_string());
            }
            None if i == 0 => first = part.to_string(),
            None => {}
        }
    }
    (first, map)
}

/// The config values labctl sets, as PVE stores them.
pub fn desired_config(vm: &Vm) -> Vec<(String, String)> {
    let mut v = vec![
        ("cores".to_string(), vm.cores.to_string()),
        ("sockets".to_string(), vm.sockets.to_string()),
        ("cpu".to_string(), vm.cpu.clone()),
        ("memory".to_string(), vm.memory_mib.to_string()),
        ("scsihw".to_string(), vm.scsihw.clone()),
        ("onboot".to_string(), u8::from(vm.onboot).to_string()),
        ("agent".to_string(), u8::from(vm.agent).to_string()),
        (
            "tags".to_string(),
            vm.tags.iter().cloned().collect::<Vec<_>>().join(";"),
        ),
    ];
    if let Some(ip) = &vm.ipconfig {
        v.push(("ipconfig0".into(), ip.clone()));
    }
    for (k, val) in [
        ("nameserver", &vm.nameserver),
        ("searchdomain", &vm.searchdomain),
        ("ciuser", &vm.ciuser),
    ] {
        if let Some(x) = val {
            v.push((k.into(), x.clone()));
        }
    }
    if !vm.ssh_keys.is_empty() {
        // PVE wants the keys URL-encoded with %20 for spaces — never '+',
        // which it would keep literally and break every key.
        v.push((
            "sshkeys".into(),
            urlencoding::encode(&vm.ssh_keys.join("\n")).into_owned(),
        ));
    }
    for (slot, val) in &vm.networks {
        v.push((slot.clone(), val.clone()));
    }
    v
}

/// The config keys labctl sets that reach the guest through its cloud-init
/// drive (regenerated when the VM starts).
const CLOUD_INIT_KEYS: [&str; 5] = [
    "ipconfig0",
    "nameserver",
    "searchdomain",
    "ciuser",
    "sshkeys",
];

fn same(key: &str, old: &str, new: &str) -> bool {
    match key {
        "cpu" => prop(old).0 == new || prop(old).1.get("cputype").is_some_and(|c| c == new),
        "agent" => {
            let (first, m) = prop(old);
            let on = if first.is_empty() {
                m.get("enabled").cloned().unwrap_or_default()
            } else {
                first
            };
            on == new
        }
        "memory" => prop(old).0 == new || prop(old).1.get("current").is_some_and(|c| c == new),
        "tags" => tags_of(&Value::String(old.into())) == tags_of(&Value::String(new.into())),
        "sshkeys" => {
            let dec = |x: &str| {
                urlencoding::decode(x)
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default()
            };
            dec(old) == dec(new)
        }
        k if k.starts_with("net") => {
            // Compare model, bridge and VLAN; the MAC address is PVE's.
            let norm = |x: &str| {
                let mut model = String::new();
                let mut rest = BTreeMap::new();
                for part in x.split(',') {
                    let (k, v) = part.split_once('=').unwrap_or((part, ""));
                    if ["virtio", "e1000", "rtl8139", "vmxnet3"].contains(&k) {
                        model = k.to_string();
                    } else if ["bridge", "tag"].contains(&k) {
                        rest.insert(k.to_string(), v.to_string());
                    }
                }
                (model, rest)
            };
            norm(old) == norm(new)
        }
        _ => old == new,
    }
}

fn with_mac(old: &str, new: &str) -> String {
    // Keep the VM's MAC address when changing a NIC.
    let mac = old.split(',').find_map(|p| {
        p.split_once('=')
            .filter(|(k, v)| v.contains(':') && k.len() < 10)
            .map(|(_, v)| v.to_string())
    });
    match (mac, new.split_once(',')) {
        (Some(m), Some((model, rest))) => format!("{model}={m},{rest}"),
        _ => new.to_string(),
    }
}

/// Plans one VM that exists.
async fn plan_existing(c: &Client, vm: &Vm, live: &LiveVm) -> Result<Step, PveError> {
    let ctx = Ctx::vm(&live.node, vm.vmid);
    // A VM labctl cloned but did not get to configure (the create was cut
    // short) carries the clone's mark in its description: adopt it.
    let marked = !live.tags.contains(MANAGED_TAG)
        && live.node == vm.node
        && c.get(
            &format!("/nodes/{}/qemu/{}/config", live.node, vm.vmid),
            &[],
            &ctx,
        )
        .await
        .is_ok_and(|cfg| is_ours(&cfg, &vm.name));
    if !live.tags.contains(MANAGED_TAG) && !marked {
        return Ok(Step::Conflict {
            name: vm.name.clone(),
            vmid: vm.vmid,
            reason: format!(
                "VMID {} is already used by '{}' on {}, which labctl does not manage (no '{MANAGED_TAG}' tag): choose another vmid, or tag that VM '{MANAGED_TAG}' if labctl should adopt it",
                vm.vmid, live.name, live.node
            ),
        });
    }
    if live.node != vm.node {
        return Ok(Step::Conflict {
            name: vm.name.clone(),
            vmid: vm.vmid,
            reason: format!(
                "the VM runs on {} but the platform file says {}: migrate it (qm migrate) or change `node`; labctl does not migrate",
                live.node, vm.node
            ),
        });
    }
    let cfg = c
        .get(
            &format!("/nodes/{}/qemu/{}/config", live.node, vm.vmid),
            &[],
            &ctx,
        )
        .await?;
    let mut changes = vec![];
    let mut set = vec![];
    if live.name != vm.name {
        changes.push(Change {
            field: "name".into(),
            old: live.name.clone(),
            new: vm.name.clone(),
        });
        set.push(("name".into(), vm.name.clone()));
    }
    for (k, new) in desired_config(vm) {
        let old = s(cfg.get(&k));
        if !same(&k, &old, &new) {
            let shown = |x: &str| {
                if k == "sshkeys" {
                    urlencoding::decode(x)
                        .map(|c| c.replace('\n', " | "))
                        .unwrap_or_default()
                } else {
                    x.to_string()
                }
            };
            changes.push(Change {
                field: k.clone(),
                old: shown(&old),
                new: shown(&new),
            });
            let value = if k.starts_with("net") {
                with_mac(&old, &new)
            } else {
                new
            };
            set.push((k, value));
        }
    }
    match cloud_init_slot(&cfg, vm) {
        Some(Some(slot)) => {
            let storage = vm.disks.first().map_or("local-lvm", |d| d.1.as_str());
            changes.push(Change {
                field: slot.into(),
                old: "(none)".into(),
                new: format!("{storage}:cloudinit (cloud-init drive)"),
            });
            set.push((slot.into(), format!("{storage}:cloudinit")));
        }
        Some(None) => {
            return Ok(Step::Conflict {
                name: vm.name.clone(),
                vmid: vm.vmid,
                reason: "the VM has no cloud-init drive and no free IDE slot to add one, so its declared address, user and keys never reach the guest".into(),
            })
        }
        None => {}
    }
    let mut grow = vec![];
    for (slot, storage, bytes, text, iothread) in &vm.disks {
        let cur = s(cfg.get(slot));
        if cur.is_empty() {
            changes.push(Change {
                field: slot.clone(),
                old: "(none)".into(),
                new: format!("{storage}, {text}"),
            });
            let gib = bytes.div_ceil(1 << 30);
            let mut v = format!("{storage}:{gib}");
            if *iothread {
                v.push_str(",iothread=1");
            }
            set.push((slot.clone(), v));
            continue;
        }
        let (_, m) = prop(&cur);
        let have = m
            .get("size")
            .map(|s| platform::parse_size(s).unwrap_or(0))
            .unwrap_or(0);
        if *bytes < have {
            return Ok(Step::Conflict {
                name: vm.name.clone(),
                vmid: vm.vmid,
                reason: format!(
                    "{slot} is {} but the platform file asks for {text}: disks only grow (PVE cannot shrink them); restore the size in the file",
                    m.get("size").cloned().unwrap_or_default()
                ),
            });
        }
        if *bytes > have {
            changes.push(Change {
                field: format!("{slot}.size"),
                old: m.get("size").cloned().unwrap_or_default(),
                new: text.clone(),
            });
            grow.push((slot.clone(), text.clone()));
        }
        let has_io = m.get("iothread").is_some_and(|v| v == "1");
        if *iothread != has_io {
            changes.push(Change {
                field: format!("{slot}.iothread"),
                old: u8::from(has_io).to_string(),
                new: u8::from(*iothread).to_string(),
            });
            let mut parts: Vec<String> = cur
                .split(',')
                .filter(|p| !p.starts_with("iothread="))
                .map(String::from)
                .collect();
            if *iothread {
                parts.push("iothread=1".into());
            }
            set.push((slot.clone(), parts.join(",")));
        }
    }
    let start = live.status != "running";
    let mut pending = if start {
        vec![]
    } else {
        pending_until_reboot(c, &live.node, vm.vmid).await?
    };
    let hotplug = s(cfg.get("hotplug"));
    let needs_reboot: Vec<String> = if start {
        vec![]
    } else {
        changes
            .iter()
            .filter(|ch| needs_restart(&ch.field, &hotplug))
            .map(|ch| ch.field.clone())
            .collect()
    };
    // A running VM must have the declared address (issue 21 point 3 at
    // plan time): ask its agent once. A wrong one that a cloud-init change
    // waiting for the restart explains is listed with it; otherwise
    // nothing labctl can apply would fix it.
    if let (false, true, Some(want)) = (start, vm.agent, &vm.ip) {
        let reported = c
            .once(
                reqwest::Method::GET,
                &format!(
                    "/nodes/{}/qemu/{}/agent/network-get-interfaces",
                    live.node, vm.vmid
                ),
                &[],
                &ctx,
            )
            .await
            .map(|v| crate::proxmox::agent_ipv4s(&v))
            .ok()
            .filter(|ips| !ips.is_empty());
        if let Some(ips) = reported {
            if !ips.contains(want) {
                let cloud_init = |f: &str| f.starts_with("ide") || CLOUD_INIT_KEYS.contains(&f);
                let explained = pending.iter().any(|p| cloud_init(&p.field))
                    || needs_reboot.iter().any(|f| cloud_init(f));
                if !explained {
                    return Ok(Step::Conflict {
                        name: vm.name.clone(),
                        vmid: vm.vmid,
                        reason: format!(
                            "the guest agent reports {}, not the declared {want}, and no cloud-init change waits for a restart: check the guest's network setup (cloud-init's network config, netplan) or the address in the file",
                            ips.join(", ")
                        ),
                    });
                }
                let old = ips.join(", ");
                pending.push(Change {
                    field: "address".into(),
                    old,
                    new: want.clone(),
                });
            }
        }
    }
    if changes.is_empty() && !start && pending.is_empty() {
        return Ok(Step::Unchanged {
            name: vm.name.clone(),
            vmid: vm.vmid,
            node: live.node.clone(),
        });
    }
    if start {
        changes.push(Change {
            field: "status".into(),
            old: live.status.clone(),
            new: "running".into(),
        });
    }
    Ok(Step::Update {
        name: vm.name.clone(),
        vmid: vm.vmid,
        node: live.node.clone(),
        changes,
        set,
        grow,
        digest: cfg.get("digest").and_then(Value::as_str).map(String::from),
        start,
        reboot: vm.reboot && (!pending.is_empty() || !needs_reboot.is_empty()),
        needs_reboot,
        pending,
    })
}

/// Whether a running VM takes a change of `field` only when it restarts,
/// with the VM's `hotplug` setting (empty: PVE's default
/// `network,disk,usb`). Follows qemu-server's vmconfig_hotplug_pending:
/// name, tags, onboot are applied at once, as are NICs and new SCSI/VirtIO
/// disks and disk growth with the `network`/`disk` features; memory only
/// with `memory`; cores, sockets, CPU type, SCSI controller, agent and
/// IDE/SATA drives never; cloud-init settings are written at once but
/// reach the guest when the drive is regenerated at the next start
/// (unless `cloudinit` hotplug regenerates it). `plan` uses this to say
/// what will wait; `apply` reads `/pending` afterwards to know.
fn needs_restart(field: &str, hotplug: &str) -> bool {
    let hotplug = match hotplug {
        "" | "1" => "network,disk,usb",
        "0" => "",
        h => h,
    };
    let has = |f: &str| hotplug.split(',').any(|x| x == f);
    match field {
        "name" | "tags" | "onboot" | "description" | "status" => false,
        "memory" => !has("memory"),
        "cores" | "sockets" | "cpu" | "scsihw" | "agent" => true,
        f if CLOUD_INIT_KEYS.contains(&f) => !has("cloudinit"),
        f if f.starts_with("net") => !has("network"),
        f if f.ends_with(".size") => false,
        f if f.ends_with(".iothread") => true,
        f if f.starts_with("scsi") || f.starts_with("virtio") => !has("disk"),
        _ => true,
    }
}

/// What a running VM has written but not yet running: the config's
/// pending section (`GET …/pending`: entries with `pending` or `delete`)
/// and cloud-init settings the drive does not hold yet (`GET
/// …/cloudinit`). Old is the running value, new the pending one.
async fn pending_until_reboot(c: &Client, node: &str, vmid: u32) -> Result<Vec<Change>, PveError> {
    let ctx = Ctx::vm(node, vmid);
    let mut out: Vec<Change> = vec![];
    let shown = |key: &str, v: &str| {
        if key == "sshkeys" {
            urlencoding::decode(v)
                .map(|c| c.trim().replace('\n', " | "))
                .unwrap_or_default()
        } else {
            v.to_string()
        }
    };
    for path in ["pending", "cloudinit"] {
        let list = c
            .get(&format!("/nodes/{node}/qemu/{vmid}/{path}"), &[], &ctx)
            .await?;
        for e in list.as_array().cloned().unwrap_or_default() {
            let key = s(e.get("key"));
            let old = s(e.get("value"));
            let new = if e.get("delete").is_some_and(|d| d.as_u64().unwrap_or(0) > 0) {
                "(deleted)".to_string()
            } else if let Some(p) = e.get("pending") {
                s(Some(p))
            } else {
                continue;
            };
            if new == old || out.iter().any(|c| c.field == key) {
                continue;
            }
            out.push(Change {
                old: shown(&key, &old),
                new: shown(&key, &new),
                field: key,
            });
        }
    }
    Ok(out)
}

/// Computes the plan.
///
/// # Errors
/// PVE errors.
pub async fn plan(c: &Client, p: &Platform) -> crate::error::Result<Plan> {
    let live = live_vms(c).await.map_err(PveError::into_lab)?;
    let mut steps = vec![];
    let mut shared = None;
    for vm in &p.vms {
        let step = match live.get(&vm.vmid) {
            // VMIDs are unique across VMs and containers.
            Some(l) if l.kind == "lxc" => Step::Conflict {
                name: vm.name.clone(),
                vmid: vm.vmid,
                reason: format!(
                    "VMID {} is used by container '{}' on {}: choose another vmid",
                    vm.vmid, l.name, l.node
                ),
            },
            Some(l) => plan_existing(c, vm, l).await.map_err(PveError::into_lab)?,
            None => {
                if let Some(other) = live
                    .values()
                    .find(|l| l.kind == "qemu" && l.name == vm.name)
                {
                    Step::Conflict {
                        name: vm.name.clone(),
                        vmid: vm.vmid,
                        reason: format!(
                            "a VM named '{}' already exists as VMID {} on {}: change the vmid in the file to {} or rename one of them",
                            vm.name, other.vmid, other.node, other.vmid
                        ),
                    }
                } else if live.get(&vm.template.0).is_none_or(|t| t.kind != "qemu") {
                    Step::Conflict {
                        name: vm.name.clone(),
                        vmid: vm.vmid,
                        reason: format!(
                            "template VMID {} does not exist on the cluster",
                            vm.template.0
                        ),
                    }
                } else if let Some(why) = local_storage_problem(c, vm, &mut shared)
                    .await
                    .map_err(PveError::into_lab)?
                {
                    Step::Conflict {
                        name: vm.name.clone(),
                        vmid: vm.vmid,
                        reason: why,
                    }
                } else {
                    Step::Create {
                        name: vm.name.clone(),
                        vmid: vm.vmid,
                        node: vm.node.clone(),
                    }
                }
            }
        };
        steps.push(step);
    }
    let wanted: BTreeSet<u32> = p.vms.iter().map(|v| v.vmid).collect();
    let orphans = live
        .values()
        .filter(|l| {
            l.kind == "qemu"
                && l.tags.contains(MANAGED_TAG)
                && !wanted.contains(&l.vmid)
                && !l.template
        })
        .cloned()
        .collect();
    Ok(Plan { steps, orphans })
}

/// What happened to one VM in `apply`.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub name: String,
    pub vmid: u32,
    pub action: String,
    pub ok: bool,
    pub error: Option<String>,
    pub ips: Vec<String>,
    pub changes: Vec<Change>,
    /// Fields still pending until the VM restarts (no reboot allowed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// Whether apply rebooted the VM to apply pending changes.
    pub rebooted: bool,
}

impl Applied {
    /// This VM's line in the provision records.
    pub fn record(&self) -> crate::records::provision::AppliedVm {
        crate::records::provision::AppliedVm {
            name: self.name.clone(),
            vmid: self.vmid,
            action: self.action.clone(),
            changes: serde_json::to_value(&self.changes).unwrap_or_default(),
            ok: self.ok,
            error: self.error.clone(),
        }
    }
}

/// `provision apply` as a whole: takes the host's provision lock (beside
/// `records`), plans, shows the plan through `on_plan`, applies, and writes
/// what was applied to the provision records, failed VMs included.
///
/// # Errors
/// Lock, PVE connection or planning errors; a VM that fails is in the
/// result (`ok: false`), not an error.
pub fn apply_recorded(
    pf: &platform::Platform,
    records: &std::path::Path,
    quiet: bool,
    on_plan: impl FnOnce(&Plan),
) -> crate::error::Result<(Plan, Vec<Applied>)> {
    let _lock = crate::records::provision::lock(records)?;
    let (plan, applied) = crate::util::runtime()?.block_on(async {
        let c = connect(pf).await?;
        let plan = plan(&c, pf).await?;
        on_plan(&plan);
        let applied = apply(&c, pf, &plan, quiet).await;
        Ok::<_, crate::error::Error>((plan, applied))
    })?;
    let rows: Vec<_> = applied.iter().map(Applied::record).collect();
    crate::records::provision::record(records, &pf.path, &rows)?;
    Ok((plan, applied))
}

/// `provision destroy` as a whole: under the host's provision lock, stops
/// and deletes one managed VM, then records it.
///
/// # Errors
/// Lock, PVE or refusal errors (nothing recorded then).
pub fn destroy_recorded(
    pf: &platform::Platform,
    records: &std::path::Path,
    name: &str,
    quiet: bool,
) -> crate::error::Result<LiveVm> {
    let _lock = crate::records::provision::lock(records)?;
    let gone = crate::util::runtime()?.block_on(async {
        let c = connect(pf).await?;
        destroy(&c, pf, name, quiet).await
    })?;
    crate::records::provision::record(
        records,
        &pf.path,
        &[crate::records::provision::AppliedVm {
            name: gone.name.clone(),
            vmid: gone.vmid,
            action: "destroy".into(),
            changes: serde_json::Value::Array(vec![]),
            ok: true,
            error: None,
        }],
    )?;
    Ok(gone)
}

fn progress(quiet: bool, name: &str, msg: &str) {
    if !quiet {
        eprintln!("{name}: {msg}");
    }
}

async fn create(
    c: &Client,
    vm: &Vm,
    quiet: bool,
    timeout: std::time::Duration,
) -> Result<Vec<String>, PveError> {
    let (tvmid, tnode) = (&vm.template.0, &vm.template.1);
    let mut params = vec![
        ("newid", vm.vmid.to_string()),
        ("name", vm.name.clone()),
        ("full", u8::from(vm.full_clone).to_string()),
    ];
    // With clone_via: local-then-migrate the clone is made on the
    // template's node and migrated (stopped) afterwards.
    let migrate = vm.migrate_after_clone && &vm.node != tnode;
    let clone_node = if migrate {
        tnode.clone()
    } else {
        vm.node.clone()
    };
    if !migrate && &vm.node != tnode {
        params.push(("target", vm.node.clone()));
    }
    if vm.full_clone {
        if let Some((_, storage, ..)) = vm.disks.first() {
            params.push(("storage", storage.clone()));
        }
    }
    if let Some(pool) = &vm.pool {
        params.push(("pool", pool.clone()));
    }
    progress(
        quiet,
        &vm.name,
        &format!(
            "cloning template {tvmid} on {tnode} to VMID {} on {}",
            vm.vmid, vm.node
        ),
    );
    // Marked as labctl's from the clone on, so a create cut short (Ctrl-C,
    // a lost reply) is adopted and finished by the next apply.
    params.push(("description", clone_marker(&vm.name)));
    let clone_ctx = Ctx::vm(&clone_node, vm.vmid);
    let cloned = send_looking_first(
        c,
        reqwest::Method::POST,
        &format!("/nodes/{tnode}/qemu/{tvmid}/clone"),
        &params,
        &Ctx::vm(tnode, *tvmid),
        || async {
            // The clone happened when the new VMID is there with our mark.
            match c
                .once(
                    reqwest::Method::GET,
                    &format!("/nodes/{clone_node}/qemu/{}/config", vm.vmid),
                    &[],
                    &clone_ctx,
                )
                .await
            {
                Ok(cfg) => Ok(is_ours(&cfg, &vm.name)),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e),
            }
        },
    )
    .await
    .map_err(|mut e| {
        e.vmid = Some(vm.vmid);
        e
    })?;
    match cloned {
        Some(upid) => c.wait_task(&upid, &Ctx::vm(tnode, *tvmid)).await?,
        // Its task's UPID was lost with the reply: wait for the clone's
        // lock on the new VM to go.
        None => wait_unlocked(c, &clone_node, vm.vmid, timeout).await?,
    }
    if migrate {
        progress(
            quiet,
            &vm.name,
            &format!("migrating the stopped clone from {tnode} to {}", vm.node),
        );
        c.task(
            reqwest::Method::POST,
            &format!("/nodes/{tnode}/qemu/{}/migrate", vm.vmid),
            &[("target", vm.node.clone())],
            &clone_ctx,
        )
        .await?;
    }
    let ctx = Ctx::vm(&vm.node, vm.vmid);
    progress(
        quiet,
        &vm.name,
        "configuring cloud-init, CPU, memory, network",
    );
    let cfg = c
        .get(
            &format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid),
            &[],
            &ctx,
        )
        .await?;
    let mut set = desired_config(vm);
    for (k, v) in set.iter_mut() {
        if k.starts_with("net") {
            *v = with_mac(&s(cfg.get(k.as_str())), v);
        }
    }
    // ipconfig0, the user and the keys reach the guest only through a
    // cloud-init drive: a template without one gets it here (`ide2:
    // <storage>:cloudinit`, as `qm set --ide2 local-lvm:cloudinit` does).
    if let Some(slot) = cloud_init_slot(&cfg, vm) {
        let slot = slot.ok_or_else(|| PveError {
            method: "PLAN".into(),
            path: "ide".into(),
            status: 0,
            message: "the template has no cloud-init drive and no free IDE slot to add one".into(),
            node: Some(vm.node.clone()),
            vmid: Some(vm.vmid),
            upid: None,
            retry_transport: false,
        })?;
        let storage = vm.disks.first().map_or("local-lvm", |d| d.1.as_str());
        progress(
            quiet,
            &vm.name,
            &format!("the template has no cloud-init drive: adding {slot} on {storage}"),
        );
        set.push((slot.to_string(), format!("{storage}:cloudinit")));
    }
    let mut grow = vec![];
    for (slot, storage, bytes, text, iothread) in &vm.disks {
        let cur = s(cfg.get(slot));
        if cur.is_empty() {
            let mut v = format!("{storage}:{}", bytes.div_ceil(1 << 30));
            if *iothread {
                v.push_str(",iothread=1");
            }
            set.push((slot.clone(), v));
        } else {
            let (_, m) = prop(&cur);
            let have = m
                .get("size")
                .map(|x| platform::parse_size(x).unwrap_or(0))
                .unwrap_or(0);
            if *bytes < have {
                return Err(PveError {
                    method: "PLAN".into(),
                    path: slot.clone(),
                    status: 0,
                    message: format!("the template's {slot} is {} — larger than the {text} asked for; disks cannot shrink", m.get("size").cloned().unwrap_or_default()),
                    node: Some(vm.node.clone()),
                    vmid: Some(vm.vmid),
                    upid: None,
                    retry_transport: false,
            });
            }
            if *bytes > have {
                grow.push((slot.clone(), text.clone()));
            }
            if *iothread && m.get("iothread").is_none_or(|v| v != "1") {
                set.push((slot.clone(), format!("{cur},iothread=1")));
            }
        }
    }
    let params: Vec<(&str, String)> = set.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    put_config(c, &vm.node, vm.vmid, &params, &ctx).await?;
    for (slot, size) in &grow {
        progress(quiet, &vm.name, &format!("growing {slot} to {size}"));
        c.task(
            reqwest::Method::PUT,
            &format!("/nodes/{}/qemu/{}/resize", vm.node, vm.vmid),
            &[("disk", slot.clone()), ("size", size.clone())],
            &ctx,
        )
        .await?;
    }
    progress(quiet, &vm.name, "starting");
    start_once(c, &vm.node, vm.vmid).await?;
    if vm.agent {
        progress(quiet, &vm.name, "waiting for the guest agent");
        return wait_declared_ip(c, vm, &vm.node, timeout).await;
    }
    Ok(vec![])
}

/// Why cloning `vm`'s template straight to `vm.node` would fail: PVE
/// refuses a clone with `target` when the template has a volume on
/// storage that is not shared ("can't clone VM to node '…' (VM uses local
/// storage)", qemu-server PVE::API2::Qemu clone_vm). `shared` caches the
/// shared storage IDs of `GET /storage`. `None` when the clone can go
/// ahead (same node, shared storage, or `clone_via: local-then-migrate`).
async fn local_storage_problem(
    c: &Client,
    vm: &Vm,
    shared: &mut Option<BTreeSet<String>>,
) -> Result<Option<String>, PveError> {
    let (tvmid, tnode) = (vm.template.0, &vm.template.1);
    if &vm.node == tnode || vm.migrate_after_clone {
        return Ok(None);
    }
    if shared.is_none() {
        let list = c.get("/storage", &[], &Ctx::default()).await?;
        *shared = Some(
            list.as_array()
                .into_iter()
                .flatten()
                .filter(|st| st.get("shared").and_then(Value::as_u64) == Some(1))
                .filter_map(|st| st.get("storage").and_then(Value::as_str).map(String::from))
                .collect(),
        );
    }
    let shared = shared.as_ref().expect("filled above");
    let cfg = c
        .get(
            &format!("/nodes/{tnode}/qemu/{tvmid}/config"),
            &[],
            &Ctx::vm(tnode, tvmid),
        )
        .await?;
    let local: BTreeSet<String> = cfg
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            ["scsi", "virtio", "sata", "ide", "efidisk", "tpmstate"]
                .iter()
                .any(|p| {
                    k.strip_prefix(p)
                        .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
                })
        })
        .filter_map(|(_, v)| v.as_str())
        .filter(|v| !v.starts_with("none") && !v.starts_with("cdrom"))
        .filter_map(|v| v.split_once(':').map(|(st, _)| st.to_string()))
        .filter(|st| !shared.contains(st))
        .collect();
    if local.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "template {tvmid} on {tnode} has disks on local storage ({}): PVE cannot clone it to {} (\"VM uses local storage\"). Keep a template on {} (template: {{ vmid: …, node: {} }}), put the template on shared storage, or set clone_via: local-then-migrate to clone on {tnode} and migrate the stopped clone",
        local.into_iter().collect::<Vec<_>>().join(", "),
        vm.node,
        vm.node,
        vm.node
    )))
}

/// The `description` a clone gets: labctl's mark, readable in the PVE GUI.
fn clone_marker(name: &str) -> String {
    format!("{MARK_PREFIX}{name} (labctl provision; an interrupted create is finished by the next apply)")
}

const MARK_PREFIX: &str = "labctl-managed: ";

/// Whether a VM config carries labctl's clone mark for `name`.
fn is_ours(cfg: &Value, name: &str) -> bool {
    cfg.get("description")
        .and_then(Value::as_str)
        .and_then(|d| d.strip_prefix(MARK_PREFIX))
        .and_then(|d| d.split(' ').next())
        == Some(name)
}

/// Sends a request that makes something happen (a clone, a start, a
/// config write) and returns its UPID. After a lost reply (a transport
/// error: the request may have reached PVE or not) it waits, then asks
/// `happened` before sending again, and returns `None` when it had; a
/// look that cannot get through either (pveproxy restarting) is repeated,
/// never taken for "no". Other transient failures (PVE refused the
/// request: a lock timeout) are retried; the rest fail at once.
async fn send_looking_first<F, Fut>(
    c: &Client,
    method: reqwest::Method,
    path: &str,
    params: &[(&str, String)],
    ctx: &Ctx,
    happened: F,
) -> Result<Option<String>, PveError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, PveError>>,
{
    let mut attempt = 0;
    let mut look = false;
    loop {
        let e = if look {
            match happened().await {
                Ok(true) => return Ok(None),
                Ok(false) => {
                    look = false;
                    continue;
                }
                Err(e) if e.transient() => e,
                Err(e) => return Err(e),
            }
        } else {
            match c.once(method.clone(), path, params, ctx).await {
                Ok(v) => return Ok(v.as_str().map(String::from)),
                Err(e) if e.transient() => {
                    look = e.status == 0 && e.upid.is_none();
                    e
                }
                Err(e) => return Err(e),
            }
        };
        attempt += 1;
        match c.backoff(attempt) {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return Err(e),
        }
    }
}

/// A VM config without a cloud-init drive for a VM that needs one
/// (declared address, user or keys): `Some(the free IDE slot to add it
/// at)`, `Some(None)` when every IDE slot is taken; `None` when nothing
/// is missing. ipconfig0, the user and the keys reach the guest only
/// through that drive (`ide2: <storage>:cloudinit`, as `qm set --ide2
/// local-lvm:cloudinit` adds it).
fn cloud_init_slot(cfg: &Value, vm: &Vm) -> Option<Option<&'static str>> {
    let has = cfg.as_object().is_some_and(|m| {
        m.values()
            .any(|v| v.as_str().is_some_and(|t| t.contains("cloudinit")))
    });
    let needs = vm.ipconfig.is_some() || vm.ciuser.is_some() || !vm.ssh_keys.is_empty();
    (!has && needs).then(|| {
        ["ide2", "ide0", "ide1", "ide3"]
            .into_iter()
            .find(|k| cfg.get(*k).is_none())
    })
}

/// Whether `value` makes PVE allocate a volume (`storage:SIZE_GiB`,
/// `storage:cloudinit`): sending it twice would allocate twice.
fn allocates(value: &str) -> bool {
    let first = value.split(',').next().unwrap_or("");
    first.split_once(':').is_some_and(|(st, rest)| {
        !st.is_empty() && (rest == "cloudinit" || rest.parse::<u64>().is_ok())
    })
}

/// Whether a VM config holds what a config write set: each key with its
/// value (a new volume: its slot exists; a property string: each option).
fn holds(cfg: &Value, params: &[(&str, String)]) -> bool {
    params
        .iter()
        .filter(|(k, _)| *k != "digest")
        .all(|(k, want)| {
            let have = s(cfg.get(*k));
            if allocates(want) {
                return !have.is_empty();
            }
            if same(k, &have, want) {
                return true;
            }
            let (p0, w) = prop(want);
            let (h0, h) = prop(&have);
            !have.is_empty() && p0 == h0 && w.iter().all(|(o, v)| h.get(o) == Some(v))
        })
}

/// `PUT …/config`; after a lost reply it reads the config (pending values
/// included) and sends again only if the write did not land, so a new
/// disk is never allocated twice and a digest never refuses our own
/// write.
async fn put_config(
    c: &Client,
    node: &str,
    vmid: u32,
    params: &[(&str, String)],
    ctx: &Ctx,
) -> Result<(), PveError> {
    let path = format!("/nodes/{node}/qemu/{vmid}/config");
    send_looking_first(c, reqwest::Method::PUT, &path, params, ctx, || async {
        let cfg = c.once(reqwest::Method::GET, &path, &[], ctx).await?;
        Ok(holds(&cfg, params))
    })
    .await
    .map(|_| ())
}

/// Starts a VM; after a lost reply, a VM already running counts as started.
async fn start_once(c: &Client, node: &str, vmid: u32) -> Result<(), PveError> {
    let ctx = Ctx::vm(node, vmid);
    let upid = send_looking_first(
        c,
        reqwest::Method::POST,
        &format!("/nodes/{node}/qemu/{vmid}/status/start"),
        &[],
        &ctx,
        || async {
            let st = c
                .once(
                    reqwest::Method::GET,
                    &format!("/nodes/{node}/qemu/{vmid}/status/current"),
                    &[],
                    &ctx,
                )
                .await?;
            Ok(st.get("status").and_then(Value::as_str) == Some("running"))
        },
    )
    .await?;
    if let Some(u) = upid {
        c.wait_task(&u, &ctx).await?;
    }
    Ok(())
}

/// Waits until a VM's config has no `lock` (a clone whose UPID was lost
/// holds `lock: clone` until it ends; a failed clone removes the VM).
async fn wait_unlocked(
    c: &Client,
    node: &str,
    vmid: u32,
    timeout: std::time::Duration,
) -> Result<(), PveError> {
    let ctx = Ctx::vm(node, vmid);
    let path = format!("/nodes/{node}/qemu/{vmid}/config");
    let started = tokio::time::Instant::now();
    loop {
        let cfg = c.get(&path, &[], &ctx).await?;
        if cfg.get("lock").is_none() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(PveError {
                method: "GET".into(),
                path,
                status: 0,
                message: format!(
                    "still locked ({}) {}s after the clone started; check the PVE task list",
                    s(cfg.get("lock")),
                    timeout.as_secs()
                ),
                node: Some(node.into()),
                vmid: Some(vmid),
                upid: None,
                retry_transport: false,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Waits for the guest agent and for the declared address (`ipconfig.ip`)
/// among the addresses it reports: a VM that came up with another address
/// (no cloud-init drive, a template whose own network setup wins) is a
/// failure naming the VM, the declared and the reported addresses.
async fn wait_declared_ip(
    c: &Client,
    vm: &Vm,
    node: &str,
    timeout: std::time::Duration,
) -> Result<Vec<String>, PveError> {
    // Once the agent answers, how long the address may take to become the
    // declared one (cloud-init's network stage normally runs before the
    // agent starts).
    let settle = std::time::Duration::from_millis(
        std::env::var("LABCTL_PVE_IP_SETTLE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60_000),
    );
    let started = tokio::time::Instant::now();
    let mut answered: Option<tokio::time::Instant> = None;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let ips = crate::proxmox::wait_agent(c, node, vm.vmid, left).await?;
        let Some(want) = &vm.ip else {
            return Ok(ips);
        };
        if ips.contains(want) {
            return Ok(ips);
        }
        let first = *answered.get_or_insert_with(tokio::time::Instant::now);
        if started.elapsed() >= timeout || first.elapsed() >= settle {
            return Err(PveError {
                method: "CHECK".into(),
                path: format!("/nodes/{node}/qemu/{}/agent/network-get-interfaces", vm.vmid),
                status: 0,
                message: format!(
                    "VM {} came up with {}, not the declared {want}: does the template have a cloud-init drive, and does the guest run cloud-init with its network config?",
                    vm.name,
                    ips.join(", ")
                ),
                node: Some(node.into()),
                vmid: Some(vm.vmid),
                upid: None,
                retry_transport: false,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What an update left: the agent's addresses, fields still pending until
/// a restart, whether the VM was rebooted.
#[derive(Debug, Default)]
struct Outcome {
    ips: Vec<String>,
    pending: Vec<String>,
    rebooted: bool,
}

async fn update(
    c: &Client,
    step: &Step,
    vm: &Vm,
    quiet: bool,
    timeout: std::time::Duration,
    reboots: &tokio::sync::Mutex<()>,
) -> Result<Outcome, PveError> {
    let Step::Update {
        node,
        vmid,
        set,
        grow,
        digest,
        start,
        changes,
        ..
    } = step
    else {
        return Ok(Outcome::default());
    };
    let ctx = Ctx::vm(node, *vmid);
    if !set.is_empty() {
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        progress(quiet, &vm.name, &format!("updating {}", fields.join(", ")));
        let mut params: Vec<(&str, String)> =
            set.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        if let Some(d) = digest {
            params.push(("digest", d.clone()));
        }
        put_config(c, node, *vmid, &params, &ctx).await?;
    }
    for (slot, size) in grow {
        progress(quiet, &vm.name, &format!("growing {slot} to {size}"));
        c.task(
            reqwest::Method::PUT,
            &format!("/nodes/{node}/qemu/{vmid}/resize"),
            &[("disk", slot.clone()), ("size", size.clone())],
            &ctx,
        )
        .await?;
    }
    if *start {
        progress(quiet, &vm.name, "starting");
        start_once(c, node, *vmid).await?;
        let ips = if vm.agent {
            wait_declared_ip(c, vm, node, timeout).await?
        } else {
            vec![]
        };
        return Ok(Outcome {
            ips,
            ..Outcome::default()
        });
    }
    // The VM runs: PVE applied what it could hot-plug and keeps the rest
    // pending until the VM restarts.
    let pending: Vec<String> = pending_until_reboot(c, node, *vmid)
        .await?
        .into_iter()
        .map(|ch| ch.field)
        .collect();
    if pending.is_empty() {
        return Ok(Outcome::default());
    }
    if !vm.reboot {
        progress(
            quiet,
            &vm.name,
            &format!(
                "{} pending until the VM restarts (reboot it, or run `labctl provision apply --reboot`, or set reboot_policy: when-needed)",
                pending.join(", ")
            ),
        );
        return Ok(Outcome {
            pending,
            ..Outcome::default()
        });
    }
    // One reboot at a time across the platform: the next VM goes down only
    // when this one is back with its agent and address.
    let _turn = reboots.lock().await;
    progress(
        quiet,
        &vm.name,
        &format!("rebooting to apply {}", pending.join(", ")),
    );
    // After a lost reply, the node's task list says whether the reboot
    // started: a qmreboot task for this VM that was not there before.
    let before = reboot_tasks(c, node, *vmid, &ctx).await?;
    let seen = std::sync::Mutex::new(None);
    let upid = send_looking_first(
        c,
        reqwest::Method::POST,
        &format!("/nodes/{node}/qemu/{vmid}/status/reboot"),
        &[],
        &ctx,
        || async {
            let new = reboot_tasks(c, node, *vmid, &ctx)
                .await?
                .difference(&before)
                .next()
                .cloned();
            let started = new.is_some();
            *seen.lock().expect("reboot lookup") = new;
            Ok(started)
        },
    )
    .await?
    .or_else(|| seen.lock().expect("reboot lookup").take());
    if let Some(u) = upid {
        c.wait_task(&u, &ctx).await?;
    }
    let ips = if vm.agent {
        wait_declared_ip(c, vm, node, timeout).await?
    } else {
        vec![]
    };
    let left: Vec<String> = pending_until_reboot(c, node, *vmid)
        .await?
        .into_iter()
        .map(|ch| ch.field)
        .filter(|f| pending.contains(f))
        .collect();
    if !left.is_empty() {
        return Err(PveError {
            method: "CHECK".into(),
            path: format!("/nodes/{node}/qemu/{vmid}/pending"),
            status: 0,
            message: format!(
                "{} still pending after the reboot of {}",
                left.join(", "),
                vm.name
            ),
            node: Some(node.clone()),
            vmid: Some(*vmid),
            upid: None,
            retry_transport: false,
        });
    }
    Ok(Outcome {
        ips,
        pending: vec![],
        rebooted: true,
    })
}

/// The UPIDs of a VM's reboot tasks, running or finished (`GET
/// /nodes/{node}/tasks`).
async fn reboot_tasks(
    c: &Client,
    node: &str,
    vmid: u32,
    ctx: &Ctx,
) -> Result<BTreeSet<String>, PveError> {
    let list = c
        .get(
            &format!("/nodes/{node}/tasks"),
            &[
                ("vmid", vmid.to_string()),
                ("typefilter", "qmreboot".into()),
                ("source", "all".into()),
            ],
            ctx,
        )
        .await?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("upid").and_then(Value::as_str).map(String::from))
        .collect())
}

/// Applies a plan; VMs in parallel, each to the end or its first error.
pub async fn apply(c: &Client, p: &Platform, plan: &Plan, quiet: bool) -> Vec<Applied> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(p.parallelism));
    let reboots = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    let mut set = tokio::task::JoinSet::new();
    for (i, step) in plan.steps.iter().enumerate() {
        let vm = p
            .vms
            .iter()
            .find(|v| v.name == step.name())
            .cloned()
            .expect("planned VMs are declared");
        let (c, step, sem, timeout) = (c.clone(), step.clone(), sem.clone(), p.task_timeout);
        let reboots = reboots.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            let (action, changes, result) = match &step {
                Step::Create { .. } => (
                    "create",
                    vec![],
                    create(&c, &vm, quiet, timeout)
                        .await
                        .map(|ips| Outcome {
                            ips,
                            ..Outcome::default()
                        })
                        .map_err(|e| e.to_string()),
                ),
                Step::Update { changes, .. } => (
                    "update",
                    changes.clone(),
                    update(&c, &step, &vm, quiet, timeout, &reboots)
                        .await
                        .map_err(|e| e.to_string()),
                ),
                Step::Unchanged { .. } => ("unchanged", vec![], Ok(Outcome::default())),
                Step::Conflict { reason, .. } => ("conflict", vec![], Err(reason.clone())),
            };
            match &result {
                Ok(o) if action != "unchanged" => progress(
                    quiet,
                    &vm.name,
                    &format!(
                        "done{}{}",
                        if o.ips.is_empty() {
                            String::new()
                        } else {
                            format!(", IP {}", o.ips.join(", "))
                        },
                        if o.pending.is_empty() {
                            ""
                        } else {
                            " (with changes pending until reboot)"
                        }
                    ),
                ),
                Err(e) => progress(quiet, &vm.name, &format!("FAILED: {e}")),
                _ => {}
            }
            (
                i,
                Applied {
                    name: vm.name.clone(),
                    vmid: vm.vmid,
                    action: action.into(),
                    ok: result.is_ok(),
                    error: result.as_ref().err().cloned(),
                    changes,
                    pending: result
                        .as_ref()
                        .map(|o| o.pending.clone())
                        .unwrap_or_default(),
                    rebooted: result.as_ref().is_ok_and(|o| o.rebooted),
                    ips: result.map(|o| o.ips).unwrap_or_default(),
                },
            )
        });
    }
    let mut out: Vec<(usize, Applied)> = vec![];
    while let Some(r) = set.join_next().await {
        if let Ok(x) = r {
            out.push(x);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, a)| a).collect()
}

/// Destroys one VM labctl manages (stop, then delete with its disks).
///
/// # Errors
/// A refusal for VMs without the managed tag; PVE errors.
pub async fn destroy(
    c: &Client,
    p: &Platform,
    name: &str,
    quiet: bool,
) -> crate::error::Result<LiveVm> {
    let live = live_vms(c).await.map_err(PveError::into_lab)?;
    let declared = p.vms.iter().find(|v| v.name == name).map(|v| v.vmid);
    let target = live
        .values()
        .filter(|l| l.kind == "qemu")
        .find(|l| declared == Some(l.vmid) || (declared.is_none() && l.name == name))
        .cloned()
        .ok_or_else(|| crate::error::LabError::usage(format!("no VM '{name}' on the cluster")))?;
    if !target.tags.contains(MANAGED_TAG) {
        return Err(crate::error::LabError::refused(format!(
            "VM '{}' (VMID {}) was not created by labctl (no '{MANAGED_TAG}' tag): refusing to destroy it",
            target.name, target.vmid
        ))
        .into());
    }
    let ctx = Ctx::vm(&target.node, target.vmid);
    if target.status == "running" {
        progress(quiet, name, "stopping");
        c.task(
            reqwest::Method::POST,
            &format!("/nodes/{}/qemu/{}/status/stop", target.node, target.vmid),
            &[],
            &ctx,
        )
        .await
        .map_err(PveError::into_lab)?;
    }
    progress(quiet, name, "destroying (with its disks)");
    c.task(
        reqwest::Method::DELETE,
        &format!("/nodes/{}/qemu/{}", target.node, target.vmid),
        &[
            ("purge", "1".into()),
            ("destroy-unreferenced-disks", "1".into()),
        ],
        &ctx,
    )
    .await
    .map_err(PveError::into_lab)?;
    Ok(target)
}
