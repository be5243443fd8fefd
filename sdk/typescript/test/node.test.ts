import assert from "node:assert/strict";
import { once } from "node:events";
import { after, before, test } from "node:test";
import {
  Client, FatalError, InvalidArgumentError, JobState, type LeaseStatus, Node, type NodeOptions, RetryableError, stateName,
} from "../src/index.js";
import { Proxy, type RunningScheduler, startScheduler, TEST_FLAGS } from "./scheduler.js";

let scheduler: RunningScheduler;
let client: Client;

before(async () => {
  scheduler = await startScheduler();
  client = new Client(scheduler.target);
});
const nodes: Node[] = [];
after(async () => {
  // Tests stop their nodes; a test that failed half-way may not have.
  await Promise.all(nodes.map((n) => n.close()));
  client?.close();
  await scheduler?.stop();
});

/** Each test serves its own pool, so no node of another test takes its jobs. */
const submit = (src: string, tgt: string, index = 0, maxAttempts = 0) => client.submit({
  tenantId: "acme", sessionId: `s-${src}-${tgt}`, utteranceIndex: index, srcLang: src, tgtLang: tgt,
  payloadRef: `s3://audio/${src}${tgt}/${index}.opus`, maxAttempts,
});

function startNode(target: string, options: Omit<NodeOptions, "concurrency"> & { concurrency?: number }) {
  const node = new Node(target, { concurrency: 1, handleSignals: false, ...options });
  nodes.push(node);
  const running = node.run();
  return { node, running };
}

/** A promise with its resolve function, to hold a handler until the test lets it go. */
function gate<T = void>() {
  let open!: (value: T) => void;
  const promise = new Promise<T>((resolve) => (open = resolve));
  return { promise, open };
}

test("a failing handler: any error and RetryableError retry, FatalError fails the job for good", { timeout: 30_000 }, async () => {
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-failing", pairs: ["ru:uk"],
    handler: async ({ attempt }) => {
      if (attempt === 1) throw new TypeError("model crashed");
      if (attempt === 2) throw new RetryableError("GPU busy");
      throw new FatalError("audio is not speech", { code: "BAD_AUDIO" });
    },
  });
  try {
    const { jobId } = await submit("ru", "uk", 0, 5);
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "failed");
    assert.equal(job.attempt, 3);
    assert.equal(job.lastError?.code, "BAD_AUDIO");
    assert.equal(job.lastError?.retryable, false);
    assert.match(job.lastError?.message ?? "", /audio is not speech/);
    const failures = [];
    for await (const e of client.watch(jobId)) if (e.error) failures.push([e.attempt, e.error.code, e.error.retryable]);
    // The codes of the Python SDK: HANDLER_EXCEPTION for any other error, RETRYABLE_ERROR by default.
    assert.deepEqual(failures, [[1, "HANDLER_EXCEPTION", true], [2, "RETRYABLE_ERROR", true], [3, "BAD_AUDIO", false]]);
  } finally {
    await node.stop();
  }
  await running;
});

test("a submit's traceContext reaches the node's assignment unchanged (the scheduler does not trace here)", { timeout: 30_000 }, async () => {
  const traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  const seen: Record<string, string>[] = [];
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-traced", pairs: ["ko:ja"],
    handler: async ({ spec }) => {
      seen.push({ ...spec.traceContext });
      return { textTranslated: "ok" };
    },
  });
  try {
    const { jobId } = await client.submit({
      tenantId: "acme", sessionId: "s-traced", srcLang: "ko", tgtLang: "ja", payloadRef: "s3://audio/koja/0.opus",
      traceContext: { traceparent, tracestate: "vendor=1" },
    });
    assert.equal(stateName((await client.wait(jobId, { timeoutMs: 20_000 })).state), "succeeded");
    assert.deepEqual(seen, [{ traceparent, tracestate: "vendor=1" }]);
  } finally {
    await node.stop();
  }
  await running;
});

test("a registration the scheduler refuses rejects run() with the typed error", { timeout: 30_000 }, async () => {
  const node = new Node(scheduler.target, {
    nodeId: "ts-bad-pair", pairs: ["ZH:en"], concurrency: 1, handleSignals: false, handler: async () => ({}),
  });
  nodes.push(node);
  await assert.rejects(node.run(), (err: unknown) => {
    assert.ok(err instanceof InvalidArgumentError);
    assert.match(err.rawMessage, /register\.pairs/);
    return true;
  });
});

test("cancelling a job aborts its handler's signal", { timeout: 30_000 }, async () => {
  const aborted = gate<unknown>();
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-cancel", pairs: ["sv:nb"],
    handler: async ({ signal }) => {
      await once(signal, "abort");
      aborted.open(signal.reason);
      return { textTranslated: "too late" }; // dropped: the job is no longer ours
    },
  });
  try {
    const assigned = once(node, "assigned");
    const { jobId } = await submit("sv", "nb");
    await assigned;
    const cancelledEvent = once(node, "cancelled");
    await client.cancel(jobId, { reason: "user hung up" });
    assert.match(String(await aborted.promise), /took the job back/);
    assert.deepEqual(await cancelledEvent, [jobId]);
    const job = await client.get(jobId);
    assert.equal(job.state, JobState.CANCELLED);
    assert.equal(job.result, undefined);
    assert.equal(node.inFlight, 0);
  } finally {
    await node.stop();
  }
  await running;
});

test("heartbeats keep a job that runs longer than its lease", { timeout: 30_000 }, async () => {
  // The test scheduler's lease is 1 s and its heartbeat interval 0.1 s: 15 heartbeats outlive a lease.
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-long", pairs: ["da:fi"],
    handler: async () => {
      let beats = 0;
      while (beats < 15) beats += ((await once(node, "heartbeat")) as [number])[0] > 0 ? 1 : 0;
      return { textTranslated: "slow but sure" };
    },
  });
  try {
    const { jobId } = await submit("da", "fi");
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(job.attempt, 1); // never taken back
  } finally {
    await node.stop();
  }
  await running;
});

test("after a cut stream the node reconnects and keeps the lease of the job it is running", { timeout: 30_000 }, async () => {
  const proxy = await new Proxy(scheduler.target).listen();
  const release = gate();
  const { node, running } = startNode(proxy.target, {
    nodeId: "ts-reconnect", pairs: ["pl:cs"], reconnectInitialMs: 20,
    handler: async () => {
      await release.promise;
      return { textTranslated: "survived" };
    },
  });
  try {
    const assigned = once(node, "assigned");
    const { jobId } = await submit("pl", "cs");
    await assigned;
    const disconnected = once(node, "disconnected");
    const registeredAgain = once(node, "registered");
    proxy.cut();
    const [error] = (await disconnected) as [Error | undefined];
    assert.ok(error, "a cut stream is an error");
    await registeredAgain; // with register.holding = the running job
    release.open();
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(job.attempt, 1, "the lease was resumed, not requeued");
    assert.equal(job.result?.textTranslated, "survived");
  } finally {
    await node.stop();
    await proxy.close();
  }
  await running;
});

test("stop() drains: no new work, the running job finishes, then run() resolves", { timeout: 30_000 }, async () => {
  const release = gate();
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-drain", pairs: ["hu:ro"], concurrency: 1,
    handler: async () => {
      await release.promise;
      return { textTranslated: "last one" };
    },
  });
  const assigned = once(node, "assigned");
  const first = await submit("hu", "ro", 0);
  await assigned;
  const second = await submit("hu", "ro", 1); // no free slot: stays queued
  const stopped = node.stop();
  release.open();
  await stopped;
  await running;
  assert.equal((await client.get(first.jobId)).state, JobState.SUCCEEDED);
  assert.equal((await client.get(second.jobId)).state, JobState.QUEUED, "a draining node takes no new job");
  assert.equal(node.inFlight, 0);
  const nodes = await client.listNodes();
  assert.ok(!nodes.some((n) => n.nodeId === "ts-drain"), "the drained node left the registry");
});

// Needs the scheduler to send SchedulerMessage.confirmed (issue 9 point 5).
test("the scheduler confirms a stored result, and the node forgets it", { timeout: 10_000 }, async () => {
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-confirm", pairs: ["et:lv"], handler: async () => ({ textTranslated: "stored" }),
  });
  try {
    const confirmed = once(node, "confirmed");
    const { jobId } = await submit("et", "lv");
    const [status] = (await confirmed) as [LeaseStatus];
    assert.equal(status.jobId, jobId);
    assert.equal(status.ok, true);
    assert.equal(status.state, JobState.SUCCEEDED);
    assert.equal(node.unconfirmed, 0);
  } finally {
    await node.stop();
  }
  await running;
});

// Needs the scheduler to confirm (or refuse) a completion sent again for a stored result.
test("an outcome whose confirmation was lost is sent again after a reconnect, then settled", { timeout: 10_000 }, async () => {
  const proxy = await new Proxy(scheduler.target).listen();
  const release = gate();
  const { node, running } = startNode(proxy.target, {
    nodeId: "ts-resend", pairs: ["bg:sr"], reconnectInitialMs: 20,
    handler: async () => {
      await release.promise;
      return { textTranslated: "once" };
    },
  });
  try {
    const assigned = once(node, "assigned");
    const { jobId } = await submit("bg", "sr");
    await assigned;
    proxy.hold(); // the scheduler's answers (the confirmation) no longer reach the node
    release.open();
    const job = await client.wait(jobId, { timeoutMs: 20_000 });
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(node.unconfirmed, 1, "the node keeps the outcome it has no confirmation for");
    const settled = new Promise<string>((resolve) => {
      node.on("confirmed", (s: LeaseStatus) => s.jobId === jobId && resolve("confirmed"));
      node.on("refused", (s: LeaseStatus) => s.jobId === jobId && resolve("refused"));
    });
    proxy.cut();
    assert.ok(["confirmed", "refused"].includes(await settled));
    assert.equal(node.unconfirmed, 0);
    const after = await client.get(jobId);
    assert.equal(after.version, job.version, "the repeat changed nothing");
    assert.equal(after.result?.textTranslated, "once");
  } finally {
    await node.stop();
    await proxy.close();
  }
  await running;
});



test("an idle node answers the scheduler's pings and stays registered past many ping timeouts", { timeout: 30_000 }, async () => {
  // Pinged after 200 ms of silence, dropped 1 s after an unanswered ping (slack for a loaded machine):
  // without answers an idle node would lose its stream within 1.2 s; 16 pings take over 3 s.
  const pinging = await startScheduler([...TEST_FLAGS, "--ping-interval-ms", "200", "--ping-timeout-ms", "1000"]);
  const pingClient = new Client(pinging.target);
  try {
    const { node, running } = startNode(pinging.target, { nodeId: "ts-idle", pairs: ["sv:nb"], handler: async () => ({}) });
    let registrations = 0;
    const disconnects: unknown[] = [];
    node.on("registered", () => registrations++);
    node.on("disconnected", (error) => disconnects.push(error ?? "closed"));
    const [ack] = (await once(node, "registered")) as [{ pingInterval?: unknown; pingTimeout?: unknown }];
    assert.ok(ack.pingInterval && ack.pingTimeout, "RegisterAck carries the ping settings");
    const ids: bigint[] = [];
    while (ids.length < 16) ids.push(((await once(node, "ping")) as [bigint])[0]);
    assert.deepEqual(ids, ids.map((_, i) => ids[0]! + BigInt(i)), "one stream: ping ids increase by one");
    assert.deepEqual([registrations, disconnects], [1, []], "never dropped, never reconnected");
    assert.deepEqual((await pingClient.listNodes()).map((n) => n.nodeId), ["ts-idle"]);
    await node.stop();
    await running;
  } finally {
    pingClient.close();
    await pinging.stop();
  }
});
