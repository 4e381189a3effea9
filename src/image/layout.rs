//! Where images come from: OCI image layout directories, and the tar archives of
//! `docker save` and `podman save` (Docker's `manifest.json` format, or an OCI layout in a
//! tar). Importing copies an image's blobs into the store, verified; an archive is read in
//! one pass, each file staged in the store and hashed on the way, so nothing is unpacked
//! to a temporary directory first.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageManifest, ImageManifestBuilder, MediaType,
};
use tracing::debug;

use super::store::{self, Blobs, Staged, Store};

/// Errors from reading an image layout or archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("{0} is not an image: no oci-layout, index.json or manifest.json in it")]
    NotAnImage(PathBuf),
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} holds no image manifest for linux/{arch}", arch = host_arch())]
    NoManifest(PathBuf),
    #[error("{path} holds several images ({names}): choose one by name")]
    Ambiguous { path: PathBuf, names: String },
    #[error("{path}: {what} {digest} has media type {media_type}, not one silo reads")]
    MediaType {
        path: PathBuf,
        what: &'static str,
        digest: String,
        media_type: String,
    },
    #[error("{archive}: entry {entry:?} is missing")]
    MissingEntry { archive: PathBuf, entry: String },
    #[error("{archive}: layer {entry:?} hashes to {actual}, the image config lists {expected}")]
    LayerMismatch {
        archive: PathBuf,
        entry: String,
        expected: String,
        actual: String,
    },
    #[error("{archive}: the image config lists {diff_ids} layers, manifest.json {layers}")]
    LayerCount {
        archive: PathBuf,
        diff_ids: usize,
        layers: usize,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An image found in a source: its manifest, and the name the source gives it, if any.
#[derive(Debug, Clone)]
pub struct Found {
    pub manifest: Descriptor,
    pub name: Option<String>,
}

/// The annotation containerd and Docker put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The architecture of this machine, as OCI platforms spell it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Refuses a descriptor that does not name an image manifest.
pub(crate) fn check_manifest(desc: &Descriptor, origin: &Path) -> Result<()> {
    if is_manifest(desc.media_type()) {
        return Ok(());
    }
    Err(Error::MediaType {
        path: origin.to_path_buf(),
        what: "manifest",
        digest: desc.digest().to_string(),
        media_type: desc.media_type().to_string(),
    })
}

pub(crate) fn is_index(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageIndex) || mt.to_string() == DOCKER_LIST
}

fn is_manifest(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageManifest) || mt.to_string() == DOCKER_MANIFEST
}

/// Something JSON blobs are read from, verified against their descriptors.
trait Source {
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<T>;
    /// The layout or archive, for error messages.
    fn origin(&self) -> &Path;
}

struct Dir<'a> {
    blobs: &'a Blobs,
    path: &'a Path,
}

impl Source for Dir<'_> {
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<T> {
        Ok(self.blobs.json(desc, what)?)
    }

    fn origin(&self) -> &Path {
        self.path
    }
}

/// The names a descriptor of an index gives its image.
fn names(desc: &Descriptor) -> Vec<&str> {
    let Some(a) = desc.annotations() else {
        return Vec::new();
    };
    [CONTAINERD_NAME, oci_spec::image::ANNOTATION_REF_NAME]
        .iter()
        .filter_map(|k| a.get(*k).map(String::as_str))
        .collect()
}

/// The one descriptor of `list` that `name` selects (when any descriptor carries it) and
/// that is for this machine's platform (when it says). `origin` names the list's source.
pub(crate) fn choose<'a>(
    list: &'a [Descriptor],
    name: Option<&str>,
    origin: &Path,
) -> Result<&'a Descriptor> {
    let mut candidates: Vec<&Descriptor> = list.iter().collect();
    if let Some(name) = name {
        let named: Vec<&Descriptor> = candidates
            .iter()
            .copied()
            .filter(|d| names(d).contains(&name))
            .collect();
        // A name no descriptor carries is the new name of the only image.
        if !named.is_empty() {
            candidates = named;
        }
    }
    candidates.retain(|d| {
        d.platform().as_ref().is_none_or(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == host_arch()
        })
    });
    match candidates.as_slice() {
        [] => Err(Error::NoManifest(origin.to_path_buf())),
        [one] => Ok(one),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|d| {
                    names(d)
                        .first()
                        .map_or_else(|| d.digest().to_string(), |n| n.to_string())
                })
                .collect();
            Err(Error::Ambiguous {
                path: origin.to_path_buf(),
                names: names.join(", "),
            })
        }
    }
}

/// Picks the one image manifest `index` leads to (see [`choose`]), following nested
/// indexes (multi-platform images).
fn pick(source: &impl Source, index: &ImageIndex, name: Option<&str>) -> Result<Found> {
    let desc = choose(index.manifests(), name, source.origin())?;
    let found_name = names(desc).first().map(|n| n.to_string());
    if is_index(desc.media_type()) {
        let nested: ImageIndex = source.json(desc, "image index")?;
        // The platform decides inside an image; the outer name stays.
        let inner = pick(source, &nested, None)?;
        return Ok(Found {
            manifest: inner.manifest,
            name: found_name.or(inner.name),
        });
    }
    check_manifest(desc, source.origin())?;
    Ok(Found {
        manifest: desc.clone(),
        name: found_name,
    })
}

/// Reads a small JSON file of a layout (index.json), not a blob.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_reader(BufReader::new(file.take(16 << 20))).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Finds the image in the OCI layout directory `dir` (the one named `name`, when it holds
/// several), without copying anything.
pub fn find_in_dir(dir: &Path, name: Option<&str>) -> Result<(Blobs, Found)> {
    if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
        return Err(Error::NotAnImage(dir.to_path_buf()));
    }
    let index: ImageIndex = read_json(&dir.join("index.json"))?;
    let blobs = Blobs::new(dir);
    let found = pick(
        &Dir {
            blobs: &blobs,
            path: dir,
        },
        &index,
        name,
    )?;
    Ok((blobs, found))
}

/// Copies the image of the layout directory `dir` into the store (untagged).
pub fn import_dir(store: &Store, dir: &Path, name: Option<&str>) -> Result<Found> {
    let (blobs, found) = find_in_dir(dir, name)?;
    let manifest: ImageManifest = blobs.json(&found.manifest, "image manifest")?;
    for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
        store.put(&blobs, desc)?;
    }
    // The manifest last: a manifest in the store means its blobs are there.
    store.put(&blobs, &found.manifest)?;
    Ok(found)
}

/// The regular files and symlinks of an archive, staged in the store by their path.
struct Staging<'a> {
    store: &'a Store,
    archive: &'a Path,
    files: HashMap<String, Staged>,
    links: HashMap<String, String>,
}

impl Staging<'_> {
    /// The path a file of the archive is staged under, following the archive's own
    /// symlinks (`docker save` links layers that two images share).
    fn resolve(&self, path: &str) -> Option<String> {
        let mut path = clean(path.as_bytes())?;
        for _ in 0..8 {
            if self.files.contains_key(&path) {
                return Some(path);
            }
            path = self.links.get(&path)?.clone();
        }
        None
    }

    fn get(&self, path: &str) -> Result<&Staged> {
        self.resolve(path)
            .and_then(|p| self.files.get(&p))
            .ok_or_else(|| self.missing(path))
    }

    fn missing(&self, entry: &str) -> Error {
        Error::MissingEntry {
            archive: self.archive.to_path_buf(),
            entry: entry.to_string(),
        }
    }

    /// Moves the staged file at `path` into the store as the blob `desc` names.
    fn commit(&mut self, path: &str, desc: &Descriptor) -> Result<()> {
        match self.resolve(path).and_then(|p| self.files.remove(&p)) {
            Some(staged) => Ok(self.store.commit(staged, desc)?),
            // Committed already, under another descriptor naming the same content.
            None if self.store.blobs().path(desc.digest())?.exists() => Ok(()),
            None => Err(self.missing(path)),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let staged = self.get(path)?;
        read_json(staged.path()).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json {
                path: self.archive.join(path),
                source,
            },
            e => e,
        })
    }
}

/// The blobs of an OCI layout inside an archive.
struct ArchiveBlobs<'a, 'b> {
    staging: &'a Staging<'b>,
}

fn blob_path(desc: &Descriptor) -> Result<String> {
    Ok(format!(
        "blobs/sha256/{}",
        store::sha256_hex(desc.digest())?
    ))
}

impl Source for ArchiveBlobs<'_, '_> {
    fn json<T: serde::de::DeserializeOwned>(
        &self,
        desc: &Descriptor,
        _what: &'static str,
    ) -> Result<T> {
        let path = blob_path(desc)?;
        let staged = self.staging.get(&path)?;
        store::check(desc, &staged.hex, staged.size)?;
        self.staging.json(&path)
    }

    fn origin(&self) -> &Path {
        self.staging.archive
    }
}

/// An archive path as a plain relative path (`./a/b` is `a/b`); `None` for one that
/// climbs out with `..` or is absolute, which no image file can be.
fn clean(name: &[u8]) -> Option<String> {
    let mut parts: Vec<&OsStr> = Vec::new();
    for part in Path::new(OsStr::from_bytes(name)).components() {
        match part {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => return None,
        }
    }
    let path: PathBuf = parts.iter().collect();
    path.to_str().map(str::to_string)
}

/// One image of a `docker save` manifest.json.
#[derive(serde::Deserialize)]
struct DockerImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Copies the image of a `docker save` or `podman save` archive (tar, or tar compressed
/// with gzip or zstd) into the store (untagged).
pub fn import_archive(store: &Store, archive: &Path, name: Option<&str>) -> Result<Found> {
    let read_err = |source| Error::Read {
        path: archive.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(archive).map_err(read_err)?;
    let stream = super::decompress(file).map_err(read_err)?;

    let mut staging = Staging {
        store,
        archive,
        files: HashMap::new(),
        links: HashMap::new(),
    };
    let mut tar = tar::Archive::new(stream);
    for entry in tar.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let Some(path) = clean(&entry.path_bytes()) else {
            debug!(archive = %archive.display(), "skipped an entry outside the archive");
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let staged = store.stage(&mut entry)?;
                staging.files.insert(path, staged);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let Some(target) = entry.link_name_bytes() else {
                    continue;
                };
                // A symlink is relative to its directory, a hard link to the archive root.
                let joined = if entry.header().entry_type() == tar::EntryType::Symlink {
                    let dir = Path::new(&path).parent().unwrap_or(Path::new(""));
                    dir.join(OsStr::from_bytes(&target))
                } else {
                    PathBuf::from(OsStr::from_bytes(&target))
                };
                if let Some(target) = clean(joined.as_os_str().as_bytes()) {
                    staging.links.insert(path, target);
                }
            }
            _ => {}
        }
    }

    if staging.resolve("index.json").is_some() && staging.resolve("oci-layout").is_some() {
        let index: ImageIndex = staging.json("index.json")?;
        let found = pick(&ArchiveBlobs { staging: &staging }, &index, name)?;
        let manifest: ImageManifest =
            ArchiveBlobs { staging: &staging }.json(&found.manifest, "image manifest")?;
        for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
            staging.commit(&blob_path(desc)?, desc)?;
        }
        staging.commit(&blob_path(&found.manifest)?, &found.manifest)?;
        return Ok(found);
    }
    if staging.resolve("manifest.json").is_none() {
        return Err(Error::NotAnImage(archive.to_path_buf()));
    }
    import_docker(&mut staging, name)
}

/// Imports the image of a Docker-format archive: its layers are the uncompressed tars
/// the config's `rootfs.diff_ids` name, so each is verified against those, and an OCI
/// manifest is written for them.
fn import_docker(staging: &mut Staging<'_>, name: Option<&str>) -> Result<Found> {
    let images: Vec<DockerImage> = staging.json("manifest.json")?;
    let tagged =
        |i: &&DockerImage| name.is_some_and(|n| i.repo_tags.iter().flatten().any(|t| t == n));
    let image = match (images.iter().find(tagged), images.as_slice()) {
        (Some(image), _) | (None, [image]) => image,
        (None, []) => return Err(Error::NoManifest(staging.archive.to_path_buf())),
        (None, many) => {
            let names: Vec<String> = many
                .iter()
                .map(|i| {
                    i.repo_tags
                        .iter()
                        .flatten()
                        .next()
                        .unwrap_or(&i.config)
                        .clone()
                })
                .collect();
            return Err(Error::Ambiguous {
                path: staging.archive.to_path_buf(),
                names: names.join(", "),
            });
        }
    };

    let config = staging.get(&image.config)?;
    let config_desc = config.descriptor(MediaType::ImageConfig);
    // The config's file name is its digest (`<hex>.json`, or `blobs/sha256/<hex>`).
    let stem = Path::new(&image.config)
        .file_name()
        .and_then(|f| f.to_str())
        .map(|f| f.trim_end_matches(".json"))
        .unwrap_or("");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && stem != config.hex {
        return Err(store::Error::DigestMismatch {
            digest: format!("sha256:{stem}"),
            actual: format!("sha256:{}", config.hex),
        }
        .into());
    }
    let parsed: ImageConfiguration = staging.json(&image.config)?;
    let diff_ids = parsed.rootfs().diff_ids();
    if diff_ids.len() != image.layers.len() {
        return Err(Error::LayerCount {
            archive: staging.archive.to_path_buf(),
            diff_ids: diff_ids.len(),
            layers: image.layers.len(),
        });
    }
    let mut layers = Vec::new();
    for (path, diff_id) in image.layers.iter().zip(diff_ids) {
        let staged = staging.get(path)?;
        let desc = staged.descriptor(MediaType::ImageLayer);
        if desc.digest().to_string() != *diff_id {
            return Err(Error::LayerMismatch {
                archive: staging.archive.to_path_buf(),
                entry: path.clone(),
                expected: diff_id.clone(),
                actual: desc.digest().to_string(),
            });
        }
        layers.push((path.clone(), desc));
    }
    staging.commit(&image.config.clone(), &config_desc)?;
    for (path, desc) in &layers {
        staging.commit(path, desc)?;
    }
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(layers.into_iter().map(|(_, d)| d).collect::<Vec<_>>())
        .build()
        .expect("a manifest with config and layers builds");
    let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let desc = staging.store.put_bytes(&json, MediaType::ImageManifest)?;
    Ok(Found {
        manifest: desc,
        name: image.repo_tags.iter().flatten().next().cloned(),
    })
}
