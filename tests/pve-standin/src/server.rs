//! HTTPS on 127.0.0.1 with a fresh self-signed certificate (so clients must pin its
//! fingerprint), HTTP/1.1, handler errors in the reason phrase and the JSON body.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::Shared;
use crate::api::{Credentials, Reply, handle};

/// Starts serving; returns the address, the certificate's fingerprint and the task.
pub async fn serve(shared: Arc<Shared>) -> Result<(SocketAddr, String, tokio::task::JoinHandle<()>), String> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into(), "pve1".into()])
        .map_err(|e| format!("certificate: {e}"))?;
    let der = cert.cert.der().clone();
    let fingerprint = agentlab_host::backend::proxmox::tls::fingerprint_of(der.as_ref());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).map_err(|e| format!("key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .map_err(|e| format!("TLS: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |req| respond(shared.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    Ok((addr, fingerprint, task))
}

/// Dropping a connection: the service fails, and hyper closes it without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}

async fn respond(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let creds = Credentials {
        authorization: header("authorization"),
        cookie: header("cookie"),
        csrf: header("csrfpreventiontoken"),
    };
    let mut params: Vec<(String, String)> =
        serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if !body.is_empty() {
        match serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body) {
            Ok(form) => params.extend(form),
            Err(e) => {
                return Ok(reply(
                    Reply::Error {
                        status: 400,
                        message: format!("unable to parse form: {e}"),
                        errors: Default::default(),
                    },
                    shared.options.legacy_errors,
                ));
            }
        }
    }
    match handle(&shared, &method, &path, params, creds).await {
        Reply::Drop => Err(Dropped),
        other => Ok(reply(other, shared.options.legacy_errors)),
    }
}

fn reply(r: Reply, legacy: bool) -> Response<Full<Bytes>> {
    let (status, reason, body) = match r {
        Reply::Data(data) => (200, None, json!({ "data": data })),
        Reply::Error { status, message, errors } => {
            let mut body = if legacy {
                json!({ "data": null })
            } else {
                json!({ "data": null, "message": format!("{message}\n") })
            };
            if !errors.is_empty() {
                body["errors"] = json!(errors);
            }
            (status, Some(message), body)
        }
        Reply::Drop => (500, None, json!({ "data": null })),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert("content-type", hyper::header::HeaderValue::from_static("application/json;charset=UTF-8"));
    if let Some(reason) = reason {
        // Like pve-http-server: the handler's error is the reason phrase (one line).
        let line: String = reason.replace(['\r', '\n'], " ").trim().to_owned();
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(line.into_bytes()) {
            resp.extensions_mut().insert(phrase);
        }
    }
    resp
}
