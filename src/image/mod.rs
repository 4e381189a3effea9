//! OCI images: importing them into silo's store and unpacking them into bundles.
//!
//! An image reaches silo as an OCI image layout directory or a `docker save` / `podman
//! save` archive ([`layout`]), or from a registry ([`pull`]); its blobs go into a
//! content-addressed [`store`] shared by all images, each verified against its digest.
//! [`unpack`](fn@unpack) builds a bundle from one: the layers applied in order into
//! `rootfs/` ([`unpack`](mod@unpack) keeps every entry inside it), and a `config.json`
//! made from the image configuration ([`config`]).

pub mod config;
pub mod layout;
pub mod pull;
pub mod store;
pub mod unpack;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageManifest, MediaType};
use oci_spec::runtime::Spec;
use tracing::{debug, info};

pub use store::{Blobs, Ref, Store};

/// The store's directory in a state directory. Containers' state directories sit beside
/// it, so no container may take this as its id.
pub const STORE_DIR: &str = "images";

/// Where in the store the bundle that `owner` (`run`, `serve`) unpacked for container `id`
/// lives. Each owner has its own directory, so that `silo run` and a daemon sharing a state
/// directory never touch each other's bundles.
pub fn bundle_dir(store: &Store, owner: &str, id: &str) -> PathBuf {
    store.dir().join("bundles").join(owner).join(id)
}

/// Errors from importing or unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Layout(#[from] layout::Error),
    #[error(transparent)]
    Unpack(#[from] unpack::Error),
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Pull(#[from] pull::Error),
    #[error("layer {digest} has media type {media_type}, which silo cannot unpack")]
    LayerType { digest: String, media_type: String },
    #[error("{0} names no image: give it a name")]
    NoName(PathBuf),
    #[error("bundle directory {0} exists and is not empty")]
    NotEmpty(PathBuf),
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Imports the image at `path` (an OCI layout directory, or a `docker save` / `podman save`
/// archive) into the store, named `name` or else the name the source gives it.
pub fn import(store: &Store, path: &Path, name: Option<&str>) -> Result<Ref> {
    let found = if path.is_dir() {
        layout::import_dir(store, path, name)?
    } else {
        layout::import_archive(store, path, name)?
    };
    let name = name
        .map(str::to_string)
        .or(found.name)
        .ok_or_else(|| Error::NoName(path.to_path_buf()))?;
    store.tag(&name, &found.manifest)?;
    info!(image = %name, manifest = %found.manifest.digest(), "imported image");
    Ok(Ref {
        name,
        manifest: found.manifest,
    })
}

/// Where an image to unpack is found: `image` is a path to a layout directory or an
/// archive (the latter is imported into the store first, untagged), or else an image
/// name in the store.
pub fn locate(store: &Store, image: &str) -> Result<(Blobs, Descriptor)> {
    let path = Path::new(image);
    if path.is_dir() {
        let (blobs, found) = layout::find_in_dir(path, None)?;
        return Ok((blobs, found.manifest));
    }
    if path.is_file() {
        let found = layout::import_archive(store, path, None)?;
        return Ok((store.blobs().clone(), found.manifest));
    }
    let r = store.get(image)?;
    Ok((store.blobs().clone(), r.manifest))
}

/// A reader of `reader`'s content, decompressed when it is gzip or zstd (told apart by
/// their magic numbers, which media types and file names do not always tell truly).
pub(crate) fn decompress<'a>(reader: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::new(reader);
    let magic = reader.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(reader)?)
    } else {
        Box::new(reader)
    })
}

/// Whether silo knows how to unpack a layer of this media type (the bytes themselves tell
/// plain tar, gzip and zstd apart).
fn unpackable(mt: &MediaType) -> bool {
    use MediaType as M;
    match mt {
        M::ImageLayer
        | M::ImageLayerGzip
        | M::ImageLayerZstd
        | M::ImageLayerNonDistributable
        | M::ImageLayerNonDistributableGzip
        | M::ImageLayerNonDistributableZstd => true,
        M::Other(s) => matches!(
            s.as_str(),
            "application/vnd.docker.image.rootfs.diff.tar"
                | "application/vnd.docker.image.rootfs.diff.tar.gzip"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ),
        _ => false,
    }
}

/// Unpacks the image whose manifest `manifest` describes into the bundle directory `dir`
/// (missing or empty): `dir/rootfs` and `dir/config.json`, whose spec it returns. On
/// failure what it made is removed again.
pub fn unpack(blobs: &Blobs, manifest: &Descriptor, dir: &Path) -> Result<Spec> {
    let made_dir = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(Error::NotEmpty(dir.to_path_buf()));
            }
            false
        }
        Err(source) => {
            return Err(Error::Io {
                what: "create",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let result = unpack_into(blobs, manifest, dir);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dir.join("rootfs"));
        let _ = std::fs::remove_file(dir.join("config.json"));
        if made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

fn unpack_into(blobs: &Blobs, manifest: &Descriptor, dir: &Path) -> Result<Spec> {
    let m: ImageManifest = blobs.json(manifest, "image manifest")?;
    let image: ImageConfiguration = blobs.json(m.config(), "image config")?;
    for layer in m.layers() {
        if !unpackable(layer.media_type()) {
            return Err(Error::LayerType {
                digest: layer.digest().to_string(),
                media_type: layer.media_type().to_string(),
            });
        }
    }
    let rootfs = dir.join("rootfs");
    std::fs::create_dir(&rootfs).map_err(|source| Error::Io {
        what: "create",
        path: rootfs.clone(),
        source,
    })?;
    // The root of the container's tree, not the umask's idea of it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755)).map_err(
        |source| Error::Io {
            what: "set the mode of",
            path: rootfs.clone(),
            source,
        },
    )?;
    let tree = unpack::Rootfs::open(&rootfs)?;
    for layer in m.layers() {
        let file = blobs.open(layer)?;
        tree.apply(layer.digest().as_ref(), file)?;
        debug!(layer = %layer.digest(), "applied layer");
    }
    let spec = config::spec(&image, &rootfs)?;
    let path = dir.join("config.json");
    let json = serde_json::to_vec_pretty(&spec).expect("a runtime spec serializes");
    std::fs::write(&path, json).map_err(|source| Error::Io {
        what: "write",
        path,
        source,
    })?;
    info!(manifest = %manifest.digest(), bundle = %dir.display(), "unpacked image");
    Ok(spec)
}
