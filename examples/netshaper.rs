//! A TCP proxy that makes loopback look like a campus network link, for
//! the benchmarks (benches/run.py --workload s3-latency): every
//! connection gets an added round-trip time, and all connections share a
//! bandwidth cap in each direction, as they would share one link.
//!
//!     netshaper --upstream 127.0.0.1:9000 --rtt-ms 20 --mbit 1000
//!
//! prints `listening 127.0.0.1:PORT` on stdout and serves until killed.
//!
//! Model: bytes read from one side at time t are written to the other at
//! t + RTT/2 at the earliest (a delay line per direction), and no sooner
//! than the shared link is free (a serialisation clock per direction:
//! each chunk occupies it for len/rate). A new connection pays one RTT
//! for the TCP handshake before its first byte moves. The delay line
//! holds at most about a bandwidth-delay product (plus 1 MiB), so a
//! sender is held back as by TCP's window instead of filling memory.
//! It counts connections and bytes, and prints them at SIGTERM/SIGINT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

struct Link {
    /// Half the round-trip time.
    one_way: Duration,
    /// Bytes per second; 0 for no cap.
    rate: f64,
    /// When each direction's link is next free: [to upstream, to client].
    free_at: [Mutex<Instant>; 2],
    bytes: [AtomicU64; 2],
    connections: AtomicU64,
}

impl Link {
    /// The time `len` bytes that arrived at `arrived` reach the other side.
    async fn schedule(&self, dir: usize, arrived: Instant, len: usize) -> Instant {
        let earliest = arrived + self.one_way;
        if self.rate <= 0.0 {
            return earliest;
        }
        let busy = Duration::from_secs_f64(len as f64 / self.rate);
        let mut free = self.free_at[dir].lock().await;
        // The chunk goes onto the wire when it arrived and the link is
        // free; it is delivered one propagation delay after it has been
        // serialised.
        let start = (*free).max(arrived);
        *free = start + busy;
        (start + busy + self.one_way).max(earliest)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    dir: usize,
    handshake: Duration,
) {
    let depth = {
        let bdp = link.rate * link.one_way.as_secs_f64() * 2.0;
        ((bdp as usize + (1 << 20)) / (64 << 10)).max(4)
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(depth);
    let l2 = link.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            l2.bytes[dir].fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    });
    let mut first = true;
    loop {
        let mut buf = vec![0u8; 64 << 10];
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.truncate(n);
        let mut arrived = Instant::now();
        if first {
            arrived += handshake;
            first = false;
        }
        let due = link.schedule(dir, arrived, n).await;
        if tx.send((due, buf)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn serve(client: TcpStream, upstream: String, link: Arc<Link>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    link.connections.fetch_add(1, Ordering::Relaxed);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let rtt = link.one_way * 2;
    let up = tokio::spawn(pump(cr, sw, link.clone(), 0, rtt));
    let down = tokio::spawn(pump(sr, cw, link, 1, Duration::ZERO));
    let _ = tokio::join!(up, down);
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") || arg(&args, "--upstream").is_none() {
        eprintln!(
            "usage: netshaper --upstream HOST:PORT [--listen 127.0.0.1:0] [--rtt-ms N] [--mbit N]\n\
             Adds N ms of round-trip time to every connection and caps the\n\
             bandwidth of all connections together at N Mbit/s each way."
        );
        std::process::exit(2);
    }
    let upstream = arg(&args, "--upstream").unwrap_or_default();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "127.0.0.1:0".into());
    let rtt_ms: f64 = arg(&args, "--rtt-ms").map_or(0.0, |v| v.parse().expect("--rtt-ms"));
    let mbit: f64 = arg(&args, "--mbit").map_or(0.0, |v| v.parse().expect("--mbit"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await.expect("bind");
        println!("listening {}", listener.local_addr().expect("addr"));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let link = Arc::new(Link {
            one_way: Duration::from_secs_f64(rtt_ms / 2000.0),
            rate: mbit * 1e6 / 8.0,
            free_at: [Mutex::new(Instant::now()), Mutex::new(Instant::now())],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
        });
        let stats = link.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!(
                "netshaper: {} connections, {} bytes up, {} bytes down",
                stats.connections.load(Ordering::Relaxed),
                stats.bytes[0].load(Ordering::Relaxed),
                stats.bytes[1].load(Ordering::Relaxed)
            );
            std::process::exit(0);
        });
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(client, upstream.clone(), link.clone()));
        }
    });
}
