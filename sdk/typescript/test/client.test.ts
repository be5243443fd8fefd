import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import * as http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  CancelledError, Client, DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, JobState, Node, NotFoundError,
  ResourceExhaustedError, SDK_VERSION, SchedulerError, UnimplementedError, stateName,
} from "../src/index.js";
import { type RunningScheduler, TEST_FLAGS, startScheduler } from "./scheduler.js";

let scheduler: RunningScheduler;
let client: Client;

before(async () => {
  scheduler = await startScheduler();
  client = new Client(scheduler.target);
});
after(async () => {
  client?.close();
  await scheduler?.stop();
});

const spec = (sessionId: string, utteranceIndex: number, srcLang = "zh", tgtLang = "en") => ({
  tenantId: "acme", sessionId, utteranceIndex, srcLang, tgtLang, payloadRef: `s3://audio/${sessionId}/${utteranceIndex}.opus`,
});

test("submit and wait: a Node handler's result comes back to the client", { timeout: 30_000 }, async () => {
  const node = new Node(scheduler.target, {
    nodeId: "ts-e2e-1", pairs: ["zh:en"], concurrency: 2, handleSignals: false,
    handler: async ({ spec, attempt }) => ({
      textAsr: "你好", textTranslated: `hello from ${spec.payloadRef}`, ttsFormat: "opus", extra: { attempt: String(attempt) },
    }),
  });
  const running = node.run();
  try {
    const { jobId, created, state } = await client.submit(spec("e2e", 0));
    assert.equal(created, true);
    assert.equal(state, JobState.QUEUED);
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(job.result?.textTranslated, "hello from s3://audio/e2e/0.opus");
    assert.deepEqual(job.result?.extra, { attempt: "1" });
    assert.equal(job.nodeId, "ts-e2e-1");
    assert.equal(job.attempt, 1);
  } finally {
    await node.stop();
  }
  await running;
});

test("submitMany is idempotent per job; get, watch, cancel and listNodes", { timeout: 30_000 }, async () => {
  const first = await client.submitMany([spec("many", 0, "fr", "de"), spec("many", 1, "fr", "de")]);
  assert.deepEqual(first.map((r) => r.created), [true, true]);
  const again = await client.submitMany([spec("many", 0, "fr", "de")]);
  assert.equal(again[0]!.jobId, first[0]!.jobId);
  assert.equal(again[0]!.created, false);

  const jobId = first[0]!.jobId;
  assert.equal((await client.get(jobId)).state, JobState.QUEUED);
  const cancelled = await client.cancel(jobId, { reason: "user hung up" });
  assert.equal(cancelled.state, JobState.CANCELLED);
  const states = [];
  for await (const event of client.watch(jobId)) states.push(stateName(event.state));
  assert.deepEqual(states, ["queued", "cancelled"]); // and the stream ended after the terminal state

  const node = new Node(scheduler.target, {
    nodeId: "ts-lister", pairs: [["fr", "it"]], concurrency: 3, labels: { zone: "test" }, handleSignals: false,
    handler: async () => ({}),
  });
  const registered = once(node, "registered");
  const running = node.run();
  await registered;
  const nodes = await client.listNodes();
  const mine = nodes.find((n) => n.nodeId === "ts-lister");
  assert.ok(mine, `ts-lister not among ${nodes.map((n) => n.nodeId)}`);
  assert.deepEqual(mine.pools, ["fr:it"]);
  assert.equal(mine.maxConcurrency, 3);
  assert.deepEqual(mine.labels, { zone: "test" });
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
  assert.equal(mine.version, `lingua-sdk-typescript/${pkg.version}`, "SDK_VERSION is package.json's");
  assert.equal(SDK_VERSION, pkg.version);
  await node.stop();
  await running;
});

test("errors are typed and carry the gRPC code", { timeout: 30_000 }, async () => {
  await assert.rejects(client.get("not-a-job-id"), (err: unknown) => {
    assert.ok(err instanceof InvalidArgumentError);
    assert.ok(err instanceof SchedulerError);
    assert.equal(err.codeName, "INVALID_ARGUMENT");
    assert.equal(err.code, 3);
    assert.match(err.rawMessage, /^job_id: /);
    // the rich details (docs/errors.md): branch on these, not on the text
    assert.equal(err.reason, "INVALID_ARGUMENT");
    assert.equal(err.domain, "lingua.scheduler.v1");
    assert.deepEqual(err.fieldViolations.map((v) => v.field), ["job_id"]);
    assert.equal(err.retryDelayMs, undefined);
    return true;
  });
  await assert.rejects(client.get("zh:en:{0}01JE0000000000000000000000"), (err: unknown) => {
    assert.ok(err instanceof NotFoundError);
    assert.equal(err.reason, "JOB_NOT_FOUND");
    return true;
  });
  await assert.rejects(client.submit({ ...spec("bad", 0), srcLang: "ZH" }), (err: unknown) => {
    assert.ok(err instanceof InvalidArgumentError);
    assert.match(err.rawMessage, /jobs\[0\]\.src_lang/);
    assert.deepEqual(err.fieldViolations.map((v) => v.field), ["jobs[0].src_lang"]);
    return true;
  });
});

test("a tenant over its submit rate: ResourceExhaustedError with the retry delay", { timeout: 30_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "lingua-tenants-"));
  const file = join(dir, "tenants.toml");
  writeFileSync(file, '[tenant."acme"]\nsubmit_rate = 0.5\nsubmit_burst = 1\n');
  const limited = await startScheduler([...TEST_FLAGS, "--tenants", file]);
  const own = new Client(limited.target);
  try {
    await own.submit(spec("rated", 0));
    await assert.rejects(own.submit(spec("rated", 1)), (err: unknown) => {
      assert.ok(err instanceof ResourceExhaustedError);
      assert.equal(err.reason, "TENANT_RATE_LIMITED");
      assert.ok(err.retryDelayMs !== undefined && err.retryDelayMs > 0 && err.retryDelayMs <= 2000, `${err.retryDelayMs}`);
      assert.match(err.rawMessage, /tenant acme is over its submit_rate of 0.5 jobs\/s/);
      return true;
    });
  } finally {
    own.close();
    await limited.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("wait gives up after timeoutMs, and an AbortSignal cancels it", { timeout: 30_000 }, async () => {
  const { jobId } = await client.submit(spec("nobody-serves", 0, "ja", "ko"));
  await assert.rejects(client.wait(jobId, { timeoutMs: 200 }), DeadlineExceededError);
  const abort = new AbortController();
  const waiting = client.wait(jobId, { signal: abort.signal });
  abort.abort();
  await assert.rejects(waiting, CancelledError);
  assert.equal((await client.get(jobId)).state, JobState.QUEUED);
});

test("the token travels as authorization: Bearer metadata", { timeout: 30_000 }, async () => {
  // A bare HTTP/2 server that records the headers and answers UNIMPLEMENTED.
  const seen: http2.IncomingHttpHeaders[] = [];
  const server = http2.createServer();
  server.on("stream", (stream, headers) => {
    seen.push(headers);
    stream.respond({ ":status": 200, "content-type": "application/grpc", "grpc-status": "12", "grpc-message": "nope" },
      { endStream: true });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const port = (server.address() as { port: number }).port;
  const authed = new Client(`127.0.0.1:${port}`, { token: "s3cret" });
  try {
    await assert.rejects(authed.listNodes(), UnimplementedError);
    assert.equal(seen[0]?.authorization, "Bearer s3cret");
    assert.equal(seen[0]?.[":path"], "/lingua.scheduler.v1.Scheduler/ListNodes");
  } finally {
    authed.close();
    await new Promise((r) => server.close(r));
  }
});

test("watchSession delivers a session's finished jobs in utterance order", { timeout: 30_000 }, async () => {
  const ids = (await client.submitMany([0, 1, 2].map((i) => spec("ts-session", i, "fr", "it")))).map((r) => r.jobId);
  const stop = new AbortController();
  const seen: number[] = [];
  const reading = (async () => {
    for await (const event of client.watchSession("acme", "ts-session", { signal: stop.signal })) {
      seen.push(...event.jobs.map((j) => Number(j.spec?.utteranceIndex)));
      if (seen.length === 3) return event.resumeIndex;
    }
    return -1n;
  })();
  for (const i of [2, 0, 1]) await client.cancel(ids[i]!, { reason: "done" });
  assert.equal(await reading, 3n);
  stop.abort();
  assert.deepEqual(seen, [0, 1, 2]);
});

test("submit defaults utteranceIndex to 0 and rejects a fractional one; results serialise to JSON", { timeout: 30_000 }, async () => {
  const { jobId, stateName: submitted } = await client.submit({
    tenantId: "acme", sessionId: "no-index", srcLang: "nl", tgtLang: "sv", payloadRef: "s3://audio/no-index.opus",
  });
  assert.equal(submitted, "queued");
  const job = await client.get(jobId);
  assert.equal(job.spec?.utteranceIndex, 0n);
  assert.equal(job.stateName, "queued");
  const json = JSON.parse(JSON.stringify(job));
  assert.equal(json.jobId, jobId);
  assert.equal(json.state, "JOB_STATE_QUEUED");
  assert.equal(json.spec.utteranceIndex, "0"); // int64: a string in proto3 JSON
  assert.equal(typeof json.version, "string");
  await assert.rejects(client.submit({ tenantId: "acme", sessionId: "x", utteranceIndex: 1.5, srcLang: "nl", tgtLang: "sv" }),
    /utteranceIndex: expected a whole number, got 1.5/);

  const node = new Node(scheduler.target, {
    nodeId: "ts-json", pairs: ["nl:da"], concurrency: 1, handleSignals: false, handler: async () => ({}),
  });
  const registered = once(node, "registered");
  const running = node.run();
  await registered;
  const listed = JSON.parse(JSON.stringify(await client.listNodes()));
  const mine = listed.find((n: { nodeId: string }) => n.nodeId === "ts-json");
  assert.match(mine.connectedAt, /^\d{4}-\d\d-\d\dT/);
  await node.stop();
  await running;
});

test("admin calls: stats and listJobs, pause holds a pool, resume dispatches, retry, cancelSession", { timeout: 30_000 }, async () => {
  const queued = await client.submitMany([spec("admin", 0, "it", "es"), spec("admin", 1, "it", "es")]);
  const page = await client.listJobs({ pool: "it:es", pageSize: 1 });
  assert.deepEqual(page.jobs.map((j) => j.jobId), [queued[1]!.jobId]); // newest first
  const rest = await client.listJobs({ pool: "it:es", state: "queued", pageToken: page.nextPageToken });
  assert.deepEqual(rest.jobs.map((j) => j.jobId), [queued[0]!.jobId]);
  const paused = await client.pausePool("it:es", { reason: "upgrade" });
  assert.equal(paused.paused, true);
  assert.equal(paused.reason, "upgrade");
  const [stats] = (await client.getStats("it:es")).pools;
  assert.equal(stats?.paused, true);
  assert.equal(stats?.jobs.find((c) => c.state === JobState.QUEUED)?.count, 2n);
  assert.equal(JSON.parse(JSON.stringify(await client.getStats("it:es"))).pools[0].pool, "it:es");

  const node = new Node(scheduler.target, {
    nodeId: "ts-admin", pairs: ["it:es", "es:it"], concurrency: 2, handleSignals: false,
    handler: async () => ({ textTranslated: "ok" }),
  });
  const running = node.run();
  try {
    const other = await client.submit(spec("admin-other", 0, "es", "it")); // served while it:es holds
    assert.equal((await client.wait(other.jobId, { timeoutMs: 20_000 })).stateName, "succeeded");
    assert.equal((await client.get(queued[0]!.jobId)).stateName, "queued");
    assert.equal((await client.resumePool("it:es")).paused, false);
    for (const { jobId } of queued) assert.equal((await client.wait(jobId, { timeoutMs: 20_000 })).stateName, "succeeded");
    const drained = await client.drainNode("ts-admin");
    assert.equal(drained.draining, true);
    await running; // a drained node's run() resolves: it does not reconnect for more work
  } finally {
    await node.stop();
  }
  await running;
  const { jobId } = await client.submit(spec("admin-cancel", 0, "it", "ko"));
  const cancelled = await client.cancelSession("acme", "admin-cancel", { reason: "hung up" });
  assert.deepEqual(cancelled.cancelledJobIds, [jobId]);
  assert.equal((await client.get(jobId)).stateName, "cancelled");
  await assert.rejects(client.retry(jobId), FailedPreconditionError); // only failed or expired jobs
});
