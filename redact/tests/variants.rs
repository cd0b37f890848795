//! Each encoded form of a secret is redacted, and nothing around it changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use agentlab_redact::{REDACTED, RedactStream, Redactor};
use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

const SECRET: &[u8] = b"s3cr3t-T0ken+/xyz";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Feeds `input` one byte at a time, the harshest split there is.
fn bytewise(stream: &mut RedactStream<'_>, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in input {
        stream.push(std::slice::from_ref(b), &mut out);
    }
    stream.flush(&mut out);
    out
}

/// Checks `redact_all` and byte-by-byte streaming against `expected`.
fn check(r: &Redactor, input: &[u8], expected: &[u8]) {
    assert_eq!(show(&r.redact_all(input)), show(expected), "redact_all");
    assert_eq!(show(&bytewise(&mut r.stream(), input)), show(expected), "bytewise stream");
}

#[test]
fn raw_secret() {
    let r = Redactor::new([SECRET]);
    let input = cat(&[b"2025-01-01 INFO token=", SECRET, b" rest of \xff line\n"]);
    check(&r, &input, &cat(&[b"2025-01-01 INFO token=", REDACTED, b" rest of \xff line\n"]));
}

/// base64 of `prefix + SECRET + suffix`, inside an Authorization header: the
/// characters that depend only on the secret are replaced, the ones that mix
/// in neighbouring bytes stay. Covers all three offsets, both alphabets,
/// padded and unpadded, with the secret in the middle and at the end.
#[test]
fn base64_at_every_offset() {
    let r = Redactor::new([SECRET]);
    let n = SECRET.len();
    let engines: [(&str, GeneralPurpose); 4] =
        [("std", STANDARD), ("std-nopad", STANDARD_NO_PAD), ("url", URL_SAFE), ("url-nopad", URL_SAFE_NO_PAD)];
    for (name, engine) in engines {
        for prefix in [&b"u:"[..], b"us:", b"use:", b"user:", b"admin:", b"deploy:"] {
            // Suffixes start with a byte >= 0x80 so the first character after
            // the secret never happens to equal its end-of-data form.
            for suffix in [&b""[..], b"\x80", b"\xff\n", b"\x90tail"] {
                let p = prefix.len();
                let blob = engine.encode(cat(&[prefix, SECRET, suffix])).into_bytes();
                let lead = [0, 2, 3][p % 3];
                let start = p / 3 * 4 + lead;
                let end = if suffix.is_empty() { blob.len() } else { 8 * (p + n) / 6 };
                let input = cat(&[b"> Authorization: Basic ", &blob, b"\r\n< HTTP/1.1 200 OK\n"]);
                let expected = cat(&[
                    b"> Authorization: Basic ",
                    &blob[..start],
                    REDACTED,
                    &blob[end..],
                    b"\r\n< HTTP/1.1 200 OK\n",
                ]);
                let got = r.redact_all(&input);
                assert_eq!(show(&got), show(&expected), "{name} prefix {p} suffix {}", suffix.len());
                assert_eq!(show(&bytewise(&mut r.stream(), &input)), show(&expected), "{name} streamed");
            }
        }
    }
}

#[test]
fn url_encoded_upper_and_lower_hex() {
    let secret = b"p@ss/w0rd?&=x";
    let r = Redactor::new([secret]);
    let upper = b"p%40ss%2Fw0rd%3F%26%3Dx";
    let lower = b"p%40ss%2fw0rd%3f%26%3dx";
    for encoded in [&upper[..], &lower[..]] {
        let input = cat(&[b"GET https://example.com/login?pw=", encoded, b"&next=%2Fhome HTTP/1.1\n"]);
        check(&r, &input, &cat(&[b"GET https://example.com/login?pw=", REDACTED, b"&next=%2Fhome HTTP/1.1\n"]));
    }
}

#[test]
fn json_escaped() {
    let secret = "pa\"ss\\wo\nrd\té";
    let r = Redactor::new([secret]);
    let doc = serde_json::json!({ "user": "bob", "password": secret, "n": 1 }).to_string();
    assert!(!doc.contains(secret), "the escaped form must differ for this test to mean anything");
    let escaped = r#""pa\"ss\\wo\nrd\té""#;
    assert!(doc.contains(escaped), "{doc}");
    let expected = doc.replace(escaped, &format!("\"{}\"", show(REDACTED)));
    check(&r, doc.as_bytes(), expected.as_bytes());
    // Python's json.dumps escapes non-ASCII too.
    let python = br#"{"password": "pa\"ss\\wo\nrd\t\u00e9"}"#;
    check(&r, python, &cat(&[br#"{"password": ""#, REDACTED, br#""}"#]));
}

#[test]
fn short_secret_is_skipped_and_counted() {
    let r = Redactor::new(["abc", "12345", "", "long-enough-secret"]);
    assert_eq!(r.skipped_short(), 2);
    assert!(!r.is_empty());
    check(&r, b"abc 12345 long-enough-secret", &cat(&[b"abc 12345 ", REDACTED]));
    let only_short = Redactor::new(["abc"]);
    assert_eq!(only_short.skipped_short(), 1);
    assert!(only_short.is_empty());
    assert_eq!(only_short.pattern_count(), 0);
    assert_eq!(only_short.redact_all(b"abc"), b"abc");
}

#[test]
fn overlapping_secrets_leak_nothing() {
    let r = Redactor::new(["abcdefgh", "efghijkl"]);
    check(&r, b"xx abcdefghijkl yy", &cat(&[b"xx ", REDACTED, b" yy"]));
    // Back to back: two markers, as leftmost-longest matching would give.
    check(&r, b"xx abcdefghefghijkl yy", &cat(&[b"xx ", REDACTED, REDACTED, b" yy"]));
    // One inside the other.
    let r = Redactor::new(["0123456789", "345678"]);
    check(&r, b"<0123456789>", &cat(&[b"<", REDACTED, b">"]));
}

#[test]
fn long_overlapping_run_is_one_marker_with_bounded_memory() {
    let r = Redactor::new(["aaaaaa"]);
    let max_len = r.patterns().map(<[u8]>::len).max().unwrap();
    let mut stream = r.stream();
    let mut out = Vec::new();
    stream.push(b"start ", &mut out);
    for _ in 0..10_000 {
        stream.push(b"aaa", &mut out);
        assert!(stream.held() < max_len, "held {}", stream.held());
    }
    stream.push(b" end", &mut out);
    stream.flush(&mut out);
    assert_eq!(show(&out), show(&cat(&[b"start ", REDACTED, b" end"])));
}

#[test]
fn plain_text_is_released_immediately() {
    let r = Redactor::new([SECRET]);
    let mut stream = r.stream();
    let mut out = Vec::new();
    stream.push(b"compiling crate foo\n", &mut out);
    assert_eq!(out, b"compiling crate foo\n");
    assert_eq!(stream.held(), 0);
    // A possible start of the secret is held back, and only that.
    stream.push(b"token=s3cr", &mut out);
    assert_eq!(show(&out), "compiling crate foo\ntoken=");
    assert_eq!(stream.held(), 4);
    stream.push(b"3t-T0ken+/xyz and more\n", &mut out);
    assert_eq!(show(&out), show(&cat(&[b"compiling crate foo\ntoken=", REDACTED, b" and more\n"])));
    assert_eq!(stream.held(), 0);
    // A false start is released once it can no longer be a secret.
    out.clear();
    stream.push(b"s3cr", &mut out);
    assert!(out.is_empty());
    stream.push(b"et\n", &mut out);
    assert_eq!(out, b"s3cret\n");
    // Flush releases a dangling prefix as is.
    out.clear();
    stream.push(b"s3cr3t", &mut out);
    stream.flush(&mut out);
    assert_eq!(out, b"s3cr3t");
    assert_eq!(stream.held(), 0);
}

#[test]
fn large_chunks_after_held_bytes() {
    // Exercises the path that joins held bytes with the head of a big chunk.
    let r = Redactor::new([SECRET]);
    let mut input = Vec::new();
    for i in 0..2000 {
        input.extend_from_slice(format!("line {i} ").as_bytes());
        if i % 7 == 0 {
            input.extend_from_slice(SECRET);
        }
        input.push(b'\n');
    }
    let expected = r.redact_all(&input);
    assert_eq!(expected.windows(REDACTED.len()).filter(|w| *w == REDACTED).count(), 286);
    for first in [1, 5, 13, 16, 17, 100] {
        for size in [1000, 4096, 65536] {
            let mut stream = r.stream();
            let mut out = Vec::new();
            stream.push(&input[..first], &mut out);
            for chunk in input[first..].chunks(size) {
                stream.push(chunk, &mut out);
            }
            stream.flush(&mut out);
            assert_eq!(out, expected, "first {first} size {size}");
        }
    }
}

#[test]
fn owned_stream_outlives_the_redactor_handle() {
    let mut stream = Redactor::new([SECRET]).into_stream();
    let handle = std::thread::spawn(move || {
        let mut out = Vec::new();
        stream.push(SECRET, &mut out);
        stream.flush(&mut out);
        out
    });
    assert_eq!(handle.join().unwrap(), REDACTED);
}
