//! The etcd source against a real etcd (Debian's etcd-server/etcd-client,
//! installed by scripts/test-all.sh), started here on free loopback ports
//! with TLS and client-certificate auth as kubeadm runs it (certificates
//! made with openssl, in kubeadm's file names under `pki/etcd/`).

use crate::common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A certificate the CA `ca` signs, valid two days: `name.crt`, `name.key`.
fn issue(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    issue_cert(dir, ca, name, "crt", cn, ext, "2")
}

/// kubeadm's etcd PKI (`ca`, `server`, `healthcheck-client`) plus a second
/// CA and a client certificate it signed (`other-ca`, `stranger`).
fn make_pki(dir: &Path) -> PathBuf {
    let d = dir.join("pki/etcd");
    fs::create_dir_all(&d).unwrap();
    new_ca(&d, "ca", "crt", "etcd-ca");
    issue(
        &d,
        "ca",
        "server",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    issue(
        &d,
        "ca",
        "healthcheck-client",
        "kube-etcd-healthcheck-client",
        "extendedKeyUsage=clientAuth\n",
    );
    issue_cert(
        &d,
        "ca",
        "expired-client",
        "crt",
        "kube-etcd-healthcheck-client",
        "extendedKeyUsage=clientAuth\n",
        "-1",
    );
    new_ca(&d, "other-ca", "crt", "someone else's CA");
    issue(
        &d,
        "other-ca",
        "stranger",
        "kube-etcd-healthcheck-client",
        "extendedKeyUsage=clientAuth\n",
    );
    d
}

/// A real etcd member on free loopback ports, killed when dropped.
pub struct Etcd {
    child: Child,
    pub client_port: u16,
    pub tls: bool,
}

impl Etcd {
    /// Starts etcd on `data` (a new dir, or one restored with the given
    /// peer port), with TLS and client-certificate auth when `pki` is given.
    pub fn start(data: &Path, name: &str, peer_port: u16, pki: Option<&Path>) -> Etcd {
        Etcd::start_with(data, name, peer_port, pki, &[])
    }

    /// As [`Etcd::start`], with more etcd flags.
    pub fn start_with(
        data: &Path,
        name: &str,
        peer_port: u16,
        pki: Option<&Path>,
        extra: &[&str],
    ) -> Etcd {
        let client_port = free_port();
        let scheme = if pki.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = fs::File::create(data.with_extension("log")).unwrap();
        let mut c = Command::new("etcd");
        c.args(["--name", name, "--data-dir"])
            .arg(data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(p) = pki {
            c.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(p.join("ca.crt"))
                .arg("--cert-file")
                .arg(p.join("server.crt"))
                .arg("--key-file")
                .arg(p.join("server.key"));
        }
        let child = c
            .spawn()
            .expect("etcd (Debian: etcd-server) must be installed");
        let e = Etcd {
            child,
            client_port,
            tls: pki.is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", client_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                fs::read_to_string(data.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    pub fn url(&self) -> String {
        format!(
            "{}://127.0.0.1:{}",
            if self.tls { "https" } else { "http" },
            self.client_port
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's own etcd client (the same crate labctl uses).
pub fn client(rt: &tokio::runtime::Runtime, url: &str, pki: Option<&Path>) -> etcd_client::Client {
    let mut o = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    if let Some(p) = pki {
        o = o.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(
                    fs::read(p.join("ca.crt")).unwrap(),
                ))
                .identity(etcd_client::Identity::from_pem(
                    fs::read(p.join("healthcheck-client.crt")).unwrap(),
                    fs::read(p.join("healthcheck-client.key")).unwrap(),
                )),
        );
    }
    // The member may need a moment after its port opens.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rt.block_on(async {
            let mut c = etcd_client::Client::connect([url], Some(o.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        });
        match r {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("etcd at {url}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

pub fn put_all(
    rt: &tokio::runtime::Runtime,
    c: &mut etcd_client::Client,
    kv: &BTreeMap<String, Vec<u8>>,
) {
    let items: Vec<_> = kv.iter().collect();
    for batch in items.chunks(100) {
        let ops: Vec<_> = batch
            .iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.to_vec(), None))
            .collect();
        rt.block_on(c.txn(etcd_client::Txn::new().and_then(ops)))
            .unwrap();
    }
}

fn read_all(
    rt: &tokio::runtime::Runtime,
    c: &mut etcd_client::Client,
) -> BTreeMap<String, Vec<u8>> {
    let r = rt
        .block_on(c.get(
            vec![0u8],
            Some(etcd_client::GetOptions::new().with_all_keys()),
        ))
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
        .collect()
}

fn tls_args(pki: &Path) -> Vec<String> {
    vec![
        "--cacert".into(),
        pki.join("ca.crt").display().to_string(),
        "--cert".into(),
        pki.join("healthcheck-client.crt").display().to_string(),
        "--client-key".into(),
        pki.join("healthcheck-client.key").display().to_string(),
    ]
}

fn run(env: &Env, args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    env.run(&a)
}

fn snapshot_count(env: &Env) -> usize {
    let out = env.ok(&["--json", "snapshots"]);
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap()
        .len()
}

/// kubeadm's PKI in `env`, a member with TLS and client-certificate auth,
/// a runtime and a client of the member.
fn tls_member(env: &Env) -> (PathBuf, Etcd, tokio::runtime::Runtime, etcd_client::Client) {
    let pki = make_pki(env.dir.path());
    let etcd = Etcd::start(&env.path("etcd-data"), "cp1", free_port(), Some(&pki));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client(&rt, &etcd.url(), Some(&pki));
    (pki, etcd, rt, c)
}

#[test]
fn etcd_with_tls_backs_up_10000_keys_restores_with_etcdctl_and_verifies_on_a_live_member() {
    let env = Env::new();
    let (pki, etcd, rt, mut c) = tls_member(&env);
    let mut at_backup: BTreeMap<String, Vec<u8>> = (0..10_000)
        .map(|i| {
            (
                format!("/registry/configmaps/ns{}/cm{i:05}", i % 37),
                noise(64 + i % 200, i as u64),
            )
        })
        .collect();
    at_backup.insert("/labctl/sentinel".into(), b"here".to_vec());
    put_all(&rt, &mut c, &at_backup);

    // What etcdctl itself saves of this (now quiet) member.
    let reference = env.path("etcdctl-save.db");
    let saved = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(etcd.url())
        .arg("--cacert")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("healthcheck-client.crt"))
        .arg("--key")
        .arg(pki.join("healthcheck-client.key"))
        .args(["snapshot", "save"])
        .arg(&reference)
        .output()
        .unwrap();
    assert!(saved.status.success(), "{}", stderr(&saved));

    // Back up through the TLS endpoint, as the daemon would.
    let mut args: Vec<String> = ["--json", "backup", "etcd", "--endpoint"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(etcd.url());
    args.extend(tls_args(&pki));
    let out = run(&env, &args);
    assert_success(&out, &["backup", "etcd"]);
    let backup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = backup["snapshot-id"].as_str().unwrap().to_string();
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    let snap = &snaps[0];
    assert_eq!(snap["source"]["kind"], "etcd");
    let facts = &snap["facts"];
    assert_eq!(facts["etcd.keys"], 10_001, "{facts}");
    assert_eq!(facts["etcd.version"], "3.4.23", "{facts}");
    let revision = facts["etcd.revision"].as_i64().unwrap();
    assert!(revision > 100, "{facts}");
    assert!(facts["etcd.member-id"].as_str().unwrap().len() >= 8);
    assert!(facts["etcd.cluster-id"].as_str().is_some());

    // Change the live data after the backup.
    let keys: Vec<String> = at_backup.keys().cloned().collect();
    rt.block_on(async {
        for k in keys.iter().step_by(97) {
            c.delete(k.as_str(), None).await.unwrap();
        }
        for k in keys.iter().skip(5).step_by(89) {
            c.put(k.as_str(), "changed", None).await.unwrap();
        }
        c.put("/registry/new", "after the backup", None)
            .await
            .unwrap();
    });

    // --stdout gives the file etcdctl writes: the db and its sha256 trailer,
    // which etcdctl accepts.
    let db = env.path("snap.db");
    let out = env.ok_restore(&["restore", &id, "--stdout"]);
    fs::write(&db, &out.stdout).unwrap();
    assert!(
        out.stdout == fs::read(&reference).unwrap(),
        "restore --stdout must give the bytes `etcdctl snapshot save` wrote"
    );
    assert_eq!(
        out.stdout.len() as i64,
        facts["etcd.db-size"].as_i64().unwrap() + 32
    );
    let st = Command::new("etcdctl")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&db)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", stderr(&st));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["revision"].as_i64().unwrap(), revision);

    // Restore into a new data dir with etcdctl (3.4 here), verify on a live
    // member, then serve it and compare every key and value.
    let peer = free_port();
    let data = env.path("restored/member-data");
    fs::create_dir_all(data.parent().unwrap()).unwrap();
    let out = env.ok_restore(&[
        "--json",
        "restore",
        &id[..12],
        "--etcd-data-dir",
        data.to_str().unwrap(),
        "--name",
        "r1",
        "--initial-cluster",
        &format!("r1=http://127.0.0.1:{peer}"),
        "--initial-advertise-peer-urls",
        &format!("http://127.0.0.1:{peer}"),
        "--verify",
        "--sentinel-key",
        "/labctl/sentinel",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verify"]["keys"], 10_001, "{r}");
    assert_eq!(r["verify"]["revision"], revision, "{r}");
    assert_eq!(r["restore"]["revision-bumped"], false, "{r}");
    assert!(r["restore"]["tool"].as_str().unwrap().ends_with("etcdctl"));
    // Scratch directories are gone.
    let leftovers: Vec<_> = fs::read_dir(env.path("restored"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(leftovers, vec!["member-data".to_string()]);

    let served = Etcd::start(&data, "r1", peer, None);
    let mut c2 = client(&rt, &served.url(), None);
    let got = read_all(&rt, &mut c2);
    assert_eq!(got.len(), at_backup.len());
    assert!(got == at_backup, "restored keys differ from the backup's");
    drop(served);

    // With etcdutl (3.5+) on PATH, it is preferred, and the restore bumps
    // the revision and marks it compacted. The etcdutl here is a test
    // double of its CLI (etcd's etcdutl/etcdutl/snapshot_command.go: the
    // `version` output and the restore flags); it records its arguments
    // and restores with the real etcdctl 3.4 (which lacks those two flags).
    let bin = env.path("fake-bin");
    fs::create_dir_all(&bin).unwrap();
    fs::write(
        bin.join("etcdutl"),
        "#!/bin/sh\nd=$(dirname \"$0\")\n\
         if [ \"$1\" = version ]; then echo 'etcdutl version: 3.5.17'; echo 'API version: 3.5'; exit 0; fi\n\
         echo \"$*\" > \"$d/args\"\nskip=0\nfor a do\n  shift\n\
           if [ $skip = 1 ]; then skip=0; continue; fi\n\
           case \"$a\" in --bump-revision) skip=1; continue;; --mark-compacted) continue;; esac\n\
           set -- \"$@\" \"$a\"\ndone\nETCDCTL_API=3 exec etcdctl \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(bin.join("etcdutl"), fs::Permissions::from_mode(0o755)).unwrap();
    let data35 = env.path("restored/with-etcdutl");
    let out = env
        .cmd()
        .env("LABCTL_RESTORE_KEY", &env.restore_key)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .args(["--json", "restore", &id, "--etcd-data-dir"])
        .arg(&data35)
        .output()
        .unwrap();
    assert_success(&out, &["restore", "--etcd-data-dir"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["restore"]["revision-bumped"], true, "{r}");
    assert_eq!(r["restore"]["tool-version"], "3.5.17", "{r}");
    let args = fs::read_to_string(bin.join("args")).unwrap();
    assert!(
        args.starts_with("snapshot restore ")
            && args.contains("--bump-revision 1000000000 --mark-compacted"),
        "{args}"
    );
    assert!(data35.join("member").is_dir());

    // A data dir that is not empty is refused and left as it was.
    let busy = env.path("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("keep"), "mine").unwrap();
    let out = env.run_restore(&["restore", &id, "--etcd-data-dir", busy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);

    // A sentinel key that is not there fails verification (exit 4).
    let out = env.run_restore(&["restore", &id, "--verify", "--sentinel-key", "/nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("sentinel key \"/nope\" is missing"),
        "{}",
        stderr(&out)
    );

    // No restore tool: a clear usage error.
    let out = env
        .cmd()
        .env("LABCTL_RESTORE_KEY", &env.restore_key)
        .env("PATH", "/nonexistent")
        .args(["restore", &id, "--etcd-data-dir"])
        .arg(env.path("nowhere"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("neither etcdutl nor etcdctl"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("nowhere").exists());

    // A path snapshot is not an etcd one.
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "a").unwrap();
    let b = env.backup(&src);
    let out = env.run_restore(&[
        "restore",
        b["snapshot-id"].as_str().unwrap(),
        "--etcd-data-dir",
        env.path("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not an etcd one"), "{}", stderr(&out));
}

/// What the proxy does to the server-to-client bytes of each connection.
#[derive(Clone, Copy)]
enum Fault {
    /// Forward this many bytes, then cut both directions (a member dying
    /// mid-stream).
    CutAfter(u64),
    /// Flip one bit of the byte at this offset (a corruption no layer
    /// below gRPC notices on a plaintext connection).
    FlipAt(u64),
    /// Forward about 1.6 MB/s, so the test can act mid-stream.
    Slow,
}

/// A TCP proxy in front of `upstream` that applies `fault`.
fn faulty_proxy(upstream: u16, fault: Fault) -> u16 {
    faulty_proxy_counted(upstream, fault).0
}

/// As [`faulty_proxy`], also returning the bytes forwarded to clients so far.
fn faulty_proxy_counted(upstream: u16, fault: Fault) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let total = Arc::new(AtomicU64::new(0));
    let total2 = total.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(down) = conn else { return };
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let sent = Arc::new(AtomicU64::new(0));
            let (mut d1, mut u1) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d1, &mut u1);
            });
            let (mut d2, mut u2) = (down, up);
            let total = total2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    let n = match u2.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let before = sent.fetch_add(n as u64, Ordering::SeqCst);
                    match fault {
                        Fault::CutAfter(limit) if before + n as u64 > limit => {
                            let keep = (limit.saturating_sub(before)) as usize;
                            let _ = d2.write_all(&buf[..keep]);
                            break;
                        }
                        Fault::FlipAt(at) if (before..before + n as u64).contains(&at) => {
                            buf[(at - before) as usize] ^= 0x10;
                        }
                        Fault::Slow => std::thread::sleep(Duration::from_millis(10)),
                        _ => {}
                    }
                    total.fetch_add(n as u64, Ordering::SeqCst);
                    if d2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = d2.shutdown(std::net::Shutdown::Both);
                let _ = u2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, total)
}

#[test]
fn etcd_refusals_and_a_cut_stream_commit_nothing() {
    let env = Env::new();
    let (pki, etcd, rt, mut c) = tls_member(&env);
    // ~8 MiB of values, so a cut after 1 MiB lands mid-stream.
    let kv: BTreeMap<String, Vec<u8>> = (0..2000)
        .map(|i| (format!("/registry/secrets/k{i}"), noise(4096, i)))
        .collect();
    put_all(&rt, &mut c, &kv);
    let url = etcd.url();
    let backup = |endpoint: &str, extra: &[String]| {
        let mut a: Vec<String> = ["backup", "etcd", "--endpoint", endpoint]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend_from_slice(extra);
        run(&env, &a)
    };
    let swap = |flag: &str, file: PathBuf| {
        let mut a = tls_args(&pki);
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = file.display().to_string();
        a
    };
    let expect = |out: &std::process::Output, code: i32, needle: &str| {
        let e = stderr(out);
        assert_eq!(out.status.code(), Some(code), "{e}");
        assert!(e.contains(needle), "wanted {needle:?} in: {e}");
    };

    // A client certificate from another CA: the member refuses the handshake.
    let stranger = [
        "--cacert".to_string(),
        pki.join("ca.crt").display().to_string(),
        "--cert".into(),
        pki.join("stranger.crt").display().to_string(),
        "--client-key".into(),
        pki.join("stranger.key").display().to_string(),
    ];
    let out = backup(&url, &stranger);
    expect(&out, 1, &format!("etcd at {url}"));
    expect(
        &out,
        1,
        "are --cacert, --cert and --client-key the member's",
    );
    // An expired client certificate from the right CA.
    let mut expired = tls_args(&pki);
    expired[3] = pki.join("expired-client.crt").display().to_string();
    expired[5] = pki.join("expired-client.key").display().to_string();
    let out = backup(&url, &expired);
    expect(&out, 1, &format!("etcd at {url}"));
    expect(&out, 1, "client certificate valid?");
    // A CA that did not sign the member's certificate.
    let out = backup(&url, &swap("--cacert", pki.join("other-ca.crt")));
    expect(&out, 1, &format!("etcd at {url}"));
    // Nothing listening.
    let closed = format!("https://127.0.0.1:{}", free_port());
    let out = backup(&closed, &tls_args(&pki));
    expect(&out, 1, &format!("etcd at {closed}"));
    // A client key others can read (exit 5), a missing CA file (exit 2).
    let open_key = pki.join("open.key");
    fs::copy(pki.join("healthcheck-client.key"), &open_key).unwrap();
    fs::set_permissions(&open_key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = backup(&url, &swap("--client-key", open_key));
    expect(&out, 5, "readable by other users");
    let out = backup(&url, &swap("--cacert", pki.join("missing.crt")));
    expect(&out, 2, "missing.crt");
    // A bad endpoint is a usage error.
    let out = backup("etcd.example:2379", &tls_args(&pki));
    expect(&out, 2, "not a client URL");

    // The stream cut after 1 MiB: nothing committed.
    let cut = faulty_proxy(etcd.client_port, Fault::CutAfter(1 << 20));
    let cut_url = format!("https://127.0.0.1:{cut}");
    let out = backup(&cut_url, &tls_args(&pki));
    expect(&out, 1, &format!("etcd at {cut_url}"));
    assert!(
        stderr(&out).contains("nothing was committed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot_count(&env), 0);

    // The repository is consistent, and the next backup works.
    env.ok(&["check"]);
    let out = backup(&url, &tls_args(&pki));
    assert_success(&out, &["backup", "etcd"]);
    assert_eq!(snapshot_count(&env), 1);
    env.ok(&["check"]);

    // The same source as a daemon job: `config validate --host` checks the
    // key file, and `jobs run` writes a snapshot.
    let cfg = env.path("labctl.toml");
    let write_cfg = |key: &Path| {
        fs::write(
            &cfg,
            format!(
                "[repository]\nurl = \"{}\"\nbackup_key = \"{}\"\ncache_dir = \"{}\"\n\n[daemon]\nmetrics_listen = \"\"\n\n\
                 [[job]]\nname = \"etcd\"\nschedule = \"0 2 * * *\"\n\
                 backup = {{ source = \"etcd\", endpoint = \"{url}\", cacert = \"{}\", cert = \"{}\", client_key = \"{}\" }}\n",
                env.repo.display(),
                env.backup_key.display(),
                env.cache.display(),
                pki.join("ca.crt").display(),
                pki.join("healthcheck-client.crt").display(),
                key.display(),
            ),
        )
        .unwrap();
    };
    write_cfg(&pki.join("open.key"));
    let out = env.run(&[
        "config",
        "validate",
        "--host",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    expect(&out, 5, "job etcd");
    write_cfg(&pki.join("healthcheck-client.key"));
    env.ok(&[
        "config",
        "validate",
        "--host",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    env.ok(&["jobs", "run", "etcd", "--config", cfg.to_str().unwrap()]);
    assert_eq!(snapshot_count(&env), 2);

    // One flipped bit in the snapshot stream (plaintext, so neither TLS nor
    // gRPC notices): the sha256 trailer does not match, exit 4, nothing
    // committed. The offset is 2 MiB into the stream, inside a 32 KiB
    // blob; should it land on HTTP/2 or gRPC framing instead (about 1 in
    // 1000), the stream breaks (exit 1) and a second offset is tried.
    let plain = Etcd::start(&env.path("plain-data"), "plain", free_port(), None);
    let mut pc = client(&rt, &plain.url(), None);
    put_all(&rt, &mut pc, &kv);
    let before = snapshot_count(&env);
    let mut flipped = None;
    for at in [2 << 20, (3 << 20) + 12_345] {
        let port = faulty_proxy(plain.client_port, Fault::FlipAt(at));
        let out = env.run(&[
            "backup",
            "etcd",
            "--endpoint",
            &format!("http://127.0.0.1:{port}"),
        ]);
        if out.status.code() == Some(4) {
            flipped = Some(out);
            break;
        }
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    }
    let out = flipped.expect("a flipped bit inside a blob must fail the checksum");
    let e = stderr(&out);
    assert!(
        e.contains("sha256 does not match") && e.contains("nothing was committed"),
        "{e}"
    );
    assert_eq!(snapshot_count(&env), before);
    env.ok(&["check"]);

    // The member killed while its snapshot streams (slowed by a proxy so
    // the kill lands mid-stream): exit 1 naming the endpoint, nothing
    // committed, the repository consistent.
    let (port, forwarded) = faulty_proxy_counted(plain.client_port, Fault::Slow);
    let slow = format!("http://127.0.0.1:{port}");
    let child = env
        .cmd()
        .env("LABCTL_KEY", &env.backup_key)
        .args(["backup", "etcd", "--endpoint", &slow])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while forwarded.load(Ordering::SeqCst) < 1 << 20 {
        assert!(Instant::now() < deadline, "the stream never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(plain); // SIGKILL
    let out = child.wait_with_output().unwrap();
    expect(&out, 1, &format!("etcd at {slow}"));
    assert!(
        stderr(&out).contains("nothing was committed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(snapshot_count(&env), before);
    env.ok(&["check"]);

    // A member in a NOSPACE alarm is backed up (that is when a backup is
    // wanted), and the alarm is in the facts.
    drop(etcd);
    let full = Etcd::start_with(
        &env.path("full-data"),
        "full",
        free_port(),
        None,
        &["--quota-backend-bytes", "1048576"],
    );
    let mut c = client(&rt, &full.url(), None);
    let filled = rt.block_on(async {
        // etcd checks the quota against the backend's size, which grows
        // when a batch commits (every 100 ms): give commits time to land.
        for i in 0..300u64 {
            if c.put(format!("k{i}"), noise(100_000, i), None)
                .await
                .is_err()
            {
                return true;
            }
            if i % 8 == 7 {
                tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            }
        }
        false
    });
    assert!(filled, "the quota should have been reached");
    let out = env.run(&["--json", "backup", "etcd", "--endpoint", &full.url()]);
    assert_success(&out, &["backup", "etcd"]);
    let snaps: Vec<serde_json::Value> =
        serde_json::from_slice(&env.ok(&["--json", "snapshots"]).stdout).unwrap();
    let alarms = snaps.last().unwrap()["facts"]["etcd.alarms"].to_string();
    assert!(alarms.contains("NOSPACE"), "{alarms}");
}
