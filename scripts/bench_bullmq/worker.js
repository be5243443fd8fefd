// One BullMQ worker process for scripts/bench: the trivial job (return its argument).
// Usage: node worker.js REDIS_URL CONCURRENCY   Prints "ready" once it is connected; stops on SIGTERM.
import { Worker } from 'bullmq';
import { QUEUE, connection } from './common.js';

const [url, concurrency] = process.argv.slice(2);
const worker = new Worker(QUEUE, async (job) => job.data.i, {
  connection: connection(url),
  concurrency: Number(concurrency),
});
worker.on('error', (err) => console.error(err));
await worker.waitUntilReady();
console.log('ready');

process.on('SIGTERM', async () => {
  await worker.close();
  process.exit(0);
});
