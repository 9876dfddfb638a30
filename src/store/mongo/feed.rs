//! Following `users`: a change stream where the server offers one, else polling stamps, and a
//! full compare when they may have missed something.

use super::*;

impl MongoStore {
    pub(super) async fn initial_source(&self) -> Result<Source, StoreError> {
        let poll = Source::Poll { interval: self.opts.poll_interval, watermark: None, last_full: Instant::now() };
        Ok(match self.opts.follow {
            FollowMode::Poll => poll,
            FollowMode::Auto => match self.open_stream().await? {
                Some(s) => Source::Stream { stream: Some(s), token: None },
                None => poll,
            },
        })
    }
}

/// How the feed learns of changes.
pub(super) enum Source {
    Stream {
        /// `None` after an error, until it is opened again.
        stream: Option<EventStream>,
        /// Where to resume after an outage.
        token: Option<ResumeToken>,
    },
    Poll {
        interval: Duration,
        /// Newest `updated_at` seen (unix ms).
        watermark: Option<i64>,
        last_full: Instant,
    },
}

/// Follows the `users` collection: which documents changed, then their current state.
pub struct MongoFeed {
    pub(super) coll: Collection<RawDocumentBuf>,
    pub(super) op_timeout: Duration,
    /// For polling, also when the server stops offering change streams.
    pub(super) poll_interval: Duration,
    pub(super) source: Source,
    /// Every document seen, by `_id`: deletions only give an `_id`, and polling compares stamps.
    pub(super) known: HashMap<IdKey, Entry>,
    /// Documents to read again.
    pub(super) pending: HashMap<IdKey, Bson>,
    /// The names the gallery holds now, this process's own writes included (asked at a compare).
    pub(super) held: crate::store::Held,
    /// Names the gallery holds with no document at the last compare (written here, deleted
    /// elsewhere before this feed saw them): removed at the next `changes`.
    pub(super) strays: HashSet<String>,
    /// Compare every document with `known` (after a lost change stream or a count mismatch).
    pub(super) resync: bool,
}

#[async_trait::async_trait]
impl ChangeFeed for MongoFeed {
    async fn wait(&mut self) {
        let mut retry = Retry::default();
        loop {
            if !self.pending.is_empty() || !self.strays.is_empty() {
                return;
            }
            let step = if self.resync { self.resync().await } else { self.next_step().await };
            match step {
                Ok(()) => {
                    if retry.after_success() {
                        tracing::info!(how = %self.describe(), "mongo store: following other replicas again");
                    }
                }
                Err(e) => {
                    retry
                        .after_failure(|| tracing::warn!("mongo store: cannot follow other replicas' writes for now ({e}); retrying"))
                        .await
                }
            }
        }
    }

    async fn changes(&mut self) -> Result<Vec<Change>, StoreError> {
        let mut changes = self.strays_gone().await?;
        let pending: Vec<(IdKey, Bson)> = self.pending.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for chunk in pending.chunks(RESOLVE_CHUNK) {
            match self.resolve(chunk).await {
                Ok(mut c) => {
                    changes.append(&mut c);
                    for (key, _) in chunk {
                        self.pending.remove(key);
                    }
                }
                Err(e) if changes.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(changes)
    }

    fn describe(&self) -> String {
        match &self.source {
            Source::Stream { .. } => "change stream".into(),
            Source::Poll { interval, .. } => format!("polling every {}", fmt_duration(*interval)),
        }
    }
}

impl MongoFeed {
    /// The strays that still have no document are removed; one that has one again (deleted and
    /// created anew meanwhile) is read as any changed document.
    async fn strays_gone(&mut self) -> Result<Vec<Change>, StoreError> {
        if self.strays.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&String> = self.strays.iter().collect();
        let filter = doc! {"username": {"$in": names}};
        let limit = self.op_timeout * 2;
        let projection = doc! {"_id": 1, "username": 1, "updated_at": 1};
        let found: Vec<RawDocumentBuf> =
            match tokio::time::timeout(limit, async { self.coll.find(filter).projection(projection).await?.try_collect::<Vec<_>>().await })
                .await
            {
                Ok(r) => r.map_err(|e| store_err("reading users gone from the store", &e))?,
                Err(_) => return Err(StoreError::Unavailable(format!("reading users gone: no answer within {}", fmt_duration(limit)))),
            };
        for raw in &found {
            let Some((key, entry)) = entry_of(raw) else { continue };
            if let Some(name) = &entry.username {
                self.strays.remove(name);
            }
            self.pending.insert(key, entry.id);
        }
        Ok(self.strays.drain().map(Change::Remove).collect())
    }

    /// One step of following: the next change stream events, or one poll.
    async fn next_step(&mut self) -> Result<(), StoreError> {
        match &mut self.source {
            Source::Stream { stream, token } => {
                let Some(s) = stream.as_mut() else {
                    return self.reopen().await;
                };
                // One event at a time: the driver's stream must not be left with a poll in
                // flight (reading its resume token then panics), so no draining with
                // `now_or_never`. Events that arrive while the follower reads are buffered.
                match s.next().await {
                    Some(Ok(event)) => {
                        *token = s.resume_token();
                        self.on_event(event);
                        Ok(())
                    }
                    Some(Err(e)) => {
                        *stream = None;
                        Err(store_err("change stream", &e))
                    }
                    None => {
                        // Closed by the server (invalidated): start over.
                        *stream = None;
                        *token = None;
                        self.resync = true;
                        Ok(())
                    }
                }
            }
            Source::Poll { .. } => self.poll().await,
        }
    }

    /// Opens the change stream again, resuming after the last event seen when the server still
    /// has it; otherwise (or when the server no longer offers change streams) compares
    /// everything.
    async fn reopen(&mut self) -> Result<(), StoreError> {
        let Source::Stream { token, .. } = &self.source else { return Ok(()) };
        let resume = token.clone();
        match open_stream(&self.coll, resume.clone()).await {
            Ok(Some((s, t))) => {
                self.source = Source::Stream { stream: Some(s), token: t.or(resume) };
                Ok(())
            }
            Ok(None) => {
                tracing::warn!("mongo store: the server no longer offers change streams; polling instead");
                self.source = Source::Poll { interval: self.poll_interval, watermark: None, last_full: Instant::now() };
                self.resync = true;
                Ok(())
            }
            Err(e) if is_unavailable(&e) => Err(store_err("opening a change stream", &e)),
            Err(e) => {
                if resume.is_some() {
                    tracing::warn!("mongo store: cannot resume the change stream ({}); comparing every user instead", one_line(&e));
                    self.source = Source::Stream { stream: None, token: None };
                    self.resync = true;
                    Ok(())
                } else {
                    Err(store_err("opening a change stream", &e))
                }
            }
        }
    }

    fn on_event(&mut self, event: ChangeStreamEvent<Document>) {
        match event.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace | OperationType::Delete => {
                if let Some(id) = event.document_key.as_ref().and_then(|k| k.get("_id")) {
                    let key = key_of_bson(id);
                    // A document first seen through its event: its name is remembered, so that
                    // if it is gone by the time it is read (deleted meanwhile), the name it had
                    // is still removed (it may have reached the gallery through a local write).
                    let username = event.full_document.as_ref().and_then(|d| d.get_str("username").ok());
                    if let (Some(name), false) = (username, self.known.contains_key(&key)) {
                        self.known.insert(key.clone(), Entry { id: id.clone(), username: Some(name.to_owned()), stamp: None });
                    }
                    self.pending.insert(key, id.clone());
                }
            }
            OperationType::Drop | OperationType::Rename | OperationType::DropDatabase | OperationType::Invalidate => {
                if let Source::Stream { stream, token } = &mut self.source {
                    *stream = None;
                    *token = None;
                }
                self.resync = true;
            }
            _ => {}
        }
    }

    /// Compares every document's `_id`, `username` and `updated_at` with what is known; what
    /// differs, is new, is gone or has no stamp is read again. A change stream is opened first,
    /// so that nothing written during the compare is missed.
    async fn resync(&mut self) -> Result<(), StoreError> {
        if let Source::Stream { stream: None, .. } = &self.source {
            match open_stream(&self.coll, None).await {
                Ok(Some((s, t))) => self.source = Source::Stream { stream: Some(s), token: t },
                Ok(None) => self.source = Source::Poll { interval: self.poll_interval, watermark: None, last_full: Instant::now() },
                Err(e) => return Err(store_err("opening a change stream", &e)),
            }
        }
        let projection = doc! {"_id": 1, "username": 1, "updated_at": 1};
        let mut cursor =
            self.coll.find(doc! {}).projection(projection).batch_size(5000).await.map_err(|e| store_err("comparing users", &e))?;
        // Asked before the scan: a name the gallery held then had its document then.
        let held_before = (self.held)();
        let mut seen = HashSet::new();
        let mut names = HashSet::new();
        let mut newest = None;
        while let Some(raw) = cursor.try_next().await.map_err(|e| store_err("comparing users", &e))? {
            let Some((key, entry)) = entry_of(&raw) else { continue };
            names.extend(entry.username.clone());
            newest = newest.max(entry.stamp);
            let same =
                self.known.get(&key).is_some_and(|k| entry.stamp.is_some() && k.stamp == entry.stamp && k.username == entry.username);
            if !same {
                self.pending.insert(key.clone(), entry.id.clone());
            }
            seen.insert(key);
        }
        for (key, entry) in &self.known {
            if !seen.contains(key) {
                self.pending.insert(key.clone(), entry.id.clone());
            }
        }
        // A name written here and deleted elsewhere before this feed saw its document (read
        // again by `changes`, under the write lock, before it is removed).
        self.strays.extend(held_before.into_iter().filter(|n| !names.contains(n)));
        if let Source::Poll { watermark, last_full, .. } = &mut self.source {
            *watermark = (*watermark).max(newest);
            *last_full = Instant::now();
        }
        self.resync = false;
        Ok(())
    }

    /// One poll: documents stamped since the newest stamp seen (less an overlap), then a
    /// count compare that catches deletions.
    async fn poll(&mut self) -> Result<(), StoreError> {
        let Source::Poll { interval, watermark, last_full } = &mut self.source else { return Ok(()) };
        tokio::time::sleep(*interval).await;
        if last_full.elapsed() >= *interval * POLL_FULL_EVERY {
            self.resync = true;
            return Ok(());
        }
        let filter = match *watermark {
            Some(w) => doc! {"updated_at": {"$gte": bson::DateTime::from_millis(w.saturating_sub(POLL_OVERLAP.as_millis() as i64))}},
            None => doc! {"updated_at": {"$type": "date"}},
        };
        let projection = doc! {"_id": 1, "username": 1, "updated_at": 1};
        let limit = self.op_timeout * 2;
        let found: Vec<RawDocumentBuf> =
            match tokio::time::timeout(limit, async { self.coll.find(filter).projection(projection).await?.try_collect::<Vec<_>>().await })
                .await
            {
                Ok(r) => r.map_err(|e| store_err("polling users", &e))?,
                Err(_) => return Err(StoreError::Unavailable(format!("polling users: no answer within {}", fmt_duration(limit)))),
            };
        let mut newest = *watermark;
        for raw in &found {
            let Some((key, entry)) = entry_of(raw) else { continue };
            newest = newest.max(entry.stamp);
            if !self.known.get(&key).is_some_and(|k| k.stamp == entry.stamp && k.username == entry.username) {
                self.pending.insert(key, entry.id);
            }
        }
        *watermark = newest;
        if self.pending.is_empty() {
            let count = match tokio::time::timeout(limit, self.coll.estimated_document_count().into_future()).await {
                Ok(r) => r.map_err(|e| store_err("counting users", &e))?,
                Err(_) => return Err(StoreError::Unavailable("counting users: no answer".into())),
            };
            if count != self.known.len() as u64 {
                self.resync = true;
            }
        }
        Ok(())
    }

    /// Reads the current documents of `chunk` (by `_id`, and by the names they had, so that a
    /// name deleted and created again under a new `_id` ends up right) and says what the gallery
    /// should hold for every name involved.
    async fn resolve(&mut self, chunk: &[(IdKey, Bson)]) -> Result<Vec<Change>, StoreError> {
        let ids: Vec<Bson> = chunk.iter().map(|(_, id)| id.clone()).collect();
        let old_names: Vec<String> = chunk.iter().filter_map(|(k, _)| self.known.get(k).and_then(|e| e.username.clone())).collect();
        let filter = doc! {"$or": [{"_id": {"$in": ids}}, {"username": {"$in": old_names.clone()}}]};
        let limit = self.op_timeout * 2;
        let docs: Vec<RawDocumentBuf> =
            match tokio::time::timeout(limit, async { self.coll.find(filter).await?.try_collect::<Vec<_>>().await }).await {
                Ok(r) => r.map_err(|e| store_err("reading changed users", &e))?,
                Err(_) => return Err(StoreError::Unavailable(format!("reading changed users: no answer within {}", fmt_duration(limit)))),
            };

        let mut affected: HashSet<String> = old_names.into_iter().collect();
        let mut current: HashMap<String, &RawDocumentBuf> = HashMap::new();
        let mut found = HashSet::new();
        for raw in &docs {
            let Some((key, entry)) = entry_of(raw) else { continue };
            if let Some(name) = &entry.username {
                affected.insert(name.clone());
                current.insert(name.clone(), raw);
            }
            if let Some(Some(old)) = self.known.get(&key).map(|e| e.username.clone())
                && entry.username.as_ref() != Some(&old)
            {
                affected.insert(old);
            }
            if let Source::Poll { watermark, .. } = &mut self.source {
                *watermark = (*watermark).max(entry.stamp);
            }
            found.insert(key.clone());
            self.known.insert(key, entry);
        }
        for (key, _) in chunk {
            if !found.contains(key) {
                self.known.remove(key);
            }
        }
        let mut changes = Vec::with_capacity(affected.len());
        for name in affected {
            match current.get(&name) {
                Some(raw) => match template_of(raw) {
                    Ok(embedding) => changes.push(Change::Upsert(record_of(raw, name, embedding))),
                    Err(why) => {
                        tracing::warn!(username = %name, "mongo store: user '{name}' changed to an unusable template ({why}); not compared");
                        changes.push(Change::Remove(name));
                    }
                },
                None => changes.push(Change::Remove(name)),
            }
        }
        Ok(changes)
    }
}

/// Opens a change stream (resuming after `resume` when given). `Ok(None)`: the server offers
/// none (a standalone server).
pub(super) async fn open_stream(
    coll: &Collection<RawDocumentBuf>,
    resume: Option<ResumeToken>,
) -> Result<Option<(EventStream, Option<ResumeToken>)>, MongoError> {
    let mut watch = coll.watch().max_await_time(STREAM_AWAIT);
    if let Some(t) = resume {
        watch = watch.start_after(t);
    }
    match watch.await {
        Ok(s) => {
            let s = s.with_type::<ChangeStreamEvent<Document>>();
            let token = s.resume_token();
            Ok(Some((s, token)))
        }
        // 40573: "only supported on replica sets"; 20: IllegalOperation; 115: CommandNotSupported.
        Err(e) if matches!(*e.kind, ErrorKind::Command(ref c) if matches!(c.code, 40573 | 20 | 115)) => Ok(None),
        Err(e) => Err(e),
    }
}
