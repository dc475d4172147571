//! TLS for the public listener: rustls (TLS 1.2 and 1.3 only, ALPN h2 and http/1.1) with a
//! certificate that can be replaced without a restart — on SIGHUP, or when the files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("cannot read TLS private key {path}: {message}")]
    Key { path: String, message: String },
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iterator| iterator.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::Certificate {
            path: cert_path.display().to_string(),
            message: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_path.display().to_string(),
            message: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| TlsError::Key {
        path: key_path.display().to_string(),
        message: error.to_string(),
    })?;
    let signing_key =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|error| {
            TlsError::Key {
                path: key_path.display().to_string(),
                message: error.to_string(),
            }
        })?;
    Ok(CertifiedKey::new(certificates, signing_key))
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCertificate {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ReloadingCertificate>, TlsError> {
        let key = load_certified_key(cert_path, key_path)?;
        Ok(Arc::new(ReloadingCertificate {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::from_pointee(key),
        }))
    }

    /// Loads the files again; a broken new pair is logged and the old certificate kept.
    pub fn reload(&self) {
        match load_certified_key(&self.cert_path, &self.key_path) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                warn!(%error, "TLS certificate reload failed; keeping the current certificate")
            }
        }
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let cert = std::fs::metadata(&self.cert_path)
            .and_then(|metadata| metadata.modified())
            .ok()?;
        let key = std::fs::metadata(&self.key_path)
            .and_then(|metadata| metadata.modified())
            .ok()?;
        Some((cert, key))
    }

    /// Reloads on SIGHUP and whenever the files' modification times change (checked every
    /// `poll_interval`), until `stop`.
    pub async fn watch(self: Arc<Self>, poll_interval: Duration, mut stop: watch::Receiver<bool>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup()).ok();
        let mut last_seen = self.modified();
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(stream) => {
                        stream.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = hangup => {
                    info!("SIGHUP received: reloading the TLS certificate");
                    self.reload();
                    last_seen = self.modified();
                }
                _ = tokio::time::sleep(poll_interval) => {
                    let now = self.modified();
                    if now.is_some() && now != last_seen {
                        self.reload();
                        last_seen = now;
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// A rustls server config: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(
    resolver: Arc<ReloadingCertificate>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
