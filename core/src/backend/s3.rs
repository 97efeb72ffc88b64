//! The S3 backend: a repository in a bucket of AWS S3 or any S3-compatible
//! store (Garage, MinIO, Ceph, R2, B2, Wasabi), on `aws-sdk-s3`.
//!
//! The [`Backend`] trait is synchronous, so this backend owns a small tokio
//! runtime and blocks on it from the engines' worker threads (see the trait's
//! module doc). Callers inside an async context must call it from
//! `spawn_blocking`.
//!
//! The code here is about S3 only; retries, the circuit breaker and the
//! concurrency limit wrap it from [`super::resilience`]. Three things are
//! S3-specific and live here:
//!
//! * **Put-if-absent.** A put sends `If-None-Match: *`, which AWS and many
//!   stores enforce with `412 Precondition Failed`. Some stores accept the
//!   header and overwrite anyway (Garage 2.5), so [`S3Backend::connect`]
//!   *probes* it by writing one probe object twice. Where it is not enforced,
//!   a put first asks whether the object exists. That leaves a race between
//!   two writers of the same key, which is harmless for every object in a
//!   repository: names are content hashes (two writers write equal bytes) or
//!   random; `init` reads the config back to catch the one remaining case.
//! * **Multipart.** Objects above the multipart threshold go up in parts,
//!   several at once; a failed upload is aborted, and uploads left behind by
//!   a crash are aborted by [`Backend::remove_stale_temp_files`] (prune).
//! * **Timeouts that cancel.** Each request runs under a deadline of a base
//!   time plus its size at a minimum throughput; dropping the future closes
//!   the connection, so a hung request costs nothing once abandoned.
//!
//! The SDK's own retries are off (the [`super::resilience::Retry`] wrapper
//! owns retrying and knows which errors are temporary) and request checksums
//! are sent only where S3 requires them: several S3-compatible stores reject
//! the newer streaming checksum trailers, and every object a repository
//! stores is authenticated end to end by its own encryption anyway.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{validate_key, Backend, BackendError, LockMode, ObjectInfo, PutOutcome, Retention};

/// An access key pair given explicitly (instead of the standard AWS chain).
/// Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct S3Credentials {
    /// The access key ID.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Where a repository lives in S3 and how to talk to the store.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The bucket.
    pub bucket: String,
    /// A key prefix inside the bucket, empty or ending in `/`.
    pub prefix: String,
    /// A custom endpoint such as `http://127.0.0.1:3900`; `None` is AWS.
    pub endpoint: Option<String>,
    /// The region; `None` takes it from the AWS configuration, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); `None` means "yes for a
    /// custom endpoint, no for AWS", which is what S3-compatible stores expect.
    pub path_style: Option<bool>,
    /// Explicit credentials; `None` uses the standard AWS chain (environment,
    /// shared profile, container and instance metadata).
    pub credentials: Option<S3Credentials>,
    /// How many requests the engines should keep in flight.
    pub connections: usize,
    /// Base time allowed for one request.
    pub request_timeout: Duration,
    /// The slowest transfer rate (bytes per second) tolerated before a large
    /// request counts as hung: its deadline grows by `size / min_throughput`.
    pub min_throughput: u64,
    /// Objects larger than this go up with a multipart upload.
    pub multipart_threshold: usize,
    /// Part size of a multipart upload (S3's minimum is 5 MiB).
    pub part_size: usize,
}

impl S3Options {
    /// Parses `s3://bucket[/prefix]` (AWS or an endpoint given separately)
    /// or restic's `s3:http[s]://host[:port]/bucket[/prefix]` (a custom
    /// endpoint, path-style).
    pub fn from_url(url: &str) -> Result<S3Options, String> {
        let (endpoint, rest) = if let Some(rest) = url.strip_prefix("s3://") {
            (None, rest)
        } else if let Some(rest) = url.strip_prefix("s3:") {
            let (scheme, after) = rest.split_once("://").ok_or_else(|| {
                format!("repository URL {url:?} is not s3://BUCKET/PREFIX or s3:http://HOST:PORT/BUCKET/PREFIX")
            })?;
            if scheme != "http" && scheme != "https" {
                return Err(format!(
                    "repository URL {url:?}: the endpoint scheme must be http or https"
                ));
            }
            let (host, path) = after.split_once('/').unwrap_or((after, ""));
            (Some(format!("{scheme}://{host}")), path)
        } else {
            return Err(format!("{url:?} is not an S3 URL (s3://BUCKET/PREFIX)"));
        };
        let rest = rest.trim_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!(
                "repository URL {url:?} names no bucket: use s3://BUCKET/PREFIX"
            ));
        }
        let valid_bucket = bucket.len() >= 3
            && bucket.len() <= 63
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !valid_bucket {
            return Err(format!(
                "{bucket:?} is not a valid bucket name (3 to 63 lower-case letters, digits, '-' and '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|_| {
                format!("repository prefix {prefix:?} may only use lower-case letters, digits, '.', '_', '-' and '/'")
            })?;
        }
        let path_style = endpoint.as_ref().map(|_| true);
        Ok(S3Options {
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            endpoint,
            region: None,
            path_style,
            credentials: None,
            connections: 8,
            request_timeout: Duration::from_secs(30),
            min_throughput: 1 << 20,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
        })
    }
}

/// What the store was found to support when the backend connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `If-None-Match: *` on a put is enforced (a second put is refused).
    pub conditional_writes: bool,
    /// Bucket versioning is enabled (deletes then keep old versions, so
    /// prune frees no space until a lifecycle rule expires them).
    pub versioning: Option<bool>,
    /// The bucket has Object Lock enabled.
    pub object_lock: Option<bool>,
}

/// A [`Backend`] storing objects in an S3 bucket under a prefix.
pub struct S3Backend {
    client: Client,
    /// Always `Some` until drop, which shuts it down without blocking (a
    /// backend may be dropped inside someone else's async context).
    runtime: Option<tokio::runtime::Runtime>,
    opts: S3Options,
    caps: Capabilities,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend")
            .field("location", &self.location())
            .field("caps", &self.caps)
            .finish()
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How an S3 call failed, before it becomes a [`BackendError`].
#[derive(Debug)]
enum Failure {
    NotFound,
    PreconditionFailed,
    InvalidRange,
    Other(BackendError),
}

impl S3Backend {
    /// Connects to the bucket and probes what the store supports. Fails with
    /// a clear error if the bucket does not exist or the credentials are
    /// refused.
    pub fn connect(opts: S3Options) -> Result<S3Backend, BackendError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lifeboat-s3")
            .enable_all()
            .build()
            .map_err(|e| BackendError::Permanent {
                key: String::new(),
                message: format!("cannot start the S3 client runtime: {e}"),
            })?;
        let client = runtime.block_on(make_client(&opts));
        let mut backend = S3Backend {
            client,
            runtime: Some(runtime),
            opts,
            caps: Capabilities {
                conditional_writes: false,
                versioning: None,
                object_lock: None,
            },
        };
        backend.caps = backend.probe()?;
        log::info!(
            "{}: conditional writes {}, versioning {:?}, object lock {:?}",
            backend.location(),
            if backend.caps.conditional_writes {
                "enforced"
            } else {
                "NOT enforced (falling back to check-then-put)"
            },
            backend.caps.versioning,
            backend.caps.object_lock
        );
        Ok(backend)
    }

    /// What the store was found to support.
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Creates the bucket if it does not exist yet (for `init`).
    /// With `object_lock`, a new bucket is created with Object Lock (and so
    /// versioning) enabled; an existing bucket is left as it is.
    pub fn create_bucket(opts: &S3Options, object_lock: bool) -> Result<bool, BackendError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BackendError::Permanent {
                key: String::new(),
                message: format!("cannot start the S3 client runtime: {e}"),
            })?;
        runtime.block_on(async {
            let client = make_client(opts).await;
            if client
                .head_bucket()
                .bucket(&opts.bucket)
                .send()
                .await
                .is_ok()
            {
                return Ok(false);
            }
            let mut req = client.create_bucket().bucket(&opts.bucket);
            if object_lock {
                req = req.object_lock_enabled_for_bucket(true);
            }
            let region = client.config().region().map(|r| r.as_ref().to_string());
            if let Some(region) = region.filter(|r| r != "us-east-1" && opts.endpoint.is_none()) {
                req = req.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(region.as_str().into())
                        .build(),
                );
            }
            match req.send().await {
                Ok(_) => Ok(true),
                Err(e) => {
                    let code = e.code().unwrap_or_default().to_string();
                    if code == "BucketAlreadyOwnedByYou" {
                        Ok(false)
                    } else {
                        Err(to_backend_error(&opts.bucket, "create bucket", e))
                    }
                }
            }
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.opts.prefix)
    }

    /// The deadline for a request moving `bytes` bytes.
    fn deadline(&self, bytes: usize) -> Duration {
        self.opts.request_timeout
            + Duration::from_secs_f64(bytes as f64 / self.opts.min_throughput.max(1) as f64)
    }

    /// Runs one request under its deadline on the backend's runtime.
    fn run<T>(
        &self,
        key: &str,
        bytes: usize,
        fut: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let deadline = self.deadline(bytes);
        let runtime = self.runtime.as_ref().expect("runtime lives until drop");
        runtime.block_on(async {
            match tokio::time::timeout(deadline, fut).await {
                Ok(result) => result,
                Err(_) => Err(Failure::Other(BackendError::Temporary {
                    key: key.to_string(),
                    message: format!(
                        "no answer from {} within {:.0} s",
                        self.location(),
                        deadline.as_secs_f64()
                    ),
                })),
            }
        })
    }

    /// Reads the store's answers to a few questions. The conditional-write
    /// probe writes `probe/<random>` twice; a store that refuses the second
    /// write enforces `If-None-Match`.
    fn probe(&self) -> Result<Capabilities, BackendError> {
        let bucket = &self.opts.bucket;
        let key = format!("probe/{}", hex::encode(rand::random::<[u8; 12]>()));
        let full = self.full_key(&key);
        let put = |body: &'static [u8]| {
            self.run(&key, 0, async {
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(&full)
                    .if_none_match("*")
                    .body(ByteStream::from_static(body))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(&key, "put", e))
            })
        };
        let first = put(b"first");
        match first {
            Ok(()) => {}
            Err(Failure::Other(e)) => return Err(explain_connect_error(self, e)),
            Err(_) => {
                return Err(BackendError::Permanent {
                    key: key.clone(),
                    message: "unexpected answer to the first probe write".to_string(),
                })
            }
        }
        let conditional_writes = match put(b"second") {
            Err(Failure::PreconditionFailed) => true,
            Ok(()) => false,
            Err(Failure::Other(e)) => return Err(e),
            Err(_) => false,
        };
        let versioning = self
            .run(&key, 0, async {
                self.client
                    .get_bucket_versioning()
                    .bucket(bucket)
                    .send()
                    .await
                    .map_err(|e| classify(bucket, "versioning", e))
            })
            .map_err(|e| log::debug!("cannot read the bucket's versioning: {e:?}"))
            .ok()
            .map(|v| {
                matches!(
                    v.status(),
                    Some(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                )
            });
        let object_lock = match self.run(&key, 0, async {
            self.client
                .get_object_lock_configuration()
                .bucket(bucket)
                .send()
                .await
                .map_err(|e| classify(bucket, "object lock", e))
        }) {
            Ok(c) => Some(
                c.object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    .is_some_and(|e| e.as_str() == "Enabled"),
            ),
            Err(Failure::NotFound) => Some(false),
            Err(_) => None,
        };
        // A write-only host may not delete; prune's sweep removes what it
        // leaves (every version of it, in a versioned bucket).
        let versioned = versioning == Some(true) || object_lock == Some(true);
        if let Err(e) = self.delete_key(&key, versioned) {
            log::debug!("could not delete probe object {key}: {e}");
        }
        Ok(Capabilities {
            conditional_writes,
            versioning,
            object_lock,
        })
    }

    fn put_single(
        &self,
        key: &str,
        full: &str,
        data: Bytes,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome, Failure> {
        let len = data.len();
        // S3 requires Content-MD5 (or a checksum) on puts with a retention.
        let md5 = retention.map(|_| {
            use base64::Engine;
            use md5::Digest;
            base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&data))
        });
        self.run(key, len, async {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(full)
                .content_length(len as i64)
                .body(ByteStream::from(data));
            if self.caps.conditional_writes {
                req = req.if_none_match("*");
            }
            if let (Some(r), Some(md5)) = (retention, md5) {
                req = req
                    .content_md5(md5)
                    .object_lock_mode(match r.mode {
                        LockMode::Governance => aws_sdk_s3::types::ObjectLockMode::Governance,
                        LockMode::Compliance => aws_sdk_s3::types::ObjectLockMode::Compliance,
                    })
                    .object_lock_retain_until_date(s3_time(r.until));
            }
            req.send()
                .await
                .map(|_| PutOutcome::Created)
                .map_err(|e| classify(key, "put", e))
        })
    }

    fn put_multipart(&self, key: &str, full: &str, data: Bytes) -> Result<PutOutcome, Failure> {
        let bucket = &self.opts.bucket;
        let created = self.run(key, 0, async {
            self.client
                .create_multipart_upload()
                .bucket(bucket)
                .key(full)
                .send()
                .await
                .map_err(|e| classify(key, "create multipart upload", e))
        })?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                Failure::Other(BackendError::Temporary {
                    key: key.to_string(),
                    message: "the store returned no multipart upload ID".to_string(),
                })
            })?
            .to_string();
        let result = self.upload_parts_and_complete(key, full, &upload_id, data);
        if result.is_err() {
            // Best effort: a failed abort leaves an upload that prune's
            // stale-upload sweep removes later.
            let _ = self.run(key, 0, async {
                self.client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .send()
                    .await
                    .map_err(|e| classify(key, "abort multipart upload", e))
            });
        }
        result
    }

    fn upload_parts_and_complete(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: Bytes,
    ) -> Result<PutOutcome, Failure> {
        let part_size = self.opts.part_size.max(5 << 20);
        let parallel = self.opts.connections.clamp(1, 4);
        let total = data.len();
        let parts: Vec<(i32, Bytes)> = (0..total.div_ceil(part_size))
            .map(|i| {
                let start = i * part_size;
                let end = (start + part_size).min(total);
                (i as i32 + 1, data.slice(start..end))
            })
            .collect();
        let completed = self.run(key, total, async {
            let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
            let mut tasks = tokio::task::JoinSet::new();
            for (number, body) in parts {
                let client = self.client.clone();
                let bucket = self.opts.bucket.clone();
                let full = full.to_string();
                let upload_id = upload_id.to_string();
                let key = key.to_string();
                let limit = limit.clone();
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let out = client
                        .upload_part()
                        .bucket(bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(body.len() as i64)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| classify(&key, "upload part", e))?;
                    Ok::<_, Failure>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .build(),
                    )
                });
            }
            let mut done = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(Ok(part)) => done.push(part),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => {
                        return Err(Failure::Other(BackendError::Temporary {
                            key: key.to_string(),
                            message: format!("part upload task failed: {e}"),
                        }))
                    }
                }
            }
            done.sort_by_key(|p| p.part_number());
            Ok(done)
        })?;
        self.run(key, 0, async {
            let mut req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.opts.bucket)
                .key(full)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(completed))
                        .build(),
                );
            if self.caps.conditional_writes {
                req = req.if_none_match("*");
            }
            match req.send().await {
                Ok(_) => Ok(PutOutcome::Created),
                // Some stores (moto) answer 200 with a response body the
                // SDK cannot parse. The upload completed if the object is
                // there with the right size.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => {
                    let head = self
                        .client
                        .head_object()
                        .bucket(&self.opts.bucket)
                        .key(full)
                        .send()
                        .await
                        .map_err(|e| classify(key, "stat after multipart upload", e))?;
                    if head.content_length() == Some(total as i64) {
                        Ok(PutOutcome::Created)
                    } else {
                        Err(classify(key, "complete multipart upload", e))
                    }
                }
                Err(e) => Err(classify(key, "complete multipart upload", e)),
            }
        })
    }

    fn head(&self, key: &str) -> Result<ObjectInfo, Failure> {
        let full = self.full_key(key);
        let out = self.run(key, 0, async {
            self.client
                .head_object()
                .bucket(&self.opts.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| classify(key, "stat", e))
        })?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            modified: out
                .last_modified()
                .and_then(|t| SystemTime::try_from(*t).ok())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }
}

async fn make_client(opts: &S3Options) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &opts.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(c) = &opts.credentials {
        loader = loader.credentials_provider(Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            None,
            None,
            "lifeboat",
        ));
    }
    let shared = loader.load().await;
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .build(),
        )
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .force_path_style(opts.path_style.unwrap_or(opts.endpoint.is_some()));
    if shared.region().is_none() {
        conf = conf.region(Region::new("us-east-1"));
    }
    if let Some(endpoint) = &opts.endpoint {
        conf = conf.endpoint_url(endpoint);
    }
    Client::from_conf(conf.build())
}

/// Sorts an SDK error into what the backend contract distinguishes.
fn classify<E>(key: &str, op: &str, err: SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().unwrap_or_default().to_string();
    match (status, code.as_str()) {
        (Some(404), "NoSuchBucket") => Failure::Other(to_backend_error(key, op, err)),
        (Some(404), _) | (_, "NoSuchKey") | (_, "NotFound") => Failure::NotFound,
        (Some(412), _) | (_, "PreconditionFailed") => Failure::PreconditionFailed,
        (Some(416), _) | (_, "InvalidRange") => Failure::InvalidRange,
        _ => Failure::Other(to_backend_error(key, op, err)),
    }
}

/// Turns an SDK error into a [`BackendError`], temporary when retrying may help.
fn to_backend_error<E>(key: &str, op: &str, err: SdkError<E>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().unwrap_or_default().to_string();
    let temporary = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            matches!(status, Some(408 | 409 | 429 | 500..=599))
                || matches!(
                    code.as_str(),
                    "RequestTimeout"
                        | "SlowDown"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "ConditionalRequestConflict"
                )
        }
        _ => false,
    };
    let hint = match (status, code.as_str()) {
        (_, "NoSuchBucket") => {
            " (the bucket does not exist: create it, or let `lifeboat init` create it)"
        }
        (Some(403), _) | (_, "AccessDenied") | (_, "InvalidAccessKeyId") => {
            " (access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile, and the bucket policy)"
        }
        (Some(301), _) | (_, "PermanentRedirect") | (_, "AuthorizationHeaderMalformed") => {
            " (wrong region: set AWS_REGION to the bucket's region)"
        }
        _ => "",
    };
    let message = format!("{op} failed: {}{hint}", DisplayErrorContext(&err));
    if temporary {
        BackendError::Temporary {
            key: key.to_string(),
            message,
        }
    } else {
        BackendError::Permanent {
            key: key.to_string(),
            message,
        }
    }
}

/// Rewrites the first failure of a new connection so that it says where.
fn explain_connect_error(backend: &S3Backend, e: BackendError) -> BackendError {
    let location = backend.location();
    match e {
        BackendError::Temporary { key, message } => BackendError::Temporary {
            key,
            message: format!("cannot reach {location}: {message}"),
        },
        BackendError::Permanent { key, message } => BackendError::Permanent {
            key,
            message: format!("{location}: {message}"),
        },
        other => other,
    }
}

fn unexpected(key: &str, what: &str) -> BackendError {
    BackendError::Temporary {
        key: key.to_string(),
        message: format!("unexpected answer from the store: {what}"),
    }
}

/// An S3 timestamp, whole seconds.
fn s3_time(t: chrono::DateTime<chrono::Utc>) -> aws_sdk_s3::primitives::DateTime {
    aws_sdk_s3::primitives::DateTime::from_secs(t.timestamp())
}

impl Backend for S3Backend {
    fn put(&self, key: &str, data: &[u8]) -> Result<PutOutcome, BackendError> {
        self.put_shared(key, Bytes::copy_from_slice(data), None)
    }

    /// The request body shares the caller's bytes instead of copying them.
    fn put_shared(
        &self,
        key: &str,
        data: Bytes,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome, BackendError> {
        if retention.is_some() && !self.object_lock() {
            return Err(super::no_object_lock(key, &self.location()));
        }
        self.put_with(key, data, retention)
    }

    fn object_lock(&self) -> bool {
        self.caps.object_lock == Some(true)
    }

    fn put_retained(
        &self,
        key: &str,
        data: &[u8],
        retention: &Retention,
    ) -> Result<PutOutcome, BackendError> {
        self.put_shared(key, Bytes::copy_from_slice(data), Some(retention))
    }

    fn extend_retention(&self, key: &str, retention: &Retention) -> Result<(), BackendError> {
        validate_key(key)?;
        let full = self.full_key(key);
        let mode = match retention.mode {
            LockMode::Governance => aws_sdk_s3::types::ObjectLockRetentionMode::Governance,
            LockMode::Compliance => aws_sdk_s3::types::ObjectLockRetentionMode::Compliance,
        };
        let result = self.run(key, 0, async {
            self.client
                .put_object_retention()
                .bucket(&self.opts.bucket)
                .key(&full)
                .retention(
                    aws_sdk_s3::types::ObjectLockRetention::builder()
                        .mode(mode)
                        .retain_until_date(s3_time(retention.until))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(key, "extend retention", e))
        });
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::NotFound) => Err(BackendError::NotFound {
                key: key.to_string(),
            }),
            Err(_) => Err(unexpected(key, "extend retention")),
        }
    }

    fn put_replacing(&self, key: &str, data: &[u8]) -> Result<(), BackendError> {
        validate_key(key)?;
        let full = self.full_key(key);
        let md5 = {
            use base64::Engine;
            use md5::Digest;
            base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
        };
        let body = Bytes::copy_from_slice(data);
        let result = self.run(key, data.len(), async {
            self.client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(&full)
                .content_length(body.len() as i64)
                .content_md5(md5)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(key, "put", e))
        });
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Other(e)) => Err(e),
            Err(_) => Err(unexpected(key, "put")),
        }
    }

    fn retained_until(&self, key: &str) -> Result<super::Retained, BackendError> {
        if !self.object_lock() {
            return Ok(super::Retained::Unknown);
        }
        validate_key(key)?;
        let full = self.full_key(key);
        // HEAD gives the retention as GetObjectRetention does (and moto,
        // which answers GetObjectRetention with a 500, gives it too).
        let result = self.run(key, 0, async {
            self.client
                .head_object()
                .bucket(&self.opts.bucket)
                .key(&full)
                .send()
                .await
                .map(|o| {
                    o.object_lock_retain_until_date()
                        .and_then(|d| chrono::DateTime::from_timestamp(d.secs(), 0))
                })
                .map_err(|e| classify(key, "read retention", e))
        });
        match result {
            Ok(Some(until)) if until > chrono::Utc::now() => Ok(super::Retained::Until(until)),
            Ok(_) => Ok(super::Retained::No),
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::NotFound) => Err(BackendError::NotFound {
                key: key.to_string(),
            }),
            Err(_) => Err(unexpected(key, "read retention")),
        }
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Vec<u8>, BackendError> {
        validate_key(key)?;
        if let Some(r) = &range {
            if r.start >= r.end {
                self.stat(key)?;
                return Ok(Vec::new());
            }
        }
        let full = self.full_key(key);
        let expected = range.as_ref().map(|r| (r.end - r.start) as usize);
        let result = self.run(key, expected.unwrap_or(8 << 20), async {
            let mut req = self
                .client
                .get_object()
                .bucket(&self.opts.bucket)
                .key(&full);
            if let Some(r) = &range {
                req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
            }
            let out = req.send().await.map_err(|e| classify(key, "get", e))?;
            let announced = out.content_length();
            let body = out.body.collect().await.map_err(|e| {
                Failure::Other(BackendError::Temporary {
                    key: key.to_string(),
                    message: format!("reading the object failed: {e}"),
                })
            })?;
            let bytes = body.into_bytes();
            if let Some(n) = announced {
                if n >= 0 && bytes.len() as u64 != n as u64 {
                    return Err(Failure::Other(BackendError::Temporary {
                        key: key.to_string(),
                        message: format!("the connection delivered {} of {n} bytes", bytes.len()),
                    }));
                }
            }
            Ok(bytes.to_vec())
        });
        match result {
            Ok(data) => Ok(data),
            Err(Failure::NotFound) => Err(BackendError::NotFound {
                key: key.to_string(),
            }),
            // A range starting at or past the end: empty, if the object exists.
            Err(Failure::InvalidRange) => {
                self.stat(key)?;
                Ok(Vec::new())
            }
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::PreconditionFailed) => Err(unexpected(key, "412 to a get")),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BackendError> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // Bounded: a listing of a billion objects is not a repository.
        for _ in 0..1_000_000 {
            let page = self
                .run(prefix, 0, async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.opts.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| classify(prefix, "list", e))
                })
                .map_err(|f| match f {
                    Failure::Other(e) => e,
                    _ => unexpected(prefix, "to a listing"),
                })?;
            for obj in page.contents() {
                let Some(full) = obj.key() else { continue };
                let Some(key) = full.strip_prefix(&self.opts.prefix) else {
                    continue;
                };
                if validate_key(key).is_err() {
                    continue;
                }
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    modified: obj
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return Ok(out),
            }
        }
        Err(BackendError::Permanent {
            key: prefix.to_string(),
            message: "listing did not end after a million pages".to_string(),
        })
    }

    /// In a versioned bucket (every bucket with Object Lock is one) a plain
    /// DELETE only hides the object behind a delete marker: no space is
    /// freed, and a locked object would seem deleted. There every version
    /// is deleted by its ID instead, which frees the space and which the
    /// store refuses, loudly, for a locked version.
    fn delete(&self, key: &str) -> Result<(), BackendError> {
        // Object Lock needs versioning (and moto answers the versioning
        // query in XML the SDK cannot parse, so that alone may be unknown).
        let versioned = self.caps.versioning == Some(true) || self.caps.object_lock == Some(true);
        self.delete_key(key, versioned)
    }

    fn stat(&self, key: &str) -> Result<ObjectInfo, BackendError> {
        validate_key(key)?;
        match self.head(key) {
            Ok(info) => Ok(info),
            Err(Failure::NotFound) => Err(BackendError::NotFound {
                key: key.to_string(),
            }),
            Err(Failure::Other(e)) => Err(e),
            Err(_) => Err(unexpected(key, "to a stat")),
        }
    }

    fn location(&self) -> String {
        let prefix = self.opts.prefix.trim_end_matches('/');
        let slash = if prefix.is_empty() { "" } else { "/" };
        match &self.opts.endpoint {
            Some(endpoint) => format!("s3://{}{slash}{prefix} at {endpoint}", self.opts.bucket),
            None => format!("s3://{}{slash}{prefix}", self.opts.bucket),
        }
    }

    fn concurrency(&self) -> usize {
        self.opts.connections.max(1)
    }

    fn exclusive_create(&self) -> bool {
        self.caps.conditional_writes
    }

    /// Aborts multipart uploads under the repository's prefix that were
    /// started longer ago than `older_than` (a crashed backup's leftovers),
    /// and removes capability probe objects as old (a host without delete
    /// permission cannot remove its own).
    fn remove_stale_temp_files(
        &self,
        older_than: Duration,
        now: SystemTime,
    ) -> Result<usize, BackendError> {
        let cutoff = now
            .checked_sub(older_than)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut stale = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        for _ in 0..100_000 {
            let page = self
                .run("", 0, async {
                    self.client
                        .list_multipart_uploads()
                        .bucket(&self.opts.bucket)
                        .prefix(&self.opts.prefix)
                        .set_key_marker(markers.0.clone())
                        .set_upload_id_marker(markers.1.clone())
                        .send()
                        .await
                        .map_err(|e| classify("", "list multipart uploads", e))
                })
                .map_err(|f| match f {
                    Failure::Other(e) => e,
                    _ => unexpected("", "to a multipart listing"),
                })?;
            for upload in page.uploads() {
                let initiated = upload
                    .initiated()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(now);
                if initiated <= cutoff {
                    if let (Some(k), Some(id)) = (upload.key(), upload.upload_id()) {
                        stale.push((k.to_string(), id.to_string()));
                    }
                }
            }
            if page.is_truncated() == Some(true) {
                markers = (
                    page.next_key_marker().map(str::to_string),
                    page.next_upload_id_marker().map(str::to_string),
                );
            } else {
                break;
            }
        }
        let mut removed = 0;
        for (full, upload_id) in stale {
            let result = self.run(&full, 0, async {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.opts.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .send()
                    .await
                    .map_err(|e| classify(&full, "abort multipart upload", e))
            });
            match result {
                Ok(_) | Err(Failure::NotFound) => removed += 1,
                Err(Failure::Other(e)) => return Err(e),
                Err(_) => return Err(unexpected(&full, "to an abort")),
            }
        }
        // Capability probes a host without delete permission (a write-only
        // backup host) had to leave behind.
        for probe in self.list("probe/")? {
            if now.duration_since(probe.modified).unwrap_or_default() >= older_than {
                match self.delete(&probe.key) {
                    Ok(()) => removed += 1,
                    Err(e) => log::warn!("could not remove probe object {}: {e}", probe.key),
                }
            }
        }
        Ok(removed)
    }
}

impl S3Backend {
    /// Deletes a key; in a versioned bucket, every version of it by ID.
    fn delete_key(&self, key: &str, versioned: bool) -> Result<(), BackendError> {
        validate_key(key)?;
        let full = self.full_key(key);
        let versions = if versioned {
            self.versions_of(key, &full)?
        } else {
            vec![None]
        };
        for version in versions {
            let result = self.run(key, 0, async {
                self.client
                    .delete_object()
                    .bucket(&self.opts.bucket)
                    .key(&full)
                    .set_version_id(version)
                    .send()
                    .await
                    .map_err(|e| classify(key, "delete", e))
            });
            match result {
                Ok(_) | Err(Failure::NotFound) => {}
                Err(Failure::Other(e)) => return Err(e),
                Err(_) => return Err(unexpected(key, "to a delete")),
            }
        }
        Ok(())
    }

    /// The version IDs of every version and delete marker of one key.
    fn versions_of(&self, key: &str, full: &str) -> Result<Vec<Option<String>>, BackendError> {
        let listed = self.run(key, 0, async {
            self.client
                .list_object_versions()
                .bucket(&self.opts.bucket)
                .prefix(full)
                .send()
                .await
                .map_err(|e| classify(key, "list versions", e))
        });
        let page = match listed {
            Ok(page) => page,
            Err(Failure::NotFound) => return Ok(Vec::new()),
            Err(Failure::Other(e)) => return Err(e),
            Err(_) => return Err(unexpected(key, "to a version listing")),
        };
        let versions = page
            .versions()
            .iter()
            .filter(|v| v.key() == Some(full))
            .map(|v| v.version_id().map(str::to_string));
        let markers = page
            .delete_markers()
            .iter()
            .filter(|m| m.key() == Some(full))
            .map(|m| m.version_id().map(str::to_string));
        Ok(versions.chain(markers).collect())
    }

    /// A put, with a retention or without. Retained objects always go up
    /// in one request: S3 wants a Content-MD5 per part otherwise, and
    /// retained objects (packs, index objects, snapshots) are small.
    fn put_with(
        &self,
        key: &str,
        body: Bytes,
        retention: Option<&Retention>,
    ) -> Result<PutOutcome, BackendError> {
        validate_key(key)?;
        let full = self.full_key(key);
        if !self.caps.conditional_writes {
            match self.head(key) {
                Ok(_) => return Ok(PutOutcome::AlreadyExists),
                Err(Failure::NotFound) => {}
                Err(Failure::Other(e)) => return Err(e),
                Err(_) => return Err(unexpected(key, "stat before put")),
            }
        }
        let result = if body.len() > self.opts.multipart_threshold && retention.is_none() {
            self.put_multipart(key, &full, body)
        } else {
            self.put_single(key, &full, body, retention)
        };
        match result {
            Ok(outcome) => Ok(outcome),
            Err(Failure::PreconditionFailed) => Ok(PutOutcome::AlreadyExists),
            Err(Failure::Other(e)) => Err(e),
            Err(Failure::NotFound) => Err(BackendError::Permanent {
                key: key.to_string(),
                message: format!("{} answered 404 to a put", self.location()),
            }),
            Err(Failure::InvalidRange) => Err(unexpected(key, "416 to a put")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_prefix_and_endpoint() {
        let o = S3Options::from_url("s3://backups/hosts/web1").unwrap();
        assert_eq!(
            (o.bucket.as_str(), o.prefix.as_str(), o.endpoint),
            ("backups", "hosts/web1/", None)
        );
        let o = S3Options::from_url("s3://backups").unwrap();
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("backups", ""));
        let o = S3Options::from_url("s3:http://127.0.0.1:3900/bucket/repo").unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("bucket", "repo/"));
        assert_eq!(o.path_style, Some(true));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("s3://", "names no bucket"),
            ("s3://Bad_Bucket/x", "not a valid bucket name"),
            ("s3://bucket/Upper", "prefix"),
            ("s3:ftp://host/bucket", "http or https"),
            ("/tmp/repo", "not an S3 URL"),
        ] {
            let err = S3Options::from_url(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn credentials_never_print_the_secret() {
        let c = S3Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG".into(),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKIDEXAMPLE") && !shown.contains("wJalr"));
    }
}
