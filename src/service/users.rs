//! Users of the original contract: create, list, delete. A write reaches the store first, the
//! gallery after, under the write lock.

use super::Service;
use crate::error::ApiError;
use crate::store::{UserRecord, UserSummary};

impl Service {
    /// A new user with no template (`user_exists` when the name is taken). The name is checked
    /// by the caller.
    pub async fn create_user(&self, username: &str) -> Result<UserRecord, ApiError> {
        let _w = self.writes.lock().await;
        Ok(self.store.create_user(username).await?)
    }

    /// Users sorted by name, without vectors.
    pub async fn list_users(&self) -> Result<Vec<UserSummary>, ApiError> {
        Ok(self.store.list_users().await?)
    }

    /// Gone from the store and from recognition (`user_not_found` when absent).
    pub async fn delete_user(&self, username: &str) -> Result<(), ApiError> {
        let _w = self.writes.lock().await;
        self.store.delete_user(username).await?;
        self.gallery.remove(username);
        Ok(())
    }
}
