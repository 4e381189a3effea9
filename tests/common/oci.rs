//! OCI image layouts for tests, built from files the test makes (nothing is downloaded).

use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// `data`, gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// The sha256 of `data`, in hex.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes `data` as a blob of the layout at `dir` and returns its descriptor.
pub fn blob(dir: &Path, media_type: &str, data: &[u8]) -> Value {
    let hex = sha256(data);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// Writes an OCI image layout of `layers` (tar, media type) at `dir`: the layers are
/// compressed as their media types say, and `config` is the image's `config` object.
/// Returns the manifest's descriptor.
pub fn layout(dir: &Path, layers: &[(Vec<u8>, &str)], config: Value, name: &str) -> Value {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, media_type) in layers {
        diff_ids.push(format!("sha256:{}", sha256(tar)));
        let data = match *media_type {
            GZIP => gzip(tar),
            ZSTD => zstd::encode_all(&tar[..], 3).unwrap(),
            _ => tar.clone(),
        };
        descs.push(blob(dir, media_type, &data));
    }
    let config = json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descs,
    });
    let mut desc = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": name});
    add_to_index(dir, &desc);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    desc
}

/// Adds `desc` to the layout's index.json, made when missing.
pub fn add_to_index(dir: &Path, desc: &Value) {
    let path = dir.join("index.json");
    let mut index: Value = std::fs::read(&path)
        .map(|t| serde_json::from_slice(&t).unwrap())
        .unwrap_or_else(|_| json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(desc.clone());
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A layout of one gzip layer holding the demo bundle's root filesystem.
pub fn demo_image(dir: &Path, config: Value) {
    let rootfs = super::bundle().join("rootfs");
    let mut b = tar::Builder::new(Vec::new());
    // The busybox applets are symlinks: they go in as symlinks.
    b.follow_symlinks(false);
    b.append_dir_all(".", &rootfs).unwrap();
    layout(dir, &[(b.into_inner().unwrap(), GZIP)], config, "demo");
}
