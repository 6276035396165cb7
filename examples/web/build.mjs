// `npm run build`: type-checks src/ with tsc (esbuild only strips types),
// bundles src/main.ts (and @agsync/web with it) into dist/app.js with
// esbuild, and copies index.html, the stylesheet and the service worker.
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, rmSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
if (!existsSync(join(here, "..", "..", "clients", "web", "dist", "index.js"))) {
  console.error("build: ../../clients/web is not built: run `npm ci && npm run build` in clients/web first");
  process.exit(1);
}
const dist = join(here, "dist");
try {
  execFileSync(join(here, "node_modules", ".bin", "tsc"), ["-p", join(here, "tsconfig.json")], { stdio: "inherit" });
} catch {
  console.error("build: type errors (above)");
  process.exit(1);
}
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

await build({
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(dist, "app.js"),
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  minify: true,
  sourcemap: true,
  logLevel: "warning",
});
copyFileSync(join(here, "index.html"), join(dist, "index.html"));
copyFileSync(join(here, "src", "style.css"), join(dist, "style.css"));
copyFileSync(join(here, "src", "sw.js"), join(dist, "sw.js"));
console.log(`built dist/ (app.js ${Math.round(statSync(join(dist, "app.js")).size / 1024)} KiB)`);
