//! A Proxmox VE API simulator (test double) on 127.0.0.1.
//!
//! Proxmox VE cannot run here, so this plays its API for `labctl provision`:
//! - **Every request is checked against the PVE API schema**
//!   (`tests/fixtures/pve/api-subset.json`, from the contract in
//!   `../shared/contracts/proxmox/`): the path must exist, the method be
//!   allowed, required parameters be present, unknown parameters are refused,
//!   and types, enums, ranges, patterns, formats and property strings
//!   (`virtio,bridge=vmbr0`, `ip=…/24,gw=…`) are checked — like PVE, a
//!   violation is a 400 "Parameter verification failed." with per-parameter
//!   `errors`.
//! - It behaves like PVE where labctl depends on it: API-token checking
//!   (401 without it), asynchronous tasks with UPIDs, status and logs
//!   (`exitstatus` "OK" or an error), a VM config locked while its clone
//!   runs, digests on config, no shrinking disks, a guest agent that answers
//!   only after the VM has booted, and PVE's error messages in the HTTP
//!   reason phrase; a running VM keeps what it cannot hot-plug in the
//!   config's pending section (`…/pending`, `…/cloudinit`, `current=1`)
//!   until a start or a reboot applies it.
//! - Faults on request: config lock timeouts on clone, "got no worker upid"
//!   on start, a task status 400 while a new UPID is "not visible yet", a
//!   failing clone task, start tasks that end "WARNINGS: 1" (a success that
//!   logged warnings), a VMID taken by someone else just before a clone,
//!   and seeded chaos ([`Chaos`]): lock timeouts, lost replies and a
//!   pveproxy restart, at random but bounded.
//!
//! Regenerate the schema subset with the Python snippet in
//! tests/fixtures/pve/README.md (it keeps only each method's `parameters`).

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TOKEN_ID: &str = "labctl@pve!provision";
pub const TOKEN_SECRET: &str = "0b3f6c1e-test-only-secret";

#[derive(Debug, Clone, Default)]
pub struct SimVm {
    pub name: String,
    pub node: String,
    pub template: bool,
    pub running: bool,
    /// The current config (what the running QEMU uses).
    pub config: BTreeMap<String, String>,
    /// The config file's `[PENDING]` section: values written while the
    /// VM ran that need a restart (qemu-server vmconfig_hotplug_pending).
    pub pending: BTreeMap<String, String>,
    /// The cloud-init options the cloud-init drive was last generated
    /// from (at start); PVE records the difference in the config's
    /// `[special:cloudinit]` section and `GET …/cloudinit` shows it.
    pub cloudinit_drive: BTreeMap<String, String>,
    pub pool: Option<String>,
    pub lock: Option<String>,
    pub booted_at: Option<Instant>,
}

/// Options qemu-server applies to a running VM's config at once
/// (`$fast_plug_option` in PVE/QemuServer.pm, which adds every cloud-init
/// option of `$confdesc_cloudinit`): they need no device change. Cloud-init
/// options reach the guest only when the drive is regenerated at start.
fn fast_plug(key: &str) -> bool {
    [
        "description",
        "hookscript",
        "lock",
        "migrate_downtime",
        "migrate_speed",
        "name",
        "onboot",
        "protection",
        "shares",
        "startup",
        "tags",
        "vmstatestorage",
    ]
    .contains(&key)
        || cloudinit_option(key)
}

/// `$confdesc_cloudinit` (PVE/QemuServer.pm) and `ipconfigN`.
fn cloudinit_option(key: &str) -> bool {
    [
        "cicustom",
        "cipassword",
        "citype",
        "ciupgrade",
        "ciuser",
        "nameserver",
        "searchdomain",
        "sshkeys",
    ]
    .contains(&key)
        || key.starts_with("ipconfig")
}

/// Whether qemu-server can apply `key: value` to a running VM with the
/// default `hotplug: network,disk,usb` (vmconfig_hotplug_pending): NICs
/// (vmconfig_update_net), new SCSI/VirtIO disks (vmconfig_update_disk;
/// IDE and SATA are never hot-plugged), an unchanged `agent`
/// (vmconfig_update_agent); `memory` needs the `memory` feature and
/// `cores`, `sockets`, `cpu`, `scsihw` are never hot-plugged ("skip").
fn hotpluggable(vm: &SimVm, key: &str, value: &str) -> bool {
    let hotplug = vm
        .config
        .get("hotplug")
        .cloned()
        .unwrap_or("network,disk,usb".into());
    let has = |f: &str| hotplug.split(',').any(|x| x == f);
    if fast_plug(key) {
        return true;
    }
    if key.starts_with("net") {
        return has("network");
    }
    if ["scsi", "virtio"].iter().any(|p| key.starts_with(p)) && !key.starts_with("scsihw") {
        return has("disk") && vm.config.get(key).is_none_or(|old| old == value);
    }
    match key {
        "agent" => vm.config.get(key).is_some_and(|old| old == value),
        "memory" => has("memory"),
        _ => false,
    }
}

impl SimVm {
    /// The config with pending values applied: what `GET …/config`
    /// returns unless `current=1` (PVE::QemuConfig load_current_config).
    pub fn pending_view(&self) -> BTreeMap<String, String> {
        let mut c = self.config.clone();
        c.extend(self.pending.clone());
        c
    }

    /// What a start does before QEMU runs (qemu-server vm_start_nolock):
    /// apply the `[PENDING]` section (vmconfig_apply_pending), then
    /// regenerate the cloud-init drive (Cloudinit apply_cloudinit_config,
    /// which clears `[special:cloudinit]`).
    fn apply_pending_at_start(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.config.extend(pending);
        self.cloudinit_drive = self
            .config
            .iter()
            .filter(|(k, _)| cloudinit_option(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }
}

#[derive(Debug, Clone)]
struct Task {
    node: String,
    kind: String,
    vmid: u32,
    started: u64,
    done_at: Instant,
    exit: String,
    log: Vec<String>,
    polled: bool,
    then: Option<Effect>,
}

#[derive(Debug, Clone)]
enum Effect {
    Unlock(u32),
    Stop(u32),
    Delete(u32),
    /// qmreboot: shut down; qmeventd starts the VM again (PVE::QemuServer
    /// vm_reboot's reboot request), which applies pending changes.
    Reboot(u32),
}

/// Faults a test can ask for.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub clone_lock_timeouts: u32,
    pub start_no_worker: u32,
    pub task_status_400: u32,
    pub clone_task_fails: u32,
    /// Start tasks that end "WARNINGS: 1" (the VM starts).
    pub start_warnings: u32,
    /// Someone else creates a VM with the new VMID just before the next
    /// clone reaches the node (a race between plan and apply).
    pub vmid_taken_at_clone: bool,
    /// The address every guest agent reports (a guest whose own network
    /// setup overrides cloud-init's).
    pub agent_ip: Option<String>,
    /// Requests (by path suffix, e.g. "/clone", or method and suffix,
    /// "PUT /qemu/701/config") whose reply is lost once after the work
    /// was done.
    pub lose_reply: Vec<String>,
    /// Seeded random faults (the chaos test).
    pub chaos: Option<Chaos>,
}

/// Seeded, bounded random faults: lock timeouts on requests that change a
/// VM, replies lost after the work was done, and one pveproxy restart
/// that drops every connection for a while (tasks run on: they are
/// pvedaemon's forked workers).
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    state: u64,
    /// Faults left to inject; none once it reaches 0.
    pub budget: u32,
    /// Percent of VM-changing requests refused with a lock timeout.
    pub lock_timeout_pct: u64,
    /// Percent of successful VM-changing requests whose reply is lost.
    pub drop_reply_pct: u64,
    /// The request number at which pveproxy restarts …
    pub restart_at: u64,
    /// … and how long it drops every connection.
    pub restart_ms: u64,
    requests: u64,
    restart_until: Option<Instant>,
    /// What was injected: "lock <path>", "drop <path>", "restart <path>".
    pub injected: Vec<String>,
}

impl Chaos {
    pub fn new(seed: u64) -> Chaos {
        Chaos {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            budget: 12,
            lock_timeout_pct: 15,
            drop_reply_pct: 15,
            restart_at: 25 + seed % 20,
            restart_ms: 400,
            ..Chaos::default()
        }
    }

    /// xorshift64*: a percent roll.
    fn roll(&mut self, pct: u64) -> bool {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) % 100 < pct
    }

    fn spend(&mut self, what: &str, path: &str) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        self.injected.push(format!("{what} {path}"));
        true
    }
}

/// Requests that change a VM (and take its config lock in qemu-server).
fn changes_vm(method: &str, path: &str) -> bool {
    method != "GET"
        && [
            "/clone",
            "/config",
            "/status/start",
            "/status/reboot",
            "/resize",
            "/migrate",
        ]
        .iter()
        .any(|p| path.ends_with(p))
}

#[derive(Debug, Default)]
pub struct Sim {
    pub vms: BTreeMap<u32, SimVm>,
    tasks: BTreeMap<String, Task>,
    pub faults: Faults,
    /// Every request: (method, path, params).
    pub log: Vec<(String, String, BTreeMap<String, String>)>,
    /// Requests refused by the schema check (should stay empty).
    pub schema_violations: Vec<String>,
    next_task: u64,
    pub task_ms: u64,
    pub boot_ms: u64,
    /// The cluster filesystem shared with the nodes' shells (as pmxcfs's
    /// `/etc/pve` is on PVE): VM configs in `nodes/<node>/qemu-server/
    /// <vmid>.conf`, written by the test `qmrestore` and read by the test
    /// `vzdump` (examples/fakepve.rs). Synced before and after each request.
    pub pmxcfs: Option<std::path::PathBuf>,
    /// VMs destroyed since the last export (their config files go too).
    removed: Vec<u32>,
    /// Storage IDs that every node sees (storage.cfg `shared`).
    pub shared_storage: Vec<String>,
    /// LXC containers: VMID → (name, node). They share the VMID space
    /// with VMs and are listed by /cluster/resources with `type: lxc`.
    pub containers: BTreeMap<u32, (String, String)>,
    /// Reboots requested while another VM's guest was still down from its
    /// own restart (a client that reboots the platform all at once).
    pub overlapping_reboots: u32,
}

impl Sim {
    /// Takes in VMs a node created (`qmrestore` writes its config file;
    /// the API lists it from then on, as PVE does).
    fn import_pmxcfs(&mut self) {
        let Some(root) = self.pmxcfs.clone() else {
            return;
        };
        let Ok(nodes) = std::fs::read_dir(root.join("nodes")) else {
            return;
        };
        for n in nodes.flatten() {
            let node = n.file_name().to_string_lossy().to_string();
            let Ok(files) = std::fs::read_dir(n.path().join("qemu-server")) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                let Some(vmid) = name
                    .strip_suffix(".conf")
                    .and_then(|v| v.parse::<u32>().ok())
                else {
                    continue;
                };
                if self.vms.contains_key(&vmid) {
                    continue;
                }
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                // PVE's config format: `key: value` lines (qemu-server's
                // PVE::QemuServer::parse_vm_config), until a snapshot section.
                let config: BTreeMap<String, String> = text
                    .lines()
                    .take_while(|l| !l.starts_with('['))
                    .filter_map(|l| l.split_once(": "))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                self.vms.insert(
                    vmid,
                    SimVm {
                        name: config.get("name").cloned().unwrap_or_default(),
                        node: node.clone(),
                        template: config.get("template").is_some_and(|t| t == "1"),
                        running: false,
                        config,
                        pool: None,
                        lock: None,
                        booted_at: None,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Writes every VM's config where the nodes read it.
    fn export_pmxcfs(&mut self) {
        let Some(root) = &self.pmxcfs else { return };
        for vmid in std::mem::take(&mut self.removed) {
            if let Ok(nodes) = std::fs::read_dir(root.join("nodes")) {
                for n in nodes.flatten() {
                    let _ = std::fs::remove_file(n.path().join(format!("qemu-server/{vmid}.conf")));
                }
            }
        }
        for (vmid, vm) in &self.vms {
            let dir = root.join("nodes").join(&vm.node).join("qemu-server");
            std::fs::create_dir_all(&dir).unwrap();
            let text: String = vm
                .config
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect();
            std::fs::write(dir.join(format!("{vmid}.conf")), text).unwrap();
        }
    }
}

pub struct PveSim {
    pub state: Arc<Mutex<Sim>>,
    pub port: u16,
    tls: bool,
    _rt: tokio::runtime::Runtime,
}

impl PveSim {
    /// A cluster of pve1..pve3 with templates 9000 (pve1), 9001 (pve2), 9002 (pve3).
    pub fn start() -> PveSim {
        Self::start_with(None)
    }

    /// The same over HTTPS with the given PEM certificate chain and key.
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> PveSim {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert_pem)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key_pem).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
    }

    fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> PveSim {
        let mut sim = Sim {
            task_ms: 150,
            boot_ms: 300,
            shared_storage: vec!["ceph-vm".into()],
            ..Default::default()
        };
        for (vmid, node) in [(9000, "pve1"), (9001, "pve2"), (9002, "pve3")] {
            let mut config = BTreeMap::new();
            for (k, v) in [
                ("cores", "1"),
                ("memory", "2048"),
                ("scsihw", "virtio-scsi-pci"),
                ("scsi0", &format!("local-lvm:base-{vmid}-disk-0,size=2252M")),
                ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
                (
                    "ide2",
                    &format!("local-lvm:vm-{vmid}-cloudinit,media=cdrom"),
                ),
                ("agent", "1"),
                ("template", "1"),
                ("name", "ubuntu-2204-cloudinit"),
            ] {
                config.insert(k.to_string(), v.to_string());
            }
            sim.vms.insert(
                vmid,
                SimVm {
                    name: "ubuntu-2204-cloudinit".into(),
                    node: node.into(),
                    template: true,
                    running: false,
                    config,
                    pool: None,
                    lock: None,
                    booted_at: None,
                    ..Default::default()
                },
            );
        }
        let state = Arc::new(Mutex::new(sim));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let schema: Arc<Value> = Arc::new(
            serde_json::from_str(include_str!("../fixtures/pve/api-subset.json")).unwrap(),
        );
        let st = state.clone();
        let tls_on = tls.is_some();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, schema, tls) = (st.clone(), schema.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, schema) = (st.clone(), schema.clone());
                        async move {
                            handle(req, &st, &schema)
                                .await
                                .ok_or_else(|| std::io::Error::other("reply lost"))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            // A client that rejects the certificate ends here.
                            let Ok(s) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        }
                    }
                });
            }
        });
        PveSim {
            state,
            port,
            tls: tls_on,
            _rt: rt,
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Another node's pveproxy (HTTP) in front of the same cluster: it
    /// serves `requests` requests, then the node goes down: connections
    /// close unanswered and new ones are refused.
    pub fn node_that_dies_after(&self, requests: u64) -> String {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = self
            ._rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let schema: Arc<Value> = Arc::new(
            serde_json::from_str(include_str!("../fixtures/pve/api-subset.json")).unwrap(),
        );
        let (st, served, dead) = (
            self.state.clone(),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        self._rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if dead.load(Ordering::SeqCst) {
                    // Dropping the listener: from now on, refused.
                    return;
                }
                let (st, schema, served, dead) =
                    (st.clone(), schema.clone(), served.clone(), dead.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (st, schema, served, dead) =
                            (st.clone(), schema.clone(), served.clone(), dead.clone());
                        async move {
                            if served.fetch_add(1, Ordering::SeqCst) >= requests {
                                dead.store(true, Ordering::SeqCst);
                                return Err(std::io::Error::other("node down"));
                            }
                            handle(req, &st, &schema)
                                .await
                                .ok_or_else(|| std::io::Error::other("reply lost"))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Sim) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Mutating requests seen (POST/PUT/DELETE), as "METHOD path".
    pub fn writes(&self) -> Vec<String> {
        self.with(|s| {
            s.log
                .iter()
                .filter(|(m, ..)| m != "GET")
                .map(|(m, p, _)| format!("{m} {p}"))
                .collect()
        })
    }
}

type Resp = hyper::Response<http_body_util::Full<hyper::body::Bytes>>;

fn reply(status: u16, reason: &str, body: Value) -> Resp {
    let mut r = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    if status != 200 {
        // PVE puts its message in the reason phrase.
        r.extensions_mut().insert(
            hyper::ext::ReasonPhrase::try_from(reason.replace(['\r', '\n'], " ").into_bytes())
                .unwrap(),
        );
    }
    r
}

fn ok(data: Value) -> Resp {
    reply(200, "OK", json!({ "data": data }))
}

fn fail(msg: &str) -> Resp {
    reply(
        500,
        msg,
        json!({ "data": null, "message": format!("{msg}\n") }),
    )
}

fn decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    urlencoding::decode(&plus)
        .map(|c| c.into_owned())
        .unwrap_or(plus)
}

fn parse_form(s: &str) -> BTreeMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Finds the schema path matching `path`, with the path parameters.
fn match_path<'a>(schema: &'a Value, path: &str) -> Option<(&'a str, BTreeMap<String, String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    for tpl in schema.as_object().unwrap().keys() {
        let t: Vec<&str> = tpl.trim_matches('/').split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut params = BTreeMap::new();
        let matched = t.iter().zip(&segs).all(|(a, b)| {
            if a.starts_with('{') {
                params.insert(a.trim_matches(['{', '}']).to_string(), decode(b));
                true
            } else {
                a == b
            }
        });
        if matched {
            return Some((tpl.as_str(), params));
        }
    }
    None
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn check_format(format: &str, value: &str) -> Result<(), String> {
    let re = |r: &str| {
        regex::Regex::new(&format!("^(?:{r})$"))
            .unwrap()
            .is_match(value)
    };
    let ok = match format {
        "pve-node" => re(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?"),
        "pve-vmid" => value.parse::<u32>().is_ok_and(|v| v >= 100),
        "urlencoded" => re(r"[-%a-zA-Z0-9_.!~*'()]*"),
        "pve-tag-list" => value
            .split([';', ',', ' '])
            .filter(|t| !t.is_empty())
            .all(|t| {
                regex::Regex::new(r"^(?i)[a-z0-9_][a-z0-9_\-+.]*$")
                    .unwrap()
                    .is_match(t)
            }),
        "dns-name" => re(
            r"([a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*([A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?)",
        ),
        "pve-qm-ipconfig" => value.split(',').all(|p| {
            p.split_once('=').is_some_and(|(k, v)| match k {
                "ip" => v == "dhcp" || re_cidr(v),
                "gw" => v.parse::<std::net::Ipv4Addr>().is_ok(),
                "ip6" | "gw6" => true,
                _ => false,
            })
        }),
        "address-list" => value
            .split([' ', ',', ';'])
            .all(|a| a.parse::<std::net::IpAddr>().is_ok()),
        "pve-poolid" | "pve-storage-id" => re(r"[A-Za-z][A-Za-z0-9\-_]*"),
        "pve-vm-cpu-conf" => !value.is_empty(),
        "disk-size" => re(r"\d+(\.\d+)?[KMGT]?"),
        "mac-addr" => re(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"),
        "pve-bridge-id" => re(r"[-_.\w\d]+"),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "value does not match the regex pattern / format '{format}'"
        ))
    }
}

fn re_cidr(v: &str) -> bool {
    v.split_once('/').is_some_and(|(ip, l)| {
        ip.parse::<std::net::Ipv4Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 32)
    })
}

/// Checks one value against a property schema.
fn check_value(prop: &Value, value: &str) -> Result<(), String> {
    let ty = prop.get("type").and_then(Value::as_str).unwrap_or("string");
    match ty {
        "integer" => {
            let n: i64 = value
                .parse()
                .map_err(|_| format!("type check ('integer') failed - got '{value}'"))?;
            if let Some(min) = prop.get("minimum").and_then(num) {
                if (n as f64) < min {
                    return Err(format!("value must have a minimum value of {min}"));
                }
            }
            if let Some(max) = prop.get("maximum").and_then(num) {
                if (n as f64) > max {
                    return Err(format!("value must have a maximum value of {max}"));
                }
            }
        }
        "number" => {
            value
                .parse::<f64>()
                .map_err(|_| format!("type check ('number') failed - got '{value}'"))?;
        }
        "boolean"
            if !["0", "1", "true", "false", "yes", "no", "on", "off"]
                .contains(&value.to_ascii_lowercase().as_str()) =>
        {
            return Err(format!("type check ('boolean') failed - got '{value}'"));
        }
        _ => {}
    }
    if let Some(en) = prop.get("enum").and_then(Value::as_array) {
        if !en.iter().any(|e| e.as_str() == Some(value)) {
            return Err(format!(
                "value '{value}' does not have a value in the enumeration"
            ));
        }
    }
    if let Some(max) = prop.get("maxLength").and_then(num) {
        if value.len() as f64 > max {
            return Err(format!("value may only be {max} characters long"));
        }
    }
    if let Some(p) = prop.get("pattern").and_then(Value::as_str) {
        let p = p.replace("(?^:", "(?:").replace("(?^i:", "(?i:");
        if !regex::Regex::new(&format!("^(?:{p})$"))
            .unwrap()
            .is_match(value)
        {
            return Err(format!("value does not match the regex pattern {p}"));
        }
    }
    match prop.get("format") {
        Some(Value::String(f)) => check_format(f, value)?,
        Some(Value::Object(fields)) => check_property_string(fields, value)?,
        _ => {}
    }
    Ok(())
}

/// `key=value,...` with an optional positional default key.
fn check_property_string(fields: &Map<String, Value>, value: &str) -> Result<(), String> {
    let default_key = fields
        .iter()
        .find(|(_, v)| v.get("default_key").is_some())
        .map(|(k, _)| k.clone());
    let mut seen = vec![];
    for (i, part) in value.split(',').enumerate() {
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 && default_key.is_some() => {
                (default_key.clone().unwrap(), part.to_string())
            }
            None => return Err(format!("format error: '{part}' has no key")),
        };
        let Some(f) = fields.get(&k) else {
            return Err(format!("format error: invalid key '{k}'"));
        };
        if seen.contains(&k) {
            return Err(format!("format error: duplicate key '{k}'"));
        }
        seen.push(k.clone());
        if let Some(alias) = f.get("alias").and_then(Value::as_str) {
            // `virtio=MAC`: the key is the model, the value the alias (macaddr).
            if let Some(af) = fields.get(alias) {
                check_value(af, &v).map_err(|e| format!("{k}: {e}"))?;
            }
            continue;
        }
        check_value(f, &v).map_err(|e| format!("{k}: {e}"))?;
    }
    for (k, f) in fields {
        let optional =
            f.get("optional").is_some() || f.get("alias").is_some() || f.get("keyAlias").is_some();
        // `virtio=MAC` gives the model through its key (keyAlias).
        let given_by_alias = f.get("default_key").is_some()
            && fields
                .keys()
                .any(|x| seen.contains(x) && fields[x].get("keyAlias").is_some());
        if !optional && !seen.contains(k) && !given_by_alias {
            return Err(format!("format error: missing property '{k}'"));
        }
    }
    Ok(())
}

/// The schema check: Err((param, message)) list on violations.
fn check(
    schema: &Value,
    tpl: &str,
    method: &str,
    params: &BTreeMap<String, String>,
) -> Result<(), BTreeMap<String, String>> {
    let mut errors = BTreeMap::new();
    let Some(info) = schema[tpl].get(method) else {
        errors.insert(
            "method".into(),
            format!("Method '{method} {tpl}' not implemented"),
        );
        return Err(errors);
    };
    let empty = Map::new();
    let props = info["parameters"]
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (k, v) in params {
        let prop = props.get(k).or_else(|| {
            let base = k.trim_end_matches(|c: char| c.is_ascii_digit());
            (base.len() < k.len())
                .then(|| props.get(&format!("{base}[n]")))
                .flatten()
        });
        match prop {
            None => {
                errors.insert(k.clone(), "property is not defined in schema and the schema does not allow additional properties".into());
            }
            Some(p) => {
                if let Err(e) = check_value(p, v) {
                    errors.insert(k.clone(), e);
                }
            }
        }
    }
    for (k, p) in props {
        if p.get("optional").is_none() && !k.contains("[n]") && !params.contains_key(k) {
            errors.insert(
                k.clone(),
                "property is missing and it is not optional".into(),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn digest(c: &BTreeMap<String, String>) -> String {
    blake3::hash(format!("{c:?}").as_bytes()).to_hex()[..40].to_string()
}

impl Sim {
    fn task(
        &mut self,
        node: &str,
        kind: &str,
        vmid: u32,
        exit: &str,
        then: Option<Effect>,
    ) -> String {
        self.next_task += 1;
        let upid = format!(
            "UPID:{node}:{:08X}:{:08X}:{:08X}:{kind}:{vmid}:{TOKEN_ID}:",
            1000 + self.next_task,
            self.next_task * 7,
            1_760_000_000 + self.next_task
        );
        // The task log ends "TASK OK", "TASK WARNINGS: N" after N "WARN:"
        // lines (pve-common PVE::RESTEnvironment: log_warn counts them and
        // the worker's exit status becomes "WARNINGS: N"), or "TASK ERROR:
        // <message>".
        let mut log = vec![format!("starting {kind} of VM {vmid}")];
        let warnings = exit.strip_prefix("WARNINGS: ");
        if let Some(n) = warnings {
            for _ in 0..n.parse::<u32>().unwrap_or(1) {
                log.push("WARN: iothread is only valid with virtio disk or virtio-scsi-single controller, ignoring".into());
            }
        } else if exit != "OK" {
            log.push(exit.to_string());
        }
        log.push(format!(
            "TASK {}",
            if exit == "OK" || warnings.is_some() {
                exit.to_string()
            } else {
                format!("ERROR: {exit}")
            }
        ));
        self.tasks.insert(
            upid.clone(),
            Task {
                node: node.into(),
                kind: kind.into(),
                vmid,
                started: 1_760_000_000 + self.next_task,
                done_at: Instant::now() + Duration::from_millis(self.task_ms),
                exit: exit.into(),
                log,
                polled: false,
                then,
            },
        );
        upid
    }

    fn settle(&mut self) {
        let now = Instant::now();
        let done: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.done_at <= now && t.then.is_some())
            .map(|(u, _)| u.clone())
            .collect();
        for u in done {
            let t = self.tasks.get_mut(&u).unwrap();
            let effect = t.then.take().unwrap();
            let ok = t.exit == "OK" || t.exit.starts_with("WARNINGS: ");
            match effect {
                Effect::Unlock(v) => {
                    if ok {
                        if let Some(vm) = self.vms.get_mut(&v) {
                            vm.lock = None;
                        }
                    } else {
                        self.vms.remove(&v);
                        self.removed.push(v);
                    }
                }
                Effect::Stop(v) => {
                    if let Some(vm) = self.vms.get_mut(&v) {
                        vm.running = false;
                        vm.booted_at = None;
                    }
                }
                Effect::Delete(v) => {
                    self.vms.remove(&v);
                    self.removed.push(v);
                }
                Effect::Reboot(v) => {
                    let boot_ms = self.boot_ms;
                    if let Some(vm) = self.vms.get_mut(&v) {
                        vm.apply_pending_at_start();
                        vm.running = true;
                        vm.booted_at = Some(now + Duration::from_millis(boot_ms));
                    }
                }
            }
        }
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    st: &Mutex<Sim>,
    schema: &Value,
) -> Option<Resp> {
    st.lock().unwrap().import_pmxcfs();
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    {
        let mut s = st.lock().unwrap();
        if let Some(c) = s.faults.chaos.as_mut() {
            c.requests += 1;
            let now = Instant::now();
            if c.requests == c.restart_at && c.spend("restart", &path) {
                c.restart_until = Some(now + Duration::from_millis(c.restart_ms));
            }
            // pveproxy restarting: the connection closes unanswered.
            if c.restart_until.is_some_and(|u| now < u) {
                return None;
            }
            // qemu-server's lock_config waits 10 s for the VM's config
            // lock (PVE::AbstractConfig lock_file → PVE::Tools
            // lock_file_full) and dies "can't lock file … - got timeout".
            if changes_vm(&method, &path) && c.roll(c.lock_timeout_pct) && c.spend("lock", &path) {
                let vmid = path.split('/').nth(6).unwrap_or("0").to_string();
                return Some(fail(&format!(
                    "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
                )));
            }
        }
    }
    let resp = handle_request(req, st, schema).await;
    let mut s = st.lock().unwrap();
    s.export_pmxcfs();
    if resp.status().is_success() && changes_vm(&method, &path) {
        if let Some(c) = s.faults.chaos.as_mut() {
            if c.roll(c.drop_reply_pct) && c.spend("drop", &path) {
                return None;
            }
        }
    }
    // A reply lost after PVE did the work: the connection drops without
    // an answer (a network cut, pveproxy restarting).
    if resp.status().is_success() {
        if let Some(i) = s
            .faults
            .lose_reply
            .iter()
            .position(|p| match p.split_once(' ') {
                Some((m, suffix)) => m == method && path.ends_with(suffix),
                None => path.ends_with(p.as_str()),
            })
        {
            s.faults.lose_reply.remove(i);
            return None;
        }
    }
    Some(resp)
}

async fn handle_request(
    req: hyper::Request<hyper::body::Incoming>,
    st: &Mutex<Sim>,
    schema: &Value,
) -> Resp {
    use http_body_util::BodyExt;
    let method = req.method().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let full = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if auth != format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}") {
        return reply(401, "authentication failure", json!({"data": null}));
    }
    let Some(path) = full.strip_prefix("/api2/json") else {
        return reply(501, "Not Implemented", json!({"data": null}));
    };
    let Some((tpl, path_params)) = match_path(schema, path) else {
        return reply(
            501,
            &format!("Method '{method} {path}' not implemented"),
            json!({"data": null}),
        );
    };
    let mut params = if method == "GET" || method == "DELETE" {
        parse_form(&query)
    } else {
        parse_form(&String::from_utf8_lossy(&body))
    };
    let mut s = st.lock().unwrap();
    s.log
        .push((method.clone(), path.to_string(), params.clone()));
    for (k, v) in &path_params {
        params.insert(k.clone(), v.clone());
    }
    if let Err(errors) = check(schema, tpl, &method, &params) {
        s.schema_violations
            .push(format!("{method} {path}: {errors:?}"));
        return reply(
            400,
            "Parameter verification failed.",
            json!({"data": null, "errors": errors}),
        );
    }
    s.settle();
    let node = params.get("node").cloned().unwrap_or_default();
    if !node.is_empty() && !["pve1", "pve2", "pve3"].contains(&node.as_str()) {
        return fail(&format!(
            "hostname lookup '{node}' failed - failed to get address info for: {node}"
        ));
    }
    let vmid: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
    let vm_missing = |s: &Sim| s.vms.get(&vmid).is_none_or(|v| v.node != node);
    let conf_missing = || {
        fail(&format!(
            "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
        ))
    };
    match (method.as_str(), tpl) {
        ("GET", "/version") => {
            ok(json!({"version": "9.1.3", "release": "9.1", "repoid": "e5010dce"}))
        }
        ("GET", "/storage") => {
            // The cluster's storage.cfg: each node's local-lvm and local,
            // and a Ceph pool every node sees (shared: 1).
            let list: Vec<Value> = [("local", "dir"), ("local-lvm", "lvmthin"), ("ceph-vm", "rbd")]
                .iter()
                .map(|(id, ty)| {
                    json!({"storage": id, "type": ty, "shared": u8::from(s.shared_storage.iter().any(|x| x == id)),
                           "content": if *id == "local" { "iso,vztmpl,backup" } else { "images,rootdir" }})
                })
                .collect();
            ok(json!(list))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/migrate") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let target = params["target"].clone();
            let vm = s.vms.get_mut(&vmid).unwrap();
            if let Some(l) = &vm.lock {
                return fail(&format!("VM is locked ({l})"));
            }
            // PVE::QemuMigrate / API2::Qemu migrate_vm: not to itself, a
            // running VM only with online=1; a stopped one's local disks
            // are copied to the target's storage of the same name.
            if target == node {
                return fail("target is local node.");
            }
            if vm.running && params.get("online").is_none_or(|o| o != "1") {
                return fail("can't migrate running VM without --online");
            }
            vm.node = target;
            vm.lock = Some("migrate".into());
            let upid = s.task(&node, "qmigrate", vmid, "OK", Some(Effect::Unlock(vmid)));
            s.removed.push(vmid);
            ok(json!(upid))
        }
        ("GET", "/cluster/resources") => {
            let list: Vec<Value> = s
                .vms
                .iter()
                .map(|(id, v)| {
                    let mut o = json!({
                        "id": format!("qemu/{id}"), "type": "qemu", "vmid": id, "name": v.name, "node": v.node,
                        "status": if v.running { "running" } else { "stopped" },
                        "template": u8::from(v.template),
                    });
                    if let Some(t) = v.config.get("tags") {
                        o["tags"] = json!(t);
                    }
                    if let Some(p) = &v.pool {
                        o["pool"] = json!(p);
                    }
                    o
                })
                .chain(s.containers.iter().map(|(id, (name, node))| {
                    json!({"id": format!("lxc/{id}"), "type": "lxc", "vmid": id, "name": name,
                           "node": node, "status": "running", "template": 0})
                }))
                .collect();
            ok(json!(list))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            if s.faults.clone_lock_timeouts > 0 {
                s.faults.clone_lock_timeouts -= 1;
                return fail(&format!(
                    "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
                ));
            }
            let newid: u32 = params["newid"].parse().unwrap();
            if std::mem::take(&mut s.faults.vmid_taken_at_clone) {
                let mut other = s.vms[&vmid].clone();
                other.template = false;
                other.name = "someone-elses".into();
                other.config.remove("template");
                s.vms.insert(newid, other);
            }
            // qemu-server's clone refuses any VMID in use, a container's
            // too (the config file exists under lxc/).
            if s.vms.contains_key(&newid) || s.containers.contains_key(&newid) {
                return fail(&format!(
                    "unable to create VM {newid}: config file already exists"
                ));
            }
            let src = s.vms[&vmid].clone();
            let target = params.get("target").cloned().unwrap_or(node.clone());
            if !["pve1", "pve2", "pve3"].contains(&target.as_str()) {
                return fail(&format!("no such cluster node '{target}'"));
            }
            // qemu-server PVE::API2::Qemu clone_vm: a clone to another node
            // needs every volume of the source on shared storage.
            if target != node {
                let local = src.config.iter().any(|(k, v)| {
                    ["scsi", "virtio", "sata", "ide"]
                        .iter()
                        .any(|p| k.starts_with(p))
                        && v.split_once(':')
                            .is_some_and(|(st, _)| !s.shared_storage.iter().any(|x| x == st))
                });
                if local {
                    return fail(&format!(
                        "can't clone VM to node '{target}' (VM uses local storage)"
                    ));
                }
            }
            let mut config = src.config.clone();
            config.remove("template");
            let name = params
                .get("name")
                .cloned()
                .unwrap_or_else(|| format!("Copy-of-VM-{}", src.name));
            config.insert("name".into(), name.clone());
            if let Some(d) = params.get("description") {
                config.insert("description".into(), d.clone());
            }
            for (k, v) in config.clone() {
                if k.starts_with("scsi") || k.starts_with("ide") || k.starts_with("virtio") {
                    let storage = params.get("storage").cloned().unwrap_or("local-lvm".into());
                    config.insert(
                        k.clone(),
                        v.replace(
                            &format!("local-lvm:base-{vmid}"),
                            &format!("{storage}:vm-{newid}"),
                        )
                        .replace(
                            &format!("local-lvm:vm-{vmid}"),
                            &format!("{storage}:vm-{newid}"),
                        ),
                    );
                }
            }
            s.vms.insert(
                newid,
                SimVm {
                    name,
                    node: target.clone(),
                    template: false,
                    running: false,
                    config,
                    pool: params.get("pool").cloned(),
                    lock: Some("clone".into()),
                    booted_at: None,
                    ..Default::default()
                },
            );
            let exit = if s.faults.clone_task_fails > 0 {
                s.faults.clone_task_fails -= 1;
                "clone failed: storage 'local-lvm' has not enough free space"
            } else {
                "OK"
            };
            let upid = s.task(&node, "qmclone", vmid, exit, Some(Effect::Unlock(newid)));
            ok(json!(upid))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let vm = &s.vms[&vmid];
            // Pending values unless `current=1` (API2/Qemu.pm vm_config).
            let view = if params.get("current").is_some_and(|c| c == "1") {
                vm.config.clone()
            } else {
                vm.pending_view()
            };
            let mut o: Map<String, Value> = view
                .iter()
                .map(|(k, v)| {
                    let val = match k.as_str() {
                        "cores" | "sockets" | "onboot" | "template" => {
                            v.parse::<i64>().map(Value::from).unwrap_or(json!(v))
                        }
                        _ => json!(v),
                    };
                    (k.clone(), val)
                })
                .collect();
            o.insert("digest".into(), json!(digest(&vm.pending_view())));
            if let Some(l) = &vm.lock {
                o.insert("lock".into(), json!(l));
            }
            ok(Value::Object(o))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/pending") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            // API2/Qemu.pm vm_pending (GuestHelpers
            // config_with_pending_array): every key with its current
            // `value` and, when it differs, its `pending` value.
            let vm = &s.vms[&vmid];
            let mut keys: Vec<&String> = vm.config.keys().chain(vm.pending.keys()).collect();
            keys.sort();
            keys.dedup();
            let list: Vec<Value> = keys
                .into_iter()
                .map(|k| {
                    let mut o = json!({"key": k});
                    if let Some(v) = vm.config.get(k) {
                        o["value"] = json!(v);
                    }
                    if let Some(p) = vm.pending.get(k) {
                        o["pending"] = json!(p);
                    }
                    o
                })
                .collect();
            ok(json!(list))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/cloudinit") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            // API2/Qemu.pm cloudinit_pending: each cloud-init option with
            // the `value` the drive was generated from and the `pending`
            // one the next start writes; a removed one has `delete: 1`.
            let vm = &s.vms[&vmid];
            let mut list = vec![];
            for (k, v) in vm.config.iter().filter(|(k, _)| cloudinit_option(k)) {
                match vm.cloudinit_drive.get(k) {
                    Some(old) if old == v => list.push(json!({"key": k, "value": v})),
                    Some(old) => list.push(json!({"key": k, "value": old, "pending": v})),
                    None => list.push(json!({"key": k, "pending": v})),
                }
            }
            for k in vm.cloudinit_drive.keys() {
                if !vm.config.contains_key(k) {
                    list.push(json!({"key": k, "delete": 1}));
                }
            }
            ok(json!(list))
        }
        ("PUT" | "POST", "/nodes/{node}/qemu/{vmid}/config") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let vm = s.vms.get_mut(&vmid).unwrap();
            if let Some(l) = &vm.lock {
                return fail(&format!("VM is locked ({l})"));
            }
            if let Some(d) = params.get("digest") {
                if *d != digest(&vm.pending_view()) {
                    return fail(
                        "detected modified configuration - file changed by other user? Try again.",
                    );
                }
            }
            for (k, v) in &params {
                if ["node", "vmid", "digest", "delete"].contains(&k.as_str()) {
                    continue;
                }
                let mut v = v.clone();
                let is_disk = ["scsi", "virtio", "sata", "ide"]
                    .iter()
                    .any(|p| k.starts_with(p));
                if is_disk && !vm.config.contains_key(k) && v.ends_with(":cloudinit") {
                    // `storage:cloudinit` creates the cloud-init drive
                    // (qemu-server PVE::API2::Qemu create_disks: the
                    // volume `vm-<vmid>-cloudinit`, attached as a CD-ROM).
                    let storage = v.trim_end_matches(":cloudinit");
                    v = format!("{storage}:vm-{vmid}-cloudinit,media=cdrom");
                } else if is_disk {
                    // `storage:N` allocates a new N GiB volume, also over
                    // a slot that holds one: the old volume is kept as
                    // `unusedN` (API2/Qemu.pm update_vm_api →
                    // vmconfig_register_unused_drive), so a write sent
                    // twice leaves a second disk behind.
                    if let Some((storage, rest)) = v.split_once(':') {
                        let (gib, opts) = rest.split_once(',').unwrap_or((rest, ""));
                        if let Ok(n) = gib.parse::<u64>() {
                            if let Some(old) = vm.config.get(k).cloned() {
                                let free = (0..)
                                    .map(|i| format!("unused{i}"))
                                    .find(|u| !vm.config.contains_key(u))
                                    .unwrap();
                                let volume = old.split(',').next().unwrap_or("").to_string();
                                vm.config.insert(free, volume);
                            }
                            v = format!(
                                "{storage}:vm-{vmid}-disk-{},size={n}G{}{opts}",
                                vm.config.len(),
                                if opts.is_empty() { "" } else { "," }
                            );
                        }
                    }
                }
                if k == "name" {
                    vm.name = v.clone();
                }
                // A running VM takes what can be hot-plugged; the rest
                // waits in [PENDING] for the next start (update_vm_api
                // writes every change to pending, then
                // vmconfig_hotplug_pending applies what it can).
                if vm.running && !hotpluggable(vm, k, &v) {
                    vm.pending.insert(k.clone(), v);
                } else {
                    vm.pending.remove(k);
                    vm.config.insert(k.clone(), v);
                }
            }
            if let Some(list) = params.get("delete") {
                for k in list.split([',', ';', ' ']) {
                    vm.config.remove(k);
                }
            }
            ok(Value::Null)
        }
        ("PUT", "/nodes/{node}/qemu/{vmid}/resize") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let disk = params["disk"].clone();
            let size = params["size"].clone();
            let vm = s.vms.get_mut(&vmid).unwrap();
            if let Some(l) = &vm.lock {
                return fail(&format!("VM is locked ({l})"));
            }
            let Some(cur) = vm.config.get(&disk).cloned() else {
                return fail(&format!("disk '{disk}' does not exist"));
            };
            let bytes = |t: &str| -> u64 {
                let (n, u) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
                n.parse::<u64>().unwrap_or(0)
                    * match u {
                        "K" => 1 << 10,
                        "M" => 1 << 20,
                        "G" => 1 << 30,
                        "T" => 1 << 40,
                        _ => 1,
                    }
            };
            let old = cur
                .split(',')
                .find_map(|p| p.strip_prefix("size="))
                .unwrap_or("0")
                .to_string();
            let new = if let Some(add) = size.strip_prefix('+') {
                bytes(&old) + bytes(add)
            } else {
                bytes(&size)
            };
            if new < bytes(&old) {
                return fail(&format!(
                    "unable to resize disk '{disk}' - shrinking disks is not supported"
                ));
            }
            let parts: Vec<String> = cur
                .split(',')
                .map(|p| {
                    if p.starts_with("size=") {
                        format!("size={}G", new >> 30)
                    } else {
                        p.to_string()
                    }
                })
                .collect();
            vm.config.insert(disk, parts.join(","));
            let upid = s.task(&node, "resize", vmid, "OK", None);
            ok(json!(upid))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            if s.faults.start_no_worker > 0 {
                s.faults.start_no_worker -= 1;
                return fail("got no worker upid - start worker failed");
            }
            if s.vms[&vmid].lock.is_some() {
                return fail("VM is locked (clone)");
            }
            // qemu-server's qmstart worker (PVE::QemuServer::vm_start_nolock)
            // dies "VM <vmid> already running" for a running VM; otherwise
            // the QEMU process exists (status/current says running) from
            // the task's first moments, and the guest boots after.
            if s.vms[&vmid].running {
                let upid = s.task(
                    &node,
                    "qmstart",
                    vmid,
                    &format!("VM {vmid} already running"),
                    None,
                );
                return ok(json!(upid));
            }
            let exit = if s.faults.start_warnings > 0 {
                s.faults.start_warnings -= 1;
                "WARNINGS: 1"
            } else {
                "OK"
            };
            let boot = Instant::now() + Duration::from_millis(s.task_ms + s.boot_ms);
            let vm = s.vms.get_mut(&vmid).unwrap();
            vm.apply_pending_at_start();
            vm.running = true;
            vm.booted_at = Some(boot);
            let upid = s.task(&node, "qmstart", vmid, exit, None);
            ok(json!(upid))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let upid = s.task(&node, "qmstop", vmid, "OK", Some(Effect::Stop(vmid)));
            ok(json!(upid))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let vm = &s.vms[&vmid];
            // `maxmem` in bytes from the running config's memory
            // (PVE::QemuServer vmstatus), not from pending values.
            let mib: u64 = vm
                .config
                .get("memory")
                .and_then(|m| {
                    m.trim_start_matches("current=")
                        .split(',')
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(2048);
            ok(
                json!({"vmid": vmid, "name": vm.name, "status": if vm.running { "running" } else { "stopped" }, "maxmem": mib << 20}),
            )
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            // API2/Qemu.pm vm_reboot: only a running VM.
            if !s.vms[&vmid].running {
                return fail(&format!("VM {vmid} not running"));
            }
            if let Some(l) = &s.vms[&vmid].lock {
                return fail(&format!("VM is locked ({l})"));
            }
            let now = Instant::now();
            if s.vms
                .iter()
                .any(|(id, v)| *id != vmid && v.running && v.booted_at.is_none_or(|b| b > now))
            {
                s.overlapping_reboots += 1;
            }
            // The guest shuts down now: the agent stops answering.
            s.vms.get_mut(&vmid).unwrap().booted_at = None;
            let upid = s.task(&node, "qmreboot", vmid, "OK", Some(Effect::Reboot(vmid)));
            ok(json!(upid))
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            if s.vms[&vmid].running {
                return fail(&format!("VM {vmid} is running - destroy failed"));
            }
            let upid = s.task(&node, "qmdestroy", vmid, "OK", Some(Effect::Delete(vmid)));
            ok(json!(upid))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status") => {
            let upid = params["upid"].clone();
            if s.faults.task_status_400 > 0 && !s.tasks.get(&upid).is_some_and(|t| t.polled) {
                s.faults.task_status_400 -= 1;
                return reply(
                    400,
                    &format!("unable to parse worker upid '{upid}'"),
                    json!({"data": null}),
                );
            }
            let Some(t) = s.tasks.get_mut(&upid) else {
                return fail(&format!("no such task '{upid}'"));
            };
            t.polled = true;
            let done = t.done_at <= Instant::now();
            let mut o = json!({"upid": upid, "node": t.node, "status": if done { "stopped" } else { "running" }, "type": "task", "user": TOKEN_ID, "pid": 1, "pstart": 1, "starttime": 1, "id": ""});
            if done {
                o["exitstatus"] = json!(t.exit);
            }
            ok(o)
        }
        ("GET", "/nodes/{node}/tasks") => {
            // API2/Tasks.pm node_tasks: the node's tasks, newest first;
            // `source` archive (the default: finished ones only), active
            // or all; `vmid` and `typefilter` narrow the list.
            let source = params.get("source").map_or("archive", String::as_str);
            let now = Instant::now();
            let mut list: Vec<(u64, Value)> = s
                .tasks
                .iter()
                .filter(|(_, t)| t.node == node)
                .filter(|(_, t)| params.get("vmid").is_none_or(|v| *v == t.vmid.to_string()))
                .filter(|(_, t)| params.get("typefilter").is_none_or(|f| *f == t.kind))
                .filter(|(_, t)| {
                    let done = t.done_at <= now;
                    match source {
                        "active" => !done,
                        "all" => true,
                        _ => done,
                    }
                })
                .map(|(u, t)| {
                    let mut o = json!({"upid": u, "node": t.node, "type": t.kind, "id": t.vmid.to_string(),
                                       "user": TOKEN_ID, "pid": 1, "pstart": 1, "starttime": t.started});
                    if t.done_at <= now {
                        o["status"] = json!(t.exit);
                        o["endtime"] = json!(t.started + 1);
                    }
                    (t.started, o)
                })
                .collect();
            list.sort_by_key(|(st, _)| std::cmp::Reverse(*st));
            ok(json!(list.into_iter().map(|(_, o)| o).collect::<Vec<_>>()))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/log") => {
            let Some(t) = s.tasks.get(&params["upid"]) else {
                return fail("no such task");
            };
            let lines: Vec<Value> = t
                .log
                .iter()
                .enumerate()
                .map(|(i, l)| json!({"n": i + 1, "t": l}))
                .collect();
            ok(json!(lines))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/network-get-interfaces") => {
            if vm_missing(&s) {
                return conf_missing();
            }
            let vm = &s.vms[&vmid];
            if !vm.running {
                return fail(&format!("VM {vmid} is not running"));
            }
            if vm
                .config
                .get("agent")
                .is_none_or(|a| a.starts_with('0') || a.contains("enabled=0"))
            {
                return fail("No QEMU guest agent configured");
            }
            if vm.booted_at.is_none_or(|b| b > Instant::now()) {
                return fail("QEMU guest agent is not running");
            }
            // The guest takes ipconfig0's address only from a cloud-init
            // drive (qemu-server generates the NoCloud/ConfigDrive image
            // from ipconfigN onto that drive); without one it keeps the
            // template's network setup, DHCP here.
            let cloud_init = vm.config.values().any(|v| v.contains("cloudinit"));
            let ip = vm
                .config
                .get("ipconfig0")
                .filter(|_| cloud_init)
                .and_then(|c| c.split(',').find_map(|p| p.strip_prefix("ip=")))
                .and_then(|ip| ip.split('/').next())
                .filter(|ip| *ip != "dhcp")
                .unwrap_or("10.0.0.9")
                .to_string();
            let ip = s.faults.agent_ip.clone().unwrap_or(ip);
            ok(json!({"result": [
                {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]},
                {"name": "eth0", "hardware-address": "bc:24:11:00:00:01", "ip-addresses": [{"ip-address": ip, "ip-address-type": "ipv4", "prefix": 24}]}
            ]}))
        }
        _ => reply(
            501,
            &format!("Method '{method} {tpl}' not implemented by the simulator"),
            json!({"data": null}),
        ),
    }
}

#[test]
fn the_simulator_refuses_what_pve_refuses() {
    let schema: Value =
        serde_json::from_str(include_str!("../fixtures/pve/api-subset.json")).unwrap();
    let p = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cfg = "/nodes/{node}/qemu/{vmid}/config";
    assert!(check(
        &schema,
        cfg,
        "PUT",
        &p(&[("node", "pve1"), ("vmid", "701"), ("cores", "4")])
    )
    .is_ok());
    // Unknown parameter, wrong type, enum, sshkeys with '+', property strings.
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[("node", "pve1"), ("vmid", "701"), ("coers", "4")]),
    )
    .unwrap_err();
    assert!(e["coers"].contains("not defined"));
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[("node", "pve1"), ("vmid", "701"), ("cores", "four")]),
    )
    .unwrap_err();
    assert!(e["cores"].contains("integer"));
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[("node", "pve1"), ("vmid", "701"), ("scsihw", "virtio")]),
    )
    .unwrap_err();
    assert!(e["scsihw"].contains("enumeration"));
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("sshkeys", "ssh-ed25519+AAAA"),
        ]),
    )
    .unwrap_err();
    assert!(e["sshkeys"].contains("urlencoded"));
    assert!(check(
        &schema,
        cfg,
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("sshkeys", "ssh-ed25519%20AAAA")
        ])
    )
    .is_ok());
    assert!(check(
        &schema,
        cfg,
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20")
        ])
    )
    .is_ok());
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("net0", "virtio,bridge=vmbr0,vlan=20"),
        ]),
    )
    .unwrap_err();
    assert!(e["net0"].contains("invalid key 'vlan'"), "{e:?}");
    let e = check(
        &schema,
        cfg,
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("ipconfig0", "ip=192.168.100.171,gw=192.168.100.1"),
        ]),
    )
    .unwrap_err();
    assert!(e.contains_key("ipconfig0"));
    // Required parameter missing; method not allowed.
    let e = check(
        &schema,
        "/nodes/{node}/qemu/{vmid}/clone",
        "POST",
        &p(&[("node", "pve1"), ("vmid", "9000")]),
    )
    .unwrap_err();
    assert!(e["newid"].contains("missing"));
    assert!(check(&schema, "/nodes/{node}/qemu/{vmid}/resize", "POST", &p(&[])).is_err());
    let e = check(
        &schema,
        "/nodes/{node}/qemu/{vmid}/resize",
        "PUT",
        &p(&[
            ("node", "pve1"),
            ("vmid", "701"),
            ("disk", "scsi0"),
            ("size", "20 G"),
        ]),
    )
    .unwrap_err();
    assert!(e.contains_key("size"));
}
