//! The `postgres://` connection string: libpq's URL form, the `PG*`
//! environment variables libpq users rely on, the host's own parameters, and
//! the redacted form shown in logs and `/healthz` (`store::redact_url`).
//!
//! The URL is handed to `tokio_postgres::Config`, which understands libpq's
//! URL form including several hosts (`postgres://h1:5432,h2:5433/db`) and
//! `target_session_attrs=read-write`, but neither the environment nor a
//! few parameters that libpq has: those are taken out here first.
//!
//! - `schema` (the host's own): the PostgreSQL schema the store's tables
//!   live in, default [`DEFAULT_SCHEMA`].
//! - `sslmode`: libpq's six modes (see [`SslMode`]); `tokio_postgres` knows
//!   only three, and verifies nothing itself.
//! - `sslrootcert`: the CA certificates (PEM) to verify the server with.
//! - `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`,
//!   `PGSSLROOTCERT`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGTARGETSESSIONATTRS`:
//!   used where the URL says nothing, as libpq does.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

/// The PostgreSQL schema the store uses when the URL names none.
pub const DEFAULT_SCHEMA: &str = "rehydra";
/// How long connecting to one host may take when neither the URL nor
/// `PGCONNECT_TIMEOUT` says: long enough for a loaded server, short enough
/// that a dead host of a multi-host URL is passed over quickly.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// libpq's `sslmode`, which decides whether the connection is encrypted and
/// what is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// libpq's `allow`: treated as `prefer` (TLS when the server offers it,
    /// nothing verified).
    Allow,
    /// TLS when the server offers it; nothing verified (libpq's default).
    Prefer,
    /// TLS or no connection; the certificate is verified only when a root
    /// certificate is given (as libpq does).
    Require,
    /// TLS, and the certificate chain must lead to a trusted root.
    VerifyCa,
    /// TLS, a trusted chain, and the certificate must name the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "unknown sslmode {other:?}: use disable, allow, prefer, require, verify-ca or verify-full"
            ),
        })
    }
}

/// A parsed `postgres://` store URL.
#[derive(Debug, Clone)]
pub struct PgUrl {
    /// What `tokio_postgres` connects with (environment defaults applied).
    pub config: tokio_postgres::Config,
    /// The schema the store's tables live in.
    pub schema: String,
    /// How the connection is secured.
    pub ssl_mode: SslMode,
    /// CA certificates to verify the server with (PEM), if given.
    pub ssl_root_cert: Option<PathBuf>,
    /// The URL without its password, for logs and `/healthz`.
    pub redacted: String,
}

/// Whether `url` names a PostgreSQL store.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Where the environment comes from: the process's, or a map in tests.
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process's environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl PgUrl {
    /// Parses `url` with the process's environment for what it leaves out.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        Self::parse_with(url, &ProcessEnv)
    }

    /// Parses `url`, taking what it leaves out from `env`.
    pub fn parse_with(url: &str, env: &dyn Env) -> anyhow::Result<Self> {
        let redacted = crate::store::redact_url(url);
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut schema = None;
        let mut ssl_mode = None;
        let mut ssl_root_cert = None;
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value)
                .with_context(|| format!("in the parameter {key} of {redacted}"))?;
            match key {
                "schema" => schema = Some(value),
                "sslmode" => ssl_mode = Some(value.parse::<SslMode>()?),
                "sslrootcert" => ssl_root_cert = Some(PathBuf::from(value)),
                "sslcert" | "sslkey" | "sslpassword" => bail!(
                    "{key} in {redacted}: client certificates are not supported; authenticate \
                     with a password (in the URL or PGPASSWORD) instead"
                ),
                _ => passed.push(pair),
            }
        }
        let rebuilt = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rebuilt).map_err(|e| {
            anyhow::anyhow!(
                "cannot parse the PostgreSQL URL {redacted}: {e}; write it as \
                 postgres://USER[:PASSWORD]@HOST[:PORT][,HOST[:PORT]...]/DATABASE\
                 [?target_session_attrs=read-write&sslmode=require&schema=rehydra]"
            )
        })?;
        apply_env(&mut config, env)?;
        let ssl_mode = match ssl_mode {
            Some(mode) => mode,
            None => match env.var("PGSSLMODE") {
                Some(mode) => mode.parse().context("in PGSSLMODE")?,
                None => SslMode::Prefer,
            },
        };
        let ssl_root_cert = ssl_root_cert.or_else(|| env.var("PGSSLROOTCERT").map(PathBuf::from));
        let schema = schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned());
        check_schema_name(&schema)?;
        if config.get_user().is_none() {
            bail!(
                "no PostgreSQL user in {redacted}, PGUSER or the environment's USER: name one, \
                 as in postgres://USER@HOST/DATABASE"
            );
        }
        Ok(PgUrl {
            config,
            schema,
            ssl_mode,
            ssl_root_cert,
            redacted,
        })
    }
}

/// Fills in what the URL left out from libpq's environment variables.
fn apply_env(config: &mut tokio_postgres::Config, env: &dyn Env) -> anyhow::Result<()> {
    if config.get_hosts().is_empty() {
        let hosts = env.var("PGHOST").unwrap_or_else(|| "localhost".to_owned());
        for host in hosts.split(',') {
            if host.starts_with('/') {
                config.host_path(host);
            } else {
                config.host(host);
            }
        }
    }
    if config.get_ports().is_empty()
        && let Some(ports) = env.var("PGPORT")
    {
        for port in ports.split(',') {
            let port: u16 = port
                .trim()
                .parse()
                .with_context(|| format!("PGPORT={ports:?} is not a port number"))?;
            config.port(port);
        }
    }
    if config.get_user().is_none()
        && let Some(user) = env.var("PGUSER").or_else(|| env.var("USER"))
    {
        config.user(user);
    }
    if config.get_password().is_none()
        && let Some(password) = env.var("PGPASSWORD")
    {
        config.password(password);
    }
    if config.get_dbname().is_none()
        && let Some(db) = env.var("PGDATABASE")
    {
        config.dbname(db);
    }
    if config.get_application_name().is_none() {
        config.application_name(env.var("PGAPPNAME").as_deref().unwrap_or("rehydra"));
    }
    if config.get_connect_timeout().is_none() {
        let timeout = match env.var("PGCONNECT_TIMEOUT") {
            Some(secs) => Duration::from_secs(secs.trim().parse().with_context(|| {
                format!("PGCONNECT_TIMEOUT={secs:?} is not a number of seconds")
            })?),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        config.connect_timeout(timeout);
    }
    if let Some(attrs) = env.var("PGTARGETSESSIONATTRS") {
        // Only when the URL did not say: tokio_postgres's default is `any`.
        if config.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::Any {
            config.target_session_attrs(match attrs.as_str() {
                "read-write" => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
                "any" => tokio_postgres::config::TargetSessionAttrs::Any,
                other => bail!("PGTARGETSESSIONATTRS={other:?}: use read-write or any"),
            });
        }
    }
    // Keepalives find a silently dead peer (a network cut) on idle pooled
    // connections; queries in flight have their own deadlines.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    Ok(())
}

/// A schema name the host can quote without surprises: what an unquoted
/// PostgreSQL identifier may be, lower case.
fn check_schema_name(schema: &str) -> anyhow::Result<()> {
    let mut chars = schema.chars();
    let ok = schema.len() <= 48
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!(
            "schema={schema:?} is not a usable schema name: use lower-case letters, digits and \
             underscores, starting with a letter, at most 48 characters"
        );
    }
    Ok(())
}

/// Decodes `%XX` escapes (libpq URLs escape reserved characters that way).
fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .with_context(|| format!("a truncated %-escape in {s:?}"))?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .with_context(|| format!("%{hex} is not a %-escape in {s:?}"))?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::store::redact_url as redact;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
        MapEnv(pairs.iter().copied().collect())
    }

    #[test]
    fn a_plain_url_gets_the_defaults() {
        let url = PgUrl::parse_with("postgres://app@db.example:5433/events", &env(&[])).unwrap();
        assert_eq!(url.schema, DEFAULT_SCHEMA);
        assert_eq!(url.ssl_mode, SslMode::Prefer);
        assert_eq!(url.config.get_user(), Some("app"));
        assert_eq!(url.config.get_dbname(), Some("events"));
        assert_eq!(url.config.get_ports(), &[5433]);
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );
        assert_eq!(url.config.get_application_name(), Some("rehydra"));
    }

    #[test]
    fn several_hosts_and_the_host_parameters_are_understood() {
        let url = PgUrl::parse_with(
            "postgresql://app:s3cret@h1:5432,h2:5433/events?target_session_attrs=read-write\
             &schema=bank&sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=2",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(url.config.get_hosts().len(), 2);
        assert_eq!(url.config.get_ports(), &[5432, 5433]);
        assert_eq!(
            url.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(url.schema, "bank");
        assert_eq!(url.ssl_mode, SslMode::VerifyFull);
        assert_eq!(url.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&Duration::from_secs(2))
        );
        assert_eq!(url.config.get_password(), Some(&b"s3cret"[..]));
        assert!(!url.redacted.contains("s3cret"), "{}", url.redacted);
    }

    #[test]
    fn the_environment_fills_in_what_the_url_leaves_out() {
        let vars = env(&[
            ("PGHOST", "pg1,pg2"),
            ("PGPORT", "6000,6001"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpass"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
            ("PGCONNECT_TIMEOUT", "7"),
        ]);
        let url = PgUrl::parse_with("postgres://", &vars).unwrap();
        assert_eq!(url.config.get_hosts().len(), 2);
        assert_eq!(url.config.get_ports(), &[6000, 6001]);
        assert_eq!(url.config.get_user(), Some("envuser"));
        assert_eq!(url.config.get_password(), Some(&b"envpass"[..]));
        assert_eq!(url.config.get_dbname(), Some("envdb"));
        assert_eq!(url.ssl_mode, SslMode::Require);
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        // The URL wins over the environment.
        let url =
            PgUrl::parse_with("postgres://urluser:urlpass@h/db?sslmode=disable", &vars).unwrap();
        assert_eq!(url.config.get_user(), Some("urluser"));
        assert_eq!(url.config.get_password(), Some(&b"urlpass"[..]));
        assert_eq!(url.config.get_dbname(), Some("db"));
        assert_eq!(url.ssl_mode, SslMode::Disable);
    }

    #[test]
    fn bad_urls_are_refused_with_what_to_write() {
        let error = |url: &str| {
            format!(
                "{:#}",
                PgUrl::parse_with(url, &env(&[("USER", "me")])).unwrap_err()
            )
        };
        assert!(error("postgres://h/db?sslmode=sometimes").contains("verify-full"));
        assert!(error("postgres://h/db?schema=Bad-Name").contains("schema"));
        assert!(error("postgres://h/db?schema=x%2").contains("%-escape"));
        assert!(error("postgres://h/db?sslcert=/c.pem").contains("client certificates"));
        let unknown = error("postgres://u:pw@h/db?frobnicate=1");
        assert!(unknown.contains("postgres://USER"), "{unknown}");
        assert!(
            !unknown.contains("pw@"),
            "the password is masked: {unknown}"
        );
        assert!(
            PgUrl::parse_with("postgres://h/db", &env(&[]))
                .unwrap_err()
                .to_string()
                .contains("user")
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact("postgres://app:s3cret@h1:5432,h2/db?schema=x"),
            "postgres://app:***@h1:5432,h2/db?schema=x"
        );
        assert_eq!(redact("postgres://app@h/db"), "postgres://app@h/db");
        assert_eq!(
            redact("postgres://h/db?user=a&password=s3cret"),
            "postgres://h/db?user=a&password=***"
        );
    }
}
