//! A small HTTP client for shoal's JSON API, used by the CLI subcommands
//! and by node-to-node calls, which it signs ([`Client::signed`],
//! `peer_auth.rs`) so that the receiver honours their `x-shoal-*` headers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::ErrorBody;
use crate::peer_auth::PeerAuth;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad node url `{0}`")]
    Url(String),
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} timed out")]
    Timeout { url: String },
    #[error("{status}: {}{}{}", body.error, body.field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default(), body.request_id.as_ref().map(|r| format!(" [request {r}]")).unwrap_or_default())]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
}

tokio::task_local! {
    /// The id of the API request this task serves (set by the daemon's
    /// request guard): node-to-node calls made while serving it carry it
    /// on, so every node logs that request under the same id.
    pub static REQUEST_ID: String;
}

/// A client for one node's API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    headers: Vec<(String, String)>,
    /// Signs every request as a call from this node to the named node.
    signer: Option<(Arc<PeerAuth>, String)>,
}

impl Client {
    /// `base` is the node's URL, such as `http://127.0.0.1:7070`.
    pub fn new(base: &str, timeout: Duration) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(ClientError::Url(base));
        }
        let http = HyperClient::builder(TokioExecutor::new()).build_http();
        Ok(Client {
            base,
            http,
            timeout,
            headers: Vec::new(),
            signer: None,
        })
    }

    /// The same client, sending `name: value` with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Client {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The same client, signing every request with this node's key as a
    /// call to node `to` (which checks it was meant for itself).
    pub fn signed(mut self, auth: Arc<PeerAuth>, to: &str) -> Client {
        self.signer = Some((auth, to.to_string()));
        self
    }

    /// Adds the configured headers and, for a node-to-node client, the
    /// signature over the request as it will be sent.
    fn finish(&self, req: &mut Request<Full<Bytes>>, body: &[u8]) {
        let h = req.headers_mut();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                hyper::header::HeaderName::from_bytes(k.as_bytes()),
                hyper::header::HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
        if let Some((auth, to)) = &self.signer {
            let target = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
            let signed = auth.sign(req.method().as_str(), &target, body, to);
            for (k, v) in signed.headers() {
                if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                    req.headers_mut().insert(k, v);
                }
            }
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns the status and raw body.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Ok(id) = REQUEST_ID.try_with(|id| id.clone()) {
            req = req.header("x-request-id", id);
        }
        let body = Bytes::from(body.unwrap_or_default());
        let mut req = req
            .body(Full::new(body.clone()))
            .map_err(|_| ClientError::Url(url.clone()))?;
        self.finish(&mut req, &body);
        let call = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url: url.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout { url: url.clone() })?
    }

    /// Sends a JSON request and decodes a JSON answer; an error status
    /// becomes [`ClientError::Api`] with the server's error body.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request serializes"));
        let (status, bytes) = self.send_raw(method, path, body).await?;
        if !status.is_success() {
            let body = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                field: None,
                resource: None,
                reasons: Vec::new(),
                request_id: None,
            });
            return Err(ClientError::Api { status, body });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: format!("{}{path}", self.base),
            message: e.to_string(),
        })
    }

    /// GETs a streaming answer (server-sent events) and hands each chunk
    /// of the body to `on_chunk` as it arrives, until the server ends it.
    /// Only connecting is bounded by the timeout.
    pub async fn stream(
        &self,
        path: &str,
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|_| ClientError::Url(url.clone()))?;
        self.finish(&mut req, &[]);
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        };
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout { url: url.clone() })?
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| unreachable(&e))?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(ErrorBody {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                field: None,
                resource: None,
                reasons: Vec::new(),
                request_id: None,
            });
            return Err(ClientError::Api { status, body });
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(&e))?;
            if let Some(data) = frame.data_ref() {
                on_chunk(data);
            }
        }
        Ok(())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }
}
