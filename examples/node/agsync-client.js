// A small agsync client for Node.js: loads the project's proto at run time
// with @grpc/proto-loader, and converts between plain objects and
// google.protobuf.Struct.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');
const ADDRESS = process.env.AGSYNC_ADDR || '127.0.0.1:50051';

const definition = protoLoader.loadSync(path.join(PROTO_ROOT, 'agsync/v1/sync.proto'), {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the proto: sync_key, notify_aliases
  longs: Number, // seqs fit in a double for any realistic deployment
  enums: String,
  defaults: true,
  oneofs: true, // SubscribeResponse.event names the field that is set
});
const agsync = grpc.loadPackageDefinition(definition).agsync.v1;

function connect(address = ADDRESS) {
  return new agsync.SyncService(address, grpc.credentials.createInsecure());
}

/** Promise wrapper for a unary call: call(client, 'Put', {...}). */
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

/** A plain object as a google.protobuf.Struct. */
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}

function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case 'number': return { numberValue: v };
    case 'string': return { stringValue: v };
    case 'boolean': return { boolValue: v };
    case 'object': return { structValue: toStruct(v) };
    default: throw new TypeError(`cannot encode ${typeof v} in a Struct`);
  }
}

/** A google.protobuf.Struct as a plain object. */
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = fromValue(v);
  return out;
}

function fromValue(v) {
  switch (v.kind) { // the name of the oneof field that is set
    case 'nullValue': return null;
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'structValue': return fromStruct(v.structValue);
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    default: return null;
  }
}

module.exports = { grpc, agsync, connect, call, toStruct, fromStruct };
