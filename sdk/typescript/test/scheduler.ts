// Test fixture: a real scheduler (python -m lingua_scheduler.server, embedded Redis in a temporary
// folder) on a free port, and a TCP proxy in front of it that a test can cut.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** sdk/typescript (this file runs from sdk/typescript/dist/test). */
export const SDK_DIR = resolve(fileURLToPath(import.meta.url), "../../..");
export const REPO_DIR = resolve(SDK_DIR, "../..");

/** The repository's virtualenv python (scripts/test makes it), or LINGUA_PYTHON. */
export function python(): string {
  const found = process.env.LINGUA_PYTHON ?? join(REPO_DIR, ".venv", "bin", "python");
  if (!existsSync(found)) {
    throw new Error(`no python at ${found}: run scripts/test once (it makes .venv), or set LINGUA_PYTHON`);
  }
  return found;
}

/** Short leases and quick retries, so the tests take little time; still lease >= 2 heartbeats. */
export const TEST_FLAGS = [
  "--lease-ms", "1000", "--heartbeat-interval-ms", "100", "--avoid-ms", "0", "--backoff-base-ms", "10",
  "--stream-grace-ms", "3000",
];

export interface RunningScheduler {
  /** "127.0.0.1:PORT" */
  target: string;
  stop(): Promise<void>;
}

/** Starts a scheduler and resolves once it printed its listening line. */
export async function startScheduler(flags: string[] = TEST_FLAGS): Promise<RunningScheduler> {
  const dataDir = mkdtempSync(join(tmpdir(), "lingua-ts-"));
  const child = spawn(python(), ["-m", "lingua_scheduler.server", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", dataDir, ...flags],
    { stdio: ["ignore", "pipe", "pipe"], cwd: REPO_DIR });
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (chunk: string) => (stderr = (stderr + chunk).slice(-20_000)));
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout! });
  const listening = (async () => {
    for await (const line of lines) {
      const m = /^lingua-scheduler listening on (\S+:\d+)$/.exec(line);
      if (m) return m[1]!;
    }
    throw new Error("the scheduler's stdout closed");
  })();
  let target: string;
  try {
    target = await Promise.race([listening, exited.then(([code]) => {
      throw new Error(`the scheduler exited (${code}) before listening:\n${stderr}`);
    })]);
  } catch (err) {
    child.kill("SIGKILL");
    rmSync(dataDir, { recursive: true, force: true });
    throw err;
  }
  lines.on("line", () => undefined); // keep draining stdout
  // A test process that dies (or is stopped by the runner) takes its scheduler with it.
  const orphaned = (): void => void child.kill("SIGKILL");
  process.on("exit", orphaned);
  return {
    target,
    async stop() {
      process.off("exit", orphaned);
      await terminate(child, exited);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

async function terminate(child: ChildProcess, exited: Promise<unknown>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
  await exited;
  clearTimeout(timer);
}

/** A private redis-server on a Unix socket in a temporary folder (the binary the scheduler's
 * embedded mode uses), to put a Proxy in front of. */
export async function startRedis(): Promise<{ socket: string; stop(): Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), "lingua-ts-redis-"));
  const find = spawnSync(python(), ["-c", "from lingua_scheduler.server.embedded import redis_server_binary as b; print(b())"],
    { encoding: "utf8", cwd: REPO_DIR });
  if (find.status !== 0) throw new Error(`no redis-server: ${find.stderr}`);
  const socket = join(dir, "redis.sock");
  const child = spawn(find.stdout.trim(), ["--port", "0", "--unixsocket", socket, "--dir", dir, "--save", "", "--appendonly", "no"],
    { stdio: ["ignore", "pipe", "pipe"] });
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout! });
  await Promise.race([
    new Promise<void>((resolve) => lines.on("line", (line) => /ready to accept connections/i.test(line) && resolve())),
    exited.then(([code]) => {
      throw new Error(`redis-server exited (${code}) before it was ready`);
    }),
  ]);
  const orphaned = (): void => void child.kill("SIGKILL");
  process.on("exit", orphaned);
  return {
    socket,
    async stop() {
      process.off("exit", orphaned);
      await terminate(child, exited);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A TCP proxy to `target` ("host:port", or the path of a Unix socket): cut() drops every
 * connection through it (the listener stays), refuse() also closes new ones until allow(), and
 * hold() drops the bytes the server sends from then on (the clients hear nothing) until cut(). */
export class Proxy {
  readonly #server: net.Server;
  readonly #sockets = new Set<net.Socket>();
  #holding = false;
  #refusing = false;
  target = "";

  constructor(upstream: string) {
    const [host, port] = [upstream.slice(0, upstream.lastIndexOf(":")), Number(upstream.slice(upstream.lastIndexOf(":") + 1))];
    this.#server = net.createServer((client) => {
      if (this.#refusing) {
        client.destroy();
        return;
      }
      const server = upstream.startsWith("/") ? net.connect(upstream) : net.connect(port, host);
      for (const s of [client, server]) {
        this.#sockets.add(s);
        s.on("close", () => this.#sockets.delete(s));
        s.on("error", () => undefined);
      }
      client.pipe(server);
      server.on("data", (chunk: Buffer) => {
        if (!this.#holding) client.write(chunk);
      });
      client.on("close", () => server.destroy());
      server.on("close", () => client.destroy());
    });
  }

  async listen(): Promise<this> {
    this.#server.listen(0, "127.0.0.1");
    await once(this.#server, "listening");
    this.target = `127.0.0.1:${(this.#server.address() as net.AddressInfo).port}`;
    return this;
  }

  hold(): void {
    this.#holding = true;
  }

  refuse(): void {
    this.#refusing = true;
    this.cut();
  }

  allow(): void {
    this.#refusing = false;
  }

  cut(): void {
    this.#holding = false;
    for (const s of this.#sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise((r) => this.#server.close(r));
  }
}
