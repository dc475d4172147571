//! S3 (and S3-compatible) object stores: the regional archive bucket, and the bucket-location
//! residency guard.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use bytes::Bytes;
use tracing::{error, info, warn};

use crate::error::ArchiveError;
use crate::store::ObjectStore;

/// Server-side encryption of archive objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Encryption {
    Aes256,
    Kms { key_id: Option<String> },
}

/// How to reach one bucket.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    /// The AWS region the bucket must live in (also the signing region).
    pub region: String,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    pub encryption: Encryption,
    /// Static credentials; `None`: the standard AWS credential chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<meridian_core::Secret>,
    pub request_timeout: Duration,
    /// Objects larger than this are uploaded in parts of `part_size` bytes.
    pub multipart_threshold: usize,
    pub part_size: usize,
}

impl S3Settings {
    pub fn new(bucket: &str, region: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            region: region.to_string(),
            endpoint: None,
            force_path_style: false,
            encryption: Encryption::Aes256,
            access_key_id: None,
            secret_access_key: None,
            request_timeout: Duration::from_secs(60),
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
        }
    }
}

/// The shared AWS configuration for `region`, with an optional endpoint and static credentials.
pub async fn aws_sdk_config(
    region: &str,
    endpoint: Option<&str>,
    static_credentials: Option<(&str, &str)>,
    request_timeout: Duration,
) -> aws_config::SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(request_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .timeout_config(timeouts);
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((access_key_id, secret_access_key)) = static_credentials {
        loader = loader.credentials_provider(Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "meridian-config",
        ));
    }
    loader.load().await
}

/// An AWS error as one line: the error code and message when the service sent them.
pub fn describe_sdk_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    failure: &SdkError<E>,
) -> String {
    match failure {
        SdkError::ServiceError(context) => {
            let service_error = context.err();
            let status = context.raw().status().as_u16();
            match (service_error.code(), service_error.message()) {
                (Some(code), Some(message)) => format!("{code} (HTTP {status}): {message}"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("HTTP {status}: {service_error}"),
            }
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        SdkError::DispatchFailure(dispatch) => format!("could not connect: {dispatch:?}"),
        other => other.to_string(),
    }
}

/// The error code of a service error (`AccessDenied`, `NoSuchBucket`, ...). When the service sent
/// no parsable code, a 403 counts as `AccessDenied` and a 404 as `NotFound`.
pub fn error_code<E: ProvideErrorMetadata>(failure: &SdkError<E>) -> Option<String> {
    match failure {
        SdkError::ServiceError(context) => match context.err().code() {
            Some(code) => Some(code.to_string()),
            None => match context.raw().status().as_u16() {
                403 => Some("AccessDenied".to_string()),
                404 => Some("NotFound".to_string()),
                _ => None,
            },
        },
        _ => None,
    }
}

/// The AWS region name a GetBucketLocation constraint stands for.
pub fn region_of_location_constraint(constraint: Option<&str>) -> String {
    match constraint {
        None | Some("") => "us-east-1".to_string(),
        Some("EU") => "eu-west-1".to_string(),
        Some(region) => region.to_string(),
    }
}

pub struct S3Store {
    client: aws_sdk_s3::Client,
    settings: S3Settings,
}

impl S3Store {
    pub async fn connect(settings: S3Settings) -> S3Store {
        let credentials = match (&settings.access_key_id, &settings.secret_access_key) {
            (Some(id), Some(secret)) => Some((id.as_str(), secret.expose())),
            _ => None,
        };
        let shared = aws_sdk_config(
            &settings.region,
            settings.endpoint.as_deref(),
            credentials,
            settings.request_timeout,
        )
        .await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .build();
        S3Store {
            client: aws_sdk_s3::Client::from_conf(config),
            settings,
        }
    }

    /// A store on an existing client (customer buckets reached through an assumed role).
    pub fn with_client(client: aws_sdk_s3::Client, settings: S3Settings) -> S3Store {
        S3Store { client, settings }
    }

    pub fn bucket(&self) -> &str {
        &self.settings.bucket
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The region the bucket says it lives in (GetBucketLocation).
    pub async fn bucket_region(&self) -> Result<String, ArchiveError> {
        let located = self
            .client
            .get_bucket_location()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .map_err(|failure| self.failure("GetBucketLocation", &describe_sdk_error(&failure)))?;
        Ok(region_of_location_constraint(
            located
                .location_constraint()
                .map(|constraint| constraint.as_str()),
        ))
    }

    fn failure(&self, operation: &str, message: &str) -> ArchiveError {
        ArchiveError::Store {
            store: self.describe(),
            message: format!("{operation}: {message}"),
        }
    }

    async fn put_multipart(&self, key: &str, body: Bytes) -> Result<(), ArchiveError> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type("application/x-ndjson")
            .content_encoding("gzip");
        create = match &self.settings.encryption {
            Encryption::Aes256 => create.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms { key_id } => create
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
        };
        let created = create.send().await.map_err(|failure| {
            self.failure("CreateMultipartUpload", &describe_sdk_error(&failure))
        })?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let mut parts = Vec::new();
        let part_size = self.settings.part_size.max(5 * 1024 * 1024);
        for (index, start) in (0..body.len()).step_by(part_size).enumerate() {
            let chunk = body.slice(start..(start + part_size).min(body.len()));
            let part_number = index as i32 + 1;
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.settings.bucket)
                .key(key)
                .upload_id(&upload_id)
                .part_number(part_number)
                .body(ByteStream::from(chunk))
                .send()
                .await;
            match uploaded {
                Ok(uploaded) => parts.push(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .set_e_tag(uploaded.e_tag().map(str::to_string))
                        .build(),
                ),
                Err(failure) => {
                    let message = describe_sdk_error(&failure);
                    let _ = self
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.settings.bucket)
                        .key(key)
                        .upload_id(&upload_id)
                        .send()
                        .await;
                    return Err(self.failure("UploadPart", &message));
                }
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|failure| {
                self.failure("CompleteMultipartUpload", &describe_sdk_error(&failure))
            })?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}", self.settings.bucket)
    }

    async fn put(&self, key: &str, gzip_body: Bytes) -> Result<(), ArchiveError> {
        if gzip_body.len() > self.settings.multipart_threshold {
            return self.put_multipart(key, gzip_body).await;
        }
        let mut put = self
            .client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type("application/x-ndjson")
            .content_encoding("gzip")
            .body(ByteStream::from(gzip_body));
        put = match &self.settings.encryption {
            Encryption::Aes256 => put.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms { key_id } => put
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
        };
        put.send()
            .await
            .map_err(|failure| self.failure("PutObject", &describe_sdk_error(&failure)))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        let fetched = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await;
        let output = match fetched {
            Ok(output) => output,
            Err(failure) if error_code(&failure).as_deref() == Some("NoSuchKey") => {
                return Ok(None);
            }
            Err(failure) => return Err(self.failure("GetObject", &describe_sdk_error(&failure))),
        };
        let body = output
            .body
            .collect()
            .await
            .map_err(|failure| self.failure("GetObject body", &failure.to_string()))?;
        Ok(Some(body.into_bytes()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let mut keys = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.settings.bucket)
                .prefix(prefix)
                .set_continuation_token(continuation.clone())
                .send()
                .await
                .map_err(|failure| self.failure("ListObjectsV2", &describe_sdk_error(&failure)))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_string)),
            );
            match page.next_continuation_token() {
                Some(token) if page.is_truncated() == Some(true) => {
                    continuation = Some(token.to_string())
                }
                _ => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|failure| self.failure("DeleteObject", &describe_sdk_error(&failure)))?;
        Ok(())
    }
}

/// What the residency guard last found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardState {
    /// Not checked yet (the store refuses writes until the first check passes).
    Unchecked,
    /// The bucket is in the expected region.
    Verified,
    /// The bucket reported another region: writes are refused.
    Mismatch { found: String },
    /// The location could not be read; writes are refused until it can.
    Unknown { reason: String },
    /// The operator declared the store cannot report locations (verify_location = false).
    NotVerifiable,
}

/// A regional store that writes only while its bucket is proven to live in the region.
pub struct GuardedS3Store {
    store: S3Store,
    expected_region: String,
    verify_location: bool,
    state: Mutex<GuardState>,
}

impl GuardedS3Store {
    pub fn new(store: S3Store, expected_region: &str, verify_location: bool) -> GuardedS3Store {
        let state = if verify_location {
            GuardState::Unchecked
        } else {
            GuardState::NotVerifiable
        };
        if !verify_location {
            warn!(
                bucket = store.bucket(),
                region = expected_region,
                "verify_location = false: the archive bucket's region cannot be verified; make sure it lives in this region"
            );
        }
        GuardedS3Store {
            store,
            expected_region: expected_region.to_string(),
            verify_location,
            state: Mutex::new(state),
        }
    }

    pub fn state(&self) -> GuardState {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_state(&self, state: GuardState) {
        *self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = state;
    }

    /// Checks the bucket's location now. Called at start and periodically.
    pub async fn check(&self) -> GuardState {
        if !self.verify_location {
            return GuardState::NotVerifiable;
        }
        let state = match self.store.bucket_region().await {
            Ok(found) if found == self.expected_region => GuardState::Verified,
            Ok(found) => {
                error!(bucket = self.store.bucket(), expected = %self.expected_region, found = %found, "archive bucket is in another region: refusing to write to it; data stays queued");
                GuardState::Mismatch { found }
            }
            Err(failure) => {
                warn!(bucket = self.store.bucket(), error = %failure, "cannot read the archive bucket's location; writes wait until it can be verified");
                GuardState::Unknown {
                    reason: failure.to_string(),
                }
            }
        };
        if state == GuardState::Verified && self.state() != GuardState::Verified {
            info!(bucket = self.store.bucket(), region = %self.expected_region, "archive bucket location verified");
        }
        self.set_state(state.clone());
        state
    }

    fn refusal(&self) -> Option<String> {
        match self.state() {
            GuardState::Verified | GuardState::NotVerifiable => None,
            GuardState::Unchecked => Some(format!(
                "the location of bucket {} is not verified yet",
                self.store.bucket()
            )),
            GuardState::Mismatch { found } => Some(format!(
                "bucket {} is in {found}, not in {}: refusing to write this region's archive there",
                self.store.bucket(),
                self.expected_region
            )),
            GuardState::Unknown { reason } => Some(format!(
                "the location of bucket {} cannot be verified: {reason}",
                self.store.bucket()
            )),
        }
    }
}

#[async_trait]
impl ObjectStore for GuardedS3Store {
    fn describe(&self) -> String {
        self.store.describe()
    }

    async fn put(&self, key: &str, gzip_body: Bytes) -> Result<(), ArchiveError> {
        if self.state() == GuardState::Unchecked
            || matches!(self.state(), GuardState::Unknown { .. })
        {
            self.check().await;
        }
        if let Some(refusal) = self.refusal() {
            return Err(ArchiveError::Refused(refusal));
        }
        self.store.put(key, gzip_body).await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        self.store.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        self.store.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.store.delete(key).await
    }

    fn health(&self) -> Option<String> {
        match self.state() {
            GuardState::Mismatch { .. } | GuardState::Unknown { .. } => self.refusal(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_constraints_map_to_regions() {
        assert_eq!(region_of_location_constraint(None), "us-east-1");
        assert_eq!(region_of_location_constraint(Some("")), "us-east-1");
        assert_eq!(region_of_location_constraint(Some("EU")), "eu-west-1");
        assert_eq!(
            region_of_location_constraint(Some("af-south-1")),
            "af-south-1"
        );
    }
}
