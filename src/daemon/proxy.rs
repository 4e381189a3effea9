//! Traffic into containers: HTTP requests (streamed both ways), protocol upgrades such as
//! WebSocket, and raw TCP tunnels. Each open request or tunnel holds an activity guard, so
//! that `sleepAfter` sees the container as busy until the last byte has gone through.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::api::{ApiError, Body, BoxError, empty};
use super::registry::{ActivityGuard, Entry};
use crate::Error;

/// Headers that describe one connection, not the message: never forwarded as they are.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Sends the request to `port` inside the container, at `target` (path and query), and
/// streams the answer back. `strip_auth` drops the Authorization header: when the daemon
/// checks a token, that header carries the daemon's secret, not the application's.
pub(crate) async fn http(
    entry: Arc<Entry>,
    port: u16,
    target: String,
    mut req: Request<Incoming>,
    strip_auth: bool,
) -> Result<Response<Body>, ApiError> {
    let guard = entry.activity();
    let tcp_port = entry.container.tcp_port(port.into())?;
    let upgrade = requested_upgrade(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if strip_auth {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(protocol) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = target.parse().map_err(|_| ApiError::NoRoute {
        method: out.method().clone(),
        path: target.clone(),
    })?;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;

    let Some(client_upgrade) = client_upgrade else {
        let resp = tcp_port.fetch(out).await?;
        return Ok(relay(resp, guard));
    };

    // The library's fetch cannot hand over its connection after a 101, so upgrades get a
    // connection of their own.
    let http_err = |source| Error::Http {
        id: entry.id.clone(),
        port,
        source,
    };
    let stream = tcp_port.connect().await?;
    if !out.headers().contains_key(header::HOST)
        && let Ok(addr) = stream.peer_addr()
        && let Ok(host) = HeaderValue::from_str(&addr.to_string())
    {
        out.headers_mut().insert(header::HOST, host);
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upgraded connection to the container failed");
        }
    });
    let mut resp = sender.send_request(out).await.map_err(http_err)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(relay(resp, guard));
    }
    let container_upgrade = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
    }
    tokio::spawn(splice(client_upgrade, container_upgrade, guard));
    Ok(Response::from_parts(parts, empty()))
}

/// A raw byte stream to `port`: `CONNECT` answers 200, `Upgrade: tcp` answers 101, and the
/// connection then carries bytes both ways until either side closes. The port is connected
/// first, so that a port nobody listens on is a 502 rather than a tunnel that closes at once.
pub(crate) async fn tunnel(
    entry: Arc<Entry>,
    port: u16,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let guard = entry.activity();
    let stream = entry.container.tcp_port(port.into())?.connect().await?;
    let client = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match client.await {
            Ok(upgraded) => copy(TokioIo::new(upgraded), stream).await,
            Err(e) => debug!(error = %e, "tunnel client went away before the upgrade"),
        }
        drop(guard);
    });
    let mut resp = Response::new(empty());
    if req.method() != http::Method::CONNECT {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    }
    Ok(resp)
}

/// Joins the two halves of an upgraded connection once both have switched protocols.
async fn splice(client: OnUpgrade, container: OnUpgrade, guard: ActivityGuard) {
    match tokio::join!(client, container) {
        (Ok(client), Ok(container)) => {
            let mut client = TokioIo::new(client);
            let mut container = TokioIo::new(container);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut container).await {
                debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        (Err(e), _) | (_, Err(e)) => debug!(error = %e, "upgrade failed"),
    }
    drop(guard);
}

async fn copy<S>(mut client: S, mut container: TcpStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut container).await {
        debug!(error = %e, "tunnel ended with an error");
    }
}

/// The container's response, without its connection's headers, its body streamed on.
fn relay(resp: Response<Incoming>, guard: ActivityGuard) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Guarded {
        body,
        _guard: guard,
    };
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

/// The protocol asked for with `Connection: upgrade` and `Upgrade: X`, if any.
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    wants
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Connection may name further headers that are about this connection only.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// A body that holds an activity guard until it is finished or dropped.
struct Guarded<B> {
    body: B,
    _guard: ActivityGuard,
}

impl<B: HttpBody + Unpin> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn upgrades_need_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(requested_upgrade(&h).is_none());
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert_eq!(requested_upgrade(&h).unwrap(), "websocket");
    }
}
