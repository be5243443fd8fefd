# Sourced by scripts/test: the TypeScript SDK's tests (sdk/typescript), after pytest.
# run_ts_tests PYTHON   PYTHON is the virtualenv python the tests start schedulers with.
run_ts_tests() {
  local python=$1 dir=sdk/typescript major
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "scripts/test: Node.js 20+ (node and npm) is required for the TypeScript SDK tests in $dir;" \
         "install it (or set LINGUA_SKIP_TS=1 to skip them)" >&2
    return 2
  fi
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    echo "scripts/test: Node.js 20+ is required for the TypeScript SDK tests; found $(node --version)" >&2
    return 2
  fi
  # npm ci when node_modules is missing or was installed from another package-lock.json.
  local stamp="$dir/node_modules/.lingua-lock" want
  want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return $?
    echo "$want" > "$stamp"
  fi
  (cd "$dir" && LINGUA_PYTHON="$python" npm test --silent)
}
