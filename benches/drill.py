#!/usr/bin/env python3
"""The restore time (RTO) of a staging drill, per source, on this machine.

Builds a platform the size asked for, in a temp dir, on free loopback ports:

  - a real etcd (Debian's etcd-server) filled to --etcd-mib of values;
  - a tree of --tree-mib from examples/benchdata.rs (the engine benchmark's
    mixed data: VM-image-like, text, small files);
  - a --stream-mib database-dump-like stream (SQL text);

backs it up as one restore point with `labctl jobs run` (a multi-source job
in a labctl.toml, as the daemon runs it), then --repeat times runs
`labctl restore --to staging --json` with a plan whose targets are in the
temp dir (etcd verified on a live member, the tree checked against the
snapshot listing), removing staging between runs. Reports, median of the
runs: per source the seconds (and of them, verification), the bytes and the
throughput, and the total (the RTO). For reference it times the peers'
equivalents of the biggest steps on the same data: `etcdctl snapshot
restore` of the same snapshot file, and `restic restore` of the same tree.

    python3 benches/drill.py --etcd-mib 128 --tree-mib 1024 --stream-mib 256 --repeat 3
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from etcd import free_port, start_etcd, txn, value  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env, **kw):
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed ({out.returncode}): {out.stderr.decode()[-3000:]}\n{out.stdout.decode()[-3000:]}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd-mib", type=int, default=128)
    ap.add_argument("--tree-mib", type=int, default=1024)
    ap.add_argument("--stream-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mlflow-runs", type=int, default=200,
                    help="runs logged to a real MLflow server (target/mlflow-venv); 0 leaves MLflow out")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--locked", "--bin", "labctl",
                    "--example", "benchdata"], cwd=ROOT, check=True)
    labctl = os.path.join(ROOT, "target/release/labctl")
    tmp = tempfile.mkdtemp(prefix="labctl-drill-bench-")
    etcd, url = start_etcd(tmp)
    mlserver = None
    mlbin = os.path.join(ROOT, "target/mlflow-venv/bin")
    with_mlflow = a.mlflow_runs > 0 and os.path.exists(f"{mlbin}/mlflow")
    mlenv = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    try:
        ml_source = ""
        ml_plan = ""
        if with_mlflow:
            # MLflow on SQLite: runs with a 100-step metric history and a
            # 64 KiB artifact each, logged through its REST API.
            os.makedirs(f"{tmp}/ml/artifacts")
            port = free_port()
            mlserver = subprocess.Popen(
                [f"{mlbin}/mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/ml/mlflow.db",
                 "--default-artifact-root", f"{tmp}/ml/artifacts", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1"],
                env=mlenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            log = f"""
import os, sys, time, mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
mlflow.set_tracking_uri("http://127.0.0.1:{port}")
for _ in range(300):
    try:
        mlflow.search_experiments(); break
    except Exception:
        time.sleep(0.2)
c = MlflowClient()
mlflow.set_experiment("bench")
for r in range({a.mlflow_runs}):
    with mlflow.start_run() as run:
        c.log_batch(run.info.run_id, metrics=[Metric("loss", 1.0 / (s + 1), int(time.time() * 1000), s) for s in range(100)])
        p = "{tmp}/ml/a.bin"
        open(p, "wb").write(os.urandom(65536))
        mlflow.log_artifact(p)
"""
            subprocess.run([f"{mlbin}/python", "-c", log], env=mlenv, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ml_source = (f'  {{ source = "mlflow", backend_store_uri = "sqlite:///{tmp}/ml/mlflow.db", '
                         f'artifacts = "{tmp}/ml/artifacts" }},\n')
            vport = free_port()
            ml_plan = f"""mlflow:
  backend_store_uri: sqlite:///{tmp}/stage/mlflow/mlflow.db
  artifacts: {tmp}/stage/mlflow/artifacts
  verify_tracking_uri: http://127.0.0.1:{vport}
  verify_server: [/usr/bin/env, MLFLOW_DISABLE_TELEMETRY=true, DO_NOT_TRACK=1, {mlbin}/mlflow, server, --backend-store-uri, "sqlite:///{tmp}/stage/mlflow/mlflow.db", --default-artifact-root, {tmp}/stage/mlflow/artifacts, --host, 127.0.0.1, --port, "{vport}", --workers, "1"]
"""
        n = a.etcd_mib * 1024 * 1024 // 8192
        for start in range(0, n, 64):
            txn(url, [(f"/registry/bench/k{i:07}".encode(), value(i, 0))
                      for i in range(start, min(n, start + 64))])
        txn(url, [(b"/registry/namespaces/kube-system", b"{}")])
        tree = f"{tmp}/tree"
        subprocess.run([os.path.join(ROOT, "target/release/examples/benchdata"), "generate", tree,
                        str(a.tree_mib)], check=True, stdout=subprocess.DEVNULL)
        dump = f"{tmp}/dump.sql"
        with open(dump, "w") as f:
            i = 0
            while f.tell() < a.stream_mib << 20:
                f.write(f"INSERT INTO metrics VALUES ('{i:032x}', 'loss', {i % 997 / 997:.6f}, {i});\n")
                i += 1
        env = dict(os.environ, LABCTL_CACHE_DIR=f"{tmp}/cache", LABCTL_REPO=f"{tmp}/repo")
        run([labctl, "repo", "init", "--backup-key", f"{tmp}/b.key", "--restore-key", f"{tmp}/r.key",
             "--no-escrow"], env)
        cfg = f"{tmp}/labctl.toml"
        with open(cfg, "w") as f:
            f.write(f"""[repository]
url = "{tmp}/repo"
backup_key = "{tmp}/b.key"
restore_key = "{tmp}/r.key"
cache_dir = "{tmp}/cache"

[daemon]
metrics_listen = ""

[[job]]
name = "platform"
schedule = "0 2 * * *"
backup = [
  {{ source = "etcd", endpoint = "{url}" }},
  {{ source = "path", path = "{tree}" }},
{ml_source}  {{ source = "stream", name = "mlflow-db", command = ["cat", "{dump}"] }},
]
""")
        t = time.monotonic()
        run([labctl, "jobs", "run", "platform", "--config", cfg], env)
        backup_s = time.monotonic() - t
        stage = f"{tmp}/stage"
        plan = f"{tmp}/staging.yaml"
        with open(plan, "w") as f:
            f.write(f"""environment: staging
rto_objective: 30m
etcd:
  data_dir: {stage}/etcd
  initial_advertise_peer_urls: http://127.0.0.1:{free_port()}
  sentinel_key: /registry/namespaces/kube-system
path:
  root: {stage}/files
stream:
  dir: {stage}/streams
{ml_plan}""")
        renv = dict(env, LABCTL_RESTORE_KEY=f"{tmp}/r.key")
        reports = []
        for _ in range(a.repeat):
            shutil.rmtree(stage, ignore_errors=True)
            subprocess.run(["sync"])
            out = run([labctl, "--json", "restore", "--to", "staging", "--plan", plan,
                       "--config", cfg], renv)
            reports.append(json.loads(out))
        # Peers' equivalents of the two biggest steps, on the same data.
        peers = {}
        snap = f"{tmp}/etcd.db"
        run(["etcdctl", "--endpoints", url, "snapshot", "save", snap], dict(env, ETCDCTL_API="3"))
        ts = []
        for r in range(a.repeat):
            d = f"{tmp}/etcdctl-restore-{r}"
            t = time.monotonic()
            run(["etcdctl", "snapshot", "restore", snap, "--data-dir", d], dict(env, ETCDCTL_API="3"))
            ts.append(time.monotonic() - t)
            shutil.rmtree(d)
        peers["etcdctl snapshot restore (file already local)"] = statistics.median(ts)
        if shutil.which("restic"):
            renv2 = dict(os.environ, RESTIC_REPOSITORY=f"{tmp}/restic", RESTIC_PASSWORD="bench",
                         RESTIC_CACHE_DIR=f"{tmp}/restic-cache")
            run(["restic", "init"], renv2)
            run(["restic", "backup", "-q", tree], renv2)
            ts = []
            for r in range(a.repeat):
                d = f"{tmp}/restic-restore-{r}"
                subprocess.run(["sync"])
                t = time.monotonic()
                run(["restic", "restore", "latest", "--target", d], renv2)
                ts.append(time.monotonic() - t)
                shutil.rmtree(d)
            peers["restic restore of the tree"] = statistics.median(ts)
        steps = {}
        for rep in reports:
            for s in rep["steps"]:
                steps.setdefault(s["kind"], []).append(s)
        total = statistics.median(r["seconds"] for r in reports)
        print(f"platform: etcd {a.etcd_mib} MiB of values, tree {a.tree_mib} MiB, stream {a.stream_mib} MiB"
              + (f", MLflow {a.mlflow_runs} runs" if with_mlflow else "")
              + f"; backup as one point {backup_s:.1f}s")
        print(f"staging drill, median of {a.repeat}:")
        rows = {}
        for kind, ss in steps.items():
            sec = statistics.median(s["seconds"] for s in ss)
            ver = statistics.median(s["verify-seconds"] for s in ss)
            b = ss[0]["bytes"]
            rows[kind] = {"seconds": sec, "verify-seconds": ver, "bytes": b}
            print(f"  {kind:<7} {b / 2**20:8.0f} MiB  {sec:6.2f}s (verify {ver:5.2f}s)"
                  f"  {b / 2**20 / max(sec, 1e-9):7.0f} MiB/s")
        print(f"  total (RTO)       {total:6.2f}s")
        for k, v in peers.items():
            print(f"  peer: {k}: {v:.2f}s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"steps": rows, "rto": total, "backup": backup_s, "peers": peers,
                           "reports": reports}, f, indent=1)
    finally:
        if mlserver:
            os.killpg(mlserver.pid, 15)
            mlserver.wait()
        etcd.kill()
        etcd.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
