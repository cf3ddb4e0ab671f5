//! Test programs playing a Proxmox VE node's `vzdump` and `qmrestore` for
//! the VM source's tests and benchmark (Proxmox VE cannot run here). Called
//! as `vzdump` or `qmrestore` (symlinks to this binary on the PATH of the
//! test sshd's user), with the node's state in `$FAKEPVE_DIR` and the node's
//! name in `$FAKEPVE_NODE`:
//!
//! - `$FAKEPVE_DIR/nodes/<node>/qemu-server/<vmid>.conf`: VM configs in
//!   PVE's `key: value` format, shared with the API simulator the way
//!   pmxcfs (`/etc/pve`) is shared on a real cluster;
//! - `$FAKEPVE_DIR/images/<vmid>.night`: which night's disk `vzdump` emits
//!   (default 0); `<vmid>.fail-after`: `vzdump` dies after that many bytes;
//!   `<vmid>.delay-ms`: it sleeps that long per 1 MiB region;
//! - `$FAKEPVE_DIR/storage/<storage>.free`: bytes free on a storage (for a
//!   full storage on restore); `images/restored-<vmid>.raw`: what
//!   `qmrestore` wrote.
//!
//! The "archive" is `FAKEVMA\0`, the config (u32le length + text), the disk
//! size (u64le) and the disk bytes: a deterministic image of 1 MiB regions
//! (zero runs, random, repeated and text regions) with, per night, a few
//! scattered 64 KiB changes (about 1% of the disk). Argument checks follow
//! vzdump's and qmrestore's (`PVE::VZDump`, `qmrestore` in qemu-server):
//! unknown options are refused, `--stdout` is needed to stream, a VMID that
//! exists is refused on restore.
//!
//! Also `fakepve image <size> <night>` writes the disk bytes alone to stdout
//! (the benchmark's peers read the same data).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FAKEVMA\0";
const REGION: u64 = 1 << 20;
const CHANGE: u64 = 64 << 10;

fn die(msg: &str, code: i32) -> ! {
    eprintln!("{msg}");
    std::process::exit(code)
}

fn split(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = split(seed) | 1;
    for c in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
}

/// Region `i` of the base image.
fn region(i: u64, buf: &mut [u8]) {
    match split(i) % 4 {
        0 => buf.fill(0),
        1 => fill_random(buf, i),
        2 => {
            let mut pat = [0u8; 4096];
            fill_random(&mut pat, 42);
            for c in buf.chunks_mut(4096) {
                c.copy_from_slice(&pat[..c.len()]);
            }
        }
        _ => {
            let line = format!("region {i} INFO kubelet: synced pod nlp-lab/notebook-0\n");
            for (k, b) in buf.iter_mut().enumerate() {
                *b = line.as_bytes()[k % line.len()];
            }
        }
    }
}

/// The changed 64 KiB blocks of nights 1..=night: (offset, seed), sorted.
fn changes(size: u64, night: u64) -> Vec<(u64, u64)> {
    let blocks = (size / CHANGE).max(1);
    let per_night = (blocks / 100).max(1);
    let mut v: Vec<(u64, u64)> = (1..=night)
        .flat_map(|n| {
            (0..per_night).map(move |j| {
                let seed = split(n * 1_000_003 + j);
                ((seed % blocks) * CHANGE, seed)
            })
        })
        .collect();
    v.sort();
    v
}

/// Writes the disk of `night` (`size` bytes); stops with `fail_after`;
/// sleeps `delay_ms` per region (a slow disk, for tests that look at the
/// processes while a backup runs).
fn write_image(
    out: &mut impl Write,
    size: u64,
    night: u64,
    fail_after: Option<u64>,
    delay_ms: u64,
) {
    let ch = changes(size, night);
    let mut buf = vec![0u8; REGION as usize];
    let mut written = 0u64;
    let mut c = 0;
    for i in 0..size.div_ceil(REGION) {
        let start = i * REGION;
        let len = REGION.min(size - start) as usize;
        region(i, &mut buf[..len]);
        while c < ch.len() && ch[c].0 < start + len as u64 {
            let (off, seed) = ch[c];
            if off >= start {
                let from = (off - start) as usize;
                let to = (from + CHANGE as usize).min(len);
                fill_random(&mut buf[from..to], seed);
            }
            c += 1;
        }
        if delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
        let mut chunk = &buf[..len];
        if let Some(limit) = fail_after {
            if written + len as u64 > limit {
                chunk = &buf[..(limit - written) as usize];
                let _ = out.write_all(chunk);
                let _ = out.flush();
                die(
                    "ERROR: Backup of VM failed - vma_queue_write: write error - Broken pipe",
                    255,
                );
            }
        }
        if out.write_all(chunk).is_err() {
            die("ERROR: vma_queue_write: write error - Broken pipe", 255);
        }
        written += len as u64;
    }
}

fn dir() -> PathBuf {
    PathBuf::from(std::env::var("FAKEPVE_DIR").unwrap_or_else(|_| die("FAKEPVE_DIR is not set", 2)))
}

fn node() -> String {
    std::env::var("FAKEPVE_NODE").unwrap_or_else(|_| "pve1".into())
}

/// The config file of `vmid` on any node (pmxcfs is cluster-wide).
fn find_conf(vmid: u32) -> Option<(String, PathBuf)> {
    let nodes = std::fs::read_dir(dir().join("nodes")).ok()?;
    for n in nodes.flatten() {
        let p = n.path().join("qemu-server").join(format!("{vmid}.conf"));
        if p.exists() {
            return Some((n.file_name().to_string_lossy().to_string(), p));
        }
    }
    None
}

/// `size=20G` of every disk line, in bytes.
fn disk_size(conf: &str) -> u64 {
    conf.lines()
        .filter(|l| {
            let k = l.split(':').next().unwrap_or("");
            (k.starts_with("scsi") || k.starts_with("virtio") || k.starts_with("sata"))
                && !l.contains("media=cdrom")
                && k != "scsihw"
        })
        .filter_map(|l| l.split("size=").nth(1))
        .map(|s| {
            let s = s.split(',').next().unwrap_or("");
            let (n, unit) = s.split_at(s.len() - 1);
            let n: u64 = n.parse().unwrap_or(0);
            n * match unit {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => 1,
            }
        })
        .sum()
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn vzdump(args: &[String]) {
    // PVE::VZDump's options: a VMID list and --mode/--stdout/--compress.
    let mut vmid = None;
    let (mut stdout, mut it) = (false, args.iter());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--stdout" => stdout = true,
            "--mode" => {
                let m = it.next().map(String::as_str).unwrap_or("");
                if !["snapshot", "suspend", "stop"].contains(&m) {
                    die(&format!("vzdump: value '{m}' does not have a value in the enumeration 'snapshot, suspend, stop'"), 255);
                }
            }
            "--compress" => {
                let c = it.next().map(String::as_str).unwrap_or("");
                if c != "0" {
                    die("vzdump: this test node only streams --compress 0", 255);
                }
            }
            o if o.starts_with('-') => die(&format!("Unknown option: {}", &o[2..]), 255),
            v => {
                vmid = Some(
                    v.parse::<u32>()
                        .unwrap_or_else(|_| die(&format!("vzdump: invalid vmid '{v}'"), 255)),
                )
            }
        }
    }
    let vmid = vmid.unwrap_or_else(|| die("vzdump: please specify a VMID or --all", 255));
    if !stdout {
        die("vzdump: this test node only streams (--stdout)", 255);
    }
    let (_, conf_path) = find_conf(vmid).unwrap_or_else(|| {
        die(&format!("ERROR: Backup of VM {vmid} failed - unable to find configuration file for VM {vmid}"), 255)
    });
    let conf = std::fs::read_to_string(conf_path).unwrap();
    let size = disk_size(&conf);
    let images = dir().join("images");
    let night = read_u64(&images.join(format!("{vmid}.night"))).unwrap_or(0);
    let fail_after = read_u64(&images.join(format!("{vmid}.fail-after")));
    eprintln!("INFO: starting new backup job: vzdump {vmid} --mode snapshot --stdout --compress 0");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let _ = out.write_all(MAGIC);
    let _ = out.write_all(&(conf.len() as u32).to_le_bytes());
    let _ = out.write_all(conf.as_bytes());
    let _ = out.write_all(&size.to_le_bytes());
    let delay = read_u64(&images.join(format!("{vmid}.delay-ms"))).unwrap_or(0);
    write_image(&mut out, size, night, fail_after, delay);
    if out.flush().is_err() {
        die("ERROR: vma_queue_write: write error - Broken pipe", 255);
    }
    eprintln!("INFO: Finished Backup of VM {vmid}");
}

fn qmrestore(args: &[String]) {
    // qmrestore <archive> <vmid> [--storage S] [--unique 0|1] [--force 0|1]
    let (mut pos, mut storage, mut it) = (vec![], None, args.iter());
    while let Some(a) = it.next() {
        match a.as_str() {
            "--storage" => storage = it.next().cloned(),
            "--unique" | "--force" => {
                let v = it.next().map(String::as_str).unwrap_or("");
                if v != "0" && v != "1" {
                    die(
                        &format!("{a}: type check ('boolean') failed - got '{v}'"),
                        255,
                    );
                }
            }
            o if o.starts_with("--") => die(&format!("Unknown option: {}", &o[2..]), 255),
            v => pos.push(v.to_string()),
        }
    }
    if pos.len() != 2 || pos[0] != "-" {
        die(
            "400 not enough arguments\nqmrestore <archive> <vmid> [OPTIONS]",
            255,
        );
    }
    let vmid: u32 = pos[1]
        .parse()
        .unwrap_or_else(|_| die("vmid: type check ('integer') failed", 255));
    if let Some((n, _)) = find_conf(vmid) {
        die(
            &format!("unable to restore VM {vmid} - VM {vmid} already exists on node '{n}'"),
            255,
        );
    }
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    let mut head = [0u8; 12];
    if input.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        die("command 'vma extract' failed: not a VMA archive", 255);
    }
    let mut conf = vec![0u8; u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize];
    let mut size = [0u8; 8];
    if input.read_exact(&mut conf).is_err() || input.read_exact(&mut size).is_err() {
        die("command 'vma extract' failed: got EOF in the header", 255);
    }
    let size = u64::from_le_bytes(size);
    let conf = String::from_utf8_lossy(&conf).to_string();
    let free = storage
        .as_ref()
        .and_then(|s| read_u64(&dir().join("storage").join(format!("{s}.free"))));
    let images = dir().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let tmp = images.join(format!(".restoring-{vmid}"));
    let mut f = std::fs::File::create(&tmp).unwrap();
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = input
            .read(&mut buf[..(left.min(1 << 20)) as usize])
            .unwrap_or(0);
        if n == 0 {
            let _ = std::fs::remove_file(&tmp);
            die(
                &format!(
                    "command 'vma extract' failed: got EOF with {left} bytes of the disk missing"
                ),
                255,
            );
        }
        if let Some(free) = free {
            if size - left + n as u64 > free {
                let _ = std::fs::remove_file(&tmp);
                die(&format!("command 'vma extract' failed: write failed - No space left on device (storage '{}')", storage.as_deref().unwrap_or("")), 255);
            }
        }
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    std::fs::rename(&tmp, images.join(format!("restored-{vmid}.raw"))).unwrap();
    // The config, as qmrestore writes it: disks on the new storage with the
    // new VMID, fresh MAC addresses with --unique.
    let old = conf
        .lines()
        .find_map(|l| l.split("vm-").nth(1).and_then(|r| r.split('-').next()))
        .unwrap_or("")
        .to_string();
    let mut out = String::new();
    for l in conf.lines() {
        let (k, v) = l.split_once(": ").unwrap_or((l, ""));
        let mut v = v.replace(&format!("vm-{old}-"), &format!("vm-{vmid}-"));
        if let (Some(s), true) = (&storage, v.contains(":vm-")) {
            v = format!("{s}:{}", v.split_once(':').unwrap().1);
        }
        if k.starts_with("net") {
            if let Some((model, rest)) = v.split_once('=') {
                let tail = rest
                    .split_once(',')
                    .map(|(_, t)| format!(",{t}"))
                    .unwrap_or_default();
                let r = split(vmid as u64);
                v = format!(
                    "{model}=BC:24:11:{:02X}:{:02X}:{:02X}{tail}",
                    r & 0xff,
                    (r >> 8) & 0xff,
                    (r >> 16) & 0xff
                );
            }
        }
        out.push_str(&format!("{k}: {v}\n"));
    }
    let confdir = dir().join("nodes").join(node()).join("qemu-server");
    std::fs::create_dir_all(&confdir).unwrap();
    std::fs::write(confdir.join(format!("{vmid}.conf")), out).unwrap();
    eprintln!(
        "restore vma archive: vma extract -v -r /var/tmp/vzdumptmp.fifo - /var/tmp/vzdumptmp"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let prog = Path::new(&args[0])
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    match prog.as_str() {
        "vzdump" => vzdump(&args[1..]),
        "qmrestore" => qmrestore(&args[1..]),
        _ if args.get(1).map(String::as_str) == Some("image") && args.len() == 4 => {
            let size: u64 = args[2].parse().expect("size in bytes");
            let night: u64 = args[3].parse().expect("night");
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            write_image(&mut out, size, night, None, 0);
            out.flush().unwrap();
        }
        _ => die(
            "usage: call as vzdump or qmrestore, or: fakepve image <bytes> <night>",
            2,
        ),
    }
}
