// The design note's session against agsync, in Node.js, as a test.
//
// 1. A subscriber listens to the database's sync key; each notification runs
//    loadRemoteChanges(): Changes since the last seq it loaded, into a local
//    replica.
// 2. The app creates a database, gets an id, creates a car, updates it; a
//    second writer with a stale revision gets ABORTED and handles the
//    conflict by re-reading and retrying.
// 3. The replica ends equal to the server's document, and a client that was
//    away resumes with `since` and receives exactly what it missed.
//
// Run against a server: `node session.js` (AGSYNC_ADDR, default
// 127.0.0.1:50051). Exits non-zero, loudly, if anything is not as expected.
'use strict';

const assert = require('assert');
const crypto = require('crypto');
const { grpc, connect, call, toStruct, fromStruct } = require('./agsync-client');

let passed = 0;
function check(cond, what) {
  assert.ok(cond, what);
  passed += 1;
  console.log(`ok: ${what}`);
}

class Replica {
  constructor(client, database) {
    Object.assign(this, { client, database, docs: new Map(), lastSeq: 0, waiters: [] });
  }

  // The loadRemoteChanges pattern: page through Changes since the last seq.
  async loadRemoteChanges() {
    for (;;) {
      const page = await call(this.client, 'Changes', {
        database: this.database, since: this.lastSeq, include_docs: true,
      });
      for (const change of page.changes) {
        if (change.deleted) this.docs.delete(change.id);
        else this.docs.set(change.id, { rev: change.rev, body: fromStruct(change.body) });
      }
      this.lastSeq = page.last_seq;
      if (page.changes.length === 0) break;
    }
    this.waiters = this.waiters.filter(([seq, resolve]) => (seq <= this.lastSeq ? (resolve(), false) : true));
  }

  caughtUp(seq) {
    if (this.lastSeq >= seq) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push([seq, resolve]));
  }
}

function subscribe(client, request, onEvent) {
  const stream = client.Subscribe(request);
  stream.on('data', onEvent);
  stream.on('error', (err) => {
    if (err.code !== grpc.status.CANCELLED) fail(new Error(`subscription ended: ${err.code} ${err.details}`));
  });
  return stream;
}

async function putWithRetry(client, database, id, rev, change) {
  let body = change;
  for (let attempt = 0; attempt < 10; attempt += 1) {
    try {
      return await call(client, 'Put', { database, id, rev, body: toStruct(body) });
    } catch (err) {
      if (err.code !== grpc.status.ABORTED) throw err;
      const { document } = await call(client, 'Get', { database, id });
      console.log(`conflict: now at ${document.rev}; re-reading, merging and retrying`);
      rev = document.rev;
      body = { ...fromStruct(document.body), ...change };
    }
  }
  throw new Error('too many conflicts');
}

async function main() {
  const client = connect();
  const suffix = crypto.randomBytes(4).toString('hex');
  const database = `cars_node_${suffix}`;
  const syncKey = `org.example.sync.Cars.${suffix}`;

  const created = await call(client, 'CreateDatabase', { name: database, sync_key: syncKey });
  check(created.database.sync_key === syncKey, 'database created with its sync key');

  const replica = new Replica(client, database);
  let live;
  const ready = new Promise((resolve) => { live = resolve; });
  const listener = subscribe(client, { sync_keys: [syncKey] }, (res) => {
    if (res.event === 'subscribed') live();
    else if (res.event === 'notification') replica.loadRemoteChanges().catch(fail);
  });
  await ready;
  check(true, 'subscriber is live');

  const [id] = (await call(client, 'NewId', {})).ids;
  check(/^[0-9a-f]{32}$/.test(id), 'NewId hands out a 32-hex id');

  const v1 = await call(client, 'Put', { database, id, body: toStruct({ model: 'Mustang', year: 1969 }) });
  check(v1.rev.startsWith('1-'), `created at ${v1.rev}`);
  const v2 = await call(client, 'Put', {
    database, id, rev: v1.rev, body: toStruct({ model: 'Mustang', year: 1969, color: 'red' }),
  });
  check(v2.rev.startsWith('2-'), `updated to ${v2.rev}`);

  // A second device still holds rev 1.
  await assert.rejects(
    call(client, 'Put', { database, id, rev: v1.rev, body: toStruct({ year: 1970 }) }),
    (err) => err.code === grpc.status.ABORTED && err.details.includes('Document update conflict'),
  );
  check(true, 'stale rev 1 is ABORTED with "Document update conflict"');
  const v3 = await putWithRetry(client, database, id, v1.rev, { year: 1970 });
  check(v3.rev.startsWith('3-'), `conflict resolved by re-reading: ${v3.rev}`);

  const { document } = await call(client, 'Get', { database, id });
  assert.deepStrictEqual(fromStruct(document.body), { model: 'Mustang', year: 1970, color: 'red' });
  check(true, 'the merge kept both edits');

  await replica.caughtUp(v3.seq);
  assert.deepStrictEqual(replica.docs.get(id), { rev: document.rev, body: fromStruct(document.body) });
  check(true, 'the replica caught up via Changes');

  // A device that was away resumes from the last seq it saw.
  const { seq: missed } = await call(client, 'Notify', { sync_key: syncKey, attributes: { reason: 'demo' } });
  const seen = await new Promise((resolve) => {
    const got = [];
    const resumed = subscribe(client, { sync_keys: [syncKey], since: v1.seq }, (res) => {
      if (res.event === 'notification') got.push(res.notification.seq);
      if (res.event === 'subscribed') { resumed.cancel(); resolve(got); }
    });
  });
  assert.deepStrictEqual(seen, [v2.seq, v3.seq, missed]);
  check(true, `resume with since=${v1.seq} replays ${JSON.stringify(seen)}`);

  listener.cancel();
  client.close();
  console.log(`${passed} passed, 0 failed`);
}

function fail(err) {
  console.error(`FAILED: ${err.stack || err}`);
  console.log(`${passed} passed, 1 failed`);
  process.exit(1);
}

main().catch(fail);
