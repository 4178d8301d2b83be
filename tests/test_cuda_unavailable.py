"""Without cupy, ``rotorq.cuda`` follows Python's attribute rules (regression: a doctest
collector's ``hasattr(rotorq.cuda, "__wrapped__")`` stopped the whole test run)."""

import ast
import pathlib
import subprocess
import sys

import rotorq

API = pathlib.Path(rotorq.__file__).parent / "cuda" / "api.py"

PROBE = r"""
import sys, inspect
sys.modules["cupy"] = None          # as if cupy were not installed
import rotorq.cuda as c
assert not hasattr(c, "__wrapped__") and not hasattr(c, "no_such_name")
inspect.unwrap(c)
try:
    c.quantize
except ImportError as exc:
    assert "rotorq[cuda13]" in str(exc), exc
else:
    raise AssertionError("quantize should raise ImportError")
try:
    c.no_such_name
except AttributeError:
    pass
print("ok")
"""


def test_attribute_probes_without_cupy():
    pytest = __import__("pytest")
    pytest.importorskip("numba.cuda")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={"NUMBA_ENABLE_CUDASIM": "0", "PATH": ""}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_backend_function_list_matches_api():
    pytest = __import__("pytest")
    pytest.importorskip("numba.cuda")
    tree = ast.parse(API.read_text())
    exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in n.targets))
    src = (API.parent / "__init__.py").read_text()
    listed = set(ast.literal_eval(src[src.index("frozenset(") + 10:src.index(")", src.index("frozenset("))]))
    assert listed == set(exported) | {"prepare_scores"}
