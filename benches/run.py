#!/usr/bin/env python3
"""labctl vs restic vs borg on the same data, in one run.

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
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


S3 = None  # (endpoint, bucket) when --s3 is given


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
    proc = subprocess.Popen([os.path.join(venv, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    endpoint, bucket = S3
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
    endpoint, bucket = S3
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


class Borg:
    name = "borg"

    def __init__(self, work, _):
        self.repo = os.path.join(work, "repo-borg")
        self.env = dict(os.environ, BORG_REPO=self.repo, BORG_PASSPHRASE="bench-password",
                        BORG_BASE_DIR=os.path.join(work, "base-borg"), BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        self.n = 0

    def init(self):
        run(["borg", "init", "--encryption=repokey-blake2"], env=self.env)

    def backup(self, data):
        self.n += 1
        return run(["borg", "create", "--compression", "zstd,3", f"::s{self.n}", data], env=self.env)

    def restore(self, target):
        os.makedirs(target, exist_ok=True)
        return run(["borg", "extract", f"::s{self.n}"], env=self.env, cwd=target)


def fmt(rows, size):
    mib = size / 2**20
    head = ("tool", "1st backup s", "MB/s", "RSS MiB", "repo MiB", "2nd backup s", "RSS MiB", "growth MiB", "restore s", "MB/s", "RSS MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["tool"], f"{r['first_s']:.2f}", f"{size / r['first_s'] / 1e6:.0f}", f"{r['first_rss']:.0f}",
            f"{r['repo_after_first'] / 2**20:.1f}", f"{r['second_s']:.2f}", f"{r['second_rss']:.0f}",
            f"{r['growth'] / 2**20:.1f}", f"{r['restore_s']:.2f}", f"{size / r['restore_s'] / 1e6:.0f}",
            f"{r['restore_rss']:.0f}"]) + " |")
    return f"dataset: {mib:.0f} MiB\n" + "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tools", default="labctl,restic,borg")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-work"))
    ap.add_argument("--json", help="also write results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--s3", action="store_true",
                    help="repositories on a local moto S3 server instead of local disk (tools: labctl,restic)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (fresh repositories and data each time); the table shows medians")
    ap.add_argument("--sizes", type=int, metavar="N",
                    help="instead of timing: repository size and growth of N fresh repositories per tool "
                         "on the same data (chunker parameters are random per repository), as mean and spread")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "labctl", "--example", "benchdata"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/labctl")
    gen = os.path.join(ROOT, "target/release/examples/benchdata")
    if os.path.exists(args.work):
        shutil.rmtree(args.work, ignore_errors=True)
        # ext4 without a journal (this VM's root) skips inodes freed in the
        # last 60 s when it allocates new ones, scanning past every one of
        # them for each file created: thousands of fresh deletions make the
        # next minute's file creation several times slower (seen as sys time
        # in restores). Let them age first.
        os.sync()
        print("waiting 65 s after deleting the old work directory", file=sys.stderr)
        time.sleep(65)
    os.makedirs(args.work)
    global S3
    moto = None
    if args.s3:
        moto, endpoint = start_moto(args.work)
        S3 = (endpoint, "bench")
        make_bucket(endpoint, "bench")
    # Nothing is deleted until all rounds are done: on ext4, creating files
    # right after deleting thousands makes the inode allocator skip the
    # recently freed ones, which would penalise whichever tool runs next.
    # The tool order also rotates each round.
    if args.sizes:
        try:
            sizes_mode(args, binary, gen)
        finally:
            if moto:
                moto.kill()
            if not args.keep:
                shutil.rmtree(args.work, ignore_errors=True)
        return
    try:
        rounds = [one_round(args, binary, gen, i) for i in range(args.repeat)]
    finally:
        if moto:
            moto.kill()
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    size = rounds[0][0]
    names = args.tools.split(",")
    rows = []
    for name in names:
        per = [r[1][name] for r in rounds]
        row = {"tool": name}
        for key in per[0]:
            if key != "tool":
                row[key] = statistics.median(p[key] for p in per)
        row["rounds"] = per
        rows.append(row)
    print(fmt(rows, size) + (f"\n(medians of {args.repeat} rounds)" if args.repeat > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "results": rows}, f, indent=2)


def one_round(args, binary, gen, index):
    work = os.path.join(args.work, f"round-{index}")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    subprocess.run([gen, "generate", data, str(args.size_mib)], check=True)
    size = du(data)
    tools = {"labctl": Labctl, "restic": Restic, "borg": Borg}
    names = args.tools.split(",")
    names = names[index % len(names):] + names[:index % len(names)]
    chosen = [tools[t](work, binary) for t in names]
    results = {t.name: {"tool": t.name} for t in chosen}
    for t in chosen:
        t.init()
        warm(data)
        s, rss = t.backup(data)
        results[t.name].update(first_s=s, first_rss=rss, repo_after_first=du_s3(t.prefix) if S3 else du(t.repo))
        print(f"{t.name}: first backup {s:.2f}s, {rss:.0f} MiB RSS", file=sys.stderr)
    subprocess.run([gen, "mutate", data], check=True)
    for t in chosen:
        warm(data)
        s, rss = t.backup(data)
        r = results[t.name]
        r.update(second_s=s, second_rss=rss, repo_after_second=du_s3(t.prefix) if S3 else du(t.repo))
        r["growth"] = r["repo_after_second"] - r["repo_after_first"]
        print(f"{t.name}: second backup {s:.2f}s, growth {r['growth'] / 2**20:.1f} MiB", file=sys.stderr)
    for t in chosen:
        target = os.path.join(work, f"restore-{t.name}")
        if S3:
            warm_s3(t.prefix)
        else:
            warm(t.repo)
        s, rss = t.restore(target)
        results[t.name].update(restore_s=s, restore_rss=rss)
        print(f"{t.name}: restore {s:.2f}s", file=sys.stderr)
    return size, results


def sizes_mode(args, binary, gen):
    """Repository size after the first backup and growth on the second, over
    N fresh repositories per tool on one dataset. Every tool draws its
    chunker parameters at random per repository (labctl's FastCDC seed,
    restic's chunker polynomial, borg's buzhash seed), and on this data that
    alone moves a tool's size by about +-0.5% (where the cut points fall
    decides whether the repeated 1 MiB blocks in the large files deduplicate),
    so a few rounds cannot tell the tools' sizes apart; the mean of N can."""
    orig = os.path.join(args.work, "orig")
    mutated = os.path.join(args.work, "mutated")
    data = os.path.join(args.work, "data")
    subprocess.run([gen, "generate", orig, str(args.size_mib)], check=True)
    subprocess.run([gen, "generate", mutated, str(args.size_mib)], check=True)
    subprocess.run([gen, "mutate", mutated], check=True)
    tools = {"labctl": Labctl, "restic": Restic, "borg": Borg}
    names = args.tools.split(",")
    got = {n: {"first": [], "growth": []} for n in names}
    for i in range(args.sizes):
        for name in names:
            work = os.path.join(args.work, f"repo-{i}-{name}")
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
