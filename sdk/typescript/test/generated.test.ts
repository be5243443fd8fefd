// src/gen is what `npm run generate` makes from the protos today: regenerate and compare.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { test } from "node:test";
import { SDK_DIR } from "./scheduler.js";

function files(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (entry.isFile()) {
      const path = join(entry.parentPath, entry.name);
      out.set(relative(dir, path), readFileSync(path, "utf8"));
    }
  }
  return out;
}

test("the generated code is current (run `npm run generate` after editing a proto)", () => {
  const out = mkdtempSync(join(tmpdir(), "lingua-gen-"));
  try {
    const r = spawnSync(join(SDK_DIR, "node_modules", ".bin", "buf"), ["generate", "--output", out],
      { cwd: SDK_DIR, encoding: "utf8" });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const fresh = files(join(out, "src", "gen"));
    const committed = files(join(SDK_DIR, "src", "gen"));
    assert.ok(fresh.size > 0);
    assert.deepEqual([...committed.keys()].sort(), [...fresh.keys()].sort());
    for (const [path, text] of fresh) {
      assert.ok(committed.get(path) === text, `src/gen/${path} differs from a fresh \`npm run generate\``);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
