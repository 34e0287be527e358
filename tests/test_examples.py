"""The examples the documentation site includes (docs/tutorials/*.md) run as they are shown.

quickstart.py, linear_attention.py, dynamic_sparse.py and kv_policies.py are run by tests/test_cli.py; this file
runs the others, and checks that no example in examples/ is left without a test.
"""

import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("name", ["build_layers.py", "see_attention.py", "see_heads.py"])
def test_example_runs(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_every_example_is_run_by_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    missing = [p.name for p in sorted(EXAMPLES.glob("*.py")) if f'"{p.name}"' not in tests]
    assert not missing, f"examples no test runs: {missing}"
