//! Customer-hosted archive buckets (Segment's "Local Data Storage"): reached by assuming the
//! customer's IAM role with their external id, verified by a test write before they are saved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_sdk_s3::config::Credentials;
use aws_sdk_s3::types::ServerSideEncryption;
use bytes::Bytes;
use meridian_core::CustomerStorage;
use tokio::sync::Mutex;
use tracing::info;

use crate::error::{ArchiveError, StorageVerificationError};
use crate::s3::{
    Encryption, S3Settings, S3Store, aws_sdk_config, describe_sdk_error, error_code,
    region_of_location_constraint,
};
use crate::store::ObjectStore;

/// How Meridian reaches customers' AWS accounts.
#[derive(Clone, Debug, Default)]
pub struct CustomerAccessSettings {
    /// An endpoint for STS and S3 (S3-compatible clouds, tests); `None`: AWS.
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    /// Meridian's own identity, which customers' trust policies allow; `None`: the AWS chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<meridian_core::Secret>,
    pub request_timeout: Duration,
}

/// Credentials and clients per (role, external id, region), shared by every project using that
/// role: the SDK's identity cache refreshes the assumed credentials before they expire.
pub struct CustomerStores {
    settings: CustomerAccessSettings,
    clients: Mutex<HashMap<(String, String, String), aws_sdk_s3::Client>>,
    /// Buckets whose location was checked, with the region they reported.
    checked_buckets: Mutex<HashMap<(String, String), String>>,
}

fn key_prefix(storage: &CustomerStorage) -> String {
    match storage
        .prefix
        .as_deref()
        .map(|prefix| prefix.trim_matches('/'))
    {
        Some(prefix) if !prefix.is_empty() => format!("{prefix}/"),
        _ => String::new(),
    }
}

fn encryption_of(storage: &CustomerStorage) -> Encryption {
    match &storage.kms_key_arn {
        Some(key) => Encryption::Kms {
            key_id: Some(key.clone()),
        },
        None => Encryption::Aes256,
    }
}

impl CustomerStores {
    pub fn new(settings: CustomerAccessSettings) -> CustomerStores {
        CustomerStores {
            settings,
            clients: Mutex::new(HashMap::new()),
            checked_buckets: Mutex::new(HashMap::new()),
        }
    }

    async fn base_config(&self, region: &str) -> aws_config::SdkConfig {
        let credentials = match (
            &self.settings.access_key_id,
            &self.settings.secret_access_key,
        ) {
            (Some(id), Some(secret)) => Some((id.as_str(), secret.expose())),
            _ => None,
        };
        aws_sdk_config(
            region,
            self.settings.endpoint.as_deref(),
            credentials,
            self.settings.request_timeout,
        )
        .await
    }

    fn s3_client(
        &self,
        shared: &aws_config::SdkConfig,
        credentials: Option<Credentials>,
    ) -> aws_sdk_s3::Client {
        let mut builder = aws_sdk_s3::config::Builder::from(shared)
            .force_path_style(self.settings.force_path_style);
        if let Some(credentials) = credentials {
            builder = builder.credentials_provider(credentials);
        }
        aws_sdk_s3::Client::from_conf(builder.build())
    }

    async fn client_for(
        &self,
        region: &str,
        project_id: &str,
        storage: &CustomerStorage,
    ) -> aws_sdk_s3::Client {
        let external_id = meridian_core::external_id_for(project_id);
        let cache_key = (
            storage.role_arn.clone(),
            external_id.clone(),
            region.to_string(),
        );
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(&cache_key) {
            return client.clone();
        }
        let shared = self.base_config(region).await;
        let provider = AssumeRoleProvider::builder(storage.role_arn.clone())
            .external_id(external_id)
            .session_name(format!("meridian-archive-{region}"))
            .session_length(Duration::from_secs(3600))
            .configure(&shared)
            .build()
            .await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.settings.force_path_style)
            .credentials_provider(provider)
            .build();
        let client = aws_sdk_s3::Client::from_conf(config);
        clients.insert(cache_key, client.clone());
        client
    }

    /// The project's customer store, checking (once per bucket) that it lives in the project's
    /// region. A bucket elsewhere is refused: its project's data stays queued.
    pub async fn store_for(
        &self,
        region: &str,
        project_id: &str,
        storage: &CustomerStorage,
    ) -> Result<(Arc<dyn ObjectStore>, String), ArchiveError> {
        let client = self.client_for(region, project_id, storage).await;
        let mut settings = S3Settings::new(&storage.bucket, region);
        settings.encryption = encryption_of(storage);
        settings.request_timeout = self.settings.request_timeout;
        let store = S3Store::with_client(client, settings);
        let bucket_key = (storage.bucket.clone(), region.to_string());
        let known_region = self.checked_buckets.lock().await.get(&bucket_key).cloned();
        let bucket_region = match known_region {
            Some(found) => found,
            None => {
                let found = store.bucket_region().await?;
                self.checked_buckets
                    .lock()
                    .await
                    .insert(bucket_key, found.clone());
                found
            }
        };
        if bucket_region != region {
            return Err(ArchiveError::Refused(format!(
                "customer bucket {} is in {bucket_region}, not in the project's region {region}: refusing to write there",
                storage.bucket
            )));
        }
        Ok((Arc::new(store), key_prefix(storage)))
    }

    /// Proves access before the settings are saved: assume the role (external id, a session name
    /// naming the project), check the bucket's region, write and delete a small object under
    /// `segment-logs/`. Errors are sentences an admin can act on.
    pub async fn verify(
        &self,
        project_id: &str,
        region: &str,
        storage: &CustomerStorage,
    ) -> Result<(), StorageVerificationError> {
        let shared = self.base_config(region).await;
        let sts = aws_sdk_sts::Client::new(&shared);
        let external_id = meridian_core::external_id_for(project_id);
        let assumed = sts
            .assume_role()
            .role_arn(&storage.role_arn)
            .external_id(&external_id)
            .role_session_name(format!("meridian-{project_id}"))
            .duration_seconds(900)
            .send()
            .await
            .map_err(|failure| {
                let detail = describe_sdk_error(&failure);
                match error_code(&failure).as_deref() {
                    Some("AccessDenied") => format!(
                        "AssumeRole was denied for {}: check that the role's trust policy allows Meridian's account with the condition sts:ExternalId = `{external_id}` (this project's external id) ({detail})",
                        storage.role_arn
                    ),
                    Some("NoSuchEntity") | Some("ValidationError") | Some("InvalidParameterValue") => {
                        format!("the role {} is not a valid role ARN or does not exist ({detail})", storage.role_arn)
                    }
                    Some(code) => format!("AssumeRole of {} failed with {code}: {detail}", storage.role_arn),
                    None => format!("could not reach AWS STS to assume {}: {detail}", storage.role_arn),
                }
            })
            .map_err(StorageVerificationError::AssumeRole)?;
        let Some(temporary) = assumed.credentials() else {
            return Err(StorageVerificationError::AssumeRole(format!(
                "AssumeRole of {} returned no credentials",
                storage.role_arn
            )));
        };
        let credentials = Credentials::new(
            temporary.access_key_id(),
            temporary.secret_access_key(),
            Some(temporary.session_token().to_string()),
            None,
            "meridian-verify",
        );
        let client = self.s3_client(&shared, Some(credentials));
        let bucket = &storage.bucket;
        let located = client.get_bucket_location().bucket(bucket).send().await.map_err(|failure| {
            let detail = describe_sdk_error(&failure);
            match error_code(&failure).as_deref() {
                Some("NoSuchBucket") => format!("bucket {bucket} does not exist ({detail})"),
                Some("AccessDenied") => format!("the role cannot read the location of bucket {bucket}: allow s3:GetBucketLocation ({detail})"),
                _ => format!("could not check bucket {bucket}: {detail}"),
            }
        }).map_err(StorageVerificationError::Bucket)?;
        let bucket_region = region_of_location_constraint(
            located
                .location_constraint()
                .map(|constraint| constraint.as_str()),
        );
        if bucket_region != region {
            return Err(StorageVerificationError::WrongRegion {
                bucket: bucket.clone(),
                bucket_region,
                project_id: project_id.to_string(),
                region: region.to_string(),
            });
        }
        let key = format!(
            "{}segment-logs/.meridian-access-check-{}",
            key_prefix(storage),
            uuid::Uuid::new_v4().simple()
        );
        let mut put = client
            .put_object()
            .bucket(bucket)
            .key(&key)
            .content_type("text/plain")
            .body(
                Bytes::from_static(b"Meridian checks that it can write here. Safe to delete.\n")
                    .into(),
            );
        put = match encryption_of(storage) {
            Encryption::Aes256 => put.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms { key_id } => put
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id),
        };
        put.send().await.map_err(|failure| {
            let detail = describe_sdk_error(&failure);
            match error_code(&failure).as_deref() {
                Some("AccessDenied") => format!("the role can be assumed but cannot write to s3://{bucket}/{key}: allow s3:PutObject on the bucket (and kms:GenerateDataKey on the key if you set one) ({detail})"),
                Some("NoSuchBucket") => format!("bucket {bucket} does not exist ({detail})"),
                Some(code) if code.starts_with("KMS") => format!("writing with the KMS key {:?} failed: check the key policy lets the role use it ({detail})", storage.kms_key_arn),
                _ => format!("the test write to s3://{bucket}/{key} failed: {detail}"),
            }
        }).map_err(StorageVerificationError::TestWrite)?;
        client.delete_object().bucket(bucket).key(&key).send().await.map_err(|failure| {
            format!(
                "the role can write but cannot delete in s3://{bucket}: allow s3:DeleteObject (Meridian rewrites archive objects for GDPR deletions) ({})",
                describe_sdk_error(&failure)
            )
        }).map_err(StorageVerificationError::TestDelete)?;
        info!(project_id, bucket, role_arn = %storage.role_arn, region, "customer storage verified");
        Ok(())
    }
}
