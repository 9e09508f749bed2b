//! Throwaway PostgreSQL servers for Rehydra's tests.
//!
//! Each [`PgServer`] is a real PostgreSQL (Debian's `postgresql` package:
//! `initdb`, `postgres`, `pg_basebackup`) in a temporary directory, on a
//! free loopback port, with trust authentication for the loopback address
//! only. It is started by the test and stopped when dropped; no system
//! service is involved. When the tests run as root (CI), the server runs as
//! the `postgres` user, because PostgreSQL refuses to run as root.
//!
//! Failing to find or start a server is an error that says what to
//! install: the tests never skip silently.
//!
//! A primary can be given a streaming standby ([`PgServer::start_standby`]),
//! synchronous if asked, and the standby promoted, for failover tests.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The database user every server is created with (a superuser).
pub const USER: &str = "rehydra";
/// How long a server may take to accept connections after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running throwaway PostgreSQL server. Dropping it stops the server
/// (fast shutdown, then SIGKILL) and deletes its directory.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// Extra `-c name=value` settings given at every start.
    settings: Vec<String>,
    /// Whether [`freeze`](Self::freeze) stopped it.
    frozen: bool,
}

impl PgServer {
    /// Initialises and starts a fresh server.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`PgServer::start`], with extra server settings
    /// (`name=value`, given as `-c` options at every start).
    pub fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        let mut server = Self::prepare(settings)?;
        server.initdb()?;
        server.start_again()?;
        Ok(server)
    }

    /// Like [`PgServer::start`], with TLS on: a private CA and a server
    /// certificate for `localhost` and `127.0.0.1` made with the `openssl`
    /// command. Returns the server and the CA certificate's path (PEM),
    /// for `sslrootcert`.
    pub fn start_with_tls() -> anyhow::Result<(Self, PathBuf)> {
        let mut server = Self::prepare(&[])?;
        server.initdb()?;
        let dir = server.dir.path().to_path_buf();
        let openssl = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .context("running openssl (Debian's openssl package)")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rehydra test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ])?;
        for file in ["server.key", "server.pem"] {
            if let Some((uid, gid)) = server.run_as {
                chown(dir.join(file), Some(uid), Some(gid))?;
            }
            fs::set_permissions(dir.join(file), fs::Permissions::from_mode(0o600))?;
        }
        server.settings.extend([
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", dir.join("server.pem").display()),
            format!("ssl_key_file={}", dir.join("server.key").display()),
        ]);
        server.start_again()?;
        Ok((server, dir.join("ca.pem")))
    }

    /// Creates the cluster in [`data_dir`](Self::data_dir): the superuser
    /// [`USER`], trust authentication, UTF-8.
    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A fresh directory and port, nothing started.
    fn prepare(settings: &[&str]) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("rehydra-pg-")
            .tempdir()
            .context("creating a directory for a test PostgreSQL server")?;
        let run_as = server_user()?;
        if let Some((uid, gid)) = run_as {
            chown(dir.path(), Some(uid), Some(gid))
                .context("giving the server's directory to its user")?;
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        Ok(PgServer {
            bin,
            dir,
            port: free_port()?,
            run_as,
            child: None,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            frozen: false,
        })
    }

    /// Starts a streaming standby of this server (which must be running),
    /// from a base backup. With `synchronous`, this server then waits for
    /// the standby to confirm each commit (`synchronous_standby_names`).
    pub fn start_standby(&self, synchronous: bool) -> anyhow::Result<PgServer> {
        let mut standby =
            Self::prepare(&self.settings.iter().map(String::as_str).collect::<Vec<_>>())?;
        let data = standby.data_dir();
        let out = standby
            .command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-D",
            ])
            .arg(&data)
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
            .output()
            .context("running pg_basebackup")?;
        if !out.status.success() {
            bail!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Name the standby, so that the primary can require it.
        let auto = data.join("postgresql.auto.conf");
        let conf = fs::read_to_string(&auto).context("reading the standby's settings")?;
        let conf = conf.replace(
            "primary_conninfo = '",
            "primary_conninfo = 'application_name=standby ",
        );
        fs::write(&auto, conf).context("naming the standby")?;
        standby.start_again()?;
        if synchronous {
            self.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'")?;
            self.sql("SELECT pg_reload_conf()")?;
            // Wait until the primary counts the standby as synchronous.
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                let state = self.sql(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'",
                )?;
                if state.trim() == "sync" {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the standby did not become synchronous (state {state:?})");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(standby)
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        self.sql("SELECT pg_promote(true, 60)")?;
        let deadline = Instant::now() + START_TIMEOUT;
        while self.sql("SELECT pg_is_in_recovery()")?.trim() != "f" {
            if Instant::now() > deadline {
                bail!("the standby did not leave recovery after pg_promote");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq URL for `database` (`postgres` always exists).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server (again, after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) and waits until it accepts connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the server is already running");
        }
        let log = fs::File::create(self.dir.path().join("server.log"))?;
        if let Some((uid, gid)) = self.run_as {
            chown(self.dir.path().join("server.log"), Some(uid), Some(gid))?;
        }
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=32MB"]);
        for s in &self.settings {
            command.args(["-c", s]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "postgres exited with {status} while starting; its log:\n{}",
                    self.log()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.sql("SELECT 1").is_ok_and(|out| out.trim() == "1")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections within {START_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server cleanly (fast shutdown: open transactions are
    /// rolled back, connections closed) and waits for it.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, "INT")?;
            let deadline = Instant::now() + START_TIMEOUT;
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        Ok(())
    }

    /// Kills the postmaster with SIGKILL, as a crash would; its backends
    /// notice and exit. [`start_again`](Self::start_again) recovers.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
            // Backends exit once they see the postmaster gone; wait for the
            // port to be free so that a restart can bind it.
            let deadline = Instant::now() + START_TIMEOUT;
            while TcpListener::bind(("127.0.0.1", self.port)).is_err() {
                if Instant::now() > deadline {
                    bail!("port {} still busy after killing postgres", self.port);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Freezes the server and every process of it (SIGSTOP): connections
    /// stay open but nothing answers, as when the network between a host
    /// and the database is cut. [`thaw`](Self::thaw) resumes it.
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        self.signal_all("STOP")?;
        self.frozen = true;
        Ok(())
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        self.signal_all("CONT")?;
        self.frozen = false;
        Ok(())
    }

    /// Sends `name` to the postmaster and each of its children.
    fn signal_all(&self, name: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the server is not running")?;
        let root = child.id();
        let mut pids = vec![root];
        for entry in fs::read_dir("/proc")?.filter_map(Result::ok) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The parent pid is the second field after the command's ")".
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(root) {
                pids.push(pid);
            }
        }
        for pid in pids {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .context("running kill")?;
            // A backend may exit between the listing and the signal; only
            // the postmaster must get it.
            if !status.success() && pid == root {
                bail!("kill -{name} {pid} failed");
            }
        }
        Ok(())
    }

    /// Runs `sql` with psql as the superuser in database `postgres`; its
    /// output unaligned, tuples only.
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        self.sql_in("postgres", sql)
    }

    /// Runs `sql` with psql in `database`.
    pub fn sql_in(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                database,
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A command for one of the server's programs, run as the server's user.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path());
        command
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A frozen server would ignore the shutdown request.
        if self.frozen {
            let _ = self.thaw();
        }
        let _ = self.stop();
    }
}

fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {} failed", child.id());
    }
    Ok(())
}

/// Where PostgreSQL's server programs are: `initdb`'s directory on `PATH`,
/// or the newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                let real = fs::canonicalize(&initdb)?;
                if let Some(parent) = real.parent()
                    && parent.join("postgres").is_file()
                    && parent.join("pg_basebackup").is_file()
                {
                    return Ok(parent.to_path_buf());
                }
            }
        }
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().context(
        "no PostgreSQL server found (initdb, postgres) on PATH or in /usr/lib/postgresql/*/bin: \
         install Debian's postgresql package (make test does: scripts/ensure-system-packages)",
    )
}

/// The user the server must run as: none when not root; the `postgres`
/// user (or `nobody`) when root.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == name {
                let uid = fields[2].parse().context("a uid in /etc/passwd")?;
                let gid = fields[3].parse().context("a gid in /etc/passwd")?;
                return Ok(Some((uid, gid)));
            }
        }
    }
    bail!("running as root, and there is neither a postgres nor a nobody user to run PostgreSQL as")
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it
/// a moment later).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
