// The token option against a real scheduler with authentication on (--auth-jwt-key), with real tokens
// minted by `python -m lingua_scheduler.server token` (the server's own tool) from an HS256 key made
// for the test.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  Client, JobState, Node, NotFoundError, PermissionDeniedError, UnauthenticatedError, stateName,
} from "../src/index.js";
import { REPO_DIR, type RunningScheduler, TEST_FLAGS, python, startScheduler } from "./scheduler.js";

let dir: string;
let key: string;
let scheduler: RunningScheduler;

/** `lingua-scheduler token ARGS --key <the test's key>`: a signed bearer token. */
function mint(...args: string[]): string {
  const made = spawnSync(python(), ["-m", "lingua_scheduler.server", "token", ...args, "--key", key, "--ttl", "10m"],
    { encoding: "utf8", cwd: REPO_DIR });
  assert.equal(made.status, 0, made.stderr);
  return made.stdout.trim();
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "lingua-ts-auth-"));
  key = join(dir, "k1.secret");
  writeFileSync(key, randomBytes(32).toString("hex"));
  scheduler = await startScheduler([...TEST_FLAGS, "--auth-jwt-key", key]);
});
after(async () => {
  await scheduler?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const spec = (tenantId: string, utteranceIndex: number) => ({
  tenantId, sessionId: "auth", utteranceIndex, srcLang: "zh", tgtLang: "en", payloadRef: `s3://a/${utteranceIndex}.opus`,
});

test("a client token submits and reads its tenant's jobs, and only those", { timeout: 30_000 }, async () => {
  const acme = new Client(scheduler.target, { token: mint("--role", "client", "--tenant", "acme") });
  const globex = new Client(scheduler.target, { token: mint("--role", "client", "--tenant", "globex") });
  try {
    const { jobId, created } = await acme.submit(spec("acme", 0));
    assert.equal(created, true);
    assert.equal((await acme.get(jobId)).state, JobState.QUEUED);
    // Another tenant's submit is refused; another tenant's job reads as unknown.
    await assert.rejects(acme.submit(spec("globex", 1)), PermissionDeniedError);
    await assert.rejects(globex.get(jobId), NotFoundError);
    await assert.rejects(globex.cancel(jobId), NotFoundError);
    assert.equal((await acme.get(jobId)).state, JobState.QUEUED); // the refused cancel changed nothing
  } finally {
    acme.close();
    globex.close();
  }
});

test("without a token, or with a token not signed by the server's key: UNAUTHENTICATED", { timeout: 30_000 }, async () => {
  const anonymous = new Client(scheduler.target);
  const forged = new Client(scheduler.target, { token: `${mint("--role", "admin")}x` });
  try {
    await assert.rejects(anonymous.submit(spec("acme", 2)), UnauthenticatedError);
    await assert.rejects(anonymous.get("01HZZZZZZZZZZZZZZZZZZZZZZZ"), UnauthenticatedError);
    await assert.rejects(forged.submit(spec("acme", 3)), UnauthenticatedError);
  } finally {
    anonymous.close();
    forged.close();
  }
});

test("a node token registers its node and completes a client's job", { timeout: 30_000 }, async () => {
  const client = new Client(scheduler.target, { token: mint("--role", "client", "--tenant", "acme") });
  const node = new Node(scheduler.target, {
    token: mint("--role", "node", "--node-id", "ts-auth-*"),
    nodeId: "ts-auth-1", pairs: ["zh:en"], concurrency: 1, handleSignals: false,
    handler: async ({ spec }) => ({ textTranslated: `done ${spec.utteranceIndex}` }),
  });
  const registered = once(node, "registered");
  const running = node.run();
  try {
    await registered;
    const { jobId } = await client.submit(spec("acme", 4));
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(job.result?.textTranslated, "done 4");
    assert.equal(job.nodeId, "ts-auth-1");
  } finally {
    await node.stop();
    client.close();
  }
  await running;
});

test("a node token does not cover another node id: run() rejects with PERMISSION_DENIED", { timeout: 30_000 }, async () => {
  const node = new Node(scheduler.target, {
    token: mint("--role", "node", "--node-id", "ts-auth-*"),
    nodeId: "gpu-victim", pairs: ["zh:en"], concurrency: 1, handleSignals: false,
    handler: async () => ({}),
  });
  await assert.rejects(node.run(), PermissionDeniedError);
});
