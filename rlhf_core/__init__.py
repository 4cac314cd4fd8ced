"""rlhf_core: the library behind the DVC stages of the RLHF pipeline.

Modules (one topic each): config, io, data, tasks, models, rollout, rewards, kl,
advantages, losses, algorithms, sft, evaluation, tracking.  The math modules
(kl, advantages, losses) import only torch and numpy.
"""

__version__ = "0.1.0"
