"""The scripts in samples/ and experiments/, and experiments/faults.py: they start from the repository root, write under
the untracked outputs/ unless told otherwise, and every path the docs name exists."""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(ROOT.glob("samples/*.py")) + sorted(ROOT.glob("experiments/*.py"))
# Parameters that name a file a script writes.
OUTPUT_PARAMETERS = {"out", "output", "grid_path"}


def test_scripts_are_where_the_docs_say():
    names = {path.relative_to(ROOT).as_posix() for path in SCRIPTS}
    assert {"samples/generate.py", "experiments/benchmark_speed.py", "experiments/benchmark_families.py",
            "experiments/compare_routers.py", "experiments/evaluate_multi_concept.py"} <= names
    assert not (ROOT / "samples" / "results").exists()


def test_every_script_prints_its_help_from_the_repository_root():
    # One interpreter runs them all, as `python <script> --help` would (the script's folder first on sys.path),
    # so torch and diffusers are imported once.
    runner = textwrap.dedent("""
        import runpy, sys
        for script in sys.argv[1:]:
            sys.argv = [script, "--help"]
            sys.path[0] = script.rsplit("/", 1)[0]
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exit:
                if exit.code not in (0, None):
                    raise
            else:
                raise AssertionError(f"{script} --help did not exit")
            print("HELP OK", script, flush=True)
    """)
    scripts = [path.relative_to(ROOT).as_posix() for path in SCRIPTS]
    result = subprocess.run([sys.executable, "-c", runner, *scripts], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("HELP OK")] == scripts


def _defaults(path: Path) -> dict:
    """The literal defaults of ``main``'s parameters, read without running the script."""
    main = next((node for node in ast.parse(path.read_text()).body
                 if isinstance(node, ast.FunctionDef) and node.name == "main"), None)
    if main is None:
        return {}
    parameters = main.args.args[len(main.args.args) - len(main.args.defaults):]
    return {parameter.arg: ast.literal_eval(default) for parameter, default in zip(parameters, main.args.defaults)
            if isinstance(default, ast.Constant)}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_default_outputs_are_untracked(path):
    defaults = _defaults(path)
    for name in OUTPUT_PARAMETERS & defaults.keys():
        assert defaults[name].startswith("outputs/"), f"{path.name}: --{name} defaults to {defaults[name]}"
    assert defaults.get("write_provenance", False) is False  # the embedded model's provenance.json is tracked


def test_output_defaults_are_read():
    # The check above must see the parameters it guards.
    assert _defaults(ROOT / "samples" / "generate.py")["out"] == "outputs/side_by_side.png"
    assert _defaults(ROOT / "experiments" / "compare_routers.py")["output"] == "outputs/router_comparison.json"
    assert _defaults(ROOT / "docs" / "faults.py")["out"] == "outputs/faults.md"


def test_gpu_compile_benchmark_rejects_unknown_arguments():
    result = subprocess.run(["bash", "experiments/benchmark_compile_gpu.sh", "--output", "x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--out FOLDER" in result.stderr
    assert not (ROOT / "x").exists()


PATH = re.compile(r"(?<![\w/.])((?:samples|experiments|docs/results|docs/images)/[\w./-]*\w\."
                  r"(?:py|sh|json|txt|md|png))")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def test_paths_named_in_docs_and_scripts_exist():
    files = (sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("docs/results/*.md")) + SCRIPTS
             + sorted(ROOT.glob("samples/*.sh")))
    named, missing = 0, []
    for file in files:
        text = file.read_text()
        paths = [ROOT / match for match in PATH.findall(text)]
        if file.suffix == ".md":  # markdown links are relative to the page
            paths += [file.parent / target for target in LINK.findall(text) if "://" not in target]
        named += len(paths)
        missing += [f"{file.relative_to(ROOT)}: {path}" for path in paths if not path.exists()]
    assert named > 50
    assert not missing, "\n".join(missing)
