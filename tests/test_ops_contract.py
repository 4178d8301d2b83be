"""Both backends implement every operation of :mod:`rotorq._ops` with its signature.

The CUDA backend imports cupy, which CI lacks: its signatures are read from the source.
"""

import ast
import inspect
import pathlib

import pytest

import rotorq
from rotorq import _ops, cpu

CUDA_API = pathlib.Path(rotorq.__file__).parent / "cuda" / "api.py"
CUDA_PLANS = CUDA_API.parent / "plans.py"


def _declared(name):
    return [(p.name, p.kind, p.default) for p in _ops.signature(name).parameters.values()]


def _source_signature(fn: ast.FunctionDef):
    args = fn.args
    pos = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(pos) - len(args.defaults)) + [
        ast.literal_eval(d) if not isinstance(d, ast.Attribute) else ast.unparse(d)
        for d in args.defaults]
    out = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, d) for a, d in zip(pos, defaults, strict=True)]
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append((a.arg, inspect.Parameter.KEYWORD_ONLY,
                    inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    return out


def _cuda_functions():
    """The backend functions of rotorq.cuda: api's exports and plans' prepare_scores."""
    fns = {}
    for path in (CUDA_API, CUDA_PLANS):
        tree = ast.parse(path.read_text())
        fns.update({n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)})
    return fns


@pytest.mark.parametrize("name", sorted(_ops.OPERATIONS))
def test_cpu_implements(name):
    fn = getattr(cpu, name, None)
    assert callable(fn), f"rotorq.cpu lacks {name}"
    got = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    assert got == _declared(name)


@pytest.mark.parametrize("name", sorted(_ops.OPERATIONS))
def test_cuda_implements(name):
    fns = _cuda_functions()
    assert name in fns, f"rotorq.cuda.api lacks {name}"
    assert _source_signature(fns[name]) == _declared(name)


def test_cuda_exports_every_operation():
    tree = ast.parse(CUDA_API.read_text())
    exported = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in n.targets))
    assert set(_ops.OPERATIONS) <= set(exported) | {"prepare_scores"}


def test_the_contract_test_can_fail():
    """A drifted signature is caught: the comparison is not vacuous."""
    src = "def wht(x, out_dtype=None, twin=False):\n    pass\n"
    fn = ast.parse(src).body[0]
    assert _source_signature(fn) != _declared("wht")
