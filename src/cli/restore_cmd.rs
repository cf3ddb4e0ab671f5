//! `labctl restore`.

use super::{print_json, GlobalArgs};
use crate::error::{ExitCode, LabError};
use crate::repo::extract::{self, RestoreOptions};
use crate::util::progress::Progress;
use crate::util::units::human_bytes;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("dest")
        .required(true)
        .multiple(true)
        .args(["target", "stdout", "etcd_data_dir", "verify", "to", "to_vm", "to_cluster", "to_pvc", "mlflow_backend_store_uri", "verify_tracking_uri", "kfp_mysql"])
))]
#[command(after_help = "\
Examples:
  labctl restore latest --target /tmp/r                 # the newest snapshot into /tmp/r
  labctl restore 3f2a --stdout > dump.pgc               # a stream snapshot
  labctl restore 9c1e --etcd-data-dir /var/lib/etcd-new --verify
  labctl restore 5d0b --to-cluster --namespace-map '*=*-staging' --dry-run
  labctl restore 5d0b --to-cluster --path nlp-lab --context staging
  labctl restore 77e1 --to-pvc nlp-lab-staging/nb1-data --storage-class local-path
  labctl restore 41c0 --mlflow-backend-store-uri sqlite:////srv/mlflow-staging/mlflow.db \\
      --mlflow-artifacts /srv/mlflow-staging/artifacts
  labctl restore 8a3f --kfp-mysql mysql://root@mysql-staging:3306 \\
      --kfp-password-file /etc/labctl/kfp-staging.pw --kfp-bucket s3://mlpipeline-staging
  labctl restore --to staging --dry-run                 # what the staging plan would do
  labctl restore --to staging --only etcd,stream        # restore, verify, report the RTO
  labctl restore --to production --point platform-20261204T020000Z-1a2b \\
      --confirm platform-20261204T020000Z-1a2b")]
pub struct RestoreCmd {
    /// Snapshot ID (or a unique prefix), or `latest`. Not with --to, which
    /// restores a whole restore point.
    #[arg(required_unless_present = "to", conflicts_with = "to")]
    pub snapshot: Option<String>,
    /// Directory to restore into (created if missing; must be empty unless
    /// --overwrite). New files are written under their own names; while the
    /// restore runs the directory holds .labctl-restore-incomplete, which
    /// only a killed restore leaves behind (restore again with --overwrite).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["stdout", "etcd_data_dir", "verify", "to_vm", "to_cluster", "to_pvc"])]
    pub target: Option<PathBuf>,
    /// Write one file to stdout: a stream snapshot's data, an etcd
    /// snapshot's `snapshot.db` (as `etcdctl snapshot save` writes it), or
    /// the file named by --path.
    #[arg(long, conflicts_with_all = ["etcd_data_dir", "verify", "to_cluster"])]
    pub stdout: bool,
    /// Verify the restore on a live service: for an etcd snapshot, restore
    /// it into a scratch directory, start etcd on free loopback ports,
    /// compare its key count and revision with the snapshot's facts (and
    /// read --sentinel-key), stop it. Alone or with --etcd-data-dir.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub etcd: crate::sources::etcd::EtcdRestore,
    #[command(flatten)]
    pub vm: crate::sources::vm::VmRestore,
    #[command(flatten)]
    pub kube: crate::sources::kube::KubeRestore,
    #[command(flatten)]
    pub pvc: crate::sources::pvc::PvcRestore,
    #[command(flatten)]
    pub mlflow: crate::sources::mlflow::MlflowRestore,
    #[command(flatten)]
    pub kfp: crate::sources::kfp::KfpRestore,
    /// Restore only this path (and what is below it); repeatable. With
    /// --stdout: the file to write. With --to-cluster: a namespace
    /// (`nlp-lab`), `_cluster`, or deeper (`nlp-lab/kubeflow.org/Notebook`).
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Allow a non-empty target (also one a killed restore left). Existing
    /// files are replaced whole (written to a temporary name, then renamed),
    /// never half-overwritten.
    #[arg(long)]
    pub overwrite: bool,
    /// Fetch threads (0 = default: the backend's request parallelism, 16
    /// for S3 (LABCTL_S3_REQUESTS), 4 for local storage).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Read order for --target. `pack` reads every pack once with a few
    /// large streamed requests and writes blobs into their files out of
    /// order (best for object stores); `file` restores file after file,
    /// writing each sequentially (best for local disks). `auto` picks by
    /// the repository's location. Either way a file appears only when
    /// complete and verified.
    #[arg(long, value_enum, default_value_t = ReadOrderArg::Auto)]
    pub read_order: ReadOrderArg,
    /// Restore files without their setuid and setgid bits. A full restore
    /// as root keeps them (a system needs them back); a restore into a
    /// staging or scratch area should not leave setuid-root programs there.
    #[arg(long)]
    pub no_setuid: bool,
    #[command(flatten)]
    pub plan: PlanArgs,
}

/// `labctl restore --to ENV`: a whole restore point through a restore plan.
#[derive(Args, Debug)]
#[command(next_help_heading = "Restore points through a plan")]
pub struct PlanArgs {
    /// Restore a whole restore point into this environment as its restore
    /// plan says (restore-plans/ENV.yaml): in dependency order, each source
    /// verified, a report with the restore time (RTO). A staging plan that
    /// names a production endpoint of the daemon's jobs is refused.
    #[arg(long, value_enum, value_name = "ENV", conflicts_with_all = ["target", "stdout", "etcd_data_dir", "verify", "paths", "overwrite", "to_vm", "to_cluster", "to_pvc"])]
    pub to: Option<crate::restore::plan::Environment>,
    /// The restore plan (default: restore-plans/ENV.yaml here, else in
    /// labctl.toml's platform.restore_plans folder, else
    /// /etc/labctl/restore-plans/ENV.yaml).
    #[arg(long, value_name = "FILE", requires = "to")]
    pub plan: Option<PathBuf>,
    /// The restore point (ID, unique prefix or `latest`); default: the
    /// newest complete point.
    #[arg(long, value_name = "ID", requires = "to", conflicts_with = "at")]
    pub point: Option<String>,
    /// The newest complete point taken at or before this time (RFC 3339,
    /// or 2026-12-01 / 2026-12-01T03:00 in UTC).
    #[arg(long, value_name = "TIME", requires = "to")]
    pub at: Option<String>,
    /// Only these source kinds (vm, etcd, kube, path, stream), comma-separated.
    #[arg(long, value_name = "KINDS", value_delimiter = ',', requires = "to")]
    pub only: Vec<String>,
    /// Print the plan (what goes where, in order, the bytes, what each
    /// target holds now) and stop: nothing is written. With --to-cluster:
    /// each object's action (create, exists, skip and why).
    #[arg(long)]
    pub dry_run: bool,
    /// With --to production: the point's ID, typed again.
    #[arg(long, value_name = "ID", requires = "to")]
    pub confirm: Option<String>,
    /// The daemon configuration whose backup jobs define production (for
    /// refusing a staging plan that points at it).
    #[arg(long, env = "LABCTL_CONFIG", value_name = "FILE", requires = "to")]
    pub config: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ReadOrderArg {
    Auto,
    Pack,
    File,
}

pub fn run(g: &GlobalArgs, c: RestoreCmd) -> crate::error::Result<ExitCode> {
    if let Some(env) = c.plan.to {
        return run_plan(g, env, &c.plan, c.threads);
    }
    if c.plan.dry_run && !c.kube.to_cluster {
        return Err(LabError::usage("--dry-run goes with --to ENV or --to-cluster").into());
    }
    let repo = g.open(true)?;
    let id = repo.resolve_snapshot(
        c.snapshot
            .as_deref()
            .expect("clap requires it without --to"),
    )?;
    if c.stdout {
        if c.paths.len() > 1 {
            return Err(
                LabError::usage("--stdout writes one file: give at most one --path").into(),
            );
        }
        crate::sources::stream::widen_pipe(1);
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        let n = extract::restore_to_writer(
            &repo,
            &id,
            c.paths.first().map(|s| s.as_str()),
            &mut out,
            c.threads,
        )?;
        if !g.quiet && !g.json {
            eprintln!("restored {} from snapshot {}", human_bytes(n), id.short());
        }
        return Ok(ExitCode::Success);
    }
    if c.kube.to_cluster {
        return run_kube(g, &repo, &id, &c);
    }
    if c.mlflow.mlflow_backend_store_uri.is_some() || c.mlflow.verify_tracking_uri.is_some() {
        return run_mlflow(g, &repo, &id, &c);
    }
    if c.kfp.kfp_mysql.is_some() {
        let r =
            crate::sources::kfp::restore(&repo, &id, &c.kfp, c.overwrite, c.threads)?.verified()?;
        if g.json {
            print_json(&serde_json::json!({"snapshot": id.hex(), "restore": r}))?;
        } else if !g.quiet {
            eprintln!(
                "restored Kubeflow Pipelines snapshot {}: databases {} on {}, {} into {}; {}",
                id.short(),
                r.databases.join(", "),
                r.mysql,
                human_bytes(r.bytes),
                r.bucket,
                r.summary()
            );
        }
        return Ok(ExitCode::Success);
    }
    if c.pvc.to_pvc.is_some() {
        let restore_key = g.restore_key.as_deref().ok_or_else(|| {
            LabError::usage("--to-pvc passes the restore key to the Job: give --restore-key or LABCTL_RESTORE_KEY")
        })?;
        let url = g.repo.as_deref().unwrap_or_default();
        let access = crate::sources::pvc::JobAccess {
            repo_url: url,
            restore_key,
        };
        let r = crate::sources::pvc::restore_to_pvc(&repo, &id, &c.pvc, &c.kube.cluster, &access)?;
        if g.json {
            print_json(&serde_json::json!({"snapshot": id.hex(), "pvc": r}))?;
        } else if !g.quiet {
            eprintln!(
                "restored snapshot {} into PVC {}/{} (class {}) with Job {} in {:.1}s",
                id.short(),
                r.namespace,
                r.pvc,
                r.storage_class.as_deref().unwrap_or("default"),
                r.job,
                r.seconds
            );
        }
        for w in &r.warnings {
            eprintln!("warning: {w}");
        }
        return Ok(ExitCode::Success);
    }
    if c.vm.to_vm {
        let r = crate::sources::vm::restore(&repo, &id, &c.vm, c.threads)?;
        if g.json {
            print_json(&serde_json::json!({"snapshot": id.hex(), "vm": r}))?;
        } else if !g.quiet {
            eprintln!(
                "restored VM snapshot {} as VM {} on node {} ({}){}{}; {}",
                id.short(),
                r.vmid,
                r.node,
                human_bytes(r.bytes),
                r.bridge
                    .as_ref()
                    .map(|b| format!(", network on bridge {b}"))
                    .unwrap_or_default(),
                if r.started {
                    ", started"
                } else {
                    ", left stopped"
                },
                r.verified
            );
        }
        return Ok(ExitCode::Success);
    }
    if c.etcd.etcd_data_dir.is_some() || c.verify {
        return run_etcd(g, &repo, &id, &c);
    }
    let target = c.target.expect("clap requires --target or --stdout");
    let opts = RestoreOptions {
        include: c.paths,
        overwrite: c.overwrite,
        threads: c.threads,
        read_order: match c.read_order {
            ReadOrderArg::Auto => extract::ReadOrder::Auto,
            ReadOrderArg::Pack => extract::ReadOrder::Pack,
            ReadOrderArg::File => extract::ReadOrder::File,
        },
        no_setuid: c.no_setuid,
        ..Default::default()
    };
    let (snap, _) = repo.load_snapshot(&id)?;
    let progress = Progress::bytes(
        g.progress_enabled(),
        "restore",
        Some(snap.summary.bytes_total),
    );
    let started = std::time::Instant::now();
    let summary = extract::restore_to_dir(&repo, &id, &target, &opts, progress)?;
    if g.json {
        print_json(
            &serde_json::json!({"snapshot": id.hex(), "target": target, "summary": summary, "seconds": started.elapsed().as_secs_f64()}),
        )?;
    } else if !g.quiet {
        eprintln!(
            "restored snapshot {} into {}: {} files, {} dirs, {} symlinks, {} in {:.1}s",
            id.short(),
            target.display(),
            summary.files,
            summary.dirs,
            summary.symlinks,
            human_bytes(summary.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    for f in &summary.failed {
        eprintln!("error: {f}");
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::Success
    } else {
        ExitCode::Integrity
    })
}

/// `--mlflow-backend-store-uri` and/or `--verify-tracking-uri` on an
/// mlflow snapshot.
fn run_mlflow(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    id: &crate::repo::Id,
    c: &RestoreCmd,
) -> crate::error::Result<ExitCode> {
    use crate::sources::mlflow;
    let mut report = serde_json::json!({"snapshot": id.hex()});
    if c.mlflow.mlflow_backend_store_uri.is_some() {
        let r = mlflow::restore(repo, id, &c.mlflow, c.overwrite, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "restored MLflow snapshot {}: database {} (alembic {}), artifacts {} ({}); artifact URIs rewritten: {}",
                id.short(),
                r.database,
                r.alembic_revision,
                r.artifacts.display(),
                human_bytes(r.bytes),
                if r.rewritten.is_empty() {
                    "none".to_string()
                } else {
                    r.rewritten
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        report["restore"] = serde_json::to_value(&r)?;
    }
    if let Some(u) = &c.mlflow.verify_tracking_uri {
        let v = mlflow::verify(repo, id, u, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "verified through MLflow {} at {u}: {} experiments, {} runs, {} registered models, {} versions, {} metric histories and {} artifacts as backed up",
                v.server_version, v.experiments, v.runs, v.registered_models, v.model_versions, v.metric_histories, v.artifacts
            );
        }
        report["verify"] = serde_json::to_value(&v)?;
    }
    if g.json {
        print_json(&report)?;
    }
    Ok(ExitCode::Success)
}

/// `--to-cluster` on a kube snapshot.
fn run_kube(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    id: &crate::repo::Id,
    c: &RestoreCmd,
) -> crate::error::Result<ExitCode> {
    let r = crate::sources::kube::restore(repo, id, &c.paths, &c.kube, c.plan.dry_run)?;
    if g.json {
        print_json(&serde_json::json!({"snapshot": id.hex(), "kube": r}))?;
    } else if !g.quiet {
        for o in &r.objects {
            if r.dry_run || o.action == "failed" {
                eprintln!(
                    "{:<7} {}{}",
                    o.action,
                    o.label(),
                    o.reason
                        .as_ref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                );
            }
        }
        eprintln!(
            "{} kube snapshot {} to {}: {} {}, {} {}, {} skipped, {} failed{}; {:.1}s",
            if r.dry_run { "dry run of" } else { "restored" },
            id.short(),
            r.server,
            r.created,
            if r.dry_run { "to create" } else { "created" },
            r.updated,
            if r.dry_run { "to update" } else { "updated" },
            r.skipped,
            r.failed,
            if r.dry_run {
                String::new()
            } else {
                format!(
                    ", {} verified, {} owner references re-linked",
                    r.verified, r.owner_links
                )
            },
            r.seconds
        );
    }
    Ok(if r.failed == 0 {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

/// `--etcd-data-dir` and/or `--verify` on an etcd snapshot.
fn run_etcd(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    id: &crate::repo::Id,
    c: &RestoreCmd,
) -> crate::error::Result<ExitCode> {
    use crate::sources::etcd;
    let mut report = serde_json::json!({"snapshot": id.hex()});
    if let Some(dir) = &c.etcd.etcd_data_dir {
        let r = etcd::restore(repo, id, &c.etcd, dir, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "restored etcd snapshot {} into {} with {} {}{}",
                id.short(),
                r.data_dir.display(),
                r.tool,
                r.tool_version,
                if r.revision_bumped {
                    format!(
                        " (revision bumped by {}, marked compacted)",
                        etcd::REVISION_BUMP
                    )
                } else {
                    String::new()
                }
            );
        }
        report["restore"] = serde_json::to_value(&r)?;
    }
    if c.verify {
        let near = c
            .etcd
            .etcd_data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("labctl-verify"));
        let v = etcd::verify(repo, id, &c.etcd, &near, c.threads)?;
        if !g.quiet && !g.json {
            eprintln!(
                "verified on a live etcd member: {} keys at revision {}{} in {:.1}s",
                v.keys,
                v.revision,
                v.sentinel_key
                    .as_ref()
                    .map(|k| format!(", sentinel key {k:?} present"))
                    .unwrap_or_default(),
                v.seconds
            );
        }
        report["verify"] = serde_json::to_value(&v)?;
    }
    if g.json {
        print_json(&report)?;
    }
    Ok(ExitCode::Success)
}

/// The production a plan must not touch, from the daemon's configuration:
/// the file given, else the default one if it exists (else nothing, said
/// on stderr).
pub(crate) fn production(
    g: &GlobalArgs,
    config: Option<&std::path::Path>,
) -> crate::error::Result<(
    crate::restore::plan::Production,
    Option<crate::schedule::config::Loaded>,
)> {
    let path = match config {
        Some(p) => p.to_path_buf(),
        None => {
            let p = crate::schedule::config::default_path();
            if !p.exists() {
                if !g.quiet {
                    eprintln!(
                        "note: no daemon configuration at {} (--config): the plan is checked against no production jobs",
                        p.display()
                    );
                }
                return Ok((Default::default(), None));
            }
            p
        }
    };
    let loaded = crate::schedule::config::load_without_secrets(&path)?;
    Ok((loaded.production(), Some(loaded)))
}

/// The plan file for `env`: as given, else the first that exists of
/// restore-plans/ENV.yaml, the config's folder, /etc/labctl/restore-plans.
fn plan_path(
    env: crate::restore::plan::Environment,
    given: Option<&std::path::Path>,
    loaded: Option<&crate::schedule::config::Loaded>,
) -> crate::error::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let file = format!("{}.yaml", env.as_str());
    let mut tried = vec![PathBuf::from("restore-plans").join(&file)];
    if let Some(l) = loaded {
        if let Some(d) = &l.raw.platform.restore_plans {
            tried.push(l.relative(d).join(&file));
        }
    }
    tried.push(PathBuf::from("/etc/labctl/restore-plans").join(&file));
    tried.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        LabError::usage(format!(
            "no restore plan for {}: looked for {}; give one with --plan",
            env.as_str(),
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into()
    })
}

/// `labctl restore --to ENV`.
fn run_plan(
    g: &GlobalArgs,
    env: crate::restore::plan::Environment,
    a: &PlanArgs,
    threads: usize,
) -> crate::error::Result<ExitCode> {
    use crate::restore::{plan, staging};
    let (prod, loaded) = production(g, a.config.as_deref())?;
    let file = plan_path(env, a.plan.as_deref(), loaded.as_ref())?;
    let plan = plan::load(&file)?;
    if plan.environment != env {
        return Err(LabError::usage(format!(
            "{} is a plan for {}, not {}",
            file.display(),
            plan.environment.as_str(),
            env.as_str()
        ))
        .into());
    }
    let opts = staging::Options {
        point: a.point.clone(),
        at: a.at.clone(),
        only: a.only.clone(),
        confirm: a.confirm.clone(),
        threads,
        progress: g.progress_enabled(),
        cancel: None,
        job_access: g.repo.clone().zip(g.restore_key.clone()),
    };
    // The backup key lists points; restoring needs the restore key, which
    // a dry run does not.
    let repo = g.open(!a.dry_run)?;
    let prep = staging::prepare(&repo, &plan, &prod, &opts)?;
    if a.dry_run {
        if g.json {
            print_json(&prep)?;
        } else {
            print_prepared(&prep);
            println!("dry run: nothing was written");
        }
        return Ok(if prep.steps.iter().any(|s| s.problem.is_some()) {
            ExitCode::Refused
        } else {
            ExitCode::Success
        });
    }
    if !g.quiet && !g.json {
        print_prepared(&prep);
    }
    let quiet = g.quiet || g.json;
    let report = staging::execute(&repo, &plan, &prep, &opts, &mut |line| {
        if !quiet {
            eprintln!("{line}");
        }
    })?;
    if g.json {
        print_json(&report)?;
    } else if !g.quiet {
        let ok = report
            .steps
            .iter()
            .filter(|s| s.outcome == "restored")
            .count();
        println!(
            "restored {ok} of {} sources of point {} into {} in {:.1}s (the RTO){}",
            report.steps.len(),
            report.point,
            report.environment,
            report.seconds,
            match (report.rto_objective_seconds, report.within_objective) {
                (Some(o), Some(true)) => format!("; objective {o}s met"),
                (Some(o), Some(false)) => format!("; objective {o}s MISSED"),
                _ => String::new(),
            }
        );
        for f in report.failures() {
            println!("  failed: {f}");
        }
    }
    Ok(report.exit_code())
}

fn print_prepared(p: &crate::restore::staging::Prepared) {
    println!(
        "restore point {} ({}{}) into {} with {}",
        p.point,
        p.point_time,
        if p.point_complete {
            ", complete"
        } else {
            ", PARTIAL"
        },
        p.environment.as_str(),
        p.plan.display()
    );
    println!(
        "  {:>2}  {:<7} {:<28} {:<44} {:>10}  STATE",
        "#", "KIND", "SOURCE", "TARGET", "SIZE"
    );
    for (i, s) in p.steps.iter().enumerate() {
        println!(
            "  {:>2}  {:<7} {:<28} {:<44} {:>10}  {}",
            i + 1,
            s.kind,
            s.name,
            s.target,
            human_bytes(s.bytes),
            s.problem
                .as_ref()
                .map(|p| format!("REFUSED: {p}"))
                .unwrap_or_else(|| s.state.clone())
        );
    }
    for l in &p.left_out {
        println!("      left out by --only: {l}");
    }
    println!("  total {}", human_bytes(p.bytes));
}

/// `labctl restore-plan ...`.
#[derive(clap::Subcommand, Debug)]
pub enum RestorePlanCmd {
    /// Check restore plans: every field (file, line and field in the
    /// message), and for a staging plan, that no target is production's
    /// (a path the daemon's jobs back up, their etcd member, a database
    /// their dumps read). Exit 2 for a malformed plan, 6 for a clash.
    Validate {
        /// The plan files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The daemon configuration whose backup jobs define production
        /// (default: /etc/labctl/labctl.toml when it exists).
        #[arg(long, env = "LABCTL_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

pub fn run_restore_plan(g: &GlobalArgs, c: RestorePlanCmd) -> crate::error::Result<ExitCode> {
    let RestorePlanCmd::Validate { files, config } = c;
    let (prod, _) = production(g, config.as_deref())?;
    let mut out = vec![];
    for f in &files {
        let plan = crate::restore::plan::load(f)?;
        plan.refuse_clashes(&prod)?;
        let unchecked = plan.unchecked();
        if !g.quiet && !g.json {
            for n in &unchecked {
                eprintln!("note: {}: {n}", f.display());
            }
        }
        out.push(serde_json::json!({
            "unchecked": unchecked,
            "file": f,
            "environment": plan.environment.as_str(),
            "kinds": plan.kinds(),
            "rto-objective-seconds": plan.rto_objective.map(|d| d.as_secs()),
            "checked-against": prod.origin,
        }));
        if !g.json && !g.quiet {
            println!(
                "{}: ok ({}; targets: {}{})",
                f.display(),
                plan.environment.as_str(),
                plan.kinds().join(", "),
                plan.rto_objective
                    .map(|d| format!("; RTO objective {}", crate::util::units::format_duration(d)))
                    .unwrap_or_default()
            );
        }
    }
    if g.json {
        print_json(&out)?;
    }
    Ok(ExitCode::Success)
}
