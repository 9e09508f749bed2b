//! The HTTP client behind the CLI's client commands (`send`, `state`,
//! `stream`, `plugins`): the CLI is a client of the same API as everyone.

use reqwest::StatusCode;
use serde_json::Value;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{code}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable error code.
        code: String,
        /// The server's message.
        message: String,
        /// The whole error body.
        body: Value,
    },
    /// The server could not be reached or answered something unreadable.
    #[error(
        "cannot reach the rehydra server at {url}: {reason}. Is `rehydra run` running there? Pass --server URL otherwise"
    )]
    Unreachable {
        /// The server's URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// A client of one server.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Sends a command.
    pub async fn send(
        &self,
        aggregate_type: &str,
        id: &str,
        command: &str,
        data: Option<&str>,
        expect_version: Option<u64>,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let url = format!(
            "{}/v1/aggregates/{}/{}/commands/{}",
            self.base,
            segment(aggregate_type),
            segment(id),
            segment(command)
        );
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(data.unwrap_or("{}").to_string());
        if let Some(v) = expect_version {
            req = req.header("if-match", v.to_string());
        }
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        self.finish(req).await
    }

    /// An aggregate's state.
    pub async fn state(&self, aggregate_type: &str, id: &str) -> Result<Value, ClientError> {
        let url = format!(
            "{}/v1/aggregates/{}/{}",
            self.base,
            segment(aggregate_type),
            segment(id)
        );
        self.finish(self.http.get(url)).await
    }

    /// A page of a stream.
    pub async fn stream(&self, name: &str, from: u64, limit: usize) -> Result<Value, ClientError> {
        let url = format!(
            "{}/v1/streams/{}?from={from}&limit={limit}",
            self.base,
            segment(name)
        );
        self.finish(self.http.get(url)).await
    }

    /// The loaded plugins.
    pub async fn plugins(&self) -> Result<Value, ClientError> {
        self.finish(self.http.get(format!("{}/v1/plugins", self.base)))
            .await
    }

    async fn finish(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(unreachable)?;
        if status == StatusCode::OK {
            return Ok(body);
        }
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        let message = body["error"]["message"].as_str().unwrap_or("").to_string();
        Err(ClientError::Api {
            status: status.as_u16(),
            code,
            message,
            body,
        })
    }
}

/// Percent-encodes one path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn segments_are_encoded() {
        assert_eq!(super::segment("acc-1"), "acc-1");
        assert_eq!(super::segment("a/b c"), "a%2Fb%20c");
    }
}
