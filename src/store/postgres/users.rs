//! `users` in PostgreSQL: the `FaceStore` use cases; enrolment in a transaction with a row lock.

use std::collections::HashMap;
use std::time::SystemTime;

use tokio_postgres::Row;

use super::super::{
    Change, ChangeFeed, FaceStore, LoadedUsers, StoreError, StoreKind, UserRecord, UserSummary, check_new_embeddings, is_ours, rfc3339,
    weighted_template,
};
use super::{PgStore, is_unique_violation, pg_err, unit_vector};

/// The columns every user query reads, in this order (`embeddings` as `real[]` whatever its
/// stored type: `real[]`, `double precision[]` or `vector`), and a hash of the whole row (the
/// feed's compare).
pub(super) const USER_COLUMNS: &str = "u.username, u.embeddings::real[], coalesce(u.samples, 0)::bigint, u.model_id, \
                                       coalesce(u.updated_at, 'epoch'::timestamptz), md5(u::text)";

/// A user row: the record (with an empty template when it has none) and why its template cannot
/// be used, if it cannot.
pub(super) fn user_of(row: &Row) -> Result<(UserRecord, Result<(), String>), String> {
    let username: Option<String> = row.try_get(0).map_err(|e| e.to_string())?;
    let username = username.ok_or_else(|| "a users row without a username".to_owned())?;
    let stored: Option<Vec<Option<f32>>> = row.try_get(1).map_err(|e| format!("user '{username}': embeddings: {e}"))?;
    let samples: i64 = row.try_get(2).map_err(|e| e.to_string())?;
    let model_id: Option<String> = row.try_get(3).map_err(|e| e.to_string())?;
    let updated_at: SystemTime = row.try_get(4).map_err(|e| e.to_string())?;
    let (embedding, check) = match stored {
        None => (Vec::new(), Ok(())),
        Some(v) if v.is_empty() => (Vec::new(), Ok(())),
        Some(v) => match v.into_iter().collect::<Option<Vec<f32>>>() {
            None => (Vec::new(), Err("embeddings hold NULLs".to_owned())),
            Some(v) => match unit_vector(&v) {
                Ok(t) => (t, Ok(())),
                Err(why) => (Vec::new(), Err(format!("embeddings: {why}"))),
            },
        },
    };
    let record = UserRecord { username, embedding, samples: u64::try_from(samples).unwrap_or(0), model_id, updated_at };
    Ok((record, check))
}

pub(super) fn hash_of(row: &Row) -> String {
    row.try_get::<_, Option<String>>(5).ok().flatten().unwrap_or_default()
}

impl PgStore {
    async fn user_row(&self, username: &str) -> Result<Option<Row>, StoreError> {
        let sql = format!("select {USER_COLUMNS} from users u where u.username = $1 limit 1");
        self.bounded("reading a user", async { self.client().await?.query_opt(&sql, &[&username]).await.map_err(|e| pg_err("", &e)) }).await
    }
}

/// A row as a record; an unusable template reads as none (enrolling replaces it).
fn record_or_warn(row: &Row) -> Result<UserRecord, StoreError> {
    let (record, check) = user_of(row).map_err(StoreError::Internal)?;
    if let Err(why) = check {
        tracing::warn!(username = %record.username, "postgres store: user '{}' has an unusable template: {why}", record.username);
    }
    Ok(record)
}

#[async_trait::async_trait]
impl FaceStore for PgStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    async fn load_users(&self, model_id: &str) -> Result<LoadedUsers, StoreError> {
        let sql = format!("select {USER_COLUMNS} from users u");
        let rows = self.client().await?.query(&sql, &[]).await.map_err(|e| pg_err("loading users", &e))?;
        let mut loaded = LoadedUsers::default();
        let mut seen = HashMap::with_capacity(rows.len());
        for row in &rows {
            let (record, check) = match user_of(row) {
                Ok(r) => r,
                Err(why) => {
                    tracing::warn!("postgres store: skipping a user: {why}");
                    loaded.malformed += 1;
                    continue;
                }
            };
            seen.insert(record.username.clone(), hash_of(row));
            if let Err(why) = check {
                tracing::warn!(username = %record.username, "postgres store: skipping user '{}': {why}", record.username);
                loaded.malformed += 1;
                continue;
            }
            if !record.embedding.is_empty() && !is_ours(record.model_id.as_deref(), model_id) {
                loaded.other_model += 1;
                continue;
            }
            loaded.users.push(record);
        }
        if let Ok(mut seed) = self.seed.lock() {
            *seed = Some(seen);
        }
        Ok(loaded)
    }

    async fn create_user(&self, username: &str) -> Result<UserRecord, StoreError> {
        // The seed table may have no unique constraint on username: look first.
        if self.user_row(username).await?.is_some() {
            return Err(StoreError::UserExists(username.to_owned()));
        }
        let sql = format!(
            "with u as (insert into users (username, embeddings, samples, model_id, updated_at) values ($1, null, 0, null, now()) returning *) \
             select {USER_COLUMNS} from u"
        );
        let result = self
            .bounded("creating a user", async {
                match self.client().await?.query_one(&sql, &[&username]).await {
                    Ok(row) => Ok(Ok(row)),
                    Err(e) if is_unique_violation(&e) => Ok(Err(())),
                    Err(e) => Err(pg_err("", &e)),
                }
            })
            .await?;
        match result {
            Ok(row) => record_or_warn(&row),
            Err(()) => Err(StoreError::UserExists(username.to_owned())),
        }
    }

    async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        match self.user_row(username).await? {
            Some(row) => Ok(Some(record_or_warn(&row)?)),
            None => Ok(None),
        }
    }

    async fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let sql = "select username, coalesce(samples, 0)::bigint, model_id, coalesce(updated_at, 'epoch'::timestamptz) \
                   from users where username is not null order by username collate \"C\"";
        let rows = self.bounded("listing users", async { self.client().await?.query(sql, &[]).await.map_err(|e| pg_err("", &e)) }).await?;
        Ok(rows
            .iter()
            .map(|r| UserSummary {
                username: r.get(0),
                samples: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                model_id: r.get(2),
                updated_at: rfc3339(r.get(3)),
            })
            .collect())
    }

    async fn delete_user(&self, username: &str) -> Result<(), StoreError> {
        let n = self
            .bounded("deleting a user", async {
                self.client().await?.execute("delete from users where username = $1", &[&username]).await.map_err(|e| pg_err("", &e))
            })
            .await?;
        if n == 0 {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        Ok(())
    }

    async fn enroll(&self, username: &str, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError> {
        check_new_embeddings(embeddings)?;
        let lock = format!("select {USER_COLUMNS} from users u where u.username = $1 limit 1 for update");
        let update = format!(
            "with u as (update users set embeddings = $2::real[], samples = $3, model_id = $4, updated_at = now() \
             where ctid = (select ctid from users where username = $1 limit 1) returning *) select {USER_COLUMNS} from u"
        );
        self.bounded("enrolling", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| pg_err("", &e))?;
            let Some(row) = tx.query_opt(&lock, &[&username]).await.map_err(|e| pg_err("", &e))? else {
                return Err(StoreError::UserNotFound(username.to_owned()));
            };
            let (current, check) = user_of(&row).map_err(StoreError::Internal)?;
            if check.is_ok()
                && !current.embedding.is_empty()
                && let Some(stored) = current.model_id.as_deref().filter(|m| !is_ours(Some(m), model_id))
            {
                return Err(StoreError::ModelMismatch {
                    username: username.to_owned(),
                    stored: stored.to_owned(),
                    ours: model_id.to_owned(),
                });
            }
            let (template, samples) = weighted_template(&current.embedding, current.samples, embeddings);
            let samples = i64::try_from(samples).map_err(|_| StoreError::Internal("too many samples".into()))?;
            let row = tx.query_one(&update, &[&username, &template, &samples, &model_id]).await.map_err(|e| pg_err("", &e))?;
            tx.commit().await.map_err(|e| pg_err("committing", &e))?;
            record_or_warn(&row)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded("ping", async { self.client().await?.simple_query("select 1").await.map(|_| ()).map_err(|e| pg_err("", &e)) }).await
    }

    /// LISTEN delivers every write, this process's own included, so `held` is not needed.
    async fn follow(&self, held: crate::store::Held) -> Result<Option<Box<dyn ChangeFeed<Change>>>, StoreError> {
        let _ = held;
        let known = self.seed.lock().ok().and_then(|mut s| s.take());
        let feed = self.users_feed(known);
        tracing::info!("postgres store: following other replicas' users (LISTEN {})", super::USERS_CHANNEL);
        Ok(Some(Box::new(feed)))
    }
}
