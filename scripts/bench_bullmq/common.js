// Shared by worker.js and producer.js: the connection options for a redis:// URL (BullMQ hands them to
// ioredis), and the queue's name.
export const QUEUE = 'bench';

export function connection(url) {
  const u = new URL(url);
  return { host: u.hostname, port: Number(u.port || 6379), db: Number(u.pathname.slice(1) || 0) };
}
