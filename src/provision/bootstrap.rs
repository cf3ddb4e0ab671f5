//! Bootstrap rendering: kubeadm init/join configuration and an Ansible
//! inventory for the provisioned VMs. Rendering only; nothing is run.
//!
//! The kubeadm bootstrap token is generated here and is a secret: the files
//! that carry it are written with mode 0600 and it is never printed.

use super::platform::{Platform, Vm};
use crate::error::LabError;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A kubeadm bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`).
pub fn new_token() -> String {
    use rand::Rng;
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    let mut pick =
        |n: usize| -> String { (0..n).map(|_| A[r.gen_range(0..A.len())] as char).collect() };
    format!("{}.{}", pick(6), pick(16))
}

fn write_private(path: &Path, text: &str) -> crate::error::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LabError::refused(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn ip(vm: &Vm) -> crate::error::Result<&str> {
    vm.ip.as_deref().ok_or_else(|| {
        LabError::usage(format!(
            "{}: the bootstrap needs a static ipconfig.ip (it has none, or dhcp)",
            vm.name
        ))
        .into()
    })
}

/// Writes the bootstrap files into `dir` (which must not hold them yet).
/// Returns the files written.
///
/// # Errors
/// A usage error without a `kubernetes:` section or static IPs; a refusal
/// when a file exists.
pub fn render(p: &Platform, dir: &Path) -> crate::error::Result<Vec<PathBuf>> {
    let k = p.kubernetes.as_ref().ok_or_else(|| {
        LabError::usage(format!(
            "{}: add a kubernetes: section (pod_cidr, service_cidr, cri_socket) to render the bootstrap",
            p.path.display()
        ))
    })?;
    let cp = p
        .vms
        .iter()
        .find(|v| v.role == "control-plane")
        .expect("validated: one control plane");
    let cp_ip = ip(cp)?;
    std::fs::create_dir_all(dir)?;
    let token = new_token();
    let version = k
        .version
        .as_deref()
        .map(|v| format!("kubernetesVersion: {v}\n"))
        .unwrap_or_default();
    let cluster = k.cluster_name.as_deref().unwrap_or("kubernetes");
    let mut written = vec![];
    let init = format!(
        "# kubeadm init --config kubeadm-init.yaml   (rendered by labctl from {platform})
apiVersion: kubeadm.k8s.io/v1beta3
kind: InitConfiguration
bootstrapTokens:
  - token: \"{token}\"
    ttl: 24h0m0s
    usages: [signing, authentication]
    groups: [\"system:bootstrappers:kubeadm:default-node-token\"]
localAPIEndpoint:
  advertiseAddress: {cp_ip}
  bindPort: 6443
nodeRegistration:
  name: {cp_name}
  criSocket: {cri}
---
apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
clusterName: {cluster}
{version}controlPlaneEndpoint: \"{cp_ip}:6443\"
networking:
  podSubnet: {pod}
  serviceSubnet: {svc}
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
",
        platform = p.path.display(),
        cp_name = cp.name,
        cri = k.cri_socket,
        pod = k.pod_cidr,
        svc = k.service_cidr,
    );
    let f = dir.join("kubeadm-init.yaml");
    write_private(&f, &init)?;
    written.push(f);
    for w in p.vms.iter().filter(|v| v.role == "worker") {
        let join = format!(
            "# kubeadm join --config kubeadm-join-{name}.yaml   (rendered by labctl)
# Fill caCertHashes with the sha256 hash `kubeadm init` prints (or:
# openssl x509 -pubkey -in /etc/kubernetes/pki/ca.crt | openssl rsa -pubin -outform der | sha256sum).
apiVersion: kubeadm.k8s.io/v1beta3
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: \"{cp_ip}:6443\"
    token: \"{token}\"
    caCertHashes: [\"sha256:REPLACE_WITH_CA_CERT_HASH\"]
nodeRegistration:
  name: {name}
  criSocket: {cri}
  kubeletExtraArgs:
    node-ip: {ip}
",
            name = w.name,
            cri = k.cri_socket,
            ip = ip(w)?,
        );
        let f = dir.join(format!("kubeadm-join-{}.yaml", w.name));
        write_private(&f, &join)?;
        written.push(f);
    }
    let mut inv = format!(
        "# Ansible inventory rendered by labctl from {}\n[control_plane]\n",
        p.path.display()
    );
    let line = |v: &Vm| -> crate::error::Result<String> {
        Ok(format!(
            "{} ansible_host={} ansible_user={} pve_node={} vmid={}\n",
            v.name,
            ip(v)?,
            v.ciuser.as_deref().unwrap_or("ubuntu"),
            v.node,
            v.vmid
        ))
    };
    inv.push_str(&line(cp)?);
    inv.push_str("\n[workers]\n");
    for w in p.vms.iter().filter(|v| v.role == "worker") {
        inv.push_str(&line(w)?);
    }
    inv.push_str(&format!(
        "\n[k8s:children]\ncontrol_plane\nworkers\n\n[k8s:vars]\npod_cidr={}\nservice_cidr={}\ncri_socket={}\ncontrol_plane_endpoint={cp_ip}:6443\n",
        k.pod_cidr, k.service_cidr, k.cri_socket
    ));
    let f = dir.join("inventory.ini");
    write_private(&f, &inv)?;
    written.push(f);
    Ok(written)
}
