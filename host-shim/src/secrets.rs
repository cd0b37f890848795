//! Secrets bundles at rest: one age-encrypted file per bundle under
//! `<state>/secrets/bundles/`, to an X25519 identity created on first use
//! (`<state>/secrets/identity.txt`, mode 0600). Plaintext exists only in memory, in
//! zeroizing buffers, and only while a bundle is changed or delivered.
//!
//! What a bundle holds (names, kinds, sizes) is read from the bundle itself: a second
//! copy in the database could disagree with the file it describes.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use age::secrecy::ExposeSecret;
use agentlab_protocol::{SecretBundle, SecretEntry, SecretError, SecretKind};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Errors of the secrets store. Each says what to do.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SecretsError {
    /// invalid bundle name {0:?}: use 1 to 63 of a-z, 0-9, '-', '_' and '.', starting with a letter or digit
    BadBundleName(String),
    /// {0}
    Invalid(#[from] SecretError),
    /// no secrets bundle named {0:?}; create it with `agentlab secrets set --bundle {0} --env NAME`
    NoBundle(String),
    /// bundle {bundle:?} has no {kind} secret named {name:?}
    NoEntry { bundle: String, kind: &'static str, name: String },
    /// the secrets identity {path} is missing, so bundle {bundle:?} cannot be decrypted; restore the identity file from backup, or remove the bundle and set its secrets again
    IdentityMissing { path: String, bundle: String },
    /// the secrets identity {path} is unreadable: {reason}
    BadIdentity { path: String, reason: String },
    /// cannot decrypt bundle {bundle:?} ({path}): {reason}; it was written with another identity or is damaged
    Decrypt { bundle: String, path: String, reason: String },
    /// cannot encrypt bundle {bundle:?}: {reason}
    Encrypt { bundle: String, reason: String },
    /// {context}: {source}
    Io { context: String, source: std::io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SecretsError {
    let context = context.into();
    move |source| SecretsError::Io { context, source }
}

/// One entry as shown to an operator: never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    pub kind: SecretKind,
    pub name: String,
    pub bytes: usize,
}

/// A bundle as shown to an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleView {
    pub name: String,
    pub entries: Vec<EntryView>,
    pub modified_at_ms: i64,
}

/// Largest bundle file read back (ciphertext): the plaintext cap plus age's overhead.
const MAX_BUNDLE_FILE: u64 = 2 * 1024 * 1024;

#[derive(Clone)]
pub struct SecretStore {
    dir: PathBuf,
    /// Held across each read-modify-write of a bundle (and the identity's creation):
    /// two requests at once must not lose an entry.
    writing: Arc<Mutex<()>>,
}

pub fn check_bundle_name(name: &str) -> Result<(), SecretsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok { Ok(()) } else { Err(SecretsError::BadBundleName(name.to_owned())) }
}

impl SecretStore {
    /// A store under `dir` (created, mode 0700, on first write).
    pub fn new(dir: &Path) -> SecretStore {
        SecretStore { dir: dir.to_owned(), writing: Arc::default() }
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.txt")
    }

    fn bundles_dir(&self) -> PathBuf {
        self.dir.join("bundles")
    }

    fn bundle_path(&self, name: &str) -> PathBuf {
        self.bundles_dir().join(format!("{name}.age"))
    }

    fn ensure_dirs(&self) -> Result<(), SecretsError> {
        for dir in [&self.dir, &self.bundles_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(format!("creating {}", dir.display())))?;
        }
        Ok(())
    }

    /// The identity, created (mode 0600) if there is none yet and `create` is set.
    fn identity(&self, create: bool, bundle: &str) -> Result<age::x25519::Identity, SecretsError> {
        let path = self.identity_path();
        let shown = path.display().to_string();
        match std::fs::File::open(&path) {
            Ok(file) => {
                let mut text = Zeroizing::new(String::with_capacity(128));
                file.take(4096).read_to_string(&mut text).map_err(io_err(format!("reading {shown}")))?;
                let key = text.lines().find(|l| l.starts_with("AGE-SECRET-KEY-")).unwrap_or_default();
                age::x25519::Identity::from_str(key)
                    .map_err(|reason| SecretsError::BadIdentity { path: shown, reason: reason.to_owned() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                self.ensure_dirs()?;
                let identity = age::x25519::Identity::generate();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(format!("creating {shown}")))?;
                let text = Zeroizing::new(format!(
                    "# agentlabd secrets identity: decrypts every bundle in bundles/. Keep it with backups of them.\n# public key: {}\n{}\n",
                    identity.to_public(),
                    identity.to_string().expose_secret()
                ));
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(format!("writing {shown}")))?;
                Ok(identity)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretsError::IdentityMissing { path: shown, bundle: bundle.to_owned() })
            }
            Err(e) => Err(SecretsError::Io { context: format!("opening {shown}"), source: e }),
        }
    }

    /// Decrypts a bundle into memory; `Ok(None)` if there is no such bundle.
    pub fn load(&self, name: &str) -> Result<Option<SecretBundle>, SecretsError> {
        check_bundle_name(name)?;
        let path = self.bundle_path(name);
        let ciphertext = match std::fs::File::open(&path) {
            Ok(file) => {
                let mut bytes = Vec::new();
                file.take(MAX_BUNDLE_FILE)
                    .read_to_end(&mut bytes)
                    .map_err(io_err(format!("reading {}", path.display())))?;
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SecretsError::Io { context: format!("opening {}", path.display()), source: e }),
        };
        let identity = self.identity(false, name)?;
        let decrypt_err = |reason: String| SecretsError::Decrypt {
            bundle: name.to_owned(),
            path: path.display().to_string(),
            reason,
        };
        let decryptor = age::Decryptor::new(&ciphertext[..]).map_err(|e| decrypt_err(e.to_string()))?;
        let mut reader = decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .map_err(|e| decrypt_err(e.to_string()))?;
        // The plaintext is never longer than the ciphertext: one allocation, no regrowth.
        let mut plaintext = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
        reader.read_to_end(&mut plaintext).map_err(|e| decrypt_err(e.to_string()))?;
        let bundle: SecretBundle =
            agentlab_protocol::decode_message(&plaintext).map_err(|e| decrypt_err(e.to_string()))?;
        bundle.validate()?;
        Ok(Some(bundle))
    }

    /// Encrypts `bundle` and replaces its file atomically.
    fn save(&self, bundle: &SecretBundle) -> Result<(), SecretsError> {
        bundle.validate()?;
        let identity = self.identity(true, &bundle.name)?;
        let encrypt_err = |reason: String| SecretsError::Encrypt { bundle: bundle.name.clone(), reason };
        let plaintext =
            Zeroizing::new(agentlab_protocol::encode_message(bundle).map_err(|e| encrypt_err(e.to_string()))?);
        // encode_message prefixes the frame length; the file holds the payload alone.
        let payload = &plaintext[4..];
        let recipient = identity.to_public();
        let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .map_err(|e| encrypt_err(e.to_string()))?;
        let mut ciphertext = Vec::with_capacity(payload.len() + 256);
        let mut writer = encryptor.wrap_output(&mut ciphertext).map_err(|e| encrypt_err(e.to_string()))?;
        writer.write_all(payload).and_then(|()| writer.finish().map(drop)).map_err(|e| encrypt_err(e.to_string()))?;

        self.ensure_dirs()?;
        let path = self.bundle_path(&bundle.name);
        let tmp = self.bundles_dir().join(format!(".{}.age.tmp-{}", bundle.name, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&ciphertext).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::File::open(self.bundles_dir()).and_then(|d| d.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(SecretsError::Io { context: format!("writing {}", path.display()), source: e });
        }
        Ok(())
    }

    /// Adds or replaces one entry of a bundle (creating the bundle).
    pub fn set(&self, bundle: &str, entry: SecretEntry) -> Result<BundleView, SecretsError> {
        check_bundle_name(bundle)?;
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        entry.validate()?;
        let mut contents =
            self.load(bundle)?.unwrap_or_else(|| SecretBundle { name: bundle.to_owned(), entries: Vec::new() });
        let same_slot =
            |e: &SecretEntry| e.name == entry.name && (e.kind == SecretKind::File) == (entry.kind == SecretKind::File);
        contents.entries.retain(|e| !same_slot(e));
        contents.entries.push(entry);
        contents.entries.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        self.save(&contents)?;
        self.view(&contents)
    }

    /// Removes one entry (the bundle stays, possibly empty) or, with no entry, the bundle.
    pub fn remove(&self, bundle: &str, entry: Option<(SecretKind, &str)>) -> Result<Option<BundleView>, SecretsError> {
        check_bundle_name(bundle)?;
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((kind, name)) = entry else {
            return match std::fs::remove_file(self.bundle_path(bundle)) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SecretsError::NoBundle(bundle.to_owned())),
                Err(e) => Err(SecretsError::Io { context: format!("removing bundle {bundle}"), source: e }),
            };
        };
        let mut contents = self.load(bundle)?.ok_or_else(|| SecretsError::NoBundle(bundle.to_owned()))?;
        let before = contents.entries.len();
        contents.entries.retain(|e| !(e.kind == kind && e.name == name));
        if contents.entries.len() == before {
            return Err(SecretsError::NoEntry {
                bundle: bundle.to_owned(),
                kind: kind.as_str(),
                name: name.to_owned(),
            });
        }
        self.save(&contents)?;
        self.view(&contents).map(Some)
    }

    pub fn show(&self, bundle: &str) -> Result<BundleView, SecretsError> {
        let contents = self.load(bundle)?.ok_or_else(|| SecretsError::NoBundle(bundle.to_owned()))?;
        self.view(&contents)
    }

    /// Every bundle, by name.
    pub fn list(&self) -> Result<Vec<BundleView>, SecretsError> {
        let dir = self.bundles_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SecretsError::Io { context: format!("listing {}", dir.display()), source: e }),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".age")).map(str::to_owned))
            .filter(|n| check_bundle_name(n).is_ok())
            .collect();
        names.sort();
        names.iter().map(|n| self.show(n)).collect()
    }

    fn view(&self, bundle: &SecretBundle) -> Result<BundleView, SecretsError> {
        let path = self.bundle_path(&bundle.name);
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(io_err(format!("reading {}", path.display())))?;
        let modified_at_ms = modified
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Ok(BundleView {
            name: bundle.name.clone(),
            entries: bundle
                .entries
                .iter()
                .map(|e| EntryView { kind: e.kind, name: e.name.clone(), bytes: e.value.len() })
                .collect(),
            modified_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt;

    use agentlab_protocol::SecretBytes;

    use super::*;

    fn entry(kind: SecretKind, name: &str, value: &[u8]) -> SecretEntry {
        SecretEntry { kind, name: name.into(), value: SecretBytes::copy_from(value) }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn bundles_are_encrypted_at_rest_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(&dir.path().join("secrets"));
        assert_eq!(store.load("default").unwrap(), None);
        let value = b"sk-ant-api03-VERY-SECRET-VALUE";
        store.set("default", entry(SecretKind::Env, "ANTHROPIC_API_KEY", value)).unwrap();
        let view = store.set("default", entry(SecretKind::File, "settings.json", b"{\"theme\":\"dark\"}")).unwrap();
        assert_eq!(
            view.entries,
            vec![
                EntryView { kind: SecretKind::Env, name: "ANTHROPIC_API_KEY".into(), bytes: value.len() },
                EntryView { kind: SecretKind::File, name: "settings.json".into(), bytes: 16 },
            ]
        );
        assert_eq!(mode(&store.identity_path()), 0o600);
        assert_eq!(mode(&dir.path().join("secrets")), 0o700);
        let file = store.bundle_path("default");
        assert_eq!(mode(&file), 0o600);
        let raw = std::fs::read(&file).unwrap();
        assert!(raw.starts_with(b"age-encryption.org/v1\n"), "not an age file");
        assert!(!raw.windows(value.len()).any(|w| w == value), "plaintext on disk");
        assert!(!raw.windows(8).any(|w| w == b"settings"), "entry names on disk in the clear");

        let loaded = store.load("default").unwrap().unwrap();
        assert_eq!(loaded.entries[0].value.expose(), value);
        // A new value for the same name replaces it.
        store.set("default", entry(SecretKind::Env, "ANTHROPIC_API_KEY", b"rotated-key")).unwrap();
        assert_eq!(store.load("default").unwrap().unwrap().entries[0].value.expose(), b"rotated-key");
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn removal_and_bad_input_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        assert_eq!(
            store.set("Bad/Name", entry(SecretKind::Env, "A", b"x")).unwrap_err().to_string(),
            "invalid bundle name \"Bad/Name\": use 1 to 63 of a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
        );
        assert!(matches!(store.set("b", entry(SecretKind::Env, "LD_PRELOAD", b"x")), Err(SecretsError::Invalid(_))));
        store.set("b", entry(SecretKind::GitToken, "GIT_TOKEN", b"ghp_123")).unwrap();
        assert_eq!(
            store.remove("b", Some((SecretKind::Env, "NOPE"))).unwrap_err().to_string(),
            "bundle \"b\" has no env secret named \"NOPE\""
        );
        let left = store.remove("b", Some((SecretKind::GitToken, "GIT_TOKEN"))).unwrap().unwrap();
        assert!(left.entries.is_empty());
        assert_eq!(store.remove("b", None).unwrap(), None);
        assert_eq!(
            store.show("b").unwrap_err().to_string(),
            "no secrets bundle named \"b\"; create it with `agentlab secrets set --bundle b --env NAME`"
        );
    }

    #[test]
    fn a_lost_identity_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let store = SecretStore::new(dir.path());
        store.set("b", entry(SecretKind::Env, "A", b"value-1")).unwrap();
        std::fs::remove_file(store.identity_path()).unwrap();
        let err = store.load("b").unwrap_err().to_string();
        assert!(
            err.starts_with("the secrets identity ") && err.contains("is missing, so bundle \"b\" cannot be decrypted"),
            "{err}"
        );
        // A new identity cannot read the old bundle, and says so.
        store.set("other", entry(SecretKind::Env, "A", b"value-2")).unwrap();
        let err = store.load("b").unwrap_err().to_string();
        assert!(err.starts_with("cannot decrypt bundle \"b\""), "{err}");
    }
}
