//! Resumable, size-capped, hash-checked bundle downloads.
//!
//! A download lands in `DIR/<sha256>.part`. A restarted download (after a lost connection or a
//! `kill -9`) asks for the rest with `Range: bytes=N-`; a server that answers 200 instead of 206
//! is followed from the start. Nothing is handed to the installer before the whole file has the
//! digest the signed desired state named.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The deployment names no valid sha256 digest.
    #[error("`{0}` is not a sha256 digest")]
    BadDigest(String),
    /// The bundle is larger than the device accepts.
    #[error("bundle of {size} bytes is over the device's limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// The server sent more bytes than the deployment's size.
    #[error("the server sent more than the expected {expected} bytes")]
    Oversized {
        /// The expected size.
        expected: u64,
    },
    /// The server answered with an unexpected status.
    #[error("artifact server answered HTTP {0}")]
    Status(u16),
    /// The connection failed or broke; the partial file is kept for a resume.
    #[error("download interrupted: {0}")]
    Transport(String),
    /// The complete file does not have the expected digest (deleted; never installed).
    #[error("downloaded bundle has digest {actual}, the desired state names {expected}: refused")]
    DigestMismatch {
        /// The expected digest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Local file trouble.
    #[error("download file: {0}")]
    Io(std::io::Error),
    /// Stopped because the download is no longer wanted (a newer desired state arrived); the
    /// partial file is kept, in case it is wanted again.
    #[error("download stopped: no longer wanted")]
    Stopped,
}

impl DownloadError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Io(_) => true,
            Self::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            _ => false,
        }
    }
}

// The message carries the i/o error's text, so it is not a `#[source]` too.
impl From<std::io::Error> for DownloadError {
    fn from(e: std::io::Error) -> Self {
        DownloadError::Io(e)
    }
}

/// One artifact to fetch.
#[derive(Debug, Clone)]
pub struct Artifact<'a> {
    /// Where it is.
    pub url: &'a str,
    /// Its sha256, lower-case hex.
    pub digest: &'a str,
    /// Its size in bytes.
    pub size: u64,
}

/// How long a download may receive nothing before it counts as interrupted (and is resumed
/// later from where it stopped).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP agent downloads use: connect and response-head timeouts, no whole-body timeout
/// (a slow link may take long) but [`STALL_TIMEOUT`] on every read, HTTP errors as statuses;
/// `https://` checked against `roots`.
pub fn agent(roots: &[outpost_tls::Certificate<'static>]) -> ureq::Agent {
    agent_with_stall(roots, STALL_TIMEOUT)
}

fn agent_with_stall(roots: &[outpost_tls::Certificate<'static>], stall: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(stall))
        .tls_config(outpost_tls::ureq_tls_config(roots))
        .build()
        .new_agent()
}

fn is_sha256(d: &str) -> bool {
    d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The partial-file path of `digest` in `dir`.
pub fn part_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{digest}.part"))
}

/// Downloads `artifact` into `dir` (resuming a partial file), checks its size and digest, and
/// returns the complete file's path. `stop` is asked between pieces of the body: when it says
/// yes, the download ends with [`DownloadError::Stopped`] and the partial file stays.
pub fn fetch(
    agent: &ureq::Agent,
    artifact: &Artifact<'_>,
    limit: u64,
    dir: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<PathBuf, DownloadError> {
    if !is_sha256(artifact.digest) {
        return Err(DownloadError::BadDigest(artifact.digest.to_owned()));
    }
    if artifact.size > limit {
        return Err(DownloadError::TooLarge {
            size: artifact.size,
            limit,
        });
    }
    std::fs::create_dir_all(dir)?;
    let path = part_path(dir, artifact.digest);
    let mut have = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if have > artifact.size {
        std::fs::remove_file(&path)?;
        have = 0;
    }
    if have < artifact.size {
        have = transfer(agent, artifact, &path, have, stop)?;
    }
    if have != artifact.size {
        return Err(DownloadError::Transport(format!(
            "got {have} of {} bytes",
            artifact.size
        )));
    }
    let actual = sha256_file(&path)?;
    if actual != artifact.digest {
        let _ = std::fs::remove_file(&path);
        return Err(DownloadError::DigestMismatch {
            expected: artifact.digest.to_owned(),
            actual,
        });
    }
    Ok(path)
}

fn transfer(
    agent: &ureq::Agent,
    artifact: &Artifact<'_>,
    path: &Path,
    have: u64,
    stop: &dyn Fn() -> bool,
) -> Result<u64, DownloadError> {
    let mut request = agent.get(artifact.url);
    if have > 0 {
        request = request.header("Range", &format!("bytes={have}-"));
    }
    let response = request
        .call()
        .map_err(|e| DownloadError::Transport(e.to_string()))?;
    let status = response.status().as_u16();
    let (mut file, mut have) = match status {
        206 if have > 0 => {
            let content_range = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !content_range.starts_with(&format!("bytes {have}-")) {
                return Err(DownloadError::Transport(format!(
                    "asked for bytes {have}- and got `{content_range}`"
                )));
            }
            (OpenOptions::new().append(true).open(path)?, have)
        }
        200 => (File::create(path)?, 0),
        416 if have > 0 => {
            // The server has fewer bytes than we do: start over next time.
            std::fs::remove_file(path)?;
            return Err(DownloadError::Transport(
                "range not satisfiable; restarting".into(),
            ));
        }
        other => return Err(DownloadError::Status(other)),
    };
    if have > 0 {
        tracing::info!(digest = artifact.digest, from = have, "resuming download");
    }
    let remaining = artifact.size - have;
    // One byte more than expected is enough to know the server sent too much.
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(remaining + 1)
        .reader();
    let oversized = |file: File| {
        drop(file);
        let _ = std::fs::remove_file(path);
        DownloadError::Oversized {
            expected: artifact.size,
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let over_limit = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<ureq::Error>())
                    .is_some_and(|u| matches!(u, ureq::Error::BodyExceedsLimit(_)));
                if over_limit {
                    return Err(oversized(file));
                }
                file.flush()?;
                return Err(DownloadError::Transport(e.to_string()));
            }
        };
        if have + n as u64 > artifact.size {
            return Err(oversized(file));
        }
        file.write_all(&buf[..n])?;
        have += n as u64;
        if stop() {
            file.sync_all()?;
            tracing::info!(
                digest = artifact.digest,
                have,
                "download stopped; partial kept"
            );
            return Err(DownloadError::Stopped);
        }
    }
    file.sync_all()?;
    Ok(have)
}

/// The sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// A one-shot HTTP server per connection: `respond(range header) -> (status line, headers, body)`.
    fn server(
        respond: impl Fn(Option<String>) -> (String, Vec<u8>) + Send + Sync + 'static,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut range = None;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                        range = Some(v.trim().to_owned());
                    }
                }
                let (head, body) = respond(range);
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}/artifact")
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A server that sends the head and the first `sent` of `size` bytes, then nothing,
    /// holding the connection open for 30 s.
    fn stalling_server(size: usize, sent: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                        line.clear();
                    }
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(&vec![7u8; sent]);
                    std::thread::sleep(Duration::from_secs(30));
                });
            }
        });
        format!("http://{addr}/artifact")
    }

    #[test]
    fn a_stalled_body_is_an_interruption_and_its_part_is_kept() {
        let url = stalling_server(100_000, 3000);
        let d = dir("stall");
        let digest = hex::encode(Sha256::digest([7u8; 100_000]));
        let artifact = Artifact {
            url: &url,
            digest: &digest,
            size: 100_000,
        };
        let started = std::time::Instant::now();
        let agent = agent_with_stall(&[], Duration::from_millis(500));
        let err = fetch(&agent, &artifact, 1 << 20, &d, &|| false).unwrap_err();
        assert!(matches!(err, DownloadError::Transport(_)), "{err}");
        assert!(err.is_transient());
        assert!(started.elapsed() < Duration::from_secs(20), "not cut off");
        let kept = std::fs::metadata(part_path(&d, &digest)).unwrap().len();
        assert_eq!(kept, 3000, "the part is kept for a resume");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_download_no_longer_wanted_stops_and_keeps_its_part() {
        let url = stalling_server(100_000, 3000);
        let d = dir("stop");
        let digest = hex::encode(Sha256::digest([7u8; 100_000]));
        let artifact = Artifact {
            url: &url,
            digest: &digest,
            size: 100_000,
        };
        let err = fetch(&agent(&[]), &artifact, 1 << 20, &d, &|| true).unwrap_err();
        assert!(matches!(err, DownloadError::Stopped), "{err}");
        let kept = std::fs::metadata(part_path(&d, &digest)).unwrap().len();
        assert!(kept > 0 && kept <= 3000, "{kept}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_server_sending_more_than_the_size_is_cut_off_and_nothing_is_kept() {
        let url = server(|_| {
            // Claims nothing about its length and sends far more than the deployment's size.
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
                vec![7u8; 100_000],
            )
        });
        let d = dir("oversize");
        let digest = hex::encode(Sha256::digest([7u8; 1000]));
        let artifact = Artifact {
            url: &url,
            digest: &digest,
            size: 1000,
        };
        let err = fetch(&agent(&[]), &artifact, 1 << 20, &d, &|| false).unwrap_err();
        assert!(
            matches!(err, DownloadError::Oversized { expected: 1000 }),
            "{err}"
        );
        assert!(!part_path(&d, &digest).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn size_cap_digest_check_and_a_server_ignoring_range() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let digest = hex::encode(Sha256::digest(&body));
        let served = body.clone();
        // Ignores Range and always answers 200 with everything.
        let url = server(move |_| {
            (
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    served.len()
                ),
                served.clone(),
            )
        });
        let d = dir("range");
        let artifact = Artifact {
            url: &url,
            digest: &digest,
            size: body.len() as u64,
        };
        let too_large = fetch(&agent(&[]), &artifact, 100, &d, &|| false).unwrap_err();
        assert!(matches!(too_large, DownloadError::TooLarge { .. }) && !too_large.is_transient());
        // A stale partial file: the 200 answer restarts from zero and the result verifies.
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(part_path(&d, &digest), &body[..1234]).unwrap();
        let path = fetch(&agent(&[]), &artifact, 1 << 20, &d, &|| false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        // The wrong digest: refused, the file is deleted.
        let wrong = "0".repeat(64);
        let artifact = Artifact {
            url: &url,
            digest: &wrong,
            size: body.len() as u64,
        };
        let err = fetch(&agent(&[]), &artifact, 1 << 20, &d, &|| false).unwrap_err();
        assert!(
            matches!(err, DownloadError::DigestMismatch { .. }) && !err.is_transient(),
            "{err}"
        );
        assert!(!part_path(&d, &wrong).exists());
        let bad = Artifact {
            url: &url,
            digest: "../../etc/passwd",
            size: 1,
        };
        assert!(matches!(
            fetch(&agent(&[]), &bad, 1 << 20, &d, &|| false),
            Err(DownloadError::BadDigest(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn server_errors_are_transient_and_keep_the_partial_file() {
        let url = server(|_| {
            (
                "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                vec![],
            )
        });
        let d = dir("503");
        let digest = "a".repeat(64);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(part_path(&d, &digest), b"partial").unwrap();
        let artifact = Artifact {
            url: &url,
            digest: &digest,
            size: 100,
        };
        let err = fetch(&agent(&[]), &artifact, 1 << 20, &d, &|| false).unwrap_err();
        assert!(
            matches!(err, DownloadError::Status(503)) && err.is_transient(),
            "{err}"
        );
        assert_eq!(std::fs::read(part_path(&d, &digest)).unwrap(), b"partial");
        let _ = std::fs::remove_dir_all(&d);
    }
}
