//! Where registered images live (IMAGE_STORE). Unset (the default, as before): with their
//! record, in the database (`face_images` of SQLite, MongoDB or PostgreSQL, written in one go
//! with the record). Set: as objects, one per record at `PREFIX/<record id>`, in S3-compatible
//! storage (`s3://BUCKET/PREFIX`: AWS S3, MinIO, Supabase Storage, moto) or in a folder
//! (`file:///DIR`), through the `object_store` crate; the database then holds the record only.
//!
//! The order of the two writes, so that nothing is half-written, is the service's
//! (`service::faces`): register uploads the object, then inserts the row (and deletes the
//! object when the insert fails); delete removes the row, then the object (a failed object
//! delete is logged and counted, never leaves a row pointing at nothing).

mod objects;

use std::path::PathBuf;
use std::time::Duration;

pub use objects::ImageObjects;

/// IMAGE_STORE's settings, flattened into `ServeConfig`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageStoreConfig {
    /// Where registered images are kept: unset, in the database with their record;
    /// `s3://BUCKET/PREFIX` (S3-compatible storage: endpoint, region and keys from AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true for a plain-http
    /// endpoint); `file:///DIR` (a folder).
    #[arg(long, env = "IMAGE_STORE")]
    pub image_store: Option<String>,

    /// Bound of one image-store operation, its retries included.
    #[arg(long, env = "IMAGE_STORE_TIMEOUT", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub image_store_timeout: Duration,

    /// With an S3 image store: `GET /api/face/{id}/image` answers 307 to a presigned URL of the
    /// object, valid this long (at most 7 days), instead of the bytes. Unset: facerec serves them.
    #[arg(long, env = "IMAGE_PRESIGN", value_parser = crate::config::parse_lifetime)]
    pub image_presign: Option<Duration>,
}

impl ImageStoreConfig {
    /// IMAGE_STORE parsed; `None` when unset or empty (images in the database).
    pub fn location(&self) -> Result<Option<ImageLocation>, String> {
        match self.image_store.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some),
        }
    }

    /// The image store, checked (its bucket or folder listed once): `None` when IMAGE_STORE is
    /// unset. A missing bucket, refused credentials or an unreachable endpoint is an error
    /// that says so.
    pub async fn open(&self) -> Result<Option<ImageObjects>, String> {
        let Some(location) = self.location()? else {
            return match self.image_presign {
                Some(_) => Err("IMAGE_PRESIGN is set but IMAGE_STORE is not: presigned URLs need an S3 image store".into()),
                None => Ok(None),
            };
        };
        if self.image_presign.is_some_and(|t| t > Duration::from_secs(7 * 86_400)) {
            return Err("IMAGE_PRESIGN is over 7 days, the longest an S3 presigned URL can last".into());
        }
        let images = ImageObjects::open(&location, self.image_store_timeout, self.image_presign)?;
        images.probe().await?;
        tracing::info!(images = %images.describe(), "registered images kept in the image store");
        Ok(Some(images))
    }
}

/// A parsed IMAGE_STORE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// `s3://bucket/prefix` (the prefix may be empty).
    S3 { bucket: String, prefix: String },
    /// `file:///absolute/folder`.
    Folder(PathBuf),
}

impl std::str::FromStr for ImageLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("IMAGE_STORE '{s}': {why}; expected s3://BUCKET/PREFIX or file:///FOLDER");
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            let valid = bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid {
                return Err(bad("a bucket name has lower-case letters, digits, '-' and '.' only"));
            }
            let prefix = prefix.split('/').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("/");
            return Ok(ImageLocation::S3 { bucket: bucket.to_owned(), prefix });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a folder is an absolute path (file:///srv/faces)"));
            }
            return Ok(ImageLocation::Folder(PathBuf::from(path)));
        }
        Err(bad("unknown scheme"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let s3 = |b: &str, p: &str| ImageLocation::S3 { bucket: b.into(), prefix: p.into() };
        assert_eq!("s3://faces".parse(), Ok(s3("faces", "")));
        assert_eq!("s3://faces/".parse(), Ok(s3("faces", "")));
        assert_eq!("s3://faces/reg/2026/".parse(), Ok(s3("faces", "reg/2026")));
        assert_eq!("s3://my.bucket-1//a//b".parse(), Ok(s3("my.bucket-1", "a/b")));
        assert_eq!("file:///srv/faces".parse(), Ok(ImageLocation::Folder("/srv/faces".into())));
        for bad in ["s3://", "s3:///x", "s3://Faces/x", "file://rel/dir", "gs://b/p", "faces"] {
            let e = bad.parse::<ImageLocation>().expect_err(bad);
            assert!(e.contains("IMAGE_STORE") && e.contains("s3://BUCKET/PREFIX"), "{e}");
        }
    }

    #[test]
    fn unset_or_empty_is_the_database() {
        let cfg = |v: Option<&str>| ImageStoreConfig {
            image_store: v.map(str::to_owned),
            image_store_timeout: Duration::from_secs(1),
            image_presign: None,
        };
        assert_eq!(cfg(None).location(), Ok(None));
        assert_eq!(cfg(Some(" ")).location(), Ok(None));
        assert!(cfg(Some("nope")).location().is_err());
    }
}
