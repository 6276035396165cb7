// What decoding a Changes page costs the TypeScript client, without a
// server: one ChangesResponse of --docs (3876, a 4 MiB page) documents shaped
// like fill.py's, decoded with @bufbuild/protobuf's fromBinary (what the
// client does for each page: bodies are google.protobuf.Struct, turned into
// JSON objects), against JSON.parse of the same page as JSON text (what the
// client would pay if bodies came as JSON).
//
//   node bench/bootstrap/decode.mjs [--docs 3876] [--rounds 30]
//
// Prints the median time per page and per document of each.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

const web = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "clients", "web");
const { ChangesResponseSchema } = await import(pathToFileURL(join(web, "dist", "index.js")).href);
const dir = join(web, "node_modules", "@bufbuild", "protobuf");
const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
const { create, toBinary, fromBinary } = await import(pathToFileURL(join(dir, pkg.exports["."].import)).href);

const { values: args } = parseArgs({
  options: { docs: { type: "string", default: "3876" }, rounds: { type: "string", default: "30" } },
});
const n = Number(args.docs);
const rounds = Number(args.rounds);

// fill.py's body(i).
const ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const SOURCE = ALPHABET.repeat(Math.floor(900 / ALPHABET.length) + 2);
const body = (i) => ({
  n: i,
  title: `Document ${i}`,
  kind: "note",
  done: i % 3 === 0,
  tags: ["bootstrap", `group-${i % 100}`],
  text: SOURCE.slice(i % ALPHABET.length, (i % ALPHABET.length) + 900),
});
const changes = Array.from({ length: n }, (_, i) => ({
  id: `d${String(i).padStart(7, "0")}`,
  rev: `1-${"0123456789abcdef".repeat(2)}`,
  seq: BigInt(i + 1),
  deleted: false,
  body: body(i),
}));
const bytes = toBinary(ChangesResponseSchema, create(ChangesResponseSchema, { changes, lastSeq: BigInt(n) }));
const json = JSON.stringify({ changes: changes.map((c) => ({ ...c, seq: String(c.seq) })), lastSeq: String(n) });

function time(f) {
  const ms = [];
  for (let r = 0; r < rounds; r++) {
    const t = performance.now();
    const out = f();
    ms.push(performance.now() - t);
    if (out.changes.length !== n) throw new Error("short decode");
  }
  ms.sort((a, b) => a - b);
  return ms[Math.floor(ms.length / 2)];
}

const pb = time(() => fromBinary(ChangesResponseSchema, bytes));
const js = time(() => JSON.parse(json));
const line = (what, size, ms) =>
  `${what}: ${(size / 1048576).toFixed(2)} MiB, ${ms.toFixed(1)} ms/page, ${((1000 * ms) / n).toFixed(2)} us/doc`;
console.log(`decode of one page of ${n} documents, median of ${rounds}:`);
console.log("  " + line("protobuf (Struct bodies), fromBinary", bytes.length, pb));
console.log("  " + line("JSON text, JSON.parse", Buffer.byteLength(json), js));
