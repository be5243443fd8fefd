// Contract hygiene (issue 9 point 5): `buf lint` (STANDARD, exceptions in protos/buf.yaml) and
// `buf breaking` against the released v1 contract, the proto as of commit 6da018f.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { appendFileSync, cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { REPO_DIR, SDK_DIR } from "./scheduler.js";

const BUF = join(SDK_DIR, "node_modules", ".bin", "buf");
const RELEASED_V1 = "6da018f";
const PROTO = join("lingua", "scheduler", "v1", "scheduler.proto");

function buf(args: string[]): { status: number | null; output: string } {
  const r = spawnSync(BUF, args, { cwd: REPO_DIR, encoding: "utf8" });
  if (r.error) throw r.error;
  return { status: r.status, output: r.stdout + r.stderr };
}

/** buf breaking of `dir` against the released v1 protos in this repository's git history. */
function breaking(dir: string) {
  // buf clones the ref with a depth of 50 commits unless told: the release is further back than that.
  const since = spawnSync("git", ["rev-list", "--count", `${RELEASED_V1}..HEAD`], { cwd: REPO_DIR, encoding: "utf8" });
  const depth = Number(since.stdout.trim()) + 1 || 50;
  const r = buf(["breaking", dir, "--against", `.git#ref=${RELEASED_V1},depth=${depth},subdir=protos`]);
  if (/not a git repository|unknown revision|couldn't find remote ref|did not match/i.test(r.output)) {
    assert.fail(`buf breaking needs the git history down to ${RELEASED_V1} (a full clone): ${r.output}`);
  }
  return r;
}

/** A copy of protos/ to break on purpose. */
function copyOfProtos(): string {
  const dir = mkdtempSync(join(tmpdir(), "lingua-protos-"));
  cpSync(join(REPO_DIR, "protos"), dir, { recursive: true });
  return dir;
}

test("buf lint: the contract follows the STANDARD rules, less the listed exceptions", () => {
  const r = buf(["lint", "protos"]);
  assert.equal(r.status, 0, r.output);
});

test("buf lint fails on a rule the contract does not except", () => {
  const dir = copyOfProtos();
  try {
    appendFileSync(join(dir, PROTO), "\nmessage bad_name {}\n");
    const r = buf(["lint", dir]);
    assert.notEqual(r.status, 0);
    assert.match(r.output, /bad_name/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("buf breaking: the contract is compatible with the released v1", () => {
  const r = breaking("protos");
  assert.equal(r.status, 0, r.output);
});

test("buf breaking catches a renamed field of the released v1", () => {
  const dir = copyOfProtos();
  try {
    const file = join(dir, PROTO);
    const text = readFileSync(file, "utf8");
    assert.ok(text.includes("string payload_ref = 12;"));
    writeFileSync(file, text.replace("string payload_ref = 12;", "string payload_uri = 12;"));
    const r = breaking(dir);
    assert.notEqual(r.status, 0);
    assert.match(r.output, /payload_ref/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
