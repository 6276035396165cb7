//! The gRPC face of the service: with `server`'s wiring, the only code that
//! sees tonic and prost. Handlers validate requests into domain types
//! (`parse`), call the store, and convert results back (`convert`); errors
//! become statuses in `status` only. Around the handlers: `guard` admits
//! every call, `calls` measures and logs it, `web` serves browsers, and
//! `codec` is the generated code's codec. Must not: hold SQL or know which
//! backend the store runs on.

pub mod calls;
pub mod codec;
mod convert;
pub mod guard;
pub mod status;
pub mod tls;
pub mod web;

use std::sync::Arc;

use std::pin::Pin;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use guard::caller;

use crate::auth::{Authenticator, Principal};
use crate::config::Config;
use crate::domain::{
    Alias, BodyLimits, DbName, DocChange, DocId, DocWrite, Error, Idempotency, ItemReply,
    RequestId, Result, Rev, SyncKey, new_ids, parse_attributes,
};
use crate::hub::{Hub, SubscribeOptions, SubscribeRequest, Subscription};
use crate::pb::{self, sync_service_server::SyncService};
use crate::store::{ChangesQuery, Snapshot, Store, Written};

pub struct Service {
    store: Arc<Store>,
    /// Open streams re-check their caller against it on every reload.
    auth: Arc<Authenticator>,
    hub: Arc<Hub>,
    /// Cancelled at shutdown: open Subscribe streams end with UNAVAILABLE.
    shutdown: CancellationToken,
    body_limits: BodyLimits,
    max_bulk_docs: usize,
    max_new_ids: u32,
    max_subscribe_keys: usize,
    subscribe: SubscribeOptions,
    changes_default_limit: u32,
    changes_max_limit: u32,
    max_response_bytes: usize,
}

/// Room kept in a response budget for the fields besides the repeated one.
const RESPONSE_OVERHEAD: usize = 64;

/// Bytes of changes in one Snapshot message (or --max-response-bytes, if
/// smaller): big enough that framing costs nothing, small enough that the
/// server encodes the next one while the client decodes this one.
const SNAPSHOT_MESSAGE_BYTES: usize = 1024 * 1024;

impl Service {
    pub fn new(
        store: Arc<Store>,
        auth: Arc<Authenticator>,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        config: &Config,
    ) -> Self {
        Service {
            store,
            auth,
            hub,
            shutdown,
            body_limits: config.body_limits(),
            max_bulk_docs: config.max_bulk_docs,
            max_new_ids: config.max_new_ids,
            max_subscribe_keys: config.max_subscribe_keys,
            subscribe: SubscribeOptions {
                buffer: config.subscriber_buffer,
                progress_every: config.progress_interval_secs,
                replay_bytes: config.subscriber_replay_bytes,
            },
            changes_default_limit: config.changes_default_limit,
            changes_max_limit: config.changes_max_limit,
            max_response_bytes: config.max_response_bytes,
        }
    }

    /// A Subscribe names at least one sync key and at most the limit
    /// (checked before the grants, so a huge list costs nothing).
    fn subscribe_key_count(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Err(Error::invalid(
                "sync_keys",
                "at least one sync key is required (e.g. the sync_key of a database)",
            ));
        }
        if keys.len() > self.max_subscribe_keys {
            return Err(Error::invalid(
                "sync_keys",
                format!(
                    "{} sync keys given; at most {} per Subscribe, open another stream for the rest",
                    keys.len(),
                    self.max_subscribe_keys
                ),
            ));
        }
        Ok(())
    }

    /// The sync keys of a Subscribe, sorted and without duplicates.
    fn subscribe_keys(&self, keys: &[String]) -> Result<Vec<SyncKey>> {
        let mut parsed = keys
            .iter()
            .enumerate()
            .map(|(i, k)| SyncKey::parse(&format!("sync_keys[{i}]"), k))
            .collect::<Result<Vec<_>>>()?;
        parsed.sort();
        parsed.dedup();
        Ok(parsed)
    }

    /// Validates one document write (Put, a BulkPut item).
    fn doc_write(
        &self,
        field: &str,
        id: &str,
        rev: &str,
        body: Option<prost_types::Struct>,
        aliases: &[String],
    ) -> Result<DocWrite> {
        let id = DocId::parse(&format!("{field}id"), id)?;
        let rev = parse_optional_rev(&format!("{field}rev"), rev)?;
        let body_field = format!("{field}body");
        let body = body.ok_or_else(|| {
            Error::invalid(
                &body_field,
                "a body is required; send a JSON object (an empty one is fine)",
            )
        })?;
        let body = crate::domain::Body::parse(
            &body_field,
            convert::struct_to_json(&body_field, body)?,
            self.body_limits,
        )?;
        Ok(DocWrite {
            id,
            rev,
            change: DocChange::Put(body),
            aliases: Alias::parse_list(&format!("{field}notify_aliases"), aliases)?,
        })
    }
}

/// One Subscribe stream: the subscription and who listens. The caller's
/// grants are re-checked on every auth reload: a revoked token ends the
/// stream (UNAUTHENTICATED), changed grants apply to the next notification.
struct Listener {
    subscription: Subscription<Store>,
    caller: Arc<Principal>,
    auth: Arc<Authenticator>,
    auth_changes: tokio::sync::watch::Receiver<u64>,
    /// For the log line when the stream closes.
    opened: std::time::Instant,
    notifications: u64,
}

/// A principal in logs: its name, or "-" for the open mode's.
fn log_name(principal: &Principal) -> &str {
    match principal.limit_key() {
        "" => "-",
        name => name,
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        tracing::info!(
            principal = log_name(&self.caller),
            keys = self.subscription.keys().len(),
            duration_ms = self.opened.elapsed().as_secs_f64() * 1000.0,
            notifications = self.notifications,
            "subscribe stream closed"
        );
    }
}

impl Listener {
    async fn next(&mut self) -> Result<pb::SubscribeResponse> {
        loop {
            tokio::select! {
                biased;
                // `self.auth` keeps the sender alive: this never fails.
                Ok(()) = self.auth_changes.changed() => {
                    let caller = self.auth.recheck(&self.caller)?;
                    if caller.limit_key() != self.caller.limit_key() {
                        // The stream listens, and is counted, as the old
                        // principal: it cannot change identity mid-stream.
                        return Err(Error::Revoked(format!(
                            "your token now belongs to principal {:?}, not {:?}; subscribe again",
                            caller.limit_key(),
                            self.caller.limit_key()
                        )));
                    }
                    for key in self.subscription.keys() {
                        caller.require_subscribe(key.as_str())?;
                    }
                    self.caller = caller;
                }
                item = self.subscription.next() => {
                    let item = item?;
                    if matches!(item, crate::hub::Item::Notification(_)) {
                        self.notifications += 1;
                    }
                    return Ok(convert::subscribe_item(item, &self.caller));
                }
            }
        }
    }
}

fn parse_optional_rev(field: &str, rev: &str) -> Result<Option<Rev>> {
    if rev.is_empty() {
        Ok(None)
    } else {
        Rev::parse(field, rev).map(Some)
    }
}

/// A BulkPut result from a recorded or computed item reply.
fn bulk_result(item: ItemReply) -> pb::BulkPutResult {
    pb::BulkPutResult {
        id: item.id,
        rev: item.rev,
        seq: item.seq,
        error: item.error,
        reason: item.reason,
    }
}

/// What makes a write call idempotent: its request_id (if any), the
/// caller's principal, and a fingerprint of the request without its
/// request_id (prost encodes maps in key order, so equal requests encode
/// equally). `method` keeps a Put and a Delete with one id apart.
fn idempotency<M: prost::Message + Clone>(
    caller: &Principal,
    method: &str,
    request_id: &str,
    message: &M,
    clear: impl FnOnce(&mut M),
) -> Result<Option<Idempotency>, Status> {
    use sha2::{Digest, Sha256};
    let Some(request_id) = RequestId::parse("request_id", request_id)? else {
        return Ok(None);
    };
    let mut without_id = message.clone();
    clear(&mut without_id);
    let mut hash = Sha256::new();
    hash.update(method.as_bytes());
    hash.update([0]);
    hash.update(without_id.encode_to_vec());
    Ok(Some(Idempotency {
        principal: caller.limit_key().to_owned(),
        request_id,
        fingerprint: hash.finalize().into(),
        whole_call_fails_with_an_item: true,
        rejected: Vec::new(),
    }))
}

#[tonic::async_trait]
impl SyncService for Service {
    async fn create_database(
        &self,
        request: Request<pb::CreateDatabaseRequest>,
    ) -> Result<Response<pb::CreateDatabaseResponse>, Status> {
        caller(&request)?.require_admin()?;
        let req = request.into_inner();
        let name = DbName::parse("name", &req.name)?;
        let sync_key = if req.sync_key.is_empty() {
            SyncKey::from_db_name(&name)
        } else {
            SyncKey::parse("sync_key", &req.sync_key)?
        };
        let db = self.store.create_database(name, sync_key).await?;
        Ok(Response::new(pb::CreateDatabaseResponse {
            database: Some(convert::database(db)),
        }))
    }

    async fn delete_database(
        &self,
        request: Request<pb::DeleteDatabaseRequest>,
    ) -> Result<Response<pb::DeleteDatabaseResponse>, Status> {
        caller(&request)?.require_admin()?;
        let name = DbName::parse("name", &request.into_inner().name)?;
        self.store.delete_database(name).await?;
        Ok(Response::new(pb::DeleteDatabaseResponse {}))
    }

    async fn list_databases(
        &self,
        request: Request<pb::ListDatabasesRequest>,
    ) -> Result<Response<pb::ListDatabasesResponse>, Status> {
        let caller = caller(&request)?;
        let databases = self.store.list_databases().await?;
        Ok(Response::new(pb::ListDatabasesResponse {
            databases: databases
                .into_iter()
                .filter(|db| caller.may_see(&db.name))
                .map(convert::database)
                .collect(),
        }))
    }

    async fn new_id(
        &self,
        request: Request<pb::NewIdRequest>,
    ) -> Result<Response<pb::NewIdResponse>, Status> {
        caller(&request)?;
        let count = match request.into_inner().count {
            0 => 1,
            n if n > self.max_new_ids => {
                return Err(Error::invalid(
                    "count",
                    format!("{n} ids requested; at most {} per call", self.max_new_ids),
                )
                .into());
            }
            n => n,
        };
        Ok(Response::new(pb::NewIdResponse {
            ids: new_ids(count as usize)
                .into_iter()
                .map(DocId::into_string)
                .collect(),
        }))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_write(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        let request = idempotency(&caller, "Put", &req.request_id, &req, |r| {
            r.request_id.clear();
        })?;
        let write = self.doc_write("", &req.id, &req.rev, req.body, &req.notify_aliases)?;
        let out = self.store.write(database, write, request).await?;
        Ok(Response::new(pb::PutResponse {
            id: out.id,
            rev: out.rev,
            seq: out.seq,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_read(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        let id = DocId::parse("id", &req.id)?;
        let doc = self.store.get(&database, &id).await?;
        Ok(Response::new(pb::GetResponse {
            document: Some(convert::document(doc)?),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_write(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        let request = idempotency(&caller, "Delete", &req.request_id, &req, |r| {
            r.request_id.clear();
        })?;
        let write = DocWrite {
            id: DocId::parse("id", &req.id)?,
            rev: parse_optional_rev("rev", &req.rev)?,
            change: DocChange::Delete,
            aliases: Alias::parse_list("notify_aliases", &req.notify_aliases)?,
        };
        let out = self.store.write(database, write, request).await?;
        Ok(Response::new(pb::DeleteResponse {
            id: out.id,
            rev: out.rev,
            seq: out.seq,
        }))
    }

    async fn bulk_put(
        &self,
        request: Request<pb::BulkPutRequest>,
    ) -> Result<Response<pb::BulkPutResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_write(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        if req.docs.len() > self.max_bulk_docs {
            return Err(Error::invalid(
                "docs",
                format!(
                    "{} documents sent; at most {} per BulkPut, split the batch",
                    req.docs.len(),
                    self.max_bulk_docs
                ),
            )
            .into());
        }
        let mut request = idempotency(&caller, "BulkPut", &req.request_id, &req, |r| {
            r.request_id.clear();
        })?;
        let missing_ids = req.docs.iter().filter(|d| d.id.is_empty()).count();
        let mut fresh_ids = new_ids(missing_ids).into_iter();
        // Valid items go to the store; invalid ones answer in place.
        let mut rejected = Vec::new();
        let mut writes = Vec::with_capacity(req.docs.len());
        for (i, item) in req.docs.into_iter().enumerate() {
            let id = match item.id.is_empty() {
                true => fresh_ids.next().map(DocId::into_string).unwrap_or_default(),
                false => item.id,
            };
            let field = format!("docs[{i}].");
            match self.doc_write(&field, &id, &item.rev, item.body, &item.notify_aliases) {
                Ok(w) => writes.push(w),
                Err(e) => rejected.push((i, ItemReply::failed(id, &e))),
            }
        }
        if let Some(request) = &mut request {
            // A BulkPut succeeds as a call whatever its items' results: its
            // reply is recorded with every item's, the rejected ones too.
            request.whole_call_fails_with_an_item = false;
            request.rejected = rejected.clone();
        }
        let ids: Vec<String> = writes.iter().map(|w| w.id.to_string()).collect();
        // Sent even when no item is valid, so a missing database is NOT_FOUND.
        let items = match self.store.write_many(database, writes, request).await? {
            Written::Applied(results) => ItemReply::merge(rejected, ids.into_iter().zip(&results)),
            Written::Replayed(items) => items,
        };
        let results = items.into_iter().map(bulk_result).collect();
        Ok(Response::new(pb::BulkPutResponse { results }))
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_read(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        let limit = match req.limit {
            0 => self.changes_default_limit,
            n if n > self.changes_max_limit => {
                return Err(Error::invalid(
                    "limit",
                    format!(
                        "{n} is over the maximum page size of {}; page with last_seq instead",
                        self.changes_max_limit
                    ),
                )
                .into());
            }
            n => n,
        };
        // The page ends before the change that would pass the response
        // budget, so default clients (4 MiB receive limit) can read it.
        let budget = self.max_response_bytes.saturating_sub(RESPONSE_OVERHEAD);
        let mut changes: Vec<pb::Change> = Vec::new();
        let mut bytes = 0;
        let page = self
            .store
            .changes(
                ChangesQuery {
                    database: &database,
                    since: req.since,
                    limit,
                    include_docs: req.include_docs,
                },
                |change| {
                    let change = convert::change(change, req.json_bodies)?;
                    let len = prost::Message::encoded_len(&change);
                    let framed = 1 + prost::length_delimiter_len(len) + len;
                    if bytes + framed > budget && !changes.is_empty() {
                        return Ok(std::ops::ControlFlow::Break(()));
                    }
                    bytes += framed;
                    changes.push(change);
                    Ok(std::ops::ControlFlow::Continue(()))
                },
            )
            .await?;
        let last_seq = changes.last().map_or(req.since, |c| c.seq);
        Ok(Response::new(pb::ChangesResponse {
            changes,
            last_seq,
            database_created_seq: page.created_seq,
        }))
    }

    async fn notify(
        &self,
        request: Request<pb::NotifyRequest>,
    ) -> Result<Response<pb::NotifyResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_notify(&req.sync_key)?;
        let sync_key = SyncKey::parse("sync_key", &req.sync_key)?;
        let aliases = Alias::parse_list("aliases", &req.aliases)?;
        let attributes = parse_attributes("attributes", req.attributes)?;
        let seq = self.store.notify(sync_key, aliases, attributes).await?;
        Ok(Response::new(pb::NotifyResponse { seq }))
    }

    /// The subscription itself is the response stream: no task per
    /// subscriber. tonic polls it as the client's HTTP/2 window allows, and
    /// drops it (unregistering from the hub) when the client goes away.
    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Watched from before the grants are checked below: a reload after
        // the gate authenticated the caller is re-checked at the first poll.
        let mut auth_changes = self.auth.changes();
        auth_changes.mark_changed();
        let caller = caller(&request)?;
        let req = request.into_inner();
        self.subscribe_key_count(&req.sync_keys)?;
        for key in &req.sync_keys {
            caller.require_subscribe(key)?;
        }
        let keys = self.subscribe_keys(&req.sync_keys)?;
        // The one place the listener's identity is decided: the token's
        // principal when auth is on, else the requested alias.
        let requested = match req.alias.as_str() {
            "" => None,
            a => Some(Alias::parse("alias", a)?),
        };
        let request = SubscribeRequest {
            keys,
            alias: caller.listening_alias(requested)?,
            since: req.since,
            principal: caller.limit_key().to_owned(),
        };
        let subscription = Subscription::start(
            &self.hub,
            self.store.clone(),
            request,
            self.subscribe.clone(),
            self.shutdown.clone(),
        )
        .await?;
        tracing::info!(
            principal = log_name(&caller),
            keys = subscription.keys().len(),
            since = req.since,
            "subscribe stream opened"
        );
        let state = Listener {
            auth_changes,
            auth: self.auth.clone(),
            caller,
            subscription,
            opened: std::time::Instant::now(),
            notifications: 0,
        };
        // Yields items until the first error, which ends the stream.
        let stream = futures_util::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.next().await {
                Ok(item) => Some((Ok(item), Some(state))),
                Err(e) => Some((Err(Status::from(e)), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send + 'static>>;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        caller.require_read(&req.database)?;
        let database = DbName::parse("database", &req.database)?;
        let snapshot = self.store.snapshot(&database).await?;
        tracing::debug!(
            principal = log_name(&caller),
            database = %database,
            seq = snapshot.head.seq,
            "snapshot stream opened"
        );
        let messages = SnapshotMessages {
            snapshot,
            chunk: Vec::new().into_iter(),
            carry: None,
            json_bodies: req.json_bodies,
            budget: self
                .max_response_bytes
                .saturating_sub(RESPONSE_OVERHEAD)
                .min(SNAPSHOT_MESSAGE_BYTES),
            done: false,
            failed: None,
            sent: 0,
        };
        let shutdown = self.shutdown.clone();
        // Yields messages until the last one or the first error.
        let stream = futures_util::stream::unfold(Some(messages), move |state| {
            let shutdown = shutdown.clone();
            async move {
                let mut state = state?;
                let next = tokio::select! {
                    next = state.next() => next,
                    () = shutdown.cancelled() => Err(Error::Unavailable(format!(
                        "the server is shutting down; keep the documents received and load the rest with Changes(since={})",
                        state.sent
                    ))),
                };
                match next {
                    Ok(Some(message)) => Some((Ok(message), Some(state))),
                    Ok(None) => None,
                    Err(e) => Some((Err(Status::from(e)), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A Snapshot stream's messages: the store's chunks regrouped into
/// messages of about `budget` encoded bytes.
struct SnapshotMessages {
    snapshot: Snapshot,
    /// What is left of the chunk being sent.
    chunk: std::vec::IntoIter<crate::domain::Change>,
    /// A change that did not fit in the previous message.
    carry: Option<pb::Change>,
    json_bodies: bool,
    budget: usize,
    /// The last message (complete) was sent.
    done: bool,
    /// The snapshot failed after the changes of the message just sent.
    failed: Option<Error>,
    /// The seq of the last change in a message yielded (0 before any).
    sent: u64,
}

impl SnapshotMessages {
    async fn next(&mut self) -> Result<Option<pb::SnapshotResponse>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.done {
            return Ok(None);
        }
        let mut changes = Vec::new();
        let mut bytes = 0;
        loop {
            let change = match self.carry.take() {
                Some(change) => change,
                None => match self.chunk.next() {
                    Some(change) => convert::change(change, self.json_bodies)?,
                    None => match self.snapshot.next().await {
                        Ok(Some(chunk)) => {
                            self.chunk = chunk.into_iter();
                            continue;
                        }
                        Ok(None) => {
                            self.done = true;
                            return Ok(Some(self.message(changes, true)));
                        }
                        // What was taken goes out before the error, which
                        // tells the client to resume after it.
                        Err(e) if !changes.is_empty() => {
                            self.failed = Some(e);
                            return Ok(Some(self.message(changes, false)));
                        }
                        Err(e) => return Err(e),
                    },
                },
            };
            let len = prost::Message::encoded_len(&change);
            let framed = 1 + prost::length_delimiter_len(len) + len;
            if bytes + framed > self.budget && !changes.is_empty() {
                self.carry = Some(change);
                return Ok(Some(self.message(changes, false)));
            }
            bytes += framed;
            changes.push(change);
        }
    }

    fn message(&mut self, changes: Vec<pb::Change>, complete: bool) -> pb::SnapshotResponse {
        self.sent = changes.last().map_or(self.sent, |c| c.seq);
        pb::SnapshotResponse {
            changes,
            snapshot_seq: self.snapshot.head.seq,
            database_created_seq: self.snapshot.head.created_seq,
            complete,
        }
    }
}
