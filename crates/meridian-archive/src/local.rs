//! The local-directory store (the embedded default archive).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::ArchiveError;
use crate::store::ObjectStore;

pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalDirStore {
        LocalDirStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, ArchiveError> {
        let is_safe = !key.is_empty()
            && !key.starts_with('/')
            && key
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !is_safe {
            return Err(ArchiveError::Refused(format!("unsafe archive key `{key}`")));
        }
        Ok(self.root.join(key))
    }
}

fn sync_dir(path: &Path) -> Result<(), ArchiveError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|error| ArchiveError::io(path, error))
}

/// Writes `body` to `path` atomically and durably: temporary file, fsync, rename, fsync dir.
fn write_atomically(path: &Path, body: &[u8]) -> Result<(), ArchiveError> {
    let parent = path.parent().ok_or_else(|| {
        ArchiveError::Refused(format!("no parent directory for {}", path.display()))
    })?;
    // Day directories are made at run time: each is synced into its parent, or a power cut could
    // lose a directory holding objects whose queue range was already committed.
    meridian_queue::create_dir_all_durably(parent)
        .map_err(|error| ArchiveError::io(parent, error))?;
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("object");
    let temporary = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&temporary)
        .map_err(|error| ArchiveError::io(&temporary, error))?;
    file.write_all(body)
        .and_then(|()| file.sync_all())
        .map_err(|error| ArchiveError::io(&temporary, error))?;
    fs::rename(&temporary, path).map_err(|error| ArchiveError::io(path, error))?;
    sync_dir(parent)
}

fn list_recursively(
    root: &Path,
    directory: &Path,
    keys: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(ArchiveError::io(directory, error)),
    };
    for entry in entries {
        let entry = entry.map_err(|error| ArchiveError::io(directory, error))?;
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(|error| ArchiveError::io(&path, error))?;
        if file_type.is_dir() {
            list_recursively(root, &path, keys)?;
        } else if file_type.is_file() {
            let is_temporary = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with('.'));
            if is_temporary {
                continue;
            }
            if let Ok(relative) = path.strip_prefix(root)
                && let Some(key) = relative.to_str()
            {
                keys.push(key.to_string());
            }
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ArchiveError::Store {
            store: "local directory".into(),
            message: format!("worker panicked: {error}"),
        })?
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn put(&self, key: &str, gzip_body: Bytes) -> Result<(), ArchiveError> {
        let path = self.path_of(key)?;
        blocking(move || write_atomically(&path, &gzip_body)).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        let path = self.path_of(key)?;
        blocking(move || match fs::read(&path) {
            Ok(body) => Ok(Some(Bytes::from(body))),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ArchiveError::io(&path, error)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            // Walk only the deepest directory the prefix names completely.
            let directory_part = match prefix.rfind('/') {
                Some(index) => &prefix[..index],
                None => "",
            };
            let start = if directory_part.is_empty() {
                root.clone()
            } else {
                root.join(directory_part)
            };
            let mut keys = Vec::new();
            list_recursively(&root, &start, &mut keys)?;
            keys.retain(|key| key.starts_with(&prefix));
            keys.sort();
            Ok(keys)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        let path = self.path_of(key)?;
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(ArchiveError::io(&path, error)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path().join("archive"));
        store
            .put("segment-logs/p1/0/a.gz", Bytes::from_static(b"one"))
            .await
            .unwrap();
        store
            .put("segment-logs/p1/0/a.gz", Bytes::from_static(b"two"))
            .await
            .unwrap();
        store
            .put("segment-logs/p2/0/b.gz", Bytes::from_static(b"three"))
            .await
            .unwrap();
        assert_eq!(
            store.get("segment-logs/p1/0/a.gz").await.unwrap().unwrap(),
            Bytes::from_static(b"two")
        );
        assert_eq!(
            store.list("segment-logs/p1/").await.unwrap(),
            vec!["segment-logs/p1/0/a.gz"]
        );
        assert_eq!(store.list("segment-logs/").await.unwrap().len(), 2);
        store.delete("segment-logs/p1/0/a.gz").await.unwrap();
        assert!(store.get("segment-logs/p1/0/a.gz").await.unwrap().is_none());
        assert!(store.put("../escape", Bytes::new()).await.is_err());
        assert!(store.list("nothing/here/").await.unwrap().is_empty());
    }
}
