# Sourced by scripts/test, scripts/serve and scripts/bench: make (once) and refresh a virtualenv.
# ensure_venv DIR EXTRAS   e.g. ensure_venv .venv "[dev]"; reinstalls only when a pyproject.toml changed.
# Installs the repository (the server) and the Python SDK (sdk/python, import name lingua_sdk), both editable.
ensure_venv() {
  local venv=$1 extras=$2 python=${PYTHON:-python3}
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { echo "Python 3.11+ is required (set PYTHON=...)" >&2; exit 2; }
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  local stamp="$venv/.lingua-installed$extras" want
  want=$( (cat pyproject.toml sdk/python/pyproject.toml; declare -f ensure_venv) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # The SDK as a plain path (.pth), not an import hook: type checkers (mypy) find it as an installed,
    # typed package (py.typed), so an application's code is checked against it in this virtualenv too.
    "$venv/bin/python" -m pip install --quiet --upgrade pip \
      && "$venv/bin/python" -m pip install --quiet -e ./sdk/python --config-settings editable_mode=compat \
      && "$venv/bin/python" -m pip install --quiet -e ".$extras" \
      && echo "$want" > "$stamp"
  fi
}
