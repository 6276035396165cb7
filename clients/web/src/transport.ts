/**
 * The transport to an agsync server from a browser: gRPC-Web, binary format,
 * with an optional bearer token on every call.
 *
 * @module
 */
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

/** A bearer token, or a function asked for it before every call (so a token can change without a new transport). */
export type TokenSource = string | (() => string | null | undefined);

/** Options of {@link createAgsyncTransport}. */
export interface AgsyncTransportOptions {
  /**
   * The server's URL, e.g. `http://127.0.0.1:50051` (scheme, host and port;
   * no path). The server must list the page's origin with
   * `--cors-allow-origin` when it is another origin than the page's.
   */
  baseUrl: string;
  /** Sent as `authorization: Bearer <token>` when set and non-empty. */
  token?: TokenSource;
  /** More interceptors, run after the bearer token's. */
  interceptors?: Interceptor[];
  /** The fetch to use; the global one by default. */
  fetch?: typeof globalThis.fetch;
}

/**
 * An interceptor that adds `authorization: Bearer <token>` to every request
 * (unary and streaming) when the token is non-empty.
 */
export function bearerAuth(token: TokenSource): Interceptor {
  return (next) => async (req) => {
    const value = typeof token === "function" ? token() : token;
    if (value) req.header.set("authorization", `Bearer ${value}`);
    return next(req);
  };
}

/**
 * A gRPC-Web transport (binary protobuf, which is smaller and faster than
 * gRPC-Web's JSON variant and the only one agsync serves) for
 * `createClient(SyncService, transport)` or {@link SyncClient}.
 */
export function createAgsyncTransport(options: AgsyncTransportOptions): Transport {
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined) interceptors.push(bearerAuth(options.token));
  interceptors.push(...(options.interceptors ?? []));
  return createGrpcWebTransport({
    baseUrl: options.baseUrl,
    useBinaryFormat: true,
    interceptors,
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
}
