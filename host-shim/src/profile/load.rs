//! Reading and validating profile files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::model::{NetworkMode, Profile};

/// Why profiles could not be loaded.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProfileError {
    /// cannot read {path}: {source}
    Read { path: String, source: std::io::Error },
    /// {0}
    Invalid(Box<FieldProblem>),
    /// profile {name} is defined twice: in {first} and in {second}
    Duplicate { name: String, first: String, second: String },
    /// {0}
    Several(SeveralErrors),
}

/// One bad value, located as precisely as the YAML allows.
#[derive(Debug)]
pub struct FieldProblem {
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// `, line N` when known.
    pub line: String,
    /// Dotted path, like `sandbox.rlimits.nofile`.
    pub field: String,
    pub message: String,
    /// `; did you mean ...?` when a likely spelling exists.
    pub suggestion: String,
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let FieldProblem { file, document, line, field, message, suggestion } = self;
        write!(f, "{file}, document {document}{line}: {field}: {message}{suggestion}")
    }
}

/// More than one problem, one per line.
#[derive(Debug)]
pub struct SeveralErrors(pub Vec<ProfileError>);

impl std::fmt::Display for SeveralErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} problems in the profiles:", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Loaded profiles by name, each with the file it came from.
#[derive(Clone, Debug, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, (Profile, PathBuf)>,
}

impl ProfileSet {
    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name).map(|(p, _)| p)
    }

    pub fn source(&self, name: &str) -> Option<&Path> {
        self.profiles.get(name).map(|(_, f)| f.as_path())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values().map(|(p, _)| p)
    }

    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// The error for an unknown profile name: what exists, and what was probably meant.
    pub fn unknown(&self, name: &str) -> String {
        let known: Vec<&str> = self.names().collect();
        let hint = closest(name, &known).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
        if known.is_empty() {
            format!("no profile named `{name}`: no profiles are loaded (see agentlabd --profiles-dir)")
        } else {
            format!("no profile named `{name}`{hint} (known: {})", known.join(", "))
        }
    }
}

/// Loads every `*.yaml` / `*.yml` file of `dir`, in name order. All or nothing.
pub fn load_dir(dir: &Path) -> Result<ProfileSet, ProfileError> {
    let read_err = |source| ProfileError::Read { path: dir.display().to_string(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml") && p.is_file())
        .collect();
    files.sort();
    let mut set = ProfileSet::default();
    let mut errors = Vec::new();
    for file in files {
        match load_file(&file) {
            Ok(profiles) => {
                for profile in profiles {
                    if let Some((_, first)) = set.profiles.get(&profile.name) {
                        errors.push(ProfileError::Duplicate {
                            name: profile.name.clone(),
                            first: first.display().to_string(),
                            second: file.display().to_string(),
                        });
                    } else {
                        set.profiles.insert(profile.name.clone(), (profile, file.clone()));
                    }
                }
            }
            Err(ProfileError::Several(SeveralErrors(many))) => errors.extend(many),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(set),
        1 => Err(errors.remove(0)),
        _ => Err(ProfileError::Several(SeveralErrors(errors))),
    }
}

/// Loads every document of one file. All or nothing.
pub fn load_file(path: &Path) -> Result<Vec<Profile>, ProfileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ProfileError::Read { path: path.display().to_string(), source })?;
    parse(&path.display().to_string(), &text)
}

fn parse(file: &str, text: &str) -> Result<Vec<Profile>, ProfileError> {
    let mut profiles = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        match serde_path_to_error::deserialize::<_, Option<Profile>>(document) {
            // An empty document (a stray `---`) holds no profile.
            Ok(None) => {}
            Ok(Some(profile)) => {
                let problems = validate(&profile);
                if problems.is_empty() {
                    profiles.push(profile);
                }
                for (field, message) in problems {
                    errors.push(invalid(file, number, field, message, String::new(), String::new()));
                }
            }
            Err(err) => {
                let path = err.path().to_string();
                let message = err.into_inner().to_string();
                errors.push(from_serde(file, number, &path, &message));
            }
        }
    }
    match errors.len() {
        0 => Ok(profiles),
        1 => Err(errors.remove(0)),
        _ => Err(ProfileError::Several(SeveralErrors(errors))),
    }
}

fn invalid(
    file: &str,
    document: usize,
    field: String,
    message: String,
    suggestion: String,
    line: String,
) -> ProfileError {
    ProfileError::Invalid(Box::new(FieldProblem { file: file.to_owned(), document, line, field, message, suggestion }))
}

/// Turns a serde error into one that names the field and suggests a spelling.
fn from_serde(file: &str, document: usize, path: &str, message: &str) -> ProfileError {
    // serde_norway prefixes the path and appends " at line L column C"; both are
    // rendered here in one consistent place instead.
    let message = message.strip_prefix(&format!("{path}: ")).unwrap_or(message);
    let (message, line) = match message.rfind(" at line ") {
        Some(at) => {
            let number = message[at + 9..].split_whitespace().next().unwrap_or_default();
            (&message[..at], format!(", line {number}"))
        }
        None => (message, String::new()),
    };
    let field = if path == "." { "(document)".to_owned() } else { path.to_owned() };
    if let Some(unknown) = between(message, "unknown field `", "`") {
        let expected = expected_names(message);
        let suggestion = closest(unknown, &expected).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
        let allowed = if expected.is_empty() { String::new() } else { format!(" (allowed: {})", expected.join(", ")) };
        return invalid(file, document, field, format!("unknown key{allowed}"), suggestion, line);
    }
    if let Some(missing) = between(message, "missing field `", "`") {
        let field = if path == "." { missing.to_owned() } else { format!("{path}.{missing}") };
        return invalid(file, document, field, "required key is missing".to_owned(), String::new(), line);
    }
    invalid(file, document, field, message.to_owned(), String::new(), line)
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// The backticked names after "expected" in a serde unknown-field message.
fn expected_names(message: &str) -> Vec<&str> {
    let Some(at) = message.find("expected") else { return Vec::new() };
    message[at..].split('`').skip(1).step_by(2).collect()
}

/// The candidate nearest to `word`, if it is near enough to be a likely misspelling.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn validate(p: &Profile) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut check = |ok: bool, field: &str, message: String| {
        if !ok {
            problems.push((field.to_owned(), message));
        }
    };
    check(
        is_name(&p.name, 63),
        "name",
        format!("`{}` is not a valid name: use 1-63 of a-z, 0-9 and -, starting with a letter or digit", p.name),
    );
    check(
        (100..=999_999_999).contains(&p.template_vmid),
        "template_vmid",
        format!("{} is out of range: Proxmox VMIDs are 100 to 999999999", p.template_vmid),
    );
    check(
        (1..=64).contains(&p.resources.cores),
        "resources.cores",
        format!("{} is out of range 1..=64", p.resources.cores),
    );
    check(
        (256..=262_144).contains(&p.resources.memory_mb),
        "resources.memory_mb",
        format!("{} is out of range 256..=262144 (MiB)", p.resources.memory_mb),
    );
    let bridge_ok = !p.network.bridge.is_empty()
        && p.network.bridge.len() <= 15
        && p.network.bridge.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    check(
        bridge_ok,
        "network.bridge",
        format!("`{}` is not a Linux interface name (1-15 of A-Z a-z 0-9 _ . -)", p.network.bridge),
    );
    match p.network.mode {
        NetworkMode::Allowlist => check(
            !p.network.allowlist.is_empty(),
            "network.allowlist",
            "mode is allowlist but the list is empty: add host or host:port entries, or use mode: off".to_owned(),
        ),
        _ => check(
            p.network.allowlist.is_empty(),
            "network.allowlist",
            "entries are only allowed with mode: allowlist".to_owned(),
        ),
    }
    check(
        p.behavior.ttl_minutes_default <= 10_080,
        "behavior.ttl_minutes_default",
        format!("{} is over 10080 (7 days)", p.behavior.ttl_minutes_default),
    );
    if let Some(bundle) = &p.secrets_bundle {
        check(
            !bundle.is_empty()
                && bundle.len() <= 64
                && bundle.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "secrets_bundle",
            format!("`{bundle}` is not a bundle name (1-64 of A-Z a-z 0-9 _ . -)"),
        );
    }
    check(
        is_guest_path(&p.repo.clone_path),
        "repo.clone_path",
        format!("`{}` must be an absolute path without `..`", p.repo.clone_path),
    );
    for (i, glob) in p.artifacts.globs.iter().enumerate() {
        check(
            !glob.is_empty() && !glob.starts_with('/') && !glob.split('/').any(|c| c == ".."),
            &format!("artifacts.globs[{i}]"),
            format!("`{glob}` must be relative to the workdir and must not contain `..`"),
        );
    }
    check(
        (1..=65_536).contains(&p.artifacts.max_mb),
        "artifacts.max_mb",
        format!("{} is out of range 1..=65536", p.artifacts.max_mb),
    );
    let user = &p.sandbox.user;
    check(
        user != "root" && is_name(user, 32) && user.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_'),
        "sandbox.user",
        format!("`{user}` must be an unprivileged user name (not root; a-z, 0-9, -, starting with a letter)"),
    );
    for (list, name) in
        [(&p.sandbox.read_only_paths, "read_only_paths"), (&p.sandbox.read_write_paths, "read_write_paths")]
    {
        for (i, path) in list.iter().enumerate() {
            check(
                is_guest_path(path) && path != "/",
                &format!("sandbox.{name}[{i}]"),
                format!("`{path}` must be an absolute path other than / and without `..`"),
            );
        }
    }
    let limits = &p.sandbox.rlimits;
    check(
        (16..=1_048_576).contains(&limits.nofile),
        "sandbox.rlimits.nofile",
        format!("{} is out of range 16..=1048576", limits.nofile),
    );
    check(
        (16..=1_000_000).contains(&limits.nproc),
        "sandbox.rlimits.nproc",
        format!("{} is out of range 16..=1000000", limits.nproc),
    );
    problems
}

fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !s.starts_with('-')
}

fn is_guest_path(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "..")
}

/// The profiles shipped in `profiles/`, for tests.
#[cfg(test)]
fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::LandlockMode;

    const MINIMAL: &str = "name: a\ntemplate_vmid: 9000\nresources: {cores: 2, memory_mb: 2048}\n";

    fn err(text: &str) -> String {
        parse("p.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_profiles_all_load_from_one_multi_document_file() {
        let set = load_dir(&shipped_dir()).unwrap();
        let names: Vec<&str> = set.names().collect();
        assert_eq!(names, ["interactive-dev", "yolo-ephemeral", "yolo-workspace"]);
        let files: std::collections::BTreeSet<_> = set.names().map(|n| set.source(n).unwrap().to_owned()).collect();
        assert_eq!(files.len(), 1, "all three come from the same multi-document file");
        assert_eq!(set.get("yolo-ephemeral").unwrap().sandbox.landlock, LandlockMode::Required);
    }

    #[test]
    fn every_document_of_a_file_loads_and_empty_documents_are_skipped() {
        let text = format!("---\n{MINIMAL}---\n{}\n---\n", MINIMAL.replace("name: a", "name: b"));
        let names: Vec<String> = parse("p.yaml", &text).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn defaults_fill_the_optional_sections() {
        let p = &parse("p.yaml", MINIMAL).unwrap()[0];
        assert_eq!(p.network.mode, NetworkMode::Off);
        assert_eq!(p.network.bridge, "vmbr1");
        assert_eq!(p.repo.clone_path, "/workspace");
        assert_eq!(p.sandbox.user, "agent");
        assert!(!p.sandbox.secrets_readable);
        assert_eq!(p.behavior.ttl_minutes_default, 180);
    }

    #[test]
    fn a_misspelled_key_names_file_document_path_and_suggestion() {
        let text = format!("{MINIMAL}---\nname: b\ntemplate_vmid: 9000\nresources: {{cores: 2, memroy_mb: 2048}}\n");
        assert_eq!(
            err(&text),
            "p.yaml, document 2, line 7: resources.memroy_mb: unknown key (allowed: cores, memory_mb); did you mean `memory_mb`?"
        );
        assert_eq!(
            err(&format!("{MINIMAL}sandbox:\n  landlok: required\n")),
            "p.yaml, document 1, line 5: sandbox.landlok: unknown key (allowed: landlock, user, read_only_paths, read_write_paths, secrets_readable, rlimits); did you mean `landlock`?"
        );
        let far = err(&format!("{MINIMAL}colour: blue\n"));
        assert!(far.starts_with("p.yaml, document 1, line 4: colour: unknown key (allowed: name, "), "{far}");
        assert!(!far.contains("did you mean"), "{far}");
    }

    #[test]
    fn wrong_types_and_bad_enum_values_name_the_field() {
        let e = err("name: a\ntemplate_vmid: nine\nresources: {cores: 2, memory_mb: 2048}\n");
        assert!(e == "p.yaml, document 1, line 2: template_vmid: invalid type: string \"nine\", expected u32", "{e}");
        let e = err(&format!("{MINIMAL}sandbox: {{landlock: maybe}}\n"));
        assert!(
            e == "p.yaml, document 1, line 4: sandbox.landlock: unknown variant `maybe`, expected one of `required`, `best-effort`, `off`",
            "{e}"
        );
        let e = err("name: a\ntemplate_vmid: 9000\n");
        assert_eq!(e, "p.yaml, document 1: resources: required key is missing");
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_range() {
        let e = err(&MINIMAL.replace("cores: 2", "cores: 0"));
        assert_eq!(e, "p.yaml, document 1: resources.cores: 0 is out of range 1..=64");
        let e = err(&format!("{MINIMAL}sandbox: {{user: root}}\n"));
        assert!(e.starts_with("p.yaml, document 1: sandbox.user: `root` must be an unprivileged user name"), "{e}");
        let e = err(&format!("{MINIMAL}network: {{mode: allowlist}}\n"));
        assert!(e.starts_with("p.yaml, document 1: network.allowlist: mode is allowlist but the list is empty"), "{e}");
        let e = err(&format!("{MINIMAL}artifacts: {{globs: [\"../etc/*\"]}}\n"));
        assert_eq!(
            e,
            "p.yaml, document 1: artifacts.globs[0]: `../etc/*` must be relative to the workdir and must not contain `..`"
        );
    }

    #[test]
    fn nothing_loads_half_way() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), MINIMAL).unwrap();
        std::fs::write(dir.path().join("b.yaml"), MINIMAL.replace("name: a", "name: b").replace("2048", "1")).unwrap();
        std::fs::write(dir.path().join("c.yaml"), MINIMAL).unwrap();
        let e = load_dir(dir.path()).unwrap_err().to_string();
        let b = dir.path().join("b.yaml");
        let c = dir.path().join("c.yaml");
        let a = dir.path().join("a.yaml");
        assert_eq!(
            e,
            format!(
                "2 problems in the profiles:\n  {}, document 1: resources.memory_mb: 1 is out of range 256..=262144 (MiB)\n  profile a is defined twice: in {} and in {}",
                b.display(),
                a.display(),
                c.display()
            )
        );
    }

    #[test]
    fn unknown_profile_names_suggest_the_closest() {
        let set = load_dir(&shipped_dir()).unwrap();
        assert_eq!(
            set.unknown("yolo-ephemeal"),
            "no profile named `yolo-ephemeal`; did you mean `yolo-ephemeral`? (known: interactive-dev, yolo-ephemeral, yolo-workspace)"
        );
    }
}
