"""The one builder of generated kernels: source lines → compile → ``cuda.jit`` kernel.

A generated kernel is named by its *spec*: a frozen dataclass that carries every knob of the
generator (shape, bit width, dtypes, block size, launch bounds, …), with defaults resolved by
the generator module's ``spec(...)`` factory. ``spec.generate()`` returns the kernel's Python
source as lines (:class:`Source`), ``spec.source()`` the text, and :func:`build` compiles it
once per spec (``functools.cache``): the source is executed in a namespace of numpy, numba,
``math`` and the intrinsics of :mod:`rotorq.cuda.gen.intrinsics`, its function is wrapped by
:data:`rotorq.cuda._jit.kernel`, and the launch attributes the generator computed are set on
the kernel, with ``kern.spec`` and ``kern.source``. The source is registered with
:mod:`linecache` under a name that holds the spec, so tracebacks and the simulator show the
generated lines. :func:`dump` writes the sources of specs to a directory.

Examples
--------
>>> from rotorq.cuda.gen import wht
>>> s = wht.spec(128, half_in=True, half_out=True)
>>> s.source().startswith("def wht_tiled(x, out):")
True
"""

import dataclasses
import functools
import linecache
import math
import os
import re
from dataclasses import dataclass, field

import numba
import numpy as np
from numba import cuda

from .._jit import kernel
from . import intrinsics

GLOBALS = {"np": np, "cuda": cuda, "numba": numba, "math": math, "U16": np.uint16,
           "U32": np.uint32, "U64": np.uint64, **intrinsics.NAMES}
"""The namespace every generated source runs in (a generator adds its own constants)."""


@dataclass(frozen=True)
class Source:
    """What a generator produces: the function ``name`` defined by ``lines``, extra
    namespace entries ``env`` and the launch attributes ``attrs`` set on the kernel."""

    name: str
    lines: list
    env: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


class Spec:
    """Base of the generators' frozen dataclass specs."""

    def generate(self) -> Source:
        """The kernel's source lines and attributes (each generator defines it)."""
        raise NotImplementedError

    def source(self):
        """The generated Python source text."""
        return "\n".join(self.generate().lines) + "\n"

    def build(self):
        """The compiled kernel (:func:`build`)."""
        return build(self)

    def slug(self):
        """A file name for this spec: its class and fields, ``name=value`` joined by ``-``."""
        parts = [type(self).__name__] + [f"{f.name}={getattr(self, f.name)!r}"
                                          for f in dataclasses.fields(self)]
        return re.sub(r"[^\w.=,+-]", "", "-".join(parts).replace(" ", ""))


@functools.cache
def build(spec):
    """The ``cuda.jit`` kernel of ``spec``, compiled from its generated source once per spec.

    Parameters
    ----------
    spec : Spec
        A generator's frozen spec.

    Returns
    -------
    numba.cuda dispatcher
        With ``spec``, ``source`` and the generator's launch attributes.
    """
    gen = spec.generate()
    src = "\n".join(gen.lines) + "\n"
    filename = f"<rotorq.cuda.gen:{spec!r}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(GLOBALS)
    namespace.update(gen.env)
    exec(compile(src, filename, "exec"), namespace)
    kern = kernel(namespace[gen.name])
    kern.spec = spec
    kern.source = src
    for name, value in gen.attrs.items():
        setattr(kern, name, value)
    return kern


def dump(specs, directory):
    """Write each spec's generated source to ``directory/<spec.slug()>.py``; returns the paths.

    Parameters
    ----------
    specs : iterable of Spec
    directory : str or os.PathLike
        Created when missing.

    Returns
    -------
    list of str
    """
    os.makedirs(directory, exist_ok=True)
    paths = []
    for spec in specs:
        path = os.path.join(directory, spec.slug() + ".py")
        with open(path, "w") as f:
            f.write(spec.source())
        paths.append(path)
    return paths
