//! The library's error: each module's own error, plus the lifecycle errors of a container.

use crate::{bundle, cgroup, firewall, image, monitor, network, spawn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] bundle::Error),
    #[error(transparent)]
    Spawn(#[from] spawn::Error),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Network(#[from] network::Error),
    #[error(transparent)]
    Firewall(#[from] firewall::Error),
    #[error(transparent)]
    Image(#[from] image::Error),
    /// The container exited unsuccessfully or was destroyed with a reason.
    #[error(transparent)]
    Exit(#[from] monitor::Exit),
    #[error("invalid container id {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . - (not first)")]
    InvalidId(String),
    #[error("container id {0:?} is reserved: the image store has that name")]
    ReservedId(String),
    #[error("container {0} is already running")]
    AlreadyRunning(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} belongs to another runtime that shares this state directory")]
    OwnedElsewhere(String),
    #[error("container {0} has never been started")]
    NeverStarted(String),
    #[error("signal {0} is out of range: use 1 to 64")]
    InvalidSignal(i32),
    #[error("TCP port {0} is out of range: use 1 to 65535")]
    InvalidPort(u32),
    #[error("invalid environment variable {name:?}: {reason}")]
    InvalidEnv { name: String, reason: &'static str },
    #[error("entrypoint must not be empty")]
    EmptyEntrypoint,
    #[error("invalid instance type {0:?}: use lite, basic, standard-1..4 or cpu=N,memory=SIZE")]
    InvalidInstance(String),
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    #[error(
        "container {0} joined a network namespace that silo does not manage: reach its ports \
         through that network"
    )]
    ForeignNetwork(String),
    #[error("container {id} is not listening on TCP port {port}")]
    NotListening { id: String, port: u16 },
    #[error("failed to {what} for container {id}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP request to container {id} on TCP port {port} failed: {source}")]
    Http {
        id: String,
        port: u16,
        #[source]
        source: hyper::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
