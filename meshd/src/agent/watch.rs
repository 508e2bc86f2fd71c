//! One kind listed, then watched from the list's resourceVersion, as kube-runtime's watcher
//! does it (and with its event shape), but small enough to own: the node binary does not link
//! kube-runtime. A watch that ends is resumed from the last resourceVersion seen (bookmarks
//! included); "410 Gone" relists; errors are returned to the caller, which reports them, and
//! the next call retries after a backoff (0.5 s doubling to 30 s, reset by the next success).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use kube::api::{Api, DynamicObject, ListParams, WatchEvent, WatchParams};

/// What the caller sees: a full list (`Init`, one `InitApply` per object, `InitDone`), then
/// changes.
#[derive(Debug)]
pub enum Event {
    Init,
    InitApply(DynamicObject),
    InitDone,
    Apply(DynamicObject),
    Delete(DynamicObject),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("listing failed: {0}")]
    List(#[source] kube::Error),
    #[error("starting the watch failed: {0}")]
    Watch(#[source] kube::Error),
    #[error("the watch failed: {0}")]
    Stream(#[source] kube::Error),
    #[error("the API server ended the watch: {code} {reason}: {message}")]
    Status {
        code: u16,
        reason: String,
        message: String,
    },
    #[error(
        "{source}; still refused after {} s: is the CRD installed, are the agent's credentials \
         valid, and may its ServiceAccount list and watch it (RBAC)?", .after.as_secs()
    )]
    GaveUp {
        #[source]
        source: Box<WatchError>,
        after: Duration,
    },
}

impl WatchError {
    /// A refusal that retrying will not fix by itself (the kind is not served, or RBAC
    /// forbids it), as opposed to a connection or server problem.
    fn is_refusal(&self) -> bool {
        let code = match self {
            Self::List(kube::Error::Api(s)) | Self::Watch(kube::Error::Api(s)) => s.code,
            Self::Status { code, .. } => *code,
            _ => return false,
        };
        matches!(code, 401 | 403 | 404)
    }

    /// The watcher gave up: the caller's task should end (and with it the agent).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::GaveUp { .. })
    }
}

enum State {
    /// Nothing listed yet, or a relist is due.
    List,
    /// Handing out the list.
    Listed {
        items: VecDeque<DynamicObject>,
        version: String,
    },
    /// Listed; a watch from `version` is due.
    Resume { version: String },
    Watching {
        version: String,
        stream: BoxStream<'static, kube::Result<WatchEvent<DynamicObject>>>,
    },
}

pub struct Watcher {
    api: Api<DynamicObject>,
    state: State,
    /// Set after an error: the next call waits this long first.
    backoff: Option<Duration>,
    /// Since when every attempt was refused (401/403/404).
    refused_since: Option<Instant>,
    give_up_after: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Seconds the API server keeps one watch open (kube's and client-go's default range).
const WATCH_TIMEOUT: u32 = 290;
/// How long a kind may be refused (not served, or forbidden) before the watcher gives up:
/// long enough for CRDs installed alongside the agent to appear.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

fn version_of(o: &DynamicObject) -> Option<String> {
    o.metadata.resource_version.clone()
}

impl Watcher {
    pub fn new(api: Api<DynamicObject>) -> Self {
        Self {
            api,
            state: State::List,
            backoff: None,
            refused_since: None,
            give_up_after: GIVE_UP_AFTER,
        }
    }

    #[cfg(test)]
    fn giving_up_after(mut self, after: Duration) -> Self {
        self.give_up_after = after;
        self
    }

    fn failed(&mut self, next: State) {
        self.state = next;
        self.backoff = Some(
            self.backoff
                .map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF)),
        );
    }

    /// The next event; `Err` for a failure the caller should report (the watcher goes on), or
    /// a fatal one ([`WatchError::is_fatal`]) when the kind has been refused for too long.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        let result = self.step().await;
        match &result {
            Err(e) if e.is_refusal() => {
                let since = *self.refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.give_up_after {
                    let after = since.elapsed();
                    return match result {
                        Err(source) => Err(WatchError::GaveUp {
                            source: Box::new(source),
                            after,
                        }),
                        Ok(ev) => Ok(ev),
                    };
                }
            }
            Err(_) => {}
            Ok(_) => self.refused_since = None,
        }
        result
    }

    /// The next event; a failure the watcher recovers from is logged and given to `on_error`
    /// (for status), then retried; a fatal one ends the caller's task with an error naming
    /// `kind`.
    pub async fn next_or_end(
        &mut self,
        kind: &'static str,
        mut on_error: impl FnMut(&WatchError),
    ) -> Result<Event, super::AgentError> {
        loop {
            match self.next().await {
                Ok(ev) => return Ok(ev),
                Err(e) if e.is_fatal() => return Err(super::AgentError::Watch { kind, source: e }),
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watching failed; retrying");
                    on_error(&e);
                }
            }
        }
    }

    async fn step(&mut self) -> Result<Event, WatchError> {
        if let Some(b) = self.backoff {
            tokio::time::sleep(b).await;
        }
        loop {
            match std::mem::replace(&mut self.state, State::List) {
                State::List => match self.api.list(&ListParams::default()).await {
                    Ok(list) => {
                        self.backoff = None;
                        self.state = State::Listed {
                            version: list.metadata.resource_version.unwrap_or_default(),
                            items: list.items.into(),
                        };
                        return Ok(Event::Init);
                    }
                    Err(e) => {
                        self.failed(State::List);
                        return Err(WatchError::List(e));
                    }
                },
                State::Listed { mut items, version } => match items.pop_front() {
                    Some(o) => {
                        self.state = State::Listed { items, version };
                        return Ok(Event::InitApply(o));
                    }
                    None => {
                        self.state = State::Resume { version };
                        return Ok(Event::InitDone);
                    }
                },
                State::Resume { version } => {
                    let params = WatchParams::default().timeout(WATCH_TIMEOUT);
                    match self.api.watch(&params, &version).await {
                        Ok(stream) => {
                            self.state = State::Watching {
                                version,
                                stream: stream.boxed(),
                            };
                        }
                        Err(kube::Error::Api(s)) if s.code == 410 => self.state = State::List,
                        Err(e) => {
                            self.failed(State::Resume { version });
                            return Err(WatchError::Watch(e));
                        }
                    }
                }
                State::Watching {
                    mut version,
                    mut stream,
                } => match stream.next().await {
                    // The server's timeout: resume where it ended.
                    None => self.state = State::Resume { version },
                    Some(Ok(WatchEvent::Bookmark(b))) => {
                        version = b.metadata.resource_version;
                        self.state = State::Watching { version, stream };
                    }
                    Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                        self.backoff = None;
                        version = version_of(&o).unwrap_or(version);
                        self.state = State::Watching { version, stream };
                        return Ok(Event::Apply(o));
                    }
                    Some(Ok(WatchEvent::Deleted(o))) => {
                        self.backoff = None;
                        version = version_of(&o).unwrap_or(version);
                        self.state = State::Watching { version, stream };
                        return Ok(Event::Delete(o));
                    }
                    // Too old to resume: list again (the caller gets a fresh Init).
                    Some(Ok(WatchEvent::Error(s))) if s.code == 410 => self.state = State::List,
                    Some(Ok(WatchEvent::Error(s))) => {
                        self.failed(State::Resume { version });
                        return Err(WatchError::Status {
                            code: s.code,
                            reason: s.reason,
                            message: s.message,
                        });
                    }
                    Some(Err(e)) => {
                        self.failed(State::Resume { version });
                        return Err(WatchError::Stream(e));
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that refuses every request with `code`, as an API server without the CRD (404)
    /// or with RBAC against it (403) does.
    async fn refusing_server(code: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let body = format!(
                        r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"refused","reason":"NotFound","code":{code}}}"#
                    );
                    let reply = format!(
                        "HTTP/1.1 {code} Refused\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_kind_refused_for_too_long_is_fatal_and_says_why() {
        let url = refusing_server(404).await;
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let api: Api<DynamicObject> =
            Api::all_with(client, &super::super::nodes::cilium_node_resource());
        let mut w = Watcher::new(api).giving_up_after(Duration::from_millis(600));
        let first = w.next().await.unwrap_err();
        assert!(!first.is_fatal(), "the first refusal is retried: {first}");
        let fatal = loop {
            let e = w.next().await.unwrap_err();
            if e.is_fatal() {
                break e;
            }
        };
        let text = fatal.to_string();
        assert!(
            text.contains("listing failed") && text.contains("is the CRD installed"),
            "{text}"
        );
    }
}
