//! Applying layers to a root filesystem, one tar entry at a time, never outside it.
//!
//! A layer is hostile until proven otherwise: its entry names, link targets and the
//! symlinks earlier entries made all try to reach outside the tree. So no path is ever
//! resolved by the host's rules. Names with `..` or a leading `/` are refused outright;
//! the directory an entry lands in is opened with `openat2(RESOLVE_BENEATH)` against the
//! root's descriptor, which fails instead of following a symlink (absolute, or with `..`)
//! out of the tree; and the entry itself is made with `*at` calls on that descriptor that
//! never follow a symlink in its last component.
//!
//! Whiteouts follow the OCI layer spec: `.wh.NAME` removes NAME, `.wh..wh..opq` empties its
//! directory, and both only touch what lower layers made, never what this layer adds.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fchmod, fstatat, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tar::EntryType;
use tracing::{debug, warn};

/// Errors from unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer {layer}: entry {entry:?} refused: {reason}")]
    Refused {
        layer: String,
        entry: String,
        reason: &'static str,
    },
    #[error("layer {layer}: entry {entry:?}: failed to {what}: {source}")]
    Entry {
        layer: String,
        entry: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: failed to read the archive: {source}")]
    Archive {
        layer: String,
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

/// What a layer entry may not be or do, for [`Error::Refused`].
#[derive(Debug)]
enum Refusal {
    Absolute,
    DotDot,
    Outside,
    NotADirectory,
    BadWhiteout,
    /// A hard link's target is absolute or has `..`.
    LinkTarget,
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Absolute => "absolute paths are not allowed",
            Refusal::DotDot => "`..` components are not allowed",
            Refusal::Outside => "its path resolves outside the root filesystem",
            Refusal::NotADirectory => "a parent of it is not a directory",
            Refusal::BadWhiteout => "a whiteout must name one entry of its directory",
            Refusal::LinkTarget => "a hard link's target must be a relative path without `..`",
        }
    }
}

/// Why one entry failed: a refusal, or a system call that failed on it.
enum Failure {
    Refused(Refusal),
    Io(&'static str, std::io::Error),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Failure {
        Failure::Refused(r)
    }
}

/// Tags a failed call with what it was doing.
trait Doing<T> {
    fn doing(self, what: &'static str) -> std::result::Result<T, Failure>;
}

impl<T> Doing<T> for nix::Result<T> {
    fn doing(self, what: &'static str) -> std::result::Result<T, Failure> {
        self.map_err(|e| Failure::Io(what, e.into()))
    }
}

impl<T> Doing<T> for std::io::Result<T> {
    fn doing(self, what: &'static str) -> std::result::Result<T, Failure> {
        self.map_err(|e| Failure::Io(what, e))
    }
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT: &[u8] = b".wh.";

/// A root filesystem being built from layers.
pub struct Rootfs {
    root: OwnedFd,
    /// Owners are kept only when silo may set them (as root).
    chown: bool,
}

impl Rootfs {
    /// Opens the (existing) directory `path` to unpack layers into.
    pub fn open(path: &Path) -> Result<Rootfs> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::Root {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(Rootfs {
            root,
            chown: nix::unistd::geteuid().is_root(),
        })
    }

    /// Applies one layer (a tar stream, plain, gzip or zstd: told apart by their magic
    /// numbers). `layer` names it in errors.
    pub fn apply<'a>(&self, layer: &str, reader: impl Read + 'a) -> Result<()> {
        let archive_err = |source| Error::Archive {
            layer: layer.to_string(),
            source,
        };
        let mut archive = tar::Archive::new(super::decompress(reader).map_err(archive_err)?);
        let mut added = HashSet::new();
        let mut dir_times = Vec::new();
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            let name = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&name).into_owned();
            self.entry(&mut entry, &name, &mut added, &mut dir_times)
                .map_err(|f| match f {
                    Failure::Refused(r) => Error::Refused {
                        layer: layer.to_string(),
                        entry: shown,
                        reason: r.reason(),
                    },
                    Failure::Io(what, source) => Error::Entry {
                        layer: layer.to_string(),
                        entry: shown,
                        what,
                        source,
                    },
                })?;
        }
        // A directory's time last, once this layer has put everything into it; deepest
        // first, so setting one does not disturb its parent's.
        dir_times.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, mtime) in dir_times {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let (Some(name), Ok(dir)) = (rel.file_name(), self.dir(parent, false)) else {
                continue;
            };
            let t = TimeSpec::new(mtime, 0);
            match utimensat(dir.as_fd(), name, &t, &t, UtimensatFlags::NoFollowSymlink) {
                // Removed again later in the layer.
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => {
                    return Err(Error::Entry {
                        layer: layer.to_string(),
                        entry: rel.display().to_string(),
                        what: "set the modification time",
                        source: e.into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies one entry. `added` holds every path this layer made, and their parents,
    /// which its whiteouts must spare; `dir_times` gets the directories' modification
    /// times, to set once the layer is done.
    fn entry(
        &self,
        entry: &mut tar::Entry<'_, Box<dyn Read + '_>>,
        name: &[u8],
        added: &mut HashSet<PathBuf>,
        dir_times: &mut Vec<(PathBuf, i64)>,
    ) -> std::result::Result<(), Failure> {
        let rel = clean(name)?;
        let Some(file) = rel.file_name().map(|f| f.as_bytes().to_vec()) else {
            // The archive's own root ("./"): the rootfs directory exists already.
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));

        if file == OPAQUE {
            let dir = self.dir(parent_rel, true)?;
            let at = parent_rel.to_path_buf();
            return prune(dir.as_fd(), &at, added);
        }
        if let Some(target) = file.strip_prefix(WHITEOUT) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(Refusal::BadWhiteout.into());
            }
            let target = OsStr::from_bytes(target);
            if added.contains(&parent_rel.join(target)) {
                return Ok(());
            }
            return match self.dir(parent_rel, false) {
                Ok(dir) => remove_all(dir.as_fd(), target),
                // Nothing below a missing directory to remove.
                Err(Failure::Io(_, e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                Err(f) => Err(f),
            };
        }

        let pax = Pax::read(entry)?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = Mode::from_bits_truncate(header.mode().doing("read the mode")? & 0o7777);
        let uid = match pax.uid {
            Some(uid) => uid,
            None => header.uid().doing("read the owner")? as u32,
        };
        let gid = match pax.gid {
            Some(gid) => gid,
            None => header.gid().doing("read the group")? as u32,
        };
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        let mtime = header.mtime().unwrap_or(0) as i64;
        let file = OsStr::from_bytes(&file);
        let link = entry.link_name_bytes().map(|l| l.into_owned());

        match kind {
            EntryType::Directory => {
                let parent = self.dir(parent_rel, true)?;
                match fstatat(parent.as_fd(), file, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
                            == SFlag::S_IFDIR => {}
                    Ok(_) => remove_all(parent.as_fd(), file)?,
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(Failure::Io("stat", e.into())),
                }
                match mkdirat(parent.as_fd(), file, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(Failure::Io("make the directory", e.into())),
                }
                let dir = openat(
                    parent.as_fd(),
                    file,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .doing("open the directory")?;
                if self.chown {
                    fchown(&dir, Some(uid), Some(gid)).doing("set the owner")?;
                }
                fchmod(&dir, mode).doing("set the mode")?;
                pax.set_xattrs(&File::from(dir), &rel);
                dir_times.push((rel.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let parent = self.dir(parent_rel, true)?;
                remove_all(parent.as_fd(), file)?;
                let fd = openat(
                    parent.as_fd(),
                    file,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .doing("create the file")?;
                let mut out = File::from(fd);
                std::io::copy(entry, &mut out).doing("write the file")?;
                // The owner first: chown clears the set-id bits the mode may hold.
                if self.chown {
                    fchown(&out, Some(uid), Some(gid)).doing("set the owner")?;
                }
                fchmod(&out, mode).doing("set the mode")?;
                // After the owner: chown drops a file's capabilities.
                pax.set_xattrs(&out, &rel);
                let t = TimeSpec::new(mtime, 0);
                futimens(&out, &t, &t).doing("set the modification time")?;
            }
            EntryType::Symlink => {
                let target = link.ok_or(Failure::Io("read the link target", missing_link()))?;
                let parent = self.dir(parent_rel, true)?;
                remove_all(parent.as_fd(), file)?;
                // The target is stored as is: it is only ever resolved inside the container
                // (or by this module, which never follows it out of the tree).
                symlinkat(OsStr::from_bytes(&target), parent.as_fd(), file)
                    .doing("make the symlink")?;
                if self.chown {
                    fchownat(
                        parent.as_fd(),
                        file,
                        Some(uid),
                        Some(gid),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .doing("set the owner")?;
                }
            }
            EntryType::Link => {
                let target = link.ok_or(Failure::Io("read the link target", missing_link()))?;
                let target = clean(&target).map_err(|_| Refusal::LinkTarget)?;
                let Some(target_file) = target.file_name() else {
                    return Err(Refusal::Outside.into());
                };
                let target_dir = self.dir(target.parent().unwrap_or(Path::new("")), false)?;
                let parent = self.dir(parent_rel, true)?;
                if target == rel {
                    return Ok(());
                }
                remove_all(parent.as_fd(), file)?;
                // Without AT_SYMLINK_FOLLOW a symlink target is linked itself, not followed.
                linkat(
                    target_dir.as_fd(),
                    target_file,
                    parent.as_fd(),
                    file,
                    AtFlags::empty(),
                )
                .doing("make the hard link")?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                // A container gets its devices from silo's /dev, never from an image.
                debug!(entry = %rel.display(), ?kind, "skipped a special file");
                return Ok(());
            }
            _ => {
                debug!(entry = %rel.display(), ?kind, "skipped an entry of unknown type");
                return Ok(());
            }
        }
        let mut at = rel.as_path();
        added.insert(at.to_path_buf());
        while let Some(parent) = at.parent() {
            if !added.insert(parent.to_path_buf()) {
                break;
            }
            at = parent;
        }
        Ok(())
    }

    /// Opens directory `rel` of the tree (O_PATH), refusing any path that resolves through
    /// a symlink out of it. With `create`, missing directories on the way are made
    /// (owned by root, mode 0755), as tar does for entries whose parents it has not seen.
    fn dir(&self, rel: &Path, create: bool) -> std::result::Result<OwnedFd, Failure> {
        match open_beneath(self.root.as_fd(), rel) {
            Err(Failure::Io(_, e)) if create && e.raw_os_error() == Some(libc::ENOENT) => {}
            other => return other,
        }
        let mut at = PathBuf::new();
        let mut fd = open_beneath(self.root.as_fd(), &at)?;
        for part in rel.components() {
            at.push(part);
            fd = match open_beneath(self.root.as_fd(), &at) {
                Err(Failure::Io(_, e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match mkdirat(
                        fd.as_fd(),
                        part.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(Failure::Io("make a parent directory", e.into())),
                    }
                    open_beneath(self.root.as_fd(), &at)?
                }
                other => other?,
            };
        }
        Ok(fd)
    }
}

/// What an entry's PAX header says beyond the tar header: owners too large for it, and
/// extended attributes (`SCHILY.xattr.NAME`, as GNU tar and Docker write them).
struct Pax {
    uid: Option<u32>,
    gid: Option<u32>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pax {
    fn read(entry: &mut tar::Entry<'_, Box<dyn Read + '_>>) -> std::result::Result<Pax, Failure> {
        let mut pax = Pax {
            uid: None,
            gid: None,
            xattrs: Vec::new(),
        };
        let Some(exts) = entry.pax_extensions().doing("read the PAX header")? else {
            return Ok(pax);
        };
        for ext in exts {
            let ext = ext.doing("read the PAX header")?;
            let number = || std::str::from_utf8(ext.value_bytes()).ok()?.parse().ok();
            match ext.key_bytes() {
                b"uid" => pax.uid = number(),
                b"gid" => pax.gid = number(),
                key => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        pax.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(pax)
    }

    /// Sets the extended attributes on the file just made. One the filesystem or the
    /// kernel refuses is skipped, as other runtimes do: an image stays usable without it.
    fn set_xattrs(&self, file: &File, rel: &Path) {
        use xattr::FileExt;
        for (name, value) in &self.xattrs {
            if let Err(e) = file.set_xattr(OsStr::from_bytes(name), value) {
                let name = String::from_utf8_lossy(name);
                warn!(entry = %rel.display(), %name, error = %e, "skipped an extended attribute");
            }
        }
    }
}

fn missing_link() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the entry has no link name",
    )
}

/// Opens `rel` below `root` as a directory, never resolving outside `root`.
fn open_beneath(root: BorrowedFd<'_>, rel: &Path) -> std::result::Result<OwnedFd, Failure> {
    let path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(root, path, how).map_err(|e| match e {
        Errno::EXDEV | Errno::ELOOP => Refusal::Outside.into(),
        Errno::ENOTDIR => Refusal::NotADirectory.into(),
        e => Failure::Io("open the parent directory", e.into()),
    })
}

/// The entry name as a relative path of normal components: `.` dropped, absolute paths and
/// `..` refused (even `a/../b`, which no honest layer needs).
fn clean(name: &[u8]) -> std::result::Result<PathBuf, Refusal> {
    let path = Path::new(OsStr::from_bytes(name));
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::DotDot),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
        }
    }
    Ok(out)
}

/// Removes `name` from `dir`, a whole directory tree included, never following symlinks.
/// A missing `name` is no error.
fn remove_all(dir: BorrowedFd<'_>, name: &OsStr) -> std::result::Result<(), Failure> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(Failure::Io("remove what was there", e.into())),
    }
    let sub = open_dir_nofollow(dir, name)?;
    for child in children(&sub)? {
        remove_all(sub.as_fd(), &child)?;
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir).doing("remove a directory")
}

/// Removes everything below `dir` (at `at` in the tree) that this layer did not add.
fn prune(
    dir: BorrowedFd<'_>,
    at: &Path,
    added: &HashSet<PathBuf>,
) -> std::result::Result<(), Failure> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .doing("open the opaque directory")?;
    for child in children(&fd)? {
        let path = at.join(&child);
        if !added.contains(&path) {
            remove_all(fd.as_fd(), &child)?;
            continue;
        }
        let st =
            fstatat(fd.as_fd(), child.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).doing("stat")?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            let sub = open_dir_nofollow(fd.as_fd(), &child)?;
            prune(sub.as_fd(), &path, added)?;
        }
    }
    Ok(())
}

fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &OsStr) -> std::result::Result<OwnedFd, Failure> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .doing("open a directory to remove")
}

/// The names in a directory, less `.` and `..`, read before any of them is changed.
fn children(dir: &OwnedFd) -> std::result::Result<Vec<std::ffi::OsString>, Failure> {
    let fd = nix::unistd::dup(dir).doing("list a directory")?;
    let mut d = nix::dir::Dir::from_fd(fd).doing("list a directory")?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.doing("list a directory")?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned() {
        assert_eq!(clean(b"./a/./b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean(b"./").unwrap(), PathBuf::new());
        assert!(matches!(clean(b"/etc/passwd"), Err(Refusal::Absolute)));
        assert!(matches!(clean(b"a/../../x"), Err(Refusal::DotDot)));
        assert!(matches!(clean(b"../x"), Err(Refusal::DotDot)));
    }
}
