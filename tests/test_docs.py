"""Generated artefacts stay in step with their sources: FSM docs and protobuf code."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fsm_docs_match_the_machine(repo_root: Path) -> None:
    render = _load(repo_root / "scripts" / "render_fsm.py")
    docs = repo_root / "docs"
    dot = render.render_dot()
    assert (docs / "fsm.md").read_text() == render.render_markdown(), "run python scripts/render_fsm.py"
    assert (docs / "fsm.dot").read_text() == dot, "run python scripts/render_fsm.py"
    assert render.svg_stamp(dot) in (docs / "fsm.svg").read_text(), "fsm.svg was drawn from another machine"
    for state in ("queued", "assigned", "running", "succeeded", "failed", "cancelled", "expired"):
        assert f"`{state}`" in (docs / "fsm.md").read_text()


def test_generated_protobuf_code_is_current(repo_root: Path, tmp_path: Path) -> None:
    """The one copy (the SDK's, which the server imports too) is exactly what scripts/gen_protos makes."""
    copy = tmp_path / "repo"
    shutil.copytree(repo_root / "protos", copy / "protos")
    shutil.copytree(repo_root / "scripts", copy / "scripts")
    subprocess.run(["bash", str(copy / "scripts" / "gen_protos"), sys.executable], check=True)
    for folder in ("sdk/python/lingua_sdk/_proto",):
        fresh, committed = copy / folder, repo_root / folder
        names = sorted(p.name for p in fresh.iterdir())
        assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__"), folder
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        assert not mismatch and not errors, f"run scripts/gen_protos: {folder}: {mismatch or errors} differ"


def test_security_docs_show_the_authorization_table_of_the_code(repo_root: Path) -> None:
    from lingua_scheduler.server.auth import RULES, Role

    text = (repo_root / "docs" / "security.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in RULES:
            rows[cells[0]] = cells[1:]
    expected = {method: [grants[role].value if role in grants else "-" for role in (Role.CLIENT, Role.NODE)] + ["yes"]
                for method, grants in RULES.items()}
    assert rows == expected, "docs/security.md's table differs from RULES in server/auth.py"


def test_a_full_bench_run_keeps_the_hand_written_sections(tmp_path: Path) -> None:
    """scripts/bench rewrites docs/benchmarks.md; sections it does not write (measured by other
    commands) are carried over, and the ones it writes replace their old text."""
    import bench

    old = tmp_path / "benchmarks.md"
    old.write_text("# B\n\n## Lingua Scheduler, one instance\nold rows\n\n## Fleet (baseline)\nfleet rows\n")
    new = "# B\n\n## Lingua Scheduler, one instance (now)\nnew rows\n"
    kept = bench.kept_sections(old, new)
    assert "## Fleet (baseline)\nfleet rows" in kept and "old rows" not in kept
    assert bench.kept_sections(tmp_path / "missing.md", new) == ""
