//! The HTTP client behind the CLI's client commands (`send`, `state`,
//! `stream`, `plugins`, `subscribe`): the CLI is a client of the same API as
//! everyone.

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

/// What `rehydra send` may add to a command besides its name and target.
#[derive(Debug, Default, Clone, Copy)]
pub struct SendOptions<'a> {
    /// The command's fields as a JSON object (`{}` when `None`).
    pub data: Option<&'a str>,
    /// Fail unless the aggregate is at this version (`If-Match`).
    pub expect_version: Option<u64>,
    /// The `Idempotency-Key`.
    pub idempotency_key: Option<&'a str>,
    /// Only report what the command would do (`?dry_run=true`).
    pub dry_run: bool,
}

impl Client {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Self {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// A client that sends `Authorization: Bearer <token>` with every call.
    pub fn with_token(base: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let Some(token) = token else {
            return Ok(Self::new(base));
        };
        let bad = |reason: String| ClientError::Unreachable {
            url: base.to_string(),
            reason,
        };
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| bad("the token must be printable ASCII".into()))?;
        value.set_sensitive(true);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, value);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// Follows `GET /v1/subscribe` (server-sent events), calling `on_event`
    /// with each message's event name (`event`, `caught-up`, `error`) and
    /// its JSON data, until `on_event` returns `false`, the server ends the
    /// stream (`Ok`), or the connection fails.
    pub async fn subscribe(
        &self,
        from: &str,
        categories: &[String],
        event_types: &[String],
        mut on_event: impl FnMut(&str, Value) -> bool,
    ) -> Result<(), ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        };
        let resp = self
            .http
            .get(format!("{}/v1/subscribe", self.base))
            .query(&[
                ("from", from.to_string()),
                ("category", categories.join(",")),
                ("event_type", event_types.join(",")),
            ])
            .send()
            .await
            .map_err(unreachable)?;
        if resp.status() != StatusCode::OK {
            return Err(api_error(resp).await);
        }
        let mut body = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = tokio_stream::StreamExt::next(&mut body).await {
            pending.extend_from_slice(&chunk.map_err(unreachable)?);
            // Messages end with a blank line.
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let message: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&message);
                let mut name = "message";
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let value = serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                if !on_event(name, value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends a command.
    pub async fn send(
        &self,
        aggregate_type: &str,
        id: &str,
        command: &str,
        options: &SendOptions<'_>,
    ) -> Result<Value, ClientError> {
        let url = format!(
            "{}/v1/aggregates/{}/{}/commands/{}{}",
            self.base,
            segment(aggregate_type),
            segment(id),
            segment(command),
            if options.dry_run { "?dry_run=true" } else { "" }
        );
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(options.data.unwrap_or("{}").to_string());
        if let Some(v) = options.expect_version {
            req = req.header("if-match", v.to_string());
        }
        if let Some(k) = options.idempotency_key {
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

    /// The pending timers: all, or those of aggregate `TYPE/ID`.
    pub async fn timers(
        &self,
        aggregate: Option<&str>,
        limit: usize,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .get(format!("{}/v1/timers", self.base))
            .query(&[("limit", limit.to_string())]);
        if let Some(a) = aggregate {
            req = req.query(&[("aggregate", a)]);
        }
        self.finish(req).await
    }

    /// The process managers, their checkpoints and parked events.
    pub async fn processes(&self) -> Result<Value, ClientError> {
        self.finish(self.http.get(format!("{}/v1/processes", self.base)))
            .await
    }

    /// The kept versions of plugin `name`.
    pub async fn versions(&self, name: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/plugins/{}/versions", self.base, segment(name));
        self.finish(self.http.get(url)).await
    }

    /// Serves the previous version of plugin `name` again.
    pub async fn rollback(&self, name: &str) -> Result<Value, ClientError> {
        let url = format!("{}/v1/plugins/{}/rollback", self.base, segment(name));
        self.finish(self.http.post(url)).await
    }

    async fn finish(&self, req: reqwest::RequestBuilder) -> Result<Value, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        if resp.status() != StatusCode::OK {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(unreachable)
    }
}

/// The error a non-200 response stands for.
async fn api_error(resp: reqwest::Response) -> ClientError {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("the server answered an error without a body")
        .to_string();
    ClientError::Api {
        status,
        code,
        message,
        body,
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
