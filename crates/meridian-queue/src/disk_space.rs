//! Free space of the filesystem a queue lives on, for the free-space reserve (see
//! [`crate::QueueConfig::min_free_disk_bytes`]).

use std::io;
use std::path::Path;

/// Bytes an unprivileged writer can still allocate on the filesystem holding `path`
/// (`f_bavail * f_frsize` of statvfs).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let stats = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// The size of the filesystem holding `path` (`f_blocks * f_frsize`).
pub fn total_bytes(path: &Path) -> io::Result<u64> {
    let stats = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(stats.f_blocks.saturating_mul(stats.f_frsize))
}

/// The reserve a queue keeps on a filesystem of `total_bytes`: as configured, but at most a
/// quarter of the filesystem, so that a small volume still takes appends.
pub fn effective_reserve(configured_bytes: u64, total_bytes: u64) -> u64 {
    configured_bytes.min(total_bytes / 4)
}

/// True for the errors a full filesystem (or an exhausted quota) gives a write.
pub fn is_out_of_space(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_capped_at_a_quarter_of_the_filesystem() {
        let mib = 1024 * 1024;
        assert_eq!(effective_reserve(128 * mib, 100 * 1024 * mib), 128 * mib);
        assert_eq!(effective_reserve(128 * mib, 48 * mib), 12 * mib);
        assert_eq!(effective_reserve(0, 48 * mib), 0);
    }

    #[test]
    fn free_space_is_read_and_enospc_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0 && free <= total_bytes(dir.path()).unwrap());
        assert!(is_out_of_space(&io::Error::from_raw_os_error(28)));
        assert!(!is_out_of_space(&io::Error::from_raw_os_error(5)));
    }
}
