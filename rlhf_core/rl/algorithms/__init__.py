"""Policy optimizers behind one interface, chosen by their traits (``registry.py``, the only list of them).

    from rlhf_core.rl.algorithms.train import train_round
    metrics = train_round(model, experience, params, temperature=…, pad_id=…, device=…, seed=…, log=…)

The update loops, one module each; which one an algorithm runs is its registry entry's objective:

    ppo.py        optim.epochs of a per-token objective (OBJECTIVES: clipped, cispo, sapo), clipped value loss,
                  dual clip, KL loss, early stop at ppo.target_kl
    reinforce.py  one on-policy pass of the policy gradient (+ a learned value)
    trpo.py       conjugate gradient on Fisher-vector products, a KL trust region (line search or the full step)
    common.py     what they share: the round's experience, micro-batching, parameter groups, the critic warm-up
    train.py      ``train_round``: the loop an algorithm's traits choose

This package's __init__ and registry import nothing heavy, so that config can read the registry.
"""
