//! Registered images as objects, one per record at `PREFIX/<record id>`, in any store the
//! `object_store` crate reaches: S3-compatible storage or a local folder (or, in tests, memory).
//! Every operation is bounded by the image store's timeout, retries included; a failure is
//! `StoreError::Unavailable` naming the image store (nothing was changed by this call).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::{Method, Signer};
use object_store::{Attribute, Attributes, ClientConfigKey, ObjectStore, ObjectStoreExt, PutOptions, PutPayload, RetryConfig};

use super::ImageLocation;
use crate::store::StoreError;
use crate::store::faces::StoredImage;

/// An image store: where, and how long one operation may take.
#[derive(Debug, Clone)]
pub struct ImageObjects {
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// `s3://bucket/prefix` or `file:///dir`, for messages.
    describe: String,
    timeout: Duration,
    /// The backend keeps a Content-Type with each object (S3 does; a folder does not).
    content_types: bool,
    /// S3's URL signer and how long a presigned URL lasts (IMAGE_PRESIGN), when set.
    presign: Option<(Arc<dyn Signer>, Duration)>,
}

impl ImageObjects {
    /// The image store at `location` (not yet contacted: see [`ImageObjects::probe`]). S3 takes
    /// endpoint, region and credentials from the usual AWS variables (AWS_ENDPOINT_URL or
    /// AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    /// AWS_ALLOW_HTTP), path-style requests (what MinIO, Supabase and moto expect).
    pub fn open(location: &ImageLocation, timeout: Duration, presign: Option<Duration>) -> Result<ImageObjects, String> {
        if presign.is_some() && !matches!(location, ImageLocation::S3 { .. }) {
            return Err("IMAGE_PRESIGN needs an S3 image store (IMAGE_STORE=s3://BUCKET/PREFIX): a folder cannot sign URLs".into());
        }
        match location {
            ImageLocation::S3 { bucket, prefix } => {
                // TLS through ring (see Cargo.toml); a provider installed already is kept.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let retry = RetryConfig { max_retries: 2, retry_timeout: timeout, ..RetryConfig::default() };
                // Timeouts as config keys: `with_client_options` would drop what from_env read
                // into the client options (AWS_ALLOW_HTTP among them).
                let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), ms(timeout))
                    .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), ms(timeout.min(Duration::from_secs(5))))
                    .with_retry(retry);
                if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
                    // S3-compatible servers mostly ignore it; the signature needs one.
                    builder = builder.with_region("us-east-1");
                }
                let s3 = Arc::new(builder.build().map_err(|e| format!("IMAGE_STORE s3://{bucket}: {e}"))?);
                let describe = format!("s3://{bucket}/{prefix}");
                let mut images = ImageObjects::over(Arc::clone(&s3) as Arc<dyn ObjectStore>, prefix, describe, timeout, true);
                images.presign = presign.map(|ttl| (s3 as Arc<dyn Signer>, ttl));
                Ok(images)
            }
            ImageLocation::Folder(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| format!("IMAGE_STORE: creating {}: {e}", dir.display()))?;
                let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| format!("IMAGE_STORE {}: {e}", dir.display()))?;
                Ok(ImageObjects::over(Arc::new(fs), "", format!("file://{}", dir.display()), timeout, false))
            }
        }
    }

    /// Images in `objects` under `prefix` (tests: an in-memory store).
    pub fn over(objects: Arc<dyn ObjectStore>, prefix: &str, describe: String, timeout: Duration, content_types: bool) -> ImageObjects {
        ImageObjects { objects, prefix: ObjectPath::from(prefix), describe, timeout, content_types, presign: None }
    }

    /// `s3://bucket/prefix` or `file:///dir`.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Where the image of record `id` is kept (the id is one path segment, escaped if need be).
    pub fn key(&self, id: &str) -> ObjectPath {
        self.prefix.clone().join(id)
    }

    /// Lists the prefix once: a missing bucket, refused credentials or an unreachable endpoint is
    /// an error that says so (a HEAD of an absent object cannot tell a missing bucket apart).
    pub async fn probe(&self) -> Result<(), String> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        match tokio::time::timeout(self.timeout, self.objects.list_with_delimiter(prefix)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                Err(format!("IMAGE_STORE {}: listing it failed (is the bucket there, are the credentials right?): {e}", self.describe))
            }
            Err(_) => Err(format!("IMAGE_STORE {}: no answer within {:?} (IMAGE_STORE_TIMEOUT)", self.describe, self.timeout)),
        }
    }

    /// Stores the image of record `id` (replacing one there: ids are fresh UUIDs).
    pub async fn put(&self, id: &str, image: &StoredImage) -> Result<(), StoreError> {
        let mut attributes = Attributes::new();
        if self.content_types {
            attributes.insert(Attribute::ContentType, image.content_type.clone().into());
        }
        let opts = PutOptions { attributes, ..PutOptions::default() };
        let payload = PutPayload::from(image.bytes.clone());
        self.bounded("storing an image", self.objects.put_opts(&self.key(id), payload, opts)).await.map(|_| ())
    }

    /// The image of record `id`; `None` when there is no such object.
    pub async fn get(&self, id: &str) -> Result<Option<StoredImage>, StoreError> {
        let key = self.key(id);
        let read = async {
            let got = self.objects.get(&key).await?;
            let content_type = got.attributes.get(&Attribute::ContentType).map(|v| v.to_string());
            let bytes = got.bytes().await?;
            Ok((bytes, content_type))
        };
        match self.bounded_raw(read).await {
            Ok(Ok((bytes, content_type))) => {
                let content_type = content_type.unwrap_or_else(|| sniffed_type(&bytes).to_owned());
                Ok(Some(StoredImage { bytes: bytes.to_vec(), content_type }))
            }
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(self.unavailable("reading an image", &e)),
            Err(e) => Err(e),
        }
    }

    /// Whether images are answered as presigned URLs (IMAGE_PRESIGN).
    pub fn presigns(&self) -> bool {
        self.presign.is_some()
    }

    /// With IMAGE_PRESIGN: a presigned GET URL of record `id`'s image, when its object is there
    /// (one HEAD; signing itself is local). `None` without IMAGE_PRESIGN or without the object.
    pub async fn presigned(&self, id: &str) -> Result<Option<String>, StoreError> {
        let Some((signer, ttl)) = &self.presign else { return Ok(None) };
        let key = self.key(id);
        match self.bounded_raw(self.objects.head(&key)).await? {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable("looking an image up", &e)),
        }
        match self.bounded_raw(signer.signed_url(Method::GET, &key, *ttl)).await? {
            Ok(url) => Ok(Some(url.to_string())),
            Err(e) => Err(self.unavailable("signing an image's URL", &e)),
        }
    }

    /// Removes the image of record `id`; an absent object is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        match self.bounded_raw(self.objects.delete(&self.key(id))).await? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable("deleting an image", &e)),
        }
    }

    async fn bounded<T>(&self, what: &str, op: impl Future<Output = object_store::Result<T>>) -> Result<T, StoreError> {
        self.bounded_raw(op).await?.map_err(|e| self.unavailable(what, &e))
    }

    async fn bounded_raw<T>(&self, op: impl Future<Output = T>) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .map_err(|_| StoreError::Unavailable(format!("image store {}: no answer within {:?}", self.describe, self.timeout)))
    }

    fn unavailable(&self, what: &str, e: &object_store::Error) -> StoreError {
        StoreError::Unavailable(format!("image store {}: {what}: {e}", self.describe))
    }
}

/// The media type of an image kept without one (a folder).
fn sniffed_type(bytes: &[u8]) -> &'static str {
    use crate::face::image::{ImageKind, sniff};
    match sniff(bytes) {
        Some(ImageKind::Jpeg) => "image/jpeg",
        Some(ImageKind::Png) => "image/png",
        Some(ImageKind::Webp) => "image/webp",
        Some(ImageKind::Bmp) => "image/bmp",
        None => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[u8], content_type: &str) -> StoredImage {
        StoredImage { bytes: bytes.to_vec(), content_type: content_type.into() }
    }

    #[tokio::test]
    async fn put_get_delete_in_memory() {
        let mem = Arc::new(object_store::memory::InMemory::new());
        let images = ImageObjects::over(mem.clone(), "faces/reg", "memory".into(), Duration::from_secs(5), true);
        images.probe().await.expect("an empty store lists");
        let img = image(b"\x89PNG\r\n\x1a\nrest", "image/png");
        images.put("abc", &img).await.expect("put");
        let keys: Vec<String> = mem
            .list_with_delimiter(Some(&"faces/reg".into()))
            .await
            .expect("list")
            .objects
            .iter()
            .map(|o| o.location.to_string())
            .collect();
        assert_eq!(keys, ["faces/reg/abc"]);
        assert_eq!(images.get("abc").await.expect("get"), Some(img));
        assert_eq!(images.get("nope").await.expect("get"), None);
        images.delete("abc").await.expect("delete");
        images.delete("abc").await.expect("deleting what is gone is fine");
        assert_eq!(images.get("abc").await.expect("get"), None);
    }

    #[tokio::test]
    async fn a_folder_keeps_images_and_sniffs_their_type() {
        let dir = std::env::temp_dir().join(format!("facerec-images-{}", uuid::Uuid::new_v4()));
        let location: ImageLocation = format!("file://{}", dir.display()).parse().expect("location");
        let images = ImageObjects::open(&location, Duration::from_secs(5), None).expect("folder");
        images.probe().await.expect("probe");
        let jpeg = image(b"\xff\xd8\xff\xe0rest of it", "image/jpeg");
        images.put("id-1", &jpeg).await.expect("put");
        assert_eq!(std::fs::read(dir.join("id-1")).expect("file"), jpeg.bytes);
        assert_eq!(images.get("id-1").await.expect("get"), Some(jpeg));
        images.delete("id-1").await.expect("delete");
        images.delete("id-1").await.expect("absent");
        assert!(!dir.join("id-1").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_fails_the_probe_with_its_name() {
        // TLS through ring, as `open` installs it (reqwest has no provider of its own here).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let s3 = AmazonS3Builder::new()
            .with_bucket_name("faces")
            .with_region("us-east-1")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(RetryConfig { max_retries: 0, ..RetryConfig::default() })
            .build()
            .expect("builder");
        let images = ImageObjects::over(Arc::new(s3), "p", "s3://faces/p".into(), Duration::from_secs(20), true);
        let e = images.probe().await.expect_err("nothing listens");
        assert!(e.contains("IMAGE_STORE s3://faces/p"), "{e}");
        let e = images.put("x", &image(b"x", "image/jpeg")).await.expect_err("put fails");
        assert!(matches!(&e, StoreError::Unavailable(m) if m.contains("s3://faces/p")), "{e}");
    }
}
