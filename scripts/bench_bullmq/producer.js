// The client side of BullMQ in scripts/bench: enqueue JOBS jobs with addBulk and read every result back
// from QueueEvents (the `completed` event carries the return value).
// Usage: node producer.js REDIS_URL JOBS   Prints "ready" once connected, waits for a line on stdin
// (the bench reads its counters then), runs, and prints one JSON line: the enqueue time, each job's
// result arrival time and latency, and this process's CPU seconds over the run.
import { createRequire } from 'node:module';
import { once } from 'node:events';
import { Queue, QueueEvents } from 'bullmq';
import { QUEUE, connection } from './common.js';

const [url, jobsArg] = process.argv.slice(2);
const jobs = Number(jobsArg);
const queue = new Queue(QUEUE, { connection: connection(url) });
const events = new QueueEvents(QUEUE, { connection: connection(url) });
await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
console.log('ready');
process.stdin.resume();
await once(process.stdin, 'data');

const arrived = new Map(); // job id -> [arrival time of its result (seconds), the result]
const want = new Map(); // job id -> the value it must return (known once addBulk returns)
let allDone;
const finished = new Promise((resolve) => { allDone = resolve; });
const check = () => {
  if (want.size === jobs && arrived.size >= jobs && [...want.keys()].every((id) => arrived.has(id))) allDone();
};
events.on('completed', ({ jobId, returnvalue }) => {
  arrived.set(jobId, [Date.now() / 1000, returnvalue]);
  check();
});

const cpu0 = process.cpuUsage();
const started = Date.now() / 1000;
const added = await queue.addBulk(Array.from({ length: jobs }, (_, i) => ({ name: 'noop', data: { i } })));
added.forEach((job, i) => want.set(job.id, i));
check();
await finished;
const cpu = process.cpuUsage(cpu0);
const version = createRequire(import.meta.url)('bullmq/package.json').version;
const results = [...want].map(([id, value]) => [...arrived.get(id), value]);
const endList = results.map(([at]) => at);
// Written whole before exiting: process.exit() does not wait for a pipe to take a line over 64 KiB.
const line = JSON.stringify({
  started, ends: endList, lat_ms: endList.map((t) => (t - started) * 1000),
  wrong: results.filter(([, got, value]) => Number(got) !== value).length,
  cpu_s: (cpu.user + cpu.system) / 1e6, version,
});
await new Promise((resolve) => process.stdout.write(line + '\n', resolve));
await Promise.all([events.close(), queue.close()]);
process.exit(0);
