//! The analytics log, off the hot path (the seed's Fluentd → HDFS): every
//! accepted batch as one JSON line in a file that Fluent Bit can tail,
//! rotated by size (`loves.log` → `loves.log.1` → ...). Requests hand lines
//! to a bounded channel and never wait: when it is full the line is dropped
//! and counted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// One accepted batch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoveLine {
    pub room_id: u64,
    pub viewer_id: u64,
    pub batch_id: String,
    pub taps_ms: Vec<u64>,
    pub at_ms: i64,
}

/// The request side: never blocks.
#[derive(Debug, Clone)]
pub struct AnalyticsLog {
    tx: mpsc::Sender<LoveLine>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl AnalyticsLog {
    /// Queues a line, or drops and counts it when the writer is behind.
    pub fn record(&self, line: LoveLine) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Rotation settings.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub files: u32,
}

/// The log and the writer task to run beside the server.
pub fn start(rotation: Rotation, queue: usize) -> (AnalyticsLog, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(queue);
    let log = AnalyticsLog {
        tx,
        dropped: Arc::new(AtomicU64::new(0)),
        written: Arc::new(AtomicU64::new(0)),
    };
    let written = log.written.clone();
    (log, write_lines(rotation, rx, written))
}

async fn write_lines(
    rotation: Rotation,
    mut rx: mpsc::Receiver<LoveLine>,
    written: Arc<AtomicU64>,
) {
    let path = rotation.dir.join("loves.log");
    while let Some(first) = rx.recv().await {
        // Write whatever queued up in one go, on a blocking thread.
        let mut lines = vec![first];
        while lines.len() < 4096 {
            match rx.try_recv() {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        let n = lines.len() as u64;
        let (rotation, file) = (rotation.clone(), path.clone());
        let result = tokio::task::spawn_blocking(move || append(&rotation, &file, &lines)).await;
        match result {
            Ok(Ok(())) => {
                written.fetch_add(n, Ordering::Relaxed);
            }
            Ok(Err(err)) => {
                tracing::warn!(%err, path = %path.display(), "analytics log write failed; lines dropped")
            }
            Err(err) => tracing::warn!(%err, "analytics writer task failed"),
        }
    }
}

fn append(rotation: &Rotation, path: &Path, lines: &[LoveLine]) -> std::io::Result<()> {
    std::fs::create_dir_all(&rotation.dir)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size >= rotation.max_bytes {
        rotate(path, rotation.files)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut buf, line).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    file.write_all(&buf)
}

/// `loves.log.(n-1)` → `loves.log.n`, ..., `loves.log` → `loves.log.1`;
/// the oldest beyond `files` is dropped.
fn rotate(path: &Path, files: u32) -> std::io::Result<()> {
    let name = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
    let _ = std::fs::remove_file(name(files));
    for i in (1..files).rev() {
        if name(i).exists() {
            std::fs::rename(name(i), name(i + 1))?;
        }
    }
    std::fs::rename(path, name(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: u64) -> LoveLine {
        LoveLine {
            room_id: 1,
            viewer_id: i,
            batch_id: format!("b{i}"),
            taps_ms: vec![i, i + 1],
            at_ms: 0,
        }
    }

    #[test]
    fn lines_are_json_and_files_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            dir: dir.path().to_owned(),
            max_bytes: 200,
            files: 2,
        };
        let path = dir.path().join("loves.log");
        for i in 0..20 {
            append(&rotation, &path, &[line(i)]).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["room_id"], 1);
        assert!(dir.path().join("loves.log.1").exists());
        assert!(dir.path().join("loves.log.2").exists());
        assert!(
            !dir.path().join("loves.log.3").exists(),
            "only two rotated files are kept"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _writer) = start(
            Rotation {
                dir: dir.path().to_owned(),
                max_bytes: 1 << 20,
                files: 1,
            },
            2,
        );
        // The writer is not running: the queue holds two, the rest drop.
        for i in 0..5 {
            log.record(line(i));
        }
        assert_eq!(log.dropped(), 3);
    }
}
