//! How the client trusts the Proxmox API's certificate. PVE's certificate is
//! self-signed by default, so the choices are: the cluster CA (`ca_file`), a pinned
//! SHA-256 fingerprint of the node's certificate, or — only when explicitly asked for
//! with `insecure: true`, and with a warning — no verification at all.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::PveError;

/// Which certificate the API must present.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the API certificate (the cluster's pve-root-ca.pem).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the API certificate (DER), hex with or without colons, as
    /// `pvenode cert info` prints it.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Skip verification entirely. Never the default; logged as a warning.
    #[serde(default)]
    pub insecure: bool,
}

/// Parses `AA:BB:…` or `aabb…` into 32 bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    let bad = || format!("tls.fingerprint {text:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)");
    let mut out = [0u8; 32];
    // Decodes bytes, not chars: a multi-byte char is just invalid, and any length but
    // 64 bytes is refused.
    hex::decode_to_slice(&hex, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// The SHA-256 fingerprint of a DER certificate, colon-separated upper-case hex.
pub fn fingerprint_of(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A rustls client configuration for `tls`.
pub fn client_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, PveError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PveError::Config(format!("TLS set-up: {e}")))?;
    let chosen = [tls.ca_file.is_some(), tls.fingerprint.is_some(), tls.insecure].iter().filter(|b| **b).count();
    if chosen != 1 {
        return Err(PveError::Config(
            "set exactly one of tls.ca_file (the cluster CA, /etc/pve/pve-root-ca.pem), tls.fingerprint (the API certificate's SHA-256, `pvenode cert info`) or tls.insecure: true (no verification; not for production)".into(),
        ));
    }
    let mut config = if let Some(path) = &tls.ca_file {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| PveError::Config(format!("tls.ca_file {}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| PveError::Config(format!("tls.ca_file {}: {e}", path.display())))?;
            roots.add(cert).map_err(|e| PveError::Config(format!("tls.ca_file {}: {e}", path.display())))?;
        }
        if roots.is_empty() {
            return Err(PveError::Config(format!("tls.ca_file {} holds no certificate", path.display())));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else if let Some(text) = &tls.fingerprint {
        let pinned = parse_fingerprint(text).map_err(PveError::Config)?;
        let verifier =
            CertificateCheck { pinned: Some(pinned), algorithms: provider.signature_verification_algorithms };
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
    } else {
        tracing::warn!(
            "tls.insecure is set: the Proxmox API certificate is NOT verified, so anyone on the path can impersonate the API and take the token; pin tls.fingerprint or set tls.ca_file instead"
        );
        let verifier = CertificateCheck { pinned: None, algorithms: provider.signature_verification_algorithms };
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
    };
    // PVE speaks HTTP/1.1 and puts error texts in the reason phrase, which HTTP/2 lacks.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// With a pin, accepts exactly the certificate whose SHA-256 is pinned (name and CA do
/// not matter: the pin is the identity); without one (`insecure: true`), any. Either
/// way the handshake signature made with the certificate is still checked.
#[derive(Debug)]
struct CertificateCheck {
    pinned: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CertificateCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pinned) = self.pinned else { return Ok(ServerCertVerified::assertion()) };
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the Proxmox API certificate's SHA-256 fingerprint is {}, not the pinned one: if the node's certificate was renewed, pin the new fingerprint (`pvenode cert info`)",
                fingerprint_of(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xAB; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xAB; 32]);
        assert!(parse_fingerprint("AB:CD").unwrap_err().contains("64 hex digits"));
        assert_eq!(
            parse_fingerprint(&"ZZ".repeat(32)).unwrap_err(),
            format!(
                "tls.fingerprint {:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
                "ZZ".repeat(32)
            )
        );
    }

    #[test]
    fn a_fingerprint_of_64_bytes_with_a_multi_byte_char_is_refused() {
        // 64 bytes, the 'é' straddling the first pair of digits.
        let text = format!("A\u{e9}{}", "B".repeat(61));
        assert_eq!(text.len(), 64);
        assert_eq!(
            parse_fingerprint(&text).unwrap_err(),
            format!("tls.fingerprint {text:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
        );
    }

    #[test]
    fn exactly_one_trust_choice_is_required() {
        let err = client_config(&TlsConfig::default()).unwrap_err().to_string();
        assert!(err.contains("set exactly one of tls.ca_file"), "{err}");
        let both = TlsConfig { fingerprint: Some("AB".repeat(32)), insecure: true, ..TlsConfig::default() };
        let both_err = client_config(&both).unwrap_err().to_string();
        assert_eq!(both_err, err, "two choices are refused like none");
        let pinned = TlsConfig { fingerprint: Some("AB".repeat(32)), ..TlsConfig::default() };
        assert!(client_config(&pinned).is_ok());
    }
}
