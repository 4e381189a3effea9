//! A container's output as a response body: what its log file holds, and with `follow`
//! whatever it writes next, until the run ends.
//!
//! Following is driven by inotify on the container's state directory, so new output is sent
//! as soon as the runtime writes it, and the rotation of `log` to `log.1` is noticed by the
//! file's inode changing under its name.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::fs::File;
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::debug;

use super::api::{Body, BoxError};
use super::registry::{Entry, Run};

type Chunk = Result<Bytes, io::Error>;

/// The log as a streamed body. Without `follow`, or once the run has ended, it ends with
/// what the file holds.
pub(crate) fn stream(entry: Arc<Entry>, run: Arc<Run>, follow: bool) -> Body {
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    tokio::spawn(async move {
        let path = entry.container.log_path();
        if let Err(e) = pump(&path, &run, follow, &tx).await {
            debug!(container = %entry.id, error = %e, "log stream failed");
            let _ = tx.send(Err(e)).await;
        }
    });
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk.map(Frame::data), rx))
    });
    StreamBody::new(chunks)
        .map_err(BoxError::from)
        .boxed_unsync()
}

async fn pump(path: &Path, run: &Run, follow: bool, tx: &mpsc::Sender<Chunk>) -> io::Result<()> {
    let ended = || run_ended(run);
    // Watch before the first read, so that nothing written in between goes unnoticed.
    let mut watcher = match path.parent() {
        Some(dir) if follow && !ended() => Some(Watcher::new(dir)?),
        _ => None,
    };
    // The rotated part first: it is the older output.
    if let Some(mut old) = open(&path.with_extension("1")).await? {
        send_rest(&mut old, tx).await?;
    }
    let mut file = open(path).await?;
    loop {
        if let Some(f) = file.as_mut() {
            send_rest(f, tx).await?;
        }
        // Rotated or created since: finish the old file, then go on with the new one.
        let current = inode(path).await;
        let held = match &file {
            Some(f) => Some(f.metadata().await?.ino()),
            None => None,
        };
        if current.is_some() && current != held {
            if let Some(f) = file.as_mut() {
                send_rest(f, tx).await?;
            }
            file = open(path).await?;
            continue;
        }
        let Some(watcher) = watcher.as_mut() else {
            return Ok(());
        };
        // The runtime drains the output pipe before it reports the exit, so after the exit
        // one last read finds everything.
        if ended() {
            if let Some(f) = file.as_mut() {
                send_rest(f, tx).await?;
            }
            return Ok(());
        }
        tokio::select! {
            gone = watcher.wait() => {
                if gone? {
                    return Ok(());
                }
            }
            _ = run.exited() => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

fn run_ended(run: &Run) -> bool {
    // The exit is on record once `exited` would return at once.
    futures_util::FutureExt::now_or_never(run.exited()).is_some()
}

async fn open(path: &Path) -> io::Result<Option<File>> {
    match File::open(path).await {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

async fn inode(path: &Path) -> Option<u64> {
    tokio::fs::metadata(path).await.ok().map(|m| m.ino())
}

/// Sends everything from the file's position to its end.
async fn send_rest(file: &mut File, tx: &mpsc::Sender<Chunk>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if tx
            .send(Ok(Bytes::copy_from_slice(&buf[..n])))
            .await
            .is_err()
        {
            // The client went away; nothing more to do.
            return Ok(());
        }
    }
}

/// inotify on the state directory: wakes on writes, creations and renames in it.
struct Watcher {
    fd: AsyncFd<InotifyFd>,
    dir: PathBuf,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Watcher {
    fn new(dir: &Path) -> io::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE_SELF,
        )?;
        // SAFETY: the AsyncFd owns the Inotify, which owns its descriptor and always
        // returns that same one; nothing else closes or replaces it.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(io::Error::from)?;
        Ok(Watcher {
            fd,
            dir: dir.to_path_buf(),
        })
    }

    /// Waits for the next events; true when the directory itself is gone.
    async fn wait(&mut self) -> io::Result<bool> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                Ok(events) => {
                    let events = events?;
                    let gone = events.iter().any(|e| {
                        e.mask
                            .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
                    });
                    if gone {
                        debug!(dir = %self.dir.display(), "log directory removed");
                    }
                    return Ok(gone);
                }
                Err(_would_block) => continue,
            }
        }
    }
}
