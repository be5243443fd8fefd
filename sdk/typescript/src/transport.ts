// One HTTP/2 connection per Client or Node, speaking gRPC (connect-node's gRPC transport).
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

/** TLS settings: `true` for the system's CAs, or PEM material for a private CA / mutual TLS. */
export interface TlsOptions {
  /** CA certificates to trust instead of the system's (PEM). */
  ca?: string | Buffer;
  /** Client certificate and key for mutual TLS (PEM). */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Server name to verify, when it differs from the target's host. */
  serverName?: string;
}

export interface ConnectionOptions {
  /** Sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** TLS: implied by an https:// target; `true` or TlsOptions turn it on for a bare host:port. */
  tls?: boolean | TlsOptions;
}

export interface Connection {
  transport: Transport;
  close(): void;
}

/** The base URL of a target: "host:port" (http, or https with `tls`), or a full http(s):// URL. */
export function baseUrl(target: string, tls: ConnectionOptions["tls"]): string {
  if (/^https?:\/\//.test(target)) {
    if (target.startsWith("http://") && tls) throw new TypeError(`target ${target}: http:// with tls set; use https://`);
    return target;
  }
  return `${tls ? "https" : "http"}://${target}`;
}

export function connect(target: string, options: ConnectionOptions): Connection {
  const url = baseUrl(target, options.tls);
  const tls = typeof options.tls === "object" ? options.tls : {};
  const nodeOptions = url.startsWith("https:")
    ? { ca: tls.ca, cert: tls.cert, key: tls.key, ...(tls.serverName && { servername: tls.serverName }) }
    : {};
  // Our own session manager, so close() can end the connection (and the process can exit).
  const sessionManager = new Http2SessionManager(url, { pingIntervalMs: 10_000, pingIdleConnection: false }, nodeOptions);
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined) {
    const header = `Bearer ${options.token}`;
    interceptors.push((next) => (req) => {
      req.header.set("authorization", header);
      return next(req);
    });
  }
  const transport = createGrpcTransport({ baseUrl: url, sessionManager, interceptors });
  return { transport, close: () => sessionManager.abort() };
}
