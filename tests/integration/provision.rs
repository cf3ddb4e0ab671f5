//! `labctl provision` end to end against the PVE API simulator
//! (tests/integration/pve_sim.rs), and platform-file validation.

use crate::common::{assert_success, BIN};
use crate::pve_sim::{PveSim, TOKEN_ID, TOKEN_SECRET};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct PEnv {
    dir: tempfile::TempDir,
    sim: PveSim,
    platform: PathBuf,
    /// The `proxmox.tls` block, if any.
    tls: String,
}

const VMS: &str = "vms:
  - name: controlador
    vmid: 701
    node: pve1
    role: control-plane
    template: { vmid: 9000, node: pve1 }
    ipconfig: { ip: 192.168.100.171/24, gw: 192.168.100.1 }
  - name: nodo1
    vmid: 702
    node: pve2
    template: { vmid: 9001, node: pve2 }
    ipconfig: { ip: 192.168.100.172/24, gw: 192.168.100.1 }
  - name: nodo2
    vmid: 703
    node: pve3
    template: { vmid: 9002, node: pve3 }
    ipconfig: { ip: 192.168.100.173/24, gw: 192.168.100.1 }
";

impl PEnv {
    fn new() -> PEnv {
        Self::with(tempfile::tempdir().unwrap(), PveSim::start(), String::new())
    }

    fn with(dir: tempfile::TempDir, sim: PveSim, tls: String) -> PEnv {
        let secret = dir.path().join("pve-token");
        std::fs::write(&secret, format!("{TOKEN_SECRET}\n")).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let platform = dir.path().join("platform.yaml");
        let env = PEnv {
            dir,
            sim,
            platform,
            tls,
        };
        env.write(8, "20G", VMS);
        env
    }

    fn write(&self, cores: u32, size: &str, vms: &str) {
        let text = format!(
            "proxmox:
  endpoints: [\"{}\"]
{}  token:
    id: {TOKEN_ID}
    secret_file: {}
  parallelism: 2
  task_timeout_secs: 30
defaults:
  cores: {cores}
  cpu: host
  memory_mib: 8192
  scsihw: virtio-scsi-single
  disks:
    - {{ slot: scsi0, storage: local-lvm, size: {size}, iothread: true }}
  networks:
    - {{ slot: net0, model: virtio, bridge: vmbr0 }}
  nameserver: 192.168.100.1
  ciuser: ubuntu
  ssh_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyOnly admin@lab
    - ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ+/Test= ops@lab
  tags: [k8s]
  onboot: true
  agent: true
{vms}",
            self.sim.endpoint(),
            self.tls,
            self.dir.path().join("pve-token").display()
        );
        std::fs::write(&self.platform, text).unwrap();
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            .env("LABCTL_CACHE_DIR", self.dir.path().join("cache"))
            .env("LABCTL_PVE_RETRY_MS", "20")
            .env("LABCTL_PVE_POLL_MS", "50")
            .env("USER", "alice")
            .stdin(std::process::Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .arg("--platform")
            .arg(&self.platform)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        assert_success(&out, &a);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn violations(&self) -> Vec<String> {
        self.sim.with(|s| s.schema_violations.clone())
    }
}

/// Every VM of an apply's JSON report succeeded.
fn assert_all_ok(out: &serde_json::Value) {
    assert!(
        out["applied"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["ok"] == true),
        "{out}"
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn actions(plan: &serde_json::Value) -> Vec<(String, String)> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn plan_apply_again_update_grow_and_destroy() {
    let e = PEnv::new();
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(
        actions(&plan),
        [
            ("controlador".into(), "create".into()),
            ("nodo1".into(), "create".into()),
            ("nodo2".into(), "create".into())
        ]
    );
    // Apply creates all three: clone, configure, grow the disk, start, agent IPs.
    let out = e.json(&["provision", "apply"]);
    let applied = out["applied"].as_array().unwrap();
    assert!(applied.iter().all(|a| a["ok"] == true), "{out}");
    assert_eq!(applied[0]["ips"][0], "192.168.100.171");
    assert_eq!(applied[2]["ips"][0], "192.168.100.173");
    assert!(e.violations().is_empty(), "{:?}", e.violations());
    e.sim.with(|s| {
        let vm = &s.vms[&701];
        assert!(vm.running);
        assert_eq!(vm.config["cores"], "8");
        assert_eq!(
            vm.config["ipconfig0"],
            "ip=192.168.100.171/24,gw=192.168.100.1"
        );
        // sshkeys: URL-encoded with %20 for spaces, never '+'.
        let keys = &vm.config["sshkeys"];
        assert!(
            keys.contains("ssh-ed25519%20AAAA")
                && !keys.contains(' ')
                && keys.contains("%2B%2FTest%3D"),
            "{keys}"
        );
        assert!(
            vm.config["scsi0"].contains("size=20G") && vm.config["scsi0"].contains("iothread=1"),
            "{}",
            vm.config["scsi0"]
        );
        assert!(
            vm.config["net0"].starts_with("virtio=BC:24:11:00:00:01,bridge=vmbr0"),
            "{}",
            vm.config["net0"]
        );
        assert!(vm.config["tags"].contains("labctl-managed"));
    });
    // A second apply does nothing: no mutating request at all.
    let before = e.sim.writes().len();
    let out = e.run(&["provision", "apply"]);
    assert_success(&out, &["apply again"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        e.sim.writes().len(),
        before,
        "{:?}",
        &e.sim.writes()[before..]
    );
    // Change cores: only that field is updated, on every VM.
    e.write(4, "20G", VMS);
    let plan = e.json(&["provision", "plan"]);
    for s in plan["steps"].as_array().unwrap() {
        assert_eq!(s["action"], "update", "{plan}");
        assert_eq!(
            s["changes"],
            serde_json::json!([{"field": "cores", "old": "8", "new": "4"}])
        );
    }
    let before = e.sim.writes().len();
    e.json(&["provision", "apply"]);
    let writes = e.sim.writes()[before..].to_vec();
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(writes
        .iter()
        .all(|w| w.starts_with("PUT /nodes/") && w.ends_with("/config")));
    let last_put = e.sim.with(|s| {
        s.log
            .iter()
            .rev()
            .find(|(m, ..)| m == "PUT")
            .unwrap()
            .2
            .clone()
    });
    assert_eq!(
        last_put.keys().cloned().collect::<Vec<_>>(),
        ["cores", "digest"]
    );
    // Grow the disk: a resize, nothing else.
    e.write(4, "32G", VMS);
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(plan["steps"][0]["changes"][0]["field"], "scsi0.size");
    e.json(&["provision", "apply"]);
    e.sim
        .with(|s| assert!(s.vms[&702].config["scsi0"].contains("size=32G")));
    // Shrinking is refused at plan time (exit 6), and apply changes nothing.
    e.write(4, "16G", VMS);
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("disks only grow"));
    let before = e.sim.writes().len();
    let out = e.run(&["provision", "apply"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("3 of 3 VM(s) failed") && stderr(&out).contains("disks only grow"),
        "{}",
        stderr(&out)
    );
    assert_eq!(e.sim.writes().len(), before);
    e.write(4, "32G", VMS);
    // Status shows what was applied, when and by whom.
    let st = e.json(&["provision", "status"]);
    assert_eq!(st[0]["live"]["status"], "running");
    assert_eq!(st[0]["last-applied"]["user"], "alice");
    // The refused shrink is the last attempt on record, marked failed.
    assert_eq!(st[0]["last-applied"]["action"], "conflict");
    assert_eq!(st[0]["last-applied"]["ok"], false);
    // Destroy: refused without confirmation, refused for VMs labctl did not create.
    let out = e.run(&["provision", "destroy", "nodo2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    e.sim.with(|s| assert!(s.vms.contains_key(&703)));
    e.json(&["provision", "destroy", "nodo2", "--yes"]);
    e.sim.with(|s| assert!(!s.vms.contains_key(&703)));
    let out = e.run(&["provision", "destroy", "ubuntu-2204-cloudinit", "--yes"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("not created by labctl"));
    // The destroyed VM is planned again as a create.
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(plan["steps"][2]["action"], "create");
    assert!(e.violations().is_empty(), "{:?}", e.violations());
}

#[test]
fn transient_pve_failures_are_retried() {
    let e = PEnv::new();
    e.sim.with(|s| {
        s.faults.clone_lock_timeouts = 3;
        s.faults.start_no_worker = 2;
        s.faults.task_status_400 = 4;
    });
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| {
        assert_eq!(
            (
                s.faults.clone_lock_timeouts,
                s.faults.start_no_worker,
                s.faults.task_status_400
            ),
            (0, 0, 0)
        );
        assert!(s.vms[&703].running);
    });
}

#[test]
fn one_failing_vm_does_not_stop_the_others() {
    let e = PEnv::new();
    // VMID 702 already belongs to a VM labctl does not manage.
    e.sim.with(|s| {
        let mut foreign = s.vms[&9001].clone();
        foreign.template = false;
        foreign.name = "gpu-box".into();
        foreign.config.remove("template");
        s.vms.insert(702, foreign);
        s.faults.clone_task_fails = 0;
    });
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "VMID 702 is already used by 'gpu-box' on pve2, which labctl does not manage"
        ),
        "{text}"
    );
    let out = e.run(&["provision", "apply"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("1 of 3 VM(s) failed (the others were completed)")
            && err.contains("nodo1: VMID 702"),
        "{err}"
    );
    e.sim.with(|s| {
        assert!(s.vms[&701].running && s.vms[&703].running);
        assert_eq!(s.vms[&702].name, "gpu-box", "the foreign VM is untouched");
    });
}

#[test]
fn a_failed_task_names_its_upid_and_log() {
    let e = PEnv::new();
    e.write(
        8,
        "20G",
        &VMS.lines().take(7).collect::<Vec<_>>().join("\n"),
    );
    e.sim.with(|s| s.faults.clone_task_fails = 1);
    let out = e.run(&["provision", "apply"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("task UPID:pve1:") && err.contains("not enough free space"),
        "{err}"
    );
    assert!(err.contains("VMID 701"), "{err}");
    // The failed clone left nothing behind; the next apply creates it.
    let out = e.json(&["provision", "apply"]);
    assert_eq!(out["applied"][0]["ok"], true);
}

#[test]
fn a_wrong_or_missing_token_is_a_key_error_without_the_secret() {
    let e = PEnv::new();
    let secret = e.dir.path().join("pve-token");
    std::fs::write(&secret, "wrong-secret-value").unwrap();
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("token was refused") && !stderr(&out).contains("wrong-secret-value"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
}

fn validate(text: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("platform.yaml");
    std::fs::write(&p, text).unwrap();
    Command::new(BIN)
        .env_clear()
        .args(["provision", "validate", "--platform"])
        .arg(&p)
        .output()
        .unwrap()
}

#[test]
fn platform_errors_name_file_line_and_field_and_inline_secrets_are_refused() {
    let good =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/platform.yaml"))
            .unwrap();
    // The shipped file validates and has the lab's real shape.
    let out = Command::new(BIN)
        .env_clear()
        .args(["--json", "provision", "validate", "--platform"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/platform.yaml"))
        .output()
        .unwrap();
    assert_success(&out, &["validate deploy/platform.yaml"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    assert_eq!(
        (
            vms[0]["name"].as_str(),
            vms[0]["vmid"].as_u64(),
            vms[0]["cores"].as_u64(),
            vms[0]["memory_mib"].as_u64()
        ),
        (Some("controlador"), Some(701), Some(8), Some(8192))
    );
    assert_eq!(vms[2]["ip"], "192.168.100.173");
    // Inline secret.
    let bad = good.replace(
        "    secret_file: /etc/labctl/pve-token",
        "    secret: 0b3f6c1e-aaaa-bbbb-cccc-123456789abc",
    );
    let out = validate(&bad);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("proxmox.token.secret") && err.contains("inline token secret is refused"),
        "{err}"
    );
    assert!(
        !err.contains("0b3f6c1e-aaaa"),
        "the secret is not echoed: {err}"
    );
    // The secret pasted into the id.
    let out = validate(&good.replace(
        "id: labctl@pve!provision",
        "id: labctl@pve!provision=0b3f6c1e-aaaa-bbbb-cccc-123456789abc",
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("proxmox.token.id") && !stderr(&out).contains("0b3f6c1e"),
        "{}",
        stderr(&out)
    );
    // Unknown field: file, line, column and path.
    let out = validate(&good.replace("    vmid: 702\n", "    vmid: 702\n    coers: 4\n"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("platform.yaml:")
            && err.contains("field `vms[1].coers`: unknown field `coers`"),
        "{err}"
    );
    let line: usize = err
        .split("platform.yaml:")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let with_typo = good.replace("    vmid: 702\n", "    vmid: 702\n    coers: 4\n");
    assert_eq!(
        with_typo.lines().nth(line - 1).map(str::trim),
        Some("coers: 4")
    );
    // Semantic errors name the VM's line and field.
    let out = validate(&good.replace("192.168.100.172/24", "192.168.100.172"));
    assert!(
        stderr(&out).contains("field `vms[1].ipconfig.ip`"),
        "{}",
        stderr(&out)
    );
    let out = validate(&good.replace("vmid: 703", "vmid: 701"));
    assert!(
        stderr(&out).contains("701 is also controlador's"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn render_bootstrap_writes_kubeadm_configs_and_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("boot");
    let platform = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/platform.yaml");
    let run = || {
        Command::new(BIN)
            .env_clear()
            .args(["--json", "provision", "render-bootstrap", "--out"])
            .arg(&out_dir)
            .arg("--platform")
            .arg(&platform)
            .output()
            .unwrap()
    };
    let out = run();
    assert_success(&out, &["render-bootstrap"]);
    let files: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(files.len(), 4, "{files:?}");
    // kubeadm init: control-plane IP, CIDRs, CRI-O socket; the token is not printed.
    let init_text = std::fs::read_to_string(out_dir.join("kubeadm-init.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = init_text
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    assert_eq!(docs[0]["kind"], "InitConfiguration");
    assert_eq!(
        docs[0]["localAPIEndpoint"]["advertiseAddress"],
        "192.168.100.171"
    );
    assert_eq!(
        docs[0]["nodeRegistration"]["criSocket"],
        "unix:///var/run/crio/crio.sock"
    );
    assert_eq!(docs[1]["networking"]["podSubnet"], "172.16.0.0/16");
    assert_eq!(docs[1]["networking"]["serviceSubnet"], "172.17.0.0/18");
    assert_eq!(docs[1]["controlPlaneEndpoint"], "192.168.100.171:6443");
    let token = docs[0]["bootstrapTokens"][0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(regex::Regex::new(r"^[a-z0-9]{6}\.[a-z0-9]{16}$")
        .unwrap()
        .is_match(&token));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&token));
    // One join file per worker, same token, its own node IP.
    let join: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(out_dir.join("kubeadm-join-nodo2.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(join["discovery"]["bootstrapToken"]["token"], token.as_str());
    assert_eq!(
        join["discovery"]["bootstrapToken"]["apiServerEndpoint"],
        "192.168.100.171:6443"
    );
    assert_eq!(
        join["nodeRegistration"]["kubeletExtraArgs"]["node-ip"],
        "192.168.100.173"
    );
    let inv = std::fs::read_to_string(out_dir.join("inventory.ini")).unwrap();
    assert!(inv
        .contains("[control_plane]\ncontrolador ansible_host=192.168.100.171 ansible_user=ubuntu"));
    assert!(inv.contains("nodo1 ansible_host=192.168.100.172") && inv.contains("[k8s:children]"));
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // Never overwritten.
    let out = run();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(out_dir.join("kubeadm-init.yaml")).unwrap(),
        init_text
    );
}

fn fingerprint(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().split('=').nth(1).unwrap().to_string()
}

#[test]
fn tls_with_a_ca_file_or_a_pinned_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::make_private_ca(dir.path());
    let (ca, srv, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("srv.pem"),
        dir.path().join("srv.key"),
    );
    // CA file: accepted.
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&srv, &key),
        format!("  tls:\n    ca_file: {}\n", ca.display()),
    );
    assert!(e.sim.endpoint().starts_with("https://"));
    e.json(&["provision", "plan"]);
    // No CA given: the system roots do not know the private CA.
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&srv, &key),
        String::new(),
    );
    let out = e.run(&["provision", "plan"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach PVE"),
        "{}",
        stderr(&out)
    );
    // The pinned fingerprint of the server certificate: accepted.
    let fp = fingerprint(&srv);
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&srv, &key),
        format!("  tls:\n    fingerprint: \"{fp}\"\n"),
    );
    e.json(&["provision", "plan"]);
    // Another fingerprint (the CA's): refused, and no request reached the API.
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&srv, &key),
        format!("  tls:\n    fingerprint: \"{}\"\n", fingerprint(&ca)),
    );
    let out = e.run(&["provision", "plan"]);
    assert!(!out.status.success());
    assert!(
        e.sim.with(|s| s.log.is_empty()),
        "the token never left labctl"
    );
    // insecure: works, with a loud warning.
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&srv, &key),
        "  tls:\n    insecure: true\n".into(),
    );
    let out = e.run(&["provision", "plan"]);
    assert_success(&out, &["plan insecure"]);
    assert!(
        stderr(&out).contains("WARNING") && stderr(&out).contains("NOT checked"),
        "{}",
        stderr(&out)
    );
}

/// Issue 21 point 5: a task that ends "WARNINGS: N" succeeded (PVE's own
/// `upid_status_is_error`): the warnings are printed and the VM goes on to
/// the agent wait.
#[test]
fn tasks_that_end_with_warnings_succeed_and_say_what_they_warned() {
    let e = PEnv::new();
    e.sim.with(|s| s.faults.start_warnings = 3);
    let out = e.run(&["--json", "provision", "apply"]);
    assert_success(&out, &["apply with warnings"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let applied = v["applied"].as_array().unwrap();
    assert!(applied.iter().all(|a| a["ok"] == true), "{v}");
    assert_eq!(
        applied[1]["ips"][0], "192.168.100.172",
        "the agent wait ran"
    );
    let err = stderr(&out);
    assert!(
        err.contains("ended with WARNINGS: 1")
            && err.contains("WARN: iothread is only valid")
            && err.contains("VMID 701"),
        "{err}"
    );
    e.sim.with(|s| assert_eq!(s.faults.start_warnings, 0));
}

/// Issue 21 point 6: only what can succeed later is retried. PVE's
/// "already exists" is answered once; a closed port and an untrusted
/// certificate fail at once (not after a minute of backoff), and with
/// several endpoints the next one is tried at once.
#[test]
fn permanent_pve_errors_fail_at_once_and_the_next_endpoint_is_tried() {
    use std::time::{Duration, Instant};
    // The default backoff (1 s, doubling): a retried failure would take
    // half a minute.
    let slow = |e: &PEnv, args: &[&str]| {
        let t = Instant::now();
        let out = e
            .cmd()
            .env_remove("LABCTL_PVE_RETRY_MS")
            .args(args)
            .arg("--platform")
            .arg(&e.platform)
            .output()
            .unwrap();
        (out, t.elapsed())
    };
    let e = PEnv::new();
    e.sim.with(|s| s.faults.vmid_taken_at_clone = true);
    let (out, took) = slow(&e, &["provision", "apply"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("config file already exists"),
        "{}",
        stderr(&out)
    );
    let clones = e.sim.with(|s| {
        s.log
            .iter()
            .filter(|(m, p, _)| m == "POST" && p.ends_with("/clone"))
            .count()
    });
    assert_eq!(clones, 3, "one clone request per VM, none repeated");
    assert!(took < Duration::from_secs(8), "{took:?}");
    // A closed port, alone: fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let e = PEnv::new();
    let text = std::fs::read_to_string(&e.platform).unwrap();
    let live = e.sim.endpoint();
    std::fs::write(
        &e.platform,
        text.replace(&format!("[\"{live}\"]"), &format!("[\"{dead}\"]")),
    )
    .unwrap();
    let (out, took) = slow(&e, &["provision", "plan"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach PVE"),
        "{}",
        stderr(&out)
    );
    assert!(
        took < Duration::from_secs(5),
        "a refused connection retried: {took:?}"
    );
    // The dead endpoint first, the live one second: used at once.
    std::fs::write(
        &e.platform,
        text.replace(
            &format!("[\"{live}\"]"),
            &format!("[\"{dead}\", \"{live}\"]"),
        ),
    )
    .unwrap();
    let (out, took) = slow(&e, &["provision", "plan"]);
    assert_success(&out, &["plan with a dead first endpoint"]);
    assert!(took < Duration::from_secs(5), "{took:?}");
    // An untrusted certificate: no retries either.
    let dir = tempfile::tempdir().unwrap();
    crate::common::make_private_ca(dir.path());
    let e = PEnv::with(
        tempfile::tempdir().unwrap(),
        PveSim::start_tls(&dir.path().join("srv.pem"), &dir.path().join("srv.key")),
        String::new(),
    );
    let (out, took) = slow(&e, &["provision", "plan"]);
    assert!(!out.status.success());
    assert!(
        took < Duration::from_secs(5),
        "a certificate error retried: {took:?}"
    );
}

/// Issue 21 point 7: what validate used to accept — a duplicate address, a
/// CIDR with host bits, a ',' that would add a property to a PVE property
/// string — is refused, each at the field's own line; containers hold
/// VMIDs too; `status` keeps its columns aligned.
#[test]
fn platform_validation_and_vmids_held_by_containers() {
    let good =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/platform.yaml"))
            .unwrap();
    let line_of = |err: &str| -> usize {
        err.split("platform.yaml:")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for (bad, field, why, line_has) in [
        (
            good.replace("192.168.100.173/24", "192.168.100.171/24"),
            "vms[2].ipconfig.ip",
            "192.168.100.171 is also controlador's address",
            "ip: 192.168.100.171/24",
        ),
        (
            good.replace("pod_cidr: 172.16.0.0/16", "pod_cidr: 172.16.1.0/16"),
            "kubernetes.pod_cidr",
            "has host bits set: the network is 172.16.0.0/16",
            "pod_cidr:",
        ),
        (
            good.replace("bridge: vmbr0 }", "bridge: \"vmbr0,firewall=1\" }"),
            "networks[0].bridge",
            "would add properties",
            "bridge:",
        ),
        (
            good.replace(
                "storage: local-lvm,",
                "storage: \"local-lvm,cache=unsafe\",",
            ),
            "disks[0].storage",
            "is not a storage ID",
            "storage:",
        ),
        (
            good.replace("  cpu: host", "  cpu: \"host,flags=+aes\""),
            "cpu",
            "is not a CPU type",
            "cpu:",
        ),
    ] {
        let out = validate(&bad);
        assert_eq!(out.status.code(), Some(2), "{field}");
        let err = stderr(&out);
        assert!(err.contains(field) && err.contains(why), "{err}");
        let line = line_of(&err);
        assert!(
            line > 0
                && bad
                    .lines()
                    .nth(line - 1)
                    .is_some_and(|l| l.contains(line_has)),
            "{field}: line {line} is not the field's: {err}"
        );
    }
    // The field's own line inside the VM, not the VM's name line.
    let bad = good.replacen("    vmid: 702\n", "    vmid: 702\n    cores: 0\n", 1);
    let err = stderr(&validate(&bad));
    let line = line_of(&err);
    assert_eq!(
        bad.lines().nth(line - 1).map(str::trim),
        Some("cores: 0"),
        "{err}"
    );
    // A container holding a declared VMID: a conflict, not a free VMID.
    let e = PEnv::new();
    e.sim.with(|s| {
        s.containers.insert(702, ("pihole".into(), "pve2".into()));
    });
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("VMID 702 is used by container 'pihole' on pve2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // status: the VMID column lines up.
    let out = e.run(&["provision", "status"]);
    assert_success(&out, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let cols: Vec<usize> = text
        .lines()
        .filter_map(|l| {
            l.find(" 70")
                .map(|i| i + 4)
                .or_else(|| l.find("VMID").map(|i| i + 4))
        })
        .collect();
    assert!(
        cols.len() >= 4 && cols.windows(2).all(|w| w[0] == w[1]),
        "{text}"
    );
    assert!(text.contains("container!"), "{text}");
}

/// Issue 21 point 3: a template without a cloud-init drive gets one (or
/// the guest would never see ipconfig0), and a VM that comes up with
/// another address than the declared one is a failure naming both.
#[test]
fn the_declared_address_is_checked_and_a_cloud_init_drive_added() {
    let e = PEnv::new();
    e.sim.with(|s| {
        s.vms.get_mut(&9000).unwrap().config.remove("ide2");
    });
    let out = e.run(&["--json", "provision", "apply"]);
    assert_success(&out, &["apply from a template without cloud-init"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["applied"][0]["ips"][0], "192.168.100.171", "{v}");
    e.sim.with(|s| {
        assert_eq!(
            s.vms[&701].config["ide2"],
            "local-lvm:vm-701-cloudinit,media=cdrom"
        );
    });
    assert!(e.violations().is_empty(), "{:?}", e.violations());
    // A guest that takes another address: a failure, not "done".
    let e = PEnv::new();
    e.sim.with(|s| s.faults.agent_ip = Some("10.0.0.9".into()));
    let out = e
        .cmd()
        .env("LABCTL_PVE_IP_SETTLE_MS", "1500")
        .args(["provision", "apply", "--platform"])
        .arg(&e.platform)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("VM controlador came up with 10.0.0.9, not the declared 192.168.100.171")
            && err.contains("VMID 701"),
        "{err}"
    );
    // The next plan does not call it unchanged: the running VM's agent is
    // asked, and nothing labctl could apply explains the address.
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("controlador (VMID 701): the guest agent reports 10.0.0.9, not the declared 192.168.100.171"),
        "{text}"
    );
    // A running VM without a cloud-init drive (made before labctl added
    // one) gets it, and with the reboot it takes the declared address.
    let e = PEnv::new();
    assert_all_ok(&e.json(&["provision", "apply"]));
    e.sim.with(|s| {
        s.vms.get_mut(&701).unwrap().config.remove("ide2");
    });
    let plan = e.json(&["provision", "plan"]);
    let step = &plan["steps"][0];
    assert_eq!(step["action"], "update", "{plan}");
    assert_eq!(step["changes"][0]["field"], "ide2", "{plan}");
    assert_eq!(step["needs_reboot"], serde_json::json!(["ide2"]), "{plan}");
    assert_eq!(
        step["pending"],
        serde_json::json!([{"field": "address", "old": "10.0.0.9", "new": "192.168.100.171"}])
    );
    let out = e.json(&["provision", "apply", "--reboot"]);
    assert_all_ok(&out);
    assert_eq!(out["applied"][0]["rebooted"], true, "{out}");
    assert_eq!(out["applied"][0]["ips"][0], "192.168.100.171", "{out}");
    assert!(actions(&e.json(&["provision", "plan"]))
        .iter()
        .all(|(_, a)| a == "unchanged"));
    assert!(e.violations().is_empty(), "{:?}", e.violations());
}

/// Issue 21 point 2: a VM is labctl's from its clone on (the clone's
/// `description` carries the mark), so a create cut short is adopted and
/// finished by the next apply; after a lost reply labctl looks before
/// sending a clone or a start again.
#[test]
fn an_interrupted_create_is_finished_and_lost_replies_are_not_resent_blindly() {
    let e = PEnv::new();
    // The clone's and the start's replies are lost after PVE did the work.
    e.sim.with(|s| {
        s.faults.lose_reply = vec!["/qemu/9000/clone".into(), "/qemu/702/status/start".into()]
    });
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| {
        assert!(s.faults.lose_reply.is_empty());
        let count = |suffix: &str| {
            s.log
                .iter()
                .filter(|(m, p, _)| m == "POST" && p.ends_with(suffix))
                .count()
        };
        assert_eq!(count("/qemu/9000/clone"), 1, "the clone was not sent again");
        assert_eq!(
            count("/qemu/702/status/start"),
            1,
            "the start was not sent again"
        );
        assert!(s.vms[&701].running && s.vms[&702].running);
    });
    // A create cut short after the clone (labctl killed before its
    // config step): the next plan adopts the marked VM and apply
    // finishes it.
    let e = PEnv::new();
    e.sim.with(|s| {
        let mut vm = s.vms[&9001].clone();
        vm.template = false;
        vm.name = "nodo1".into();
        vm.config.remove("template");
        vm.config.insert("name".into(), "nodo1".into());
        vm.config.insert(
            "description".into(),
            "labctl-managed: nodo1 (labctl provision; an interrupted create is finished by the next apply)".into(),
        );
        s.vms.insert(702, vm);
    });
    let plan = e.json(&["provision", "plan"]);
    let nodo1 = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "nodo1")
        .unwrap()
        .clone();
    assert_eq!(nodo1["action"], "update", "{plan}");
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| {
        assert!(s.vms[&702].running);
        assert!(s.vms[&702].config["tags"].contains("labctl-managed"));
    });
    // Someone else's VM with that VMID (no mark) stays a conflict.
    let e = PEnv::new();
    e.sim.with(|s| {
        let mut vm = s.vms[&9001].clone();
        vm.template = false;
        vm.name = "nodo1".into();
        vm.config.remove("template");
        s.vms.insert(702, vm);
    });
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6));
}

/// Issue 21 point 1: one template on one node's local-lvm cannot be
/// cloned to the other nodes (PVE refuses the clone with `target`). Plan
/// says so with the fix instead of "create"; `clone_via:
/// local-then-migrate` clones on the template's node and migrates the
/// stopped clone; a template on shared storage is cloned directly.
#[test]
fn a_template_on_local_storage_is_cloned_on_its_node_or_refused_by_plan() {
    let one_template = VMS
        .replace("{ vmid: 9001, node: pve2 }", "{ vmid: 9000, node: pve1 }")
        .replace("{ vmid: 9002, node: pve3 }", "{ vmid: 9000, node: pve1 }");
    let e = PEnv::new();
    e.write(8, "20G", &one_template);
    let out = e.run(&["provision", "plan"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("template 9000 on pve1 has disks on local storage (local-lvm): PVE cannot clone it to pve2")
            && text.contains("clone_via: local-then-migrate"),
        "{text}"
    );
    assert!(e.violations().is_empty(), "{:?}", e.violations());
    // Clone on pve1, then migrate the stopped clones.
    let via = one_template.replace(
        "    template: { vmid: 9000, node: pve1 }\n    ipconfig: { ip: 192.168.100.17",
        "    template: { vmid: 9000, node: pve1 }\n    clone_via: local-then-migrate\n    ipconfig: { ip: 192.168.100.17",
    );
    e.write(8, "20G", &via);
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| {
        assert_eq!(
            (
                s.vms[&701].node.as_str(),
                s.vms[&702].node.as_str(),
                s.vms[&703].node.as_str()
            ),
            ("pve1", "pve2", "pve3")
        );
        assert!(s.vms[&702].running && s.vms[&703].running);
        let migrations = s
            .log
            .iter()
            .filter(|(m, p, _)| m == "POST" && p.ends_with("/migrate"))
            .count();
        assert_eq!(migrations, 2);
        assert!(!s
            .log
            .iter()
            .any(|(_, p, q)| p.ends_with("/clone") && q.contains_key("target")));
    });
    assert!(e.violations().is_empty(), "{:?}", e.violations());
    let plan = e.json(&["provision", "plan"]);
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["action"] == "unchanged"),
        "{plan}"
    );
    // The template on shared storage: cloned straight to each node.
    let e = PEnv::new();
    e.sim.with(|s| {
        let t = s.vms.get_mut(&9000).unwrap();
        t.config
            .insert("scsi0".into(), "ceph-vm:base-9000-disk-0,size=2252M".into());
        t.config.insert(
            "ide2".into(),
            "ceph-vm:vm-9000-cloudinit,media=cdrom".into(),
        );
    });
    e.write(8, "20G", &one_template);
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| assert_eq!(s.vms[&703].node, "pve3"));
}

#[test]
fn changes_to_a_running_vm_wait_for_a_reboot_unless_one_is_allowed() {
    let e = PEnv::new();
    assert_all_ok(&e.json(&["provision", "apply"]));
    // More memory for the control plane, fewer cores for nodo1: PVE keeps
    // both in the config's pending section while the VMs run.
    let vms = VMS
        .replace(
            "    role: control-plane\n",
            "    role: control-plane\n    memory_mib: 12288\n",
        )
        .replace(
            "    template: { vmid: 9001, node: pve2 }\n",
            "    template: { vmid: 9001, node: pve2 }\n    cores: 4\n",
        );
    e.write(8, "20G", &vms);
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(
        plan["steps"][0]["needs_reboot"],
        serde_json::json!(["memory"])
    );
    assert_eq!(plan["steps"][0]["reboot"], false);
    let text = String::from_utf8_lossy(&e.run(&["provision", "plan"]).stdout).to_string();
    assert!(
        text.contains("memory: 8192 → 12288 (takes effect at the next restart)")
            && text.contains("reboot: no"),
        "{text}"
    );
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    assert_eq!(out["applied"][0]["pending"], serde_json::json!(["memory"]));
    assert_eq!(out["applied"][1]["pending"], serde_json::json!(["cores"]));
    assert_eq!(out["applied"][0]["rebooted"], false);
    e.sim.with(|s| {
        let vm = &s.vms[&701];
        assert_eq!(vm.config["memory"], "8192");
        assert_eq!(vm.pending["memory"], "12288");
    });
    // The next plan says so instead of "unchanged".
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(
        actions(&plan),
        [
            ("controlador".into(), "update".into()),
            ("nodo1".into(), "update".into()),
            ("nodo2".into(), "unchanged".into())
        ]
    );
    assert_eq!(
        plan["steps"][0]["pending"],
        serde_json::json!([{"field": "memory", "old": "8192", "new": "12288"}])
    );
    assert_eq!(plan["steps"][0]["changes"], serde_json::json!([]));
    let text = String::from_utf8_lossy(&e.run(&["provision", "plan"]).stdout).to_string();
    assert!(
        text.contains("memory: 8192 → 12288 (pending until reboot)"),
        "{text}"
    );
    // --reboot: one VM at a time, each back with its agent and address.
    let before = e.sim.writes().len();
    let out = e.json(&["provision", "apply", "--reboot"]);
    assert_all_ok(&out);
    assert_eq!(out["applied"][0]["rebooted"], true);
    assert_eq!(out["applied"][1]["rebooted"], true);
    assert_eq!(out["applied"][2]["rebooted"], false);
    assert_eq!(out["applied"][0]["ips"][0], "192.168.100.171");
    let writes = e.sim.writes()[before..].to_vec();
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(
        writes.iter().all(|w| w.ends_with("/status/reboot")),
        "{writes:?}"
    );
    e.sim.with(|s| {
        assert_eq!(s.overlapping_reboots, 0);
        assert_eq!(s.vms[&701].config["memory"], "12288");
        assert!(s.vms[&701].pending.is_empty());
        assert_eq!(s.vms[&702].config["cores"], "4");
    });
    assert!(actions(&e.json(&["provision", "plan"]))
        .iter()
        .all(|(_, a)| a == "unchanged"));
    // A cloud-init change waits for a restart too (the drive is
    // regenerated at start), and reboot_policy: when-needed reboots
    // without the flag.
    let vms = vms.replace(
        "192.168.100.173/24, gw: 192.168.100.1 }\n",
        "192.168.100.183/24, gw: 192.168.100.1 }\n    reboot_policy: when-needed\n",
    );
    e.write(8, "20G", &vms);
    let plan = e.json(&["provision", "plan"]);
    assert_eq!(
        plan["steps"][2]["needs_reboot"],
        serde_json::json!(["ipconfig0"])
    );
    assert_eq!(plan["steps"][2]["reboot"], true);
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    assert_eq!(out["applied"][2]["rebooted"], true);
    assert_eq!(out["applied"][2]["ips"][0], "192.168.100.183");
    assert!(actions(&e.json(&["provision", "plan"]))
        .iter()
        .all(|(_, a)| a == "unchanged"));
    // A bad policy is refused at its line.
    let bad = vms.replace("reboot_policy: when-needed", "reboot_policy: always");
    e.write(8, "20G", &bad);
    let out = e.run(&["provision", "validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("reboot_policy") && stderr(&out).contains("never or when-needed"),
        "{}",
        stderr(&out)
    );
    assert!(e.violations().is_empty(), "{:?}", e.violations());
}

/// Runs `provision apply` (with `extra` flags) until every VM is ok;
/// at most three runs. Returns how many it took.
fn converge(e: &PEnv, seed: u64, extra: &[&str]) -> u32 {
    let mut args = vec!["--json", "provision", "apply"];
    args.extend_from_slice(extra);
    let mut runs = 0;
    loop {
        runs += 1;
        let out = e.run(&args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if out.status.success()
            && report["applied"]
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v["ok"] == true))
        {
            return runs;
        }
        eprintln!("seed {seed} run {runs}: {}", stderr(&out));
        assert!(
            runs < 3,
            "seed {seed}: not converged after {runs} runs: {}\n{report}",
            stderr(&out)
        );
    }
}

#[test]
fn apply_converges_under_lost_replies_a_restart_and_lock_timeouts() {
    let mut injected: Vec<String> = vec![];
    for seed in 1..=3u64 {
        let e = PEnv::new();
        let mut runs = vec![];
        // Create the three VMs, then change them (cores wait for a reboot,
        // the disk grows) with --reboot, each under its own chaos.
        for (phase, extra) in [(0u64, &[][..]), (100, &["--reboot"][..])] {
            if phase > 0 {
                e.write(4, "24G", VMS);
            }
            e.sim
                .with(|s| s.faults.chaos = Some(crate::pve_sim::Chaos::new(seed + phase)));
            runs.push(converge(&e, seed, extra));
            let chaos = e.sim.with(|s| s.faults.chaos.take().unwrap());
            let plan = e.json(&["provision", "plan"]);
            assert!(
                actions(&plan).iter().all(|(_, a)| a == "unchanged"),
                "seed {seed}: {plan}\ninjected: {:?}",
                chaos.injected
            );
            injected.extend(chaos.injected);
        }
        e.sim.with(|s| {
            for id in [701, 702, 703] {
                let vm = &s.vms[&id];
                assert!(vm.running && vm.lock.is_none(), "seed {seed}: {id}");
                assert_eq!(vm.config["cores"], "4");
                assert!(vm.pending.is_empty(), "seed {seed}: {:?}", vm.pending);
                // One disk, grown once: nothing allocated twice.
                let disks: Vec<_> = vm
                    .config
                    .keys()
                    .filter(|k| k.starts_with("scsi") && *k != "scsihw" || k.starts_with("unused"))
                    .collect();
                assert_eq!(disks, ["scsi0"], "seed {seed}: {:?}", vm.config);
                assert!(vm.config["scsi0"].contains("size=24G"));
            }
            // Nothing created twice, nothing left behind.
            assert_eq!(s.vms.len(), 6, "seed {seed}: {:?}", s.vms.keys());
            // Each VM rebooted once (a lost reply is looked up in the
            // node's task list, not answered with a second reboot).
            for id in [701, 702, 703] {
                let reboots = s
                    .log
                    .iter()
                    .filter(|(m, p, _)| m == "POST" && p.ends_with(&format!("/{id}/status/reboot")))
                    .count();
                assert_eq!(reboots, 1, "seed {seed}: VM {id}");
            }
        });
        assert!(e.violations().is_empty(), "{:?}", e.violations());
        eprintln!("seed {seed}: runs {runs:?}");
    }
    eprintln!("injected: {injected:?}");
    // The faults did happen.
    for kind in ["restart", "lock", "drop"] {
        assert!(
            injected.iter().any(|i| i.starts_with(kind)),
            "no {kind}: {injected:?}"
        );
    }
}

#[test]
fn a_config_write_whose_reply_is_lost_is_not_sent_twice() {
    let e = PEnv::new();
    assert_all_ok(&e.json(&["provision", "apply"]));
    // A second disk and other cores for the control plane; the reply to
    // the config write is lost after PVE made the change.
    let vms = VMS.replace(
        "    role: control-plane\n",
        "    role: control-plane\n    cores: 6\n    disks:\n      - { slot: scsi0, storage: local-lvm, size: 20G, iothread: true }\n      - { slot: scsi1, storage: local-lvm, size: 8G }\n",
    );
    e.write(8, "20G", &vms);
    e.sim
        .with(|s| s.faults.lose_reply = vec!["PUT /qemu/701/config".into()]);
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    e.sim.with(|s| {
        assert!(s.faults.lose_reply.is_empty());
        let vm = &s.vms[&701];
        // Sent once: no second volume (unused0), no digest refusal.
        assert!(vm.config["scsi1"].contains("size=8G"), "{:?}", vm.config);
        assert!(!vm.config.contains_key("unused0"), "{:?}", vm.config);
        assert_eq!(vm.pending["cores"], "6");
        let puts = s
            .log
            .iter()
            .filter(|(m, p, _)| m == "PUT" && p.ends_with("/701/config"))
            .count();
        assert_eq!(puts, 2, "the create's write and this one");
    });
}

#[test]
fn an_endpoint_that_dies_mid_apply_is_swapped_for_the_next() {
    let e = PEnv::new();
    // The first endpoint is a node that goes down after 15 requests (in
    // the middle of the clones); the second stays up.
    let dying = e.sim.node_that_dies_after(15);
    let text = std::fs::read_to_string(&e.platform).unwrap();
    let one = format!("endpoints: [\"{}\"]", e.sim.endpoint());
    assert!(text.contains(&one));
    let two = format!("endpoints: [\"{dying}\", \"{}\"]", e.sim.endpoint());
    std::fs::write(&e.platform, text.replace(&one, &two)).unwrap();
    let out = e.json(&["provision", "apply"]);
    assert_all_ok(&out);
    assert!(actions(&e.json(&["provision", "plan"]))
        .iter()
        .all(|(_, a)| a == "unchanged"));
    e.sim.with(|s| {
        assert_eq!(s.vms.len(), 6);
        // Each VM cloned once.
        let clones = s
            .log
            .iter()
            .filter(|(m, p, _)| m == "POST" && p.ends_with("/clone"))
            .count();
        assert_eq!(clones, 3);
    });
    assert!(e.violations().is_empty(), "{:?}", e.violations());
}
