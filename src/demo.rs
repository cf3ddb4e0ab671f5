//! `labctl demo`: the whole story on embedded defaults, in a state
//! directory: a local repository (created once, with its key files), a
//! sample "platform" — a tree shaped like the lab's data (a disk image
//! with zero runs, text, nested directories, a symlink, unicode names), a
//! database dump as a stream, and, when `etcd` and its restore tool are on
//! PATH, a local etcd member holding control-plane-like keys — backed up as
//! one restore point with the backup key only, then `restore --to staging`
//! with a plan written in the state directory: each source restored in
//! order and verified (the etcd one on a live member), the tree compared
//! byte for byte with the sample, and the restore time (RTO) printed.

use crate::backend::fs::FsBackend;
use crate::repo::backup::BackupOptions;
use crate::repo::keys::Keys;
use crate::repo::{self, InitOptions, Repository};
use crate::restore::verify::compare_trees;
use crate::restore::{plan, staging};
use crate::sources::SourceSpec;
use crate::util::progress::Progress;
use crate::util::units::human_bytes;
use anyhow::Context;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One source of the demo's restore point.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DemoSource {
    pub kind: String,
    pub name: String,
    pub snapshot: String,
    pub bytes_total: u64,
    pub bytes_added: u64,
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DemoReport {
    pub repository: PathBuf,
    pub sample: PathBuf,
    pub sample_bytes: u64,
    pub point: String,
    pub sources: Vec<DemoSource>,
    /// Sources left out, and why (a missing binary).
    pub skipped: Vec<String>,
    pub plan: PathBuf,
    pub restore: staging::Report,
    /// Where the sample tree was restored.
    pub staging: PathBuf,
    /// Every source restored and verified, and the tree byte-identical.
    pub verified: bool,
    pub differences: Vec<String>,
}

/// Runs the demo in `state`.
///
/// # Errors
/// Any failure of init, backup or restore.
pub fn run(state: &Path, sample_mib: u64, talk: bool) -> crate::error::Result<DemoReport> {
    let say = |s: String| {
        if talk {
            eprintln!("demo: {s}");
        }
    };
    fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    fs::set_permissions(state, fs::Permissions::from_mode(0o700))?;
    let state = &fs::canonicalize(state)?;
    let repo_dir = state.join("repository");
    let restore_key = state.join("restore.key");
    let backup_key = state.join("backup.key");
    if !restore_key.exists() {
        let pass = state.join("escrow.pass");
        let passphrase = format!("demo-{:032x}", rand::random::<u128>());
        fs::write(&pass, format!("{passphrase}\n"))?;
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o600))?;
        let backend = FsBackend::new(&repo_dir);
        let keys = repo::init(
            &backend,
            &InitOptions {
                passphrase: Some(passphrase),
                ..Default::default()
            },
        )?;
        keys.to_backup().save(&backup_key)?;
        keys.save(&restore_key)?;
        say(format!(
            "created repository {} with backup key {} and restore key {}",
            repo_dir.display(),
            backup_key.display(),
            restore_key.display()
        ));
    } else {
        say(format!("using existing repository {}", repo_dir.display()));
    }
    let sample = state.join("sample");
    if !sample.exists() {
        let n = generate_sample(&sample, sample_mib)?;
        say(format!(
            "generated a {} MiB sample tree in {}",
            n >> 20,
            sample.display()
        ));
    }
    let dump = state.join("mlflow-dump.sql");
    if !dump.exists() {
        write_dump(&dump)?;
    }
    // The platform: the tree, the dump as a stream, and etcd when present.
    let mut sources = vec![
        SourceSpec::Path(crate::sources::path::PathSource {
            path: sample.clone(),
            chunker: Default::default(),
        }),
        SourceSpec::Stream(crate::sources::stream::StreamSource {
            name: "mlflow-db".into(),
            command: vec!["cat".into(), dump.display().to_string()],
            chunker: Default::default(),
        }),
    ];
    let mut skipped = vec![];
    let member = match LiveEtcd::start(state) {
        Ok(m) => {
            say(format!(
                "started a local etcd member on {} with {} control-plane keys",
                m.url, m.keys
            ));
            sources.insert(
                0,
                SourceSpec::Etcd(crate::sources::etcd::EtcdSource {
                    endpoint: m.url.clone(),
                    cacert: PathBuf::new(),
                    cert: PathBuf::new(),
                    client_key: PathBuf::new(),
                    timeout: "10s".into(),
                }),
            );
            Some(m)
        }
        Err(why) => {
            say(format!("etcd left out: {why}"));
            skipped.push(format!("etcd: {why}"));
            None
        }
    };
    let cache = state.join("cache");
    // Back up with the backup key only, as a backup host would.
    let backend: Arc<dyn crate::backend::Backend> = Arc::new(FsBackend::new(&repo_dir));
    let repo = Repository::open(backend.clone(), Keys::load(&backup_key)?, &cache)?;
    let run = crate::sources::backup_point(
        &repo,
        "demo",
        &sources,
        &BackupOptions {
            tags: vec!["demo".into()],
            ..Default::default()
        },
        &|s| Progress::bytes(talk, &format!("backup {}", s.kind()), None),
    )?;
    drop(member);
    if !run.failed.is_empty() {
        return Err(crate::error::LabError::failed(format!(
            "restore point {} is partial: {}",
            run.point,
            run.failed.join("; ")
        ))
        .into());
    }
    let mut demo_sources = vec![];
    for (i, kind, out) in &run.written {
        let s = &out.summary;
        let name = sources[*i].what();
        say(format!(
            "backed up {kind} {name}: {} read, {} added, snapshot {}",
            human_bytes(s.bytes_total),
            human_bytes(s.bytes_added),
            out.snapshot_id.short()
        ));
        demo_sources.push(DemoSource {
            kind: kind.to_string(),
            name,
            snapshot: out.snapshot_id.hex(),
            bytes_total: s.bytes_total,
            bytes_added: s.bytes_added,
        });
    }
    say(format!("restore point {} complete", run.point));
    drop(repo);
    // Restore the point into staging with the restore key, as the plan says.
    let stage = state.join("staging");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let plan_file = state.join("restore-plans/staging.yaml");
    fs::create_dir_all(plan_file.parent().expect("a folder"))?;
    fs::write(
        &plan_file,
        format!(
            "# Written by `labctl demo`: where its restore point goes in staging.\n\
             environment: staging\nrto_objective: 5m\n\
             etcd:\n  data_dir: {s}/etcd\n  name: demo-staging\n  initial_advertise_peer_urls: http://127.0.0.1:{peer}\n  sentinel_key: /registry/namespaces/kube-system\n\
             path:\n  root: {s}/files\n\
             stream:\n  dir: {s}/streams\n",
            s = stage.display(),
            peer = crate::sources::etcd::free_loopback_port()?,
        ),
    )?;
    let plan = plan::load(&plan_file)?;
    let production = plan::Production {
        origin: "the demo's sources".into(),
        sources: sources
            .iter()
            .map(|s| ("demo".to_string(), s.clone()))
            .collect(),
    };
    let repo = Repository::open(backend, Keys::load(&restore_key)?, &cache)?;
    let opts = staging::Options {
        point: Some(run.point.clone()),
        progress: talk,
        ..Default::default()
    };
    let prep = staging::prepare(&repo, &plan, &production, &opts)?;
    say(format!(
        "restore --to staging: point {} with {}",
        prep.point,
        plan_file.display()
    ));
    let report = staging::execute(&repo, &plan, &prep, &opts, &mut |l| say(l))?;
    let restored_tree = plan::under(&stage.join("files"), &sample);
    let differences = if restored_tree.exists() {
        compare_trees(&sample, &restored_tree)?
    } else {
        vec![format!("{} was not restored", restored_tree.display())]
    };
    let verified = report.outcome == "success" && differences.is_empty();
    let per_source: Vec<String> = report
        .steps
        .iter()
        .map(|s| format!("{} {:.2}s", s.kind, s.seconds))
        .collect();
    say(format!(
        "RTO {:.2}s ({}), objective 5m {}",
        report.seconds,
        per_source.join(", "),
        if report.within_objective == Some(true) {
            "met"
        } else {
            "MISSED"
        }
    ));
    say(if verified {
        "verified: every source restored and checked; the tree is byte-identical to the sample (content, modes, mtimes, symlinks)".to_string()
    } else {
        format!(
            "VERIFY FAILED: {}",
            report
                .failures()
                .into_iter()
                .chain(differences.iter().cloned())
                .collect::<Vec<_>>()
                .join("; ")
        )
    });
    Ok(DemoReport {
        repository: repo_dir,
        sample: sample.clone(),
        sample_bytes: run
            .written
            .iter()
            .find(|(_, k, _)| *k == crate::sources::path::KIND)
            .map_or(0, |(_, _, o)| o.summary.bytes_total),
        point: run.point,
        sources: demo_sources,
        skipped,
        plan: plan_file,
        restore: report,
        staging: restored_tree,
        verified,
        differences,
    })
}

/// A database dump's worth of SQL text (about 1 MiB).
fn write_dump(path: &Path) -> crate::error::Result<()> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    writeln!(f, "CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, experiment_id INT, status TEXT, artifact_uri TEXT);")?;
    for i in 0..12_000u32 {
        writeln!(
            f,
            "INSERT INTO runs VALUES ('{i:032x}', {}, 'FINISHED', 's3://mlflow/{}/{i:032x}/artifacts');",
            i % 40,
            i % 40
        )?;
    }
    f.flush()?;
    Ok(())
}

/// A local etcd member for the demo (killed when dropped), when `etcd`
/// and a restore tool are on PATH.
struct LiveEtcd {
    child: std::process::Child,
    url: String,
    keys: usize,
}

impl Drop for LiveEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LiveEtcd {
    fn start(state: &Path) -> Result<LiveEtcd, String> {
        use crate::sources::etcd::{free_loopback_port, on_path};
        let etcd = on_path("etcd").ok_or("etcd is not on PATH (Debian: etcd-server)")?;
        if on_path("etcdutl").is_none() && on_path("etcdctl").is_none() {
            return Err("neither etcdutl nor etcdctl is on PATH (Debian: etcd-client)".into());
        }
        let data = state.join("etcd-live");
        let _ = fs::remove_dir_all(&data);
        let port = |_| free_loopback_port().map_err(|e| e.to_string());
        let (client, peer) = (port(0)?, port(1)?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = fs::File::create(state.join("etcd-live.log")).map_err(|e| e.to_string())?;
        let child = std::process::Command::new(etcd)
            .args(["--name", "demo", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("demo={peer_url}"),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        let mut member = LiveEtcd {
            child,
            url: url.clone(),
            keys: 0,
        };
        let rt = crate::util::runtime().map_err(|e| e.to_string())?;
        let keys: Vec<(String, String)> = ["kube-system", "kubeflow", "nlp-lab", "vision-lab"]
            .iter()
            .map(|ns| {
                (
                    format!("/registry/namespaces/{ns}"),
                    format!("{{\"name\":\"{ns}\"}}"),
                )
            })
            .chain((0..400).map(|i| {
                (
                    format!("/registry/configmaps/nlp-lab/cm-{i}"),
                    "x".repeat(200 + i % 300),
                )
            }))
            .collect();
        member.keys = keys.len();
        rt.block_on(async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut c = loop {
                if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await {
                    if c.status().await.is_ok() {
                        break c;
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err("the local etcd member did not answer within 30s".to_string());
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            for (k, v) in &keys {
                c.put(k.as_str(), v.as_str(), None)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        Ok(member)
    }
}

/// Writes a reproducible sample tree of about `mib` MiB; returns its size.
///
/// # Errors
/// I/O errors.
pub fn generate_sample(dir: &Path, mib: u64) -> crate::error::Result<u64> {
    fs::create_dir_all(dir.join("vm"))?;
    fs::create_dir_all(dir.join("mlflow/artifacts/run-1"))?;
    fs::create_dir_all(dir.join("notebooks/ünïcødé"))?;
    let mut rng = XorShift(0x9e3779b97f4a7c15);
    let mut total = 0u64;
    // A disk image: half zero runs, random blocks and repeated blocks.
    let img_size = (mib / 2).max(1) << 20;
    let mut f = fs::File::create(dir.join("vm/disk.img"))?;
    let block = 64 * 1024;
    let mut repeated = vec![0u8; block];
    rng.fill(&mut repeated);
    let mut buf = vec![0u8; block];
    for i in 0..img_size / block as u64 {
        match i % 4 {
            0 | 1 => buf.fill(0),
            2 => rng.fill(&mut buf),
            _ => buf.copy_from_slice(&repeated),
        }
        f.write_all(&buf)?;
    }
    total += img_size;
    // Text-like files.
    let words = [
        "epoch",
        "loss",
        "accuracy",
        "model",
        "gpu",
        "batch",
        "learning-rate",
        "kubeflow",
        "mlflow",
        "run",
    ];
    let text_total = (mib / 2).max(1) << 20;
    let mut written = 0u64;
    let mut n = 0;
    while written < text_total {
        let mut s = String::new();
        let size = 1000 + (rng.next() % 200_000) as usize;
        while s.len() < size {
            s.push_str(words[(rng.next() % words.len() as u64) as usize]);
            s.push(if rng.next().is_multiple_of(12) {
                '\n'
            } else {
                ' '
            });
        }
        let sub = if n % 3 == 0 {
            "mlflow/artifacts/run-1"
        } else {
            "notebooks/ünïcødé"
        };
        fs::write(dir.join(sub).join(format!("file-{n:04}.txt")), &s)?;
        written += s.len() as u64;
        n += 1;
    }
    total += written;
    fs::write(dir.join("empty"), b"")?;
    std::os::unix::fs::symlink("vm/disk.img", dir.join("current-disk"))?;
    fs::set_permissions(dir.join("notebooks"), fs::Permissions::from_mode(0o750))?;
    Ok(total)
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
