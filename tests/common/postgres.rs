//! A throwaway PostgreSQL server for tests: Debian's `postgresql` package (`./scripts/test.sh`
//! installs it), a cluster in a temp dir listening on a free loopback port, started once per
//! test binary and run as the `postgres` user when the tests run as root (initdb refuses
//! root). It dies with the test process (a parent-death signal asks for an immediate
//! shutdown). Each test asks for a database of its own, owned by the unprivileged role
//! `edgechat`, so tests never see each other's rows.
//!
//! Shared by the library's unit tests (`#[path]`) and the integration tests (`mod common`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

/// The role edgechat connects as: it owns its database, and nothing else.
pub const ROLE: &str = "edgechat";

/// A running cluster.
pub struct Server {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// The postmaster, replaced by `restart`.
    child: Mutex<Child>,
    /// (uid, gid) it runs as, when the tests run as root.
    user: Option<(u32, u32)>,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The binary-wide server, started on first use; panics naming the install command when
/// PostgreSQL is not there.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        // Spawned from a thread that lives as long as the process: a parent-death signal
        // fires when the spawning *thread* ends, and test threads end with their test.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Server::start());
            loop {
                std::thread::park();
            }
        });
        match rx.recv().expect("the PostgreSQL starter thread answers") {
            Ok(server) => server,
            Err(e) => panic!("{e}"),
        }
    })
}

/// Whether PostgreSQL's server is installed (benchmarks skip what needs it when not).
pub fn installed() -> bool {
    bin_dir().is_ok()
}

/// A new empty database owned by `ROLE`, as the URL edgechat's `storage.url` takes.
pub fn database() -> String {
    let server = server();
    let name = format!("t{}_{}", std::process::id(), DATABASES.fetch_add(1, Ordering::Relaxed));
    server.sql(&format!("CREATE DATABASE {name} OWNER {ROLE}"));
    server.url(&name)
}

/// PostgreSQL's programs: Debian's newest version.
fn bin_dir() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| NOT_INSTALLED.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| {
        let version = p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str());
        version.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    found.pop().ok_or_else(|| NOT_INSTALLED.to_string())
}

const NOT_INSTALLED: &str = "these tests need PostgreSQL's server: sudo apt-get install \
                             postgresql (./scripts/test.sh installs it)";

/// The `postgres` system user's ids, when we are root and must not run the server as root.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(format!("no `postgres` user to run the server as; {NOT_INSTALLED}"));
    }
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

impl Server {
    fn start() -> Result<Server, String> {
        let bin = bin_dir()?;
        let user = server_user()?;
        remove_stale_clusters();
        let dir = std::env::temp_dir().join(format!("edgechat-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.args(["-D", path(&data), "-U", "postgres", "--auth=trust", "--no-sync"]);
        initdb.arg("--wal-segsize=1");
        initdb.args(["--encoding=UTF8", "--locale=C"]).stdout(Stdio::null());
        let out = as_user(&mut initdb, user, false).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port();
        let child = spawn(&bin, &dir, port, user)?;
        let server = Server { port, dir, bin, child: Mutex::new(child), user };
        server.sql(&format!("CREATE ROLE {ROLE} LOGIN"));
        Ok(server)
    }

    /// `postgres://edgechat@127.0.0.1:PORT/NAME`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL as the superuser (through psql, on the server's own socket directory).
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// Runs SQL as the superuser in `database`.
    pub fn sql_in(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", path(&self.dir), "-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server the fast way (clients are disconnected) and waits for it to exit.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait();
    }

    /// Starts it again on the same port and directory, after `stop`.
    pub fn start_again(&self) {
        let child = spawn(&self.bin, &self.dir, self.port, self.user).expect("postgres restarts");
        *self.child.lock().unwrap() = child;
    }
}

/// Starts the postmaster and returns once it accepts connections.
fn spawn(bin: &Path, dir: &Path, port: u16, user: Option<(u32, u32)>) -> Result<Child, String> {
    let mut cmd = Command::new(bin.join("postgres"));
    cmd.args(["-D", path(&dir.join("data")), "-p", &port.to_string(), "-k", path(dir)]);
    cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "logging_collector=off"]);
    cmd.args(["-c", "max_connections=300", "-c", "fsync=on"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = as_user(&mut cmd, user, true).spawn().map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ready to accept connections") {
                let _ = tx.send(Ok(()));
            } else if line.contains("FATAL") {
                let _ = tx.send(Err(line));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => Ok(child),
        Ok(Err(line)) => Err(format!("postgres did not start: {line}")),
        Err(_) => Err("postgres did not start within 60 s".into()),
    }
}

/// Runs `cmd` as `user` (root dropping to postgres), optionally asking the kernel to send it
/// SIGQUIT (PostgreSQL's immediate shutdown) when the spawning thread's process ends.
fn as_user(cmd: &mut Command, user: Option<(u32, u32)>, die_with_us: bool) -> &mut Command {
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the uid change, which would clear it.
            if die_with_us && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Removes the clusters of test processes that have ended (each is ~100 MB).
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("edgechat-pg-"));
        let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else { continue };
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}
