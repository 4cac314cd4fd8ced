"""rlhf_core: the library behind the DVC stages of the RLHF pipeline, in layers; a module imports only from its
own layer and those below it (tests/test_import_graph.py):

    tooling   tracking, fingerprints, docs, the `rlhf` command, local test models
    phases    prompts, tasks, SFT, rollout (HF and vLLM), the reward, evaluation
    rl        KL, advantages, losses, trust region, optimizer, the algorithm registry and update loops
    runtime   what a stage runs on: its runner and launcher, warm start, processes and machines, progress, timing
    model     models, LoRA, batches, the shared forward pass, checkpoints, chat templates
    config    the typed params tree (its rules ask the algorithm registry, rl/algorithms/registry.py)
    errors, io

The math (rl.kl, rl.advantages, rl.losses) imports only torch and numpy.
"""

__version__ = "0.1.0"
