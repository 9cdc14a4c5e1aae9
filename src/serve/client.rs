//! A small HTTP/1 client (hyper) for driving a server: what `pals bench --serve` and the
//! tests use. Connections are pooled and kept alive, as a real client's would be.

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A status and a body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!("status {}, body not JSON: {}", self.status, String::from_utf8_lossy(&self.body))
        })
    }
}

#[derive(Clone)]
pub struct Client {
    pool: Pool<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client { pool: Pool::builder(TokioExecutor::new()).build_http() }
    }
}

impl Client {
    pub async fn get(&self, url: &str) -> Result<Reply> {
        self.send(Method::GET, url, Bytes::new()).await
    }

    /// POSTs `body` (JSON or not: tests send malformed bodies on purpose).
    pub async fn post(&self, url: &str, body: impl Into<Bytes>) -> Result<Reply> {
        self.send(Method::POST, url, body.into()).await
    }

    pub async fn post_json(&self, url: &str, value: &serde_json::Value) -> Result<Reply> {
        self.post(url, serde_json::to_vec(value)?).await
    }

    async fn send(&self, method: Method, url: &str, body: Bytes) -> Result<Reply> {
        let request = Request::builder()
            .method(method.clone())
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .with_context(|| format!("building {method} {url}"))?;
        let response = self.pool.request(request).await.with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.with_context(|| format!("reading {url}"))?.to_bytes();
        Ok(Reply { status, body: body.to_vec() })
    }
}
