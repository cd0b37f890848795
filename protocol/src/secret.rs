//! Secret values on the wire: wiped from memory when dropped, never printed, and
//! checked by one set of rules on both sides (what the host accepts into a bundle is
//! exactly what the guest accepts off the channel).

use std::fmt;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Most entries a bundle holds.
pub const MAX_SECRET_ENTRIES: usize = 64;
/// Largest single value: 64 KiB (an API key, a token, a settings file).
pub const MAX_SECRET_VALUE: usize = 64 * 1024;
/// Largest bundle, all values together: 512 KiB, well inside one frame.
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024;
/// Longest entry name.
pub const MAX_SECRET_NAME: usize = 128;
/// The environment variable a git token becomes in the job.
pub const GIT_TOKEN_ENV: &str = "GIT_TOKEN";

/// Bytes that are zeroed when dropped and never shown by `Debug`.
///
/// Serialised as one postcard byte string and deserialised into a single allocation of
/// exactly its length, so no growing buffer leaves a stale copy behind.
#[derive(Clone, PartialEq, Eq, Default, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes ownership of `value`; its buffer is wiped when this is dropped.
    pub fn new(value: Vec<u8>) -> Self {
        SecretBytes(value)
    }

    /// Copies `value` into a buffer of exactly its length.
    pub fn copy_from(value: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(value.len());
        bytes.extend_from_slice(value);
        SecretBytes(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED, {} bytes])", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(SecretVisitor)
    }
}

struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = SecretBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of at most {MAX_SECRET_VALUE} bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<SecretBytes, E> {
        if v.len() > MAX_SECRET_VALUE {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(SecretBytes::copy_from(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<SecretBytes, E> {
        Ok(SecretBytes::new(v))
    }

    // Self-describing formats (JSON) send a sequence.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretBytes, A::Error> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_SECRET_VALUE)));
        while let Some(b) = seq.next_element::<u8>()? {
            if bytes.len() == MAX_SECRET_VALUE {
                return Err(serde::de::Error::invalid_length(MAX_SECRET_VALUE + 1, &self));
            }
            bytes.push(b);
        }
        Ok(SecretBytes::copy_from(&bytes))
    }
}

/// How the guest hands an entry to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// An environment variable of the job.
    Env,
    /// A file in the secrets tmpfs (readable by the job only if its profile allows).
    File,
    /// The token used for git over HTTPS; the job sees it as `GIT_TOKEN`.
    GitToken,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Env => "env",
            SecretKind::File => "file",
            SecretKind::GitToken => "git-token",
        }
    }
}

/// One named secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretEntry {
    pub kind: SecretKind,
    /// Variable name (env), file name (file), or [`GIT_TOKEN_ENV`] (git-token).
    pub name: String,
    pub value: SecretBytes,
}

/// Everything a job gets, delivered once per sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretBundle {
    /// The bundle's name on the host, for the record (empty if the job has none).
    pub name: String,
    pub entries: Vec<SecretEntry>,
}

/// Why an entry or bundle is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum SecretError {
    /// secret name {name:?} is not a valid {kind} name: {rule}
    BadName { kind: &'static str, name: String, rule: &'static str },
    /// secret {name}: the value is empty; a secret needs at least one byte
    Empty { name: String },
    /// secret {name}: the value is {len} bytes, over the 65536-byte limit
    TooLarge { name: String, len: usize },
    /// the bundle holds {count} entries, over the limit of 64: split it into several bundles
    TooMany { count: usize },
    /// the bundle's values total {total} bytes, over the 524288-byte limit
    BundleTooLarge { total: usize },
    /// the bundle has {name} twice
    Duplicate { name: String },
}

/// Environment variables a secret may not set: the agent sets them itself, or they
/// change how every program in the job loads code.
const RESERVED_ENV: &[&str] = &["PATH", "HOME", "LANG", "USER", "LOGNAME", "TMPDIR", "SHELL", "IFS", "BASH_ENV", "ENV"];

impl SecretKind {
    /// Checks that `name` is a valid name for a secret of this kind.
    pub fn validate_name(self, name: &str) -> Result<(), SecretError> {
        let bad = |rule: &'static str| SecretError::BadName { kind: self.as_str(), name: name.to_owned(), rule };
        if name.is_empty() || name.len() > MAX_SECRET_NAME {
            return Err(bad("it must be 1 to 128 characters"));
        }
        match self {
            SecretKind::Env => {
                let mut chars = name.chars();
                let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
                if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad("use letters, digits and _, not starting with a digit"));
                }
                if RESERVED_ENV.contains(&name) || name.starts_with("LD_") || name.starts_with("AGENTLAB_") {
                    return Err(bad(
                        "PATH, HOME, LANG, USER, LOGNAME, TMPDIR, SHELL, IFS, BASH_ENV, ENV, LD_* and AGENTLAB_* are reserved",
                    ));
                }
            }
            SecretKind::File => {
                if name.starts_with('.')
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    return Err(bad("use letters, digits, '.', '_' and '-', not starting with '.'"));
                }
            }
            SecretKind::GitToken => {
                if name != GIT_TOKEN_ENV {
                    return Err(bad("a git token is always named GIT_TOKEN"));
                }
            }
        }
        Ok(())
    }
}

impl SecretEntry {
    /// Checks the name for its kind and the value's size.
    pub fn validate(&self) -> Result<(), SecretError> {
        self.kind.validate_name(&self.name)?;
        if self.value.is_empty() {
            return Err(SecretError::Empty { name: self.name.clone() });
        }
        if self.value.len() > MAX_SECRET_VALUE {
            return Err(SecretError::TooLarge { name: self.name.clone(), len: self.value.len() });
        }
        Ok(())
    }
}

impl SecretBundle {
    /// Checks every entry, the counts and sizes, and that no name repeats (an env
    /// variable and a git token share the environment's namespace).
    pub fn validate(&self) -> Result<(), SecretError> {
        if self.entries.len() > MAX_SECRET_ENTRIES {
            return Err(SecretError::TooMany { count: self.entries.len() });
        }
        let mut total = 0usize;
        let mut seen = std::collections::HashSet::new();
        for entry in &self.entries {
            entry.validate()?;
            total += entry.value.len();
            let namespace = if entry.kind == SecretKind::File { "file" } else { "env" };
            if !seen.insert((namespace, entry.name.as_str())) {
                return Err(SecretError::Duplicate { name: entry.name.clone() });
            }
        }
        if total > MAX_BUNDLE_BYTES {
            return Err(SecretError::BundleTooLarge { total });
        }
        Ok(())
    }

    /// The values, for a redactor.
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|e| e.value.expose())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn entry(kind: SecretKind, name: &str, value: &[u8]) -> SecretEntry {
        SecretEntry { kind, name: name.into(), value: SecretBytes::copy_from(value) }
    }

    #[test]
    fn debug_never_shows_the_value() {
        let e = entry(SecretKind::Env, "API_KEY", b"sk-live-123456");
        let shown = format!("{e:?}");
        assert!(!shown.contains("sk-live"), "{shown}");
        assert!(shown.contains("[REDACTED, 14 bytes]"), "{shown}");
    }

    #[test]
    fn names_follow_their_kind() {
        assert!(entry(SecretKind::Env, "ANTHROPIC_API_KEY", b"x").validate().is_ok());
        assert!(entry(SecretKind::File, "settings.json", b"{}").validate().is_ok());
        assert!(entry(SecretKind::GitToken, "GIT_TOKEN", b"t").validate().is_ok());
        for (kind, name) in [
            (SecretKind::Env, "1ABC"),
            (SecretKind::Env, "A-B"),
            (SecretKind::Env, "LD_PRELOAD"),
            (SecretKind::Env, "PATH"),
            (SecretKind::Env, "AGENTLAB_SANDBOX_POLICY"),
            (SecretKind::File, "../etc/passwd"),
            (SecretKind::File, ".hidden"),
            (SecretKind::File, "a/b"),
            (SecretKind::GitToken, "TOKEN"),
        ] {
            let err = entry(kind, name, b"x").validate().unwrap_err();
            assert!(matches!(err, SecretError::BadName { .. }), "{name}: {err}");
        }
        assert_eq!(
            entry(SecretKind::Env, "LD_PRELOAD", b"x").validate().unwrap_err().to_string(),
            "secret name \"LD_PRELOAD\" is not a valid env name: PATH, HOME, LANG, USER, LOGNAME, TMPDIR, SHELL, IFS, BASH_ENV, ENV, LD_* and AGENTLAB_* are reserved"
        );
    }

    #[test]
    fn sizes_and_duplicates_are_bounded() {
        let big = vec![b'a'; MAX_SECRET_VALUE + 1];
        assert!(matches!(entry(SecretKind::Env, "A", &big).validate(), Err(SecretError::TooLarge { .. })));
        assert!(matches!(entry(SecretKind::Env, "A", b"").validate(), Err(SecretError::Empty { .. })));
        let dup = SecretBundle {
            name: "b".into(),
            entries: vec![entry(SecretKind::Env, "GIT_TOKEN", b"1"), entry(SecretKind::GitToken, "GIT_TOKEN", b"2")],
        };
        assert_eq!(dup.validate().unwrap_err(), SecretError::Duplicate { name: "GIT_TOKEN".into() });
        let many = SecretBundle {
            name: "b".into(),
            entries: (0..=MAX_SECRET_ENTRIES).map(|i| entry(SecretKind::Env, &format!("V{i}"), b"1")).collect(),
        };
        assert!(matches!(many.validate(), Err(SecretError::TooMany { count: 65 })));
    }

    #[test]
    fn values_round_trip_through_postcard_as_one_byte_string() {
        let bundle =
            SecretBundle { name: "b".into(), entries: vec![entry(SecretKind::File, "key.pem", b"-----BEGIN")] };
        let bytes = postcard::to_stdvec(&bundle).unwrap();
        let back: SecretBundle = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(back.entries[0].value.expose().len(), back.entries[0].value.0.capacity());
    }
}
