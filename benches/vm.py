#!/usr/bin/env python3
"""A VM's nightly backup: labctl against restic, rustic, borg 1.2 and borg 1.4
on the same stream (rustic and borg 1.4 when benches/setup.sh installed them).

The stream is the VM test generator's (examples/fakepve.rs `image`): a disk
of --size-gib of 1 MiB regions (zero runs, random, repeated and text) and,
on night 2, about 1% of it rewritten in scattered 64 KiB blocks, the way
`vzdump --stdout --compress 0` hands labctl a VM. Each tool reads the same
bytes from a pipe:

  labctl backup stream --chunker fixed   (the vm source's engine path,
                                          without the SSH transport)
  restic backup --stdin
  rustic backup --force - --stdin-filename vm-701.raw
  borg create ::night -   (borg 1.2 from Debian, borg 1.4 from PyPI)

Reports per night: wall time, throughput, peak RSS (wait4) and repository
growth. Targets (issue 18): labctl >= 2x restic's throughput on night 1,
night 2 adds <= 0.5x restic's growth, peak RSS <= 256 MiB.

    python3 benches/vm.py --size-gib 20
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def piped(gen, cmd, env):
    """Runs `gen | cmd`; returns (seconds, peak RSS MiB of cmd)."""
    os.sync()
    start = time.monotonic()
    g = subprocess.Popen(gen, stdout=subprocess.PIPE)
    p = subprocess.Popen(cmd, env=env, stdin=g.stdout, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    g.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - start
    g.wait()
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or g.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}): {p.stderr.read().decode()[-2000:]}")
    return secs, usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=20)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--locked", "--bin", "labctl",
                    "--example", "fakepve"], cwd=ROOT, check=True)
    labctl = os.path.join(ROOT, "target/release/labctl")
    fake = os.path.join(ROOT, "target/release/examples/fakepve")
    size = int(a.size_gib * (1 << 30))
    work = a.work or tempfile.mkdtemp(prefix="labctl-vm-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        tools = {}
        lenv = dict(os.environ, LABCTL_REPO=f"{work}/labctl", LABCTL_KEY=f"{work}/b.key",
                    LABCTL_CACHE_DIR=f"{work}/cache-labctl")
        subprocess.run([labctl, "repo", "init", "--backup-key", f"{work}/b.key", "--restore-key",
                        f"{work}/r.key", "--no-escrow"], env=lenv, check=True, capture_output=True)
        tools["labctl"] = (lambda n: [labctl, "-q", "backup", "stream", "--name", "vm-701",
                                      "--chunker", "fixed"], lenv, f"{work}/labctl")
        renv = dict(os.environ, RESTIC_REPOSITORY=f"{work}/restic", RESTIC_PASSWORD="bench",
                    RESTIC_CACHE_DIR=f"{work}/cache-restic")
        subprocess.run(["restic", "init"], env=renv, check=True, capture_output=True)
        tools["restic"] = (lambda n: ["restic", "backup", "-q", "--stdin", "--stdin-filename",
                                      "vm-701.raw"], renv, f"{work}/restic")
        benv = dict(os.environ, BORG_REPO=f"{work}/borg", BORG_PASSPHRASE="bench",
                    BORG_BASE_DIR=f"{work}/base-borg")
        subprocess.run(["borg", "init", "--encryption", "repokey-blake2"], env=benv, check=True,
                       capture_output=True)
        tools["borg"] = (lambda n: ["borg", "create", f"::night{n}", "-"], benv, f"{work}/borg")
        peers = os.path.join(ROOT, "target/peers")
        rustic = os.path.join(peers, "bin/rustic")
        if os.path.exists(rustic):
            uenv = dict(os.environ, RUSTIC_REPOSITORY=f"{work}/rustic", RUSTIC_PASSWORD="bench",
                        RUSTIC_CACHE_DIR=f"{work}/cache-rustic", RUSTIC_NO_PROGRESS="true")
            subprocess.run([rustic, "init"], env=uenv, check=True, capture_output=True)
            # --force: without it rustic takes night 1's snapshot as the
            # parent and, stdin having no size or mtime to compare, calls
            # the stream unchanged and reads nothing (rustic 0.11.4).
            tools["rustic"] = (lambda n: [rustic, "backup", "--force", "-", "--stdin-filename", "vm-701.raw"],
                               uenv, f"{work}/rustic")
        borg14 = os.path.join(peers, "borg14-venv/bin/borg")
        if os.path.exists(borg14):
            b14 = dict(benv, BORG_REPO=f"{work}/borg14", BORG_BASE_DIR=f"{work}/base-borg14")
            subprocess.run([borg14, "init", "--encryption", "repokey-blake2"], env=b14, check=True,
                           capture_output=True)
            tools["borg14"] = (lambda n: [borg14, "create", f"::night{n}", "-"], b14, f"{work}/borg14")
        rows = {}
        for name, (cmd, env, repo) in tools.items():
            r = {}
            before = du(repo)
            for night in (1, 2):
                gen = [fake, "image", str(size), str(night - 1)]
                secs, rss = piped(gen, cmd(night), env)
                after = du(repo)
                r[f"night{night}"] = {"seconds": secs, "rss_mib": rss, "growth": after - before,
                                      "mib_s": size / 2**20 / secs}
                before = after
                print(f"{name} night {night}: {secs:.1f}s ({size / 2**20 / secs:.0f} MiB/s), "
                      f"{rss:.0f} MiB RSS, +{r[f'night{night}']['growth'] / 2**20:.0f} MiB", file=sys.stderr)
            rows[name] = r
            shutil.rmtree(repo, ignore_errors=True)
        print(f"VM stream of {a.size_gib:g} GiB (night 2: ~1% rewritten in 64 KiB blocks)")
        print("| tool | night 1 s | MiB/s | RSS MiB | growth MiB | night 2 s | RSS MiB | growth MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            n1, n2 = r["night1"], r["night2"]
            print(f"| {name} | {n1['seconds']:.1f} | {n1['mib_s']:.0f} | {n1['rss_mib']:.0f} | "
                  f"{n1['growth'] / 2**20:.0f} | {n2['seconds']:.1f} | {n2['rss_mib']:.0f} | "
                  f"{n2['growth'] / 2**20:.0f} |")
        lab, res = rows["labctl"], rows["restic"]
        print(f"labctl/restic throughput night 1: {lab['night1']['mib_s'] / res['night1']['mib_s']:.2f}x"
              f" (target >= 2x); night 2 growth: {lab['night2']['growth'] / max(res['night2']['growth'], 1):.2f}x"
              f" restic's (target <= 0.5x); labctl peak RSS {max(lab['night1']['rss_mib'], lab['night2']['rss_mib']):.0f} MiB"
              " (target <= 256)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
