// The README's TypeScript quick starts, run as they are written (issue 9 point 7): every ```ts block
// whose info string names a file (```ts client.ts) is written to that file, type-checked and
// compiled against this package, and run against a test scheduler (its address in place of
// 127.0.0.1:50051): the node snippet serves, the client snippet submits and waits, SIGTERM drains
// the node.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { REPO_DIR, type RunningScheduler, SDK_DIR, startScheduler } from "./scheduler.js";

const README_TARGET = "127.0.0.1:50051";
// Inside the package, so `import ... from "@lingua/scheduler-sdk"` resolves to it (self-reference).
const DIR = join(SDK_DIR, "dist", "readme");

let scheduler: RunningScheduler;
before(async () => {
  scheduler = await startScheduler();
});
after(async () => {
  await scheduler?.stop();
});

function snippets(): Map<string, string> {
  const readme = readFileSync(join(REPO_DIR, "README.md"), "utf8");
  const found = new Map<string, string>();
  for (const m of readme.matchAll(/^```ts ([\w.-]+\.ts)\n([\s\S]*?)^```$/gm)) found.set(m[1]!, m[2]!);
  return found;
}

test("README TypeScript quick starts: a node serves, a client submits and waits, SIGTERM drains", { timeout: 60_000 }, async () => {
  const found = snippets();
  const client = found.get("client.ts");
  const node = found.get("node.ts");
  assert.ok(client && node, `README needs \`\`\`ts client.ts and \`\`\`ts node.ts blocks; found ${[...found.keys()]}`);
  assert.ok(client.trimEnd().split("\n").length <= 5, "the client quick start is at most 5 lines");
  assert.ok(node.trimEnd().split("\n").length <= 15, "the node quick start is at most 15 lines");
  assert.ok(client.includes(README_TARGET) && node.includes(README_TARGET));

  rmSync(DIR, { recursive: true, force: true });
  mkdirSync(DIR, { recursive: true });
  for (const [name, text] of found) writeFileSync(join(DIR, name), text.replaceAll(README_TARGET, scheduler.target));
  writeFileSync(join(DIR, "tsconfig.json"), JSON.stringify({
    extends: "../../tsconfig.json", compilerOptions: { rootDir: ".", outDir: "out" }, include: ["*.ts"],
  }));
  const tsc = spawnSync(join(SDK_DIR, "node_modules", ".bin", "tsc"), ["-p", DIR], { encoding: "utf8" });
  assert.equal(tsc.status, 0, `the README snippets do not compile:\n${tsc.stdout}${tsc.stderr}`);

  const nodeProcess = spawn(process.execPath, [join(DIR, "out", "node.js")], { stdio: ["ignore", "pipe", "pipe"] });
  const nodeExit = once(nodeProcess, "exit");
  let nodeOutput = "";
  for (const s of [nodeProcess.stdout, nodeProcess.stderr]) s.setEncoding("utf8").on("data", (d: string) => (nodeOutput += d));
  try {
    const run = spawn(process.execPath, [join(DIR, "out", "client.js")], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    for (const s of [run.stdout, run.stderr]) s.setEncoding("utf8").on("data", (d: string) => (out += d));
    const [code] = await once(run, "exit");
    assert.equal(code, 0, `client snippet failed:\n${out}\nnode snippet:\n${nodeOutput}`);
    assert.equal(out.trim(), "hello");
  } finally {
    nodeProcess.kill("SIGTERM");
  }
  const [code, signal] = await nodeExit;
  assert.deepEqual([code, signal], [0, null], `the node snippet did not drain and exit on SIGTERM:\n${nodeOutput}`);
});
