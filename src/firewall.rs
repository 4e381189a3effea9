//! What a container may reach: one nftables table, `inet silo`, plus the few per-interface
//! sysctls that let chosen containers out through the host's uplink.
//!
//! Every container sits behind the host end of its veth (`sl…`, see [`crate::network`]).
//! The table confines all traffic that comes *from* those interfaces:
//!
//! - to the host itself (input hook): only replies to connections the host opened, so no
//!   tenant reaches a service the host runs, the silo daemon's API included;
//! - through the host (forward hook): nothing that is not IPv4, nothing with a source
//!   address other than the container's own, nothing to another container, nothing to
//!   link-local 169.254.0.0/16 (where cloud metadata services live), and nothing at all
//!   unless the container was started with internet access, which means: out of the uplink
//!   only, and when it has an allow list, only to what the list names.
//!
//! Refused traffic is answered with a TCP reset or an ICMP "administratively prohibited", so
//! a tenant's connect fails at once instead of hanging. Nothing from outside may open a
//! connection to a container either; the host itself reaches every container's ports, as
//! its own traffic leaves through the output hook, which silo leaves alone.
//!
//! The rules that match interfaces use the wildcard `sl*`, so a veth is confined from the
//! moment it exists, before silo has recorded anything about it. A container without
//! internet needs nothing more: everything its host end sends is refused by those rules, so
//! it has nothing of its own in the table and starting or destroying it changes nothing
//! there. What sets a container with internet apart is data, not rules: elements of a few
//! named sets (host end and address; host end and uplink), plus one rule per allow-list
//! entry carrying the host end's name and the entry in its comment. That keeps every change
//! a small diff: applying a policy adds only what is missing and deletes only what is stale,
//! in one atomic nft transaction, so applying the same policy twice changes nothing, and the
//! state of one container can be removed without touching the others. State whose interface
//! no longer exists is removed on every change, which is how a container's state goes: its
//! teardown deletes the veth, then collects. The table itself goes once no container is
//! left, which is once no host end exists any more. Missing state always means less access,
//! never more.
//!
//! The table is changed through the `nft` binary with JSON, built with the `nftables` crate's
//! typed schema, rather than netlink directly: nft does the hard part (set encoding,
//! transactions, expression linearisation) and its JSON is a stable, documented interface.
//! The cost is a runtime dependency on nftables (`apt-get install nftables`), and a few
//! milliseconds for each run of it. So that only a change runs it, each process keeps what it
//! last read or wrote of the table in memory, together with the ruleset's generation, a
//! counter the kernel moves with every nf_tables commit by anyone ([`kernel`] asks it over
//! netlink, and whether the table exists at all). While the counter stands, the memory is
//! the table; once it moved, another runtime or an administrator changed something and the
//! table is listed again (`nft -j list`, read as plain JSON: only set elements and rule
//! comments are needed from it). A change whose commit turns out not to have been the only
//! one forgets what it knew. So no state can be taken as present after someone removed it.
//!
//! IP forwarding is switched per interface, never globally: the kernel forwards an IPv4
//! packet only if the interface it *arrived on* has forwarding enabled. A container with
//! internet gets it on its host end; the uplink gets it too (replies arrive there), but only
//! while some container needs it, and only if it was off: silo then records the uplink in
//! the table's `fenced` set and drops anything else forwarded in from the uplink, so the
//! host forwards nothing it did not forward before. A container without internet has
//! forwarding off on its host end, so even a route it adds with CAP_NET_ADMIN leads nowhere,
//! whatever the rules say. IPv6 is switched off on the host ends and refused by the rules:
//! containers get IPv4 only.
//!
//! silo's table is one among the host's tables: it can only narrow what they allow. A host
//! firewall whose forward chain drops by default must itself let `sl*` out to the uplink.
//!
//! Changes are serialized across processes with a lock file, since several runtimes may
//! share a network namespace and the uplink's forwarding switch.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io::{Read as _, Seek, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range, SetItem,
};
use nftables::schema::{self, NfListObject, SetType, SetTypeValue};
use nftables::stmt::{JumpTarget, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::network::{self, Link};

mod kernel;

/// The table silo owns. silo never reads or writes any other.
pub const TABLE: &str = "silo";
const FAMILY: NfFamily = NfFamily::INet;

/// The prefix of every container's host-end interface (see [`network::host_if_name`]).
pub const HOST_IF_PREFIX: &str = "sl";

/// Written as the comment of the first rule of the `input` chain (nft 1.0.6 drops set
/// comments given in JSON). A table with another layout, made by an older or newer silo,
/// is rebuilt rather than patched.
const LAYOUT: &str = "silo firewall layout 2";

/// Serializes changes to the table and to the uplink's forwarding switch between processes.
pub const LOCK_PATH: &str = "/run/lock/silo-firewall.lock";

/// Where cloud platforms put their metadata services: never reachable from a container.
const LINK_LOCAL: (Ipv4Addr, u8) = (Ipv4Addr::new(169, 254, 0, 0), 16);

/// Resolvers handed to containers when the host has none they could reach, as Docker does.
pub const FALLBACK_RESOLVERS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(8, 8, 4, 4)];

/// Errors from confining a container's network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid egress rule {rule:?}: {reason}")]
    InvalidEgress { rule: String, reason: String },
    #[error("egress rules need enable_internet: a container without it reaches nothing")]
    EgressWithoutInternet,
    #[error("the host has no IPv4 default route to use as the uplink: set one (silo --uplink)")]
    NoUplink,
    #[error("uplink interface {0:?} does not exist")]
    UplinkMissing(String),
    #[error("nft was not found in PATH, /usr/sbin or /sbin: install nftables")]
    NftMissing,
    #[error("failed to {what}: {detail}")]
    Nft { what: String, detail: String },
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// One entry of a container's egress allow list: an IPv4 network, and optionally a port or
/// range of ports (TCP and UDP). Written `198.51.100.0/24`, `198.51.100.10` (a /32),
/// `198.51.100.10:443` or `198.51.100.0/24:8000-8099`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EgressRule {
    addr: Ipv4Addr,
    prefix_len: u8,
    ports: Option<(u16, u16)>,
}

impl EgressRule {
    /// Checks and builds a rule: the address must have no bits set beyond the prefix, and
    /// a port range must run from a first port (1 or more) up to a last one.
    pub fn new(addr: Ipv4Addr, prefix_len: u8, ports: Option<(u16, u16)>) -> Result<Self> {
        let rule = EgressRule {
            addr,
            prefix_len,
            ports,
        };
        let bad = |reason: String| {
            Err(Error::InvalidEgress {
                rule: rule.to_string(),
                reason,
            })
        };
        if prefix_len > 32 {
            return bad("the prefix length must be 0 to 32".into());
        }
        if u32::from(addr) & !netmask(prefix_len) != 0 {
            return bad(format!(
                "{addr} has bits set beyond /{prefix_len}; the network is {}/{prefix_len}",
                Ipv4Addr::from(u32::from(addr) & netmask(prefix_len))
            ));
        }
        if let Some((first, last)) = ports {
            if first == 0 {
                return bad("port 0 cannot be connected to".into());
            }
            if first > last {
                return bad(format!("the port range {first}-{last} runs backwards"));
            }
        }
        if covers(LINK_LOCAL, (addr, prefix_len)) {
            return bad(format!(
                "{}/{} (link-local, where metadata services live) is never reachable",
                LINK_LOCAL.0, LINK_LOCAL.1
            ));
        }
        Ok(rule)
    }

    /// The network: its address and prefix length.
    pub fn network(&self) -> (Ipv4Addr, u8) {
        (self.addr, self.prefix_len)
    }

    /// The first and last port, when the rule is limited to ports.
    pub fn ports(&self) -> Option<(u16, u16)> {
        self.ports
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)?;
        match self.ports {
            Some((a, b)) if a == b => write!(f, ":{a}"),
            Some((a, b)) => write!(f, ":{a}-{b}"),
            None => Ok(()),
        }
    }
}

impl FromStr for EgressRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidEgress {
            rule: s.to_string(),
            reason: reason.to_string(),
        };
        const FORM: &str = "expected an IPv4 address or network such as 198.51.100.0/24, \
                            optionally followed by :PORT or :FIRST-LAST";
        if s.matches(':').count() > 1 {
            return Err(bad(
                "IPv6 destinations are not supported: containers have IPv4 only",
            ));
        }
        let (net, ports) = match s.split_once(':') {
            Some((net, ports)) => (net, Some(ports)),
            None => (s, None),
        };
        let (addr, len) = match net.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (net, None),
        };
        // Ipv4Addr's parser takes only four plain decimal octets.
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad(FORM))?;
        let prefix_len = match len {
            None => 32,
            Some(len) => parse_digits::<u8>(len)
                .filter(|l| *l <= 32)
                .ok_or_else(|| bad("the prefix length must be 0 to 32"))?,
        };
        let ports = match ports {
            None => None,
            Some(p) => {
                let (first, last) = p.split_once('-').unwrap_or((p, p));
                let port = |x: &str| {
                    parse_digits::<u16>(x)
                        .ok_or_else(|| bad("a port must be a number from 1 to 65535"))
                };
                Some((port(first)?, port(last)?))
            }
        };
        EgressRule::new(addr, prefix_len, ports).map_err(|e| match e {
            // Name the rule as it was written, not as it was understood.
            Error::InvalidEgress { reason, .. } => Error::InvalidEgress {
                rule: s.to_string(),
                reason,
            },
            other => other,
        })
    }
}

impl TryFrom<String> for EgressRule {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<EgressRule> for String {
    fn from(rule: EgressRule) -> String {
        rule.to_string()
    }
}

/// Plain decimal digits only: the integer parsers would also take a leading `+`.
fn parse_digits<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn netmask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

/// Whether network `outer` contains all of network `inner`.
fn covers(outer: (Ipv4Addr, u8), inner: (Ipv4Addr, u8)) -> bool {
    inner.1 >= outer.1 && u32::from(inner.0) & netmask(outer.1) == u32::from(outer.0)
}

/// What a container may reach beyond replies to the host's own connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Nothing.
    None,
    /// Out of `uplink`, masqueraded behind the host's address there: anywhere when `allow`
    /// is empty, otherwise only to what it names.
    Internet {
        uplink: String,
        allow: Vec<EgressRule>,
    },
}

/// Confines the container behind `link` to `egress`, replacing whatever silo had recorded
/// for its host end before. Blocking: call it off the async executor.
pub fn apply(link: &Link, egress: &Egress) -> Result<()> {
    if let Egress::Internet { uplink, .. } = egress
        && interface_index(uplink).is_none()
    {
        return Err(Error::UplinkMissing(uplink.clone()));
    }
    converge(Some(Target {
        host_if: &link.host_if,
        want: Some((link.container_addr, egress)),
    }))
}

/// Removes everything silo recorded for the host end `host_if`, and the table once no
/// container is left. Blocking.
pub fn remove(host_if: &str) -> Result<()> {
    converge(Some(Target {
        host_if,
        want: None,
    }))
}

/// Removes what silo recorded for host ends that no longer exist (containers that died
/// while no runtime was watching), and gives back the uplink's forwarding switch when no
/// container needs it any more. Blocking.
pub fn collect_garbage() -> Result<()> {
    converge(None)
}

/// The interface of the IPv4 default route with the lowest metric in the caller's network
/// namespace: the uplink when none is configured.
pub fn default_uplink() -> Result<String> {
    let routes =
        std::fs::read_to_string("/proc/net/route").map_err(io_err("read /proc/net/route"))?;
    default_route_interface(&routes).ok_or(Error::NoUplink)
}

fn default_route_interface(table: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
            let flags = hex(3)?;
            let metric: u32 = f.get(6)?.parse().ok()?;
            (hex(1)? == 0 && hex(7)? == 0 && flags & RTF_UP != 0)
                .then(|| (metric, f[0].to_string()))
        })
        .min()
        .map(|(_, name)| name)
}

/// The IPv4 nameservers of the host's /etc/resolv.conf that a container could reach: not
/// loopback or link-local, which inside a container would mean the container itself.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(text) => reachable_nameservers(&text),
        Err(e) => {
            debug!(error = %e, "cannot read the host's /etc/resolv.conf");
            Vec::new()
        }
    }
}

fn reachable_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(addr)) = words.next().map(str::parse::<Ipv4Addr>)
            && !addr.is_loopback()
            && !addr.is_link_local()
            && !addr.is_unspecified()
            && !out.contains(&addr)
        {
            out.push(addr);
        }
    }
    out
}

/// The /etc/resolv.conf a container with internet gets.
pub fn resolv_conf(resolvers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# Written by silo for this container.\n");
    for r in resolvers {
        text.push_str(&format!("nameserver {r}\n"));
    }
    text
}

/// The host end a change is about, and what it should be left with (`None`: nothing).
struct Target<'a> {
    host_if: &'a str,
    want: Option<(Ipv4Addr, &'a Egress)>,
}

/// silo's state for all host ends, as read from the table.
#[derive(Debug, Default)]
struct Current {
    /// Host end and container address of every confined container.
    containers: BTreeSet<(String, Ipv4Addr)>,
    /// Host end and uplink of every container with internet.
    internet: BTreeSet<(String, String)>,
    /// Host ends whose internet is limited to their allow rules.
    restricted: BTreeSet<String>,
    /// Uplinks whose forwarding silo switched on.
    fenced: BTreeSet<String>,
    /// Allow rules, by comment (host end, space, rule), with their handles.
    allow: BTreeMap<String, u32>,
}

impl Current {
    fn host_ifs(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.containers.iter().map(|(i, _)| i.clone()).collect();
        all.extend(self.internet.iter().map(|(i, _)| i.clone()));
        all.extend(self.restricted.iter().cloned());
        all.extend(
            self.allow
                .keys()
                .filter_map(|c| c.split_once(' ').map(|(i, _)| i.to_string())),
        );
        all
    }
}

/// What one host end should have in the table.
#[derive(Debug, Default)]
struct Wanted {
    containers: BTreeSet<(String, Ipv4Addr)>,
    internet: BTreeSet<(String, String)>,
    restricted: BTreeSet<String>,
    allow: BTreeMap<String, EgressRule>,
}

fn wanted(host_if: &str, want: Option<(Ipv4Addr, &Egress)>) -> Wanted {
    let mut w = Wanted::default();
    // Without internet there is nothing to record: every path out of a host end is refused
    // unless it is in `internet`, and the source address check only matters on those paths.
    let Some((addr, Egress::Internet { uplink, allow })) = want else {
        return w;
    };
    w.containers.insert((host_if.to_string(), addr));
    w.internet.insert((host_if.to_string(), uplink.clone()));
    if !allow.is_empty() {
        w.restricted.insert(host_if.to_string());
        for rule in allow {
            w.allow.insert(format!("{host_if} {rule}"), *rule);
        }
    }
    w
}

/// What this process last knew of the table, in one network namespace, and the generation of
/// the ruleset it held at. It stands for the table for as long as the generation has not
/// moved: any commit by anyone (another runtime, an administrator's `nft`) moves it, and the
/// table is then read again. So a change costs no `nft list`, and one that has nothing to
/// change costs no `nft` at all.
struct Known {
    netns: (u64, u64),
    generation: u32,
    read: Read,
}

static KNOWN: std::sync::Mutex<Option<Known>> = std::sync::Mutex::new(None);

/// Brings the table and the sysctls to what `target` wants, and drops the state of host
/// ends that are gone, under the cross-process lock.
fn converge(target: Option<Target<'_>>) -> Result<()> {
    let nft = Nft::find()?;
    let _lock = Lock::take()?;
    let mut known = KNOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Taken out: unless this change ends well and proves it was the only commit, what it
    // held is forgotten and the next change reads the table again.
    let held = known.take();
    let netns = netns_id()?;
    let generation = kernel::generation().map_err(io_err("read the nf_tables generation"))?;
    let read = match held {
        Some(k) if k.netns == netns && k.generation == generation => k.read,
        _ => read_table(&nft)?,
    };
    let (after, commits) = change(&nft, read, target)?;
    if let Some(after) = after {
        let now = kernel::generation().map_err(io_err("read the nf_tables generation"))?;
        if now == generation.wrapping_add(commits) {
            *known = Some(Known {
                netns,
                generation: now,
                read: after,
            });
        }
    }
    Ok(())
}

/// The table as it is now, read with a netlink request when it is missing and with
/// `nft -j list` when it exists.
fn read_table(nft: &Nft) -> Result<Read> {
    let exists = kernel::inet_table_exists(TABLE)
        .map_err(io_err(format!("look up nftables table inet {TABLE}")))?;
    if exists {
        nft.read()
    } else {
        Ok(Read::Missing)
    }
}

/// The network namespace of the calling thread, as device and inode numbers.
fn netns_id() -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let path = "/proc/thread-self/ns/net";
    let meta = std::fs::metadata(path).map_err(io_err(format!("stat {path}")))?;
    Ok((meta.dev(), meta.ino()))
}

/// Brings the table from `read` to what `target` wants (see [`converge`]). Returns the
/// table as left, when it is known exactly, and the number of nft transactions committed.
fn change(nft: &Nft, read: Read, target: Option<Target<'_>>) -> Result<(Option<Read>, u32)> {
    let want = target.as_ref().and_then(|t| t.want);
    let mut batch = Batch::new();
    let (mut state, existed, fresh) = match read {
        Read::Missing if want.is_none() => return Ok((Some(Read::Missing), 0)),
        Read::Missing => (Current::default(), false, true),
        Read::Found {
            layout_ok: true,
            current,
        } => (current, true, false),
        Read::Found { current, .. } => {
            // The other containers' state is lost with it, which leaves them with less
            // access, never more, until their policy is applied again.
            warn!("the {TABLE} table has another layout; rebuilding it");
            batch.delete(NfListObject::Table(table()));
            let fenced = current.fenced;
            (
                Current {
                    fenced,
                    ..Current::default()
                },
                true,
                true,
            )
        }
    };
    let mut changed = fresh;
    if fresh {
        skeleton(&mut batch);
        if !state.fenced.is_empty() {
            add_elements(
                &mut batch,
                "fenced",
                state.fenced.iter().map(|u| s(u)).collect(),
            );
        }
    }

    // Host ends to bring up to date: every one whose interface is gone, and the target.
    let mut work: BTreeMap<String, Wanted> = BTreeMap::new();
    for host_if in state.host_ifs() {
        if interface_index(&host_if).is_none() {
            debug!(%host_if, "dropping the firewall state of a host end that is gone");
            work.insert(host_if, Wanted::default());
        }
    }
    if let Some(t) = &target {
        work.insert(t.host_if.to_string(), wanted(t.host_if, t.want));
    }
    for (host_if, w) in &work {
        changed |= diff(&mut batch, &mut state, host_if, w);
    }

    // The uplink's forwarding: on while some container goes out through it.
    let global_forwarding = read_sysctl(&ipv4_forward_path())?.as_deref() == Some("1");
    let mut enable_uplink = None;
    if let Some((_, Egress::Internet { uplink, .. })) = want {
        let on = read_sysctl(&conf_path("ipv4", uplink, "forwarding"))?.as_deref() == Some("1");
        if state.fenced.contains(uplink) {
            // Fenced, but someone may have switched it off meanwhile.
            enable_uplink = Some(uplink.clone());
        } else if !on {
            // Fence first: from the moment forwarding is on, only silo's traffic passes.
            add_elements(&mut batch, "fenced", vec![s(uplink)]);
            state.fenced.insert(uplink.clone());
            enable_uplink = Some(uplink.clone());
            changed = true;
        }
    }
    let in_use: BTreeSet<&String> = state.internet.iter().map(|(_, u)| u).collect();
    let released: Vec<String> = state
        .fenced
        .iter()
        .filter(|u| global_forwarding || !in_use.contains(u))
        .cloned()
        .collect();
    for uplink in &released {
        // Forwarding goes off before the fence comes down. When the host forwards on all
        // interfaces, someone else wants forwarding now: leave it on.
        if !global_forwarding
            && let Err(e) = write_sysctl(&conf_path("ipv4", uplink, "forwarding"), "0")
        {
            warn!(%uplink, error = %e, "failed to switch forwarding back off on the uplink");
        }
        info!(%uplink, "uplink forwarding given back");
        state.fenced.remove(uplink);
        delete_elements(&mut batch, "fenced", vec![s(uplink)]);
        changed = true;
    }

    // A container without internet has nothing in the table: while its host end exists,
    // the table is still needed to confine it.
    let mut commits = 0;
    let mut after = Read::Found {
        layout_ok: true,
        current: Current::default(),
    };
    if want.is_none()
        && state.containers.is_empty()
        && state.fenced.is_empty()
        && !other_host_ends(target.as_ref().map(|t| t.host_if))?
    {
        if existed {
            let mut drop_table = Batch::new();
            drop_table.delete(NfListObject::Table(table()));
            nft.apply(drop_table, &format!("delete nftables table inet {TABLE}"))?;
            commits += 1;
            debug!("firewall table removed: no container left");
        }
        after = Read::Missing;
    } else if changed {
        nft.apply(batch, &format!("update nftables table inet {TABLE}"))?;
        commits += 1;
    }
    // The handle of a rule just added is known only from a new listing.
    let exact = !state.allow.values().any(|handle| *handle == 0);
    if let Read::Found { current, .. } = &mut after {
        *current = state;
    }

    if let Some(uplink) = enable_uplink {
        write_sysctl(&conf_path("ipv4", &uplink, "forwarding"), "1")?;
        info!(%uplink, "forwarding switched on for the uplink");
    }
    if let (Some(t), Some((_, egress))) = (&target, want) {
        let internet = matches!(egress, Egress::Internet { .. });
        let forwarding = if internet { "1" } else { "0" };
        write_sysctl(&conf_path("ipv4", t.host_if, "forwarding"), forwarding)?;
        // Without IPv6 on the host end, the container has no IPv6 peer to talk to at all.
        let v6 = conf_path("ipv6", t.host_if, "disable_ipv6");
        if v6.exists() {
            write_sysctl(&v6, "1")?;
        }
    }
    Ok((exact.then_some(after), commits))
}

/// Adds to `batch` what `host_if` lacks and deletes what it should no longer have, and
/// updates `state` to match. Returns whether anything changed.
fn diff(batch: &mut Batch<'static>, state: &mut Current, host_if: &str, w: &Wanted) -> bool {
    let mut changed = false;

    let stale: Vec<_> = (state.containers.iter())
        .filter(|e| e.0 == host_if && !w.containers.contains(*e))
        .cloned()
        .collect();
    let missing: Vec<_> = (w.containers.iter())
        .filter(|e| !state.containers.contains(*e))
        .cloned()
        .collect();
    let elem = |(i, a): &(String, Ipv4Addr)| concat([s(i), s(&a.to_string())]);
    if !stale.is_empty() {
        delete_elements(batch, "containers", stale.iter().map(elem).collect());
    }
    if !missing.is_empty() {
        add_elements(batch, "containers", missing.iter().map(elem).collect());
    }
    changed |= !stale.is_empty() || !missing.is_empty();
    for e in stale {
        state.containers.remove(&e);
    }
    state.containers.extend(missing);

    let stale: Vec<_> = (state.internet.iter())
        .filter(|e| e.0 == host_if && !w.internet.contains(*e))
        .cloned()
        .collect();
    let missing: Vec<_> = (w.internet.iter())
        .filter(|e| !state.internet.contains(*e))
        .cloned()
        .collect();
    let elem = |(i, u): &(String, String)| concat([s(i), s(u)]);
    if !stale.is_empty() {
        delete_elements(batch, "internet", stale.iter().map(elem).collect());
    }
    if !missing.is_empty() {
        add_elements(batch, "internet", missing.iter().map(elem).collect());
    }
    changed |= !stale.is_empty() || !missing.is_empty();
    for e in stale {
        state.internet.remove(&e);
    }
    state.internet.extend(missing);

    let had = state.restricted.contains(host_if);
    let wants = w.restricted.contains(host_if);
    if had && !wants {
        delete_elements(batch, "restricted", vec![s(host_if)]);
        state.restricted.remove(host_if);
        changed = true;
    } else if wants && !had {
        add_elements(batch, "restricted", vec![s(host_if)]);
        state.restricted.insert(host_if.to_string());
        changed = true;
    }

    let prefix = format!("{host_if} ");
    let stale: Vec<(String, u32)> = (state.allow.iter())
        .filter(|(c, _)| c.starts_with(&prefix) && !w.allow.contains_key(*c))
        .map(|(c, h)| (c.clone(), *h))
        .collect();
    for (comment, handle) in stale {
        batch.delete(NfListObject::Rule(schema::Rule {
            chain: "allow".into(),
            handle: Some(handle),
            ..rule_base()
        }));
        state.allow.remove(&comment);
        changed = true;
    }
    for (comment, rule) in &w.allow {
        if !state.allow.contains_key(comment) {
            batch.add(NfListObject::Rule(allow_rule(host_if, rule, comment)));
            // The handle is known only once nft has added it; nothing reads it before.
            state.allow.insert(comment.clone(), 0);
            changed = true;
        }
    }
    changed
}

/// The table, its sets and its fixed chains and rules.
fn skeleton(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Table(table()));
    let set = |name: &'static str, types: &[SetType]| {
        NfListObject::Set(Box::new(schema::Set {
            family: FAMILY,
            table: TABLE.into(),
            name: name.into(),
            set_type: match types {
                [one] => SetTypeValue::Single(*one),
                many => SetTypeValue::Concatenated(many.to_vec().into()),
            },
            ..schema::Set::default()
        }))
    };
    batch.add(set("containers", &[SetType::Ifname, SetType::Ipv4Addr]));
    batch.add(set("internet", &[SetType::Ifname, SetType::Ifname]));
    batch.add(set("restricted", &[SetType::Ifname]));
    batch.add(set("fenced", &[SetType::Ifname]));

    let base = |name: &'static str, kind: NfChainType, hook: NfHook, prio: i32| {
        NfListObject::Chain(schema::Chain {
            family: FAMILY,
            table: TABLE.into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..schema::Chain::default()
        })
    };
    let chain = |name: &'static str| {
        NfListObject::Chain(schema::Chain {
            family: FAMILY,
            table: TABLE.into(),
            name: name.into(),
            ..schema::Chain::default()
        })
    };
    // Priority 0 is "filter", 100 is "srcnat".
    batch.add(base("input", NfChainType::Filter, NfHook::Input, 0));
    batch.add(base("forward", NfChainType::Filter, NfHook::Forward, 0));
    batch.add(base(
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        100,
    ));
    for name in [
        "to_host",
        "from_container",
        "to_container",
        "allow",
        "refuse",
    ] {
        batch.add(chain(name));
    }

    let host_ends = s(&format!("{HOST_IF_PREFIX}*"));
    let iif = || meta(MetaKey::Iifname);
    let oif = || meta(MetaKey::Oifname);
    let rule = |chain: &'static str, expr: Vec<Statement<'static>>| {
        NfListObject::Rule(schema::Rule {
            chain: chain.into(),
            expr: expr.into(),
            ..rule_base()
        })
    };
    let established = || {
        matches(
            ct_state(),
            Operator::IN,
            Expression::List(vec![s("established"), s("related")]),
        )
    };

    batch.add(NfListObject::Rule(schema::Rule {
        chain: "input".into(),
        expr: vec![
            matches(iif(), Operator::EQ, host_ends.clone()),
            jump("to_host"),
        ]
        .into(),
        comment: Some(LAYOUT.into()),
        ..rule_base()
    }));
    batch.add(rule(
        "to_host",
        vec![established(), Statement::Accept(None)],
    ));
    batch.add(rule("to_host", vec![goto("refuse")]));

    batch.add(rule(
        "forward",
        vec![
            matches(iif(), Operator::EQ, host_ends.clone()),
            jump("from_container"),
        ],
    ));
    batch.add(rule(
        "forward",
        vec![
            matches(oif(), Operator::EQ, host_ends.clone()),
            jump("to_container"),
        ],
    ));
    batch.add(rule(
        "forward",
        vec![
            matches(iif(), Operator::EQ, s("@fenced")),
            Statement::Drop(None),
        ],
    ));

    batch.add(rule(
        "from_container",
        vec![
            matches(ct_state(), Operator::IN, s("invalid")),
            Statement::Drop(None),
        ],
    ));
    batch.add(rule(
        "from_container",
        vec![established(), Statement::Accept(None)],
    ));
    batch.add(rule(
        "from_container",
        vec![
            matches(meta(MetaKey::Nfproto), Operator::NEQ, s("ipv4")),
            goto("refuse"),
        ],
    ));
    batch.add(rule(
        "from_container",
        vec![
            matches(
                concat([iif(), payload("ip", "saddr")]),
                Operator::NEQ,
                s("@containers"),
            ),
            goto("refuse"),
        ],
    ));
    batch.add(rule(
        "from_container",
        vec![matches(oif(), Operator::EQ, host_ends), goto("refuse")],
    ));
    batch.add(rule(
        "from_container",
        vec![
            matches(
                payload("ip", "daddr"),
                Operator::EQ,
                prefix(LINK_LOCAL.0, LINK_LOCAL.1),
            ),
            goto("refuse"),
        ],
    ));
    batch.add(rule(
        "from_container",
        vec![
            matches(concat([iif(), oif()]), Operator::NEQ, s("@internet")),
            goto("refuse"),
        ],
    ));
    batch.add(rule(
        "from_container",
        vec![
            matches(iif(), Operator::NEQ, s("@restricted")),
            Statement::Accept(None),
        ],
    ));
    batch.add(rule("from_container", vec![jump("allow")]));
    batch.add(rule("from_container", vec![goto("refuse")]));

    batch.add(rule(
        "to_container",
        vec![established(), Statement::Accept(None)],
    ));
    batch.add(rule("to_container", vec![Statement::Drop(None)]));

    batch.add(rule(
        "refuse",
        vec![
            matches(meta(MetaKey::L4proto), Operator::EQ, s("tcp")),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ],
    ));
    batch.add(rule(
        "refuse",
        vec![Statement::Reject(Some(Reject::new(
            Some(RejectType::ICMPX),
            Some(RejectCode::AdminProhibited),
        )))],
    ));

    batch.add(rule(
        "postrouting",
        vec![
            matches(concat([iif(), oif()]), Operator::EQ, s("@internet")),
            Statement::Masquerade(None),
        ],
    ));
}

/// `iifname HOST_IF ip daddr NET [meta l4proto {tcp, udp} th dport PORTS] accept`.
fn allow_rule(host_if: &str, rule: &EgressRule, comment: &str) -> schema::Rule<'static> {
    let (addr, len) = rule.network();
    let dest = if len == 32 {
        s(&addr.to_string())
    } else {
        prefix(addr, len)
    };
    let mut expr = vec![
        matches(meta(MetaKey::Iifname), Operator::EQ, s(host_if)),
        matches(payload("ip", "daddr"), Operator::EQ, dest),
    ];
    if let Some((first, last)) = rule.ports() {
        expr.push(matches(
            meta(MetaKey::L4proto),
            Operator::EQ,
            Expression::Named(NamedExpression::Set(vec![
                SetItem::Element(s("tcp")),
                SetItem::Element(s("udp")),
            ])),
        ));
        let ports = if first == last {
            Expression::Number(u32::from(first))
        } else {
            Expression::Range(Box::new(Range {
                range: [
                    Expression::Number(u32::from(first)),
                    Expression::Number(u32::from(last)),
                ],
            }))
        };
        expr.push(matches(payload("th", "dport"), Operator::EQ, ports));
    }
    expr.push(Statement::Accept(None));
    schema::Rule {
        chain: "allow".into(),
        expr: expr.into(),
        comment: Some(comment.to_string().into()),
        ..rule_base()
    }
}

fn table() -> schema::Table<'static> {
    schema::Table {
        family: FAMILY,
        name: TABLE.into(),
        handle: None,
    }
}

fn rule_base() -> schema::Rule<'static> {
    schema::Rule {
        family: FAMILY,
        table: TABLE.into(),
        ..schema::Rule::default()
    }
}

fn add_elements(batch: &mut Batch<'static>, set: &'static str, elem: Vec<Expression<'static>>) {
    batch.add(NfListObject::Element(schema::Element {
        family: FAMILY,
        table: TABLE.into(),
        name: set.into(),
        elem: elem.into(),
    }));
}

fn delete_elements(batch: &mut Batch<'static>, set: &'static str, elem: Vec<Expression<'static>>) {
    batch.delete(NfListObject::Element(schema::Element {
        family: FAMILY,
        table: TABLE.into(),
        name: set.into(),
        elem: elem.into(),
    }));
}

fn s(text: &str) -> Expression<'static> {
    Expression::String(text.to_string().into())
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct_state() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: "state".into(),
        family: None,
        dir: None,
    }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn prefix(addr: Ipv4Addr, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(&addr.to_string())),
        len: u32::from(len),
    }))
}

fn concat<const N: usize>(parts: [Expression<'static>; N]) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts.into()))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn jump(chain: &'static str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: chain.into(),
    })
}

fn goto(chain: &'static str) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: chain.into(),
    })
}

/// The table as found.
enum Read {
    Missing,
    Found { layout_ok: bool, current: Current },
}

/// The `nft` binary.
struct Nft {
    program: PathBuf,
}

impl Nft {
    fn find() -> Result<Nft> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join("nft"))
            .find(|p| p.is_file())
            .map(|program| Nft { program })
            .ok_or(Error::NftMissing)
    }

    fn read(&self) -> Result<Read> {
        let out = self.run(&["-j", "list", "table", "inet", TABLE], None)?;
        if !out.success {
            if out.stderr.contains("No such file or directory") {
                return Ok(Read::Missing);
            }
            return Err(Error::Nft {
                what: format!("list nftables table inet {TABLE}"),
                detail: out.stderr.trim().to_string(),
            });
        }
        parse_listing(out.stdout.as_bytes())
    }

    /// Runs `batch` as one transaction: all of it takes effect, or none.
    fn apply(&self, batch: Batch<'_>, what: &str) -> Result<()> {
        let json =
            serde_json::to_string(&batch.to_nftables()).expect("the nftables schema serializes");
        debug!(%json, "nft transaction");
        let out = self.run(&["-j", "-f", "-"], Some(json.as_bytes()))?;
        if out.success {
            return Ok(());
        }
        Err(Error::Nft {
            what: what.to_string(),
            detail: out.stderr.trim().to_string(),
        })
    }

    /// Runs nft, feeding it `input`, and waits for it to exit.
    ///
    /// Its standard streams are memory files, never pipes. The init of a container being
    /// started on another thread is a copy of this process until it execs, holding copies
    /// of all the descriptors open when it was cloned; a pipe end it held would keep nft's
    /// output from ever reaching end of file while that init waits to be released, which
    /// may in turn wait for this very call.
    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Result<NftOutput> {
        let what = || format!("run {}", self.program.display());
        let memfd = |name: &str| -> Result<File> {
            nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .map(File::from)
                .map_err(|e| io_err(what())(e.into()))
        };
        let stdin = match input {
            Some(bytes) => {
                let mut file = memfd("nft-stdin")?;
                file.write_all(bytes)
                    .and_then(|()| file.rewind())
                    .map_err(io_err(what()))?;
                std::process::Stdio::from(file)
            }
            None => std::process::Stdio::null(),
        };
        let mut stdout = memfd("nft-stdout")?;
        let mut stderr = memfd("nft-stderr")?;
        let status = std::process::Command::new(&self.program)
            .args(args)
            .stdin(stdin)
            .stdout(stdout.try_clone().map_err(io_err(what()))?)
            .stderr(stderr.try_clone().map_err(io_err(what()))?)
            .status()
            .map_err(io_err(what()))?;
        let read = |file: &mut File| -> Result<String> {
            let mut text = String::new();
            file.rewind()
                .and_then(|()| file.read_to_string(&mut text))
                .map_err(io_err(what()))?;
            Ok(text)
        };
        Ok(NftOutput {
            success: status.success(),
            stdout: read(&mut stdout)?,
            stderr: read(&mut stderr)?,
        })
    }
}

struct NftOutput {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Reads silo's state from `nft -j list table` output.
fn parse_listing(json: &[u8]) -> Result<Read> {
    let bad = |detail: String| Error::Nft {
        what: format!("understand the listing of table inet {TABLE}"),
        detail,
    };
    let root: serde_json::Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let objects = root["nftables"]
        .as_array()
        .ok_or_else(|| bad("no nftables array".into()))?;
    let mut current = Current::default();
    let mut layout_ok = false;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    for obj in objects {
        if let Some(set) = obj.get("set") {
            let elems = match &set["elem"] {
                serde_json::Value::Array(a) => a.clone(),
                serde_json::Value::Null => Vec::new(),
                one => vec![one.clone()],
            };
            let pairs = || {
                elems.iter().filter_map(|e| {
                    let parts = e["concat"].as_array()?;
                    Some((text(parts.first()?)?, text(parts.get(1)?)?))
                })
            };
            match set["name"].as_str() {
                Some("containers") => {
                    current.containers = pairs()
                        .filter_map(|(i, a)| Some((i, a.parse().ok()?)))
                        .collect();
                }
                Some("internet") => current.internet = pairs().collect(),
                Some("restricted") => current.restricted = elems.iter().filter_map(text).collect(),
                Some("fenced") => current.fenced = elems.iter().filter_map(text).collect(),
                _ => {}
            }
        } else if let Some(rule) = obj.get("rule")
            && let Some(comment) = text(&rule["comment"])
        {
            match (rule["chain"].as_str(), rule["handle"].as_u64()) {
                (Some("input"), _) => layout_ok |= comment == LAYOUT,
                (Some("allow"), Some(handle)) => {
                    current.allow.insert(comment, handle as u32);
                }
                _ => {}
            }
        }
    }
    Ok(Read::Found { layout_ok, current })
}

/// An exclusive lock on [`LOCK_PATH`], held until dropped.
struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Lock {
    fn take() -> Result<Lock> {
        let path = Path::new(LOCK_PATH);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("open {LOCK_PATH}")))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(Lock)
            .map_err(|(_, errno)| Error::Io {
                what: format!("lock {LOCK_PATH}"),
                source: errno.into(),
            })
    }
}

/// Whether a host end other than `except` exists in the calling thread's network namespace.
///
/// Read from /proc/thread-self/net/dev, which the kernel writes a page at a time as it is
/// read: the search stops at the first host end, so it costs the same with a thousand
/// containers as with one. (A netlink dump of every interface, as if_nameindex(3) makes,
/// takes 20 ms with a thousand veth pairs here.)
fn other_host_ends(except: Option<&str>) -> Result<bool> {
    use std::io::BufRead as _;
    let path = "/proc/thread-self/net/dev";
    let file = File::open(path).map_err(io_err(format!("open {path}")))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(io_err(format!("read {path}")))?;
        // Two header lines, then `  NAME: counters` per interface.
        if let Some((name, _)) = line.split_once(':')
            && network::is_host_if_name(name.trim())
            && Some(name.trim()) != except
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The index of interface `name` in the caller's network namespace, if it exists.
pub(crate) fn interface_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call, which only
    // reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// `/proc/sys/net/{family}/conf/{interface}/{key}`. /proc/sys/net shows the network
/// namespace of the thread that opens it, which is why these are written from the
/// caller's thread and not from a helper process.
fn conf_path(family: &str, interface: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/{family}/conf/{interface}/{key}"))
}

fn ipv4_forward_path() -> PathBuf {
    PathBuf::from("/proc/sys/net/ipv4/ip_forward")
}

/// A sysctl's value, or `None` when it does not exist (a vanished interface).
fn read_sysctl(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

/// Sets a sysctl, writing only when the value differs.
fn write_sysctl(path: &Path, value: &str) -> Result<()> {
    if read_sysctl(path)?.as_deref() == Some(value) {
        return Ok(());
    }
    std::fs::write(path, value).map_err(io_err(format!("write {value} to {}", path.display())))
}

/// Deletes a veth from synchronous code: the netlink client needs a tokio runtime, which
/// gets a thread of its own so that this works whether or not the caller is inside one.
/// The thread starts in the caller's network namespace, where the veth is.
pub(crate) fn delete_veth(link: &Link) -> Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(io_err("start a runtime to delete a veth"))?;
                rt.block_on(network::detach(link)).map_err(|e| Error::Io {
                    what: format!("delete veth {}", link.host_if),
                    source: std::io::Error::other(e.to_string()),
                })
            })
            .join()
            .expect("veth deletion does not panic")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> EgressRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_egress_rules() {
        let r = rule("198.51.100.0/24");
        assert_eq!(r.network(), (Ipv4Addr::new(198, 51, 100, 0), 24));
        assert_eq!(r.ports(), None);
        assert_eq!(rule("198.51.100.10").to_string(), "198.51.100.10/32");
        assert_eq!(rule("198.51.100.10:443").ports(), Some((443, 443)));
        assert_eq!(
            rule("198.51.100.10:443").to_string(),
            "198.51.100.10/32:443"
        );
        let r = rule("10.0.0.0/8:8000-8099");
        assert_eq!(r.ports(), Some((8000, 8099)));
        assert_eq!(r.to_string(), "10.0.0.0/8:8000-8099");
        assert_eq!(rule("0.0.0.0/0:53").network().1, 0);
        for s in [
            "1.2.3.4/32",
            "0.0.0.0/0",
            "10.0.0.0/8:1-65535",
            "1.2.3.4/32:80",
        ] {
            assert_eq!(rule(s).to_string(), s);
        }
    }

    #[test]
    fn refuses_bad_egress_rules_naming_them() {
        for bad in [
            "",
            "10.0.0.1/8",
            "300.1.1.1/32",
            "1.2.3.4/33",
            "1.2.3.4/",
            "1.2.3.4/+8",
            "1.2.3/24",
            "fd00::/8",
            "::1",
            "1.2.3.4:0",
            "1.2.3.4:90-80",
            "1.2.3.4:http",
            "1.2.3.4:70000",
            "1.2.3.4:",
            "169.254.169.254",
            "169.254.0.0/16:80",
            " 1.2.3.4",
            "example.com",
        ] {
            match bad.parse::<EgressRule>() {
                Err(e @ Error::InvalidEgress { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("{bad:?}")), "{msg}");
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let e = "10.0.0.1/8".parse::<EgressRule>().unwrap_err().to_string();
        assert!(
            e.contains("10.0.0.0/8"),
            "the message suggests the network: {e}"
        );
        let e = "fd00::/8".parse::<EgressRule>().unwrap_err().to_string();
        assert!(e.contains("IPv4 only"), "{e}");
        // Wider networks that merely include link-local are fine: link-local stays closed.
        rule("0.0.0.0/0");
        rule("169.0.0.0/8");
    }

    #[test]
    fn egress_rules_round_trip_through_serde() {
        let r = rule("198.51.100.0/24:80");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"198.51.100.0/24:80\"");
        assert_eq!(serde_json::from_str::<EgressRule>(&json).unwrap(), r);
        assert!(serde_json::from_str::<EgressRule>("\"10.0.0.1/8\"").is_err());
    }

    #[test]
    fn finds_the_default_route_with_the_lowest_metric() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\t\
            MTU\tWindow\tIRTT\n\
            eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n\
            eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_interface(table).as_deref(), Some("wlan0"));
        let none = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
            eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_route_interface(none), None);
    }

    #[test]
    fn keeps_only_nameservers_a_container_can_reach() {
        let conf = "# comment\nsearch example.com\nnameserver 127.0.0.53\n\
            nameserver 192.0.2.53\nnameserver ::1\nnameserver 169.254.169.253\n\
            nameserver 192.0.2.53\nnameserver 198.51.100.53 # trailing\n";
        assert_eq!(
            reachable_nameservers(conf),
            vec![
                Ipv4Addr::new(192, 0, 2, 53),
                Ipv4Addr::new(198, 51, 100, 53)
            ]
        );
        let text = resolv_conf(&[Ipv4Addr::new(198, 51, 100, 53)]);
        assert!(text.ends_with("nameserver 198.51.100.53\n"), "{text}");
    }

    #[test]
    fn host_ends_carry_the_prefix_the_rules_match() {
        let name = network::host_if_name(Ipv4Addr::new(10, 209, 0, 1));
        assert!(name.starts_with(HOST_IF_PREFIX), "{name}");
    }

    #[test]
    fn reads_silo_state_from_a_listing() {
        let json = format!(
            r#"{{"nftables": [{{"metainfo": {{"json_schema_version": 1}}}},
            {{"table": {{"family": "inet", "name": "silo", "handle": 1}}}},
            {{"set": {{"family": "inet", "name": "containers", "table": "silo",
              "type": ["ifname", "ipv4_addr"], "handle": 1,
              "elem": [{{"concat": ["sl0ad10001", "10.209.0.1"]}}]}}}},
            {{"set": {{"family": "inet", "name": "internet", "table": "silo",
              "type": ["ifname", "ifname"], "handle": 2,
              "elem": [{{"concat": ["sl0ad10001", "up0"]}}]}}}},
            {{"set": {{"family": "inet", "name": "restricted", "table": "silo",
              "type": "ifname", "handle": 3, "elem": ["sl0ad10001"]}}}},
            {{"set": {{"family": "inet", "name": "fenced", "table": "silo",
              "type": "ifname", "handle": 4}}}},
            {{"rule": {{"family": "inet", "table": "silo", "chain": "input", "handle": 5,
              "comment": "{LAYOUT}", "expr": []}}}},
            {{"rule": {{"family": "inet", "table": "silo", "chain": "allow", "handle": 9,
              "comment": "sl0ad10001 198.51.100.10/32:80", "expr": []}}}}]}}"#
        );
        let Read::Found { layout_ok, current } = parse_listing(json.as_bytes()).unwrap() else {
            panic!("table not found");
        };
        assert!(layout_ok);
        assert_eq!(
            current.containers.into_iter().collect::<Vec<_>>(),
            vec![("sl0ad10001".to_string(), Ipv4Addr::new(10, 209, 0, 1))]
        );
        assert!(
            current
                .internet
                .contains(&("sl0ad10001".into(), "up0".into()))
        );
        assert!(current.restricted.contains("sl0ad10001"));
        assert!(current.fenced.is_empty());
        assert_eq!(
            current.allow.get("sl0ad10001 198.51.100.10/32:80"),
            Some(&9)
        );
    }

    #[test]
    fn wanted_state_follows_the_policy() {
        let allow = vec![rule("198.51.100.10:80"), rule("198.51.100.53:53")];
        let egress = Egress::Internet {
            uplink: "up0".into(),
            allow,
        };
        let w = wanted("slx", Some((Ipv4Addr::new(10, 0, 0, 1), &egress)));
        assert_eq!(w.internet.len(), 1);
        assert!(w.restricted.contains("slx"));
        assert!(w.allow.contains_key("slx 198.51.100.10/32:80"));
        assert_eq!(w.containers.len(), 1);
        let w = wanted("slx", Some((Ipv4Addr::new(10, 0, 0, 1), &Egress::None)));
        assert!(w.containers.is_empty() && w.internet.is_empty());
        assert!(w.restricted.is_empty() && w.allow.is_empty());
        assert!(wanted("slx", None).containers.is_empty());
    }
}
