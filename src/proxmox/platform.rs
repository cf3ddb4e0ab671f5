//! `deploy/platform.yaml`: the Proxmox endpoint, the API token by
//! reference, defaults, and the platform's VMs.
//!
//! Unknown keys are errors; every error names the file, line and field.
//! Secrets are never inline: `token.secret_file` (mode 0600) or
//! `token.secret_env`; a `secret:` key (or a token secret pasted into the
//! `id`) is refused.

use crate::error::LabError;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformFile {
    pub proxmox: ProxmoxConfig,
    #[serde(default)]
    pub defaults: VmSpec,
    pub vms: Vec<VmSpec>,
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// How labctl reaches the nodes' shells (VM backup and restore run
    /// `vzdump` and `qmrestore` there: the API refuses pipes).
    #[serde(default)]
    pub ssh: Option<SshConfig>,
}

/// `ssh:` — the nodes' SSH access for VM backups and restores.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// The remote user (vzdump and qmrestore need root).
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// The private key (refused when other users can read it).
    pub identity_file: PathBuf,
    /// The nodes' host keys, pinned (`ssh-keyscan` once, checked by hand):
    /// a node whose key is not in it is refused.
    pub known_hosts: PathBuf,
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Where each node's sshd is, when not at the node's name.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// Seconds to wait for a connection.
    #[serde(default = "default_ssh_timeout")]
    pub connect_timeout_secs: u32,
}

fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_timeout() -> u32 {
    10
}

/// How to reach the PVE API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// `https://host:8006` (tried in order until one answers).
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    pub token: TokenConfig,
    /// VMs worked on at the same time.
    #[serde(default = "default_parallelism")]
    pub parallelism: usize,
    /// Seconds to wait for a task (clone, resize, start) before giving up.
    #[serde(default = "default_task_timeout")]
    pub task_timeout_secs: u64,
}

fn default_parallelism() -> usize {
    2
}
fn default_task_timeout() -> u64 {
    900
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA that signed the PVE certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the server certificate (`AB:CD:...`), as shown
    /// by `pvenode cert info`.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Accept any certificate. Loud: a warning on every run.
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// `USER@REALM!TOKENID` (not secret).
    pub id: String,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Present only to be refused with a clear message.
    #[serde(default)]
    pub secret: Option<serde_norway::Value>,
}

/// A VM, or (under `defaults`) what VMs inherit.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: Option<String>,
    pub vmid: Option<u32>,
    /// The PVE node the VM runs on.
    pub node: Option<String>,
    /// `control-plane` or `worker` (for the bootstrap).
    pub role: Option<String>,
    pub template: Option<TemplateRef>,
    /// Full clone (default) or linked clone.
    pub full_clone: Option<bool>,
    /// How to reach a node other than the template's: `direct` (clone with
    /// `target`: the template's disks must be on shared storage) or
    /// `local-then-migrate` (clone on the template's node, then migrate
    /// the stopped clone).
    pub clone_via: Option<String>,
    /// What `apply` does when a running VM's change waits for a restart
    /// (memory, cores, CPU type, cloud-init settings): `never` (default:
    /// report it as pending until reboot) or `when-needed` (reboot the VM,
    /// one at a time, and wait for its agent and address).
    pub reboot_policy: Option<String>,
    pub cores: Option<u32>,
    pub sockets: Option<u32>,
    pub cpu: Option<String>,
    pub memory_mib: Option<u32>,
    pub scsihw: Option<String>,
    pub disks: Option<Vec<DiskSpec>>,
    pub networks: Option<Vec<NetSpec>>,
    pub ipconfig: Option<IpConfig>,
    pub nameserver: Option<String>,
    pub searchdomain: Option<String>,
    pub ciuser: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub pool: Option<String>,
    pub onboot: Option<bool>,
    pub agent: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    pub vmid: u32,
    pub node: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// `scsi0`, `virtio1`, ...
    pub slot: String,
    pub storage: String,
    /// `20G`, `512M`, `1T`.
    pub size: String,
    #[serde(default)]
    pub iothread: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// `net0`, `net1`, ...
    pub slot: String,
    #[serde(default = "default_model")]
    pub model: String,
    pub bridge: String,
    #[serde(default)]
    pub vlan: Option<u16>,
}

fn default_model() -> String {
    "virtio".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpConfig {
    /// `192.168.100.171/24` or `dhcp`.
    pub ip: String,
    #[serde(default)]
    pub gw: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    pub pod_cidr: String,
    pub service_cidr: String,
    #[serde(default = "default_cri")]
    pub cri_socket: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub cluster_name: Option<String>,
}

fn default_cri() -> String {
    "unix:///var/run/crio/crio.sock".into()
}

/// A VM with defaults applied and every field checked.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Vm {
    pub name: String,
    pub vmid: u32,
    pub node: String,
    pub role: String,
    pub template: (u32, String),
    pub full_clone: bool,
    /// Clone on the template's node and migrate the stopped clone (for a
    /// template on local storage and a VM on another node).
    pub migrate_after_clone: bool,
    /// `reboot_policy: when-needed` (or `apply --reboot`): reboot the VM
    /// when a change is pending until a restart.
    pub reboot: bool,
    pub cores: u32,
    pub sockets: u32,
    pub cpu: String,
    pub memory_mib: u32,
    pub scsihw: String,
    /// slot → (storage, size in bytes, size text, iothread)
    pub disks: Vec<(String, String, u64, String, bool)>,
    /// slot → PVE `netN` value
    pub networks: Vec<(String, String)>,
    pub ipconfig: Option<String>,
    pub ip: Option<String>,
    pub nameserver: Option<String>,
    pub searchdomain: Option<String>,
    pub ciuser: Option<String>,
    pub ssh_keys: Vec<String>,
    pub tags: BTreeSet<String>,
    pub pool: Option<String>,
    pub onboot: bool,
    pub agent: bool,
}

pub use super::{Token, Trust};

/// A validated platform file.
#[derive(Debug, Clone)]
pub struct Platform {
    pub path: PathBuf,
    pub endpoints: Vec<String>,
    pub trust: Trust,
    pub token_id: String,
    pub token_secret_file: Option<PathBuf>,
    pub token_secret_env: Option<String>,
    pub parallelism: usize,
    pub task_timeout: std::time::Duration,
    pub vms: Vec<Vm>,
    pub kubernetes: Option<KubernetesConfig>,
    pub ssh: Option<SshConfig>,
    pub warnings: Vec<String>,
}

/// The tag labctl puts on every VM it creates; only such VMs are updated or
/// destroyed.
pub const MANAGED_TAG: &str = "labctl-managed";

impl Platform {
    /// Reads the token secret from its file or variable.
    ///
    /// # Errors
    /// A key error for a missing or too-open secret file, a usage error for
    /// an unset variable.
    pub fn token(&self) -> crate::error::Result<Token> {
        let secret = if let Some(p) = &self.token_secret_file {
            let meta = std::fs::metadata(p).map_err(|e| {
                LabError::key(format!("PVE token secret file {}: {e}", p.display()))
            })?;
            crate::util::secret::check_private(p, &meta)?;
            std::fs::read_to_string(p)
                .map_err(|e| LabError::key(format!("PVE token secret file {}: {e}", p.display())))?
                .trim()
                .to_string()
        } else if let Some(v) = &self.token_secret_env {
            std::env::var(v).map_err(|_| {
                LabError::usage(format!(
                    "the PVE token secret variable {v} (proxmox.token.secret_env) is not set"
                ))
            })?
        } else {
            unreachable!("validated: one of secret_file, secret_env")
        };
        if secret.is_empty() {
            return Err(LabError::key("the PVE token secret is empty").into());
        }
        Ok(Token {
            id: self.token_id.clone(),
            secret: secrecy::SecretString::from(secret),
        })
    }
}

/// The line (1-based; 0 when not found) of the first `key: value` entry.
fn line_of_key(text: &str, key: &str, value: &str) -> usize {
    crate::util::located::yaml_line(text, key, value).map_or(0, |i| i + 1)
}

/// Parses a size like `20G` into bytes.
///
/// # Errors
/// A message naming the text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 20G, 512M or 1T"))?;
    let mult = match unit {
        "K" => 1u64 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        "" => 1,
        _ => return Err(format!("'{s}' is not a size like 20G, 512M or 1T")),
    };
    Ok(n * mult)
}

/// The line of `key:` inside the block that starts on line `start`
/// (1-based: a list entry's `- name:` line, or a `defaults:` line), if the
/// block sets it. Flow maps (`{ ip: … }`) count.
fn field_line(text: &str, start: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.get(start.checked_sub(1)?)?;
    let indent = first.len() - first.trim_start().len();
    let item = first.trim_start().starts_with('-');
    let (plain, flow, next) = (format!("{key}:"), format!("{{ {key}:"), format!(", {key}:"));
    for (i, l) in lines.iter().enumerate().skip(start - 1) {
        let t = l.trim_start();
        let ind = l.len() - t.len();
        let ends = ind < indent || (ind == indent && (!item || t.starts_with('-')));
        if i >= start && !t.is_empty() && !t.starts_with('#') && ends {
            break;
        }
        let entry = t.strip_prefix("- ").unwrap_or(t);
        if entry.starts_with(&plain) || t.contains(&flow) || t.contains(&next) {
            return Some(i + 1);
        }
    }
    None
}

/// A PVE identifier (a bridge, storage, CPU type or pool): letters,
/// digits, `-`, `_`, `.` — nothing that would end the property string
/// (`,` `=`) and add another property.
fn plain_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The network of an IPv4 CIDR, when the address has no host bits set.
fn host_bits_set(s: &str) -> Option<String> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let net = u32::from(ip) & mask;
    (net != u32::from(ip)).then(|| format!("{}/{len}", std::net::Ipv4Addr::from(net)))
}

fn valid_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

/// Reads and validates a platform file.
///
/// # Errors
/// A usage error `file:line:col: field: why`.
pub fn load(path: &Path) -> crate::error::Result<Platform> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LabError::usage(format!("cannot read platform file {}: {e}", path.display()))
    })?;
    parse(&text, path)
}

/// Parses and validates platform text.
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, path: &Path) -> crate::error::Result<Platform> {
    let file = path.display().to_string();
    let de = serde_norway::Deserializer::from_str(text);
    let raw: PlatformFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, col) = inner.location().map_or((0, 0), |l| (l.line(), l.column()));
        let msg = crate::util::located::yaml_message(&inner);
        crate::util::located::error(&file, line, Some(col), &field, msg)
    })?;
    let err = |line: usize, field: &str, why: String| -> crate::error::Error {
        crate::util::located::error(&file, line, None, field, why).into()
    };
    let mut warnings = vec![];
    let p = &raw.proxmox;
    let token_line = line_of_key(text, "id", &p.token.id);
    if p.token.secret.is_some() {
        return Err(err(
            line_of_key(text, "secret", "").max(token_line),
            "proxmox.token.secret",
            "an inline token secret is refused: put it in a file readable only by you (secret_file) or an environment variable (secret_env), and revoke the one written here".into(),
        ));
    }
    if p.token.id.contains('=') || p.token.id.matches('-').count() >= 4 {
        return Err(err(
            token_line,
            "proxmox.token.id",
            "looks like it contains the secret (USER@REALM!TOKENID=SECRET): give only USER@REALM!TOKENID here and the secret in secret_file or secret_env".into(),
        ));
    }
    if !(p.token.id.contains('@') && p.token.id.contains('!')) {
        return Err(err(
            token_line,
            "proxmox.token.id",
            format!("'{}' is not USER@REALM!TOKENID", p.token.id),
        ));
    }
    match (&p.token.secret_file, &p.token.secret_env) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(err(
                token_line,
                "proxmox.token",
                "give exactly one of secret_file or secret_env".into(),
            ))
        }
        _ => {}
    }
    if p.endpoints.is_empty() {
        return Err(err(
            0,
            "proxmox.endpoints",
            "list at least one https://host:8006".into(),
        ));
    }
    for e in &p.endpoints {
        let ok = e.starts_with("https://")
            || e.starts_with("http://127.0.0.1:")
            || e.starts_with("http://localhost:");
        if !ok {
            return Err(err(
                line_of_key(text, "", e),
                "proxmox.endpoints",
                format!(
                    "'{e}': use https:// (plain http only to 127.0.0.1, for tests and tunnels)"
                ),
            ));
        }
    }
    let trust = match (&p.tls.ca_file, &p.tls.fingerprint, p.tls.insecure) {
        (None, None, false) => Trust::System,
        (Some(f), None, false) => Trust::CaFile(f.clone()),
        (None, Some(fp), false) => {
            let bytes: Result<Vec<u8>, _> =
                fp.split(':').map(|h| u8::from_str_radix(h, 16)).collect();
            match bytes {
                Ok(b) if b.len() == 32 => Trust::Fingerprint(b),
                _ => {
                    return Err(err(
                        line_of_key(text, "fingerprint", fp),
                        "proxmox.tls.fingerprint",
                        "expected a SHA-256 fingerprint AB:CD:... (32 bytes), as `pvenode cert info` prints".into(),
                    ))
                }
            }
        }
        (None, None, true) => {
            warnings.push(format!(
                "{file}: proxmox.tls.insecure is set: the PVE certificate is NOT checked and the API token can be stolen by anyone on the path"
            ));
            Trust::Insecure
        }
        _ => {
            return Err(err(
                0,
                "proxmox.tls",
                "give one of ca_file, fingerprint or insecure".into(),
            ))
        }
    };
    if p.parallelism == 0 {
        return Err(err(0, "proxmox.parallelism", "must be at least 1".into()));
    }
    let d = &raw.defaults;
    if d.name.is_some() || d.vmid.is_some() || d.ipconfig.is_some() {
        return Err(err(
            0,
            "defaults",
            "name, vmid and ipconfig belong to each VM, not to defaults".into(),
        ));
    }
    let mut vms = vec![];
    let mut names = BTreeSet::new();
    let mut ids = BTreeMap::new();
    let mut ips: BTreeMap<String, String> = BTreeMap::new();
    let defaults_line = line_of_key(text, "defaults", "");
    for (i, v) in raw.vms.iter().enumerate() {
        let name = v.name.clone().unwrap_or_default();
        let line = line_of_key(text, "name", &name);
        // The field's own line: in the VM's entry, else where defaults
        // set it, else the VM's name line.
        let at = |key: &str| {
            field_line(text, line, key)
                .or_else(|| field_line(text, defaults_line, key))
                .unwrap_or(line)
        };
        let f = |n: &str| format!("vms[{i}].{n}");
        macro_rules! pick {
            ($field:ident) => {
                v.$field.clone().or_else(|| d.$field.clone())
            };
        }
        macro_rules! need {
            ($field:ident) => {
                pick!($field).ok_or_else(|| {
                    err(
                        line,
                        &f(stringify!($field)),
                        "missing (here or under defaults)".into(),
                    )
                })?
            };
        }
        // A field of two words: absent or the first is false, the second true.
        macro_rules! either {
            ($field:ident, $off:literal, $on:literal) => {
                match pick!($field).as_deref() {
                    None | Some($off) => false,
                    Some($on) => true,
                    Some(other) => {
                        return Err(err(
                            at(stringify!($field)),
                            &f(stringify!($field)),
                            format!("'{other}': use {} or {}", $off, $on),
                        ))
                    }
                }
            };
        }
        let valid_name = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !name.starts_with('-');
        if !valid_name {
            return Err(err(
                at("name"),
                &f("name"),
                format!("'{name}' is not a DNS name (letters, digits, '-')"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                at("name"),
                &f("name"),
                format!("VM '{name}' is declared twice"),
            ));
        }
        let vmid = v.vmid.ok_or_else(|| {
            err(
                at("vmid"),
                &f("vmid"),
                "missing: labctl uses the VMIDs you declare, never /cluster/nextid".into(),
            )
        })?;
        if !(100..=999_999_999).contains(&vmid) {
            return Err(err(
                at("vmid"),
                &f("vmid"),
                format!("{vmid} is outside 100-999999999"),
            ));
        }
        if let Some(other) = ids.insert(vmid, name.clone()) {
            return Err(err(
                at("vmid"),
                &f("vmid"),
                format!("{vmid} is also {other}'s"),
            ));
        }
        let template = need!(template);
        let cores = need!(cores);
        let memory_mib = need!(memory_mib);
        if cores == 0 || memory_mib < 16 {
            return Err(err(
                at("cores"),
                &f("cores"),
                "cores ≥ 1 and memory_mib ≥ 16".into(),
            ));
        }
        let scsihw = pick!(scsihw).unwrap_or_else(|| "virtio-scsi-single".into());
        const SCSIHW: [&str; 6] = [
            "lsi",
            "lsi53c810",
            "virtio-scsi-pci",
            "virtio-scsi-single",
            "megasas",
            "pvscsi",
        ];
        if !SCSIHW.contains(&scsihw.as_str()) {
            return Err(err(
                at("scsihw"),
                &f("scsihw"),
                format!("'{scsihw}' is not one of {}", SCSIHW.join(", ")),
            ));
        }
        let mut disks = vec![];
        for (k, dk) in need!(disks).iter().enumerate() {
            let okslot = ["scsi", "virtio", "sata", "ide"].iter().any(|p| {
                dk.slot
                    .strip_prefix(p)
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            });
            if !okslot {
                return Err(err(
                    at("disks"),
                    &f(&format!("disks[{k}].slot")),
                    format!("'{}' is not a disk slot like scsi0", dk.slot),
                ));
            }
            if !plain_id(&dk.storage) {
                return Err(err(
                    at("storage"),
                    &f(&format!("disks[{k}].storage")),
                    format!(
                        "'{}' is not a storage ID (letters, digits, - _ .)",
                        dk.storage
                    ),
                ));
            }
            let bytes = parse_size(&dk.size)
                .map_err(|e| err(at("disks"), &f(&format!("disks[{k}].size")), e))?;
            disks.push((
                dk.slot.clone(),
                dk.storage.clone(),
                bytes,
                dk.size.clone(),
                dk.iothread,
            ));
        }
        let mut networks = vec![];
        for (k, n) in pick!(networks).unwrap_or_default().iter().enumerate() {
            const MODELS: [&str; 4] = ["virtio", "e1000", "rtl8139", "vmxnet3"];
            if !MODELS.contains(&n.model.as_str()) {
                return Err(err(
                    at("networks"),
                    &f(&format!("networks[{k}].model")),
                    format!("'{}' is not one of {}", n.model, MODELS.join(", ")),
                ));
            }
            if !n
                .slot
                .strip_prefix("net")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
            {
                return Err(err(
                    at("networks"),
                    &f(&format!("networks[{k}].slot")),
                    format!("'{}' is not a slot like net0", n.slot),
                ));
            }
            if !plain_id(&n.bridge) {
                return Err(err(
                    at("bridge"),
                    &f(&format!("networks[{k}].bridge")),
                    format!("'{}' is not a bridge name (letters, digits, - _ .): a ',' or '=' would add properties to {}", n.bridge, n.slot),
                ));
            }
            let mut val = format!("{},bridge={}", n.model, n.bridge);
            if let Some(tag) = n.vlan {
                if !(1..=4094).contains(&tag) {
                    return Err(err(
                        at("networks"),
                        &f(&format!("networks[{k}].vlan")),
                        format!("{tag} is outside 1-4094"),
                    ));
                }
                val.push_str(&format!(",tag={tag}"));
            }
            networks.push((n.slot.clone(), val));
        }
        let (ipconfig, ip) = match &v.ipconfig {
            None => (None, None),
            Some(c) if c.ip == "dhcp" => (Some("ip=dhcp".to_string()), None),
            Some(c) => {
                if !valid_cidr(&c.ip) {
                    return Err(err(
                        at("ipconfig"),
                        &f("ipconfig.ip"),
                        format!(
                            "'{}' is not an IPv4 address/prefix like 192.168.100.171/24, or dhcp",
                            c.ip
                        ),
                    ));
                }
                let mut s = format!("ip={}", c.ip);
                if let Some(gw) = &c.gw {
                    if gw.parse::<std::net::Ipv4Addr>().is_err() {
                        return Err(err(
                            at("ipconfig"),
                            &f("ipconfig.gw"),
                            format!("'{gw}' is not an IPv4 address"),
                        ));
                    }
                    s.push_str(&format!(",gw={gw}"));
                }
                (
                    Some(s),
                    Some(c.ip.split('/').next().unwrap_or_default().to_string()),
                )
            }
        };
        let ssh_keys = pick!(ssh_keys).unwrap_or_default();
        for (k, key) in ssh_keys.iter().enumerate() {
            if !(key.starts_with("ssh-") || key.starts_with("ecdsa-") || key.starts_with("sk-"))
                || key.contains('\n')
            {
                return Err(err(
                    at("ssh_keys"),
                    &f(&format!("ssh_keys[{k}]")),
                    "not an OpenSSH public key line (ssh-ed25519 AAAA... comment)".into(),
                ));
            }
            if key.contains("PRIVATE KEY") {
                return Err(err(
                    at("ssh_keys"),
                    &f(&format!("ssh_keys[{k}]")),
                    "this is a private key: never put it here".into(),
                ));
            }
        }
        let mut tags: BTreeSet<String> = pick!(tags).unwrap_or_default().into_iter().collect();
        for t in &tags {
            if t.is_empty()
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
            {
                return Err(err(
                    at("tags"),
                    &f("tags"),
                    format!("'{t}' is not a PVE tag (letters, digits, - _ . +)"),
                ));
            }
        }
        tags.insert(MANAGED_TAG.to_string());
        let role = pick!(role).unwrap_or_else(|| "worker".into());
        if role != "worker" && role != "control-plane" {
            return Err(err(
                at("role"),
                &f("role"),
                format!("'{role}': use control-plane or worker"),
            ));
        }
        let cpu = pick!(cpu).unwrap_or_else(|| "host".into());
        if !plain_id(&cpu) {
            return Err(err(
                at("cpu"),
                &f("cpu"),
                format!(
                    "'{cpu}' is not a CPU type like host or x86-64-v2-AES (flags are not set here)"
                ),
            ));
        }
        let pool = pick!(pool);
        if let Some(p) = pool.as_ref().filter(|p| !plain_id(p)) {
            return Err(err(
                at("pool"),
                &f("pool"),
                format!("'{p}' is not a pool ID"),
            ));
        }
        if let Some(addr) = &ip {
            if let Some(other) = ips.insert(addr.clone(), name.clone()) {
                return Err(err(
                    at("ipconfig"),
                    &f("ipconfig.ip"),
                    format!("{addr} is also {other}'s address"),
                ));
            }
        }
        let full_clone = pick!(full_clone).unwrap_or(true);
        let node = need!(node);
        let migrate_after_clone = either!(clone_via, "direct", "local-then-migrate");
        let reboot = either!(reboot_policy, "never", "when-needed");
        if !full_clone && node != template.node {
            return Err(err(at("full_clone"), &f("full_clone"), format!("a linked clone stays on the template's node ({}); use full_clone: true or a template on {node}", template.node)));
        }
        vms.push(Vm {
            name: name.clone(),
            vmid,
            node,
            role,
            template: (template.vmid, template.node),
            full_clone,
            migrate_after_clone,
            reboot,
            cores,
            sockets: pick!(sockets).unwrap_or(1),
            cpu,
            memory_mib,
            scsihw,
            disks,
            networks,
            ipconfig,
            ip,
            nameserver: pick!(nameserver),
            searchdomain: pick!(searchdomain),
            ciuser: pick!(ciuser),
            ssh_keys,
            tags,
            pool,
            onboot: pick!(onboot).unwrap_or(true),
            agent: pick!(agent).unwrap_or(true),
        });
    }
    if let Some(k) = &raw.kubernetes {
        for (fld, v) in [("pod_cidr", &k.pod_cidr), ("service_cidr", &k.service_cidr)] {
            if !valid_cidr(v) {
                return Err(err(
                    line_of_key(text, fld, v),
                    &format!("kubernetes.{fld}"),
                    format!("'{v}' is not a CIDR like 172.16.0.0/16"),
                ));
            }
            if let Some(net) = host_bits_set(v) {
                return Err(err(
                    line_of_key(text, fld, v),
                    &format!("kubernetes.{fld}"),
                    format!("'{v}' has host bits set: the network is {net}"),
                ));
            }
        }
        if vms.iter().filter(|v| v.role == "control-plane").count() != 1 {
            return Err(err(
                0,
                "vms",
                "the bootstrap needs exactly one VM with role: control-plane".into(),
            ));
        }
    }
    if let Some(ssh) = &raw.ssh {
        let line = line_of_key(text, "ssh", "");
        if ssh.user.is_empty()
            || !ssh
                .user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(err(
                line,
                "ssh.user",
                format!("'{}' is not a user name", ssh.user),
            ));
        }
        if ssh.port == 0 {
            return Err(err(line, "ssh.port", "must be 1-65535".into()));
        }
        for (node, host) in &ssh.hosts {
            if host.is_empty() || host.contains(char::is_whitespace) || host.starts_with('-') {
                return Err(err(
                    line_of_key(text, node, ""),
                    &format!("ssh.hosts.{node}"),
                    format!("'{host}' is not a host name or address"),
                ));
            }
        }
    }
    Ok(Platform {
        path: path.to_path_buf(),
        endpoints: p
            .endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect(),
        trust,
        token_id: p.token.id.clone(),
        token_secret_file: p.token.secret_file.clone(),
        token_secret_env: p.token.secret_env.clone(),
        parallelism: p.parallelism,
        task_timeout: std::time::Duration::from_secs(p.task_timeout_secs),
        vms,
        kubernetes: raw.kubernetes.clone(),
        ssh: raw.ssh.clone(),
        warnings,
    })
}

/// Connects to the first endpoint that answers `/version`: each endpoint
/// is asked once in turn, moving to the next at once when one fails; only
/// when none answered and some failure can pass (a timeout, a busy node)
/// is the round repeated, with backoff. A refused token stops at once.
///
/// # Errors
/// The last endpoint's error.
pub async fn connect(p: &Platform) -> crate::error::Result<super::Client> {
    let token = p.token()?;
    let opts = super::Options {
        trust: p.trust.clone(),
        task_timeout: p.task_timeout,
        ..Default::default()
    };
    let c = super::Client::with_endpoints(&p.endpoints, &token, opts.clone())?;
    let mut round = 0;
    loop {
        let mut last = None;
        let mut again = false;
        for i in 0..c.endpoints() {
            c.use_endpoint(i);
            let probe = c
                .once(
                    reqwest::Method::GET,
                    "/version",
                    &[],
                    &super::Ctx::default(),
                )
                .await;
            c.use_endpoint(i);
            match probe {
                Ok(_) => return Ok(c),
                Err(err) if err.status == 401 || err.status == 403 => return Err(err.into_lab()),
                Err(err) => {
                    again |= err.transient();
                    last = Some(err);
                }
            }
        }
        round += 1;
        if !again || round >= opts.attempts {
            return Err(last.expect("at least one endpoint").into_lab());
        }
        tokio::time::sleep(opts.retry_base * 2u32.pow(round - 1)).await;
    }
}
