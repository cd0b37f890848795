//! Streaming secret redaction (in progress).
