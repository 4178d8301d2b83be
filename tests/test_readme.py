"""Every ```python block of README.md runs as written, each in a fresh process."""

import importlib.util
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)

# Optional packages a block may import: (module, minimum version, how to get it).
OPTIONAL = (("torch", None, "pip install torch"),
            ("transformers", (5, 24), "pip install 'transformers>=5.24,<6'"))


def readme_blocks():
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 3


def _missing_optional(code):
    for module, minimum, install in OPTIONAL:
        if not re.search(rf"^\s*(import|from) {module}\b", code, re.MULTILINE):
            continue
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
        if minimum is not None:
            have = tuple(int(p) for p in re.findall(r"\d+", version(module))[:2])
            if have < minimum:
                return f"{module} {version(module)} is older than this block needs ({install})"
    return None


@pytest.mark.parametrize(("line", "code"), [pytest.param(line, code, id=f"line{line}")
                                            for line, code in readme_blocks()])
def test_readme_block_runs(tmp_path, line, code):
    first = code.splitlines()[0]
    missing = _missing_optional(code)
    if missing:
        pytest.skip(f"README block at line {line} ({first!r}) needs {missing}")
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (
        f"README block at line {line} starting {first!r} failed:\n{result.stderr}")
