// Fails if src/gen/ is not what `buf generate` makes from the protos now:
// generates into a temporary copy and compares every file both ways.
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const committed = join(root, "src", "gen");
const work = mkdtempSync(join(tmpdir(), "agsync-web-gen-"));

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

try {
  const buf = join(root, "node_modules", ".bin", "buf");
  execFileSync(buf, ["generate", "--template", "buf.gen.yaml", "-o", work], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, PATH: `${join(root, "node_modules", ".bin")}:${process.env.PATH}` },
  });
  const fresh = join(work, "src", "gen");
  const want = new Map(files(fresh).map((f) => [relative(fresh, f), readFileSync(f, "utf8")]));
  const have = new Map(files(committed).map((f) => [relative(committed, f), readFileSync(f, "utf8")]));
  const problems = [];
  for (const [path, text] of want) {
    if (!have.has(path)) problems.push(`missing: src/gen/${path}`);
    else if (have.get(path) !== text) problems.push(`differs: src/gen/${path}`);
  }
  for (const path of have.keys()) if (!want.has(path)) problems.push(`not generated any more: src/gen/${path}`);
  if (problems.length) {
    console.error(`src/gen/ is stale; run \`npm run generate\` in clients/web and commit the result:\n  ${problems.join("\n  ")}`);
    process.exitCode = 1;
  } else {
    console.log(`src/gen/ is up to date (${want.size} files)`);
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
