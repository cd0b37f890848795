//! Property tests: random secrets hidden in random text, fed in random chunks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use agentlab_redact::{REDACTED, Redactor, variants};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_encode};
use proptest::prelude::*;

const UNRESERVED_KEPT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Encodings computed here, independently of the crate, that depend on the
/// secret alone, so the whole encoded text must disappear.
fn encode(secret: &[u8], kind: u8) -> Vec<u8> {
    match kind % 8 {
        0 => secret.to_vec(),
        1 => STANDARD.encode(secret).into_bytes(),
        2 => STANDARD_NO_PAD.encode(secret).into_bytes(),
        3 => URL_SAFE.encode(secret).into_bytes(),
        4 => URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        5 => percent_encode(secret, UNRESERVED_KEPT).to_string().into_bytes(),
        6 => {
            // Lower-case only the hex digits, not the literal characters.
            let upper = percent_encode(secret, UNRESERVED_KEPT).to_string();
            let mut parts = upper.split('%');
            let mut out = parts.next().unwrap_or_default().to_string();
            for part in parts {
                out.push('%');
                out.push_str(&part[..2].to_ascii_lowercase());
                out.push_str(&part[2..]);
            }
            out.into_bytes()
        }
        _ => match std::str::from_utf8(secret) {
            Ok(text) => {
                let quoted = serde_json::to_string(text).unwrap();
                quoted.as_bytes()[1..quoted.len() - 1].to_vec()
            }
            Err(_) => secret.to_vec(),
        },
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn strip_markers(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(REDACTED) {
            i += REDACTED.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Redacts `input` through a stream cut at `cuts` (positions, any order).
fn streamed(r: &Redactor, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut stream = r.stream();
    let mut out = Vec::new();
    let mut last = 0;
    for cut in cuts {
        stream.push(&input[last..cut], &mut out);
        last = cut;
    }
    stream.push(&input[last..], &mut out);
    stream.flush(&mut out);
    out
}

/// What goes between filler runs.
#[derive(Debug, Clone)]
enum Piece {
    /// An encoded secret (secret index, encoding).
    Secret(usize, u8),
    /// A proper prefix of an encoded secret that then stops: must survive.
    Decoy(usize, u8, usize),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(s, k)| Piece::Secret(s, k)),
        1 => (any::<usize>(), any::<u8>(), any::<usize>()).prop_map(|(s, k, l)| Piece::Decoy(s, k, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (1) no secret or variant survives, (2) streaming equals `redact_all`,
    /// (3) removing the markers from the output gives the input minus the
    /// inserted secrets: no other byte is lost or changed.
    #[test]
    fn secrets_in_random_text(
        secrets in prop::collection::vec(prop::collection::vec(any::<u8>(), 6..40), 1..4),
        layout in prop::collection::vec(
            (prop::collection::vec(any::<usize>(), 0..12), piece(), any::<bool>()),
            0..12,
        ),
        tail in prop::collection::vec(any::<usize>(), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let r = Redactor::new(&secrets);
        let all_variants: Vec<Vec<u8>> = secrets.iter().flat_map(|s| variants(s)).collect();
        // Filler bytes that occur in no pattern, so filler can neither form
        // nor extend a match.
        let mut used = [false; 256];
        for v in &all_variants {
            for &b in v {
                used[b as usize] = true;
            }
        }
        let filler_bytes: Vec<u8> = (0..=255u8).filter(|b| !used[*b as usize]).collect();
        prop_assume!(!filler_bytes.is_empty());

        let mut input = Vec::new();
        let mut expected_plain = Vec::new();
        let filler = |idx: &[usize], input: &mut Vec<u8>, plain: &mut Vec<u8>| {
            for i in idx {
                let b = filler_bytes[i % filler_bytes.len()];
                input.push(b);
                plain.push(b);
            }
        };
        let mut inserted = 0;
        for (gap, piece, glue) in &layout {
            // Secrets may touch each other (`glue`); decoys always get filler
            // on both sides so they cannot combine with a neighbour.
            let is_decoy = matches!(piece, Piece::Decoy(..));
            if gap.is_empty() && (is_decoy || !glue) {
                filler(&[0], &mut input, &mut expected_plain);
            } else {
                filler(gap, &mut input, &mut expected_plain);
            }
            match piece {
                Piece::Secret(s, k) => {
                    input.extend_from_slice(&encode(&secrets[s % secrets.len()], *k));
                    inserted += 1;
                }
                Piece::Decoy(s, k, l) => {
                    let full = encode(&secrets[s % secrets.len()], *k);
                    let decoy = &full[..l % full.len()];
                    // Skip prefixes that happen to contain a whole pattern.
                    if !all_variants.iter().any(|v| contains(decoy, v)) {
                        input.extend_from_slice(decoy);
                        expected_plain.extend_from_slice(decoy);
                    }
                    filler(&[0], &mut input, &mut expected_plain);
                }
            }
        }
        filler(&tail, &mut input, &mut expected_plain);

        let whole = r.redact_all(&input);
        // (1)
        for v in &all_variants {
            prop_assert!(!contains(&whole, v), "variant {:?} leaked", String::from_utf8_lossy(v));
        }
        let markers = whole.windows(REDACTED.len()).filter(|w| *w == REDACTED).count();
        prop_assert!(markers <= inserted);
        prop_assert!(inserted == 0 || markers > 0);
        // (2)
        prop_assert_eq!(&streamed(&r, &input, &cuts), &whole);
        // (3)
        prop_assert_eq!(strip_markers(&whole), expected_plain);
    }

    /// Secrets over a two-letter alphabet overlap, nest and repeat constantly.
    /// Compares against a brute-force reference: find every occurrence of
    /// every pattern, merge those sharing a byte, replace each group.
    #[test]
    fn overlapping_secrets_match_reference(
        secrets in prop::collection::vec(prop::collection::vec(prop::sample::select(b"ab".to_vec()), 6..12), 1..5),
        input in prop::collection::vec(prop::sample::select(b"abab\n".to_vec()), 0..300),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let r = Redactor::new(&secrets);
        let patterns: Vec<&[u8]> = r.patterns().collect();
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for start in 0..input.len() {
            for p in &patterns {
                if input[start..].starts_with(p) {
                    spans.push((start, start + p.len()));
                }
            }
        }
        spans.sort_unstable();
        let mut groups: Vec<(usize, usize)> = Vec::new();
        for (s, e) in spans {
            match groups.last_mut() {
                Some(last) if s < last.1 => last.1 = last.1.max(e),
                _ => groups.push((s, e)),
            }
        }
        let mut reference = Vec::new();
        let mut at = 0;
        for (s, e) in groups {
            reference.extend_from_slice(&input[at..s]);
            reference.extend_from_slice(REDACTED);
            at = e;
        }
        reference.extend_from_slice(&input[at..]);

        let whole = r.redact_all(&input);
        prop_assert_eq!(&whole, &reference);
        prop_assert_eq!(&streamed(&r, &input, &cuts), &reference);
    }

    /// Held bytes never exceed the longest pattern, whatever is pushed.
    #[test]
    fn hold_back_is_bounded(
        secrets in prop::collection::vec(prop::collection::vec(prop::sample::select(b"abc".to_vec()), 6..20), 1..4),
        chunks in prop::collection::vec(prop::collection::vec(prop::sample::select(b"abc".to_vec()), 0..50), 0..30),
    ) {
        let r = Redactor::new(&secrets);
        let max_len = r.patterns().map(<[u8]>::len).max().unwrap();
        let mut stream = r.stream();
        let mut out = Vec::new();
        for chunk in &chunks {
            stream.push(chunk, &mut out);
            prop_assert!(stream.held() < max_len, "held {} of max {}", stream.held(), max_len);
        }
    }
}
