//! The gallery built from the store at start.

use super::recognition::looks_like_unknown;
use crate::gallery::Gallery;
use crate::store::{FaceStore, LoadedUsers, StoreError, UserRecord};

/// The gallery of every enrolled user in `store`, built on a blocking thread from the batches
/// the store streams while it still reads; and the load's counts.
pub async fn gallery(store: &dyn FaceStore, model_id: &str, dim: usize) -> Result<(Gallery, LoadedUsers), StoreError> {
    let (sink, batches) = std::sync::mpsc::sync_channel::<Vec<UserRecord>>(4);
    let build = tokio::task::spawn_blocking(move || {
        let users = batches.into_iter().flatten().filter(|u| !u.embedding.is_empty());
        // New users cannot be named so (POST /users refuses it), but a store written by another tool may hold one.
        let users = users.inspect(|u| {
            if looks_like_unknown(&u.username) {
                tracing::warn!(user = %u.username, "a user is named like an unknown face (`Unknown <n>`): /recognize answers naming them look like unknown faces; rename the user");
            }
        });
        Gallery::from_entries(dim, users.map(|u| (u.username, u.embedding)))
    });
    let loaded = store.stream_users(model_id, sink).await?;
    let gallery = build.await.map_err(|e| StoreError::Internal(format!("building the gallery: {e}")))?;
    Ok((gallery, loaded))
}
