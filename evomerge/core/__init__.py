"""The pure core: configuration, merge-method registry, search space, optimizer, fitness and
records.

Nothing here imports torch, ray, prefect, lm_eval or mergekit, nor touches files or the network;
``tests/test_layering.py`` checks it.
"""
