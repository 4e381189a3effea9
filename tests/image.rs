//! Images: layers unpacked exactly (whiteouts, opaque directories, links), hostile layers
//! refused without a byte written outside the target, blobs checked against their digests,
//! Docker archives imported, and an image of the demo rootfs run with `silo run`.
//!
//! Every image is built here from files the test makes; nothing is downloaded.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::oci::{GZIP, TAR, ZSTD, demo_image, gzip, layout, sha256};
use serde_json::{Value, json};
use silo::image::{self, Blobs, Store};

/// One entry of a test layer. Names and link targets go into the header as raw bytes, so
/// that hostile ones (which the tar crate's builder refuses to write) can be made too.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a str, u32),
    Owned(&'a str, &'a str, u32, u64, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Fifo(&'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, kind, data, mode, link, uid, gid) = match *e {
            E::Dir(n, m) => (n, tar::EntryType::Directory, "", m, "", 0, 0),
            E::File(n, d, m) => (n, tar::EntryType::Regular, d, m, "", 0, 0),
            E::Owned(n, d, m, u, g) => (n, tar::EntryType::Regular, d, m, "", u, g),
            E::Symlink(n, t) => (n, tar::EntryType::Symlink, "", 0o777, t, 0, 0),
            E::Hardlink(n, t) => (n, tar::EntryType::Link, "", 0o644, t, 0, 0),
            E::Fifo(n) => (n, tar::EntryType::Fifo, "", 0o644, "", 0, 0),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn descriptor(v: &Value) -> oci_spec::image::Descriptor {
    serde_json::from_value(v.clone()).unwrap()
}

/// What a tree holds: for every path, its kind and mode, owner, and content or target.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let owner = format!("{}:{}", meta.uid(), meta.gid());
            let what = if meta.is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o} {owner}")
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                format!("file {mode:o} {owner} {text}")
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn ino(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[test]
fn layers_unpack_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let base = tar_of(&[
        E::Dir("./", 0o755),
        E::Dir("etc/", 0o755),
        E::File(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
            0o644,
        ),
        E::File(
            "etc/group",
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
            0o644,
        ),
        E::File("etc/gone", "deleted later", 0o644),
        E::Dir("data/", 0o750),
        E::File("data/old", "hidden later", 0o644),
        E::Dir("data/sub/", 0o755),
        E::File("data/sub/older", "hidden later", 0o644),
        E::Owned("bin/tool", "tool", 0o4755, 1000, 1000),
        E::Symlink("bin/link", "tool"),
        E::Symlink("abs", "/etc/passwd"),
        E::Fifo("dev-like"),
        E::File("swap/inner", "a directory, then a file", 0o644),
        E::File("tofile", "a file, then a directory", 0o644),
    ]);
    let top = tar_of(&[
        E::File("etc/.wh.gone", "", 0o644),
        E::Dir("data/", 0o700),
        E::File("data/.wh..wh..opq", "", 0o644),
        E::File("data/new", "new", 0o600),
        E::Hardlink("bin/hard", "bin/tool"),
        E::File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
        E::File("swap", "file", 0o644),
        E::Dir("tofile/", 0o711),
    ]);
    let last = tar_of(&[
        E::File("x/one", "one", 0o644),
        E::Hardlink("x/two", "x/one"),
        // A whiteout spares what its own layer adds.
        E::File("x/.wh.one", "", 0o644),
        E::Symlink("bin/link", "hard"),
    ]);
    let config = json!({
        "Entrypoint": ["/bin/tool"], "Cmd": ["--serve"], "Env": ["PATH=/bin", "A=1"],
        "WorkingDir": "/data", "User": "1000",
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9090": {}},
    });
    let manifest = layout(
        &oci,
        &[(base, TAR), (top, GZIP), (last, ZSTD)],
        config,
        "test",
    );
    let bundle = tmp.path().join("bundle");
    image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle).unwrap();

    let rootfs = bundle.join("rootfs");
    let want: BTreeMap<String, String> = [
        ("abs", "link -> /etc/passwd"),
        ("bin", "dir 755 0:0"),
        ("bin/hard", "file 4755 1000:1000 tool"),
        ("bin/link", "link -> hard"),
        ("bin/tool", "file 4755 1000:1000 tool"),
        ("data", "dir 700 0:0"),
        ("data/new", "file 600 0:0 new"),
        ("etc", "dir 755 0:0"),
        (
            "etc/group",
            "file 644 0:0 root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        ),
        ("etc/passwd", "file 644 0:0 root:x:0:0:root:/root:/bin/sh\n"),
        ("swap", "file 644 0:0 file"),
        ("tofile", "dir 711 0:0"),
        ("x", "dir 755 0:0"),
        ("x/one", "file 644 0:0 one"),
        ("x/two", "file 644 0:0 one"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(listing(&rootfs), want);
    assert_eq!(ino(&rootfs.join("bin/hard")), ino(&rootfs.join("bin/tool")));
    assert_eq!(ino(&rootfs.join("x/one")), ino(&rootfs.join("x/two")));
    // Files keep their times, and so do directories with an entry in the last layer that
    // changed them (`etc` was changed by layers without one: it has the time of that).
    for path in ["x/one", "data", "tofile"] {
        let mtime = std::fs::metadata(rootfs.join(path)).unwrap().mtime();
        assert_eq!(mtime, 1_700_000_000, "{path}");
    }

    // The generated config.json passes silo's own checks, and says what the image does.
    let b = silo::bundle::Bundle::load(&bundle).unwrap();
    let process = b.spec().process().as_ref().unwrap();
    assert_eq!(
        process.args().as_ref().unwrap(),
        &["/bin/tool".to_string(), "--serve".to_string()]
    );
    assert_eq!(process.cwd(), Path::new("/data"));
    // uid 1000 is no longer in the top layer's /etc/passwd: gid 0 and HOME=/.
    assert_eq!((process.user().uid(), process.user().gid()), (1000, 0));
    let env = process.env().as_ref().unwrap();
    assert!(env.contains(&"PATH=/bin".to_string()), "{env:?}");
    assert!(env.contains(&"A=1".to_string()), "{env:?}");
    assert!(env.contains(&"HOME=/".to_string()), "{env:?}");
    let annotations = b.spec().annotations().as_ref().unwrap();
    assert_eq!(annotations["silo.ports"], "8080,9090");
    // Mounts and namespaces come from the demo bundle's template.
    assert!(b.spec().linux().as_ref().unwrap().namespaces().is_some());

    // A second unpack into the same directory is refused: it is not empty.
    let err = image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

#[test]
fn pax_owners_and_extended_attributes_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let mut b = tar::Builder::new(Vec::new());
    // A uid beyond what the tar header holds, and an attribute only root may set.
    let pax: [(&str, &[u8]); 3] = [
        ("uid", b"3000000"),
        ("gid", b"3000001"),
        ("SCHILY.xattr.trusted.silo", b"kept"),
    ];
    b.append_pax_extensions(pax).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o640);
    h.set_size(4);
    b.append_data(&mut h, "big-owner", &b"data"[..]).unwrap();
    let manifest = layout(
        &oci,
        &[(b.into_inner().unwrap(), TAR)],
        json!({"Cmd": ["/x"]}),
        "pax",
    );
    let bundle = tmp.path().join("bundle");
    image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle).unwrap();
    let file = bundle.join("rootfs/big-owner");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (3_000_000, 3_000_001, 0o640)
    );
    assert_eq!(
        xattr::get(&file, "trusted.silo").unwrap().as_deref(),
        Some(&b"kept"[..])
    );
}

#[test]
fn users_are_looked_up_in_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let layer = tar_of(&[
        E::File(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
            0o644,
        ),
        E::File(
            "etc/group",
            "root:x:0:\napp:x:1001:\nwheel:x:10:app\n",
            0o644,
        ),
    ]);
    let cases = [
        ("app", 1000, 1001, vec![10], "HOME=/home/app"),
        ("app:wheel", 1000, 10, vec![], "HOME=/home/app"),
        ("0:5", 0, 5, vec![], "HOME=/root"),
    ];
    for (i, (user, uid, gid, groups, home)) in cases.into_iter().enumerate() {
        let dir = oci.join(i.to_string());
        let config = json!({"Cmd": ["/bin/sh"], "User": user});
        let manifest = layout(&dir, &[(layer.clone(), TAR)], config, "u");
        let bundle = tmp.path().join(format!("bundle-{i}"));
        image::unpack(&Blobs::new(&dir), &descriptor(&manifest), &bundle).unwrap();
        let b = silo::bundle::Bundle::load(&bundle).unwrap();
        let p = b.spec().process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (uid, gid), "{user}");
        let extra = p.user().additional_gids().clone().unwrap_or_default();
        assert_eq!(extra, groups, "{user}");
        assert!(
            p.env().as_ref().unwrap().contains(&home.to_string()),
            "{user}"
        );
    }
    let dir = oci.join("unknown");
    let config = json!({"Cmd": ["/bin/sh"], "User": "nobody"});
    let manifest = layout(&dir, &[(layer, TAR)], config, "u");
    let bundle = tmp.path().join("bundle-unknown");
    let err = image::unpack(&Blobs::new(&dir), &descriptor(&manifest), &bundle).unwrap_err();
    assert!(err.to_string().contains("\"nobody\""), "{err}");
    assert!(!bundle.exists(), "a failed unpack leaves its bundle behind");
}

#[test]
fn hostile_layers_are_refused_and_write_nothing_outside() {
    let tmp = tempfile::tempdir().unwrap();
    // The bundle sits inside the sentinel directory, so whatever escapes its rootfs (by
    // `..`, or by a symlink to the sentinel's absolute path) would land in the sentinel.
    let sentinel = tmp.path().join("sentinel");
    std::fs::create_dir(&sentinel).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "victim").unwrap();
    let via_root = format!("evil{}/owned", sentinel.display());
    let victim_via_root = format!("evil{}", victim.display());
    let victim_up = "../../../victim";
    let cases: Vec<(Vec<E<'_>>, &str, &str)> = vec![
        (vec![E::File("../x", "x", 0o644)], "../x", "`..`"),
        (vec![E::File("/abs", "x", 0o644)], "/abs", "absolute"),
        (vec![E::File("a/../../x", "x", 0o644)], "a/../../x", "`..`"),
        (
            vec![E::Symlink("evil", "/"), E::File(&via_root, "x", 0o644)],
            &via_root,
            "outside",
        ),
        (
            vec![
                E::Symlink("evil", "../.."),
                E::File("evil/owned", "x", 0o644),
            ],
            "evil/owned",
            "outside",
        ),
        (
            vec![E::Symlink("evil", "../.."), E::Dir("evil/owned/", 0o755)],
            "evil/owned/",
            "outside",
        ),
        (vec![E::Hardlink("hl", victim_up)], "hl", "hard link"),
        (vec![E::Hardlink("hl", "/etc/passwd")], "hl", "hard link"),
        (
            vec![E::Symlink("evil", "/"), E::Hardlink("hl", &victim_via_root)],
            "hl",
            "outside",
        ),
        (
            vec![E::Symlink("evil", "../.."), E::Hardlink("evil/hl", "etc")],
            "evil/hl",
            "outside",
        ),
    ];
    for (i, (entries, entry, reason)) in cases.into_iter().enumerate() {
        let oci = tmp.path().join(format!("oci-{i}"));
        let layer = tar_of(&entries);
        let manifest = layout(&oci, &[(layer, TAR)], json!({"Cmd": ["/x"]}), "evil");
        let bundle = sentinel.join("bundle");
        let err = image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle)
            .expect_err(entry)
            .to_string();
        assert!(err.contains(&format!("{entry:?}")), "case {i}: {err}");
        assert!(err.contains(reason), "case {i}: {err}");
        let left: Vec<_> = std::fs::read_dir(&sentinel).unwrap().collect();
        assert!(
            left.is_empty(),
            "case {i} ({entry}) left {left:?} in the sentinel"
        );
        let meta = std::fs::metadata(&victim).unwrap();
        assert_eq!(meta.nlink(), 1, "case {i} linked the victim");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    }
    assert!(!Path::new("/etc/owned").exists());

    // A file over a symlink replaces the symlink; it is never written through it.
    let oci = tmp.path().join("oci-through");
    let target = victim.display().to_string();
    let layers = [
        (tar_of(&[E::Symlink("through", &target)]), TAR),
        (tar_of(&[E::File("through", "mine", 0o644)]), TAR),
    ];
    let manifest = layout(&oci, &layers, json!({"Cmd": ["/x"]}), "through");
    let bundle = tmp.path().join("through");
    image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle).unwrap();
    let meta = std::fs::symlink_metadata(bundle.join("rootfs/through")).unwrap();
    assert!(meta.is_file());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
}

#[test]
fn blobs_that_do_not_match_their_digest_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let oci = tmp.path().join("oci");
    let layer = tar_of(&[E::File("f", "content", 0o644)]);
    let manifest = layout(&oci, &[(layer, TAR)], json!({"Cmd": ["/f"]}), "bad");
    let m: Value = serde_json::from_slice(
        &std::fs::read(
            oci.join("blobs/sha256")
                .join(&manifest["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let digest = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let path = oci.join("blobs/sha256").join(&digest[7..]);
    // Same size, one byte changed: only the digest can tell.
    let mut data = std::fs::read(&path).unwrap();
    let at = data.windows(7).position(|w| w == b"content").unwrap();
    data[at] = b'C';
    std::fs::write(&path, &data).unwrap();

    let bundle = tmp.path().join("bundle");
    let err = image::unpack(&Blobs::new(&oci), &descriptor(&manifest), &bundle).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&digest) && msg.contains("does not match"),
        "{msg}"
    );
    assert!(!bundle.exists());

    // Importing it fails the same way, and leaves neither the blob nor a name behind.
    let store = Store::open(tmp.path().join("store")).unwrap();
    let err = image::import(&store, &oci, Some("bad"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&digest), "{err}");
    assert!(!store.dir().join("blobs/sha256").join(&digest[7..]).exists());
    assert!(store.list().unwrap().is_empty());
    let tmp_left: Vec<_> = std::fs::read_dir(store.dir().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
}

/// Appends a file to an archive being built.
fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

#[test]
fn docker_and_oci_archives_import() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();

    // `docker save`: manifest.json, the config named by its digest, layer tars named by
    // layer ids, and a layer that two entries share stored once, the other a symlink.
    let one = tar_of(&[E::File("a", "from one", 0o644)]);
    let two = tar_of(&[E::File("b", "from two", 0o644), E::File(".wh.a", "", 0o644)]);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/b"]},
        "rootfs": {"type": "layers", "diff_ids": [
            format!("sha256:{}", sha256(&one)), format!("sha256:{}", sha256(&two)),
            format!("sha256:{}", sha256(&one)),
        ]},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256(&config));
    let manifest = json!([{
        "Config": config_name, "RepoTags": ["example/app:1"],
        "Layers": ["l1/layer.tar", "l2/layer.tar", "l3/layer.tar"],
    }]);
    let mut b = tar::Builder::new(Vec::new());
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    add(&mut b, &config_name, &config);
    add(&mut b, "l1/layer.tar", &one);
    add(&mut b, "l2/layer.tar", &two);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, "l3/layer.tar", "../l1/layer.tar")
        .unwrap();
    let archive = tmp.path().join("docker.tar");
    std::fs::write(&archive, gzip(&b.into_inner().unwrap())).unwrap();

    let r = image::import(&store, &archive, None).unwrap();
    assert_eq!(r.name, "example/app:1");
    let bundle = tmp.path().join("docker-bundle");
    let (blobs, manifest) = image::locate(&store, "example/app:1").unwrap();
    image::unpack(&blobs, &manifest, &bundle).unwrap();
    let got = listing(&bundle.join("rootfs"));
    assert_eq!(got.keys().collect::<Vec<_>>(), ["a", "b"], "{got:?}");

    // A layer whose content is not what the config's diff_ids say is refused.
    let mut b = tar::Builder::new(Vec::new());
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest_of(&config_name)).unwrap(),
    );
    add(&mut b, &config_name, &config);
    add(&mut b, "l1/layer.tar", &two);
    add(&mut b, "l2/layer.tar", &two);
    let bad = tmp.path().join("bad.tar");
    std::fs::write(&bad, b.into_inner().unwrap()).unwrap();
    let err = image::import(&store, &bad, None).unwrap_err().to_string();
    assert!(err.contains("l1/layer.tar"), "{err}");

    // An OCI layout in a tar (what newer `docker save` and `podman save --format
    // oci-archive` write), holding two images: a name chooses.
    let oci = tmp.path().join("oci");
    layout(
        &oci,
        &[(one.clone(), GZIP)],
        json!({"Cmd": ["/a"]}),
        "first",
    );
    layout(
        &oci,
        &[(two.clone(), ZSTD)],
        json!({"Cmd": ["/b"]}),
        "second",
    );
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &oci).unwrap();
    let archive = tmp.path().join("oci.tar");
    std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let err = image::import(&store, &archive, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("first") && err.contains("second"), "{err}");
    let r = image::import(&store, &archive, Some("second")).unwrap();
    assert_eq!(r.name, "second");
    // The directory imports the same way.
    let r = image::import(&store, &oci, Some("first")).unwrap();
    assert_eq!(r.name, "first");
    let names: Vec<String> = store.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["example/app:1", "first", "second"]);
    let tmp_left: Vec<_> = std::fs::read_dir(store.dir().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
}

fn manifest_of(config_name: &str) -> Value {
    json!([{"Config": config_name, "RepoTags": ["bad:1"],
        "Layers": ["l1/layer.tar", "l2/layer.tar", "l1/layer.tar"]}])
}

fn silo(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_silo"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run silo")
}

#[test]
fn an_image_of_the_demo_rootfs_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let oci = tmp.path().join("oci");
    demo_image(
        &oci,
        json!({"Cmd": ["/bin/sh", "-c", "echo default; id -u"], "User": "nobody",
               "Env": ["GREETING=hello"], "ExposedPorts": {"8080/tcp": {}}}),
    );

    let out = silo(
        &state,
        &["image", "import", oci.to_str().unwrap(), "--name", "demo:1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("demo:1 sha256:"));
    let out = silo(&state, &["image", "ls"]);
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(ls.lines().nth(1).unwrap().starts_with("demo:1 "), "{ls}");

    let id = format!("img-{}", std::process::id());
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--id", &id, "demo:1"];
        all.extend_from_slice(args);
        let out = silo(&state, &all);
        assert_no_leftovers(&state, &id);
        out
    };
    let out = run(&["--", "/bin/sh", "-c", "echo hi"]);
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "hi\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The image's own command, as its user (nobody, from its /etc/passwd), with its env.
    let out = run(&[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "default\n65534\n");
    let out = run(&["--", "/bin/sh", "-c", "echo $GREETING $HOME; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello /nonexistent\n");

    let out = silo(&state, &["run", "no-such-image"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-image"));

    // `silo image unpack` makes a bundle that silo's checks accept.
    let bundle = tmp.path().join("bundle");
    let out = silo(
        &state,
        &["image", "unpack", "demo:1", bundle.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = silo::bundle::Bundle::load(&bundle).unwrap();
    assert_eq!(
        b.spec().annotations().as_ref().unwrap()["silo.ports"],
        "8080"
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
}

/// After a `silo run` of an image, its unpacked bundle and its container are gone.
fn assert_no_leftovers(state: &Path, id: &str) {
    let bundles = state.join("images/bundles/run");
    let left: Vec<PathBuf> = std::fs::read_dir(&bundles)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "unpacked bundles left behind: {left:?}");
    assert!(!state.join(id).exists(), "state of {id} left behind");
    for dir in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leaf = dir.path().join("silo").join(id);
        assert!(!leaf.exists(), "cgroup {} was left behind", leaf.display());
    }
}

/// A registry (Debian's docker-registry) of the test's own on a free loopback port,
/// killed by its pid when dropped.
struct Registry {
    child: std::process::Child,
    addr: String,
    /// `user:password` for pushes, when the registry asks for them.
    creds: Option<&'static str>,
}

/// User `tester`, password `secret` (bcrypt, as the registry's htpasswd wants it).
const HTPASSWD: &str = "tester:$2b$04$TiO5McCyIRUyZrAnDD2GxueuMV9vRocPy2ib0/BlrPULrCZqdcCHG";

impl Registry {
    /// Starts a registry, asking for basic authentication as `tester` when `auth` is set.
    fn start(dir: &Path, auth: bool) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(bin.exists(), "docker-registry is missing: run scripts/deps");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        let storage = dir.join("registry");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if auth {
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, format!("{HTPASSWD}\n")).unwrap();
            yaml += &format!(
                "auth:\n  htpasswd:\n    realm: silo-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let creds = auth.then_some("tester:secret");
        let registry = Registry { child, addr, creds };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the registry did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        registry
    }

    /// Pushes the image of an OCI layout (its ref `name`) to `repo:tag` with skopeo.
    fn push(&self, layout: &Path, name: &str, target: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false", "-q"]);
        if let Some(creds) = self.creds {
            cmd.arg(format!("--dest-creds={creds}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{}/{target}", self.addr))
            .output()
            .expect("skopeo is missing: run scripts/deps");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn images_pull_from_a_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let oci = tmp.path().join("oci");
    demo_image(&oci, json!({"Cmd": ["/bin/sh", "-c", "echo pulled"]}));
    let registry = Registry::start(tmp.path(), false);
    registry.push(&oci, "demo", "silo/demo:1");
    let reference = format!("{}/silo/demo:1", registry.addr);

    let out = silo(&state, &["image", "pull", &reference, "--insecure"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = format!("pull-{}", std::process::id());
    let out = silo(&state, &["run", "--id", &id, &reference]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "pulled\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_leftovers(&state, &id);

    // A pull goes on from a partial download; a partial one that is wrong is dropped, so
    // the pull after it starts over and succeeds.
    let store = Store::open(state.join("images")).unwrap();
    let r = store.get(&reference).unwrap();
    let manifest: oci_spec::image::ImageManifest =
        store.blobs().json(&r.manifest, "image manifest").unwrap();
    let layer = &manifest.layers()[0];
    let blob = store.blobs().path(layer.digest()).unwrap();
    let data = std::fs::read(&blob).unwrap();
    let partial = store
        .dir()
        .join(format!("tmp/{}.partial", layer.digest().digest()));
    for (seed, ok) in [
        (data[..data.len() / 2].to_vec(), true),
        (vec![0u8; 100], false),
    ] {
        std::fs::remove_file(&blob).unwrap();
        std::fs::write(&partial, &seed).unwrap();
        let out = silo(&state, &["image", "pull", &reference, "--insecure"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "{stderr}");
        if !ok {
            assert!(stderr.contains(&layer.digest().to_string()), "{stderr}");
            let out = silo(&state, &["image", "pull", &reference, "--insecure"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(std::fs::read(&blob).unwrap(), data);
        assert!(!partial.exists());
    }

    // On a terminal (util-linux's script gives it one), the pull shows each blob's bytes
    // as they arrive; piped, as above, it shows nothing.
    std::fs::remove_file(&blob).unwrap();
    let line = format!(
        "{} --state-dir {} image pull {reference} --insecure",
        env!("CARGO_BIN_EXE_silo"),
        state.display()
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .output()
        .expect("run script");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    let short = &layer.digest().digest()[..12];
    assert!(
        shown.contains(&format!("{short} ")) && shown.contains(" MiB"),
        "no progress for {short}: {shown:?}"
    );
    assert_eq!(std::fs::read(&blob).unwrap(), data);

    // Nothing listens for this one: the error names the reference.
    let out = silo(
        &state,
        &["image", "pull", "127.0.0.1:1/none:1", "--insecure"],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1/none:1"));
    drop(registry);
}

#[test]
fn pulls_log_in_with_basic_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let oci = tmp.path().join("oci");
    let layer = tar_of(&[E::File("hello", "hi", 0o644)]);
    layout(&oci, &[(layer, GZIP)], json!({"Cmd": ["/hello"]}), "small");
    let registry = Registry::start(tmp.path(), true);
    registry.push(&oci, "small", "private/small:1");
    let reference = format!("{}/private/small:1", registry.addr);
    let pull = |user: Option<&str>, password: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_silo"));
        cmd.arg("--state-dir").arg(&state);
        cmd.args(["image", "pull", &reference, "--insecure"]);
        if let Some(user) = user {
            cmd.args(["--user", user]);
        }
        cmd.env("SILO_REGISTRY_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = pull(None, "");
    assert_eq!(out.status.code(), Some(125), "an anonymous pull is refused");
    let out = pull(Some("tester"), "wrong");
    assert_eq!(out.status.code(), Some(125), "a wrong password is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&reference), "{stderr}");
    let out = pull(Some("tester"), "secret");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(state.join("images")).unwrap();
    assert_eq!(store.list().unwrap()[0].name, reference);
    drop(registry);
}
