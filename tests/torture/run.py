#!/usr/bin/env python3
"""labctl torture run: crashes, races, S3 faults and corruption, on demand.

Not part of CI's default run (it takes minutes). Each scenario prints its
trials, failures and bytes lost; a failure is anything the repository must
never do: a check that fails after a crash, a restore that exits 0 with bytes
that differ from the source, or damage that neither check nor restore
notices. Every server is on 127.0.0.1.

    python3 tests/torture/run.py                     # all scenarios, 10 trials each
    python3 tests/torture/run.py --trials 30 --only kill-backup,kill-prune
    python3 tests/torture/run.py --bin target/release/labctl

S3 scenarios need moto (scripts/test-all.sh installs it in target/test-venv).
"""
import argparse
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Lab:
    """A scratch directory with a source tree, keys, cache and repository."""

    def __init__(self, binary, repo_url=None, extra_env=None):
        self.dir = tempfile.mkdtemp(prefix="labctl-torture-")
        self.bin = binary
        self.src = os.path.join(self.dir, "src")
        self.repo = repo_url or os.path.join(self.dir, "repo")
        self.env = dict(os.environ)
        self.env.update(
            LABCTL_REPO=self.repo,
            LABCTL_CACHE_DIR=os.path.join(self.dir, "cache"),
            LABCTL_KEY=os.path.join(self.dir, "backup.key"),
            LABCTL_RESTORE_KEY=os.path.join(self.dir, "restore.key"),
        )
        self.env.update(extra_env or {})
        make_tree(self.src, seed=1)
        self.run(["repo", "init", "--no-escrow", "--pack-mib", "4",
                  "--backup-key", self.env["LABCTL_KEY"],
                  "--restore-key", self.env["LABCTL_RESTORE_KEY"]], check=True)

    def run(self, args, check=False, env=None, timeout=600):
        e = dict(self.env)
        e.update(env or {})
        p = subprocess.run([self.bin, "-q"] + args, env=e, capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"labctl {args} exited {p.returncode}: {p.stderr.decode()}")
        return p

    def spawn(self, args, env=None):
        e = dict(self.env)
        e.update(env or {})
        return subprocess.Popen([self.bin, "-q"] + args, env=e,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restore_lost(self):
        """Restores latest; returns (exit code, bytes differing from the source)."""
        target = tempfile.mkdtemp(dir=self.dir, prefix="restore-")
        p = self.run(["restore", "latest", "--target", target])
        lost = tree_diff(self.src, target) if p.returncode == 0 else 0
        shutil.rmtree(target, ignore_errors=True)
        return p.returncode, lost

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def make_tree(root, seed, files=60):
    rnd = random.Random(seed)
    for i in range(files):
        d = os.path.join(root, f"d{i % 7}")
        os.makedirs(d, exist_ok=True)
        size = rnd.choice([100, 5_000, 300_000, 2_000_000])
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(rnd.randbytes(size))
    with open(os.path.join(root, "disk.img"), "wb") as f:
        f.write(rnd.randbytes(6 << 20))


def tree_diff(a, b):
    """Bytes of `a` that `b` lacks or holds differently (content only)."""
    lost = 0
    for dirpath, _, names in os.walk(a):
        for n in names:
            pa = os.path.join(dirpath, n)
            pb = os.path.join(b, os.path.relpath(pa, a))
            da = open(pa, "rb").read()
            try:
                db = open(pb, "rb").read()
            except OSError:
                lost += len(da)
                continue
            if da != db:
                lost += max(len(da), len(db))
    return lost


class Result:
    def __init__(self, name):
        self.name, self.trials, self.failures, self.lost, self.notes = name, 0, 0, 0, []

    def fail(self, why, lost=0):
        self.failures += 1
        self.lost += lost
        self.notes.append(why)

    def line(self):
        return f"{self.name:<22} trials {self.trials:>4}  failures {self.failures:>3}  bytes lost {self.lost}"


def verify(lab, res, what):
    """After a fault: check passes and latest restores byte-identical."""
    c = lab.run(["check"])
    if c.returncode != 0:
        res.fail(f"{what}: check exited {c.returncode}: {c.stderr.decode()[-300:]}")
        return
    code, lost = lab.restore_lost()
    if code != 0 or lost:
        res.fail(f"{what}: restore exited {code}, {lost} bytes differ", lost)


def kill_backup(binary, trials):
    res = Result("kill-backup")
    lab = Lab(binary)
    lab.run(["backup", "path", lab.src], check=True)
    for t in range(trials):
        res.trials += 1
        make_tree(os.path.join(lab.src, "new"), seed=100 + t, files=8)
        p = lab.spawn(["backup", "path", lab.src, "--threads", "1"])
        time.sleep(random.uniform(0.02, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        lab.run(["backup", "path", lab.src])  # the next run adopts what was left
        verify(lab, res, f"trial {t}")
    lab.close()
    return res


def kill_prune(binary, trials):
    res = Result("kill-prune")
    lab = Lab(binary)
    for t in range(trials):
        res.trials += 1
        make_tree(os.path.join(lab.src, "churn"), seed=200 + t, files=6)
        lab.run(["backup", "path", lab.src], check=True)
        lab.run(["forget", "--keep-last", "1"], check=True)
        p = lab.spawn(["prune", "--grace", "0s", "--repack-threshold", "5%"])
        time.sleep(random.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        verify(lab, res, f"trial {t}")
    lab.close()
    return res


def backup_vs_prune(binary, trials):
    res = Result("backup-races-prune")
    lab = Lab(binary)
    lab.run(["backup", "path", lab.src], check=True)
    for t in range(trials):
        res.trials += 1
        make_tree(os.path.join(lab.src, "race"), seed=300 + t, files=6)
        b = lab.spawn(["backup", "path", lab.src])
        p = lab.spawn(["prune", "--grace", "0s"])
        b.wait()
        p.wait()
        if b.returncode != 0:
            res.fail(f"trial {t}: backup exited {b.returncode}")
        lab.run(["forget", "--keep-last", "2"])
        verify(lab, res, f"trial {t}")
    lab.close()
    return res


def concurrent_backups(binary, trials):
    res = Result("concurrent-backups")
    lab = Lab(binary)
    for t in range(trials):
        res.trials += 1
        make_tree(os.path.join(lab.src, "pair"), seed=400 + t, files=6)
        a = lab.spawn(["backup", "path", lab.src])
        b = lab.spawn(["backup", "path", lab.src])
        a.wait()
        b.wait()
        if a.returncode or b.returncode:
            res.fail(f"trial {t}: backups exited {a.returncode}/{b.returncode}")
        verify(lab, res, f"trial {t}")
    lab.close()
    return res


class Proxy:
    """TCP proxy to the S3 server that can play dead (refuse) or stall."""

    def __init__(self, upstream):
        self.upstream, self.mode = upstream, "pass"
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            if self.mode == "dead":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                c.close()
                continue
            threading.Thread(target=self.pipe, args=(c,), daemon=True).start()

    def pipe(self, c):
        try:
            u = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            c.close()
            return

        def pump(src, dst):
            try:
                while True:
                    while self.mode == "stall":
                        time.sleep(0.05)
                    if self.mode == "dead":
                        break
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(u, c), daemon=True).start()
        pump(c, u)


def start_moto():
    server = os.path.join(ROOT, "target/test-venv/bin/moto_server")
    if not os.path.exists(server):
        return None, None
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.1)
    import urllib.request
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/torture", method="PUT"))
    return p, port


def s3_faults(binary, trials):
    res = Result("s3-death-and-stall")
    moto, port = start_moto()
    if moto is None:
        res.notes.append("skipped: moto not installed (run scripts/test-all.sh)")
        return res
    proxy = Proxy(port)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
           "LABCTL_S3_TIMEOUT_SECS": "2"}
    lab = Lab(binary, repo_url="s3://torture/repo", extra_env=env)
    try:
        for t in range(trials):
            res.trials += 1
            make_tree(os.path.join(lab.src, "s3"), seed=500 + t, files=6)
            b = lab.spawn(["backup", "path", lab.src])
            time.sleep(random.uniform(0.1, 1.0))
            proxy.mode = random.choice(["dead", "stall"])
            time.sleep(random.uniform(0.5, 4.0))
            proxy.mode = "pass"
            b.wait()
            if b.returncode not in (0, 7):
                res.fail(f"trial {t}: backup exited {b.returncode} (expected 0, or 7 for storage)")
            lab.run(["backup", "path", lab.src])
            verify(lab, res, f"trial {t}")
    finally:
        lab.close()
        moto.kill()
    return res


def corruption(binary, trials):
    """Each kind of damage must be noticed by check or by restore; a restore
    that exits 0 must give the source's bytes."""
    res = Result("corruption")
    kinds = ["flip-pack", "truncate-pack", "delete-pack", "flip-index", "delete-index",
             "flip-snapshot", "flip-config", "zero-config-chunker", "flip-trailer"]
    for t in range(trials):
        kind = kinds[t % len(kinds)]
        lab = Lab(binary)
        lab.run(["backup", "path", lab.src], check=True)
        res.trials += 1
        objs = {}
        for sub in ("packs", "index", "snapshots"):
            objs[sub] = [os.path.join(dp, n) for dp, _, ns in os.walk(os.path.join(lab.repo, sub)) for n in ns]
        rnd = random.Random(t)

        def flip(path, where=None):
            b = bytearray(open(path, "rb").read())
            i = where if where is not None else rnd.randrange(8, len(b))
            b[i] ^= 0x40
            open(path, "wb").write(b)

        if kind == "flip-pack":
            flip(rnd.choice(objs["packs"]))
        elif kind == "flip-trailer":
            p = rnd.choice(objs["packs"])
            flip(p, os.path.getsize(p) - 30)
        elif kind == "truncate-pack":
            p = rnd.choice(objs["packs"])
            os.truncate(p, os.path.getsize(p) // 2)
        elif kind == "delete-pack":
            os.remove(rnd.choice(objs["packs"]))
        elif kind == "flip-index":
            flip(rnd.choice(objs["index"]))
        elif kind == "delete-index":
            os.remove(rnd.choice(objs["index"]))
        elif kind == "flip-snapshot":
            flip(rnd.choice(objs["snapshots"]))
        elif kind == "flip-config":
            flip(os.path.join(lab.repo, "config"), 20)
        elif kind == "zero-config-chunker":
            p = os.path.join(lab.repo, "config")
            open(p, "w").write(open(p).read().replace('"fixed-size": 262144', '"fixed-size": 0'))
        shutil.rmtree(lab.env["LABCTL_CACHE_DIR"], ignore_errors=True)
        check = lab.run(["check", "--read-data"])
        code, lost = lab.restore_lost()
        if code == 0 and lost:
            res.fail(f"{kind}: restore exited 0 with {lost} wrong bytes", lost)
        elif check.returncode == 0 and code == 0 and kind not in ("delete-index",):
            res.fail(f"{kind}: neither check nor restore noticed the damage")
        elif kind == "delete-index" and code != 0:
            res.fail(f"{kind}: restore failed although every pack is there (exit {code})")
        lab.close()
    return res


SCENARIOS = {
    "kill-backup": kill_backup,
    "kill-prune": kill_prune,
    "backup-races-prune": backup_vs_prune,
    "concurrent-backups": concurrent_backups,
    "s3-death-and-stall": s3_faults,
    "corruption": corruption,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/debug/labctl"))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not found: build it first (cargo build)")
    # A copy of its own: a rebuild during the run must not pull it away.
    keep = tempfile.mkdtemp(prefix="labctl-torture-bin-")
    a.bin = shutil.copy2(a.bin, os.path.join(keep, "labctl"))
    names = [n for n in a.only.split(",") if n] or list(SCENARIOS)
    results = []
    for n in names:
        started = time.time()
        r = SCENARIOS[n](a.bin, a.trials)
        results.append(r)
        print(r.line() + f"  ({time.time() - started:.0f}s)", flush=True)
        for note in r.notes[:10]:
            print(f"    {note}")
    trials = sum(r.trials for r in results)
    failures = sum(r.failures for r in results)
    lost = sum(r.lost for r in results)
    print(f"TOTAL trials {trials} failures {failures} bytes lost {lost}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
