//! A throwaway PostgreSQL server for tests: Debian's `initdb` and `pg_ctl` in a temporary
//! directory, on a loopback port the OS chose, as an unprivileged user (PostgreSQL refuses to
//! run as root; under root the server runs as `postgres`, or `nobody`), with no system service.
//!
//! Where the binaries are: `OUTPOST_PG_BIN`, else `initdb` on `PATH`, else the newest
//! `/usr/lib/postgresql/*/bin`. A test that finds none skips with a message, unless
//! `OUTPOST_REQUIRE_POSTGRES=1` (set by `.ci/run`), when it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether PostgreSQL tests must run (`OUTPOST_REQUIRE_POSTGRES=1`).
pub fn required() -> bool {
    std::env::var("OUTPOST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// The directory holding `initdb`, `pg_ctl` and `createdb`, if there is one.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OUTPOST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                // Debian links /usr/local/bin/initdb and friends into the versioned directory.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return real.parent().map(Path::to_path_buf);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The (uid, gid) the server runs as when the tests run as root.
fn unprivileged() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3
                && fields[0] == name
                && let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse())
            {
                return (uid, gid);
            }
        }
    }
    (65534, 65534)
}

fn is_root() -> bool {
    // The tests have no libc binding: Linux says the effective uid in /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// A running PostgreSQL server; stopped (immediately) and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the binaries as this (uid, gid).
    user: Option<(u32, u32)>,
    databases: AtomicU32,
}

impl Postgres {
    /// Starts a server, or says why it cannot.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir().ok_or("no PostgreSQL binaries (initdb) found")?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "outpost-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let user = is_root().then(unprivileged);
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let server = Self {
            bin,
            dir,
            port,
            user,
            databases: AtomicU32::new(0),
        };
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "outpost",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        server.start_again()?;
        Ok(server)
    }

    /// A server, or `None` after saying why not (a failure instead when PostgreSQL is
    /// [`required`]).
    pub fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start() {
            Ok(server) => Some(server),
            Err(e) if required() => panic!("{test}: cannot start PostgreSQL: {e}"),
            Err(e) => {
                eprintln!("{test}: skipped, cannot start PostgreSQL: {e}");
                None
            }
        }
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let binary = self.bin.join(program);
        let mut command = match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        command.args(args).current_dir(&self.dir).env("LC_ALL", "C");
        let out = command
            .output()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://outpost@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub fn database(&self) -> Result<String, String> {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "outpost", &name],
        )?;
        Ok(self.url(&name))
    }

    /// Stops the server at once (as a crash would: no shutdown checkpoint).
    pub fn kill(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "immediate", "stop"],
        )
        .map(|_| ())
    }

    /// Restarts the server speaking TLS with `cert` and `key` (PEM), and refusing every
    /// connection that does not.
    pub fn require_tls(&self, cert: &Path, key: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        for (from, to, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let target = data.join(to);
            std::fs::copy(from, &target).map_err(|e| format!("{}: {e}", from.display()))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
            if let Some((uid, gid)) = self.user {
                std::os::unix::fs::chown(&target, Some(uid), Some(gid))
                    .map_err(|e| e.to_string())?;
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).map_err(|e| e.to_string())?;
        std::fs::write(&hba, format!("hostnossl all all all reject\n{rules}"))
            .map_err(|e| e.to_string())?;
        self.kill()?;
        self.start_again()
    }

    /// Starts the server again on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        )
        .map(|_| ())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
