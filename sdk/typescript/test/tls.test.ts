// The tls option against real TLS and mutual-TLS schedulers, with certificates made for the test
// (scripts/certs.py, the Python suite's throwaway CA).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { Client, JobState, SchedulerError } from "../src/index.js";
import { REPO_DIR, type RunningScheduler, TEST_FLAGS, python, startScheduler } from "./scheduler.js";

let dir: string;
let tls: RunningScheduler;
let mtls: RunningScheduler;
const pem = (name: string) => readFileSync(join(dir, name));

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "lingua-ts-certs-"));
  const made = spawnSync(python(), [join(REPO_DIR, "scripts", "certs.py"), dir], { encoding: "utf8" });
  assert.equal(made.status, 0, made.stderr);
  const files = ["--tls-cert", join(dir, "server.crt"), "--tls-key", join(dir, "server.key")];
  tls = await startScheduler([...TEST_FLAGS, ...files]);
  mtls = await startScheduler([...TEST_FLAGS, ...files, "--tls-client-ca", join(dir, "ca.crt")]);
});
after(async () => {
  await tls?.stop();
  await mtls?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const spec = { tenantId: "acme", sessionId: "tls", utteranceIndex: 0, srcLang: "zh", tgtLang: "en", payloadRef: "s3://a/0.opus" };

test("TLS: a client trusting the CA submits and reads back", { timeout: 30_000 }, async () => {
  const client = new Client(tls.target, { tls: { ca: pem("ca.crt") } });
  try {
    const { jobId } = await client.submit(spec);
    assert.equal((await client.get(jobId)).state, JobState.QUEUED);
  } finally {
    client.close();
  }
});

test("mutual TLS: refused without a client certificate, served with one", { timeout: 30_000 }, async () => {
  const without = new Client(mtls.target, { tls: { ca: pem("ca.crt") } });
  try {
    // Refused in the handshake. With TLS 1.3 the client has finished its side before the server checks
    // the (missing) certificate, so the refusal arrives as a reset stream: CANCELLED or UNAVAILABLE.
    await assert.rejects(without.listNodes({ timeoutMs: 5_000 }), (err: unknown) =>
      err instanceof SchedulerError && ["CANCELLED", "UNAVAILABLE"].includes(err.codeName));
  } finally {
    without.close();
  }
  const client = new Client(mtls.target, { tls: { ca: pem("ca.crt"), cert: pem("client.crt"), key: pem("client.key") } });
  try {
    assert.deepEqual(await client.listNodes(), []);
  } finally {
    client.close();
  }
});
