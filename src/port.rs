//! Talking to a container's TCP ports from the host, through its veth pair.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, header};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::{Container, Error, Result};

/// How long a connection attempt may take. A running container answers a connect at once,
/// with a SYN-ACK or a reset; this bounds the case where its firewall drops the packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port inside a container. The address is looked up on each use, so the handle stays
/// valid across restarts of the container.
#[derive(Debug, Clone)]
pub struct TcpPort {
    container: Container,
    port: u16,
}

impl TcpPort {
    pub(crate) fn new(container: Container, port: u16) -> TcpPort {
        TcpPort { container, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address this port answers on now.
    pub async fn socket_addr(&self) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.container.address()?, self.port))
    }

    /// Opens a raw byte stream to the port.
    pub async fn connect(&self) -> Result<TcpStream> {
        let addr = self.socket_addr().await?;
        let id = self.container.id().to_string();
        let not_listening = || Error::NotListening {
            id: id.clone(),
            port: self.port,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => Err(not_listening()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(not_listening()),
            Ok(Err(source)) => Err(Error::Io {
                id: id.clone(),
                what: format!("connect to {addr}"),
                source,
            }),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
        }
    }

    /// Sends one HTTP/1.1 request to the port and returns the response, whose body streams.
    /// The request's URI may be a bare path (`/health`) or absolute; only its path and query
    /// are sent, with a Host header naming the container's address unless one is set.
    pub async fn fetch<B>(&self, mut req: Request<B>) -> Result<Response<Incoming>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let addr = stream.peer_addr().ok();
        let http_err = |source| Error::Http {
            id: self.container.id().to_string(),
            port: self.port,
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection to container closed");
            }
        });

        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = path.parse().expect("a path and query parse as a URI");
        if !req.headers().contains_key(header::HOST)
            && let Some(addr) = addr
            && let Ok(value) = addr.to_string().parse()
        {
            req.headers_mut().insert(header::HOST, value);
        }
        sender.send_request(req).await.map_err(http_err)
    }
}
