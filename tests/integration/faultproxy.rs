//! A fault-injecting HTTP/1.1 proxy for the S3 tests (a test double of a
//! flaky network and an overloaded store, in front of the real moto server).
//! Every `every`-th request gets the next fault of the schedule:
//! 503 SlowDown (not forwarded), a connection reset (not forwarded), a
//! truncated response body, or a stalled response.

use crate::common::*;
use crate::s3::{moto_port, S3Env};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    SlowDown,
    Reset,
    Truncate,
    Stall,
}

pub struct FaultProxy {
    pub port: u16,
    pub injected: Arc<Mutex<Vec<Fault>>>,
    /// Every request's method and target (`GET /bucket/key?…`), in order.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// Every forwarded response: its request's method and target, and the
    /// body bytes sent back.
    pub served: Arc<Mutex<Vec<(String, u64)>>>,
}

struct Message {
    raw: Vec<u8>,
    head_len: usize,
    has_length: bool,
}

/// Reads one HTTP message (request or response) with its body.
fn read_message(r: &mut BufReader<TcpStream>, no_body: bool) -> std::io::Result<Option<Message>> {
    let mut raw = vec![];
    let mut content_length = None;
    let mut chunked = false;
    let mut first = true;
    let mut status_no_body = false;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if first && line.starts_with("HTTP/1.1 ") {
            status_no_body = line[9..].starts_with("204") || line[9..].starts_with("304");
        }
        first = false;
        raw.extend_from_slice(line.as_bytes());
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            content_length = v.trim().parse::<usize>().ok();
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
        if line == "\r\n" {
            break;
        }
    }
    let head_len = raw.len();
    if no_body || status_no_body {
        return Ok(Some(Message {
            raw,
            head_len,
            has_length: true,
        }));
    }
    if chunked {
        loop {
            let mut size_line = String::new();
            r.read_line(&mut size_line)?;
            raw.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if size == 0 {
                // trailers until an empty line
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    raw.extend_from_slice(t.as_bytes());
                    if t == "\r\n" || t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            raw.extend_from_slice(&chunk);
        }
        return Ok(Some(Message {
            raw,
            head_len,
            has_length: true,
        }));
    }
    match content_length {
        Some(n) => {
            let mut body = vec![0u8; n];
            r.read_exact(&mut body)?;
            raw.extend_from_slice(&body);
            Ok(Some(Message {
                raw,
                head_len,
                has_length: true,
            }))
        }
        None => {
            // Requests without a length have no body; responses run to close.
            if raw.starts_with(b"HTTP/") {
                r.read_to_end(&mut raw)?;
                Ok(Some(Message {
                    raw,
                    head_len,
                    has_length: false,
                }))
            } else {
                Ok(Some(Message {
                    raw,
                    head_len,
                    has_length: true,
                }))
            }
        }
    }
}

impl FaultProxy {
    pub fn start(upstream: u16, every: u64, schedule: Vec<Fault>, stall: Duration) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counter = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(Mutex::new(vec![]));
        let requests = Arc::new(Mutex::new(vec![]));
        let served = Arc::new(Mutex::new(vec![]));
        let (inj, log, out_log) = (injected.clone(), requests.clone(), served.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let seen = Seen {
                    counter: counter.clone(),
                    injected: inj.clone(),
                    requests: log.clone(),
                    served: out_log.clone(),
                };
                let schedule = schedule.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, every, &schedule, stall, &seen);
                });
            }
        });
        FaultProxy {
            port,
            injected,
            requests,
            served,
        }
    }
}

/// What the proxy's connections share: the request count, the faults
/// injected and every request line.
struct Seen {
    counter: Arc<AtomicU64>,
    injected: Arc<Mutex<Vec<Fault>>>,
    requests: Arc<Mutex<Vec<String>>>,
    served: Arc<Mutex<Vec<(String, u64)>>>,
}

fn serve(
    client: TcpStream,
    upstream: u16,
    every: u64,
    schedule: &[Fault],
    stall: Duration,
    seen: &Seen,
) -> std::io::Result<()> {
    let (counter, inj, log) = (&seen.counter, &seen.injected, &seen.requests);
    let mut reader = BufReader::new(client.try_clone()?);
    let mut out = client;
    loop {
        let Some(req) = read_message(&mut reader, false)? else {
            return Ok(());
        };
        let is_head = req.raw.starts_with(b"HEAD ");
        let line = String::from_utf8_lossy(&req.raw[..req.head_len.min(req.raw.len())]);
        let target: Vec<&str> = line
            .lines()
            .next()
            .unwrap_or("")
            .split(' ')
            .take(2)
            .collect();
        let target = target.join(" ");
        log.lock().unwrap().push(target.clone());
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let fault = n
            .is_multiple_of(every)
            .then(|| schedule[((n / every - 1) as usize) % schedule.len()]);
        if let Some(f) = fault {
            inj.lock().unwrap().push(f);
        }
        match fault {
            Some(Fault::SlowDown) => {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                write!(out, "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
                continue;
            }
            Some(Fault::Reset) => {
                let sock = socket2_linger_zero(out);
                drop(sock);
                return Ok(());
            }
            _ => {}
        }
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.write_all(&req.raw)?;
        let mut up_reader = BufReader::new(up);
        let Some(resp) = read_message(&mut up_reader, is_head)? else {
            return Ok(());
        };
        match fault {
            Some(Fault::Truncate) if resp.raw.len() > resp.head_len + 1 => {
                let cut = resp.head_len + (resp.raw.len() - resp.head_len) / 2;
                out.write_all(&resp.raw[..cut])?;
                return Ok(()); // close mid-body
            }
            Some(Fault::Stall) => {
                out.write_all(&resp.raw[..resp.head_len])?;
                std::thread::sleep(stall);
                return Ok(());
            }
            _ => {
                out.write_all(&resp.raw)?;
                seen.served
                    .lock()
                    .unwrap()
                    .push((target, (resp.raw.len() - resp.head_len) as u64));
            }
        }
        if !resp.has_length {
            return Ok(());
        }
    }
}

/// Closes with RST instead of FIN.
fn socket2_linger_zero(s: TcpStream) -> TcpStream {
    use std::os::unix::io::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    s
}

/// Runs `args` until it succeeds (at most `tries` times); returns the attempts used.
fn until_ok(s: &S3Env, key_var: &str, key: &std::path::Path, args: &[&str], tries: usize) -> usize {
    for attempt in 1..=tries {
        let out = s
            .cmd()
            .env("LABCTL_S3_TIMEOUT_SECS", "1")
            .env(key_var, key)
            .args(args)
            .output()
            .unwrap();
        if out.status.success() {
            return attempt;
        }
        // A failure must be clean: a documented code and a message naming what failed.
        let code = out.status.code().unwrap_or(-1);
        assert!(
            [1, 4, 7].contains(&code),
            "unexpected exit {code}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).is_empty());
    }
    panic!("{args:?} did not succeed in {tries} attempts");
}

#[test]
fn backups_and_restores_survive_slowdowns_resets_truncation_and_stalls() {
    let moto = moto_port();
    let proxy = FaultProxy::start(
        moto,
        6,
        vec![Fault::SlowDown, Fault::Reset, Fault::Truncate, Fault::Stall],
        Duration::from_secs(4),
    );
    let s = S3Env::with_endpoint_port(false, Some(proxy.port));
    // Init straight to moto, then everything else through the faulty proxy.
    let init = s
        .cmd()
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{moto}"))
        .args([
            "repo",
            "init",
            "--no-escrow",
            "--pack-mib",
            "1",
            "--backup-key",
            s.env.backup_key.to_str().unwrap(),
            "--restore-key",
            s.env.restore_key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&init, &["init"]);
    let src = s.env.path("src");
    for i in 0..10u64 {
        write(&src.join(format!("f{i}")), &noise(700_000, 50 + i));
    }
    until_ok(
        &s,
        "LABCTL_KEY",
        &s.env.backup_key,
        &["-q", "backup", "path", src.to_str().unwrap()],
        6,
    );
    let target = s.env.path("restored");
    until_ok(
        &s,
        "LABCTL_RESTORE_KEY",
        &s.env.restore_key,
        &[
            "-q",
            "restore",
            "latest",
            "--overwrite",
            "--target",
            target.to_str().unwrap(),
        ],
        6,
    );
    until_ok(
        &s,
        "LABCTL_RESTORE_KEY",
        &s.env.restore_key,
        &["-q", "check", "--read-data"],
        6,
    );
    let kinds = proxy.injected.lock().unwrap().clone();
    for f in [Fault::SlowDown, Fault::Reset, Fault::Truncate, Fault::Stall] {
        assert!(
            kinds.contains(&f),
            "the proxy never injected {f:?}: {kinds:?}"
        );
    }
    // Afterwards, straight to the server: the repository is clean and the restore identical.
    let out = s
        .cmd()
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{moto}"))
        .env("LABCTL_RESTORE_KEY", &s.env.restore_key)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert_success(&out, &["check", "--read-data"]);
    assert!(
        !stderr(&out).contains("not in any index"),
        "{}",
        stderr(&out)
    );
    assert_same_tree(&src, &target);
}

/// A proxy that injects nothing and only records, with a fresh repository
/// (init straight through it) behind it.
fn recording_proxy() -> (FaultProxy, S3Env) {
    let proxy = FaultProxy::start(moto_port(), u64::MAX, vec![Fault::SlowDown], Duration::ZERO);
    let s = S3Env::with_endpoint_port(false, Some(proxy.port));
    assert_success(&s.init(&["--no-escrow"]), &["init"]);
    (proxy, s)
}

/// `backup path src` through the proxy.
fn backup_via(s: &S3Env, src: &std::path::Path, what: &str) {
    let out = s
        .cmd()
        .env("LABCTL_KEY", &s.env.backup_key)
        .args(["-q", "backup", "path", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out, &[what]);
}

#[test]
fn a_backup_sends_no_head_before_content_addressed_writes_and_lists_packs_only_when_due() {
    let (proxy, s) = recording_proxy();
    let src = s.env.path("src");
    for i in 0..4u64 {
        write(&src.join(format!("f{i}")), &noise(900_000, 70 + i));
    }
    let backup = |what: &str| {
        let before = proxy.requests.lock().unwrap().len();
        backup_via(&s, &src, what);
        proxy.requests.lock().unwrap()[before..].to_vec()
    };
    let lists_packs = |reqs: &[String]| {
        reqs.iter().any(|r| {
            r.contains("prefix=") && r.contains("%2Fpacks%2F")
                || r.contains("prefix=") && r.contains("/packs/")
        })
    };
    // A fresh catalog lists packs/ once (orphans of killed runs).
    let first = backup("first backup");
    assert!(lists_packs(&first), "{first:#?}");
    // Packs, index fragments and snapshots are named by their hash:
    // If-None-Match alone keeps them written once; no HEAD before them.
    let heads: Vec<_> = first.iter().filter(|r| r.starts_with("HEAD ")).collect();
    assert!(heads.is_empty(), "{heads:#?}");
    assert!(first
        .iter()
        .any(|r| r.starts_with("PUT ") && r.contains("/packs/")));
    // The next run with the same catalog: no listing of packs/.
    write(&src.join("f0"), &noise(900_000, 99));
    let second = backup("second backup");
    assert!(!lists_packs(&second), "{second:#?}");
    assert!(
        second.iter().all(|r| !r.starts_with("HEAD ")),
        "{second:#?}"
    );
    // A run this catalog saw cut short: the next one lists packs/ again.
    let db = list_files(&s.env.cache)
        .into_iter()
        .find(|p| p.file_name().unwrap() == "catalog.db")
        .unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "UPDATE meta SET value = '1' WHERE key = 'backup-run-unfinished'",
            [],
        )
        .unwrap();
    write(&src.join("f1"), &noise(900_000, 98));
    let third = backup("third backup");
    assert!(lists_packs(&third), "{third:#?}");
}

#[test]
fn a_pack_order_restore_reads_about_the_bytes_it_needs() {
    let (proxy, s) = recording_proxy();
    // A disk image of 24 fixed 256 KiB chunks of noise (stored raw).
    let src = s.env.path("src");
    let img = src.join("disk.img");
    let mut bytes = noise(24 << 18, 7);
    write(&img, &bytes);
    backup_via(&s, &src, "first");
    // Every other chunk rewritten: the second snapshot needs half of the
    // first pack, in pieces with a chunk-sized hole between each.
    for i in (1..24).step_by(2) {
        let fresh = noise(1 << 18, 100 + i as u64);
        bytes[i << 18..(i + 1) << 18].copy_from_slice(&fresh);
    }
    write(&img, &bytes);
    backup_via(&s, &src, "second");
    let before = proxy.served.lock().unwrap().len();
    let target = s.env.path("restored");
    let out = s
        .cmd()
        .env("LABCTL_RESTORE_KEY", &s.env.restore_key)
        .args([
            "-q",
            "restore",
            "latest",
            "--target",
            target.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, &["restore"]);
    assert_eq!(std::fs::read(target.join("disk.img")).unwrap(), bytes);
    let from_packs: u64 = proxy.served.lock().unwrap()[before..]
        .iter()
        .filter(|(r, _)| r.starts_with("GET ") && r.contains("/packs/"))
        .map(|(_, n)| n)
        .sum();
    // 6 MiB of chunks (each stored with ~200 bytes of age framing) and the
    // snapshot's tree pack; the unneeded half of the first pack is not read.
    let need = (24u64 << 18) + 64 * 1024;
    assert!(
        from_packs <= need + need / 10,
        "read {from_packs} bytes of packs for {need}"
    );
}
