// The node runtime when the job store (Redis) goes away and when a stream is reopened while
// draining, against a real scheduler whose Redis sits behind a proxy the test can shut.
import assert from "node:assert/strict";
import { once } from "node:events";
import { after, before, test } from "node:test";
import { Client, JobState, type LeaseStatus, Node, type NodeOptions, stateName, UnavailableError } from "../src/index.js";
import { Proxy, type RunningScheduler, startRedis, startScheduler, TEST_FLAGS } from "./scheduler.js";

let redis: Awaited<ReturnType<typeof startRedis>>;
let redisProxy: Proxy;
let scheduler: RunningScheduler;
let client: Client;
const nodes: Node[] = [];

before(async () => {
  redis = await startRedis();
  redisProxy = await new Proxy(redis.socket).listen();
  // A long lease: a job must not expire while Redis is away (the expiry is not what is tested).
  const flags = [...TEST_FLAGS, "--lease-ms", "30000", "--redis-url", `redis://${redisProxy.target}`];
  scheduler = await startScheduler(flags);
  client = new Client(scheduler.target);
});
after(async () => {
  await Promise.all(nodes.map((n) => n.close()));
  client?.close();
  await scheduler?.stop();
  await redisProxy?.close();
  await redis?.stop();
});

function startNode(target: string, options: Omit<NodeOptions, "concurrency"> & { concurrency?: number }) {
  const node = new Node(target, { concurrency: 1, handleSignals: false, reconnectInitialMs: 20, reconnectMaxMs: 200, ...options });
  nodes.push(node);
  return { node, running: node.run() };
}

function gate() {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => (open = resolve));
  return { promise, open };
}

const submit = (src: string, tgt: string, index = 0) => retrying(() => client.submit({
  tenantId: "acme", sessionId: `r-${src}-${tgt}`, utteranceIndex: index, srcLang: src, tgtLang: tgt,
  payloadRef: `s3://audio/${src}${tgt}/${index}.opus`,
}));

/** A call, again while the scheduler's Redis connections recover (UNAVAILABLE). */
async function retrying<T>(call: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof UnavailableError)) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
const getJob = (jobId: string) => retrying(() => client.get(jobId));

/** Resolves with the first `event` emitted by `node` for which `match` holds. */
function when<T extends unknown[]>(node: Node, event: "refused" | "confirmed" | "warning", match: (...args: T) => boolean) {
  return new Promise<T>((resolve) => {
    const listener = (...args: unknown[]) => {
      if (match(...(args as T))) {
        node.off(event, listener);
        resolve(args as T);
      }
    };
    node.on(event, listener);
  });
}

test("Redis away: the handler keeps running, its result is kept and sent again until stored", { timeout: 30_000 }, async () => {
  const release = gate();
  let signal: AbortSignal | undefined;
  const { node, running } = startNode(scheduler.target, {
    nodeId: "ts-store-down", pairs: ["lt:mt"], resendAfterMs: 300,
    handler: async (a) => {
      signal = a.signal;
      await release.promise;
      return { textTranslated: "kept" };
    },
  });
  let registrations = 0;
  node.on("registered", () => registrations++);
  try {
    const assigned = once(node, "assigned");
    const { jobId } = await submit("lt", "mt");
    await assigned;
    // Heartbeats now fail: the scheduler answers UNAVAILABLE (a refusal or a message error).
    const unavailable = (s: LeaseStatus | string) => typeof s === "string" ? /UNAVAILABLE/.test(s) : s.errorCode === "UNAVAILABLE";
    const heartbeatFailed = Promise.race([when(node, "refused", unavailable), when(node, "warning", unavailable)]);
    redisProxy.refuse();
    await heartbeatFailed;
    assert.equal(signal?.aborted, false, "a heartbeat refused UNAVAILABLE does not abort the handler");
    assert.equal(node.inFlight, 1);

    const resultFailed = Promise.race([when(node, "refused", (s: LeaseStatus) => s.jobId === jobId && unavailable(s)),
      when(node, "warning", unavailable)]);
    release.open();
    await resultFailed;
    assert.equal(node.unconfirmed, 1, "a result refused UNAVAILABLE is kept");

    const confirmed = when(node, "confirmed", (s: LeaseStatus) => s.jobId === jobId);
    redisProxy.allow();
    const [status] = await confirmed;
    assert.equal(status.state, JobState.SUCCEEDED);
    assert.equal(node.unconfirmed, 0);
    assert.equal(registrations, 1, "settled on the same stream");
    const job = await getJob(jobId);
    assert.equal(stateName(job.state), "succeeded");
    assert.equal(job.attempt, 1);
    assert.equal(job.result?.textTranslated, "kept");
  } finally {
    redisProxy.allow();
    await node.stop();
  }
  await running;
});

test("a node that reconnects while draining says so on its register message: nothing new is assigned", { timeout: 30_000 }, async () => {
  const proxy = await new Proxy(scheduler.target).listen();
  const release = gate();
  const { node, running } = startNode(proxy.target, {
    nodeId: "ts-drain-reconnect", pairs: ["ga:cy"], concurrency: 2,
    handler: async () => {
      await release.promise;
      return { textTranslated: "last" };
    },
  });
  const assignedIds: string[] = [];
  node.on("assigned", (a) => assignedIds.push(a.jobId));
  try {
    const assigned = once(node, "assigned");
    const first = await submit("ga", "cy", 0);
    await assigned;
    const disconnected = once(node, "disconnected");
    proxy.refuse();
    await disconnected;
    const stopped = node.stop(); // while no stream is open: the drain goes with the next register
    const second = await submit("ga", "cy", 1); // a free slot, were the node not draining
    const registered = once(node, "registered");
    proxy.allow();
    await registered;
    release.open();
    await stopped;
    await running;
    assert.equal((await getJob(first.jobId)).state, JobState.SUCCEEDED);
    const queued = await getJob(second.jobId);
    assert.equal(queued.state, JobState.QUEUED);
    assert.equal(queued.attempt, 0, "never assigned (not even handed back)");
    assert.deepEqual(assignedIds, [first.jobId]);
  } finally {
    await node.close();
    await proxy.close();
  }
});
