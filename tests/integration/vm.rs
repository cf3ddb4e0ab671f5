//! The `vm` source against a real sshd (Debian's openssh-server, started
//! here on a loopback port with its own host key and one authorized key)
//! whose `vzdump` and `qmrestore` are the test programs of
//! examples/fakepve.rs, and the PVE API simulator (pve_sim.rs) sharing the
//! VM configs with them as pmxcfs does on a cluster.

use crate::common::*;
use crate::pve_sim::{PveSim, SimVm, TOKEN_ID, TOKEN_SECRET};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A PVE node's shell: sshd on 127.0.0.1 with the test vzdump/qmrestore.
pub struct Node {
    _dir: tempfile::TempDir,
    sshd: Child,
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// `FAKEPVE_DIR`: configs (pmxcfs), images, storage.
    pub state: PathBuf,
    pub bin: PathBuf,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Node {
    pub fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let fake = Path::new(BIN).parent().unwrap().join("examples/fakepve");
        assert!(
            fake.exists(),
            "{} is missing: cargo build --example fakepve (scripts/test-all.sh builds it)",
            fake.display()
        );
        let bin = d.join("bin");
        fs::create_dir_all(&bin).unwrap();
        for p in ["vzdump", "qmrestore"] {
            std::os::unix::fs::symlink(&fake, bin.join(p)).unwrap();
        }
        let state = d.join("pmxcfs");
        fs::create_dir_all(state.join("nodes/pve1/qemu-server")).unwrap();
        fs::create_dir_all(state.join("images")).unwrap();
        fs::create_dir_all(state.join("storage")).unwrap();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        let shell = d.join("node-shell");
        fs::write(
            &shell,
            format!(
                "#!/bin/sh\nexport FAKEPVE_DIR='{}' FAKEPVE_NODE=pve1 PATH='{}':/usr/bin:/bin\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
                state.display(),
                bin.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&shell, fs::Permissions::from_mode(0o755)).unwrap();
        let pubkey = fs::read_to_string(d.join("client_key.pub")).unwrap();
        fs::write(
            d.join("authorized_keys"),
            format!(
                "command=\"{}\",no-pty,no-port-forwarding,no-agent-forwarding {pubkey}",
                shell.display()
            ),
        )
        .unwrap();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let port = crate::etcd::free_port();
        fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel ERROR\n",
                d = d.display()
            ),
        )
        .unwrap();
        if is_root() {
            // sshd's privilege separation directory (Debian's unit makes it).
            fs::create_dir_all("/run/sshd").unwrap();
        }
        let log = fs::File::create(d.join("sshd.log")).unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("sshd (Debian: openssh-server; scripts/test-all.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let host_pub = fs::read_to_string(d.join("host_key.pub")).unwrap();
        let mut parts = host_pub.split_whitespace();
        let known_hosts = d.join("known_hosts");
        fs::write(
            &known_hosts,
            format!(
                "[127.0.0.1]:{port} {} {}\n",
                parts.next().unwrap(),
                parts.next().unwrap()
            ),
        )
        .unwrap();
        Node {
            key: d.join("client_key"),
            _dir: dir,
            sshd,
            port,
            user,
            known_hosts,
            state,
            bin,
        }
    }

    /// What the node's vzdump emits for `vmid` now (run here directly).
    pub fn archive(&self, vmid: u32) -> Vec<u8> {
        let out = Command::new(self.bin.join("vzdump"))
            .env("FAKEPVE_DIR", &self.state)
            .args([
                &vmid.to_string(),
                "--mode",
                "snapshot",
                "--stdout",
                "--compress",
                "0",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// The simulator with VM 701 (controlador) on pve1, configs shared with `node`.
pub fn sim_with_vm(node: &Node, disk: &str) -> PveSim {
    let sim = PveSim::start();
    sim.with(|s| {
        s.pmxcfs = Some(node.state.clone());
        let config = [
            ("name", "controlador"),
            ("cores", "2"),
            ("sockets", "1"),
            ("memory", "4096"),
            ("scsihw", "virtio-scsi-single"),
            (
                "scsi0",
                &format!("local-lvm:vm-701-disk-0,iothread=1,size={disk}"),
            ),
            ("net0", "virtio=BC:24:11:7A:01:01,bridge=vmbr0"),
            ("agent", "1"),
            ("cipassword", "**********"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let vm = SimVm {
            name: "controlador".into(),
            node: "pve1".into(),
            template: false,
            running: true,
            config,
            pool: None,
            lock: None,
            booted_at: None,
            ..Default::default()
        };
        // A second VM on the same node (the test sshd plays one node).
        let mut nodo1 = vm.clone();
        nodo1.name = "nodo1".into();
        nodo1.config.insert("name".into(), "nodo1".into());
        nodo1
            .config
            .insert("scsi0".into(), "local-lvm:vm-702-disk-0,size=8M".into());
        nodo1.config.insert(
            "net0".into(),
            "virtio=BC:24:11:7A:02:02,bridge=vmbr0".into(),
        );
        s.vms.insert(701, vm);
        s.vms.insert(702, nodo1);
    });
    sim
}

/// A platform file for `sim` and `node` in `dir`.
pub fn platform(dir: &Path, sim: &PveSim, node: &Node, known_hosts: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let secret = dir.join("pve-token");
    fs::write(&secret, format!("{TOKEN_SECRET}\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let p = dir.join("platform.yaml");
    fs::write(
        &p,
        format!(
            "proxmox:
  endpoints: [\"{}\"]
  token:
    id: {TOKEN_ID}
    secret_file: {}
  task_timeout_secs: 30
defaults:
  cores: 2
  memory_mib: 4096
  disks:
    - {{ slot: scsi0, storage: local-lvm, size: 20G }}
  networks:
    - {{ slot: net0, model: virtio, bridge: vmbr0 }}
vms:
  - name: controlador
    vmid: 701
    node: pve1
    template: {{ vmid: 9000, node: pve1 }}
ssh:
  user: {}
  identity_file: {}
  known_hosts: {}
  port: {}
  hosts: {{ pve1: 127.0.0.1 }}
  connect_timeout_secs: 5
",
            sim.endpoint(),
            secret.display(),
            node.user,
            node.key.display(),
            known_hosts.display(),
            node.port
        ),
    )
    .unwrap();
    p
}

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap()
}

#[test]
fn a_vm_streams_over_ssh_dedups_night_over_night_and_restores_into_a_staging_vmid() {
    let node = Node::start();
    let sim = sim_with_vm(&node, "64M");
    let env = Env::new();
    let plat = platform(env.dir.path(), &sim, &node, &node.known_hosts);
    let p = plat.to_str().unwrap();
    let pve = [("LABCTL_PVE_RETRY_MS", "20"), ("LABCTL_PVE_POLL_MS", "50")];
    let run = |args: &[&str], restore: bool| {
        let mut c = env.cmd();
        c.envs(pve);
        if restore {
            c.env("LABCTL_RESTORE_KEY", &env.restore_key);
        } else {
            c.env("LABCTL_KEY", &env.backup_key);
        }
        c.args(args).output().unwrap()
    };

    // Night 1: the whole archive, byte for byte, with the config in facts.
    let out = run(
        &["--json", "backup", "vm", "controlador", "--platform", p],
        false,
    );
    assert_success(&out, &["backup vm"]);
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let snaps = snapshots(&env);
    let s = &snaps[0];
    assert_eq!(s["source"]["kind"], "vm");
    assert_eq!(s["source"]["name"], "controlador");
    assert_eq!(s["facts"]["vm.vmid"], 701);
    assert_eq!(s["facts"]["vm.node"], "pve1");
    assert_eq!(s["facts"]["vm.config"]["cores"], 2);
    let facts = s["facts"].to_string();
    assert!(!facts.contains("cipassword"), "{facts}");
    let id1 = s["id"].as_str().unwrap().to_string();
    let archive1 = node.archive(701);
    assert!(archive1.len() > 64 << 20);
    let out = run(&["restore", &id1, "--stdout"], true);
    assert_success(&out, &["restore --stdout"]);
    assert!(
        out.stdout == archive1,
        "the restored archive differs from vzdump's"
    );

    // While a backup runs, no process's argv holds a secret (the token
    // goes in an HTTP header, the SSH key is named by its path).
    fs::write(node.state.join("images/701.delay-ms"), "40").unwrap();
    let mut child = {
        let mut c = env.cmd();
        c.envs(pve)
            .env("LABCTL_KEY", &env.backup_key)
            .args(["backup", "vm", "controlador", "--platform", p])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let key_text = fs::read_to_string(&node.key).unwrap();
    let key_line = key_text.lines().nth(1).unwrap().to_string();
    let mut saw_vzdump = false;
    while child.try_wait().unwrap().is_none() {
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(TOKEN_SECRET) && !cmdline.contains(&key_line),
                "a secret in argv: {cmdline}"
            );
            saw_vzdump |= cmdline.contains("vzdump 701 --mode snapshot --stdout");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(saw_vzdump, "the scan saw the ssh and vzdump processes");
    fs::remove_file(node.state.join("images/701.delay-ms")).unwrap();

    // Night 2: a few scattered 64 KiB changes; about that much is added.
    fs::write(node.state.join("images/701.night"), "1").unwrap();
    let out = run(&["--json", "backup", "vm", "701", "--platform", p], false);
    assert_success(&out, &["backup vm (night 2)"]);
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let added1 = first["summary"]["bytes-added"].as_u64().unwrap();
    let added2 = second["summary"]["bytes-added"].as_u64().unwrap();
    assert!(
        added2 > 0 && added2 * 8 < added1,
        "night 1 added {added1}, night 2 {added2}"
    );
    let archive2 = node.archive(701);
    let id2 = snapshots(&env).last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Restore into a staging VMID on an isolated bridge: left stopped,
    // config verified through the API, the disk byte for byte.
    let out = run(
        &[
            "--json",
            "restore",
            &id2,
            "--to-vm",
            "--node",
            "pve1",
            "--vmid",
            "9701",
            "--vmid-range",
            "9701-9703",
            "--storage",
            "local-lvm",
            "--bridge",
            "vmbr99",
            "--platform",
            p,
        ],
        true,
    );
    assert_success(&out, &["restore --to-vm"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["vm"]["verified"].as_str().unwrap().contains("cores"),
        "{r}"
    );
    let disk = fs::read(node.state.join("images/restored-9701.raw")).unwrap();
    let header = archive2.len() - disk.len();
    assert!(disk == archive2[header..], "the restored disk differs");
    let vm = sim
        .with(|s| s.vms.get(&9701).cloned())
        .expect("VM 9701 listed by the API");
    assert!(!vm.running, "left stopped");
    assert!(
        vm.config["net0"].ends_with("bridge=vmbr99"),
        "{:?}",
        vm.config
    );
    assert!(
        !vm.config["net0"].contains("7A:01:01"),
        "a new MAC (--unique)"
    );
    assert!(
        vm.config["scsi0"].starts_with("local-lvm:vm-9701-disk-0"),
        "{:?}",
        vm.config
    );
    assert!(sim.with(|s| s.schema_violations.is_empty()));

    // A VMID that exists, one outside the range: refused, nothing restored.
    let out = run(
        &[
            "restore",
            &id2,
            "--to-vm",
            "--node",
            "pve1",
            "--vmid",
            "9701",
            "--platform",
            p,
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VMID 9701 exists"),
        "{}",
        stderr(&out)
    );
    let out = run(
        &[
            "restore",
            &id2,
            "--to-vm",
            "--node",
            "pve1",
            "--vmid",
            "9800",
            "--vmid-range",
            "9701-9703",
            "--platform",
            p,
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("outside the allowed range"),
        "{}",
        stderr(&out)
    );

    // A storage that fills up: qmrestore fails, no VM is left.
    fs::write(node.state.join("storage/small.free"), "1000000").unwrap();
    let out = run(
        &[
            "restore",
            &id2,
            "--to-vm",
            "--node",
            "pve1",
            "--vmid",
            "9702",
            "--storage",
            "small",
            "--platform",
            p,
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    assert!(sim.with(|s| !s.vms.contains_key(&9702)));
    assert!(!node.state.join("nodes/pve1/qemu-server/9702.conf").exists());

    // No secret anywhere in what labctl printed or stored.
    let key = fs::read_to_string(&node.key).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    for text in [
        facts,
        String::from_utf8_lossy(&out.stderr).to_string(),
        r.to_string(),
    ] {
        assert!(!text.contains(TOKEN_SECRET) && !text.contains(key_body));
    }
}

#[test]
fn a_failing_vzdump_a_wrong_host_key_or_a_missing_vm_commits_nothing() {
    let node = Node::start();
    let sim = sim_with_vm(&node, "32M");
    let env = Env::new();
    let plat = platform(env.dir.path(), &sim, &node, &node.known_hosts);
    let p = plat.to_str().unwrap();
    let run = |args: &[&str]| {
        env.cmd()
            .env("LABCTL_KEY", &env.backup_key)
            .env("LABCTL_PVE_RETRY_MS", "20")
            .args(args)
            .output()
            .unwrap()
    };
    // vzdump dies mid-stream.
    fs::write(node.state.join("images/701.fail-after"), "5000000").unwrap();
    let out = run(&["backup", "vm", "controlador", "--platform", p]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("nothing was committed") && e.contains("Broken pipe"),
        "{e}"
    );
    assert!(snapshots(&env).is_empty());
    fs::remove_file(node.state.join("images/701.fail-after")).unwrap();

    // A node without vzdump (not a PVE node, or a broken PATH).
    fs::rename(node.bin.join("vzdump"), node.bin.join("vzdump.off")).unwrap();
    let out = run(&["backup", "vm", "controlador", "--platform", p]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vzdump: not found"),
        "{}",
        stderr(&out)
    );
    fs::rename(node.bin.join("vzdump.off"), node.bin.join("vzdump")).unwrap();

    // A VM the cluster does not have.
    let out = run(&["backup", "vm", "799", "--platform", p]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VM 799 does not exist"),
        "{}",
        stderr(&out)
    );

    // A node whose host key is not the pinned one: refused, exit 5.
    let other = env.path("other_host_key");
    keygen(&other);
    let fake_kh = env.path("known_hosts_wrong");
    let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    fs::write(
        &fake_kh,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            node.port,
            parts.next().unwrap(),
            parts.next().unwrap()
        ),
    )
    .unwrap();
    let wrong = platform(&env.path("wrong"), &sim, &node, &fake_kh);
    let out = run(&[
        "backup",
        "vm",
        "controlador",
        "--platform",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("host key"), "{}", stderr(&out));

    // A key file others can read: refused before connecting.
    fs::set_permissions(&node.key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["backup", "vm", "controlador", "--platform", p]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    fs::set_permissions(&node.key, fs::Permissions::from_mode(0o600)).unwrap();

    // A node nobody answers on.
    let text = fs::read_to_string(&plat).unwrap().replace(
        &format!("port: {}", node.port),
        &format!("port: {}", crate::etcd::free_port()),
    );
    let down = env.path("down.yaml");
    fs::write(&down, text).unwrap();
    let out = run(&[
        "backup",
        "vm",
        "controlador",
        "--platform",
        down.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("node pve1"), "{}", stderr(&out));

    assert!(snapshots(&env).is_empty(), "nothing was committed");
    // The repository is consistent after all of it.
    env.ok(&["check"]);
}

#[test]
fn a_drill_restores_the_points_vm_into_the_staging_range_and_destroys_it_after() {
    let node = Node::start();
    let sim = sim_with_vm(&node, "16M");
    let env = Env::new();
    let plat = platform(env.dir.path(), &sim, &node, &node.known_hosts);
    let p = plat.to_str().unwrap();
    let out = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .args([
            "backup",
            "vm",
            "controlador",
            "nodo1",
            "--platform",
            p,
            "--restore-point",
            "night-1",
        ])
        .output()
        .unwrap();
    assert_success(&out, &["backup vm --restore-point"]);
    let plan = env.path("staging.yaml");
    fs::write(
        &plan,
        format!(
            "environment: staging\nrto_objective: 5m\nvm:\n  node: pve1\n  vmid_range: 9701-9703\n  bridge: vmbr99\n  start: true\n  platform: {p}\n"
        ),
    )
    .unwrap();
    let cfg = env.path("labctl.toml");
    fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\nbackup_key = \"{}\"\nrestore_key = \"{}\"\ncache_dir = \"{}\"\n\n[daemon]\nmetrics_listen = \"\"\n\n[[job]]\nname = \"drill\"\nschedule = \"0 4 * * *\"\ndrill = {{ plan = \"{}\", cleanup = true }}\n",
            env.repo.display(),
            env.backup_key.display(),
            env.restore_key.display(),
            env.cache.display(),
            plan.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    // The dry run shows the VMID it would take, and writes nothing.
    let out = env.run_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        plan.to_str().unwrap(),
        "--config",
        c,
        "--dry-run",
    ]);
    assert_success(&out, &["restore --to staging --dry-run"]);
    let prep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(prep["steps"][0]["vmid"], 9701, "{prep}");
    assert_eq!(prep["steps"][0]["state"], "free");
    assert!(sim.with(|s| !s.vms.contains_key(&9701)));

    let out = env
        .cmd()
        .env("LABCTL_PVE_POLL_MS", "50")
        .args(["jobs", "run", "drill", "--config", c])
        .output()
        .unwrap();
    assert_success(&out, &["jobs run drill"]);
    let drills: serde_json::Value =
        serde_json::from_slice(&env.ok(&["--json", "drills", "--config", c]).stdout).unwrap();
    let steps = drills[0]["report"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{drills}");
    for (step, vmid) in steps.iter().zip([9701, 9702]) {
        assert_eq!(step["kind"], "vm", "{drills}");
        assert_eq!(step["outcome"], "restored", "{drills}");
        let v = step["verified"].as_str().unwrap();
        assert!(v.contains(&format!("VM {vmid}")), "{drills}");
        assert!(v.contains("started, the guest agent answered"), "{drills}");
    }
    assert_eq!(drills[0]["report"]["cleaned-up"], true);
    // Cleanup destroyed the VMs it made, and only those.
    assert!(sim.with(|s| !s.vms.contains_key(&9701)
        && !s.vms.contains_key(&9702)
        && s.vms.contains_key(&701)
        && s.vms.contains_key(&702)));
    assert!(
        sim.with(|s| s.schema_violations.is_empty()),
        "{:?}",
        sim.with(|s| s.schema_violations.clone())
    );

    // A VMID of the range that is taken is refused before anything runs.
    let mut taken = sim.with(|s| s.vms[&701].clone());
    taken.name = "someone-elses".into();
    sim.with(|s| s.vms.insert(9701, taken));
    let out = env.run_restore(&[
        "--json",
        "restore",
        "--to",
        "staging",
        "--plan",
        plan.to_str().unwrap(),
        "--config",
        c,
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let prep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        prep["steps"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("VMID 9701 exists"),
        "{prep}"
    );
    let out = env
        .cmd()
        .args(["jobs", "run", "drill", "--config", c])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        sim.with(|s| s.vms[&9701].name == "someone-elses"),
        "never touched"
    );
}
