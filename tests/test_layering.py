"""The core imports nothing heavy and does no I/O: numpy, pydantic and pycma only, checked for
every module of evomerge/core (a new module is covered without touching this test)."""

import subprocess
import sys
from pathlib import Path

CORE = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "evomerge" / "core").glob("*.py") if p.stem != "__init__"
)

BLOCKED = ["torch", "ray", "prefect", "lm_eval", "mergekit", "transformers", "fsspec", "prefect_ray", "yaml"]


def test_core_imports_without_torch_ray_prefect_lm_eval():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BLOCKED!r}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy, pydantic, cma, annotated_types  # and what they load (annotated_types: pydantic's, lazily)\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        f"for name in {CORE!r}:\n"
        "    __import__('evomerge.core.' + name)\n"
        "loaded = {m.split('.')[0] for m in sys.modules} - before\n"
        "third_party = {m for m in loaded if m not in sys.stdlib_module_names and m != 'evomerge'}\n"
        "print(sorted(third_party) or 'ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
