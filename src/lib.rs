//! silo: a Linux-native container runtime.
//!
//! The modules follow a container's life: an [`image`] is unpacked into a bundle, the
//! [`bundle`] is read and checked, [`spawn`] clones the init process into fresh namespaces,
//! [`cgroup`] bounds it, [`network`] wires a veth pair into it, [`firewall`] confines what it
//! reaches, [`monitor`] waits for it to exit, and [`port`] talks to it over TCP.
//! [`Runtime`] and [`Container`] tie these together behind a small actor-like API.
//! [`runc`] is the command line's runc-compatible mode, for orchestrators.

pub mod bundle;
pub mod cgroup;
mod container;
pub mod daemon;
mod error;
pub mod fault;
pub mod firewall;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
mod logs;
pub mod monitor;
pub mod network;
pub mod port;
pub mod runc;
mod runtime;
pub mod seccomp;
pub mod spawn;
mod state;

pub use container::{Container, ExitStatus, Instance, Outcome, StartOptions, Stdio};
pub use error::{Error, Result};
pub use firewall::EgressRule;
pub use monitor::Exit;
pub use runtime::{Runtime, RuntimeConfig};

/// The log filter silo's programs and tests share: `SILO_LOG`, in `RUST_LOG`'s syntax, and
/// warnings only when it is unset.
pub fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("SILO_LOG").unwrap_or_else(|_| "warn".into())
}
