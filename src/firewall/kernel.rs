//! The two questions the firewall asks nf_tables itself, over a netlink socket, instead of
//! running `nft`: which generation the ruleset is at, and whether silo's table exists.
//!
//! The generation is a counter the kernel bumps with every committed nf_tables transaction in
//! the network namespace, whoever commits it. It is what lets the firewall keep the table's
//! state in memory: while the counter has not moved, nothing in the table has either.
//!
//! Both are single request-reply exchanges that no crate offers on their own: the nftables
//! crates either drive `nft` or build whole rulesets. The replies are read with the netlink
//! buffer types of `netlink-packet-core`, the same crate the veth code relies on.

use rtnetlink::packet_core::{NetlinkBuffer, NlaBuffer, NlasIterator};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// The nf_tables subsystem of nfnetlink, and the messages used here (linux/netfilter/
/// nfnetlink.h and nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFPROTO_INET: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const HEADER_LEN: usize = 16;
/// struct nfgenmsg: family, version, resource id.
const NFGENMSG_LEN: usize = 4;

/// The generation of the nf_tables ruleset in the caller's network namespace.
pub(super) fn generation() -> std::io::Result<u32> {
    let reply = request(NFT_MSG_GETGEN, 0, &[])?
        .ok_or_else(|| std::io::Error::other("the kernel has no nf_tables generation"))?;
    expect_type(&reply, NFT_MSG_NEWGEN)?;
    let id = attribute(&reply, NFTA_GEN_ID)
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| std::io::Error::other("the generation reply carries no id"))?;
    Ok(u32::from_be_bytes(id))
}

/// Whether table `name` of the inet family exists in the caller's network namespace.
pub(super) fn inet_table_exists(name: &str) -> std::io::Result<bool> {
    let mut attr = Vec::new();
    push_attribute(
        &mut attr,
        NFTA_TABLE_NAME,
        &[name.as_bytes(), b"\0"].concat(),
    );
    match request(NFT_MSG_GETTABLE, NFPROTO_INET, &attr)? {
        Some(reply) => expect_type(&reply, NFT_MSG_NEWTABLE).map(|()| true),
        None => Ok(false),
    }
}

/// Sends one nf_tables request and returns its reply, or `None` when the kernel answered
/// that the object does not exist.
fn request(msg: u16, family: u8, attributes: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let len = HEADER_LEN + NFGENMSG_LEN + attributes.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | msg).to_ne_bytes());
    out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    out.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it in
    out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg, version 0, resource 0
    out.extend_from_slice(attributes);
    socket.send(&out, 0)?;

    let (reply, _) = socket.recv_from_full()?;
    let buffer = NetlinkBuffer::new_checked(&reply[..])
        .map_err(|e| std::io::Error::other(format!("malformed netlink reply: {e}")))?;
    if buffer.message_type() == NLMSG_ERROR {
        let code = buffer
            .payload()
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(i32::from_ne_bytes)
            .ok_or_else(|| std::io::Error::other("truncated netlink error"))?;
        return match -code {
            0 => Err(std::io::Error::other(
                "netlink acknowledged instead of answering",
            )),
            libc::ENOENT => Ok(None),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        };
    }
    Ok(Some(reply[..buffer.length() as usize].to_vec()))
}

fn expect_type(reply: &[u8], msg: u16) -> std::io::Result<()> {
    let got = NetlinkBuffer::new(reply).message_type();
    if got == NFNL_SUBSYS_NFTABLES << 8 | msg {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "unexpected nf_tables reply type {got:#06x}"
    )))
}

/// The value of attribute `kind` of a reply message, if it has one.
fn attribute(reply: &[u8], kind: u16) -> Option<Vec<u8>> {
    let payload = NetlinkBuffer::new(reply).payload().get(NFGENMSG_LEN..)?;
    NlasIterator::new(payload)
        .filter_map(Result::ok)
        .find(|nla: &NlaBuffer<&[u8]>| nla.kind() == kind)
        .map(|nla| nla.value().to_vec())
}

/// Appends a netlink attribute, padded to four bytes.
fn push_attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_found_again() {
        let mut attrs = Vec::new();
        push_attribute(&mut attrs, NFTA_TABLE_NAME, b"silo\0");
        push_attribute(&mut attrs, 7, &42u32.to_be_bytes());
        assert_eq!(attrs.len(), 12 + 8);
        let mut reply = Vec::new();
        let len = (HEADER_LEN + NFGENMSG_LEN + attrs.len()) as u32;
        reply.extend_from_slice(&len.to_ne_bytes());
        reply.extend_from_slice(&(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN).to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&[0; NFGENMSG_LEN]);
        reply.extend_from_slice(&attrs);
        assert_eq!(attribute(&reply, 7), Some(42u32.to_be_bytes().to_vec()));
        assert_eq!(attribute(&reply, NFTA_TABLE_NAME), Some(b"silo\0".to_vec()));
        assert_eq!(attribute(&reply, 9), None);
        expect_type(&reply, NFT_MSG_NEWGEN).unwrap();
        assert!(expect_type(&reply, NFT_MSG_NEWTABLE).is_err());
    }
}
