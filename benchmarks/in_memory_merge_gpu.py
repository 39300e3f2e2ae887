"""In-memory merge against the on-disk path, at about 1B parameters, in one process.

    python benchmarks/in_memory_merge_gpu.py                    # ~1.1B Llama, bf16, on cuda
    python benchmarks/in_memory_merge_gpu.py --small --device cpu   # a quick check of the script

A randomly initialised Llama (hidden 2048, 16 layers, vocabulary 32000: 1.1B parameters) is saved
as the base model, with two "fine-tuned" copies (base + seeded noise). For each merge method, one
decoded search-space configuration is merged three ways:

- in memory: ``InMemoryMerger.merge_into`` writes the merge into a resident model on the device
  (what a ``--in-memory`` slot does per candidate);
- on disk: mergekit ``run_merge`` (cuda when the device is) into a folder, then
  ``from_pretrained`` of that folder onto the device (what an on-disk slot does before scoring);
- a plain copy of one source's tensors into the resident model: the least any in-place merge
  moves, as the throughput baseline.

Printed: seconds per candidate (median of ``--repeats``), the ratio on-disk / in-memory, bytes moved
per second against the copy, and whether the in-memory result equals the on-disk one bit for bit.
Evaluation is not included: it is the same forward passes either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from evomerge.backends.merger_memory import InMemoryMerger  # noqa: E402
from evomerge.core.config import GenomeDefinition  # noqa: E402
from evomerge.core.search_space import SearchSpace  # noqa: E402

METHODS = ("linear", "task_arithmetic", "ties", "slerp")


def build_models(root: Path, small: bool, dtype: torch.dtype, device: str) -> tuple[dict[str, Path], int, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (
        dict(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
        if small
        else dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
        )
    )
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    paths = {}
    for i, name in enumerate(("base", "expert_a", "expert_b")):
        if i:
            generator = torch.Generator(device=device).manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(
                        torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
                        * (0.01 * p.float().std()).to(dtype)
                    )
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True)
    return paths, params, config.num_hidden_layers


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a 1M-parameter model (checks the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the models and merges go (default: a temp dir)")
    args = parser.parse_args()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="evomerge-bench-"))
    started = time.perf_counter()
    paths, params, layers = build_models(root, args.small, dtype, args.device)
    print(
        f"models: {params / 1e9:.2f}B parameters, {args.dtype}, built and saved in "
        f"{time.perf_counter() - started:.0f} s; device {args.device}"
        f" ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'})",
        flush=True,
    )
    model_bytes = params * torch.finfo(dtype).bits // 8
    options = MergeOptions(
        cuda=args.device.startswith("cuda"),
        copy_tokenizer=False,
        quiet=True,
        out_shard_size=10**12,
        safe_serialization=True,
        lazy_unpickle=True,
        write_model_card=False,
        random_seed=0,
    )
    resident = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype).to(args.device).eval()
    source = {
        k: v.to(args.device)
        for k, v in AutoModelForCausalLM.from_pretrained(paths["expert_a"], dtype=dtype).state_dict().items()
    }

    def copy_once():
        with torch.no_grad():
            for name, p in resident.named_parameters():
                p.data.copy_(source[name])

    copy_seconds, _ = timed(copy_once, args.device, args.repeats)
    copy_rate = 2 * model_bytes / copy_seconds
    print(
        f"plain copy of the model's {model_bytes / 1e9:.2f} GB into the resident model: "
        f"{copy_seconds * 1e3:.1f} ms ({copy_rate / 1e9:.0f} GB/s read+written)\n",
        flush=True,
    )

    print(
        "| method | in memory (s) | disk: merge (s) | disk: load to device (s) | disk total / in memory "
        "| in-memory GB/s (read+written) | x copy time per byte | bit-identical |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(0)
    for method in METHODS:
        genome = GenomeDefinition(
            models=[str(paths["expert_a"]), str(paths["expert_b"])]
            if method != "linear"
            else [str(paths["base"]), str(paths["expert_a"]), str(paths["expert_b"])],
            merge_method=method,
            base_model=str(paths["base"])
            if method in ("task_arithmetic", "ties")
            else (str(paths["expert_a"]) if method == "slerp" else None),
            layer_granularity=layers // 4,
        )
        if method == "slerp":
            genome = genome.model_copy(update={"models": [str(paths["expert_b"])]})
        space = SearchSpace(genome, layers, dtype=args.dtype)
        config = space.decode(rng.uniform(0.2, 0.8, space.dimension))
        merger = InMemoryMerger.from_config(config, device=args.device)
        merger.merge_into(config, resident)  # warm-up: kernels, allocator
        memory_seconds, stats = timed(lambda m=merger, c=config: m.merge_into(c, resident), args.device, args.repeats)
        moved = stats.bytes_read + stats.bytes_written
        out = root / f"merged-{method}"

        def disk_merge(out=out, config=config):
            shutil.rmtree(out, ignore_errors=True)
            run_merge(MergeConfiguration.model_validate(config), str(out), options)

        merge_seconds, _ = timed(disk_merge, args.device, args.repeats)
        load_seconds, loaded = timed(
            lambda out=out: AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(args.device),
            args.device,
            args.repeats,
        )
        on_disk = loaded.state_dict()
        identical = all(torch.equal(t, on_disk[name]) for name, t in resident.state_dict().items() if name in on_disk)
        del loaded, on_disk
        merger = None  # frees its sources before the next method
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(
            f"| {method} | {memory_seconds:.3f} | {merge_seconds:.2f} | {load_seconds:.2f} | "
            f"{(merge_seconds + load_seconds) / memory_seconds:.1f} | {moved / memory_seconds / 1e9:.1f} | "
            f"{(memory_seconds / moved) / (copy_seconds / (2 * model_bytes)):.1f} | "
            f"{'yes' if identical else 'NO'} |",
            flush=True,
        )
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
