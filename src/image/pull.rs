//! Pulling images from a registry with `oci-client`, which speaks the distribution API
//! and its token and basic authentication. Blobs go into the same store as imports, each
//! verified by silo against its descriptor whatever the client checked.
//!
//! A blob is downloaded to `tmp/<hex>.partial` in the store and moved into place only once
//! complete and verified. An interrupted pull leaves that partial file, and the next pull
//! asks for the rest with a range request (or starts over when the registry sends the
//! whole blob); each blob is also retried a few times within one pull.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::layout::{self, DOCKER_LIST, DOCKER_MANIFEST};
use super::store::{self, Ref, Store};

/// Errors from pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {source}")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("{reference}: failed to fetch {what}: {source}")]
    Registry {
        reference: String,
        what: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: failed to download blob {digest}: {source}")]
    Download {
        reference: String,
        digest: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{reference}: manifest {digest}: {source}")]
    Manifest {
        reference: String,
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Layout(#[from] layout::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How to reach the registry, and whom to tell how far a pull has got.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP to this image's registry instead of HTTPS.
    pub insecure: bool,
    /// Basic credentials (user, password); anonymous (with the registry's tokens) without.
    pub credentials: Option<(String, String)>,
    /// Called as each blob's bytes arrive (and once for a blob the store already has).
    pub progress: Option<ProgressFn>,
}

/// What [`PullOptions::progress`] calls.
pub type ProgressFn = std::sync::Arc<dyn Fn(Progress<'_>) + Send + Sync>;

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("insecure", &self.insecure)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(user, _)| user),
            )
            .finish_non_exhaustive()
    }
}

/// How far the download of one blob has got.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub digest: &'a str,
    pub done: u64,
    pub total: u64,
}

const ACCEPTED: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    DOCKER_MANIFEST,
    DOCKER_LIST,
];

/// How often one blob is tried within a pull before the pull fails.
const TRIES: u32 = 3;

/// Pulls `reference` (`registry/repo:tag` or `...@sha256:...`) into the store, for this
/// machine's platform, and names it `reference` as written.
pub async fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<Ref> {
    let parsed: Reference = reference.parse().map_err(|source| Error::Reference {
        reference: reference.to_string(),
        source,
    })?;
    let protocol = if opts.insecure {
        ClientProtocol::HttpsExcept(vec![parsed.resolve_registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..ClientConfig::default()
    });
    let auth = match &opts.credentials {
        Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let origin = PathBuf::from(reference);
    let registry_err = |what: &str| {
        let what = what.to_string();
        move |source| Error::Registry {
            reference: reference.to_string(),
            what,
            source,
        }
    };

    let (bytes, _) = client
        .pull_manifest_raw(&parsed, &auth, &ACCEPTED)
        .await
        .map_err(registry_err("the manifest"))?;
    // Only what silo hashes itself is trusted: a digest in the reference must match.
    let mut top = store.put_bytes(&bytes, MediaType::ImageManifest)?;
    if let Some(digest) = parsed.digest()
        && digest != top.digest().as_ref()
    {
        return Err(store::Error::DigestMismatch {
            digest: digest.to_string(),
            actual: top.digest().to_string(),
        }
        .into());
    }
    let kind: MediaTypeOnly = serde_json::from_slice(&bytes).map_err(|source| Error::Manifest {
        reference: reference.to_string(),
        digest: top.digest().to_string(),
        source,
    })?;
    let manifest_desc = if kind.is_index() {
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|source| Error::Manifest {
                reference: reference.to_string(),
                digest: top.digest().to_string(),
                source,
            })?;
        let desc = layout::choose(index.manifests(), None, &origin)?.clone();
        layout::check_manifest(&desc, &origin)?;
        let by_digest = parsed.clone_with_digest(desc.digest().to_string());
        let (bytes, _) = client
            .pull_manifest_raw(&by_digest, &auth, &ACCEPTED)
            .await
            .map_err(registry_err("the platform's manifest"))?;
        let staged = store.stage(&mut &bytes[..])?;
        store.commit(staged, &desc)?;
        desc
    } else {
        let media_type = kind.media_type.as_deref().map(MediaType::from);
        top.set_media_type(media_type.unwrap_or(MediaType::ImageManifest));
        top
    };
    let manifest: ImageManifest = store.blobs().json(&manifest_desc, "image manifest")?;

    for desc in std::iter::once(manifest.config()).chain(manifest.layers()) {
        fetch_blob(store, &client, &parsed, reference, desc, opts).await?;
    }
    store.tag(reference, &manifest_desc)?;
    info!(image = reference, manifest = %manifest_desc.digest(), "pulled image");
    Ok(Ref {
        name: reference.to_string(),
        manifest: manifest_desc,
    })
}

/// The media type of a manifest or index, to tell them apart before parsing either.
#[derive(serde::Deserialize)]
struct MediaTypeOnly {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
}

impl MediaTypeOnly {
    fn is_index(&self) -> bool {
        match &self.media_type {
            Some(mt) => layout::is_index(&MediaType::from(mt.as_str())),
            None => self.manifests.is_some(),
        }
    }
}

/// Downloads one blob into the store unless it is there, going on from a partial
/// download, trying a few times.
async fn fetch_blob(
    store: &Store,
    client: &Client,
    image: &Reference,
    reference: &str,
    desc: &Descriptor,
    opts: &PullOptions,
) -> Result<()> {
    let digest = desc.digest().to_string();
    let report = |done: u64| {
        if let Some(progress) = &opts.progress {
            progress(Progress {
                digest: &digest,
                done,
                total: desc.size(),
            });
        }
    };
    if store.blobs().path(desc.digest())?.exists() {
        debug!(digest = %desc.digest(), "blob already in the store");
        report(desc.size());
        return Ok(());
    }
    let partial = store.partial_path(desc.digest())?;
    let mut tries = 0;
    loop {
        tries += 1;
        match download(client, image, desc, &partial, &report).await {
            Ok(()) => break,
            Err(e) if tries < TRIES => {
                let digest = desc.digest().to_string();
                warn!(digest, error = %e, tries, "blob download failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await;
            }
            Err(source) => {
                return Err(Error::Download {
                    reference: reference.to_string(),
                    digest: desc.digest().to_string(),
                    source,
                });
            }
        }
    }
    // A mismatch drops the partial file with the staged blob: the next pull starts over.
    let staged = store.stage_existing(&partial)?;
    store.commit(staged, desc)?;
    Ok(())
}

/// Appends the rest of a blob to `partial` (all of it when the file is new, or when the
/// registry ignores the range asked for).
async fn download(
    client: &Client,
    image: &Reference,
    desc: &Descriptor,
    partial: &Path,
    report: &impl Fn(u64),
) -> std::io::Result<()> {
    let have = tokio::fs::metadata(partial).await.map_or(0, |m| m.len());
    if have >= desc.size() {
        return Ok(());
    }
    let layer = oci_client::manifest::OciDescriptor {
        media_type: desc.media_type().to_string(),
        digest: desc.digest().to_string(),
        size: desc.size() as i64,
        ..Default::default()
    };
    let to_io = std::io::Error::other;
    let (mut stream, append) = if have > 0 {
        match client
            .pull_blob_stream_partial(image, &layer, have, None)
            .await
            .map_err(to_io)?
        {
            BlobResponse::Partial(s) => (s, true),
            BlobResponse::Full(s) => (s, false),
        }
    } else {
        let s = client
            .pull_blob_stream(image, &layer)
            .await
            .map_err(to_io)?;
        (s, false)
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .await?;
    let mut size = if append { have } else { 0 };
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        // A registry that sends more than the descriptor says cannot fill the disk.
        if size > desc.size() {
            drop(file);
            let _ = tokio::fs::remove_file(partial).await;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the registry sent more than the {} bytes expected",
                    desc.size()
                ),
            ));
        }
        file.write_all(&chunk).await?;
        report(size);
    }
    file.flush().await
}
