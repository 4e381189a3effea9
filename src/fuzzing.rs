//! Entry points for fuzzing what silo parses from untrusted input: a bundle's config.json
//! and the daemon's HTTP requests. The cargo-fuzz targets in fuzz/ and the in-suite test
//! (tests/fuzz.rs) call these same functions, so both exercise exactly the same code.
//!
//! Each entry runs the pure part of the real path (parsing and every check made before
//! anything is created) and panics only on a bug: a panic inside silo, or an error that
//! fails to say what it is about. Nothing here starts a process, writes a file or opens
//! one chosen by the input.

use std::path::Path;

use http::{Method, Uri};

use crate::bundle::Bundle;
use crate::daemon::api::{self, DeleteRequest, Route, SignalRequest, StartRequest, StopRequest};
use crate::spawn::Plan;
use crate::{StartOptions, container};

/// Treats `data` as the config.json of the bundle directory `dir` (which should hold an
/// empty `rootfs` directory), then prepares the spawn the way a start would, without
/// spawning: the process, the spawn plan, the cgroup limits and the cgroup path.
pub fn bundle(dir: &Path, data: &[u8]) {
    let bundle = match Bundle::from_json(data, dir) {
        Ok(bundle) => bundle,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("config.json"),
                "the error names no file: {msg}"
            );
            return;
        }
    };
    let linux = bundle.spec().linux().clone().unwrap_or_default();
    // Plan::new opens the namespaces a bundle joins by path. Opening a path the input
    // names could block (a FIFO) or have effects (a device node), so such bundles stop here.
    if linux
        .namespaces()
        .iter()
        .flatten()
        .any(|ns| ns.path().is_some())
    {
        return;
    }
    let Ok(process) = container::process(&bundle, &StartOptions::default()) else {
        return;
    };
    if let Err(e) = Plan::new(&bundle, &process) {
        let msg = e.to_string();
        assert!(!msg.is_empty(), "an empty error for a bad plan");
    }
    let _ = container::limits(&bundle, None);
    if let Some(path) = linux.cgroups_path() {
        let _ = crate::cgroup::normalize(&format!("silo/{}", path.to_string_lossy()));
    }
}

/// Treats `data` as a request to the daemon: a request line (`METHOD TARGET`), a newline,
/// then the body. Routes it, checks the container id and parses and checks the body the
/// way the daemon does before it acts.
pub fn api_request(data: &[u8]) {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (method, target) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    // What hyper would refuse never reaches the API.
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let route = match Route::parse(&method, uri.path()) {
        Ok(route) => route,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(uri.path()), "the error names no path: {msg}");
            return;
        }
    };
    let id = match route {
        Route::List => return,
        Route::Start(id)
        | Route::Get(id)
        | Route::Delete(id)
        | Route::Signal(id)
        | Route::Stop(id)
        | Route::Monitor(id)
        | Route::Logs(id)
        | Route::Port { id, .. } => id,
    };
    if !crate::daemon::registry::valid_id(id) {
        return;
    }
    match route {
        Route::Start(_) => {
            if let Ok(req) = api::parse_json::<StartRequest>(body, None)
                && let Ok(plan) = req.into_plan()
                && let Some(instance) = plan.opts.instance
            {
                assert!(
                    instance.vcpu.is_finite() && instance.vcpu > 0.0,
                    "instance with {} vCPUs accepted",
                    instance.vcpu
                );
            }
        }
        Route::Signal(_) => {
            let _ = api::parse_json::<SignalRequest>(body, None);
        }
        Route::Stop(_) => {
            let _ = api::parse_json(body, Some(StopRequest::default()));
        }
        Route::Delete(_) => {
            let _ = api::parse_json(body, Some(DeleteRequest::default()));
        }
        Route::Port { port, path, .. } => {
            let _ = port.parse::<u32>();
            // The target the proxy sends on into the container.
            let mut target = format!("/{}", path.unwrap_or(""));
            if let Some(query) = uri.query() {
                target.push('?');
                target.push_str(query);
            }
            let _ = target.parse::<Uri>();
        }
        Route::List | Route::Get(_) | Route::Monitor(_) | Route::Logs(_) => {}
    }
}
