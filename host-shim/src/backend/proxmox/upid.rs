//! Proxmox task ids: `UPID:node:PID:PSTART:STARTTIME:type:id:user:`.

use std::fmt;

/// A parsed UPID. The node inside it is where the task runs and must be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upid {
    pub node: String,
    pub pid: u32,
    pub pstart: u64,
    pub starttime: u64,
    /// Task type, e.g. `qmclone`, `qmstart`, `qmdestroy`.
    pub kind: String,
    /// The object, usually a VMID (for a clone: the SOURCE vmid).
    pub id: String,
    /// Who started it; for a token the full `user@realm!tokenid`.
    pub user: String,
    raw: String,
}

impl Upid {
    /// Parses a UPID, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Upid, String> {
        let bad = |why: &str| format!("malformed UPID {text:?}: {why}");
        let rest = text.strip_prefix("UPID:").ok_or_else(|| bad("does not start with UPID:"))?;
        let fields: Vec<&str> = rest.split(':').collect();
        // The trailing ':' leaves one empty field at the end.
        if fields.len() != 8 || !fields[7].is_empty() {
            return Err(bad("expected 7 colon-separated fields and a trailing colon"));
        }
        let hex = |field: &str, name: &str, digits: std::ops::RangeInclusive<usize>| {
            if !digits.contains(&field.len()) {
                return Err(bad(&format!("{name} must have {}-{} hex digits", digits.start(), digits.end())));
            }
            u64::from_str_radix(field, 16).map_err(|_| bad(&format!("{name} is not hex")))
        };
        let node = fields[0];
        if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err(bad("invalid node name"));
        }
        let pid = hex(fields[1], "pid", 8..=8)?;
        let pstart = hex(fields[2], "pstart", 8..=9)?;
        let starttime = hex(fields[3], "starttime", 8..=8)?;
        if fields[4].is_empty() || fields[6].is_empty() {
            return Err(bad("empty type or user"));
        }
        Ok(Upid {
            node: node.to_owned(),
            pid: u32::try_from(pid).map_err(|_| bad("pid out of range"))?,
            pstart,
            starttime,
            kind: fields[4].to_owned(),
            id: fields[5].to_owned(),
            user: fields[6].to_owned(),
            raw: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_clone_upid_with_a_token_user() {
        let u = Upid::parse("UPID:pve2:000A1B2C:01C0FFEE:6745A1B0:qmclone:9000:agentlab@pve!shim:").unwrap();
        assert_eq!(u.node, "pve2");
        assert_eq!(u.pid, 0x000A_1B2C);
        assert_eq!(u.pstart, 0x01C0_FFEE);
        assert_eq!(u.starttime, 0x6745_A1B0);
        assert_eq!(u.kind, "qmclone");
        assert_eq!(u.id, "9000");
        assert_eq!(u.user, "agentlab@pve!shim");
        assert_eq!(u.to_string(), "UPID:pve2:000A1B2C:01C0FFEE:6745A1B0:qmclone:9000:agentlab@pve!shim:");
    }

    #[test]
    fn nine_digit_pstart_and_empty_id_are_fine() {
        let u = Upid::parse("UPID:n1:00000001:123456789:00000000:vzdump::root@pam:").unwrap();
        assert_eq!(u.pstart, 0x1_2345_6789);
        assert_eq!(u.id, "");
    }

    #[test]
    fn rejects_malformed_ids_with_the_reason() {
        for (text, why) in [
            ("UPD:pve:00000001:00000001:00000001:qmstart:100:root@pam:", "does not start"),
            ("UPID:pve:00000001:00000001:00000001:qmstart:100:root@pam", "trailing colon"),
            ("UPID:pve:0001:00000001:00000001:qmstart:100:root@pam:", "pid must have 8-8"),
            ("UPID:pve:0000000g:00000001:00000001:qmstart:100:root@pam:", "pid is not hex"),
            ("UPID:p ve:00000001:00000001:00000001:qmstart:100:root@pam:", "invalid node"),
        ] {
            let err = Upid::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
