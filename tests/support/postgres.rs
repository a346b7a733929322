//! A real PostgreSQL for tests: the server named by `TALLY_TEST_POSTGRES`
//! (a `postgres://` URL to a database the tests may create databases
//! from), or else a throwaway cluster made with the installed `initdb` and
//! `pg_ctl`, listening only on a Unix socket in its own directory, stopped
//! and removed when the guard drops. Without either, the test fails and
//! says how to get one: a PostgreSQL test never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL server for one test; each [`Postgres::database`] is new.
pub struct Postgres {
    /// `postgres://…/` without a database name, plus any query.
    base: String,
    query: String,
    cluster: Option<Cluster>,
    next: std::sync::atomic::AtomicU32,
}

struct Cluster {
    dir: tempfile::TempDir,
    pg_ctl: PathBuf,
    as_postgres: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = run(
            &self.pg_ctl,
            &["stop", "-m", "immediate", "-D", path_str(&data)],
            self.as_postgres,
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root
/// (initdb and the server refuse to run as root).
fn run(tool: &Path, args: &[&str], as_postgres: bool) -> std::process::Output {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()))
}

/// The directory holding `initdb` and `pg_ctl`.
fn bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl Postgres {
    /// The configured server, or a new throwaway cluster.
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("TALLY_TEST_POSTGRES") {
            let (base, query) = match url.split_once('?') {
                Some((b, q)) => (b.to_owned(), format!("?{q}")),
                None => (url.clone(), String::new()),
            };
            let base = match base.rfind('/') {
                Some(i) if i > "postgres://".len() => base[..=i].to_owned(),
                _ => format!("{base}/"),
            };
            return Self {
                base,
                query,
                cluster: None,
                next: 0.into(),
            };
        }
        let bin = bindir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL tests need a server: set TALLY_TEST_POSTGRES=postgres://… \
                 or install PostgreSQL (initdb, pg_ctl), e.g. apt-get install postgresql"
            )
        });
        let as_postgres = is_root();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if as_postgres {
            // The server runs as `postgres`: it must own its directory.
            let ok = Command::new("chown")
                .args(["postgres:postgres", path_str(dir.path())])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory failed");
        }
        let out = run(
            &bin.join("initdb"),
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            as_postgres,
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket_dir = path_str(dir.path()).to_owned();
        // Unix socket only (no TCP port to collide on); `-w` waits until
        // the server accepts connections.
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{socket_dir}' -c fsync=off"
        );
        let out = run(
            &bin.join("pg_ctl"),
            &[
                "start",
                "-w",
                "-D",
                path_str(&data),
                "-l",
                path_str(&dir.path().join("log")),
                "-o",
                &options,
            ],
            as_postgres,
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Self {
            base: "postgres://postgres@localhost/".into(),
            query: format!("?host={socket_dir}"),
            cluster: Some(Cluster {
                dir,
                pg_ctl: bin.join("pg_ctl"),
                as_postgres,
            }),
            next: 0.into(),
        }
    }

    /// A URL to a database made for this call, empty.
    pub async fn database(&self) -> String {
        use sqlx::Connection as _;
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("tally_test_{}_{n}", std::process::id());
        let admin = format!("{}postgres{}", self.base, self.query);
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connecting to PostgreSQL at {admin}: {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        format!("{}{name}{}", self.base, self.query)
    }
}
