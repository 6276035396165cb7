//! Authentication and authorization. Bearer tokens come from the
//! `authorization` metadata; the `--auth` file lists only their SHA-256
//! hashes, each with a principal (the alias it acts as) and its grants. A
//! token is checked against every entry in constant time. Without `--auth`
//! every caller is the open principal, allowed everything. Must not: log or
//! echo tokens, or say more in a denial than which grant is missing.

use std::path::Path;

use glob::Pattern;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{Alias, Credentials, DbName, Error, Result};

/// The prefix of a token hash in the auth file.
const HASH_PREFIX: &str = "sha256:";

/// The `--auth` file, TOML (or JSON if the file name ends in `.json`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default, rename = "token")]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    principal: String,
    hash: String,
    #[serde(default)]
    admin: bool,
    /// May scrape `/metrics` (admins may too).
    #[serde(default)]
    metrics: bool,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    notify: Vec<String>,
}

/// Who is calling and what they may do.
#[derive(Debug)]
pub struct Principal {
    /// `None` for the open principal (no `--auth`).
    name: Option<Alias>,
    /// The hash of the token it was authenticated by (`None`: open).
    token: Option<[u8; 32]>,
    admin: bool,
    metrics: bool,
    read: Vec<Pattern>,
    write: Vec<Pattern>,
    subscribe: Vec<Pattern>,
    notify: Vec<Pattern>,
}

/// Checks callers' tokens.
#[derive(Debug)]
pub enum Auth {
    /// No `--auth`: everyone may do everything.
    Open(std::sync::Arc<Principal>),
    Tokens(Vec<([u8; 32], std::sync::Arc<Principal>)>),
}

/// The hash of a token as it goes into the auth file.
pub fn hash_token(token: &str) -> String {
    format!(
        "{HASH_PREFIX}{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// A new random token: 244 bits from the OS generator, as 64 hex chars.
pub fn generate_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Auth {
    pub fn open() -> Auth {
        let all = vec![Pattern::new("*").expect("a valid pattern")];
        Auth::Open(std::sync::Arc::new(Principal {
            name: None,
            token: None,
            admin: true,
            metrics: true,
            read: all.clone(),
            write: all.clone(),
            subscribe: all.clone(),
            notify: all,
        }))
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Auth::Open(_))
    }

    /// Loads and validates an auth file; errors name the entry and field.
    pub fn load(path: &Path) -> Result<Auth> {
        let bad = |why: String| Error::invalid(format!("auth file {}", path.display()), why);
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: AuthFile = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| bad(e.to_string()))?
        };
        if file.tokens.is_empty() {
            return Err(bad("it lists no [[token]]; add at least one".into()));
        }
        let mut tokens: Vec<([u8; 32], std::sync::Arc<Principal>)> = Vec::new();
        for (i, entry) in file.tokens.into_iter().enumerate() {
            let field = |f: &str| format!("token[{i}].{f}");
            let hash = entry
                .hash
                .strip_prefix(HASH_PREFIX)
                .and_then(|h| hex::decode(h).ok())
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "{}: expected \"sha256:<64 hex>\" as printed by `agsync hash-token`",
                        field("hash")
                    ))
                })?;
            if tokens.iter().any(|(h, _)| *h == hash) {
                return Err(bad(format!(
                    "{}: the same token is listed twice",
                    field("hash")
                )));
            }
            let patterns = |name: &str, list: Vec<String>| -> Result<Vec<Pattern>> {
                list.iter()
                    .map(|p| {
                        Pattern::new(p)
                            .map_err(|e| bad(format!("{}: {p:?} is not a glob: {e}", field(name))))
                    })
                    .collect()
            };
            let principal = Principal {
                token: Some(hash),
                name: Some(
                    Alias::parse(&field("principal"), &entry.principal)
                        .map_err(|e| bad(e.to_string()))?,
                ),
                admin: entry.admin,
                metrics: entry.metrics,
                read: patterns("read", entry.read)?,
                write: patterns("write", entry.write)?,
                subscribe: patterns("subscribe", entry.subscribe)?,
                notify: patterns("notify", entry.notify)?,
            };
            tokens.push((hash, std::sync::Arc::new(principal)));
        }
        Ok(Auth::Tokens(tokens))
    }

    /// The principal behind an `authorization` metadata value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<std::sync::Arc<Principal>> {
        let tokens = match self {
            Auth::Open(p) => return Ok(p.clone()),
            Auth::Tokens(tokens) => tokens,
        };
        let Some(value) = authorization else {
            return Err(Error::Unauthenticated(
                Credentials::Missing,
                "no credentials: send the metadata \"authorization: Bearer <token>\"".into(),
            ));
        };
        // RFC 7235: the scheme is case-insensitive.
        let token = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated(
                    Credentials::Unknown,
                    "malformed authorization metadata: expected \"Bearer <token>\"".into(),
                )
            })?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        find(tokens, &presented).ok_or_else(|| {
            Error::Unauthenticated(
                Credentials::Unknown,
                "unknown token: check it, or ask the administrator for a valid one".into(),
            )
        })
    }

    /// The principal of a token hash now: `None` if the token is no longer
    /// listed. The open mode has no tokens: its principal stays.
    fn principal_for(&self, token: Option<&[u8; 32]>) -> Option<std::sync::Arc<Principal>> {
        match (self, token) {
            (Auth::Open(p), _) => Some(p.clone()),
            (Auth::Tokens(tokens), Some(hash)) => find(tokens, hash),
            (Auth::Tokens(_), None) => None,
        }
    }
}

/// The entry whose hash is `presented`, compared with every entry without
/// stopping at a match (constant time in the position of the match).
fn find(
    tokens: &[([u8; 32], std::sync::Arc<Principal>)],
    presented: &[u8; 32],
) -> Option<std::sync::Arc<Principal>> {
    let mut found = None;
    for (hash, principal) in tokens {
        if bool::from(hash.ct_eq(presented)) {
            found = Some(principal.clone());
        }
    }
    found
}

/// The live auth configuration: what every call is checked against, and
/// what `SIGHUP` reloads. A reload that fails keeps the old configuration.
/// Open streams watch `changes()` and re-check their token on each reload.
#[derive(Debug)]
pub struct Authenticator {
    /// The `--auth` file; `None` in the open mode (nothing to reload).
    path: Option<std::path::PathBuf>,
    current: std::sync::RwLock<std::sync::Arc<Auth>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Authenticator {
    pub fn new(auth: Auth, path: Option<std::path::PathBuf>) -> Authenticator {
        Authenticator {
            path,
            current: std::sync::RwLock::new(std::sync::Arc::new(auth)),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    fn current(&self) -> std::sync::Arc<Auth> {
        // Only whole `Arc`s are stored: a poisoned lock still holds a valid one.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The principal behind an `authorization` metadata value.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<std::sync::Arc<Principal>> {
        self.current().authenticate(authorization)
    }

    /// The same caller under the configuration now in force: its current
    /// grants, or `Revoked` if its token was removed.
    pub fn recheck(&self, principal: &Principal) -> Result<std::sync::Arc<Principal>> {
        self.current()
            .principal_for(principal.token.as_ref())
            .ok_or_else(|| {
                Error::Revoked(
                    "your token was revoked (removed from the server's auth file); get a new one and subscribe again"
                        .into(),
                )
            })
    }

    /// Reads the auth file again. On success the new tokens and grants apply
    /// to every later call and open streams re-check theirs; on failure the
    /// old configuration stays and the error says why.
    pub fn reload(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let auth = Auth::load(path)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(auth);
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Changes on every successful reload.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Principal {
    fn denied(&self, grant: &str, on: &str) -> Error {
        let who = self.name.as_ref().map_or("(open)", Alias::as_str);
        Error::PermissionDenied(format!(
            "principal {who:?} lacks the {grant:?} grant{on}; ask the administrator to add it to its token"
        ))
    }

    fn matches(patterns: &[Pattern], name: &str) -> bool {
        patterns.iter().any(|p| p.matches(name))
    }

    /// Ok if `allowed`, else the denial naming `grant` and what it was for
    /// (built only when denied: this runs on every request).
    fn check(&self, allowed: bool, grant: &str, on: impl FnOnce() -> String) -> Result<()> {
        if allowed {
            Ok(())
        } else {
            Err(self.denied(grant, &on()))
        }
    }

    /// Database create/delete: admins only.
    pub fn require_admin(&self) -> Result<()> {
        self.check(self.admin, "admin", String::new)
    }

    /// Scraping `/metrics`: the `metrics` grant, or admin.
    pub fn require_metrics(&self) -> Result<()> {
        self.check(self.admin || self.metrics, "metrics", String::new)
    }

    // Grants are checked on the names as sent, before they are validated:
    // a caller without the grant learns nothing about the name's validity.

    pub fn require_read(&self, db: &str) -> Result<()> {
        let allowed = self.may_read(db);
        self.check(allowed, "read", || format!(" for database {db:?}"))
    }

    /// Whether the principal may read database `db` (and so see its names,
    /// ids and revisions in notifications).
    pub fn may_read(&self, db: &str) -> bool {
        self.admin || Self::matches(&self.read, db)
    }

    pub fn require_write(&self, db: &str) -> Result<()> {
        let allowed = self.admin || Self::matches(&self.write, db);
        self.check(allowed, "write", || format!(" for database {db:?}"))
    }

    /// Whether ListDatabases shows `db` to this principal.
    pub fn may_see(&self, db: &DbName) -> bool {
        self.admin
            || Self::matches(&self.read, db.as_str())
            || Self::matches(&self.write, db.as_str())
    }

    pub fn require_notify(&self, key: &str) -> Result<()> {
        let allowed = self.admin || Self::matches(&self.notify, key);
        self.check(allowed, "notify", || format!(" for sync key {key:?}"))
    }

    pub fn require_subscribe(&self, key: &str) -> Result<()> {
        let allowed = Self::matches(&self.subscribe, key);
        self.check(allowed, "subscribe", || format!(" for sync key {key:?}"))
    }

    /// The alias a subscriber listens as: its principal's when auth is on
    /// (a different requested alias is refused), else the requested one.
    pub fn listening_alias(&self, requested: Option<Alias>) -> Result<Option<Alias>> {
        match (&self.name, requested) {
            (None, requested) => Ok(requested),
            (Some(name), Some(req)) if req != *name => Err(Error::PermissionDenied(format!(
                "alias {:?} is not yours: a subscriber listens as its token's principal {:?}; leave alias empty or set it to that",
                req.as_str(),
                name.as_str()
            ))),
            (Some(name), _) => Ok(Some(name.clone())),
        }
    }

    /// The key subscriber limits are counted under ("" for the open principal).
    pub fn limit_key(&self) -> &str {
        self.name.as_ref().map_or("", Alias::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Auth> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        std::fs::write(&path, text).unwrap();
        Auth::load(&path)
    }

    #[test]
    fn tokens_and_grants() {
        let auth = load(&format!(
            r#"
[[token]]
principal = "bob"
hash = "{}"
read = ["cars", "cal_*"]
write = ["cars"]
subscribe = ["org.example.*"]
"#,
            hash_token("secret-bob")
        ))
        .unwrap();
        let bob = auth.authenticate(Some(b"Bearer secret-bob")).unwrap();
        assert!(bob.require_read("cal_2024").is_ok());
        assert!(bob.require_write("cal_2024").is_err());
        assert!(bob.require_write("cars").is_ok());
        assert!(bob.require_admin().is_err());
        assert!(bob.require_subscribe("org.example.Cars").is_ok());
        assert!(bob.require_subscribe("com.other").is_err());
        assert!(bob.require_notify("org.example.Cars").is_err());
        // The scheme is case-insensitive (RFC 7235), the token is not.
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let value = format!("{scheme} secret-bob");
            assert!(
                auth.authenticate(Some(value.as_bytes())).is_ok(),
                "{scheme}"
            );
        }
        assert_eq!(bob.listening_alias(None).unwrap().unwrap().as_str(), "bob");
        assert!(bob.listening_alias(Alias::parse("a", "eve").ok()).is_err());
        for bad in [
            None,
            Some(&b"secret-bob"[..]),
            Some(b"Bearer "),
            Some(b"Bearer nope"),
            Some(b"Bearer SECRET-BOB"),
            Some(b"Basic secret-bob"),
        ] {
            assert!(matches!(
                auth.authenticate(bad),
                Err(Error::Unauthenticated(..))
            ));
        }
    }

    #[test]
    fn reload_swaps_tokens_and_revokes_removed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let entry = |principal: &str, token: &str| {
            format!(
                "[[token]]\nprincipal = \"{principal}\"\nhash = \"{}\"\nread = [\"*\"]\n",
                hash_token(token)
            )
        };
        std::fs::write(&path, entry("ann", "t-ann")).unwrap();
        let auth = Authenticator::new(Auth::load(&path).unwrap(), Some(path.clone()));
        let changes = auth.changes();
        let ann = auth.authenticate(Some(b"Bearer t-ann")).unwrap();
        assert!(auth.recheck(&ann).is_ok());

        std::fs::write(&path, entry("ben", "t-ben")).unwrap();
        auth.reload().unwrap();
        assert!(changes.has_changed().unwrap());
        assert!(matches!(auth.recheck(&ann), Err(Error::Revoked(_))));
        assert!(auth.authenticate(Some(b"Bearer t-ann")).is_err());
        assert!(auth.authenticate(Some(b"Bearer t-ben")).is_ok());

        // A file that does not load changes nothing.
        std::fs::write(&path, "not toml [[").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(Some(b"Bearer t-ben")).is_ok());

        // The open mode has nothing to reload; its principal stays.
        let open = Authenticator::new(Auth::open(), None);
        let anyone = open.authenticate(None).unwrap();
        open.reload().unwrap();
        assert!(open.recheck(&anyone).is_ok());
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(load("").is_err());
        assert!(load("[[token]]\nprincipal = \"a\"\nhash = \"md5:00\"\n").is_err());
        let h = hash_token("x");
        assert!(load(&format!("[[token]]\nprincipal = \"a b\"\nhash = \"{h}\"\n")).is_err());
        assert!(
            load(&format!(
                "[[token]]\nprincipal = \"a\"\nhash = \"{h}\"\nreed = []\n"
            ))
            .is_err()
        );
        let twice = format!(
            "[[token]]\nprincipal = \"a\"\nhash = \"{h}\"\n[[token]]\nprincipal = \"b\"\nhash = \"{h}\"\n"
        );
        assert!(
            load(&twice)
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
    }
}
