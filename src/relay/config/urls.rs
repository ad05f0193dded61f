//! URLs: the Postgres DSN dialects (SQLAlchemy's `postgresql+asyncpg://`, asyncpg's `ssl=`) as sqlx takes
//! them, the credentials written in NATS server URLs, and every URL with its secrets replaced for printing.

use std::fmt;
use std::str::FromStr;

use super::{CacheConfig, Config, ConfigError, DbConfig, NatsConfig};
use crate::relay::refusal;

impl DbConfig {
    /// The URL as sqlx takes it: SQLAlchemy's `+driver` dropped, asyncpg's `ssl=` written as the `sslmode=` it
    /// means, and `sslmode=require` with a root certificate raised to `verify-ca`, as libpq does. Call it on a
    /// validated config.
    pub fn sqlx_url(&self) -> String {
        self.to_sqlx().expect("validate() checks db.url")
    }

    pub(super) fn to_sqlx(&self) -> Result<String, ConfigError> {
        let url = match self.url.split_once("://") {
            Some((scheme, rest)) => {
                let base = scheme.split_once('+').map_or(scheme, |(base, _driver)| base);
                format!("{base}://{rest}")
            }
            None => self.url.clone(),
        };
        let (base, query) = url.split_once('?').unwrap_or((&url, ""));
        // Raw `key=value` text as written; keys and values are compared decoded, as sqlx reads them.
        let mut pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key.to_owned(), value.to_owned())
            })
            .collect();
        let is = |names: &[&str], key: &str| names.contains(&percent_decode(key).as_str());
        if pairs.iter().any(|(key, _)| is(&["sslpassword"], key)) {
            // sqlx cannot read an encrypted key, and would log the unknown parameter with its value.
            return Err(ConfigError::invalid(
                "db.url",
                "sslpassword is not supported: give an unencrypted key in sslkey",
            ));
        }
        // Any other secret under a name sqlx does not read (`passwd`, `PASSWORD`) would be logged by sqlx with
        // its value, and the connection made without it.
        let unread_secret = pairs
            .iter()
            .map(|(key, _)| percent_decode(key))
            .find(|key| is_secret_param(key) && key != "password");
        if let Some(key) = unread_secret {
            return Err(ConfigError::invalid(
                "db.url",
                format!("{key} is not a parameter Postgres reads: give the password as password= or in user:password@"),
            ));
        }
        let asyncpg = pairs.iter().any(|(key, _)| is(&[ASYNCPG_SSL], key));
        if asyncpg && pairs.iter().any(|(key, _)| is(SSLMODE_KEYS, key)) {
            return Err(ConfigError::invalid("db.url", "has both ssl (asyncpg's) and sslmode: keep one"));
        }
        for (key, value) in &mut pairs {
            if is(&[ASYNCPG_SSL], key) {
                let mode = asyncpg_sslmode(&percent_decode(value))
                    .ok_or_else(|| ConfigError::invalid("db.url", ASYNCPG_SSL_VALUES))?;
                (*key, *value) = (SSLMODE_KEYS[0].to_owned(), mode.to_owned());
            }
        }
        // sqlx reads PGSSLMODE and PGSSLROOTCERT under the URL's parameters, as libpq does.
        let last = |names: &[&str]| {
            pairs.iter().rev().find(|(key, _)| is(names, key)).map(|(_, v)| percent_decode(v))
        };
        let mode = last(SSLMODE_KEYS).or_else(|| std::env::var("PGSSLMODE").ok());
        let root_cert = last(SSLROOTCERT_KEYS).or_else(|| std::env::var("PGSSLROOTCERT").ok());
        if mode.is_some_and(|mode| mode.eq_ignore_ascii_case("require"))
            && root_cert.is_some_and(|c| !c.is_empty())
        {
            // libpq verifies the chain under `require` when given a root certificate; sqlx would not.
            pairs.retain(|(key, _)| !is(SSLMODE_KEYS, key));
            pairs.push((SSLMODE_KEYS[0].to_owned(), "verify-ca".to_owned()));
        }
        if pairs.is_empty() {
            return Ok(base.to_owned());
        }
        let query: Vec<String> = pairs.iter().map(|(key, value)| format!("{key}={value}")).collect();
        Ok(format!("{base}?{}", query.join("&")))
    }

    /// Where the relay connects, fit to log: `host:port/database` (or the socket directory), no credentials.
    /// Call it on a validated config.
    pub fn server(&self) -> String {
        let options =
            sqlx::postgres::PgConnectOptions::from_str(&self.sqlx_url()).expect("validate() checks db.url");
        // Without a database in the URL, Postgres takes the user's name.
        let database = options.get_database().unwrap_or_else(|| options.get_username());
        format!("{}/{database}", refusal::postgres_address(&options))
    }
}

/// asyncpg's TLS parameter in a SQLAlchemy URL (`postgresql+asyncpg://…?ssl=require`).
const ASYNCPG_SSL: &str = "ssl";
const ASYNCPG_SSL_VALUES: &str =
    "ssl must be disable, allow, prefer, require, verify-ca, verify-full, true or false (asyncpg's values)";
/// The names sqlx reads the TLS mode and the root certificate under; the first is libpq's.
const SSLMODE_KEYS: &[&str] = &["sslmode", "ssl-mode"];
const SSLROOTCERT_KEYS: &[&str] = &["sslrootcert", "ssl-root-cert", "ssl-ca"];

/// The `sslmode` an asyncpg `ssl=` value means. asyncpg takes `verify_full` for `verify-full`; `true` is its
/// `ssl=True`, a default TLS context that checks the chain and the host name.
fn asyncpg_sslmode(value: &str) -> Option<&'static str> {
    Some(match value.to_ascii_lowercase().replace('_', "-").as_str() {
        "disable" | "false" => "disable",
        "allow" => "allow",
        "prefer" => "prefer",
        "require" => "require",
        "verify-ca" => "verify-ca",
        "verify-full" | "true" => "verify-full",
        _ => return None,
    })
}

impl CacheConfig {
    /// `url` fit to print: its password replaced.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url, LoneUserinfo::User)
    }
}

impl Config {
    /// A copy fit to print: passwords and tokens replaced.
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        copy.db.url = redact_url(&copy.db.url, LoneUserinfo::User);
        copy.cache.url = copy.cache.redacted_url();
        copy.nats.servers = copy.nats.servers.iter().map(|s| redact_url(s, LoneUserinfo::Token)).collect();
        for secret in [&mut copy.nats.password, &mut copy.nats.token] {
            if secret.is_some() {
                *secret = Some(REDACTED.into());
            }
        }
        copy
    }
}

impl NatsConfig {
    /// The server URLs without the credentials written in them, which is what the client gets (it logs server
    /// addresses at debug), and those credentials.
    ///
    /// # Errors
    /// When servers carry different credentials: the client sends one set to every server.
    pub fn servers_and_url_auth(&self) -> Result<(Vec<String>, Option<UrlAuth>), ConfigError> {
        let mut auth: Option<UrlAuth> = None;
        let mut servers = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            let parts = UrlParts::of(server);
            servers.push(format!("{}{}", parts.head, parts.rest));
            let Some(found) = parts.userinfo.filter(|userinfo| !userinfo.is_empty()).map(UrlAuth::parse)
            else {
                continue;
            };
            match &auth {
                Some(seen) if *seen != found => {
                    return Err(ConfigError::invalid(
                        "nats.servers",
                        "servers carry different credentials; the client sends one set to every server",
                    ))
                }
                _ => auth = Some(found),
            }
        }
        Ok((servers, auth))
    }
}

/// Credentials written in a NATS server URL, read as nats-py reads them: `user:password@` is user and password,
/// a lone `token@` a token, each taken as written (not percent-decoded).
#[derive(Clone, PartialEq, Eq)]
pub enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// `nats://token@host`.
    Token(String),
}

impl UrlAuth {
    fn parse(userinfo: &str) -> Self {
        match userinfo.split_once(':') {
            Some((user, password)) => {
                Self::UserPassword { user: user.to_owned(), password: password.to_owned() }
            }
            None => Self::Token(userinfo.to_owned()),
        }
    }
}

impl fmt::Debug for UrlAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}:{REDACTED})"),
            Self::Token(_) => write!(f, "Token({REDACTED})"),
        }
    }
}

const REDACTED: &str = "***";

/// What a lone userinfo (`scheme://name@host`) is: a user name to Postgres and Redis, a token to NATS.
#[derive(Debug, Clone, Copy)]
pub(super) enum LoneUserinfo {
    User,
    Token,
}

/// A URL cut around its userinfo: `head` (`scheme://`, or nothing), `userinfo`, and `rest` from the host on.
struct UrlParts<'a> {
    head: &'a str,
    userinfo: Option<&'a str>,
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> Self {
        let head_len = url.find("://").map_or(0, |at| at + 3);
        let (head, after) = url.split_at(head_len);
        let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
        // The last `@` ends the userinfo, as URL parsers and Python's urlparse read it.
        match after[..authority_len].rfind('@') {
            Some(at) => Self { head, userinfo: Some(&after[..at]), rest: &after[at + 1..] },
            None => Self { head, userinfo: None, rest: after },
        }
    }
}

/// `url` with every secret in it replaced: the userinfo's password (or, where it is one, a lone token), and the
/// values of query parameters that hold a password or token (`password=`, `sslpassword=`, `token=`, …).
/// Everything else is printed as written.
pub(super) fn redact_url(url: &str, lone: LoneUserinfo) -> String {
    let parts = UrlParts::of(url);
    let mut out = parts.head.to_owned();
    match (parts.userinfo, lone) {
        (Some(userinfo), _) if userinfo.contains(':') => {
            let (user, _password) = userinfo.split_once(':').expect("contains ':'");
            out.push_str(&format!("{user}:{REDACTED}@"));
        }
        (Some(token), LoneUserinfo::Token) if !token.is_empty() => out.push_str(&format!("{REDACTED}@")),
        (Some(user), _) => out.push_str(&format!("{user}@")),
        (None, _) => {}
    }
    let (before_fragment, fragment) =
        parts.rest.split_once('#').map_or((parts.rest, None), |(b, f)| (b, Some(f)));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _value)) if is_secret_param(&percent_decode(key)) => {
                        format!("{key}={REDACTED}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&format!("{path}?{}", query.join("&")));
        }
        None => out.push_str(before_fragment),
    }
    if let Some(fragment) = fragment {
        out.push_str(&format!("#{fragment}"));
    }
    out
}

/// Query parameters whose value is a secret: libpq's `password` and `sslpassword`, and tokens, secrets and
/// passwords under any other name. `sslkey`, `sslrootcert` and `passfile` are paths, not secrets.
fn is_secret_param(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    ["password", "passwd", "token", "secret"].iter().any(|suffix| key.ends_with(suffix))
        || key == "pass"
        || key == "pwd"
}

/// URL query text decoded as URL parsers (and so sqlx) decode it: `%XX` escapes and `+` for a space.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = || {
            std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (bytes[at], hex()) {
            (b'%', Some(byte)) => {
                out.push(byte);
                at += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (byte, _) => out.push(byte),
        }
        at += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
// figment's Jail closures return figment::Error, whose size we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn the_database_is_named_without_credentials() {
        let db = |url: &str| DbConfig { url: url.into() }.server();
        assert_eq!(db("postgresql+asyncpg://u:secret@db.internal:5433/orders"), "db.internal:5433/orders");
        assert_eq!(db("postgres://relay@10.0.0.5/"), "10.0.0.5:5432/relay");
    }

    #[test]
    fn urls_are_redacted() {
        let user = |url| redact_url(url, LoneUserinfo::User);
        assert_eq!(user("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(user("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(user("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("nats://tok@h:4222", LoneUserinfo::Token), "nats://***@h:4222");
        assert_eq!(
            redact_url("u:pw@h:4222", LoneUserinfo::Token),
            "u:***@h:4222",
            "no scheme, as NATS allows"
        );
    }

    #[test]
    fn a_user_alone_is_no_secret_to_postgres_and_redis() {
        assert_eq!(
            redact_url("postgres://relay@db:5432/qx", LoneUserinfo::User),
            "postgres://relay@db:5432/qx"
        );
        assert_eq!(redact_url("redis://relay@h:6379/0", LoneUserinfo::User), "redis://relay@h:6379/0");
    }

    #[test]
    fn secret_query_parameters_are_redacted_and_only_those() {
        let user = |url| redact_url(url, LoneUserinfo::User);
        assert_eq!(
            user("postgres:///qx?host=/run/pg&password=pw&sslmode=verify-full"),
            "postgres:///qx?host=/run/pg&password=***&sslmode=verify-full"
        );
        assert_eq!(
            user("postgresql+asyncpg://u@h/qx?sslkey=/k.pem&sslpassword=kp&sslrootcert=/ca.pem"),
            "postgresql+asyncpg://u@h/qx?sslkey=/k.pem&sslpassword=***&sslrootcert=/ca.pem"
        );
        assert_eq!(
            user("redis://h/0?auth_token=t&Client-Secret=s&db=1"),
            "redis://h/0?auth_token=***&Client-Secret=***&db=1"
        );
        assert_eq!(
            user("postgres://h/qx?pass%77ord=pw"),
            "postgres://h/qx?pass%77ord=***",
            "decoded as sqlx reads it"
        );
        assert_eq!(user("postgres://u:pw@h/qx?password=pw2#x"), "postgres://u:***@h/qx?password=***#x");
        assert_eq!(user("postgres://h/qx?passfile=/p&user=u"), "postgres://h/qx?passfile=/p&user=u");
    }

    #[test]
    fn printed_config_hides_every_secret() {
        let mut config = Config::default();
        config.db.url = "postgres:///qx?host=127.0.0.1&user=relay&password=dbpw".into();
        config.cache.url = "redis://:cachepw@h:6379/0".into();
        config.nats.servers = vec!["nats://u:natspw@a:4222".into(), "nats://natstoken@b:4222".into()];
        config.nats.user = Some("u".into());
        config.nats.password = Some("optpw".into());
        config.nats.token = Some("opttoken".into());
        let text = toml::to_string(&config.redacted()).unwrap();
        for secret in ["dbpw", "cachepw", "natspw", "natstoken", "optpw", "opttoken"] {
            assert!(!text.contains(secret), "{secret} printed:\n{text}");
        }
        assert!(text.contains("user=relay"), "a user is no secret:\n{text}");
    }

    #[test]
    fn nats_url_credentials_are_taken_out_of_the_servers() {
        let nats = |servers: &[&str]| NatsConfig {
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            ..NatsConfig::default()
        };
        let (servers, auth) = nats(&["nats://u:p@ss@a:4222", "b:4222"]).servers_and_url_auth().unwrap();
        assert_eq!(servers, ["nats://a:4222", "b:4222"]);
        assert_eq!(auth, Some(UrlAuth::UserPassword { user: "u".into(), password: "p@ss".into() }));
        let (servers, auth) = nats(&["tls://t0k%40@a:4222/"]).servers_and_url_auth().unwrap();
        assert_eq!(servers, ["tls://a:4222/"]);
        assert_eq!(auth, Some(UrlAuth::Token("t0k%40".into())), "as written, as nats-py sends it");
        assert_eq!(nats(&["nats://a:4222"]).servers_and_url_auth().unwrap().1, None);
        assert!(nats(&["nats://x@a:4222", "nats://y@b:4222"]).servers_and_url_auth().is_err());
        assert!(!format!("{auth:?}").contains("t0k"), "Debug hides the token");
    }

    fn sqlx_url(url: &str) -> Result<String, ConfigError> {
        DbConfig { url: url.into() }.to_sqlx()
    }

    #[test]
    fn asyncpgs_ssl_parameter_becomes_sslmode() {
        Jail::expect_with(|_| {
            let cases = [
                ("postgresql+asyncpg://u@h/qx?ssl=verify-full", "postgresql://u@h/qx?sslmode=verify-full"),
                ("postgresql+asyncpg://u@h/qx?ssl=require&x=1", "postgresql://u@h/qx?sslmode=require&x=1"),
                ("postgresql+asyncpg://u@h/qx?ssl=verify_ca", "postgresql://u@h/qx?sslmode=verify-ca"),
                ("postgresql+asyncpg://u@h/qx?ssl=true", "postgresql://u@h/qx?sslmode=verify-full"),
                ("postgresql+asyncpg://u@h/qx?ssl=false", "postgresql://u@h/qx?sslmode=disable"),
                ("postgresql+asyncpg://u@h/qx", "postgresql://u@h/qx"),
            ];
            for (url, expected) in cases {
                assert_eq!(sqlx_url(url).unwrap(), expected);
            }
            assert_eq!(sqlx_url("postgresql+asyncpg://u@h/qx?ssl=maybe").unwrap_err().key, "db.url");
            assert!(
                sqlx_url("postgresql+asyncpg://u@h/qx?ssl=require&sslmode=disable").is_err(),
                "ambiguous"
            );
            Ok(())
        });
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_in_libpq() {
        Jail::expect_with(|jail| {
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require&sslrootcert=/ca.pem").unwrap(),
                "postgres://u@h/qx?sslrootcert=/ca.pem&sslmode=verify-ca"
            );
            assert_eq!(
                sqlx_url("postgresql+asyncpg://u@h/qx?ssl=require&sslrootcert=/ca.pem").unwrap(),
                "postgresql://u@h/qx?sslrootcert=/ca.pem&sslmode=verify-ca"
            );
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require").unwrap(),
                "postgres://u@h/qx?sslmode=require"
            );
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=verify-full&sslrootcert=/ca.pem").unwrap(),
                "postgres://u@h/qx?sslmode=verify-full&sslrootcert=/ca.pem"
            );
            jail.set_env("PGSSLROOTCERT", "/ca.pem");
            assert_eq!(
                sqlx_url("postgres://u@h/qx?sslmode=require").unwrap(),
                "postgres://u@h/qx?sslmode=verify-ca"
            );
            jail.set_env("PGSSLMODE", "require");
            assert_eq!(sqlx_url("postgres://u@h/qx").unwrap(), "postgres://u@h/qx?sslmode=verify-ca");
            Ok(())
        });
    }

    #[test]
    fn an_encrypted_key_password_is_refused_rather_than_logged() {
        assert_eq!(sqlx_url("postgres://u@h/qx?sslkey=/k&sslpassword=x").unwrap_err().key, "db.url");
    }

    #[test]
    fn a_secret_under_a_name_postgres_does_not_read_is_refused_without_its_value() {
        for url in [
            "postgres://u@h/qx?passwd=s3cr3t",
            "postgres://u@h/qx?PASSWORD=s3cr3t",
            "postgres://u@h/qx?pass%77d=s3cr3t",
        ] {
            let err = sqlx_url(url).unwrap_err();
            assert_eq!(err.key, "db.url");
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
            assert!(err.to_string().contains("not a parameter Postgres reads"), "{err}");
        }
        assert!(sqlx_url("postgres://u@h/qx?password=s3cr3t").is_ok());
    }
}
