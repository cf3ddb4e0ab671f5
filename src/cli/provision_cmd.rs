//! `labctl provision validate | plan | apply | destroy | status`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::provision::{self, platform, Step};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct PlatformArg {
    /// The platform file (PVE endpoint, token reference, VMs).
    #[arg(
        long,
        env = "LABCTL_PLATFORM",
        default_value = "deploy/platform.yaml",
        value_name = "FILE"
    )]
    pub platform: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum ProvisionCmd {
    /// Check the platform file (file, line and field of any problem); no PVE access.
    Validate {
        #[command(flatten)]
        p: PlatformArg,
    },
    /// Compare the platform file with the cluster: create, update (field:
    /// old → new), unchanged, conflicts. Exit 6 when a conflict blocks apply.
    Plan {
        #[command(flatten)]
        p: PlatformArg,
    },
    /// Make the cluster match the platform file: clone, configure cloud-init,
    /// grow disks, start, wait for the guest agent. A second apply does
    /// nothing. One VM failing does not stop the others (exit 1 then).
    ///
    /// A running VM takes some changes (memory, cores, CPU type, cloud-init
    /// settings) only when it restarts: PVE keeps them pending, and apply
    /// reports them unless the VM's `reboot_policy` is `when-needed` or
    /// --reboot is given.
    Apply {
        #[command(flatten)]
        p: PlatformArg,
        /// Reboot running VMs whose changes are pending until a restart, one
        /// VM at a time, each back with its guest agent and declared address
        /// before the next goes down (as `reboot_policy: when-needed` for
        /// every VM).
        #[arg(long)]
        reboot: bool,
    },
    /// Stop and delete one VM labctl created (tagged labctl-managed), with
    /// its disks. Asks for the VM's name unless --yes.
    Destroy {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        p: PlatformArg,
        /// Do not ask; for scripts.
        #[arg(long)]
        yes: bool,
    },
    /// Each VM's live state next to what labctl last applied, when and by whom.
    Status {
        #[command(flatten)]
        p: PlatformArg,
    },
    /// Write the kubeadm init/join configuration (control-plane IP, pod and
    /// service CIDRs, CRI-O socket, a fresh bootstrap token) and an Ansible
    /// inventory into a directory. Rendering only; no PVE access. Files are
    /// mode 0600 (the token is a secret) and never overwritten.
    RenderBootstrap {
        #[command(flatten)]
        p: PlatformArg,
        /// Output directory.
        #[arg(long, value_name = "DIR", default_value = "bootstrap")]
        out: PathBuf,
    },
}

fn load(p: &PlatformArg, g: &GlobalArgs) -> crate::error::Result<platform::Platform> {
    let pf = platform::load(&p.platform)?;
    if !g.quiet {
        for w in &pf.warnings {
            eprintln!("WARNING: {w}");
        }
    }
    Ok(pf)
}

fn audit_path(g: &GlobalArgs) -> PathBuf {
    g.cache_dir
        .clone()
        .unwrap_or_else(crate::repo::default_cache_dir)
        .join("provision.db")
}

fn print_plan(plan: &provision::Plan) {
    for s in &plan.steps {
        match s {
            Step::Create { name, vmid, node } => {
                println!("+ create    {name} (VMID {vmid} on {node})")
            }
            Step::Update {
                name,
                vmid,
                changes,
                needs_reboot,
                pending,
                reboot,
                ..
            } => {
                println!("~ update    {name} (VMID {vmid})");
                let line = |c: &provision::Change, note: &str| {
                    println!(
                        "      {}: {} → {}{note}",
                        c.field,
                        if c.old.is_empty() { "(unset)" } else { &c.old },
                        c.new
                    )
                };
                for c in changes {
                    line(
                        c,
                        if needs_reboot.contains(&c.field) {
                            " (takes effect at the next restart)"
                        } else {
                            ""
                        },
                    );
                }
                for c in pending {
                    line(c, " (pending until reboot)");
                }
                if !pending.is_empty() || !needs_reboot.is_empty() {
                    if *reboot {
                        println!("      reboot: yes (one VM at a time, waiting for its agent)");
                    } else {
                        println!("      reboot: no; the VM runs with the old values until it restarts (`labctl provision apply --reboot`, or reboot_policy: when-needed)");
                    }
                }
            }
            Step::Unchanged { name, vmid, .. } => println!("= unchanged {name} (VMID {vmid})"),
            Step::Conflict { name, vmid, reason } => {
                println!("! conflict  {name} (VMID {vmid}): {reason}")
            }
        }
    }
    for o in &plan.orphans {
        println!("? unmanaged-by-file {} (VMID {} on {}): tagged labctl-managed but not in the platform file; `labctl provision destroy {}` removes it", o.name, o.vmid, o.node, o.name);
    }
}

pub fn run(g: &GlobalArgs, c: ProvisionCmd) -> crate::error::Result<ExitCode> {
    match c {
        ProvisionCmd::Validate { p } => {
            let pf = load(&p, g)?;
            if g.json {
                print_json(
                    &serde_json::json!({"platform": p.platform, "valid": true, "vms": pf.vms, "warnings": pf.warnings}),
                )?;
            } else if !g.quiet {
                println!("{}: valid, {} VM(s)", p.platform.display(), pf.vms.len());
                for v in &pf.vms {
                    println!(
                        "  {:<14} VMID {:<5} {:<8} {} cores, {} MiB, {}",
                        v.name,
                        v.vmid,
                        v.node,
                        v.cores,
                        v.memory_mib,
                        v.ip.as_deref().unwrap_or("dhcp")
                    );
                }
            }
            Ok(ExitCode::Success)
        }
        ProvisionCmd::Plan { p } => {
            let pf = load(&p, g)?;
            let plan = crate::util::runtime()?.block_on(async {
                let c = provision::connect(&pf).await?;
                provision::plan(&c, &pf).await
            })?;
            if g.json {
                print_json(&plan)?;
            } else {
                print_plan(&plan);
            }
            Ok(if plan.conflicts().is_empty() {
                ExitCode::Success
            } else {
                ExitCode::Refused
            })
        }
        ProvisionCmd::Apply { p, reboot } => {
            let mut pf = load(&p, g)?;
            if reboot {
                for v in &mut pf.vms {
                    v.reboot = true;
                }
            }
            let show = !g.json && !g.quiet;
            let (plan, applied) =
                provision::apply_recorded(&pf, &audit_path(g), g.quiet || g.json, |plan| {
                    if show {
                        print_plan(plan);
                    }
                })?;
            let failed: Vec<_> = applied.iter().filter(|a| !a.ok).collect();
            if g.json {
                print_json(&serde_json::json!({"plan": plan, "applied": applied}))?;
            } else if !g.quiet {
                for a in &applied {
                    if a.ok && !a.ips.is_empty() {
                        println!("{}: {}", a.name, a.ips.join(", "));
                    }
                    if a.ok && !a.pending.is_empty() {
                        println!(
                            "{}: {} pending until the VM restarts",
                            a.name,
                            a.pending.join(", ")
                        );
                    }
                }
                if plan.is_noop() {
                    println!(
                        "nothing to do: the cluster matches {}",
                        p.platform.display()
                    );
                }
            }
            if failed.is_empty() {
                return Ok(ExitCode::Success);
            }
            let lines: Vec<String> = failed
                .iter()
                .map(|a| format!("{}: {}", a.name, a.error.as_deref().unwrap_or("failed")))
                .collect();
            Err(LabError::failed(format!(
                "{} of {} VM(s) failed (the others were completed):\n  {}",
                failed.len(),
                applied.len(),
                lines.join("\n  ")
            ))
            .into())
        }
        ProvisionCmd::Destroy { name, p, yes } => {
            let pf = load(&p, g)?;
            if !yes {
                use std::io::{BufRead, IsTerminal, Write};
                if !std::io::stdin().is_terminal() {
                    return Err(LabError::usage("destroy deletes the VM and its disks: pass --yes, or run it on a terminal to confirm").into());
                }
                eprint!("This stops and deletes VM '{name}' with all its disks. Type its name to confirm: ");
                std::io::stderr().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != name {
                    return Err(LabError::refused("not confirmed; nothing was destroyed").into());
                }
            }
            let gone = provision::destroy_recorded(&pf, &audit_path(g), &name, g.quiet || g.json)?;
            if g.json {
                print_json(&gone)?;
            } else if !g.quiet {
                println!(
                    "destroyed {} (VMID {} on {})",
                    gone.name, gone.vmid, gone.node
                );
            }
            Ok(ExitCode::Success)
        }
        ProvisionCmd::RenderBootstrap { p, out } => {
            let pf = load(&p, g)?;
            let files = crate::provision::bootstrap::render(&pf, &out)?;
            if g.json {
                print_json(&files)?;
            } else if !g.quiet {
                for f in &files {
                    println!("wrote {}", f.display());
                }
                println!("next: copy kubeadm-init.yaml to the control plane and run `kubeadm init --config kubeadm-init.yaml`; then fill caCertHashes in the join files");
            }
            Ok(ExitCode::Success)
        }
        ProvisionCmd::Status { p } => {
            let pf = load(&p, g)?;
            let live = crate::util::runtime()?.block_on(async {
                let c = provision::connect(&pf).await?;
                provision::live_vms(&c)
                    .await
                    .map_err(crate::proxmox::PveError::into_lab)
            })?;
            let last = crate::records::provision::last_per_vm(&audit_path(g))?;
            let rows: Vec<serde_json::Value> = pf
                .vms
                .iter()
                .map(|v| {
                    let l = live.get(&v.vmid);
                    serde_json::json!({
                        "name": v.name,
                        "vmid": v.vmid,
                        "node": v.node,
                        "live": l.map(|l| serde_json::json!({"kind": l.kind, "status": l.status, "node": l.node, "name": l.name, "managed": l.tags.contains(platform::MANAGED_TAG)})),
                        "last-applied": last.get(&v.name),
                    })
                })
                .collect();
            if g.json {
                print_json(&rows)?;
            } else {
                let width = |key: &str, min: usize| {
                    rows.iter()
                        .map(|r| match &r[key] {
                            serde_json::Value::String(s) => s.len(),
                            other => other.to_string().len(),
                        })
                        .max()
                        .unwrap_or(0)
                        .max(min)
                };
                let (wn, wv, wd) = (width("name", 2), width("vmid", 4), width("node", 4));
                println!(
                    "{:<wn$} {:>wv$} {:<wd$} {:<10} LAST APPLIED",
                    "VM", "VMID", "NODE", "LIVE"
                );
                for r in &rows {
                    // A container holding the VMID is not the VM.
                    let live = match (r["live"]["kind"].as_str(), r["live"]["status"].as_str()) {
                        (Some("lxc"), _) => "container!",
                        (_, Some(s)) => s,
                        _ => "absent",
                    };
                    let la = &r["last-applied"];
                    let applied = if la.is_null() {
                        "never".to_string()
                    } else {
                        format!(
                            "{} {} by {}@{}{}",
                            la["time"].as_str().unwrap_or(""),
                            la["action"].as_str().unwrap_or(""),
                            la["user"].as_str().unwrap_or(""),
                            la["host"].as_str().unwrap_or(""),
                            if la["ok"].as_bool() == Some(false) {
                                " (FAILED)"
                            } else {
                                ""
                            }
                        )
                    };
                    println!(
                        "{:<wn$} {:>wv$} {:<wd$} {:<10} {applied}",
                        r["name"].as_str().unwrap_or(""),
                        r["vmid"].as_u64().unwrap_or(0),
                        r["node"].as_str().unwrap_or(""),
                        live
                    );
                }
            }
            Ok(ExitCode::Success)
        }
    }
}
