"""Run upstream ``mergekit-evolve`` (mergekit 0.1.4) on a CPU-only machine; executed by the
upstream virtual environment's python (see ``upstream.py``), never imported by evomerge.

The shims, in every process (the driver and, through Ray's worker set-up hook, every actor):
``torch.cpu.empty_cache`` (absent in torch 2.13) does nothing, and lm-eval's ``HFLM`` runs on
``device="cpu"``. Ray starts locally (never attaching to another cluster) with one fake GPU for
mergekit's ``num_gpus=1`` actors. lm-eval's environment report and bootstrapped standard errors are skipped (speed only). Every score is logged in ``scores.jsonl`` (nothing else is changed). ``UPSTREAM_CMA_SEED`` goes into the options of the search's
one ``cma.fmin2`` call, because mergekit-evolve has no seed option.
"""

import os
import sys


def apply_shims() -> None:
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    import lm_eval.models.huggingface as hf

    original_init = hf.HFLM.__init__
    if getattr(original_init, "_cpu_shim", False):
        return

    def init_on_cpu(self, *args, **kwargs):
        kwargs["device"] = "cpu"
        original_init(self, *args, **kwargs)

    init_on_cpu._cpu_shim = True
    hf.HFLM.__init__ = init_on_cpu
    without_reports()


def without_reports() -> None:
    """Speed only, scores unchanged: lm-eval's environment report (``pip list``, git; 1.5 s of
    CPU per candidate) and its bootstrapped standard errors, neither of which enters
    mergekit-evolve's score, are skipped, as evomerge skips them."""
    import lm_eval
    import lm_eval.evaluator as evaluator

    evaluator.add_env_info = lambda storage: None
    evaluator.get_git_commit_hash = lambda: None
    simple_evaluate = lm_eval.simple_evaluate

    def without_bootstrap(*args, **kwargs):
        kwargs["bootstrap_iters"] = 0
        return simple_evaluate(*args, **kwargs)

    lm_eval.simple_evaluate = without_bootstrap


def log_scores() -> None:
    """Append every candidate's score, in the order pycma asked them, to ``scores.jsonl`` (the
    best within an exact evaluation count; ``fit.dat`` has one line per generation)."""
    import json

    import mergekit.evo.strategy as strategy

    for cls in vars(strategy).values():
        if isinstance(cls, type) and "evaluate_genotypes" in vars(cls):
            evaluate = cls.evaluate_genotypes

            def logged(self, genotypes, _evaluate=evaluate):
                results = _evaluate(self, genotypes)
                with open("scores.jsonl", "a") as out:
                    for result in results:
                        out.write(json.dumps(result["score"]) + "\n")
                return results

            cls.evaluate_genotypes = logged


def main() -> None:
    import cma
    import ray
    import torch

    torch.set_num_threads(1)
    apply_shims()
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": apply_shims},
    )
    # pycma reads a seed of 0 as "seed from the clock": benchmark seed s is pycma's s + 1.
    seed = int(os.environ["UPSTREAM_CMA_SEED"]) + 1
    fmin2 = cma.fmin2

    def seeded_fmin2(*args, options=None, **kwargs):
        return fmin2(*args, options={**(options or {}), "seed": seed}, **kwargs)

    cma.fmin2 = seeded_fmin2
    log_scores()
    from mergekit.scripts.evolve import main as evolve

    evolve(sys.argv[1:], standalone_mode=True)


if __name__ == "__main__":
    main()
