//! `silo serve`: a daemon that owns containers by id and serves the HTTP API that hosting
//! platforms drive (see docs/api.md).
//!
//! [`api`] routes requests, [`registry`] keeps what the daemon knows of each container beyond
//! the library's state (start and exit times, readiness, idle tracking), [`proxy`] carries
//! HTTP, WebSocket and raw TCP traffic into containers, and [`logs`] streams their output.
//! This module reads the configuration, binds the listener and accepts connections.

pub(crate) mod api;
mod logs;
mod proxy;
pub(crate) mod registry;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use crate::{Runtime, RuntimeConfig};
use registry::Registry;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "unix:/run/silo/silo.sock";

/// The daemon's own errors: those that keep it from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] crate::Error),
    #[error("invalid listen address {0:?}: use unix:PATH or HOST:PORT")]
    InvalidListen(String),
    #[error("failed to read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the token file {0} holds no token")]
    EmptyToken(PathBuf),
    #[error("refusing to listen on {0} without --token-file: it is not a loopback address")]
    TokenRequired(SocketAddr),
    #[error("failed to {what} {path}: {source}")]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another daemon is already listening on {0}")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("failed to watch SIGTERM and SIGINT: {0}")]
    Signals(#[source] io::Error),
    #[error("failed to listen on {addr}: {source}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// Where to accept connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket, made with mode 0600.
    Unix(PathBuf),
    /// `HOST:PORT`, resolved when binding.
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = Error;

    fn from_str(s: &str) -> Result<Listen, Error> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || !path.starts_with('/') {
                return Err(Error::InvalidListen(s.to_string()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Listen::Tcp(s.to_string()))
            }
            _ => Err(Error::InvalidListen(s.to_string())),
        }
    }
}

/// How a daemon is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    /// The daemon's state; containers' own state and logs go in its `containers/`.
    pub state_dir: PathBuf,
    pub cgroup_parent: String,
    /// A file holding the bearer token every request must carry. Required to listen on
    /// TCP beyond loopback.
    pub token_file: Option<PathBuf>,
    /// On shutdown, leave the containers running for the next daemon to adopt (for an
    /// upgrade, say) instead of destroying them.
    pub leave_running: bool,
}

/// What every request handler shares.
pub(crate) struct Daemon {
    pub(crate) registry: Registry,
    pub(crate) token: Option<String>,
}

/// Serves until SIGTERM or SIGINT, then destroys the containers and returns.
pub async fn run(config: Config) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    serve(config, async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
    .await
}

/// Serves until `shutdown` completes, then destroys the containers and returns.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let token = config.token_file.as_deref().map(read_token).transpose()?;
    let listener = Listener::bind(&config.listen, token.is_some()).await?;
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: config.state_dir.join("containers"),
        cgroup_parent: config.cgroup_parent.clone(),
        ..RuntimeConfig::default()
    })?;
    let images = crate::image::Store::open(config.state_dir.join(crate::image::STORE_DIR))
        .map_err(crate::image::Error::from)
        .map_err(crate::Error::from)?;
    // The runtime has adopted what an earlier daemon left running (see Runtime::new).
    let daemon = Arc::new(Daemon {
        registry: Registry::new(runtime, images, config.state_dir.join("daemon")).await,
        token,
    });
    info!(listen = ?config.listen, "silo daemon listening");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept(daemon.clone()) => {
                if let Err(e) = accepted {
                    // Out of file descriptors, usually: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    listener.close();
    if config.leave_running {
        info!("silo daemon stopped; its containers run on for the next one to adopt");
    } else {
        daemon.registry.destroy_all().await;
        info!("silo daemon stopped");
    }
    Ok(())
}

fn read_token(path: &Path) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::EmptyToken(path.to_path_buf()));
    }
    Ok(token.to_string())
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    async fn bind(listen: &Listen, has_token: bool) -> Result<Listener, Error> {
        match listen {
            Listen::Unix(path) => Ok(Listener::Unix(bind_unix(path)?, path.clone())),
            Listen::Tcp(spec) => {
                let tcp_err = |source| Error::Tcp {
                    addr: spec.clone(),
                    source,
                };
                let addr = tokio::net::lookup_host(spec.as_str())
                    .await
                    .map_err(tcp_err)?
                    .next()
                    .ok_or_else(|| {
                        tcp_err(io::Error::new(io::ErrorKind::NotFound, "no address"))
                    })?;
                // Anyone who can reach a non-loopback address could run containers.
                if !addr.ip().is_loopback() && !has_token {
                    return Err(Error::TokenRequired(addr));
                }
                Ok(Listener::Tcp(
                    TcpListener::bind(addr).await.map_err(tcp_err)?,
                ))
            }
        }
    }

    /// Accepts one connection and serves it on a task of its own.
    async fn accept(&self, daemon: Arc<Daemon>) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept().await?;
                tokio::spawn(serve_connection(stream, daemon));
            }
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                debug!(%peer, "connection accepted");
                tokio::spawn(serve_connection(stream, daemon));
            }
        }
        Ok(())
    }

    fn close(self) {
        if let Listener::Unix(listener, path) = self {
            drop(listener);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "failed to remove the socket");
            }
        }
    }
}

async fn serve_connection<S>(stream: S, daemon: Arc<Daemon>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let daemon = daemon.clone();
        async move { Ok::<_, std::convert::Infallible>(api::handle(daemon, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Binds a unix socket that only root can use: the file gets mode 0600 before the socket
/// listens, and a missing parent directory is made with mode 0700.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let err = |what, source| Error::Socket {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err("create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket(path.to_path_buf()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(Error::SocketInUse(path.to_path_buf())),
            // Left behind by a daemon that died: nobody listens, so it can go.
            Err(_) => std::fs::remove_file(path).map_err(|e| err("remove the stale socket", e))?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspect", e)),
    }

    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| err("create a socket for", e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| err("make an address of", e.into()))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind", e.into()))?;
    // Connecting needs write permission on the file; until listen() nobody can connect, so
    // there is no window in which the socket is open to others.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("set the mode of", e))?;
    let backlog = Backlog::new(1024).expect("1024 is a valid backlog");
    socket::listen(&fd, backlog).map_err(|e| err("listen on", e.into()))?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    UnixListener::from_std(std_listener).map_err(|e| err("watch", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/silo/silo.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/silo/silo.sock".into())
        );
        assert_eq!(
            "127.0.0.1:7070".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:7070".into())
        );
        assert_eq!(
            "[::1]:7070".parse::<Listen>().unwrap(),
            Listen::Tcp("[::1]:7070".into())
        );
        for bad in [
            "unix:",
            "unix:relative.sock",
            "7070",
            "host:",
            ":80",
            "host:99999",
        ] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }
}
