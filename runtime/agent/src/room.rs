//! Free space before a write. sled must never meet a full disk: after a failed write its
//! flushes hang, and the agent's loop with them. A write that would leave less than the margin
//! free is refused with [`AgentError::DiskFull`] instead.

use std::path::PathBuf;

use crate::error::{AgentError, Result};

/// Free space kept beyond what a write needs: sled's log segments and snapshots.
pub(crate) const MARGIN: u64 = 4 << 20;

/// The file system a store lives on, and the room it must keep.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    pub(crate) dir: PathBuf,
    pub(crate) margin: u64,
}

impl Room {
    /// Bytes free for this process on the file system of `dir`.
    fn free(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(&self.dir).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Refuses unless `needed` bytes and the margin are free (where free space cannot be
    /// read, the write goes ahead).
    pub(crate) fn check(&self, needed: u64) -> Result<()> {
        let Some(free) = self.free() else {
            return Ok(());
        };
        let wanted = needed.saturating_add(self.margin);
        if free < wanted {
            return Err(AgentError::DiskFull {
                wanted,
                free,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_would_leave_less_than_the_margin_is_refused() {
        let dir = std::env::temp_dir();
        let roomy = Room {
            dir: dir.clone(),
            margin: 0,
        };
        roomy.check(1).unwrap();
        let full = Room {
            dir,
            margin: u64::MAX / 2,
        };
        let e = full.check(1).unwrap_err();
        assert!(e.to_string().contains("the disk is full"), "{e}");
    }
}
