//! Identifiers: a prefix and 12 lowercase hex digits from the OS's random source.

pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    // getrandom only fails if the OS has no entropy source at all; fall back to time+pid
    // so ids stay unique within this daemon.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let mix = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
        bytes.copy_from_slice(&mix.to_le_bytes()[..6]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_prefix_and_differ() {
        let a = super::new_id("job");
        let b = super::new_id("job");
        assert!(a.starts_with("job-") && a.len() == 16, "{a}");
        assert_ne!(a, b);
    }
}
