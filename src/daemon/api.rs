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
pub(crate) struct StartRequest {
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

impl StartRequest {
    /// Checks the request and turns it into what the registry starts.
    pub(crate) fn into_plan(self) -> Result<StartPlan, ApiError> {
        let bundle = match (self.bundle, &self.image) {
            (Some(bundle), None) if !bundle.is_absolute() => {
                return Err(ApiError::RelativeBundle(bundle));
            }
            (Some(bundle), None) => bundle,
            // The registry unpacks the image and puts its bundle in.
            (None, Some(_)) => PathBuf::new(),
            _ => return Err(ApiError::BundleOrImage),
        };
        let sleep_after = match self.sleep_after {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Some(Duration::from_secs_f64(s)),
            Some(s) => return Err(ApiError::BadSleepAfter(s)),
        };
        let instance = self
            .instance
            .as_deref()
            .map(str::parse::<Instance>)
            .transpose()?;
        let wait_for_ports = self
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
        Ok(StartPlan {
            image: self.image,
            opts: StartOptions {
                bundle,
                env: self.env,
                entrypoint: self.entrypoint,
                enable_internet: self.enable_internet,
                egress: Vec::new(),
                instance,
                stdio: Stdio::Log,
            },
            wait_for_ports,
            timeout: self
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_READY_TIMEOUT),
            sleep_after,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignalRequest {
    signal: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct StopRequest {
    signal: Option<i32>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteRequest {
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

/// What a request asks for, from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    List,
    Start(&'a str),
    Get(&'a str),
    Delete(&'a str),
    Signal(&'a str),
    Stop(&'a str),
    Monitor(&'a str),
    Logs(&'a str),
    /// `port` is checked only once the container is known to exist, so that a request for
    /// a missing container says so whatever port it names.
    Port {
        id: &'a str,
        port: &'a str,
        path: Option<&'a str>,
    },
}

impl<'a> Route<'a> {
    /// Routes `method` on `path` (the URI's path, without the query).
    pub(crate) fn parse(method: &Method, path: &'a str) -> Result<Route<'a>, ApiError> {
        let not_allowed = |allow| ApiError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_string(),
            allow,
        };
        let no_route = || ApiError::NoRoute {
            method: method.clone(),
            path: path.to_string(),
        };
        let Some(rest) = path.strip_prefix("/v1/containers") else {
            return Err(no_route());
        };
        if rest.is_empty() || rest == "/" {
            return match *method {
                Method::GET => Ok(Route::List),
                _ => Err(not_allowed("GET")),
            };
        }
        let rest = rest.strip_prefix('/').ok_or_else(no_route)?;
        let (id, tail) = match rest.split_once('/') {
            Some((id, tail)) => (id, tail),
            None => (rest, ""),
        };
        match tail {
            "" => match *method {
                Method::PUT => Ok(Route::Start(id)),
                Method::GET => Ok(Route::Get(id)),
                Method::DELETE => Ok(Route::Delete(id)),
                _ => Err(not_allowed("GET, PUT, DELETE")),
            },
            "signal" => match *method {
                Method::POST => Ok(Route::Signal(id)),
                _ => Err(not_allowed("POST")),
            },
            "stop" => match *method {
                Method::POST => Ok(Route::Stop(id)),
                _ => Err(not_allowed("POST")),
            },
            "monitor" => match *method {
                Method::GET => Ok(Route::Monitor(id)),
                _ => Err(not_allowed("GET")),
            },
            "logs" => match *method {
                Method::GET => Ok(Route::Logs(id)),
                _ => Err(not_allowed("GET")),
            },
            _ => match tail.strip_prefix("ports/") {
                Some(port_and_path) => {
                    let (port, path) = match port_and_path.split_once('/') {
                        Some((port, path)) => (port, Some(path)),
                        None => (port_and_path, None),
                    };
                    Ok(Route::Port { id, port, path })
                }
                None => Err(no_route()),
            },
        }
    }
}

async fn route(daemon: &Daemon, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if let Some(token) = &daemon.token
        && !authorized(&req, token)
    {
        return Err(ApiError::Unauthorized);
    }
    let path = req.uri().path().to_string();
    match Route::parse(req.method(), &path)? {
        Route::List => list(daemon),
        Route::Start(id) => start(daemon, id, req).await,
        Route::Get(id) => get(daemon, id),
        Route::Delete(id) => delete(daemon, id, req).await,
        Route::Signal(id) => signal(daemon, id, req).await,
        Route::Stop(id) => stop(daemon, id, req).await,
        Route::Monitor(id) => monitor(daemon, id).await,
        Route::Logs(id) => logs(daemon, id, &req),
        Route::Port { id, port, path } => ports(daemon, id, port, path, req).await,
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
    let plan = body.into_plan()?;
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
    port: &str,
    path: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let entry = daemon.registry.get(id)?;
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
    parse_json(&bytes, default)
}

/// Parses a JSON body; an empty one (or only whitespace) means `default` if there is one.
pub(crate) fn parse_json<T>(bytes: &[u8], default: Option<T>) -> Result<T, ApiError>
where
    T: DeserializeOwned,
{
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return default.ok_or_else(|| ApiError::BadBody("a JSON body is required".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadBody(e.to_string()))
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
    fn routes() {
        let route = |method: Method, path: &'static str| Route::parse(&method, path);
        assert_eq!(route(Method::GET, "/v1/containers/").unwrap(), Route::List);
        assert_eq!(
            route(Method::PUT, "/v1/containers/web").unwrap(),
            Route::Start("web")
        );
        assert_eq!(
            route(Method::POST, "/v1/containers/web/stop").unwrap(),
            Route::Stop("web")
        );
        assert_eq!(
            route(Method::GET, "/v1/containers/web/ports/8080/a/b").unwrap(),
            Route::Port {
                id: "web",
                port: "8080",
                path: Some("a/b")
            }
        );
        let e = route(Method::GET, "/v1/containers/web/stop").unwrap_err();
        assert_eq!(
            e.to_string(),
            "method GET is not allowed on /v1/containers/web/stop: use POST"
        );
        let e = route(Method::GET, "/v2").unwrap_err();
        assert_eq!(e.to_string(), "no route for GET /v2");
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
