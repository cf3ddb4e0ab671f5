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
        let inj = injected.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (counter, inj, schedule) = (counter.clone(), inj.clone(), schedule.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, upstream, every, &schedule, stall, &counter, &inj);
                });
            }
        });
        FaultProxy { port, injected }
    }
}

fn serve(
    client: TcpStream,
    upstream: u16,
    every: u64,
    schedule: &[Fault],
    stall: Duration,
    counter: &AtomicU64,
    inj: &Mutex<Vec<Fault>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut out = client;
    loop {
        let Some(req) = read_message(&mut reader, false)? else {
            return Ok(());
        };
        let is_head = req.raw.starts_with(b"HEAD ");
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
            _ => out.write_all(&resp.raw)?,
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
