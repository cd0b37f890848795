//! Turns secret values into the byte patterns the matcher looks for.
//!
//! A job rarely prints a secret verbatim only: it ends up inside HTTP Basic
//! headers (base64), URLs (percent-encoding) and JSON documents. Each of those
//! encodings is deterministic, so we precompute the encoded forms and match
//! them as plain literals.

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};

/// Secrets (and encoded variants) shorter than this are not matched: short
/// values occur by chance in ordinary output, so redacting them would shred
/// logs while protecting little.
pub const MIN_SECRET_LEN: usize = 6;

/// RFC 3986 unreserved characters stay literal; everything else is encoded.
pub(crate) const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Leading base64 characters that still depend on the 0, 1 or 2 filler bytes
/// in front of the secret (ceil(8 * filler / 6)).
const B64_LEAD: [usize; 3] = [0, 2, 3];

/// The deduplicated pattern set for a list of secrets.
#[derive(Debug, Default)]
pub(crate) struct PatternSet {
    pub(crate) patterns: Vec<Vec<u8>>,
    pub(crate) skipped_short: usize,
}

impl PatternSet {
    pub(crate) fn build<I, S>(secrets: I) -> PatternSet
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut set = BTreeSet::new();
        let mut skipped_short = 0;
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.is_empty() {
                // An unset variable: nothing to leak, nothing to warn about.
                continue;
            }
            if secret.len() < MIN_SECRET_LEN {
                skipped_short += 1;
                continue;
            }
            set.extend(variants(secret));
        }
        PatternSet { patterns: set.into_iter().collect(), skipped_short }
    }
}

/// Every form of `secret` the redactor matches: the raw bytes plus its base64
/// (standard and URL-safe alphabets, all three alignments, padded and not),
/// percent-encoded and JSON-escaped forms. Deduplicated, sorted, and without
/// anything shorter than [`MIN_SECRET_LEN`]; empty when `secret` itself is too
/// short.
pub fn variants(secret: &[u8]) -> Vec<Vec<u8>> {
    if secret.len() < MIN_SECRET_LEN {
        return Vec::new();
    }
    let mut out = BTreeSet::new();
    out.insert(secret.to_vec());
    for (padded, unpadded) in [(STANDARD, STANDARD_NO_PAD), (URL_SAFE, URL_SAFE_NO_PAD)] {
        base64_variants(secret, &padded, &unpadded, &mut out);
    }
    percent_variants(secret, &mut out);
    json_variants(secret, &mut out);
    out.retain(|v| v.len() >= MIN_SECRET_LEN);
    out.into_iter().collect()
}

/// Adds, for 0, 1 and 2 unknown bytes before the secret, the base64 text that
/// only depends on the secret: the characters strictly inside it (any bytes may
/// follow), and the tails produced when the secret ends the encoded data, with
/// and without `=` padding.
fn base64_variants(secret: &[u8], padded: &GeneralPurpose, unpadded: &GeneralPurpose, out: &mut BTreeSet<Vec<u8>>) {
    let mut data = Vec::with_capacity(secret.len() + 2);
    for (filler, &lead) in B64_LEAD.iter().enumerate() {
        data.clear();
        data.resize(filler, 0);
        data.extend_from_slice(secret);
        let bits = 8 * data.len();
        // Characters whose 6 bits all come from the secret.
        let determined_end = bits / 6;
        let nopad = unpadded.encode(&data).into_bytes();
        let pad = padded.encode(&data).into_bytes();
        if let Some(middle) = nopad.get(lead..determined_end) {
            out.insert(middle.to_vec());
        }
        if let Some(tail) = nopad.get(lead..) {
            out.insert(tail.to_vec());
        }
        if let Some(tail) = pad.get(lead..) {
            out.insert(tail.to_vec());
        }
    }
}

/// Percent-encoding with upper-case hex (RFC 3986 recommends it), the
/// lower-case hex some encoders emit, and form encoding's `+` for spaces.
fn percent_variants(secret: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    let upper = percent_encode(secret, NOT_UNRESERVED).to_string().into_bytes();
    let mut lower = upper.clone();
    let mut i = 0;
    while i < lower.len() {
        if lower[i] == b'%' {
            for b in lower.iter_mut().skip(i + 1).take(2) {
                b.make_ascii_lowercase();
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    if secret.contains(&b' ') {
        for encoded in [&upper, &lower] {
            let form = String::from_utf8_lossy(encoded).replace("%20", "+").into_bytes();
            out.insert(form);
        }
    }
    out.insert(upper);
    out.insert(lower);
}

/// JSON string escaping as serde_json writes it, plus the ASCII-only form
/// (`\u00e9`) that Python's `json.dumps` produces by default. Non-UTF-8 secrets
/// have no JSON form: a JSON encoder would have to replace the bytes anyway.
fn json_variants(secret: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    let Ok(text) = std::str::from_utf8(secret) else {
        return;
    };
    let Ok(quoted) = serde_json::to_string(text) else {
        return;
    };
    let Some(inner) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) else {
        return;
    };
    if !inner.is_ascii() {
        let mut ascii = String::with_capacity(inner.len() * 2);
        let mut units = [0u16; 2];
        for ch in inner.chars() {
            if ch.is_ascii() {
                ascii.push(ch);
            } else {
                for unit in ch.encode_utf16(&mut units) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out.insert(ascii.into_bytes());
    }
    out.insert(inner.as_bytes().to_vec());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn has(vs: &[Vec<u8>], s: &str) -> bool {
        vs.iter().any(|v| v == s.as_bytes())
    }

    #[test]
    fn base64_offsets_are_substrings_of_real_encodings() {
        let secret = b"hunter2-is-secret";
        let vs = variants(secret);
        for prefix_len in 0..6 {
            for suffix_len in 0..4 {
                let mut data = vec![b'x'; prefix_len];
                data.extend_from_slice(secret);
                data.extend(std::iter::repeat_n(b'y', suffix_len));
                for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
                    let enc = engine.encode(&data);
                    assert!(
                        vs.iter().any(|v| v.len() > 6 && enc.contains(std::str::from_utf8(v).unwrap())),
                        "no variant inside {enc} (prefix {prefix_len}, suffix {suffix_len})"
                    );
                }
            }
        }
    }

    #[test]
    fn short_or_empty_secret_has_no_variants() {
        assert!(variants(b"abcde").is_empty());
        assert!(variants(b"").is_empty());
        let set = PatternSet::build(["abc", "", "long-enough"]);
        assert_eq!(set.skipped_short, 1);
        assert!(set.patterns.iter().any(|p| p == b"long-enough"));
    }

    #[test]
    fn percent_and_json_forms() {
        let vs = variants(b"p@ss w\"rd\\\n\xc3\xa9");
        assert!(has(&vs, "p%40ss%20w%22rd%5C%0A%C3%A9"));
        assert!(has(&vs, "p%40ss%20w%22rd%5c%0a%c3%a9"));
        assert!(has(&vs, "p%40ss+w%22rd%5C%0A%C3%A9"));
        assert!(has(&vs, "p@ss w\\\"rd\\\\\\n\u{e9}"));
        assert!(has(&vs, "p@ss w\\\"rd\\\\\\n\\u00e9"));
    }

    #[test]
    fn plain_secret_has_no_redundant_forms() {
        // Unreserved characters only: the URL and JSON forms equal the raw value.
        let mut expected = BTreeSet::new();
        expected.insert(b"abcdefgh".to_vec());
        base64_variants(b"abcdefgh", &STANDARD, &STANDARD_NO_PAD, &mut expected);
        base64_variants(b"abcdefgh", &URL_SAFE, &URL_SAFE_NO_PAD, &mut expected);
        assert_eq!(variants(b"abcdefgh"), expected.into_iter().collect::<Vec<_>>());
    }
}
