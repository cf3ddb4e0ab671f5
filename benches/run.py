#!/usr/bin/env python3
"""labctl vs restic, rustic, borg 1.2 and borg 1.4 on the same data, in one run.

Workloads (--workload):
  mixed       (default) the 1 GiB mixed dataset below: first backup, second
              backup after mutation, restore; local disk or --s3.
  s3-latency  the mixed dataset into S3 (moto) behind examples/netshaper.rs
              at 20 ms RTT / 1 Gbit/s and 50 ms / 200 Mbit/s (--links):
              first and second backup and restore, with each step's S3
              request count (labctl, restic, rustic).
  small-files a notebook PVC: --files files of 1-16 KiB in directories of
              1,000 (examples/benchdata.rs small; 1,000,000 = ~8 GiB):
              first backup, unchanged second backup, a backup after 1% of
              the files were rewritten, restore, and ls of the snapshot.
  big-repo    a repository of --blobs blobs (default 1M, 3M and 10M; 1 MiB
              chunks in sparse 32 MiB packs, 10 sources x 12 snapshots,
              made by benches/bigrepo.rs): catalog rebuild, snapshots, a
              first and an unchanged backup of a small tree, check,
              forget --dry-run and prune --dry-run, each with peak RSS,
              and how each grows with the blob count (t ~ N^b); restic
              and rustic on the same shape in restic's format
              (benches/resticrepo.rs; no borg: its format is not made).
  vm-stream   benches/vm.py's VM image stream (--size-gib).
Generated data is kept under --work/data between runs (delete it to
regenerate); repositories are made fresh each run. The peers come from
benches/setup.sh (Debian's restic and borg 1.2; borg 1.4 from PyPI and
rustic from crates.io under target/peers).

Generates a reproducible mixed dataset (examples/benchdata.rs: a VM-image-like
file with zero runs, random, text and repeated blocks, large files and a tree
of small files), then for each tool: first backup, second backup after
scattered 64 KiB writes to ~2% of the image plus an insertion near the start
of a large file, and a restore of the second snapshot. Reports wall time,
throughput, repository size, growth and peak RSS (from wait4 rusage of each
tool process). Every timed step starts with its input in the page cache (see
warm()) and with no dirty pages left by the previous step. Needs restic and
borg (Debian packages restic, borgbackup).

    python3 benches/run.py --size-mib 1024 [--tools labctl,restic,borg] [--repeat 3] [--json out.json]
    python3 benches/run.py --workload s3-latency --size-mib 1024 [--repeat 3]
    python3 benches/run.py --workload small-files --files 1000000 --per-tool [--repeat 3]
    python3 benches/run.py --workload big-repo --blobs 1000000,3000000,10000000
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "target/peers")


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except FileNotFoundError:
                pass
    return total


def warm(path):
    """Reads every file under path, so it is in the page cache. Each timed
    step starts with its input warm: borg drops the files it reads from the
    cache (posix_fadvise DONTNEED in its chunker), which would otherwise make
    whichever tool runs after it read the dataset from disk; and labctl writes
    packs with O_DIRECT, so its repository would be cold for its restore."""
    for d, _, files in os.walk(path):
        for f in files:
            try:
                with open(os.path.join(d, f), "rb", buffering=0) as fh:
                    while fh.read(1 << 20):
                        pass
            except (FileNotFoundError, PermissionError):
                pass


def run(cmd, env=None, cwd=None, stdin=None):
    """Runs cmd; returns (seconds, peak RSS in MiB). Dirty pages left by the
    previous step are flushed first, so no tool pays for another's writeback."""
    os.sync()
    start = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=stdin)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - start
    err = p.stderr.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{err}")
    print(f"  {os.path.basename(cmd[0])} {cmd[1] if len(cmd) > 1 else ''}: {secs:.2f} s wall, "
          f"{usage.ru_utime:.2f} s user, {usage.ru_stime:.2f} s sys", file=sys.stderr)
    return secs, usage.ru_maxrss / 1024.0


S3 = None  # (endpoint, bucket) when --s3 is given: the endpoint the tools use
S3_DIRECT = None  # moto itself, for the measuring helpers (not shaped)
MOTO_LOG = None  # moto's access log: one line per request


def s3_requests():
    """Requests moto has answered so far (lines of its access log)."""
    if not MOTO_LOG:
        return 0
    with open(MOTO_LOG, "rb") as f:
        return sum(1 for line in f if b'" ' in line and b"HTTP/1" in line)


def s3_env():
    endpoint, _ = S3
    return dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_REGION="us-east-1",
                AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")


def start_moto(work):
    """Starts moto's S3 server (from target/test-venv) and makes a bucket."""
    import socket
    import urllib.request
    venv = os.path.join(ROOT, "target/test-venv/bin")
    if not os.path.exists(os.path.join(venv, "moto_server")):
        sys.exit("moto is not installed: run scripts/test-all.sh once (it creates target/test-venv)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    global MOTO_LOG
    MOTO_LOG = os.path.join(work, "moto.log")
    proc = subprocess.Popen([os.path.join(venv, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(MOTO_LOG, "wb"))
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    return proc, endpoint


def make_bucket(endpoint, name):
    import urllib.request
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT"), timeout=10).read()


def s3_objects(prefix):
    """(key, size) of the objects under s3 prefix (bucket/prefix), via ListObjectsV2."""
    import urllib.request
    import xml.etree.ElementTree as ET
    endpoint, bucket = S3_DIRECT or S3
    out, token = [], None
    while True:
        url = f"{endpoint}/{bucket}?list-type=2&prefix={prefix}/"
        if token:
            url += "&continuation-token=" + urllib.request.quote(token)
        root = ET.fromstring(urllib.request.urlopen(url, timeout=30).read())
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        for c in root.iter(ns + "Contents"):
            out.append((c.find(ns + "Key").text, int(c.find(ns + "Size").text)))
        t = root.find(ns + "NextContinuationToken")
        if t is None:
            return out
        token = t.text


def du_s3(prefix):
    return sum(size for _, size in s3_objects(prefix))


WARM_S3 = """
import sys, boto3
endpoint, bucket, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint)
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
    for o in page.get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"]
        while body.read(1 << 20):
            pass
"""


def warm_s3(prefix):
    """Reads every object under prefix once (signed GETs through boto3 from
    moto's venv), the S3 counterpart of warm(): the first reader of freshly
    written objects paid more than the second (in 5 rounds, whichever tool
    restored first was the slower one), so each tool's restore starts with
    its objects read once."""
    endpoint, bucket = S3_DIRECT or S3
    py = os.path.join(ROOT, "target/test-venv/bin/python")
    subprocess.run([py, "-c", WARM_S3, endpoint, bucket, prefix], env=dict(os.environ, **s3_env()), check=True)


class Labctl:
    name = "labctl"

    def __init__(self, work, binary):
        self.bin = binary
        self.repo = os.path.join(work, "repo-labctl")
        self.prefix = f"{os.path.basename(work)}-labctl"
        self.keys = os.path.join(work, "keys-labctl")
        os.makedirs(self.keys, exist_ok=True)
        repo_url = f"s3://{S3[1]}/{self.prefix}" if S3 else self.repo
        self.env = dict(os.environ, **(s3_env() if S3 else {}), LABCTL_REPO=repo_url, LABCTL_CACHE_DIR=os.path.join(work, "cache-labctl"),
                        LABCTL_KEY=os.path.join(self.keys, "b.key"), LABCTL_RESTORE_KEY=os.path.join(self.keys, "r.key"))

    def init(self):
        extra = os.environ.get("LABCTL_BENCH_INIT_ARGS", "").split()
        run([self.bin, "-q", "repo", "init", "--no-escrow", "--backup-key", self.env["LABCTL_KEY"],
             "--restore-key", self.env["LABCTL_RESTORE_KEY"], *extra], env=self.env)

    def backup(self, data):
        return run([self.bin, "-q", "backup", "path", data], env=self.env)

    def restore(self, target):
        env = dict(self.env)
        del env["LABCTL_KEY"]
        extra = os.environ.get("LABCTL_BENCH_RESTORE_ARGS", "").split()
        return run([self.bin, "-q", "restore", "latest", "--target", target, *extra], env=env)

    def ls(self):
        return run([self.bin, "-q", "ls", "latest"], env=self.env)


class Restic:
    name = "restic"

    def __init__(self, work, _):
        self.repo = os.path.join(work, "repo-restic")
        self.prefix = f"{os.path.basename(work)}-restic"
        repo_url = f"s3:{S3[0]}/{S3[1]}/{self.prefix}" if S3 else self.repo
        self.env = dict(os.environ, **(s3_env() if S3 else {}), RESTIC_REPOSITORY=repo_url, RESTIC_PASSWORD="bench-password",
                        RESTIC_CACHE_DIR=os.path.join(work, "cache-restic"))

    def init(self):
        run(["restic", "init", "-q"], env=self.env)

    def backup(self, data):
        return run(["restic", "backup", "-q", data], env=self.env)

    def restore(self, target):
        return run(["restic", "restore", "-q", "latest", "--target", target], env=self.env)

    def ls(self):
        return run(["restic", "ls", "-q", "latest"], env=self.env)


class Rustic:
    """rustic (crates.io rustic-rs, from benches/setup.sh): S3 through its
    opendal backend, options from OPENDAL_* variables."""
    name = "rustic"

    def __init__(self, work, _):
        self.bin = os.path.join(PEERS, "bin/rustic")
        if not os.path.exists(self.bin):
            sys.exit("rustic is not installed: run benches/setup.sh")
        self.repo = os.path.join(work, "repo-rustic")
        self.prefix = f"{os.path.basename(work)}-rustic"
        env = dict(os.environ, RUSTIC_PASSWORD="bench-password", RUSTIC_NO_PROGRESS="true",
                   RUSTIC_CACHE_DIR=os.path.join(work, "cache-rustic"))
        if S3:
            # OPENDAL_* variables become opendal options in snake case
            # (rustic's commands.rs); RUSTIC_REPO_OPT_* would be kebab case.
            env.update(RUSTIC_REPOSITORY="opendal:s3", OPENDAL_BUCKET=S3[1],
                       OPENDAL_ROOT="/" + self.prefix, OPENDAL_ENDPOINT=S3[0],
                       OPENDAL_REGION="us-east-1", OPENDAL_ACCESS_KEY_ID="bench",
                       OPENDAL_SECRET_ACCESS_KEY="bench-secret")
        else:
            env.update(RUSTIC_REPOSITORY=self.repo)
        self.env = env

    def init(self):
        run([self.bin, "init"], env=self.env)

    def backup(self, data):
        return run([self.bin, "backup", data], env=self.env)

    def restore(self, target):
        return run([self.bin, "restore", "latest", target], env=self.env)

    def ls(self):
        return run([self.bin, "ls", "latest"], env=self.env)


def borg_env(repo, base):
    """The environment every borg command of the benchmarks runs with: the
    repository, its passphrase, and base as borg's cache and config home."""
    return dict(os.environ, BORG_REPO=repo, BORG_PASSPHRASE="bench-password", BORG_BASE_DIR=base,
                BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")


class Borg:
    name = "borg"
    bin = "borg"

    def __init__(self, work, _):
        self.repo = os.path.join(work, f"repo-{self.name}")
        self.env = borg_env(self.repo, os.path.join(work, f"base-{self.name}"))
        self.n = 0

    def init(self):
        run([self.bin, "init", "--encryption=repokey-blake2"], env=self.env)

    def backup(self, data):
        self.n += 1
        return run([self.bin, "create", "--compression", "zstd,3", f"::s{self.n}", data], env=self.env)

    def restore(self, target):
        os.makedirs(target, exist_ok=True)
        return run([self.bin, "extract", f"::s{self.n}"], env=self.env, cwd=target)

    def ls(self):
        return run([self.bin, "list", f"::s{self.n}"], env=self.env)


class Borg14(Borg):
    """borg 1.4 from PyPI (benches/setup.sh)."""
    name = "borg14"
    bin = os.path.join(PEERS, "borg14-venv/bin/borg")


TOOLS = {"labctl": Labctl, "restic": Restic, "rustic": Rustic, "borg": Borg, "borg14": Borg14}


def fmt(rows, size):
    mib = size / 2**20
    reqs = "first_req" in rows[0]
    head = ["tool", "1st backup s", "MB/s", "RSS MiB", "repo MiB", "2nd backup s", "RSS MiB", "growth MiB",
            "restore s", "MB/s", "RSS MiB"]
    if reqs:
        head += ["1st req", "2nd req", "restore req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["tool"], f"{r['first_s']:.2f}", f"{size / r['first_s'] / 1e6:.0f}", f"{r['first_rss']:.0f}",
            f"{r['repo_after_first'] / 2**20:.1f}", f"{r['second_s']:.2f}", f"{r['second_rss']:.0f}",
            f"{r['growth'] / 2**20:.1f}", f"{r['restore_s']:.2f}", f"{size / r['restore_s'] / 1e6:.0f}",
            f"{r['restore_rss']:.0f}"]
        if reqs:
            cells += [f"{r['first_req']:.0f}", f"{r['second_req']:.0f}", f"{r['restore_req']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return f"dataset: {mib:.0f} MiB\n" + "\n".join(lines)


def fresh_dir(path):
    """Empties path for a run without deleting anything yet. ext4 without a
    journal (this VM's root) skips inodes freed lately when it allocates new
    ones, scanning past each of them for every file created: a minute after
    the deletion, and six minutes while the inode table block is dirty --
    which the creating process itself keeps it. A restore of 100,000 files
    measured 8.7 s three minutes after the last run's trees were deleted and
    2.4 s in quiet conditions. So the old directory is only renamed aside
    here; empty_trash() deletes it when the run is over, and settle() makes
    the next run wait until such a deletion is six minutes old."""
    if os.path.exists(path):
        trash = os.path.join(os.path.dirname(os.path.abspath(path)), ".trash")
        os.makedirs(trash, exist_ok=True)
        os.rename(path, os.path.join(trash, f"{time.time_ns()}-{os.path.basename(path)}"))
        TRASHES.add(trash)
    os.makedirs(path)


TRASHES = set()
SETTLE_S = 365


def empty_trash(work):
    """Deletes what fresh_dir() set aside (at the end of a run) and notes when."""
    deleted = False
    for trash in TRASHES:
        if os.path.exists(trash):
            shutil.rmtree(trash, ignore_errors=True)
            deleted = True
    if deleted:
        os.sync()
        with open(os.path.join(work, ".deleted-at"), "w") as f:
            f.write(str(time.time()))


def settle(work):
    """Waits until the last run's deletions are SETTLE_S old (see fresh_dir)."""
    try:
        with open(os.path.join(work, ".deleted-at")) as f:
            left = SETTLE_S - (time.time() - float(f.read()))
    except (OSError, ValueError):
        return
    if left > 0:
        print(f"waiting {left:.0f} s for the last run's deletions to age (see fresh_dir)", file=sys.stderr)
        time.sleep(left)


def medians(rounds, names):
    rows = []
    for name in names:
        per = [r[1][name] for r in rounds]
        row = {"tool": name}
        for key in per[0]:
            if key != "tool":
                row[key] = statistics.median(p[key] for p in per)
        row["rounds"] = per
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="mixed",
                    choices=["mixed", "s3-latency", "small-files", "big-repo", "vm-stream"])
    ap.add_argument("--blobs", default="1000000,3000000,10000000",
                    help="big-repo: comma-separated repository sizes in blobs")
    ap.add_argument("--size-mib", type=int, default=1024, help="mixed and s3-latency dataset size")
    ap.add_argument("--files", type=int, default=1_000_000, help="small-files: how many files")
    ap.add_argument("--size-gib", type=float, default=20, help="vm-stream: image size")
    ap.add_argument("--links", default="20:1000,50:200",
                    help="s3-latency: RTT_MS:MBIT settings, comma-separated")
    ap.add_argument("--tools", help="comma-separated (default per workload: mixed labctl,restic,rustic,borg,"
                                    "borg14; s3-latency labctl,restic,rustic; small-files and big-repo all five)")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--json", help="also write results here")
    ap.add_argument("--per-tool", action="store_true",
                    help="small-files: each tool makes all its steps and its repository is deleted before the "
                         "next tool starts, and each restore goes to a new ext4 filesystem on a loop device "
                         "(needs root): a million files do not fit five repositories and restores on one disk")
    ap.add_argument("--s3", action="store_true",
                    help="mixed: repositories on a local moto S3 server instead of local disk "
                         "(tools: labctl,restic,rustic)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (fresh repositories each time, the tool order rotated); the table shows "
                         "medians (small-files: with --per-tool)")
    ap.add_argument("--sizes", type=int, metavar="N",
                    help="mixed, instead of timing: repository size and growth of N fresh repositories per "
                         "tool on the same data (chunker parameters are random per repository), as mean "
                         "and spread")
    args = ap.parse_args()
    if args.workload == "small-files" and args.repeat > 1 and not args.per_tool:
        # Without --per-tool every tool's restored tree stays on the work
        # disk: a second round would neither fit nor start from the same disk.
        ap.error("small-files --repeat needs --per-tool")
    if args.workload == "vm-stream":
        cmd = [sys.executable, os.path.join(ROOT, "benches/vm.py"), "--size-gib", str(args.size_gib)]
        if args.json:
            cmd += ["--json", args.json]
        sys.exit(subprocess.run(cmd).returncode)
    if not args.tools:
        args.tools = {"s3-latency": "labctl,restic,rustic"}.get(
            args.workload, "labctl,restic,rustic,borg,borg14")
        if args.s3:
            args.tools = "labctl,restic,rustic"
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "labctl", "--example", "benchdata",
                    "--example", "netshaper", "--example", "bigrepo", "--example", "resticrepo"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/labctl")
    gen = os.path.join(ROOT, "target/release/examples/benchdata")
    runs = os.path.join(args.work, "runs")
    os.makedirs(os.path.join(args.work, "data"), exist_ok=True)
    # Leftovers of a run that was stopped before it could empty its trash.
    TRASHES.add(os.path.join(args.work, ".trash"))
    empty_trash(args.work)
    TRASHES.clear()
    if not (args.per_tool and os.geteuid() == 0):  # restores go to fresh filesystems then
        settle(args.work)
    fresh_dir(runs)
    try:
        run_workload(args, binary, gen, runs)
    finally:
        empty_trash(args.work)


def run_workload(args, binary, gen, runs):
    if args.workload == "big-repo":
        big_repo(args, binary, runs)
    elif args.workload == "small-files":
        small_files(args, binary, gen, runs)
    elif args.workload == "s3-latency":
        s3_latency(args, binary, gen, runs)
    elif args.sizes:
        moto = moto_bucket(runs) if args.s3 else None
        try:
            sizes_mode(args, binary, gen, runs)
        finally:
            if moto:
                moto.kill()
    else:
        mixed(args, binary, gen, runs)


def moto_bucket(runs):
    """Starts moto with a bucket "bench" as the tools' S3; returns its process."""
    global S3
    moto, endpoint = start_moto(runs)
    S3 = (endpoint, "bench")
    make_bucket(endpoint, "bench")
    return moto


def mixed(args, binary, gen, runs):
    moto = moto_bucket(runs) if args.s3 else None
    # Nothing is deleted until all rounds are done: on ext4, creating files
    # right after deleting thousands makes the inode allocator skip the
    # recently freed ones, which would penalise whichever tool runs next.
    # The tool order also rotates each round.
    try:
        rounds = [one_round(args, binary, gen, runs, i) for i in range(args.repeat)]
    finally:
        if moto:
            moto.kill()
    rows = medians(rounds, args.tools.split(","))
    print(fmt(rows, rounds[0][0]) + (f"\n(medians of {args.repeat} rounds)" if args.repeat > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "mixed", "size": rounds[0][0], "results": rows}, f, indent=2)


def start_shaper(upstream, rtt_ms, mbit):
    """examples/netshaper.rs in front of upstream (http://127.0.0.1:PORT)."""
    port = upstream.rsplit(":", 1)[1]
    p = subprocess.Popen([os.path.join(ROOT, "target/release/examples/netshaper"), "--upstream",
                          f"127.0.0.1:{port}", "--rtt-ms", str(rtt_ms), "--mbit", str(mbit)],
                         stdout=subprocess.PIPE, stderr=sys.stderr)
    line = p.stdout.readline().decode().strip()
    if not line.startswith("listening "):
        sys.exit(f"netshaper did not start: {line}")
    return p, "http://" + line.split()[1]


def s3_latency(args, binary, gen, runs):
    """The mixed dataset into S3 across a shaped link, per --links setting."""
    global S3, S3_DIRECT
    moto, endpoint = start_moto(runs)
    out = []
    try:
        for k, link in enumerate(args.links.split(",")):
            rtt, mbit = (float(x) for x in link.split(":"))
            bucket = f"bench{k}"
            make_bucket(endpoint, bucket)
            shaper, shaped = start_shaper(endpoint, rtt, mbit)
            S3, S3_DIRECT = (shaped, bucket), (endpoint, bucket)
            try:
                rounds = [one_round(args, binary, gen, os.path.join(runs, f"link{k}"), i)
                          for i in range(args.repeat)]
            finally:
                shaper.terminate()
                shaper.wait()
            rows = medians(rounds, args.tools.split(","))
            print(f"\nS3 at {rtt:g} ms RTT, {mbit:g} Mbit/s (examples/netshaper.rs in front of moto)")
            print(fmt(rows, rounds[0][0]) + (f"\n(medians of {args.repeat} rounds)" if args.repeat > 1 else ""))
            sys.stdout.flush()
            out.append({"rtt_ms": rtt, "mbit": mbit, "size": rounds[0][0], "results": rows})
    finally:
        moto.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "s3-latency", "links": out}, f, indent=2)


def fresh_fs(path, gib):
    """Mounts a newly made ext4 filesystem (a sparse image on a loop
    device) at path and returns a function that unmounts and deletes it.
    --per-tool restores a million files per tool: deleting one tool's tree
    before the next restores would make the next pay for the freed inodes
    (see fresh_dir), and waiting out each deletion costs six minutes. Like
    this VM's root filesystem, it has no journal; the loop device does
    direct I/O on its image (without it, the kernel's loop and writeback
    threads took most of a core during a restore, copying every page
    twice). Inode tables are written by mkfs (no lazy init running in the
    background during the restore). Needs root; otherwise the restore goes
    to path on the work disk and the tree is deleted, then settled."""
    os.makedirs(path)
    if os.geteuid() != 0:
        def undo():
            shutil.rmtree(path)
            os.sync()
            time.sleep(SETTLE_S)
        return undo
    image = path + ".img"
    with open(image, "wb") as f:
        f.truncate(gib << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=0", image],
                   check=True)
    dev = subprocess.run(["losetup", "--direct-io=on", "--show", "-f", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    subprocess.run(["mount", dev, path], check=True)

    def undo():
        subprocess.run(["umount", path], check=True)
        subprocess.run(["losetup", "-d", dev], check=True)
        os.remove(image)
        os.rmdir(path)
    return undo


def small_files_steps(args, gen, data, runs, chosen, res):
    """First, unchanged and 1%-touched backups, restore and ls for the tools
    in chosen (each step for every tool before the next step)."""
    steps = [("first", lambda t: t.backup(data)), ("unchanged", lambda t: t.backup(data))]
    for t in chosen:
        t.init()
    for key, step in steps:
        for t in chosen:
            warm(data)
            s, rss = step(t)
            res[t.name].update({f"{key}_s": s, f"{key}_rss": rss})
            print(f"{t.name}: {key} {s:.2f}s, {rss:.0f} MiB RSS", file=sys.stderr)
    subprocess.run([gen, "touch", data, "10"], check=True)
    for t in chosen:
        warm(data)
        s, rss = t.backup(data)
        res[t.name].update(touched_s=s, touched_rss=rss)
        print(f"{t.name}: 1% touched {s:.2f}s", file=sys.stderr)
    for t in chosen:
        warm(t.repo)
        target = os.path.join(runs, f"restore-{t.name}")
        undo = None
        if args.per_tool:
            # The filesystem gets twice the data's size: room for every
            # tool's metadata and no tool near a full disk.
            undo = fresh_fs(target, max(4, 2 * du(data) >> 30))
            target = os.path.join(target, "t")
        s, rss = t.restore(target)
        res[t.name].update(restore_s=s, restore_rss=rss)
        print(f"{t.name}: restore {s:.2f}s", file=sys.stderr)
        if undo:
            undo()
    for t in chosen:
        s, rss = t.ls()
        res[t.name].update(ls_s=s, ls_rss=rss, repo=du(t.repo))
        print(f"{t.name}: ls {s:.2f}s", file=sys.stderr)


def small_files(args, binary, gen, runs):
    """A PVC of many small files: first backup, unchanged second, 1% rewritten,
    restore, ls. The data stays under --work/data; each run rewrites another
    1% of it (same sizes), so it keeps its shape."""
    data = os.path.join(args.work, "data", f"small-{args.files}")
    stamp = data + ".done"
    if not os.path.exists(stamp):
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run([gen, "small", data, str(args.files)], check=True)
        open(stamp, "w").close()
    size = du(data)
    names = args.tools.split(",")
    rounds = []
    for i in range(args.repeat):
        # The tool order rotates each round (as in the mixed workload), so
        # no tool always runs first or last.
        order = names[i % len(names):] + names[:i % len(names)]
        work = os.path.join(runs, f"round-{i}") if args.repeat > 1 else runs
        os.makedirs(work, exist_ok=True)
        chosen = [TOOLS[t](work, binary) for t in order]
        res = {t.name: {"tool": t.name} for t in chosen}
        if args.per_tool:
            for t in chosen:
                small_files_steps(args, gen, data, work, [t], res)
                # Only now is this tool's repository deleted (a few large
                # files; its restore went to its own filesystem, see
                # fresh_fs), so the next tool has the disk to itself.
                shutil.rmtree(t.repo)
        else:
            small_files_steps(args, gen, data, work, chosen, res)
        rounds.append((size, res))
        if args.repeat > 1:
            print(f"round {i + 1} of {args.repeat}: " + ", ".join(
                f"{r['tool']} {r['first_s']:.1f}/{r['restore_s']:.1f} s" for r in res.values()),
                file=sys.stderr)
    rows = medians(rounds, names) if args.repeat > 1 else list(rounds[0][1][t] for t in names)
    head = ("tool", "1st backup s", "files/s", "RSS", "unchanged s", "RSS", "1% touched s", "RSS",
            "restore s", "files/s", "RSS", "ls s", "RSS", "repo MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n = args.files
    for r in rows:
        lines.append("| " + " | ".join([
            r["tool"], f"{r['first_s']:.1f}", f"{n / r['first_s']:.0f}", f"{r['first_rss']:.0f}",
            f"{r['unchanged_s']:.2f}", f"{r['unchanged_rss']:.0f}", f"{r['touched_s']:.2f}",
            f"{r['touched_rss']:.0f}", f"{r['restore_s']:.1f}", f"{n / r['restore_s']:.0f}",
            f"{r['restore_rss']:.0f}", f"{r['ls_s']:.2f}", f"{r['ls_rss']:.0f}",
            f"{r['repo'] / 2**20:.0f}"]) + " |")
    print(f"small files: {n} files, {size / 2**30:.2f} GiB (RSS in MiB)\n" + "\n".join(lines)
          + (f"\n(medians of {args.repeat} rounds)" if args.repeat > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "small-files", "files": n, "size": size, "results": rows}, f, indent=2)


KEEP = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "2"]
BIG_STEPS = [
    # (row, labctl's command, restic's and rustic's, borg's; None where the
    # tool has no such command: restic and rustic keep no local catalog,
    # every command reads the repository's index itself; borg's `check
    # --archives-only` is its structure check (archives, items and that
    # every chunk they name is in the repository index) -- `--repository-only`
    # reads every object of every segment, which for a real repository of
    # this many 1 MiB chunks would be reading 10 TiB; borg's `prune` is
    # restic's `forget`, and its space reclaim, `compact`, has no dry run)
    ("catalog rebuild", ["catalog", "rebuild"], None, None),
    ("snapshots", ["snapshots"], ["snapshots"], ["list"]),
    ("backup (first)", ["backup", "path", "SMALL"], ["backup", "SMALL"], ["create", "::small-1", "SMALL"]),
    ("backup (unchanged)", ["backup", "path", "SMALL"], ["backup", "SMALL"], ["create", "::small-2", "SMALL"]),
    ("check", ["check"], ["check"], ["check", "--archives-only"]),
    ("forget --dry-run", ["forget"] + KEEP + ["--dry-run"], ["forget"] + KEEP + ["--dry-run"],
     ["prune", "--dry-run"] + KEEP),
    ("prune --dry-run", ["prune", "--dry-run"], ["prune", "--dry-run"], None),
]


def big_repo_labctl(args, binary, runs, n):
    """labctl's repository of n blobs (benches/bigrepo.rs), made once under
    --work/data/big-N; each run starts from an empty catalog (so the first
    command, catalog rebuild, loads the whole index). The small tree's
    backups add one snapshot per run to the kept repository."""
    data = os.path.join(args.work, "data", f"big-{n}")
    keys = os.path.join(data, "keys")
    env = dict(os.environ, LABCTL_REPO=os.path.join(data, "repo"), LABCTL_KEY=os.path.join(keys, "b.key"),
               LABCTL_CACHE_DIR=os.path.join(runs, f"cache-{n}"))
    if not os.path.exists(data + ".done"):
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(keys)
        run([binary, "-q", "repo", "init", "--no-escrow", "--backup-key", env["LABCTL_KEY"],
             "--restore-key", os.path.join(keys, "r.key")], env=env)
        subprocess.run([os.path.join(ROOT, "target/release/examples/bigrepo"), env["LABCTL_REPO"],
                        env["LABCTL_KEY"], str(n)], check=True)
        open(data + ".done", "w").close()
    return [binary, "-q"], env


def big_repo_peer(args, tool, runs, n):
    """restic's or rustic's repository of n blobs in restic's format, of the
    same shape (benches/resticrepo.rs, under the key `restic cat masterkey`
    prints), made once under --work/data/big-restic-N. Each tool gets a
    hard-linked copy of it per run (restic and rustic only add and delete
    whole files, never rewrite one), so each starts from the generated
    repository and an empty cache."""
    data = os.path.join(args.work, "data", f"big-restic-{n}")
    env = dict(os.environ, RESTIC_REPOSITORY=os.path.join(data, "repo"), RESTIC_PASSWORD="bench-password",
               RESTIC_CACHE_DIR=os.path.join(runs, "cache-restic-gen"))
    if not os.path.exists(data + ".done"):
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        run(["restic", "init", "-q", "--repository-version", "2"], env=env)
        key = os.path.join(data, "masterkey.json")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            subprocess.run(["restic", "cat", "masterkey"], env=env, stdout=f, check=True)
        subprocess.run([os.path.join(ROOT, "target/release/examples/resticrepo"), env["RESTIC_REPOSITORY"],
                        key, str(n)], check=True)
        open(data + ".done", "w").close()
    repo = os.path.join(runs, f"repo-{tool}-{n}")
    subprocess.run(["cp", "-al", os.path.join(data, "repo"), repo], check=True)
    cache = os.path.join(runs, f"cache-{tool}-{n}")
    if tool == "restic":
        return ["restic", "-q"], dict(os.environ, RESTIC_REPOSITORY=repo, RESTIC_PASSWORD="bench-password",
                                      RESTIC_CACHE_DIR=cache)
    return [os.path.join(PEERS, "bin/rustic")], dict(os.environ, RUSTIC_REPOSITORY=repo,
                                                     RUSTIC_PASSWORD="bench-password", RUSTIC_NO_PROGRESS="true",
                                                     RUSTIC_CACHE_DIR=cache, RUSTIC_LOG_LEVEL="warn")


def big_repo_borg(args, tool, runs, n):
    """borg's repository of the same shape, made once by borg itself under
    --work/data/big-borg-N (borg 1.2 and 1.4 write the same format): 64-byte
    chunks (`--chunker-params fixed,64`), so n objects are only 64·n bytes
    of input, in 10 sources of n/10 chunks of random bytes, each with 12
    archives of a quarter of its chunks, the window sliding as
    benches/shape.rs slides it for labctl and restic (about three
    references per object). A sparse repository cannot stand in for borg:
    it checks the CRC of every object it reads. Each run gets a full copy
    (borg rewrites its index and hints files) and an empty cache and
    security directory, as restic and rustic get an empty cache."""
    data = os.path.join(args.work, "data", f"big-borg-{n}")
    gen_env = borg_env(os.path.join(data, "repo"), os.path.join(data, "base"))
    if not os.path.exists(data + ".done"):
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        subprocess.run(["borg", "init", "--encryption=repokey-blake2"], env=gen_env, check=True)
        sources, per_source = 10, 12
        per = n // sources
        window = max(per // 4, 1)
        step = (per - window) // (per_source - 1)
        win = os.path.join(data, "window.bin")
        for s in range(sources):
            chunks = random.Random(s).randbytes(per * 64)
            for j in range(per_source):
                with open(win, "wb") as f:
                    f.write(chunks[j * step * 64:(j * step + window) * 64])
                week = s * per_source + j
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_700_000_000 + week * 7 * 86400))
                subprocess.run(["borg", "create", "--chunker-params", "fixed,64", "--compression", "none",
                                "--timestamp", stamp, f"::s{s}-{j}", "window.bin"], env=gen_env, cwd=data,
                               check=True)
        os.remove(win)
        shutil.rmtree(gen_env["BORG_BASE_DIR"])
        open(data + ".done", "w").close()
    repo = os.path.join(runs, f"repo-{tool}-{n}")
    subprocess.run(["cp", "-a", os.path.join(data, "repo"), repo], check=True)
    binary = Borg14.bin if tool == "borg14" else Borg.bin
    return [binary], borg_env(repo, os.path.join(runs, f"base-{tool}-{n}"))


def big_repo(args, binary, runs):
    """Metadata commands on synthetic repositories of growing size: labctl's
    (benches/bigrepo.rs), for restic and rustic the same shape in restic's
    format (benches/resticrepo.rs), and for borg 1.2 and 1.4 the same shape
    made by borg itself with tiny chunks (big_repo_borg)."""
    tools = args.tools.split(",")
    unknown = [t for t in tools if t not in ("labctl", "restic", "rustic", "borg", "borg14")]
    if unknown:
        sys.exit(f"big-repo: no generator for {', '.join(unknown)}")
    if "rustic" in tools and not os.path.exists(os.path.join(PEERS, "bin/rustic")):
        sys.exit("rustic is not installed: run benches/setup.sh")
    small = os.path.join(args.work, "data", "big-small-tree")
    if not os.path.exists(small + ".done"):
        shutil.rmtree(small, ignore_errors=True)
        os.makedirs(small)
        rnd = random.Random(22)
        for d in range(10):
            os.makedirs(os.path.join(small, f"d{d}"))
            for f in range(100):
                with open(os.path.join(small, f"d{d}", f"f{f}"), "wb") as fh:
                    fh.write(rnd.randbytes(rnd.randint(1024, 16384)))
        open(small + ".done", "w").close()
    sizes = [int(n) for n in args.blobs.split(",")]
    res = {t: {} for t in tools}
    for n in sizes:
        for tool in tools:
            if tool == "labctl":
                base, env = big_repo_labctl(args, binary, runs, n)
            elif tool.startswith("borg"):
                base, env = big_repo_borg(args, tool, runs, n)
            else:
                base, env = big_repo_peer(args, tool, runs, n)
            res[tool][n] = {}
            for name, ours, theirs, borgs in BIG_STEPS:
                cmd = ours if tool == "labctl" else borgs if tool.startswith("borg") else theirs
                if cmd is None:
                    continue
                s, rss = run(base + [small if a == "SMALL" else a for a in cmd], env=env)
                res[tool][n][name] = {"s": s, "rss": rss}
                print(f"{tool}, {n} blobs: {name} {s:.2f}s, {rss:.0f} MiB RSS", file=sys.stderr)
            if tool.startswith("borg"):
                # A full copy, and a chunks cache as large as the index.
                shutil.rmtree(env["BORG_REPO"])
                shutil.rmtree(env["BORG_BASE_DIR"], ignore_errors=True)
            elif tool != "labctl":
                # The cache holds the index and tree packs: gigabytes at 10M.
                shutil.rmtree(env.get("RESTIC_CACHE_DIR") or env["RUSTIC_CACHE_DIR"], ignore_errors=True)
    head = ["command", "tool"] + [c for n in sizes for c in (f"{n / 1e6:g}M blobs s", "RSS MiB")] + \
        ["growth b (t ~ N^b)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, *_ in BIG_STEPS:
        for tool in tools:
            if name not in res[tool][sizes[0]]:
                continue
            cells = [name, tool] + [f"{res[tool][n][name]['s']:.2f} | {res[tool][n][name]['rss']:.0f}"
                                    for n in sizes]
            cells.append(f"{growth(sizes, [res[tool][n][name]['s'] for n in sizes]):.2f}"
                         if len(sizes) > 1 else "-")
            lines.append("| " + " | ".join(cells) + " |")
    print("big repository (wall s | peak RSS MiB per size; restic and rustic keep no catalog to rebuild)\n"
          + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": "big-repo", "results": {t: {str(n): r for n, r in res[t].items()}
                                                           for t in tools}}, f, indent=2)


def growth(ns, ts):
    """The exponent b of a least-squares fit t = a * N^b (log-log); times
    under 50 ms are raised to 50 ms (process start dominates them)."""
    xs = [math.log(n) for n in ns]
    ys = [math.log(max(t, 0.05)) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def one_round(args, binary, gen, runs, index):
    work = os.path.join(runs, f"round-{index}")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    subprocess.run([gen, "generate", data, str(args.size_mib)], check=True)
    size = du(data)
    names = args.tools.split(",")
    names = names[index % len(names):] + names[:index % len(names)]
    chosen = [TOOLS[t](work, binary) for t in names]
    results = {t.name: {"tool": t.name} for t in chosen}

    def counted(f):
        before = s3_requests()
        s, rss = f()
        return s, rss, s3_requests() - before

    for t in chosen:
        t.init()
        warm(data)
        s, rss, req = counted(lambda: t.backup(data))
        results[t.name].update(first_s=s, first_rss=rss, repo_after_first=du_s3(t.prefix) if S3 else du(t.repo))
        if S3:
            results[t.name]["first_req"] = req
        print(f"{t.name}: first backup {s:.2f}s, {rss:.0f} MiB RSS", file=sys.stderr)
    subprocess.run([gen, "mutate", data], check=True)
    for t in chosen:
        warm(data)
        s, rss, req = counted(lambda: t.backup(data))
        r = results[t.name]
        r.update(second_s=s, second_rss=rss, repo_after_second=du_s3(t.prefix) if S3 else du(t.repo))
        r["growth"] = r["repo_after_second"] - r["repo_after_first"]
        if S3:
            r["second_req"] = req
        print(f"{t.name}: second backup {s:.2f}s, growth {r['growth'] / 2**20:.1f} MiB", file=sys.stderr)
    for t in chosen:
        target = os.path.join(work, f"restore-{t.name}")
        if S3:
            warm_s3(t.prefix)
        else:
            warm(t.repo)
        s, rss, req = counted(lambda: t.restore(target))
        results[t.name].update(restore_s=s, restore_rss=rss)
        if S3:
            results[t.name]["restore_req"] = req
        print(f"{t.name}: restore {s:.2f}s", file=sys.stderr)
    return size, results


def sizes_mode(args, binary, gen, runs):
    """Repository size after the first backup and growth on the second, over
    N fresh repositories per tool on one dataset. Every tool draws its
    chunker parameters at random per repository (labctl's FastCDC seed,
    restic's chunker polynomial, borg's buzhash seed), and on this data that
    alone moves a tool's size by about +-0.5% (where the cut points fall
    decides whether the repeated 1 MiB blocks in the large files deduplicate),
    so a few rounds cannot tell the tools' sizes apart; the mean of N can."""
    orig = os.path.join(runs, "orig")
    mutated = os.path.join(runs, "mutated")
    data = os.path.join(runs, "data")
    subprocess.run([gen, "generate", orig, str(args.size_mib)], check=True)
    subprocess.run([gen, "generate", mutated, str(args.size_mib)], check=True)
    subprocess.run([gen, "mutate", mutated], check=True)
    tools = TOOLS
    names = args.tools.split(",")
    got = {n: {"first": [], "growth": []} for n in names}
    for i in range(args.sizes):
        for name in names:
            work = os.path.join(runs, f"repo-{i}-{name}")
            os.makedirs(work)
            t = tools[name](work, binary)
            t.init()
            # one path for both backups, so each tool sees a second backup
            # of the same directory
            os.rename(orig, data)
            t.backup(data)
            os.rename(data, orig)
            first = du_s3(t.prefix) if S3 else du(t.repo)
            os.rename(mutated, data)
            t.backup(data)
            os.rename(data, mutated)
            second = du_s3(t.prefix) if S3 else du(t.repo)
            got[name]["first"].append(first)
            got[name]["growth"].append(second - first)
            print(f"{name} #{i + 1}: repo {first / 2**20:.1f} MiB, growth {(second - first) / 2**20:.1f} MiB",
                  file=sys.stderr)
            shutil.rmtree(work)

    def stats(xs):
        m = statistics.mean(xs)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return m, sd, sd / len(xs) ** 0.5

    head = ("tool", "repo MiB mean", "sd", "min", "max", "growth MiB mean", "sd", "min", "max")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        row = [name]
        for key in ("first", "growth"):
            xs = got[name][key]
            m, sd, _ = stats(xs)
            row += [f"{m / 2**20:.2f}", f"{sd / 2**20:.2f}", f"{min(xs) / 2**20:.1f}", f"{max(xs) / 2**20:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    print(f"dataset: {du(orig) / 2**20:.0f} MiB, {args.sizes} repositories per tool\n" + "\n".join(lines))
    if "labctl" in names:
        for other in names:
            if other == "labctl":
                continue
            for key in ("first", "growth"):
                a, _, sea = stats(got["labctl"][key])
                b, _, seb = stats(got[other][key])
                r = a / b
                se = r * ((sea / a) ** 2 + (seb / b) ** 2) ** 0.5
                what = "repository size" if key == "first" else "growth"
                print(f"labctl / {other} {what}: {r:.4f} +- {se:.4f} (ratio of means +- standard error)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": du(orig), "sizes": got}, f, indent=2)


if __name__ == "__main__":
    main()
