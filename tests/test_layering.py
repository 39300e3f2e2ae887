"""The core imports nothing heavy: numpy, pydantic and pycma only."""

import subprocess
import sys

BLOCKED = ["torch", "ray", "prefect", "lm_eval", "mergekit", "transformers", "fsspec", "prefect_ray"]


def test_core_imports_without_torch_ray_prefect_lm_eval():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BLOCKED!r}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import evomerge.core.config, evomerge.core.options, evomerge.core.search_space\n"
        "import evomerge.core.merge_methods\n"
        "import evomerge.core.optimizer, evomerge.core.fitness, evomerge.core.records\n"
        "import evomerge.core.search_loop, evomerge.core.run_spec\n"
        f"print(sorted(set(m.split('.')[0] for m in sys.modules) & set({BLOCKED!r})) or 'ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
