"""``python -m benchmarks.tools [NAME [ARGS]]``: list the tools, or run one."""

import runpy
import sys

TOOLS = {
    "gpu_results": "merge the GPU runs' tables into the results files",
    "sass_count": "count a generated kernel's SASS instructions (no GPU needed)",
    "launch_bounds": "quantize time against resident blocks per SM (a GPU)",
    "make_fixture": "rebuild tests/data/smollm2_kv.npz from SmolLM2-135M",
}


def main(argv=None) -> None:
    """Run ``benchmarks.tools.NAME`` with the remaining arguments, or print the list."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TOOLS:
        width = max(map(len, TOOLS))
        print("usage: python -m benchmarks.tools NAME [ARGS]\n")
        print("\n".join(f"  {name:<{width}}  {what}" for name, what in TOOLS.items()))
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"\nunknown tool: {argv[0]}")
        return
    sys.argv = [f"benchmarks.tools.{argv[0]}", *argv[1:]]
    runpy.run_module(f"benchmarks.tools.{argv[0]}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
