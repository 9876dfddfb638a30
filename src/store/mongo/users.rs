//! `users` in MongoDB: the `FaceStore` use cases and the atomic enrolment pipeline.

use super::*;

#[async_trait::async_trait]
impl FaceStore for MongoStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Mongodb
    }

    async fn load_users(&self, model_id: &str) -> Result<LoadedUsers, StoreError> {
        // Follow from here on: the stream is opened before the scan, so a write made during the
        // scan is delivered again later (and re-read: harmless).
        let (stream, poll) = match self.opts.follow {
            FollowMode::Poll => (None, true),
            FollowMode::Auto => match self.open_stream().await? {
                Some(s) => (Some(s), false),
                None => (None, true),
            },
        };
        let mut loaded = LoadedUsers::default();
        let mut known = HashMap::new();
        let mut watermark = None;
        let mut cursor = self.coll.find(doc! {}).batch_size(1000).await.map_err(|e| store_err("loading users", &e))?;
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("loading users", &e))? {
            let Some((key, entry)) = entry_of(&raw) else { continue };
            watermark = watermark.max(entry.stamp);
            let username = entry.username.clone();
            known.insert(key, entry);
            let Some(username) = username else {
                tracing::warn!("mongo store: skipping a users document without a string username (_id {})", id_text(&raw));
                loaded.malformed += 1;
                continue;
            };
            if has_template(&raw) && !is_ours(model_of(&raw), model_id) {
                loaded.other_model += 1;
                continue;
            }
            match template_of(&raw) {
                Ok(embedding) => loaded.users.push(record_of(&raw, username, embedding)),
                Err(why) => {
                    tracing::warn!(username = %username, "mongo store: skipping user '{username}': {why}");
                    loaded.malformed += 1;
                }
            }
        }
        if let Ok(mut seed) = self.seed.lock() {
            *seed = Some(Seed { stream, poll, known, watermark });
        }
        Ok(loaded)
    }

    async fn create_user(&self, username: &str) -> Result<UserRecord, StoreError> {
        if self.find_raw(username).await?.is_some() {
            return Err(StoreError::UserExists(username.to_owned()));
        }
        // An upsert whose filter can never match an existing document: it always inserts
        // (`username` from the filter's equality), stamped with the server's clock like every
        // other write; a concurrent insert of the same name hits the unique index.
        let filter = doc! {"username": username, "_id": {"$exists": false}};
        let update = vec![doc! {"$set": {"embeddings": {"$literal": []}, "samples": {"$literal": 0_i64}, "updated_at": "$$NOW"}}];
        let op = self.coll.find_one_and_update(filter, update).upsert(true).return_document(ReturnDocument::After).into_future();
        match tokio::time::timeout(self.opts.op_timeout * 2, op).await {
            Ok(Ok(Some(raw))) => parsed_record(&raw),
            Ok(Ok(None)) => Err(StoreError::Internal(format!("creating '{username}': the server returned no document"))),
            Ok(Err(e)) if is_duplicate_key(&e) => Err(StoreError::UserExists(username.to_owned())),
            Ok(Err(e)) => Err(store_err("creating a user", &e)),
            Err(_) => Err(StoreError::Unavailable(format!("creating a user: no answer within {}", fmt_duration(self.opts.op_timeout * 2)))),
        }
    }

    async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let Some(raw) = self.find_raw(username).await? else { return Ok(None) };
        let embedding = template_of(&raw).unwrap_or_else(|why| {
            // The user exists; its template cannot be used (enrolling replaces it).
            tracing::warn!(username = %username, "mongo store: user '{username}' has an unusable template: {why}");
            Vec::new()
        });
        Ok(Some(record_of(&raw, username.to_owned(), embedding)))
    }

    async fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let projection = doc! {"_id": 0, "username": 1, "samples": 1, MODEL_FIELD: 1, "updated_at": 1};
        let mut cursor =
            self.coll.find(doc! {}).projection(projection).sort(doc! {"username": 1}).await.map_err(|e| store_err("listing users", &e))?;
        let mut out = Vec::new();
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("listing users", &e))? {
            let Some(username) = str_of(&raw, "username") else { continue };
            out.push(UserSummary {
                username: username.to_owned(),
                samples: samples_of(&raw),
                model_id: model_of(&raw).map(str::to_owned),
                updated_at: rfc3339(updated_at_of(&raw)),
            });
        }
        // Byte order, as the embedded store lists them.
        out.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(out)
    }

    async fn delete_user(&self, username: &str) -> Result<(), StoreError> {
        let result = self.bounded("deleting a user", self.coll.delete_many(doc! {"username": username}).into_future()).await?;
        if result.deleted_count == 0 {
            return Err(StoreError::UserNotFound(username.to_owned()));
        }
        Ok(())
    }

    async fn enroll(&self, username: &str, embeddings: &[Vec<f32>], model_id: &str) -> Result<UserRecord, StoreError> {
        check_new_embeddings(embeddings)?;
        let mut sum = vec![0.0f64; EMBEDDING_DIM];
        for e in embeddings {
            for (s, &v) in sum.iter_mut().zip(e) {
                *s += f64::from(v);
            }
        }
        let images = i64::try_from(embeddings.len()).map_err(|_| StoreError::Internal("too many embeddings".into()))?;
        let pipeline = enroll_pipeline(&sum, images, model_id);
        // Refuses (writes nothing to) a document whose template came from another recognizer.
        let filter = doc! {"username": username, "$nor": [{MODEL_FIELD: {"$type": "string", "$nin": [model_id, ""]}, "embeddings.0": {"$exists": true}}]};
        for _ in 0..3 {
            let op = self.coll.find_one_and_update(filter.clone(), pipeline.clone()).return_document(ReturnDocument::After).into_future();
            if let Some(raw) = self.bounded("enrolling", op).await? {
                return parsed_record(&raw);
            }
            // Nothing matched: say why.
            match self.find_raw(username).await? {
                None => return Err(StoreError::UserNotFound(username.to_owned())),
                Some(raw) => {
                    if let Some(stored) = model_of(&raw).filter(|m| !is_ours(Some(m), model_id) && has_template(&raw)) {
                        return Err(StoreError::ModelMismatch {
                            username: username.to_owned(),
                            stored: stored.to_owned(),
                            ours: model_id.to_owned(),
                        });
                    }
                    // Changed in between (re-created, re-enrolled elsewhere): try again.
                }
            }
        }
        Err(StoreError::Internal(format!("enrolling '{username}': its document kept changing under the update")))
    }

    /// The server answers `ping` within the operation bound.
    async fn ping(&self) -> Result<(), StoreError> {
        let db = self.coll.client().database(&self.database);
        self.bounded("ping", db.run_command(doc! {"ping": 1}).into_future()).await.map(|_| ())
    }

    async fn follow(&self, held: crate::store::Held) -> Result<Option<Box<dyn ChangeFeed>>, StoreError> {
        let seed = self.seed.lock().ok().and_then(|mut s| s.take());
        let (source, known, resync) = match seed {
            Some(Seed { stream, poll, known, watermark }) => {
                let source = if poll {
                    Source::Poll { interval: self.opts.poll_interval, watermark, last_full: Instant::now() }
                } else {
                    Source::Stream { stream, token: None }
                };
                (source, known, false)
            }
            // Never loaded: start from a full compare.
            None => (self.initial_source().await?, HashMap::new(), true),
        };
        let mut feed = MongoFeed {
            coll: self.coll.clone(),
            op_timeout: self.opts.op_timeout,
            poll_interval: self.opts.poll_interval,
            source,
            known,
            pending: HashMap::new(),
            held,
            strays: std::collections::HashSet::new(),
            resync,
        };
        if let Source::Stream { stream: Some(s), token } = &mut feed.source {
            *token = s.resume_token();
        }
        tracing::info!(how = %feed.describe(), "mongo store: following other replicas' writes");
        Ok(Some(Box::new(feed)))
    }
}

/// The aggregation-pipeline update of an enrolment. `new_sum` is the sum of the new
/// (L2-normalised) embeddings, `images` their number. In the server, atomically:
///
/// ```text
/// old  = embeddings, when it is an array of DIM finite numbers (as doubles), else []
/// on   = |old|
/// w    = on > 0 ? max(1, samples as long, or 1 when missing/unreadable) : 0
/// sum  = [ (w > 0 ? old[i] / on * w : 0) + new_sum[i]  for i in 0..DIM ]
/// n    = |sum|
/// embeddings = [ n > 0 ? x / n : 0  for x in sum ]     (doubles: the old service reads them)
/// samples    = w + images                              (a long)
/// model_id   = ours;  updated_at = $$NOW
/// ```
///
/// With a normalised stored template this is exactly [`super::weighted_template`].
pub fn enroll_pipeline(new_sum: &[f64], images: i64, model_id: &str) -> Vec<Document> {
    let dim = i32::try_from(new_sum.len()).unwrap_or(i32::MAX);
    let squares = |input: &str| doc! {"$reduce": {"input": input, "initialValue": 0.0, "in": {"$add": ["$$value", {"$multiply": ["$$this", "$$this"]}]}}};
    let stored = doc! {"$cond": [{"$isArray": "$embeddings"}, "$embeddings", []]};
    let finite = doc! {"$and": [{"$isNumber": "$$x"}, {"$gte": ["$$x", -f64::MAX]}, {"$lte": ["$$x", f64::MAX]}]};
    let new_sum = Bson::Array(new_sum.iter().map(|&v| Bson::Double(v)).collect());
    vec![
        doc! {"$set": {"_facerec_old": {"$cond": {
            "if": {"$and": [
                {"$eq": [{"$size": stored.clone()}, dim]},
                {"$allElementsTrue": [{"$map": {"input": stored, "as": "x", "in": finite}}]},
            ]},
            "then": {"$map": {"input": "$embeddings", "as": "x", "in": {"$toDouble": "$$x"}}},
            "else": [],
        }}}},
        doc! {"$set": {"_facerec_on": {"$sqrt": squares("$_facerec_old")}}},
        doc! {"$set": {"_facerec_w": {"$cond": [
            {"$gt": ["$_facerec_on", 0]},
            {"$max": [1_i64, {"$convert": {"input": "$samples", "to": "long", "onError": 1_i64, "onNull": 1_i64}}]},
            0_i64,
        ]}}},
        doc! {"$set": {"_facerec_sum": {"$map": {"input": {"$range": [0, dim]}, "as": "i", "in": {"$add": [
            {"$cond": [
                {"$gt": ["$_facerec_w", 0]},
                {"$multiply": [{"$divide": [{"$arrayElemAt": ["$_facerec_old", "$$i"]}, "$_facerec_on"]}, "$_facerec_w"]},
                0.0,
            ]},
            {"$arrayElemAt": [{"$literal": new_sum}, "$$i"]},
        ]}}}}},
        doc! {"$set": {"_facerec_n": {"$sqrt": squares("$_facerec_sum")}}},
        doc! {"$set": {
            "embeddings": {"$map": {"input": "$_facerec_sum", "as": "x", "in": {"$cond": [{"$gt": ["$_facerec_n", 0]}, {"$divide": ["$$x", "$_facerec_n"]}, 0.0]}}},
            "samples": {"$add": ["$_facerec_w", images]},
            MODEL_FIELD: {"$literal": model_id},
            "updated_at": "$$NOW",
        }},
        doc! {"$unset": ["_facerec_old", "_facerec_on", "_facerec_w", "_facerec_sum", "_facerec_n"]},
    ]
}
