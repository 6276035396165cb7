// The demo's service worker: keeps the page (HTML, script, stylesheet) so
// it loads without a network. Cache first, refreshed in the background; it
// never touches calls to the agsync server (another origin).
const CACHE = "agsync-demo-v1";
const SHELL = ["./", "index.html", "app.js", "style.css"];

self.addEventListener("install", (event) => {
  // Each file on its own: one that fails (the network went away) must not
  // keep the worker from installing; the fetch handler caches as it goes.
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => Promise.all(SHELL.map((url) => cache.add(url).catch(() => undefined))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  event.respondWith(
    caches.open(CACHE).then(async (cache) => {
      const key = url.pathname.endsWith("/") ? "./" : event.request;
      const cached = await cache.match(key, { ignoreSearch: true });
      const fresh = fetch(event.request)
        .then((res) => {
          if (res.ok) void cache.put(key, res.clone());
          return res;
        })
        .catch(() => undefined);
      if (cached) {
        event.waitUntil(fresh);
        return cached;
      }
      return (await fresh) ?? new Response("offline, and this page is not cached yet", { status: 503 });
    }),
  );
});
