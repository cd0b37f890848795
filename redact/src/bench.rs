//! Throughput measurement helpers for `make bench`.
//!
//! Everything here is deterministic (a fixed-seed generator), so runs on
//! different machines or commits process exactly the same bytes.

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::Redactor;

/// Size of the pieces fed to [`RedactStream::push`](crate::RedactStream::push),
/// matching a typical pipe read.
pub const CHUNK: usize = 64 * 1024;

/// Result of one throughput run. MB are 10^6 bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputReport {
    /// Input bytes processed.
    pub bytes: usize,
    /// Wall time spent redacting (data generation excluded).
    pub seconds: f64,
    pub mb_per_s: f64,
    /// Patterns (secrets plus encodings) in the redactor.
    pub patterns: usize,
    /// Output bytes produced, a cheap check that redaction happened.
    pub output_bytes: usize,
}

impl ThroughputReport {
    fn new(bytes: usize, seconds: f64, patterns: usize, output_bytes: usize) -> ThroughputReport {
        let mb_per_s = if seconds > 0.0 { bytes as f64 / seconds / 1e6 } else { f64::INFINITY };
        ThroughputReport { bytes, seconds, mb_per_s, patterns, output_bytes }
    }
}

/// Generates `secrets` secrets, builds a redactor, and streams `total_bytes` of
/// generated log text through it in [`CHUNK`]-sized pushes.
pub fn measure_throughput(secrets: usize, total_bytes: usize) -> ThroughputReport {
    let secrets = bench_secrets(secrets);
    let input = log_text(&secrets, total_bytes);
    let redactor = Redactor::new(&secrets);
    let mut stream = redactor.stream();
    let mut out = Vec::with_capacity(2 * CHUNK);
    let mut output_bytes = 0;
    let started = Instant::now();
    for chunk in input.chunks(CHUNK) {
        stream.push(chunk, &mut out);
        output_bytes += out.len();
        out.clear();
    }
    stream.flush(&mut out);
    output_bytes += out.len();
    ThroughputReport::new(input.len(), started.elapsed().as_secs_f64(), redactor.pattern_count(), output_bytes)
}

/// Runs `sed` (with `LC_ALL=C`) over the same kind of data as
/// [`measure_throughput`], using [`sed_script`] for the same secrets, as a
/// baseline. `None` when `sed` cannot be run.
pub fn measure_sed(secrets: usize, total_bytes: usize) -> Option<ThroughputReport> {
    let secrets = bench_secrets(secrets);
    let input = log_text(&secrets, total_bytes);
    let redactor = Redactor::new(&secrets);
    let script = sed_script(redactor.patterns());
    let dir = std::env::temp_dir().join(format!("agentlab-redact-sed-{}", std::process::id()));
    std::fs::write(&dir, &script).ok()?;
    let started = Instant::now();
    let mut child = Command::new("sed")
        .env("LC_ALL", "C")
        .arg("-f")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let writer = std::thread::spawn(move || stdin.write_all(&input).is_ok());
    let mut output = Vec::new();
    child.stdout.take()?.read_to_end(&mut output).ok()?;
    let status = child.wait().ok()?;
    let wrote = writer.join().ok()?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&dir);
    (status.success() && wrote)
        .then(|| ThroughputReport::new(total_bytes, seconds, redactor.pattern_count(), output.len()))
}

/// A sed program (one `s` command per line, GNU sed, `LC_ALL=C`) replacing
/// each pattern with `[REDACTED]`, longest first. sed applies the commands one
/// after another rather than all at once, so overlapping occurrences can come
/// out differently; it is a timing baseline, not a reference implementation.
pub fn sed_script<'a>(patterns: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut patterns: Vec<&[u8]> = patterns.into_iter().collect();
    patterns.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    let mut script = Vec::new();
    for pattern in patterns {
        script.extend_from_slice(b"s/");
        for &byte in pattern {
            match byte {
                // Special in a basic regular expression, or the delimiter.
                b'\\' | b'.' | b'*' | b'[' | b']' | b'^' | b'$' | b'/' => script.extend_from_slice(&[b'\\', byte]),
                b'\n' => script.extend_from_slice(b"\\n"),
                0 => script.extend_from_slice(b"\\x00"),
                _ => script.push(byte),
            }
        }
        script.extend_from_slice(b"/[REDACTED]/g\n");
    }
    script
}

/// `count` deterministic secrets of 6 to 40 bytes, shaped like passwords and
/// API tokens.
pub fn bench_secrets(count: usize) -> Vec<Vec<u8>> {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=!@#%&*.:~";
    let mut rng = Rng(0x5EC2_E7AB_1E5E_ED01);
    (0..count)
        .map(|i| {
            let len = 6 + (i * 7 + rng.below(5)) % 35;
            let prefix: &[u8] = match i % 4 {
                0 => b"ghp_",
                1 => b"sk-",
                _ => b"",
            };
            let mut secret = prefix.to_vec();
            while secret.len() < len.max(prefix.len() + 2) {
                secret.push(CHARS[rng.below(CHARS.len())]);
            }
            secret
        })
        .collect()
}

/// About `total_bytes` of log output: timestamped text lines, JSON lines,
/// base64 payloads and stack-trace-like lines, with one of `secrets` (raw,
/// base64 in a Basic auth header, percent-encoded in a URL, or in JSON) in
/// about one line out of 200.
pub fn log_text(secrets: &[Vec<u8>], total_bytes: usize) -> Vec<u8> {
    log_text_with(secrets, total_bytes, 200)
}

/// [`log_text`] with a secret in about one line out of `secret_every`.
pub fn log_text_with(secrets: &[Vec<u8>], total_bytes: usize, secret_every: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "request",
        "completed",
        "user",
        "session",
        "cache",
        "miss",
        "hit",
        "retrying",
        "connection",
        "timeout",
        "upstream",
        "worker",
        "started",
        "finished",
        "GET",
        "POST",
        "/api/v1/items",
        "status=200",
        "status=404",
        "bytes=512",
        "took",
        "ms",
        "ok",
        "error:",
        "warning:",
        "compiling",
        "crate",
        "test",
        "passed",
        "failed",
    ];
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    let mut out = Vec::with_capacity(total_bytes + 512);
    let mut blob = Vec::new();
    let mut line_no = 0u64;
    while out.len() < total_bytes {
        line_no += 1;
        let secs = line_no / 50;
        let stamp = format!(
            "2025-03-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + secs / 86_400 % 28,
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            line_no % 1000
        );
        let secret = (!secrets.is_empty() && rng.below(secret_every) == 0).then(|| &secrets[rng.below(secrets.len())]);
        if let Some(secret) = secret {
            let text = String::from_utf8_lossy(secret);
            let line = match rng.below(4) {
                0 => format!("{stamp} DEBUG env TOKEN={text} loaded\n"),
                1 => format!(
                    "{stamp} INFO > Authorization: Basic {}\n",
                    STANDARD.encode([b"deploy:".as_slice(), secret].concat())
                ),
                2 => format!(
                    "{stamp} INFO GET https://example.com/cb?token={}&x=1\n",
                    percent_encoding::percent_encode(secret, crate::patterns::NOT_UNRESERVED)
                ),
                _ => format!("{{\"ts\":\"{stamp}\",\"config\":{{\"password\":{}}}}}\n", serde_json::json!(text)),
            };
            out.extend_from_slice(line.as_bytes());
            continue;
        }
        match rng.below(10) {
            0..=4 => {
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b" INFO ");
                for _ in 0..4 + rng.below(10) {
                    out.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
                    out.push(b' ');
                }
                out.extend_from_slice(format!("id={:08x}\n", rng.next() as u32).as_bytes());
            }
            5..=6 => {
                let line = format!(
                    "{{\"ts\":\"{stamp}\",\"level\":\"debug\",\"msg\":\"{} {}\",\"latency_ms\":{},\"trace\":\"{:016x}\"}}\n",
                    WORDS[rng.below(WORDS.len())],
                    WORDS[rng.below(WORDS.len())],
                    rng.below(5000),
                    rng.next()
                );
                out.extend_from_slice(line.as_bytes());
            }
            7 => {
                blob.clear();
                blob.extend((0..48 + rng.below(160)).map(|_| rng.next() as u8));
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b" DEBUG payload=");
                out.extend_from_slice(STANDARD.encode(&blob).as_bytes());
                out.push(b'\n');
            }
            _ => {
                let line = format!(
                    "    at com.example.service.Handler{}.handle(Handler.java:{})\n",
                    rng.below(40),
                    rng.below(900)
                );
                out.extend_from_slice(line.as_bytes());
            }
        }
    }
    out.truncate(total_bytes);
    out
}

/// splitmix64: tiny, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn generated_log_contains_and_loses_secrets() {
        let secrets = bench_secrets(20);
        let input = log_text(&secrets, 200_000);
        assert_eq!(input.len(), 200_000);
        let redactor = Redactor::new(&secrets);
        let out = redactor.redact_all(&input);
        let secret_lines = |text: &[u8]| {
            text.split(|&b| b == b'\n')
                .filter(|line| {
                    let line = String::from_utf8_lossy(line);
                    ["TOKEN=", "Authorization: Basic", "cb?token=", "\"password\":"].iter().any(|m| line.contains(m))
                })
                .map(<[u8]>::to_vec)
                .collect::<Vec<_>>()
        };
        let before = secret_lines(&input);
        let after = secret_lines(&out);
        assert!(before.len() > 5, "only {} secret lines", before.len());
        assert_eq!(before.len(), after.len());
        for line in &after {
            let markers = line.windows(crate::REDACTED.len()).filter(|w| *w == crate::REDACTED).count();
            assert_eq!(markers, 1, "{}", String::from_utf8_lossy(line));
        }
        // Lines without secrets are untouched.
        let strip = |text: &[u8]| {
            text.split(|&b| b == b'\n')
                .filter(|l| !before.contains(&l.to_vec()) && !after.contains(&l.to_vec()))
                .count()
        };
        assert_eq!(strip(&input), strip(&out));
        for secret in &secrets {
            assert!(!out.windows(secret.len()).any(|w| w == secret.as_slice()));
        }
    }

    #[test]
    fn small_throughput_run() {
        let report = measure_throughput(10, 1 << 20);
        assert_eq!(report.bytes, 1 << 20);
        assert!(report.patterns > 10);
        assert!(report.output_bytes > 0);
    }

    #[test]
    fn sed_script_escapes_regex_syntax() {
        let script = sed_script([b"a.b*c[d]e^f$g/h\\i".as_slice(), b"plain-text"]);
        assert_eq!(script, b"s/a\\.b\\*c\\[d\\]e\\^f\\$g\\/h\\\\i/[REDACTED]/g\ns/plain-text/[REDACTED]/g\n");
    }

    /// Release-mode numbers for the report: `cargo test --release -p
    /// agentlab-redact -- --ignored --nocapture throughput_report`.
    #[test]
    #[ignore]
    fn throughput_report() {
        let ours = measure_throughput(100, 256 << 20);
        println!("redactor: {ours:?}");
        for secrets in [0, 10, 1000] {
            let report = measure_throughput(secrets, 64 << 20);
            println!("{secrets} secrets: {report:?}");
        }
        if let Some(sed) = measure_sed(100, 4 << 20) {
            println!("sed:      {sed:?}");
        }
    }
}
