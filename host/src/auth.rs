//! Optional bearer-token authentication for the HTTP and gRPC APIs.
//!
//! `rehydra run --auth-tokens FILE` reads one `TOKEN PRINCIPAL` pair per line
//! (blank lines and lines starting with `#` are skipped). Every call must
//! then carry `Authorization: Bearer TOKEN`; the token's principal is handed
//! to the plugin in the command's metadata, so a plugin can refuse a caller
//! with `forbidden`. Without the flag nothing is checked, which is why the
//! host binds to loopback by default.
//!
//! Tokens are kept only as SHA-256 digests: a look-up compares digests, so
//! how long a comparison takes says nothing about how much of a guess was
//! right. SIGHUP re-reads the file ([`TokenFile::reload`]), so tokens can be
//! rotated without a restart; a file with errors is refused and the tokens
//! in force stay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::command::validate_id;
use crate::error::CommandError;

/// The shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The caller a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// The tokens a host accepts, each with its principal.
#[derive(Clone)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print tokens, not even their digests.
        write!(f, "Tokens({} principals)", self.by_digest.len())
    }
}

impl Tokens {
    /// Reads a token file; the error names the file and line and says what
    /// to fix.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the token file {} given to --auth-tokens",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("in the token file {}", path.display()))
    }

    /// Parses the text of a token file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut by_digest = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(token), Some(principal), None) = (words.next(), words.next(), words.next())
            else {
                bail!("line {line_no}: expected `TOKEN PRINCIPAL` (two words)");
            };
            if token.len() < MIN_TOKEN_LEN || !token.is_ascii() {
                bail!(
                    "line {line_no}: the token is too short or not ASCII; use at least \
                     {MIN_TOKEN_LEN} random ASCII characters (for example `openssl rand -hex 32`)"
                );
            }
            if let Err(e) = validate_id("principal", principal) {
                bail!("line {line_no}: {e}");
            }
            if by_digest
                .insert(digest(token), principal.to_string())
                .is_some()
            {
                bail!("line {line_no}: this token is already listed on an earlier line");
            }
        }
        if by_digest.is_empty() {
            bail!("no tokens: every call would be refused; add `TOKEN PRINCIPAL` lines");
        }
        Ok(Tokens { by_digest })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are none (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Checks an `Authorization` header (or gRPC metadata) value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, CommandError> {
        let Some(value) = authorization else {
            return Err(CommandError::Unauthenticated(
                "this host requires a token: send `Authorization: Bearer <token>` \
                 (the host's --auth-tokens file lists the tokens)"
                    .into(),
            ));
        };
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                CommandError::Unauthenticated(
                    "the Authorization header must be `Bearer <token>`".into(),
                )
            })?;
        self.by_digest
            .get(&digest(token))
            .map(|p| Principal(p.clone()))
            .ok_or_else(|| CommandError::Unauthenticated("the token is not valid".into()))
    }
}

/// The token file in force: the tokens read from it, swapped whole when it
/// is read again.
pub struct TokenFile {
    path: PathBuf,
    tokens: ArcSwap<Tokens>,
}

impl TokenFile {
    /// Reads the file (see [`Tokens::load`]).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(TokenFile {
            path: path.to_path_buf(),
            tokens: ArcSwap::from_pointee(Tokens::load(path)?),
        })
    }

    /// Reads the file again and, if it is valid, puts its tokens in force;
    /// if not, the tokens in force stay. Returns how many there are now.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let tokens = Tokens::load(&self.path)?;
        let n = tokens.len();
        self.tokens.store(std::sync::Arc::new(tokens));
        Ok(n)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.tokens.load().len()
    }

    /// Whether none are (never true: an empty file is refused).
    pub fn is_empty(&self) -> bool {
        self.tokens.load().is_empty()
    }

    /// [`Tokens::authenticate`] with the tokens in force.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, CommandError> {
        self.tokens.load().authenticate(authorization)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# who may call\n\
        0123456789abcdef-alice alice\n\
        \n\
        fedcba9876543210-bob   bob\n";

    #[test]
    fn a_listed_token_gives_its_principal() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens
                .authenticate(Some("Bearer 0123456789abcdef-alice"))
                .unwrap(),
            Principal("alice".into())
        );
        assert_eq!(
            tokens
                .authenticate(Some("bearer fedcba9876543210-bob"))
                .unwrap(),
            Principal("bob".into())
        );
    }

    #[test]
    fn anything_else_is_unauthenticated() {
        let tokens = Tokens::parse(FILE).unwrap();
        for header in [
            None,
            Some("Bearer nope-nope-nope-nope"),
            Some("Basic 0123456789abcdef-alice"),
            Some("0123456789abcdef-alice"),
            Some("Bearer "),
        ] {
            let e = tokens.authenticate(header).unwrap_err();
            assert_eq!(e.code(), "unauthenticated", "{header:?}");
        }
    }

    #[test]
    fn bad_files_say_which_line_and_what_to_do() {
        let e = |text: &str| format!("{:#}", Tokens::parse(text).unwrap_err());
        assert!(e("short alice").contains("line 1: the token is too short"));
        assert!(e("0123456789abcdef-alice").contains("line 1: expected `TOKEN PRINCIPAL`"));
        assert!(e("0123456789abcdef-alice a b").contains("two words"));
        assert!(
            e("0123456789abcdef-alice a\n0123456789abcdef-alice b")
                .contains("line 2: this token is already listed")
        );
        assert!(e("# nothing\n").contains("no tokens"));
        assert!(e("0123456789abcdef-alice al/ice").contains("line 1:"));
    }

    #[test]
    fn a_reload_swaps_valid_files_in_and_keeps_the_tokens_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "first-token-0123456789 ops\n").unwrap();
        let file = TokenFile::load(&path).unwrap();
        assert!(
            file.authenticate(Some("Bearer first-token-0123456789"))
                .is_ok()
        );
        std::fs::write(&path, "second-token-0123456789 ops\n").unwrap();
        assert_eq!(file.reload().unwrap(), 1);
        assert!(
            file.authenticate(Some("Bearer first-token-0123456789"))
                .is_err()
        );
        assert!(
            file.authenticate(Some("Bearer second-token-0123456789"))
                .is_ok()
        );
        std::fs::write(&path, "short ops\n").unwrap();
        assert!(file.reload().is_err());
        assert!(
            file.authenticate(Some("Bearer second-token-0123456789"))
                .is_ok()
        );
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert_eq!(format!("{tokens:?}"), "Tokens(2 principals)");
    }
}
