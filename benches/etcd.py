#!/usr/bin/env python3
"""`labctl backup etcd` versus `etcdctl snapshot save` on the same member.

Starts a real etcd (Debian's etcd-server) on free loopback ports in a temp
dir, fills it to --size-mib of values through etcd's v3 JSON gateway (half
random, half text-like bytes, in 8 KiB values), then per repeat:

  1. `etcdctl snapshot save` to a file (the peer: stream to disk only);
  2. `labctl backup etcd` into a fresh local repository (stream, check the
     sha256 trailer, chunk, compress, encrypt, store);
  3. rewrites 1% of the keys (a "barely changed" next night) and runs
     `labctl backup etcd` again, reporting what it added to the repository
     against the db size.

Reports wall time (median of --repeat) and the ratio labctl/etcdctl.
Targets (issue 15): ratio <= 1.3; second night adds < 10% of the db size.

    python3 benches/etcd.py --size-mib 256 --repeat 3
"""
import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def b64(b):
    return base64.b64encode(b).decode()


def txn(url, puts):
    body = json.dumps(
        {"success": [{"requestPut": {"key": b64(k), "value": b64(v)}} for k, v in puts]}
    ).encode()
    req = urllib.request.Request(url + "/v3/kv/txn", data=body, method="POST")
    with urllib.request.urlopen(req) as r:
        r.read()


def value(i, night):
    rnd = os.urandom(4096)
    text = (f"night {night} key {i} " * 300).encode()[:4096]
    return rnd + text


def start_etcd(tmp):
    """A real etcd on free loopback ports with its data in tmp/etcd and an
    8 GiB quota; returns (process, client URL) once it answers."""
    cport, pport = free_port(), free_port()
    url = f"http://127.0.0.1:{cport}"
    etcd = subprocess.Popen(
        ["etcd", "--data-dir", f"{tmp}/etcd", "--quota-backend-bytes", str(8 << 30),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{pport}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
         "--initial-cluster", f"default=http://127.0.0.1:{pport}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/health").read()
            break
        except Exception:
            time.sleep(0.1)
    return etcd, url


def timed(cmd, env=None):
    t = time.monotonic()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {out.stderr.decode()[-2000:]}")
    return dt, out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--labctl", default=os.path.join(ROOT, "target/release/labctl"))
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    if not os.path.exists(a.labctl):
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="labctl-etcd-bench-")
    etcd, url = start_etcd(tmp)
    try:
        n = a.size_mib * 1024 * 1024 // 8192
        t = time.monotonic()
        for start in range(0, n, 64):
            txn(url, [(f"/registry/bench/k{i:07}".encode(), value(i, 0))
                      for i in range(start, min(n, start + 64))])
        print(f"filled {n} keys ({a.size_mib} MiB of values) in {time.monotonic() - t:.1f}s",
              file=sys.stderr)
        env = dict(os.environ, LABCTL_KEY=f"{tmp}/b.key", ETCDCTL_API="3")
        rows = {"etcdctl": [], "labctl": [], "labctl-2nd": [], "added-2nd": [], "db": []}
        for r in range(a.repeat):
            snap = f"{tmp}/etcdctl-{r}.db"
            dt, _ = timed(["etcdctl", "--endpoints", url, "snapshot", "save", snap], env)
            rows["etcdctl"].append(dt)
            rows["db"].append(os.path.getsize(snap))
            os.remove(snap)
            repo = f"{tmp}/repo-{r}"
            for f in ("b.key", "r.key"):
                if os.path.exists(f"{tmp}/{f}"):
                    os.remove(f"{tmp}/{f}")
            e2 = dict(env, LABCTL_REPO=repo, LABCTL_CACHE_DIR=f"{tmp}/cache-{r}")
            subprocess.run([a.labctl, "repo", "init", "--backup-key", f"{tmp}/b.key",
                            "--restore-key", f"{tmp}/r.key", "--no-escrow"],
                           env=e2, check=True, capture_output=True)
            dt, _ = timed([a.labctl, "-q", "backup", "etcd", "--endpoint", url], e2)
            rows["labctl"].append(dt)
            # The next night: 1% of the keys rewritten.
            step = 100
            for start in range(r, n, step * 64):
                txn(url, [(f"/registry/bench/k{i:07}".encode(), value(i, r + 1))
                          for i in range(start, min(n, start + step * 64), step)])
            dt, out = timed([a.labctl, "--json", "backup", "etcd", "--endpoint", url], e2)
            rows["labctl-2nd"].append(dt)
            rows["added-2nd"].append(json.loads(out)["summary"]["bytes-added"])
            shutil.rmtree(repo)
        med = {k: statistics.median(v) for k, v in rows.items()}
        ratio = med["labctl"] / med["etcdctl"]
        frac = med["added-2nd"] / med["db"]
        print(f"db size {med['db'] / 2**20:.0f} MiB, median of {a.repeat}:")
        print(f"  etcdctl snapshot save     {med['etcdctl']:.2f}s")
        print(f"  labctl backup etcd        {med['labctl']:.2f}s   ({ratio:.2f}x etcdctl; target <= 1.3x)")
        print(f"  labctl 2nd night (1% keys) {med['labctl-2nd']:.2f}s, added {med['added-2nd'] / 2**20:.1f} MiB"
              f" = {100 * frac:.1f}% of the db (target < 10%)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"median": med, "runs": rows, "ratio": ratio, "second-night-fraction": frac}, f, indent=1)
    finally:
        etcd.kill()
        etcd.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
