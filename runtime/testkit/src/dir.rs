//! Scratch directories.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// When this environment variable is set, dropped [`TempDir`]s are left on disk.
pub const KEEP_ENV: &str = "OUTPOST_KEEP_TEST_DIRS";

/// A fresh, empty directory under the system temp dir, removed on drop unless
/// `OUTPOST_KEEP_TEST_DIRS` is set.
///
/// Its name is `outpost-{tag}-{pid}-{n}`, `n` counting the directories this process made, so
/// tests running in parallel with the same tag do not share one. The field is the path, for
/// callers that read `dir.0`; [`TempDir::path`] and the `Deref` to [`Path`] say the same.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates the directory, replacing whatever an earlier process of the same pid left.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("outpost-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.0.join(path)
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("{KEEP_ENV} is set: keeping {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_empty_and_removed_on_drop() {
        let a = TempDir::new("testkit");
        let b = TempDir::new("testkit");
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(std::env::temp_dir()));
        assert!(a.is_dir(), "Deref to Path");
        assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
        std::fs::write(a.join("file"), b"x").unwrap();
        let path = a.0.clone();
        drop(a);
        let kept = std::env::var_os(KEEP_ENV).is_some();
        assert_eq!(path.exists(), kept);
        if kept {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
}
