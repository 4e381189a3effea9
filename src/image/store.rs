//! Content-addressed blobs: reading them back verified, and silo's own store of them.
//!
//! An OCI image layout and silo's store share one shape, `blobs/sha256/<hex>`, so
//! [`Blobs`] reads either. Every read hashes the whole blob first and compares digest and
//! size with the descriptor that named it: nothing is parsed or unpacked before it is
//! known to be what the manifest promised.
//!
//! The store (`<state>/images`) holds the blobs of every imported image once, plus
//! `refs/<name>`, each naming an image's manifest. Blobs and refs are written to a
//! temporary file, synced and renamed into place, so an interrupted import leaves no
//! half-written blob or ref behind (at most an unused temporary file under `tmp/`).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, Digest, DigestAlgorithm, MediaType};
use sha2::{Digest as _, Sha256};
use tracing::debug;

/// Errors from reading or writing blobs and refs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blob {digest} does not match its digest (its content hashes to {actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("digest {0} is not supported: only sha256 with 64 lower-case hex digits")]
    UnsupportedDigest(String),
    #[error("blob {digest} is missing from {dir}")]
    Missing { digest: String, dir: PathBuf },
    #[error("blob {digest}: {source}")]
    Json {
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} is {size} bytes, more than a {what} may be")]
    TooLarge {
        digest: String,
        what: &'static str,
        size: u64,
    },
    #[error("no image named {0:?} in the store")]
    NoSuchImage(String),
    #[error("invalid image name {0:?}: use 1 to 128 printable characters without spaces")]
    InvalidName(String),
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The most a manifest, an index or an image config may weigh: they are read whole.
const MAX_JSON: u64 = 16 << 20;

/// The hex part of a sha256 digest, checked so that it can be used as a file name.
pub(crate) fn sha256_hex(digest: &Digest) -> Result<&str> {
    let hex = digest.digest();
    let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if *digest.algorithm() != DigestAlgorithm::Sha256 || !valid {
        return Err(Error::UnsupportedDigest(digest.to_string()));
    }
    Ok(hex)
}

/// A sha256 digest from its hex form.
pub(crate) fn digest_of(hex: &str) -> Digest {
    format!("sha256:{hex}")
        .parse()
        .expect("a sha256 hex string is a valid digest")
}

/// Copies `from` into `to`, returning the sha256 hex and the byte count of what passed.
pub(crate) fn copy_hashing(
    from: &mut impl Read,
    to: &mut impl Write,
) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Compares what a blob hashed to with what its descriptor says.
pub(crate) fn check(desc: &Descriptor, hex: &str, size: u64) -> Result<()> {
    if sha256_hex(desc.digest())? != hex {
        return Err(Error::DigestMismatch {
            digest: desc.digest().to_string(),
            actual: format!("sha256:{hex}"),
        });
    }
    if desc.size() != size {
        return Err(Error::SizeMismatch {
            digest: desc.digest().to_string(),
            expected: desc.size(),
            actual: size,
        });
    }
    Ok(())
}

/// The `blobs/` of an OCI image layout or of the store, read verified.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// The blobs below `dir` (which holds `blobs/sha256/`).
    pub fn new(dir: impl Into<PathBuf>) -> Blobs {
        Blobs { dir: dir.into() }
    }

    /// Where the blob of `digest` lives.
    pub fn path(&self, digest: &Digest) -> Result<PathBuf> {
        Ok(self.dir.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// Opens the blob `desc` names, after checking that its content matches the descriptor.
    /// The file is positioned at its start.
    pub fn open(&self, desc: &Descriptor) -> Result<File> {
        let path = self.path(desc.digest())?;
        let mut file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                digest: desc.digest().to_string(),
                dir: self.dir.clone(),
            },
            _ => Error::Io {
                what: "open",
                path: path.clone(),
                source,
            },
        })?;
        let io = |what| {
            let path = path.clone();
            move |source| Error::Io { what, path, source }
        };
        let (hex, size) = copy_hashing(&mut file, &mut std::io::sink()).map_err(io("read"))?;
        check(desc, &hex, size)?;
        file.rewind().map_err(io("rewind"))?;
        Ok(file)
    }

    /// Reads and parses a JSON blob (a manifest, an index, a config), verified.
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<T> {
        if desc.size() > MAX_JSON {
            return Err(Error::TooLarge {
                digest: desc.digest().to_string(),
                what,
                size: desc.size(),
            });
        }
        let file = self.open(desc)?;
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|source| Error::Json {
            digest: desc.digest().to_string(),
            source,
        })
    }
}

/// silo's image store: blobs shared by all images, and a ref per image name.
// TODO: removing images and collecting the blobs no ref names. It needs a store-wide lock
// first: a collection must never race an import that found a blob present and skipped it.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    blobs: Blobs,
}

/// A blob written to the store's temporary directory and hashed, not yet in place; removed
/// when dropped. It holds no open file, so an archive of many files stages them all.
pub(crate) struct Staged {
    file: tempfile::TempPath,
    pub(crate) hex: String,
    pub(crate) size: u64,
}

impl Staged {
    /// A descriptor of this blob's content.
    pub(crate) fn descriptor(&self, media_type: MediaType) -> Descriptor {
        Descriptor::new(media_type, self.size, digest_of(&self.hex))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.file
    }

    /// Syncs the file and renames it to `dest`, then syncs `dest`'s directory, so that
    /// after a crash `dest` is either missing or whole.
    fn persist(self, dest: &Path) -> Result<()> {
        let path = self.file.to_path_buf();
        let io = |what| {
            let path = path.clone();
            move |source| Error::Io { what, path, source }
        };
        // fsync flushes the file's data whatever the descriptor was opened for.
        File::open(&self.file)
            .and_then(|f| f.sync_all())
            .map_err(io("sync"))?;
        self.file
            .persist(dest)
            .map_err(|e| io("rename into place")(e.error))?;
        sync_dir(dest.parent().expect("a store path has a parent"))
    }
}

/// One image in the store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ref {
    pub name: String,
    pub manifest: Descriptor,
}

impl Store {
    /// The store in `dir` (`<state>/images`), made when missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "refs", "tmp"] {
            let path = dir.join(sub);
            // Private like the rest of the state directory.
            use std::os::unix::fs::DirBuilderExt;
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true).mode(0o700);
            builder.create(&path).map_err(|source| Error::Io {
                what: "create",
                path,
                source,
            })?;
        }
        Ok(Store {
            blobs: Blobs::new(&dir),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Writes `from` to a temporary file in the store, hashing it on the way.
    pub(crate) fn stage(&self, from: &mut impl Read) -> Result<Staged> {
        let tmp = self.dir.join("tmp");
        let io = |what| {
            let path = tmp.clone();
            move |source| Error::Io { what, path, source }
        };
        let mut file = tempfile::NamedTempFile::new_in(&tmp).map_err(io("create a file in"))?;
        let (hex, size) = copy_hashing(from, file.as_file_mut()).map_err(io("write a blob in"))?;
        Ok(Staged {
            file: file.into_temp_path(),
            hex,
            size,
        })
    }

    /// Hashes a file already in the store's temporary directory (a finished download) and
    /// takes it over as a staged blob: dropped unless committed.
    pub(crate) fn stage_existing(&self, path: &Path) -> Result<Staged> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        let file = tempfile::TempPath::try_from_path(path).map_err(io("take over"))?;
        let (hex, size) = File::open(&file)
            .and_then(|mut f| copy_hashing(&mut f, &mut std::io::sink()))
            .map_err(io("read"))?;
        Ok(Staged { file, hex, size })
    }

    /// Where a download of the blob `digest` is kept until it is complete, so that a
    /// later pull can go on from where an interrupted one stopped.
    pub(crate) fn partial_path(&self, digest: &Digest) -> Result<PathBuf> {
        Ok(self
            .dir
            .join("tmp")
            .join(format!("{}.partial", sha256_hex(digest)?)))
    }

    /// Moves a staged blob into place once it matches `desc`. A blob already there is kept:
    /// its name is its content.
    pub(crate) fn commit(&self, staged: Staged, desc: &Descriptor) -> Result<()> {
        check(desc, &staged.hex, staged.size)?;
        let dest = self.blobs.path(desc.digest())?;
        if dest.exists() {
            return Ok(());
        }
        staged.persist(&dest)?;
        debug!(digest = %desc.digest(), size = desc.size(), "stored blob");
        Ok(())
    }

    /// Copies the blob `desc` names from `from` into the store, verified.
    pub fn put(&self, from: &Blobs, desc: &Descriptor) -> Result<()> {
        if self.blobs.path(desc.digest())?.exists() {
            return Ok(());
        }
        let path = from.path(desc.digest())?;
        let mut file = File::open(&path).map_err(|source| Error::Io {
            what: "open",
            path,
            source,
        })?;
        let staged = self.stage(&mut file)?;
        self.commit(staged, desc)
    }

    /// Stores `bytes` as a blob of `media_type` and returns its descriptor.
    pub(crate) fn put_bytes(&self, bytes: &[u8], media_type: MediaType) -> Result<Descriptor> {
        let staged = self.stage(&mut &bytes[..])?;
        let desc = staged.descriptor(media_type);
        self.commit(staged, &desc)?;
        Ok(desc)
    }

    /// Names the image whose manifest `manifest` describes, replacing any earlier image of
    /// that name. Call it only once every blob of the image is stored.
    pub fn tag(&self, name: &str, manifest: &Descriptor) -> Result<()> {
        let path = self.ref_path(name)?;
        let r = Ref {
            name: name.to_string(),
            manifest: manifest.clone(),
        };
        let json = serde_json::to_vec_pretty(&r).expect("a ref serializes");
        self.stage(&mut &json[..])?.persist(&path)
    }

    /// The image named `name`.
    pub fn get(&self, name: &str) -> Result<Ref> {
        let path = self.ref_path(name)?;
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSuchImage(name.to_string()));
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|e| Error::Io {
            what: "parse",
            path,
            source: e.into(),
        })
    }

    /// Every image in the store, by name.
    pub fn list(&self) -> Result<Vec<Ref>> {
        let dir = self.dir.join("refs");
        let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            what: "list",
            path: dir.clone(),
            source,
        })?;
        let mut refs = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().and_then(decode_name) else {
                continue;
            };
            refs.push(self.get(&name)?);
        }
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(refs)
    }

    fn ref_path(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
        Ok(self.dir.join("refs").join(encode_name(name)))
    }
}

/// Syncs a directory, so that a rename in it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            what: "sync",
            path: dir.to_path_buf(),
            source,
        })
}

/// Image names look like `registry/repo:tag`: 1 to 128 printable ASCII characters.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

/// A name as a file name: bytes beyond `[A-Za-z0-9._-]` become `%XX`, so `/` and `:` are
/// safe and the name can be read back.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // "." and ".." are not file names of their own.
    if out.starts_with('.') {
        out.replace_range(..1, "%2E");
    }
    out
}

fn decode_name(file: &str) -> Option<String> {
    let mut out = Vec::with_capacity(file.len());
    let mut bytes = file.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok().filter(|n| valid_name(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            "busybox",
            "docker.io/library/alpine:3.19",
            "..",
            "a%b@sha256:00",
        ] {
            let file = encode_name(name);
            assert!(!file.contains('/') && file != "." && file != "..", "{file}");
            assert_eq!(decode_name(&file).as_deref(), Some(name));
        }
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
    }

    #[test]
    fn blobs_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let desc = store.put_bytes(b"hello", MediaType::ImageConfig).unwrap();
        assert_eq!(
            store.blobs().open(&desc).unwrap().metadata().unwrap().len(),
            5
        );
        std::fs::write(store.blobs().path(desc.digest()).unwrap(), b"hellO").unwrap();
        let msg = store.blobs().open(&desc).unwrap_err().to_string();
        assert!(msg.contains(&desc.digest().to_string()), "{msg}");
        // Only sha256 digests name files: nothing else reaches a path.
        let other: Digest = format!("sha512:{}", "ab".repeat(64)).parse().unwrap();
        assert!(store.blobs().path(&other).is_err());
    }
}
