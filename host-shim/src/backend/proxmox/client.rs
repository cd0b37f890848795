//! The Proxmox VE API client: reqwest over rustls, API-token auth, connect and request
//! timeouts, errors that keep everything Proxmox said, and bounded jittered retries of
//! what is safe to retry.

use std::error::Error as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, Attempts, PROXY_CONNECT_FAILED, PROXY_CONNECTION_LOST, PveError};
use super::tls::{TlsConfig, client_config};

/// How to reach and authenticate to the API.
#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    /// `https://HOST:8006` (the `/api2/json` prefix is added).
    pub api_url: String,
    /// `USER@REALM!TOKENID`.
    pub token_id: String,
    /// The token's UUID secret. Never logged.
    pub token_secret: Secret,
    pub tls: TlsConfig,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
}

/// A credential: its Debug form is redacted, so a logged config cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Bounded, jittered exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, base: Duration::from_millis(100), cap: Duration::from_secs(3) }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1`: exponential, capped, with full jitter in
    /// its upper half so parallel clients spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.cap);
        let half = exp / 2;
        let jitter = rand::rng().random_range(0..=u64::try_from(half.as_micros()).unwrap_or(u64::MAX));
        half + Duration::from_micros(jitter)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn as_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// Credentials for one request.
#[derive(Clone, Debug)]
pub enum Auth<'a> {
    /// The configured API token.
    Token,
    /// A root@pam ticket (only for what tokens may not do: `args`).
    Ticket { ticket: &'a str, csrf: &'a str },
}

/// One attempt's failure, before it becomes a [`PveError`].
#[derive(Debug)]
enum Failure {
    Api(ApiError),
    /// The request never left: nothing can have happened.
    NotSent(String),
    /// The TLS handshake refused the API's certificate: nothing was sent, and trying
    /// again meets the same certificate.
    Untrusted(String),
    /// The connection broke or timed out after the request was sent.
    Broken(String),
    Decode(String),
}

impl Failure {
    /// Retrying cannot duplicate anything: the call demonstrably did not run.
    fn safe_to_retry(&self) -> bool {
        match self {
            Failure::Api(e) => e.is_lock_timeout() || e.is_vm_locked() || e.status == PROXY_CONNECT_FAILED,
            Failure::NotSent(_) => true,
            Failure::Untrusted(_) | Failure::Broken(_) | Failure::Decode(_) => false,
        }
    }

    /// The call may or may not have run: transient, but only idempotent calls may be
    /// repeated blindly.
    fn ambiguous(&self) -> bool {
        match self {
            Failure::Api(e) => e.status == PROXY_CONNECTION_LOST,
            Failure::Broken(_) => true,
            Failure::NotSent(_) | Failure::Untrusted(_) | Failure::Decode(_) => false,
        }
    }

    fn into_error(self, op: &str, attempts: u32) -> PveError {
        let op = op.to_owned();
        let attempts = Attempts(attempts);
        match self {
            Failure::Api(error) => PveError::Api { op, error, attempts },
            Failure::NotSent(detail) | Failure::Untrusted(detail) | Failure::Broken(detail) => {
                PveError::Transport { op, detail, attempts }
            }
            Failure::Decode(detail) => PveError::Decode { op, detail },
        }
    }
}

/// How to tell whether a non-idempotent call took effect: GET `path` and judge the
/// answer (`None`: the VM does not exist).
pub struct Check<'a> {
    pub path: String,
    pub applied: &'a (dyn Fn(Option<&Value>) -> bool + Sync),
}

/// The answer of a non-idempotent call that failed ambiguously.
pub enum Outcome {
    /// The call's own answer.
    Answered(Value),
    /// The call's answer was lost, but the check found its effect in place.
    AlreadyApplied,
}

/// Most API requests in flight at once: pveproxy runs few workers, and a burst of
/// sandboxes should queue here rather than pile up connections there.
const MAX_IN_FLIGHT: usize = 16;

pub struct PveClient {
    http: reqwest::Client,
    in_flight: tokio::sync::Semaphore,
    base: String,
    token_header: String,
    retry: RetryPolicy,
    requests: AtomicU64,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Option<serde_json::Map<String, Value>>,
}

impl PveClient {
    pub fn new(config: &ConnectionConfig) -> Result<PveClient, PveError> {
        let url = config.api_url.trim_end_matches('/');
        if !url.starts_with("https://") {
            return Err(PveError::Config(format!(
                "api_url {url:?} must be https://HOST:8006: the token travels in every request"
            )));
        }
        if !config.token_id.contains('@') || !config.token_id.contains('!') {
            return Err(PveError::Config(format!(
                "token_id {:?} is not USER@REALM!TOKENID (e.g. agentlab@pve!shim)",
                config.token_id
            )));
        }
        let tls = client_config(&config.tls)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build()
            .map_err(|e| PveError::Config(format!("building the HTTP client: {e}")))?;
        Ok(PveClient {
            http,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            base: format!("{url}/api2/json"),
            token_header: format!("PVEAPIToken={}={}", config.token_id, config.token_secret.0),
            retry: config.retry,
            requests: AtomicU64::new(0),
        })
    }

    /// HTTP requests sent so far (every attempt counts).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// An idempotent call (GET, PUT of settings, anything whose repetition is harmless):
    /// every transient failure is retried.
    pub async fn call(
        &self,
        op: &str,
        method: Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Value, PveError> {
        self.call_as(op, method, path, params, &Auth::Token).await
    }

    pub async fn call_as(
        &self,
        op: &str,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        auth: &Auth<'_>,
    ) -> Result<Value, PveError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(method, path, params, auth).await {
                Ok(value) => return Ok(value),
                Err(f) if (f.safe_to_retry() || f.ambiguous()) && attempt < self.retry.max_attempts => {
                    tracing::debug!("{op}: attempt {attempt} failed, retrying: {f:?}");
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                }
                Err(f) => return Err(f.into_error(op, attempt)),
            }
        }
    }

    /// A call that must not run twice (clone, start, delete). Failures that prove it did
    /// not run are retried; when it may have run, `check` is made first, and the call
    /// is repeated only if its effect is not there.
    pub async fn call_once(
        &self,
        op: &str,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        check: Check<'_>,
    ) -> Result<Outcome, PveError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(method, path, params, &Auth::Token).await {
                Ok(value) => return Ok(Outcome::Answered(value)),
                Err(f) => f,
            };
            if attempt >= self.retry.max_attempts || !(failure.safe_to_retry() || failure.ambiguous()) {
                return Err(failure.into_error(op, attempt));
            }
            tokio::time::sleep(self.retry.delay(attempt)).await;
            if failure.ambiguous() {
                tracing::info!("{op}: the answer was lost ({failure:?}); checking whether it took effect");
                let seen = match self.call(op, Method::Get, &check.path, &[]).await {
                    Ok(value) => Some(value),
                    Err(e) if e.is_missing_vm() => None,
                    Err(e) => return Err(e),
                };
                if (check.applied)(seen.as_ref()) {
                    return Ok(Outcome::AlreadyApplied);
                }
            }
        }
    }

    /// One HTTP request, no retries.
    async fn attempt(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        auth: &Auth<'_>,
    ) -> Result<Value, Failure> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.in_flight.acquire().await.map_err(|e| Failure::NotSent(e.to_string()))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.as_reqwest(), &url);
        req = match method {
            Method::Get | Method::Delete => req.query(params),
            Method::Post | Method::Put => req.form(params),
        };
        req = match auth {
            Auth::Token => req.header(reqwest::header::AUTHORIZATION, &self.token_header),
            Auth::Ticket { ticket, csrf } => req
                .header(reqwest::header::COOKIE, format!("PVEAuthCookie={ticket}"))
                .header("CSRFPreventionToken", *csrf),
        };
        let resp = req.send().await.map_err(|e| {
            let detail = error_chain(&e);
            if is_tls_refusal(&e) {
                Failure::Untrusted(detail)
            } else if e.is_connect() {
                Failure::NotSent(detail)
            } else {
                Failure::Broken(detail)
            }
        })?;
        let status = resp.status();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let body = resp.bytes().await.map_err(|e| Failure::Broken(error_chain(&e)))?;
        if status.is_success() {
            let mut value: Value = serde_json::from_slice(&body)
                .map_err(|e| Failure::Decode(format!("HTTP {status}: body is not JSON ({e})")))?;
            return Ok(value.get_mut("data").map(Value::take).unwrap_or(Value::Null));
        }
        let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let (message, errors) = match parsed {
            Some(b) => (b.message, b.errors.unwrap_or_default()),
            None => (None, Default::default()),
        };
        let errors =
            errors.into_iter().map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect();
        Err(Failure::Api(ApiError { status: status.as_u16(), reason, message, errors }))
    }
}

/// Whether rustls itself refused the connection (a certificate that fails the pin or
/// the CA): a network fault shows up as a plain I/O error instead.
fn is_tls_refusal(e: &reqwest::Error) -> bool {
    // The connector nests rustls's error in I/O errors, whose `source` skips it.
    fn is_rustls(err: &(dyn std::error::Error + 'static)) -> bool {
        err.is::<rustls::Error>()
            || err
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| is_rustls(inner))
    }
    let mut source = e.source();
    while let Some(s) = source {
        if is_rustls(s) {
            return true;
        }
        source = s.source();
    }
    false
}

/// An error and its causes, e.g. "error sending request: connection reset by peer".
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy { max_attempts: 5, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        for attempt in 0..20 {
            let d = p.delay(attempt);
            let exp = Duration::from_millis(100).saturating_mul(1 << attempt.min(16)).min(Duration::from_secs(1));
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| p.delay(3)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        assert_eq!(format!("{:?}", Secret("5f8e2a8e".into())), "[redacted]");
    }

    #[test]
    fn a_client_needs_https_and_a_token_id() {
        let mut c = ConnectionConfig {
            api_url: "http://pve:8006".into(),
            token_id: "agentlab@pve!shim".into(),
            token_secret: Secret("s".into()),
            tls: TlsConfig { insecure: true, ..TlsConfig::default() },
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        };
        assert!(PveClient::new(&c).err().unwrap().to_string().contains("must be https://"));
        c.api_url = "https://pve:8006".into();
        c.token_id = "agentlab".into();
        assert!(PveClient::new(&c).err().unwrap().to_string().contains("USER@REALM!TOKENID"));
    }

    #[test]
    fn which_failures_are_retried() {
        let api = |status, reason: &str| {
            Failure::Api(ApiError { status, reason: reason.into(), message: None, errors: Default::default() })
        };
        assert!(api(500, "can't lock file '/var/lock/qemu-server/lock-1.conf' - got timeout").safe_to_retry());
        assert!(api(500, "VM is locked (clone)").safe_to_retry());
        assert!(api(595, "Errors during connection establishment").safe_to_retry());
        assert!(api(596, "Connection timed out").ambiguous());
        assert!(!api(596, "x").safe_to_retry());
        assert!(!api(500, "storage 'local' is offline").safe_to_retry());
        assert!(!api(500, "storage 'local' is offline").ambiguous());
        assert!(Failure::Broken("reset".into()).ambiguous());
        assert!(Failure::NotSent("refused".into()).safe_to_retry());
    }
}
