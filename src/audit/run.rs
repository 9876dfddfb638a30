//! The writer task: takes queued records in batches, hands them to the blocking pool, runs the sweeps.

use super::*;

/// Resolves at the next retention sweep; never without a retention.
pub(super) async fn next_sweep(sweeps: &mut Option<tokio::time::Interval>) {
    match sweeps {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// The writer task: takes batches of queued messages (and the hourly sweep) and runs them on the
/// blocking pool.
pub(super) async fn run(mut writer: Writer, mut rx: mpsc::Receiver<Msg>) {
    let mut closers: Vec<CloseAck> = Vec::new();
    let mut sweeps = (writer.retention_days > 0).then(|| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let mut jobs = Vec::new();
        let mut next = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => Some(m),
                None => break,
            },
            () = next_sweep(&mut sweeps) => {
                jobs.push(Job::Sweep);
                rx.try_recv().ok()
            }
        };
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(rec, ack) => jobs.push(Job::Record(rec, ack)),
                Msg::Close(ack) => {
                    // No new records from now on; those already queued are still written.
                    rx.close();
                    closers.push(ack);
                }
            }
            if jobs.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let done = tokio::task::spawn_blocking(move || {
            writer.rotate(SystemTime::now());
            for job in jobs {
                match job {
                    Job::Record(rec, ack) => {
                        let _ = ack.send(writer.write_record(rec));
                    }
                    Job::Sweep => {
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.sweep(SystemTime::now()))).is_err() {
                            writer.failed(&AuditError::Panicked("retention sweep".into()));
                        }
                    }
                }
            }
            writer
        })
        .await;
        match done {
            Ok(w) => writer = w,
            Err(e) => {
                // Only a panic gets here; pending and later callers get `Stopped`.
                tracing::error!(error = %e, "the audit writer failed");
                return;
            }
        }
    }
    let synced = match tokio::task::spawn_blocking(move || writer.sync()).await {
        Ok(r) => r,
        Err(_) => Err(AuditError::Stopped),
    };
    if let Err(e) = &synced {
        tracing::warn!(error = %e, "audit trail: final sync failed");
    }
    for ack in closers {
        let _ = ack.send(synced.as_ref().map(|_| ()).map_err(AuditError::duplicate));
    }
    tracing::debug!("audit trail stopped");
}
