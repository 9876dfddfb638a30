//! The schema and its migrations (`PRAGMA user_version`).

use super::*;

/// Creates the schema, or upgrades it to [`SCHEMA_VERSION`], in one immediate transaction
/// (two processes opening a new file at once can't both create it).
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
    let version: i32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this build's ({SCHEMA_VERSION}); upgrade the service"
        )));
    }
    if version < 1 {
        // IF NOT EXISTS: a file made before the version was recorded keeps its rows.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS users (
                 username   TEXT PRIMARY KEY NOT NULL,
                 embedding  BLOB,
                 samples    INTEGER NOT NULL DEFAULT 0,
                 model_id   TEXT,
                 updated_at INTEGER
             );",
        )
        .map_err(sql_err)?;
    }
    if version < 2 {
        // The second API's face records (see `faces`), their images apart so that
        // loading the vectors at start never reads the images.
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS faces (
                 id           TEXT PRIMARY KEY NOT NULL,
                 display_name TEXT NOT NULL,
                 image_url    TEXT NOT NULL,
                 face_vec     BLOB NOT NULL,
                 model_id     TEXT NOT NULL,
                 inserted_at  INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS faces_inserted_at ON faces (inserted_at, id);
             CREATE TABLE IF NOT EXISTS face_images (
                 id           TEXT PRIMARY KEY NOT NULL REFERENCES faces (id) ON DELETE CASCADE,
                 content_type TEXT NOT NULL,
                 bytes        BLOB NOT NULL
             );",
        )
        .map_err(sql_err)?;
    }
    // Later versions add their steps here (`if version < 3 { ... }`).
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql_err)?;
    }
    tx.commit().map_err(sql_err)
}
