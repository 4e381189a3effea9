//! One veth pair per container: the host end stays in the caller's network namespace, the
//! other end becomes `eth0` inside the container, and the two ends share a /31 taken from an
//! [`AddressPool`]. This is the path [`crate::port`] uses to reach the container's ports.
//!
//! Which /31 a container gets is decided by the kernel, not by a lock file or a table in
//! memory: the host end is named after the container address, so creating the pair fails with
//! `EEXIST` when someone else (another runtime, another process) already holds that slot, and
//! [`attach`] simply moves on to the next one. A slot becomes free again when its veth pair
//! is deleted, either by [`detach`] or by the kernel when the container's namespace dies.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use nix::sched::CloneFlags;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{Socket, TokioSocket};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Name of the container end inside the container's network namespace.
const CONTAINER_IF: &str = "eth0";

/// Prefix length of the network each veth pair is addressed with.
const LINK_PREFIX_LEN: u8 = 31;

/// Shortest and longest pool prefixes accepted: below /8 the pool would reach into unrelated
/// address blocks, and above /30 it would not hold two slots, leaving no room to move to a
/// next slot when one is taken.
const MIN_POOL_PREFIX_LEN: u8 = 8;
const MAX_POOL_PREFIX_LEN: u8 = 30;

/// Errors from wiring a container's network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid address pool {0:?}: expected an IPv4 CIDR such as 10.209.0.0/16")]
    InvalidPool(String),
    #[error("address pool {0} has no free /31 left")]
    PoolExhausted(String),
    #[error("container network namespace already has an interface named {0}")]
    ContainerInterfaceExists(String),
    #[error("failed to {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The block of IPv4 addresses handed out to containers, one /31 each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPool {
    base: Ipv4Addr,
    prefix_len: u8,
}

/// A container's veth pair, as created by [`attach`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    /// Name of the host end, unique per container address.
    pub host_if: String,
    pub host_addr: Ipv4Addr,
    pub container_addr: Ipv4Addr,
}

impl Default for AddressPool {
    fn default() -> Self {
        AddressPool {
            base: Ipv4Addr::new(10, 209, 0, 0),
            prefix_len: 16,
        }
    }
}

impl std::str::FromStr for AddressPool {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = || Error::InvalidPool(s.to_string());
        let (addr, len) = s.split_once('/').ok_or_else(invalid)?;
        // Ipv4Addr's parser rejects IPv6 and anything but four plain decimal octets.
        let base: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        // Only plain digits: u8's parser would also take a leading '+'.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let prefix_len: u8 = len.parse().map_err(|_| invalid())?;
        if !(MIN_POOL_PREFIX_LEN..=MAX_POOL_PREFIX_LEN).contains(&prefix_len) {
            return Err(invalid());
        }
        // A base with host bits set is almost certainly a typo; taking it silently would hand
        // out addresses the operator did not mean.
        if u32::from(base) & !netmask(prefix_len) != 0 {
            return Err(invalid());
        }
        Ok(AddressPool { base, prefix_len })
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl AddressPool {
    /// The pool's network address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The pool's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// How many /31s (containers) the pool holds.
    pub fn slot_count(&self) -> u32 {
        1 << (31 - u32::from(self.prefix_len))
    }

    /// Whether `addr` lies inside the pool.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = netmask(self.prefix_len);
        u32::from(addr) & mask == u32::from(self.base)
    }

    /// The (host, container) addresses of slot `slot`: the even and the odd address of the
    /// slot's /31. `slot` must be below [`Self::slot_count`].
    fn slot(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        debug_assert!(slot < self.slot_count());
        let host = u32::from(self.base) + 2 * slot;
        (Ipv4Addr::from(host), Ipv4Addr::from(host + 1))
    }
}

fn netmask(prefix_len: u8) -> u32 {
    // checked_shl: a shift by 32 (prefix 0) would overflow; it never happens for a validated
    // pool but keeps the helper total.
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// Name of the host end for the container that gets `container_addr`. Deriving it from the
/// address is what makes the kernel arbitrate slots: two containers cannot hold the same
/// address because they cannot both create this name. Always 10 characters, well within the
/// kernel's 15-character limit.
pub fn host_if_name(container_addr: Ipv4Addr) -> String {
    format!("sl{:08x}", u32::from(container_addr))
}

/// Whether `name` has the form of a host end's name (see [`host_if_name`]).
pub fn is_host_if_name(name: &str) -> bool {
    name.len() == 10
        && name.starts_with("sl")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where to start scanning the pool. Several runtimes starting at slot 0 would all collide on
/// the same first slots and pay one failed create per container already running; a start
/// spread by time and pid avoids that. It need not be unpredictable, only spread out.
fn start_slot(slot_count: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Mix so that nearby pids and nearby instants still land far apart.
    let mixed = (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((mixed >> 32) % u64::from(slot_count)) as u32
}

/// Creates the veth pair for the container whose network namespace `netns` refers to (an fd
/// on `/proc/PID/ns/net`), addresses both ends, and brings them and the container's loopback
/// up.
///
/// Must run inside a tokio runtime with IO enabled: the netlink sockets are driven by it.
pub async fn attach(pool: &AddressPool, netns: BorrowedFd<'_>) -> Result<Link> {
    let host = Netlink::here()?;
    let ns = Netlink::in_namespace(netns).await?;

    // An existing eth0 in the container would make every create fail with EEXIST and look
    // like a full pool; say what is really wrong instead.
    if link_index(&ns.handle, CONTAINER_IF, "the container namespace")
        .await?
        .is_some()
    {
        return Err(Error::ContainerInterfaceExists(CONTAINER_IF.to_string()));
    }

    let slots = pool.slot_count();
    let start = start_slot(slots);
    for step in 0..slots {
        let slot = (start + step) % slots;
        let (host_addr, container_addr) = pool.slot(slot);
        let host_if = host_if_name(container_addr);
        match create_veth(&host.handle, &host_if, netns).await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                tracing::trace!(%host_if, "address slot taken, trying the next one");
                continue;
            }
            Err(source) => {
                return Err(Error::Netlink {
                    what: format!("create veth {host_if} for container address {container_addr}"),
                    source,
                });
            }
        }

        let link = Link {
            host_if,
            host_addr,
            container_addr,
        };
        if let Err(e) = configure(&host.handle, &ns.handle, &link).await {
            // Without this the half-configured pair would hold the slot until the
            // container's namespace dies.
            if let Err(cleanup) = delete_link(&host.handle, &link.host_if).await {
                tracing::warn!(error = %cleanup, "failed to remove half-configured veth");
            }
            return Err(e);
        }
        tracing::debug!(?link, "attached container network");
        return Ok(link);
    }
    Err(Error::PoolExhausted(pool.to_string()))
}

/// Gives the container whose network namespace `netns` refers to a default route through
/// the host end of `link`. Without one (the default), the container reaches only the host
/// end's /31, and a connect anywhere else fails at once with "network unreachable".
pub async fn add_default_route(netns: BorrowedFd<'_>, link: &Link) -> Result<()> {
    let ns = Netlink::in_namespace(netns).await?;
    let in_ns = format!("the namespace of container address {}", link.container_addr);
    let index = require_index(&ns.handle, CONTAINER_IF, &in_ns).await?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .output_interface(index)
        .gateway(link.host_addr)
        .build();
    ns.handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            what: format!("add a default route via {} in {in_ns}", link.host_addr),
            source,
        })
}

/// Removes the veth pair. A pair that is already gone counts as removed.
///
/// The pair is found by the host end's name, and that name is free for another container as
/// soon as the pair is gone. Callers should therefore keep the container's network namespace
/// alive (for example by holding its `/proc/PID/ns/net` fd open) until `detach` returns;
/// otherwise the kernel may remove the pair first and a new container may take the same name,
/// which this call would then delete.
pub async fn detach(link: &Link) -> Result<()> {
    let host = Netlink::here()?;
    match delete_link(&host.handle, &link.host_if).await {
        Ok(()) => {
            tracing::debug!(?link, "detached container network");
            Ok(())
        }
        // The kernel deletes the pair by itself when the container's namespace dies.
        Err(Error::Netlink { source, .. }) if errno(&source) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(e),
    }
}

/// An rtnetlink connection whose driver task lives as long as the handle.
struct Netlink {
    handle: Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // The driver would stop once every handle is gone anyway; aborting makes sure the
        // socket is closed now rather than whenever the task is next polled.
        self.driver.abort();
    }
}

impl Netlink {
    /// A connection in the caller's own network namespace.
    fn here() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Io {
            what: "open a netlink socket in the host namespace".into(),
            source,
        })?;
        Ok(Netlink {
            handle,
            driver: tokio::spawn(connection),
        })
    }

    /// A connection whose socket lives in the network namespace `netns`.
    async fn in_namespace(netns: BorrowedFd<'_>) -> Result<Self> {
        let socket = socket_in_namespace(netns).await?;
        // SAFETY: `socket` is a netlink socket this function exclusively owns; into_raw_fd
        // gives up that ownership, so the fd is closed only by the TokioSocket.
        let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        Ok(Netlink {
            handle,
            driver: tokio::spawn(connection),
        })
    }
}

/// Opens a NETLINK_ROUTE socket inside the network namespace `netns`.
///
/// A socket belongs to the namespace of the thread that created it, for its whole life. So a
/// throwaway thread enters the namespace, opens the socket and exits; setns only affects the
/// calling thread, and that thread never runs anything else. A tokio blocking thread would not
/// do: it goes back to the pool and would run later tasks in the container's namespace.
async fn socket_in_namespace(netns: BorrowedFd<'_>) -> Result<Socket> {
    let ns_fd = netns.as_raw_fd();
    let io_err = |what: String| move |source: std::io::Error| Error::Io { what, source };
    // The thread may outlive this future if it is cancelled, so it gets its own fd.
    let netns: OwnedFd = netns
        .try_clone_to_owned()
        .map_err(io_err(format!("duplicate network namespace fd {ns_fd}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("silo-netns".into())
        .spawn(move || {
            let socket = nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .map_err(io_err(format!("enter network namespace (fd {ns_fd})")))
                .and_then(|()| {
                    Socket::new(NETLINK_ROUTE).map_err(io_err(format!(
                        "open a netlink socket in network namespace (fd {ns_fd})"
                    )))
                });
            // The receiver is gone only if attach was cancelled; the socket is then closed.
            let _ = tx.send(socket);
        })
        .map_err(io_err(
            "spawn a thread to enter the container network namespace".into(),
        ))?;
    rx.await.map_err(|_| Error::Io {
        what: format!("open a netlink socket in network namespace (fd {ns_fd})"),
        source: std::io::Error::other("the namespace thread exited without an answer"),
    })?
}

/// Creates the pair: `host_if` in the caller's namespace, and its peer directly in the
/// container's namespace as `eth0`. Creating the peer there (rather than moving it after) means
/// it never exists in the host namespace, where `eth0` is usually taken.
async fn create_veth(
    host: &Handle,
    host_if: &str,
    netns: BorrowedFd<'_>,
) -> std::result::Result<(), rtnetlink::Error> {
    let peer = LinkUnspec::new_with_name(CONTAINER_IF)
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_if)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    // link().add() sets NLM_F_CREATE | NLM_F_EXCL: an existing name fails with EEXIST, which
    // is how a taken slot is detected.
    host.link().add(message).execute().await
}

/// Addresses both ends and brings them, and the container's loopback, up.
async fn configure(host: &Handle, ns: &Handle, link: &Link) -> Result<()> {
    let Link {
        host_if,
        host_addr,
        container_addr,
    } = link;
    let in_ns = format!("the namespace of container address {container_addr}");

    let index = require_index(host, host_if, "the host namespace").await?;
    add_address(host, index, *host_addr, host_if).await?;
    set_up(host, index, host_if).await?;

    let index = require_index(ns, CONTAINER_IF, &in_ns).await?;
    add_address(
        ns,
        index,
        *container_addr,
        &format!("{CONTAINER_IF} in {in_ns}"),
    )
    .await?;
    set_up(ns, index, &format!("{CONTAINER_IF} in {in_ns}")).await?;

    // A fresh namespace has lo down, and much software expects 127.0.0.1 to work.
    let index = require_index(ns, "lo", &in_ns).await?;
    set_up(ns, index, &format!("lo in {in_ns}")).await
}

async fn add_address(handle: &Handle, index: u32, addr: Ipv4Addr, on: &str) -> Result<()> {
    handle
        .address()
        .add(index, IpAddr::V4(addr), LINK_PREFIX_LEN)
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            what: format!("add address {addr}/{LINK_PREFIX_LEN} to {on}"),
            source,
        })
}

async fn set_up(handle: &Handle, index: u32, what: &str) -> Result<()> {
    handle
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            what: format!("bring up {what}"),
            source,
        })
}

/// The index of interface `name`, or `None` if there is no such interface.
async fn link_index(handle: &Handle, name: &str, ns: &str) -> Result<Option<u32>> {
    let found = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await;
    match found {
        Ok(Some(message)) => Ok(Some(message.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(Error::Netlink {
            what: format!("look up interface {name} in {ns}"),
            source,
        }),
    }
}

async fn require_index(handle: &Handle, name: &str, ns: &str) -> Result<u32> {
    link_index(handle, name, ns)
        .await?
        .ok_or_else(|| Error::Netlink {
            what: format!("find interface {name} in {ns}"),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// Deletes interface `name` by name; for a veth this removes both ends.
async fn delete_link(handle: &Handle, name: &str) -> Result<()> {
    handle
        .link()
        .del_with_message(LinkUnspec::new_with_name(name).build())
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            what: format!("delete veth {name}"),
            source,
        })
}

/// The errno a netlink request was refused with, if it was refused by the kernel.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> AddressPool {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn default_pool() {
        let p = AddressPool::default();
        assert_eq!(p, pool("10.209.0.0/16"));
        assert_eq!(p.to_string(), "10.209.0.0/16");
        assert_eq!(p.slot_count(), 32768);
    }

    #[test]
    fn parses_valid_pools() {
        let p = pool("192.168.4.0/22");
        assert_eq!(p.base(), Ipv4Addr::new(192, 168, 4, 0));
        assert_eq!(p.prefix_len(), 22);
        assert_eq!(pool("10.0.0.0/8").slot_count(), 1 << 23);
        assert_eq!(pool("10.1.2.4/30").slot_count(), 2);
    }

    #[test]
    fn rejects_invalid_pools() {
        for bad in [
            "",
            "10.209.0.0",
            "10.209.0.0/",
            "/16",
            "10.209.0.0/16/1",
            "10.209.0/16",
            "10.209.0.0.0/16",
            "10.209.0.0/+16",
            "10.209.0.0/-16",
            "10.209.0.0/ 16",
            " 10.209.0.0/16",
            "10.209.0.0/abc",
            "10.209.0.0/300",
            "10.209.0.1/16",
            "10.209.0.2/30",
            "10.209.0.0/31",
            "10.209.0.0/32",
            "10.0.0.0/7",
            "0.0.0.0/0",
            "fd00::/64",
            "::ffff:10.209.0.0/112",
            "256.0.0.0/8",
        ] {
            match bad.parse::<AddressPool>() {
                Err(Error::InvalidPool(s)) => assert_eq!(s, bad),
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_pool_message_names_the_input() {
        let e = "10.209.0.1/16".parse::<AddressPool>().unwrap_err();
        assert!(e.to_string().contains("\"10.209.0.1/16\""), "{e}");
    }

    #[test]
    fn slots_are_even_host_odd_container() {
        let p = pool("10.209.0.0/16");
        assert_eq!(
            p.slot(0),
            (Ipv4Addr::new(10, 209, 0, 0), Ipv4Addr::new(10, 209, 0, 1))
        );
        assert_eq!(
            p.slot(1),
            (Ipv4Addr::new(10, 209, 0, 2), Ipv4Addr::new(10, 209, 0, 3))
        );
        assert_eq!(
            p.slot(128),
            (Ipv4Addr::new(10, 209, 1, 0), Ipv4Addr::new(10, 209, 1, 1))
        );
        let last = p.slot(p.slot_count() - 1);
        assert_eq!(
            last,
            (
                Ipv4Addr::new(10, 209, 255, 254),
                Ipv4Addr::new(10, 209, 255, 255)
            )
        );
    }

    #[test]
    fn every_slot_stays_inside_the_pool() {
        for s in ["10.1.2.4/30", "172.16.0.0/28", "10.209.128.0/20"] {
            let p = pool(s);
            for slot in 0..p.slot_count() {
                let (host, container) = p.slot(slot);
                assert!(p.contains(host) && p.contains(container), "{s} slot {slot}");
                assert_eq!(u32::from(host) % 2, 0);
                assert_eq!(u32::from(container), u32::from(host) + 1);
            }
            let below = Ipv4Addr::from(u32::from(p.base()) - 1);
            let above = Ipv4Addr::from(u32::from(p.slot(p.slot_count() - 1).1) + 1);
            assert!(!p.contains(below) && !p.contains(above), "{s}");
        }
    }

    #[test]
    fn host_if_names_are_recognised() {
        assert!(is_host_if_name(&host_if_name(Ipv4Addr::new(
            10, 209, 255, 255
        ))));
        for other in [
            "sl",
            "slip0",
            "sl0ad1000g",
            "sl0AD10001",
            "eth0",
            "sl0ad100012",
        ] {
            assert!(!is_host_if_name(other), "{other}");
        }
    }

    #[test]
    fn host_if_names() {
        assert_eq!(host_if_name(Ipv4Addr::new(10, 209, 0, 1)), "sl0ad10001");
        assert_eq!(
            host_if_name(Ipv4Addr::new(255, 255, 255, 255)),
            "slffffffff"
        );
        assert_eq!(host_if_name(Ipv4Addr::new(0, 0, 0, 1)), "sl00000001");
        // The kernel limit is IFNAMSIZ - 1 = 15 bytes.
        assert!(host_if_name(Ipv4Addr::new(10, 209, 0, 1)).len() <= 15);
    }

    #[test]
    fn start_slot_is_in_range() {
        for count in [1, 2, 3, 32768, 1 << 23] {
            for _ in 0..100 {
                assert!(start_slot(count) < count);
            }
        }
    }
}
