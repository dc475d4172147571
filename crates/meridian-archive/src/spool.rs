//! The customer spool: archive objects bound for a project's own bucket wait here, on the node's
//! disk in the project's region, while that bucket cannot be written (its role was revoked, the
//! bucket deleted, the customer's S3 down). The regional archive keeps flowing meanwhile: one
//! customer's broken bucket never holds back the other projects of the region. A drainer uploads
//! spooled objects once the bucket works again; keys are the same as they would have been, so a
//! retried upload overwrites instead of duplicating.

//!
//! The spool has a byte budget: a full spool refuses new objects, so the batch they belong to stays
//! in the region's queue (whose own disk budget then pushes back on ingest) instead of filling the
//! volume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ArchiveError;

pub struct Spool {
    dir: PathBuf,
    budget_bytes: u64,
    /// Bytes of the spooled objects (counted at open, kept up to date by `put` and `remove`).
    used_bytes: AtomicU64,
}

/// One spooled object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledObject {
    pub project_id: String,
    pub key: String,
    pub path: PathBuf,
}

fn encode_key(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

fn decode_key(file_name: &str) -> String {
    file_name.replace("%2F", "/").replace("%25", "%")
}

impl Spool {
    /// A spool in `dir` that holds at most `budget_bytes` of objects; counts what is there.
    pub fn new(dir: impl Into<PathBuf>, budget_bytes: u64) -> Spool {
        let spool = Spool {
            dir: dir.into(),
            budget_bytes,
            used_bytes: AtomicU64::new(0),
        };
        let used: u64 = spool
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|object| std::fs::metadata(&object.path).ok())
            .map(|metadata| metadata.len())
            .sum();
        spool.used_bytes.store(used, Ordering::Relaxed);
        spool
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the object durably (temporary file, fsync, rename, fsync of the directory).
    pub fn put(&self, project_id: &str, key: &str, body: &[u8]) -> Result<(), ArchiveError> {
        use std::io::Write;
        let is_safe_project = !project_id.is_empty()
            && project_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !is_safe_project {
            return Err(ArchiveError::Refused(format!(
                "unsafe project id `{project_id}` for the spool"
            )));
        }
        let used_bytes = self.used_bytes();
        if used_bytes.saturating_add(body.len() as u64) > self.budget_bytes {
            return Err(ArchiveError::SpoolFull {
                used_bytes,
                budget_bytes: self.budget_bytes,
            });
        }
        let directory = self.dir.join(project_id);
        meridian_queue::create_dir_all_durably(&directory)
            .map_err(|error| ArchiveError::io(&directory, error))?;
        let path = directory.join(encode_key(key));
        let temporary = directory.join(format!(".{}.tmp", encode_key(key)));
        let mut file = std::fs::File::create(&temporary)
            .map_err(|error| ArchiveError::io(&temporary, error))?;
        file.write_all(body)
            .and_then(|()| file.sync_all())
            .map_err(|error| ArchiveError::io(&temporary, error))?;
        let replaced_bytes = std::fs::metadata(&path)
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        std::fs::rename(&temporary, &path).map_err(|error| ArchiveError::io(&path, error))?;
        self.used_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.release(replaced_bytes);
        std::fs::File::open(&directory)
            .and_then(|handle| handle.sync_all())
            .map_err(|error| ArchiveError::io(&directory, error))
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Every spooled object, oldest key first per project.
    pub fn list(&self) -> Result<Vec<SpooledObject>, ArchiveError> {
        let mut objects = Vec::new();
        let projects = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(objects),
            Err(error) => return Err(ArchiveError::io(&self.dir, error)),
        };
        for project in projects.flatten() {
            let project_path = project.path();
            let Some(project_id) = project.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(&project_path) else {
                continue;
            };
            for file in files.flatten() {
                let Some(name) = file.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if name.starts_with('.') {
                    continue;
                }
                objects.push(SpooledObject {
                    project_id: project_id.clone(),
                    key: decode_key(&name),
                    path: file.path(),
                });
            }
        }
        objects.sort_by(|a, b| (&a.project_id, &a.key).cmp(&(&b.project_id, &b.key)));
        Ok(objects)
    }

    pub fn read(&self, object: &SpooledObject) -> Result<Vec<u8>, ArchiveError> {
        std::fs::read(&object.path).map_err(|error| ArchiveError::io(&object.path, error))
    }

    pub fn remove(&self, object: &SpooledObject) -> Result<(), ArchiveError> {
        let bytes = std::fs::metadata(&object.path)
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        match std::fs::remove_file(&object.path) {
            Ok(()) => {
                self.release(bytes);
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(ArchiveError::io(&object.path, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_through_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"), 1 << 20);
        assert!(spool.list().unwrap().is_empty());
        spool
            .put("prj_1", "pre/fix/segment-logs/prj_1/0/0001-0002.gz", b"one")
            .unwrap();
        spool
            .put("prj_1", "segment-logs/prj_1/0/0001-0002%.gz", b"two")
            .unwrap();
        let listed = spool.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].key, "pre/fix/segment-logs/prj_1/0/0001-0002.gz");
        assert_eq!(listed[1].key, "segment-logs/prj_1/0/0001-0002%.gz");
        assert_eq!(spool.read(&listed[0]).unwrap(), b"one");
        spool.remove(&listed[0]).unwrap();
        assert_eq!(spool.list().unwrap().len(), 1);
        assert!(spool.put("../escape", "k", b"x").is_err());
    }

    #[test]
    fn a_full_spool_refuses_objects_until_space_is_freed_and_counts_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"), 10);
        spool.put("prj_1", "a", b"123456").unwrap();
        assert_eq!(spool.used_bytes(), 6);
        assert!(matches!(
            spool.put("prj_1", "b", b"12345"),
            Err(ArchiveError::SpoolFull {
                used_bytes: 6,
                budget_bytes: 10
            })
        ));
        assert_eq!(
            spool.list().unwrap().len(),
            1,
            "nothing written past the budget"
        );
        let reopened = Spool::new(dir.path().join("spool"), 10);
        assert_eq!(reopened.used_bytes(), 6, "counted at open");
        let listed = reopened.list().unwrap();
        reopened.remove(&listed[0]).unwrap();
        assert_eq!(reopened.used_bytes(), 0);
        reopened.put("prj_1", "b", b"12345").unwrap();
    }
}
