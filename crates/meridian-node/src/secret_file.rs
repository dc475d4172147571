//! Secrets a node keeps in its data directory when the configuration gives none (the JWT secret,
//! the catalog hash key): read if the file exists, else made once, at random, and written durably
//! with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The secret in `<data_dir>/<name>` (trimmed), or a new random one (64 letters and digits) written
/// there now. Returns the secret and whether it was created just now.
pub fn read_or_create(data_dir: &Path, name: &str) -> std::io::Result<(String, bool)> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => return Ok((text.trim().to_string(), false)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let secret: String = (0..2)
        .map(|_| meridian_catalog::generate_write_key().replace("wk_", ""))
        .collect();
    meridian_queue::create_dir_all_durably(data_dir)?;
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok((secret, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_made_once_private_and_then_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (made, created) = read_or_create(&data_dir, "secret").unwrap();
        assert!(created && made.len() == 64);
        let mode = std::fs::metadata(data_dir.join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_or_create(&data_dir, "secret").unwrap(), (made, false));
    }
}
