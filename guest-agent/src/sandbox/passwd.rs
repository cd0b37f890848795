//! `/etc/passwd` lookups. The agent is a static musl binary: no NSS, files only.

use std::path::Path;

use super::SandboxError;

pub const PASSWD: &str = "/etc/passwd";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Finds `name` in a passwd file.
pub fn lookup(passwd: &Path, name: &str) -> Result<User, SandboxError> {
    let text = std::fs::read_to_string(passwd).map_err(SandboxError::Passwd)?;
    parse(&text).find(|u| u.name == name).ok_or_else(|| SandboxError::UnknownUser(name.to_owned()))
}

/// The name of `uid`, if the passwd file has one.
pub fn name_of(passwd: &Path, uid: u32) -> Option<String> {
    let text = std::fs::read_to_string(passwd).ok()?;
    parse(&text).find(|u| u.uid == uid).map(|u| u.name)
}

fn parse(text: &str) -> impl Iterator<Item = User> + '_ {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        (!name.is_empty()).then(|| User { name: name.to_owned(), uid, gid })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken\nagent:x:1000:1001:agent:/workspace:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(lookup(&path, "agent").unwrap(), User { name: "agent".into(), uid: 1000, gid: 1001 });
        assert_eq!(lookup(&path, "nobody").unwrap_err().to_string(), "the job user \"nobody\" is not in /etc/passwd");
        assert_eq!(name_of(&path, 0).as_deref(), Some("root"));
        assert_eq!(name_of(&path, 5), None);
    }
}
