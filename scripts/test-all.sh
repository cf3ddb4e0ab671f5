#!/usr/bin/env bash
# Installs what the test suite needs (idempotently) and runs all of it:
# formatting, lints, unit tests, the integration suite.
# Usage: scripts/test-all.sh        (CI runs exactly this via .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v setpriv >/dev/null || need_apt+=(util-linux)   # unprivileged-user test as root
command -v cc >/dev/null || need_apt+=(gcc)                # rusqlite bundles SQLite (C)
command -v openssl >/dev/null || need_apt+=(openssl)       # the TLS test makes a private CA
command -v mount >/dev/null || need_apt+=(mount)           # the full-disk test mounts a small tmpfs
command -v protoc >/dev/null || need_apt+=(protobuf-compiler) # etcd-client's build generates its gRPC code
command -v etcd >/dev/null || need_apt+=(etcd-server)      # the etcd source's tests run a real member
command -v etcdctl >/dev/null || need_apt+=(etcd-client)   # ... and restore with etcdctl 3.4
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client) # the VM source talks to nodes over SSH
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)         # ... and its tests run a real sshd on loopback
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql) # the mlflow source's tests run a real PostgreSQL
command -v pg_dump >/dev/null || need_apt+=(postgresql-client) # ... dumped with pg_dump, restored with pg_restore and psql
[ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)     # the kubeflow-pipelines source's tests run real MariaDB servers
command -v mysqldump >/dev/null || need_apt+=(mariadb-client) # ... dumped with mysqldump, loaded with mysql
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    # No package may start a service here (openssh-server would listen on
    # port 22): the tests start what they need on loopback themselves.
    guard=/usr/sbin/policy-rc.d made_guard=
    if [ ! -e "$guard" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod +x "$guard" && made_guard=1
      trap 'rm -f "$guard"' EXIT
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    if [ -n "$made_guard" ]; then rm -f "$guard"; trap - EXIT; fi
  else
    echo "missing packages: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

# A real S3-compatible server for the S3 tests: moto's server mode, in a venv
# under target/ (the tests start it on 127.0.0.1 themselves).
MOTO_VERSION=5.2.5
venv=target/test-venv
if ! "$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  python3 -m venv --help >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "moto[server]==$MOTO_VERSION"
fi

# A real MLflow tracking server for the mlflow source's tests, in a venv of
# its own (its Flask and Werkzeug pins differ from moto's).
# psycopg (3: SQLAlchemy 2.1's default postgresql:// driver) and PyMySQL let
# that server use the tests' PostgreSQL and MariaDB backend stores, boto3 an
# artifact root on the tests' S3 server.
MLFLOW_VERSION=3.17.2 PSYCOPG_VERSION=3.3.9 PYMYSQL_VERSION=1.1.1 BOTO3_VERSION=1.44.18
mlvenv=target/mlflow-venv
if ! "$mlvenv/bin/python" -c "import mlflow, sys; sys.exit(mlflow.__version__ != '$MLFLOW_VERSION')" 2>/dev/null; then
  rm -rf "$mlvenv"
  python3 -m venv "$mlvenv"
  "$mlvenv/bin/pip" install -q "mlflow==$MLFLOW_VERSION"
fi
if ! "$mlvenv/bin/python" -c "import psycopg, sys; sys.exit(psycopg.__version__ != '$PSYCOPG_VERSION')" 2>/dev/null; then
  "$mlvenv/bin/pip" install -q "psycopg[binary]==$PSYCOPG_VERSION"
fi
if ! "$mlvenv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('PyMySQL') != '$PYMYSQL_VERSION')" 2>/dev/null; then
  "$mlvenv/bin/pip" install -q "pymysql==$PYMYSQL_VERSION"
fi
if ! "$mlvenv/bin/python" -c "import boto3, sys; sys.exit(boto3.__version__ != '$BOTO3_VERSION')" 2>/dev/null; then
  "$mlvenv/bin/pip" install -q "boto3==$BOTO3_VERSION"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
# The VM tests run examples/fakepve.rs as the test sshd's vzdump/qmrestore:
# `cargo test --all-targets` builds examples as test harnesses only.
cargo build --locked --example fakepve
cargo test --locked --all-targets
echo "== doc tests"
cargo test --locked --doc
