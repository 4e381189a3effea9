//! Where an orchestrator's `linux.cgroupsPath` lands. silo only ever makes cgroups below
//! the parent it owns (`/silo` by default), so every path is taken below it:
//!
//! - none: `PARENT/ID`;
//! - absolute and already below the parent (`/silo/pods/x`): as it is;
//! - any other absolute path (`/default/x` from containerd, `/libpod_parent/libpod-x`
//!   from Podman): the same path below the parent (`/silo/default/x`);
//! - relative: below the parent;
//! - systemd's `slice:prefix:name` (with `--systemd-cgroup`, or any path with two colons):
//!   `PARENT/slice/prefix-name.scope`, the directory systemd would make, without systemd.

use super::Result;

/// The cgroup path below `parent` for `cgroups_path` of container `id`.
pub fn below_parent(
    cgroups_path: Option<&str>,
    id: &str,
    parent: &str,
    systemd: bool,
) -> Result<String> {
    let parent = crate::cgroup::normalize(parent)?;
    let Some(path) = cgroups_path.filter(|p| !p.is_empty()) else {
        return Ok(id.to_string());
    };
    let parts: Vec<&str> = path.split(':').collect();
    let rel = match parts.as_slice() {
        [slice, prefix, name] if systemd || !path.starts_with('/') => {
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let scope = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            format!("{slice}/{scope}")
        }
        _ => {
            let trimmed = path.trim_start_matches('/');
            match trimmed.strip_prefix(&parent) {
                Some(rest)
                    if path.starts_with('/') && (rest.is_empty() || rest.starts_with('/')) =>
                {
                    rest.trim_start_matches('/').to_string()
                }
                _ => trimmed.to_string(),
            }
        }
    };
    // Checked here so that a bad path names what the orchestrator gave.
    crate::cgroup::normalize(&rel)?;
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_land_below_the_parent() {
        let at = |p: Option<&str>, systemd| below_parent(p, "c1", "/silo", systemd).unwrap();
        assert_eq!(at(None, false), "c1");
        assert_eq!(at(Some("/default/c1"), false), "default/c1");
        assert_eq!(at(Some("/silo/pods/c1"), false), "pods/c1");
        assert_eq!(at(Some("/silo-other/c1"), false), "silo-other/c1");
        assert_eq!(at(Some("pods/c1"), false), "pods/c1");
        assert_eq!(
            at(Some("machine.slice:libpod:abc"), true),
            "machine.slice/libpod-abc.scope"
        );
        assert_eq!(at(Some(":cri:abc"), true), "system.slice/cri-abc.scope");
        assert!(below_parent(Some("/a/../../etc"), "c1", "/silo", false).is_err());
        assert!(below_parent(Some("/silo"), "c1", "/silo", false).is_err());
    }
}
