//! The HTTP API: routes, JSON bodies, and errors as `{"error": "..."}` with a status that
//! says whose fault it was.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use super::registry::{DEFAULT_STOP_TIMEOUT, StartPlan};
use super::{Daemon, logs, proxy};
use crate::{Error, Instance, StartOptions, Stdio, image};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body: JSON, streamed logs, or a container's own response.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The largest JSON body a control request may carry.
const MAX_JSON: usize = 1 << 20;
/// How long a start waits for `waitForPorts` unless `timeoutMs` says otherwise.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error(transparent)]
    Silo(#[from] Error),
    #[error("container {0} does not exist")]
    NoSuchContainer(String),
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("request body is larger than {MAX_JSON} bytes")]
    TooLarge,
    #[error("bundle path {0:?} must be absolute")]
    RelativeBundle(PathBuf),
    #[error("field `bundle` or `image` is required (one of them, not both)")]
    BundleOrImage,
    #[error("sleepAfter must be a positive number of seconds, not {0}")]
    BadSleepAfter(f64),
    #[error("invalid TCP port {0:?}: use 1 to 65535")]
    BadPort(String),
    #[error(
        "container {id}: {} did not accept a connection within {ms} ms",
        ports_text(.ports)
    )]
    NotReady {
        id: String,
        ports: Vec<u16>,
        ms: u128,
    },
    #[error("{how} before {} accepted a connection", ports_text(.ports))]
    ExitedBeforeReady { ports: Vec<u16>, how: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("no route for {method} {path}")]
    NoRoute { method: Method, path: String },
    #[error("method {method} is not allowed on {path}: use {allow}")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("missing or wrong bearer token")]
    Unauthorized,
}

fn ports_text(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    match list.len() {
        1 => format!("TCP port {}", list[0]),
        _ => format!("TCP ports {}", list.join(", ")),
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Silo(e) => match e {
                Error::InvalidId(_)
                | Error::InvalidSignal(_)
                | Error::InvalidPort(_)
                | Error::InvalidEnv { .. }
                | Error::EmptyEntrypoint
                | Error::InvalidInstance(_)
                | Error::Bundle(_) => StatusCode::BAD_REQUEST,
                // The image the request names is missing or cannot be run as it is.
                Error::Image(
                    image::Error::Store(
                        image::store::Error::NoSuchImage(_) | image::store::Error::InvalidName(_),
                    )
                    | image::Error::Config(_),
                ) => StatusCode::BAD_REQUEST,
                Error::AlreadyRunning(_) | Error::NotRunning(_) | Error::OwnedElsewhere(_) => {
                    StatusCode::CONFLICT
                }
                Error::NeverStarted(_) => StatusCode::NOT_FOUND,
                Error::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
                Error::NotListening { .. } | Error::Http { .. } | Error::Exit(_) => {
                    StatusCode::BAD_GATEWAY
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::NoSuchContainer(_) | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::BadBody(_)
            | ApiError::RelativeBundle(_)
            | ApiError::BundleOrImage
            | ApiError::BadSleepAfter(_)
            | ApiError::BadPort(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotReady { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ExitedBeforeReady { .. } => StatusCode::BAD_GATEWAY,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut resp = json(status, &serde_json::json!({ "error": self.to_string() }));
        match self {
            ApiError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        resp
    }
}

/// `PUT /v1/containers/{id}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StartRequest {
    /// An absolute bundle path, or else
    bundle: Option<PathBuf>,
    /// the name of an image in the daemon's store, unpacked afresh for each run.
    image: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    enable_internet: bool,
    instance: Option<String>,
    /// Without it, an image's exposed TCP ports.
    wait_for_ports: Option<Vec<u32>>,
    timeout_ms: Option<u64>,
    /// Seconds without traffic after which the container is stopped.
    sleep_after: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalRequest {
    signal: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StopRequest {
    signal: Option<i32>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    reason: Option<String>,
}

/// Answers one request; failures become JSON errors.
pub(crate) async fn handle(daemon: Arc<Daemon>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match route(&daemon, req).await {
        Ok(resp) => resp,
        Err(e) => {
            // Only the daemon's own failures are worth a warning; the rest is the client's
            // or the container's business.
            if e.status() == StatusCode::INTERNAL_SERVER_ERROR {
                warn!(%method, %path, error = %e, "request failed");
            } else {
                debug!(%method, %path, error = %e, "request refused");
            }
            e.into_response()
        }
    }
}

async fn route(daemon: &Daemon, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if let Some(token) = &daemon.token
        && !authorized(&req, token)
    {
        return Err(ApiError::Unauthorized);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let not_allowed = |allow| ApiError::MethodNotAllowed {
        method: method.clone(),
        path: path.clone(),
        allow,
    };
    let no_route = || ApiError::NoRoute {
        method: method.clone(),
        path: path.clone(),
    };
    let Some(rest) = path.strip_prefix("/v1/containers") else {
        return Err(no_route());
    };
    if rest.is_empty() || rest == "/" {
        return match method {
            Method::GET => list(daemon),
            _ => Err(not_allowed("GET")),
        };
    }
    let rest = rest.strip_prefix('/').ok_or_else(no_route)?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, tail),
        None => (rest, ""),
    };
    match tail {
        "" => match method {
            Method::PUT => start(daemon, id, req).await,
            Method::GET => get(daemon, id),
            Method::DELETE => delete(daemon, id, req).await,
            _ => Err(not_allowed("GET, PUT, DELETE")),
        },
        "signal" => match method {
            Method::POST => signal(daemon, id, req).await,
            _ => Err(not_allowed("POST")),
        },
        "stop" => match method {
            Method::POST => stop(daemon, id, req).await,
            _ => Err(not_allowed("POST")),
        },
        "monitor" => match method {
            Method::GET => monitor(daemon, id).await,
            _ => Err(not_allowed("GET")),
        },
        "logs" => match method {
            Method::GET => logs(daemon, id, &req),
            _ => Err(not_allowed("GET")),
        },
        _ => match tail.strip_prefix("ports/") {
            Some(port_and_path) => ports(daemon, id, port_and_path, req).await,
            None => Err(no_route()),
        },
    }
}

fn list(daemon: &Daemon) -> Result<Response<Body>, ApiError> {
    let infos: Vec<_> = daemon
        .registry
        .list()
        .iter()
        .filter_map(|e| e.info())
        .collect();
    Ok(json(StatusCode::OK, &infos))
}

fn get(daemon: &Daemon, id: &str) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let info = entry
        .info()
        .ok_or_else(|| ApiError::NoSuchContainer(id.to_string()))?;
    Ok(json(StatusCode::OK, &info))
}

async fn start(
    daemon: &Daemon,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: StartRequest = read_json(req.into_body(), None).await?;
    let bundle = match (body.bundle, &body.image) {
        (Some(bundle), None) if !bundle.is_absolute() => {
            return Err(ApiError::RelativeBundle(bundle));
        }
        (Some(bundle), None) => bundle,
        // The registry unpacks the image and puts its bundle in.
        (None, Some(_)) => PathBuf::new(),
        _ => return Err(ApiError::BundleOrImage),
    };
    let sleep_after = match body.sleep_after {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(ApiError::BadSleepAfter(s)),
    };
    let instance = body
        .instance
        .as_deref()
        .map(str::parse::<Instance>)
        .transpose()?;
    let wait_for_ports = body
        .wait_for_ports
        .map(|ports| {
            ports
                .iter()
                .map(|&p| {
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(Error::InvalidPort(p))
                })
                .collect::<Result<Vec<u16>, Error>>()
        })
        .transpose()?;
    let plan = StartPlan {
        image: body.image,
        opts: StartOptions {
            bundle,
            env: body.env,
            entrypoint: body.entrypoint,
            enable_internet: body.enable_internet,
            egress: Vec::new(),
            instance,
            stdio: Stdio::Log,
        },
        wait_for_ports,
        timeout: body
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_READY_TIMEOUT),
        sleep_after,
    };
    let (entry, _) = daemon.registry.start(id, plan).await?;
    let info = entry
        .info()
        .ok_or_else(|| ApiError::NoSuchContainer(id.to_string()))?;
    Ok(json(StatusCode::OK, &info))
}

async fn delete(
    daemon: &Daemon,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: DeleteRequest = read_json(req.into_body(), Some(DeleteRequest::default())).await?;
    daemon.registry.destroy(id, body.reason).await?;
    Ok(no_content())
}

async fn signal(
    daemon: &Daemon,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let body: SignalRequest = read_json(req.into_body(), None).await?;
    entry.container.signal(body.signal).await?;
    Ok(no_content())
}

async fn stop(
    daemon: &Daemon,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let body: StopRequest = read_json(req.into_body(), Some(StopRequest::default())).await?;
    let run = entry
        .current_run()
        .ok_or_else(|| ApiError::NoSuchContainer(id.to_string()))?;
    let timeout = body
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_STOP_TIMEOUT);
    entry
        .stop(&run, body.signal.unwrap_or(libc::SIGTERM), timeout)
        .await?;
    get(daemon, id)
}

async fn monitor(daemon: &Daemon, id: &str) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let run = entry
        .current_run()
        .ok_or_else(|| ApiError::NoSuchContainer(id.to_string()))?;
    Ok(json(StatusCode::OK, &run.monitor().await))
}

fn logs(daemon: &Daemon, id: &str, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let run = entry
        .current_run()
        .ok_or_else(|| ApiError::NoSuchContainer(id.to_string()))?;
    let follow = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "follow" | "follow=1" | "follow=true"))
    });
    let mut resp = Response::new(logs::stream(entry, run, follow));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

/// `/v1/containers/{id}/ports/{port}[/{path...}]`: a raw TCP tunnel when asked for with
/// `Upgrade: tcp` or CONNECT on the port itself, HTTP into the container otherwise.
async fn ports(
    daemon: &Daemon,
    id: &str,
    port_and_path: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
    let (port, path) = match port_and_path.split_once('/') {
        Some((port, path)) => (port, Some(path)),
        None => (port_and_path, None),
    };
    let port: u32 = port
        .parse()
        .map_err(|_| ApiError::BadPort(port.to_string()))?;
    let port = entry.container.tcp_port(port)?.port();
    let upgrade_tcp = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"tcp"));
    if path.is_none() && (req.method() == Method::CONNECT || upgrade_tcp) {
        return proxy::tunnel(entry, port, req).await;
    }
    let mut target = format!("/{}", path.unwrap_or(""));
    if let Some(query) = req.uri().query() {
        target.push('?');
        target.push_str(query);
    }
    proxy::http(entry, port, target, req, daemon.token.is_some()).await
}

/// Checks `Authorization: Bearer TOKEN`, in time that does not depend on where it differs.
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some((scheme, given)) = value.split_at_checked(7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let want = token.as_bytes();
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Reads a JSON body; an empty one means `default` when the route has one.
async fn read_json<T>(body: Incoming, default: Option<T>) -> Result<T, ApiError>
where
    T: DeserializeOwned,
{
    // A Content-Length over the limit is refused before any of the body is read.
    if body.size_hint().lower() > MAX_JSON as u64 {
        return Err(ApiError::TooLarge);
    }
    let bytes = Limited::new(body, MAX_JSON)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::TooLarge
            } else {
                ApiError::BadBody(e.to_string())
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return default.ok_or_else(|| ApiError::BadBody("a JSON body is required".into()));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadBody(e.to_string()))
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut text = serde_json::to_vec(value).expect("API values serialize");
    text.push(b'\n');
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn no_content() -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let req = |value: &str| {
            Request::get("/")
                .header(header::AUTHORIZATION, value)
                .body(())
                .unwrap()
        };
        assert!(authorized(&req("Bearer s3cret"), "s3cret"));
        assert!(authorized(&req("bearer s3cret"), "s3cret"));
        assert!(!authorized(&req("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&req("Bearer s3cretX"), "s3cret"));
        assert!(!authorized(&req("Basic s3cret"), "s3cret"));
        assert!(!authorized(&req("Bearer"), "s3cret"));
        assert!(!authorized(&Request::get("/").body(()).unwrap(), "s3cret"));
    }

    #[test]
    fn error_messages_name_the_ports() {
        let e = ApiError::NotReady {
            id: "web".into(),
            ports: vec![8080],
            ms: 500,
        };
        assert_eq!(
            e.to_string(),
            "container web: TCP port 8080 did not accept a connection within 500 ms"
        );
        let e = ApiError::ExitedBeforeReady {
            ports: vec![80, 443],
            how: "container web exited with code 3".into(),
        };
        assert_eq!(
            e.to_string(),
            "container web exited with code 3 before TCP ports 80, 443 accepted a connection"
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }
}
