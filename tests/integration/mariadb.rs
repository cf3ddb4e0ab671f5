//! A real MariaDB server (Debian's `mariadb-server`, installed by
//! scripts/test-all.sh) for the tests: a data directory made with
//! `mariadb-install-db` in a temp dir, listening on a free loopback port;
//! root logs in without a password over its private Unix socket for the
//! test's own setup, everyone else with a password over TCP. As root (CI),
//! the server runs as `nobody`.

use crate::common::is_root;
use crate::etcd::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct MariaDb {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
    pub port: u16,
}

fn as_server_user(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        c
    } else {
        Command::new(program)
    }
}

impl MariaDb {
    pub fn start() -> MariaDb {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            Path::new("/usr/sbin/mariadbd").exists(),
            "MariaDB is not installed: run scripts/test-all.sh (Debian package mariadb-server)"
        );
        let dir = tempfile::Builder::new()
            .prefix("labctl-mariadb-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        let run = dir.path().join("run");
        // Its own temporary directory: servers bootstrapping side by side
        // in a shared /tmp collide on temporary tables ("Could not remove
        // temporary table '/tmp/#sql-temptable-…'", then "Unknown table
        // 'mysql.tmp_user_sys'").
        let tmp = dir.path().join("tmp");
        for d in [&data, &run, &tmp] {
            std::fs::create_dir(d).unwrap();
            if is_root() {
                std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
            }
        }
        let out = as_server_user("mariadb-install-db")
            .args([
                "--no-defaults",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                // No Linux AIO contexts: their number is a host-wide
                // limit (fs.aio-max-nr) several test servers can exhaust.
                "--innodb-use-native-aio=0",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let sock = run.join("mysqld.sock");
        let child = as_server_user("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--pid-file={}", run.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", run.join("error.log").display()))
            .args([
                &format!("--port={port}"),
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-use-native-aio=0",
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let db = MariaDb {
            child,
            dir,
            sock,
            port,
        };
        let end = Instant::now() + Duration::from_secs(60);
        while !db.root("SELECT 1").status.success() {
            assert!(
                Instant::now() < end,
                "MariaDB did not start: {}",
                std::fs::read_to_string(db.dir.path().join("run/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        db
    }

    /// Runs SQL as root over the Unix socket.
    pub fn root(&self, sql: &str) -> Output {
        Command::new("mysql")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.sock.display()))
            .args(["-u", "root", "--batch", "--skip-column-names", "-e", sql])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// [`MariaDb::root`], asserting success; its output.
    pub fn root_ok(&self, sql: &str) -> String {
        let out = self.root(sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs an SQL file as root.
    pub fn load(&self, file: &Path) {
        let out = Command::new("mysql")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.sock.display()))
            .args(["-u", "root", "--default-character-set=utf8mb4"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::fs::File::open(file).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "loading {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `mysql://USER@127.0.0.1:PORT`.
    pub fn uri(&self, user: &str) -> String {
        format!("mysql://{user}@127.0.0.1:{}", self.port)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
