//! The runtime `config.json` of an image's bundle, from its image configuration.
//!
//! Everything an image does not say (mounts, namespaces, the hostname) comes from the demo
//! bundle's template, `rootfs/config.json.in`, so a generated bundle gets the same
//! isolation as the bundles silo is tested with and passes the same checks.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{Spec, UserBuilder};

/// Errors from turning an image configuration into a runtime one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the image has neither Entrypoint nor Cmd: give a command to run")]
    NoCommand,
    #[error("user {user:?} of the image is not in its /etc/passwd")]
    UnknownUser { user: String },
    #[error("group {group:?} of the image is not in its /etc/group")]
    UnknownGroup { group: String },
    #[error("failed to read {file} of the image: {source}")]
    Read {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open root filesystem {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The template every generated config.json starts from.
const TEMPLATE: &str = include_str!("../../rootfs/config.json.in");

/// The annotation listing the TCP ports an image exposes, comma separated (`8080,8443`).
pub const PORTS_ANNOTATION: &str = "silo.ports";

/// Builds the runtime spec for an image unpacked at `rootfs` (whose `/etc/passwd` and
/// `/etc/group` name its users). The spec's root is `rootfs`, relative to the bundle.
pub fn spec(image: &ImageConfiguration, rootfs: &Path) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_str(TEMPLATE).expect("the bundle template parses");
    let empty = Default::default();
    let config = image.config().as_ref().unwrap_or(&empty);

    let args: Vec<String> = config
        .entrypoint()
        .iter()
        .flatten()
        .chain(config.cmd().iter().flatten())
        .cloned()
        .collect();
    if args.is_empty() {
        return Err(Error::NoCommand);
    }

    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| Error::Root {
        path: rootfs.to_path_buf(),
        source: e.into(),
    })?;
    let user = resolve_user(config.user().as_deref().unwrap_or(""), &|file| {
        read_in_root(root.as_fd(), file)
    })?;

    // The template's variables, then HOME for the image's user, then the image's own.
    let mut env = BTreeMap::new();
    let process = spec.process().clone().unwrap_or_default();
    for kv in process
        .env()
        .iter()
        .flatten()
        .chain(&[format!("HOME={}", user.home)])
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        env.insert(k.to_string(), v.to_string());
    }
    for kv in config.env().iter().flatten() {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        env.insert(k.to_string(), v.to_string());
    }

    let cwd = match config.working_dir().as_deref() {
        None | Some("") => "/".to_string(),
        Some(dir) if dir.starts_with('/') => dir.to_string(),
        // Docker reads a relative WorkingDir from the root.
        Some(dir) => format!("/{dir}"),
    };

    let mut process = process;
    process.set_args(Some(args));
    process.set_env(Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()));
    process.set_cwd(cwd.into());
    let mut builder = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.groups.is_empty() {
        builder = builder.additional_gids(user.groups.clone());
    }
    process.set_user(builder.build().expect("a user with uid and gid builds"));
    spec.set_process(Some(process));

    let ports = tcp_ports(config.exposed_ports().iter().flatten());
    if !ports.is_empty() {
        let text = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut annotations = spec.annotations().clone().unwrap_or_default();
        annotations.insert(PORTS_ANNOTATION.to_string(), text);
        spec.set_annotations(Some(annotations));
    }
    Ok(spec)
}

/// The TCP ports a spec's [`PORTS_ANNOTATION`] lists (none without it).
pub fn ports(spec: &Spec) -> Vec<u16> {
    let Some(list) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(PORTS_ANNOTATION))
    else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// The TCP ports of `ExposedPorts` keys (`8080/tcp`, or `8080`: TCP is the default).
fn tcp_ports<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<u16> {
    let mut ports: Vec<u16> = keys
        .filter_map(|key| match key.split_once('/') {
            None => key.parse().ok(),
            Some((port, proto)) if proto.eq_ignore_ascii_case("tcp") => port.parse().ok(),
            Some(_) => None,
        })
        .filter(|&p| p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Reads a file of the image, resolving symlinks as the container would (inside the root).
fn read_in_root(root: std::os::fd::BorrowedFd<'_>, file: &'static str) -> Result<Option<String>> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(root, file, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => {
            return Err(Error::Read {
                file,
                source: e.into(),
            });
        }
    };
    // A few MiB is far beyond any real passwd file; the cap keeps a hostile one from
    // filling memory.
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|source| Error::Read { file, source })?;
    Ok(Some(text))
}

/// Who the image's process runs as.
#[derive(Debug, PartialEq)]
struct User {
    uid: u32,
    gid: u32,
    /// Supplementary groups from /etc/group.
    groups: Vec<u32>,
    home: String,
}

/// Resolves an image's `User` (`user`, `uid`, `user:group`, `uid:gid`, ...) against the
/// image's own /etc/passwd and /etc/group, read through `read`.
type ReadFile<'a> = &'a dyn Fn(&'static str) -> Result<Option<String>>;

fn resolve_user(spec: &str, read: ReadFile<'_>) -> Result<User> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read("etc/passwd")?.unwrap_or_default();
    // name, uid, gid, home
    let entries: Vec<(&str, u32, u32, &str)> = passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 7).then_some(())?;
            Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?, f[5]))
        })
        .collect();
    let entry = if user.is_empty() {
        entries.iter().find(|e| e.1 == 0)
    } else if let Ok(uid) = user.parse::<u32>() {
        entries.iter().find(|e| e.1 == uid)
    } else {
        Some(
            entries
                .iter()
                .find(|e| e.0 == user)
                .ok_or_else(|| Error::UnknownUser {
                    user: user.to_string(),
                })?,
        )
    };
    let uid = match user.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map_or(0, |e| e.1),
    };

    let groups_text = || read("etc/group").map(Option::unwrap_or_default);
    let (gid, groups) = match group {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => (gid, Vec::new()),
            Err(_) => {
                let text = groups_text()?;
                let gid = text
                    .lines()
                    .map(|line| line.split(':').collect::<Vec<_>>())
                    .find(|f| f.len() >= 3 && f[0] == g)
                    .and_then(|f| f[2].parse().ok())
                    .ok_or_else(|| Error::UnknownGroup {
                        group: g.to_string(),
                    })?;
                (gid, Vec::new())
            }
        },
        // No group given: the user's primary group, plus the groups that list the user.
        _ => {
            let gid = entry.map_or(0, |e| e.2);
            let mut groups = Vec::new();
            if let Some(name) = entry.map(|e| e.0) {
                for line in groups_text()?.lines() {
                    let f: Vec<&str> = line.split(':').collect();
                    let Some(id) = f.get(2).and_then(|g| g.parse::<u32>().ok()) else {
                        continue;
                    };
                    let member = f.get(3).is_some_and(|m| m.split(',').any(|m| m == name));
                    if member && id != gid && !groups.contains(&id) {
                        groups.push(id);
                    }
                }
            }
            (gid, groups)
        }
    };
    let home = match entry {
        Some(e) if !e.3.is_empty() => e.3.to_string(),
        _ if uid == 0 => "/root".to_string(),
        _ => "/".to_string(),
    };
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\n";

    fn files(file: &'static str) -> Result<Option<String>> {
        Ok(Some(match file {
            "etc/passwd" => PASSWD.into(),
            _ => GROUP.into(),
        }))
    }

    fn user(spec: &str) -> Result<User> {
        resolve_user(spec, &files)
    }

    #[test]
    fn users_resolve() {
        let u = user("").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        let u = user("app").unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 1000, vec![10]));
        assert_eq!(u.home, "/home/app");
        let u = user("1000:10").unwrap();
        assert_eq!((u.uid, u.gid, u.groups), (1000, 10, vec![]));
        let u = user("app:wheel").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        let u = user("4242").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        let msg = user("nobody").unwrap_err().to_string();
        assert!(msg.contains("nobody"), "{msg}");
        let msg = user("app:staff").unwrap_err().to_string();
        assert!(msg.contains("staff"), "{msg}");
    }

    #[test]
    fn tcp_ports_are_listed() {
        let keys = ["8080/tcp", "53/udp", "443", "8080", "x/tcp"].map(String::from);
        assert_eq!(tcp_ports(keys.iter()), vec![443, 8080]);
    }
}
