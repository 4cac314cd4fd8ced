"""The TRL half of benchmarks/trl_compare.py: one TRL training run, in TRL's own virtualenv.

    <trl venv>/bin/python benchmarks/trl_side.py ppo|grpo|rloo --settings run.json --out DIR

Imports nothing of this project (TRL's virtualenv does not have it).  ``run.json`` holds everything the run
needs, written by trl_compare.py from its one table of matched settings:
    model, reward_model     local directories (the pipeline's models/sft and reward_models/<name>)
    prompts                 train prompts: [{"prompt": text, "input_ids": [...]}], ids as the pipeline encodes them
    seed, iterations, settings  (see MATCHED in trl_compare.py)
Writes DIR/policy (the trained policy, save_pretrained), DIR/policy-<k> (the policy after iteration k, for each k
in run.json's ``save_after``) and DIR/stats.json: the seconds of trainer.train(), the tokens generated and the
seconds spent in generate, the response tokens stepped on and the seconds of the training steps without their
generation and scoring (GRPO and RLOO), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def timed_generate(model, counter: dict, eos_ids: list[int]):
    """Wrap ``model.generate`` to count the response tokens (up to and including the first EOS) and seconds."""
    import torch

    original = model.generate

    def generate(*args, **kwargs):
        started = time.perf_counter()
        output = original(*args, **kwargs)
        counter["generation_seconds"] += time.perf_counter() - started
        sequences = output.sequences if hasattr(output, "sequences") else output
        prompt_length = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        responses = sequences[:, prompt_length:]
        is_eos = torch.isin(responses, torch.tensor(eos_ids))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], responses.shape[1],
                                                                                      dtype=torch.long))
        counter["generation_tokens"] += int(first.sum())
        return output

    model.generate = generate


def timed_training(trainer, counter: dict) -> None:
    """Count the response tokens each training step steps on, and the seconds of the steps (loss, backward and the
    optimizer's step) less those of ``_prepare_inputs``, where GRPO and RLOO generate, score and compute the old
    and reference log-probs: what this project's optimize stage counts as training tokens/s."""
    from transformers import TrainerCallback

    prepare, training_step, compute_loss = trainer._prepare_inputs, trainer.training_step, trainer.compute_loss

    def timed_prepare(*args, **kwargs):
        started = time.perf_counter()
        inputs = prepare(*args, **kwargs)
        counter["training_seconds"] -= time.perf_counter() - started
        return inputs

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        loss = training_step(*args, **kwargs)
        counter["training_seconds"] += time.perf_counter() - started
        return loss

    def counted_loss(model, inputs, *args, **kwargs):
        counter["training_tokens"] += int(inputs["completion_mask"].sum())
        return compute_loss(model, inputs, *args, **kwargs)

    class TimedOptimizerStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            counter["training_seconds"] += time.perf_counter() - self.started

    trainer._prepare_inputs, trainer.training_step, trainer.compute_loss = timed_prepare, timed_step, counted_loss
    trainer.add_callback(TimedOptimizerStep())


def save_after(trainer, policy, tokenizer, out: Path, iterations: list[int], steps_per_iteration: int) -> None:
    """Save the policy to out/policy-<k> when iteration k ends (a callback; a few ms on this model)."""
    from transformers import TrainerCallback

    class SaveAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iteration == 0 and state.global_step // steps_per_iteration in iterations:
                policy.save_pretrained(out / f"policy-{state.global_step // steps_per_iteration}")
                tokenizer.save_pretrained(out / f"policy-{state.global_step // steps_per_iteration}")

    trainer.add_callback(SaveAfter())


def score_text_without_eos(reward_model, eos_id: int) -> None:
    """TRL's PPO reads the reward model's score at the response's last token, EOS included, while the reward model
    was trained, and is read by the pipeline and the evaluator, on the text (no EOS).  For the reward model (not the
    value model), the response's EOS becomes padding, so the score is read at the last token of the text.  (TRL
    still feeds the sampled ids, where the pipeline re-tokenises the decoded text.)"""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_trainer

    get_reward = ppo_trainer.get_reward

    def get_reward_of_text(model, query_responses, pad_token_id, context_length):
        if model is reward_model:
            response = query_responses[:, context_length:]
            query_responses = torch.cat((query_responses[:, :context_length],
                                         response.masked_fill(response == eos_id, pad_token_id)), 1)
        return get_reward(model, query_responses, pad_token_id, context_length)

    ppo_trainer.get_reward = get_reward_of_text


def ppo(run: dict, out: Path, counter: dict):
    """TRL 0.29's PPO (trl.experimental.ppo): the value model starts as a copy of the reward model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = run["settings"]
    tokenizer = AutoTokenizer.from_pretrained(run["model"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(run["model"], dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(run["model"], dtype="float32")
    reward = AutoModelForSequenceClassification.from_pretrained(run["reward_model"], num_labels=1, dtype="float32")
    value = AutoModelForSequenceClassification.from_pretrained(run["reward_model"], num_labels=1, dtype="float32")
    batch = s["prompts_per_iteration"]
    config = PPOConfig(
        output_dir=str(out / "trainer"), use_cpu=True, bf16=False, seed=run["seed"], report_to=[], save_strategy="no",
        per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=batch // s["micro_batch_size"],
        num_mini_batches=1, num_ppo_epochs=s["epochs"], total_episodes=batch * run["iterations"],
        local_rollout_forward_batch_size=batch, learning_rate=s["lr"], lr_scheduler_type=s["lr_schedule"],
        adam_epsilon=s["adam_eps"], weight_decay=0.0, response_length=s["max_new_tokens"],
        temperature=s["temperature"], stop_token="eos", missing_eos_penalty=None, kl_coef=s["kl_coef"],
        kl_estimator="k1", cliprange=s["clip_range"], cliprange_value=s["value_clip_range"], vf_coef=s["vf_coef"],
        gamma=s["gamma"], lam=s["lam"], whiten_rewards=False, num_sample_generations=0, logging_steps=1,
        dataloader_num_workers=0)
    dataset = Dataset.from_list([{"input_ids": row["input_ids"]} for row in run["prompts"]])
    score_text_without_eos(reward, tokenizer.eos_token_id)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=value, train_dataset=dataset)
    timed_generate(policy, counter, [tokenizer.eos_token_id])
    save_after(trainer, policy, tokenizer, out, run["save_after"], steps_per_iteration=1)  # a step is an update
    return trainer, policy, tokenizer


def grpo(run: dict, out: Path, counter: dict, algorithm: str = "grpo"):
    """The current TRL's GRPO (or RLOO: ``algorithm``), rewarded by the same reward model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    s = run["settings"]
    tokenizer = AutoTokenizer.from_pretrained(run["model"], padding_side="left")
    reward_tokenizer = AutoTokenizer.from_pretrained(run["reward_model"])
    policy = AutoModelForCausalLM.from_pretrained(run["model"], dtype="float32")
    reward = AutoModelForSequenceClassification.from_pretrained(run["reward_model"], num_labels=1, dtype="float32")
    batch = s["grpo_prompts_per_iteration"] * s["grpo_samples_per_prompt"]
    shared = dict(
        output_dir=str(out / "trainer"), use_cpu=True, bf16=False, seed=run["seed"], report_to=[], save_strategy="no",
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=s["grpo_samples_per_prompt"], num_iterations=s["epochs"],
        max_steps=run["iterations"] * s["epochs"], learning_rate=s["lr"], lr_scheduler_type=s["lr_schedule"],
        adam_epsilon=s["adam_eps"], weight_decay=0.0, max_grad_norm=0.0, max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_k=0, top_p=1.0, epsilon=s["clip_range"], mask_truncated_completions=False,
        logging_steps=1, dataloader_num_workers=0, disable_dropout=True)
    if algorithm == "grpo":  # k3 KL loss term; token-level clipped ratio, token-mean over the batch
        config, trainer_class = GRPOConfig(**shared, beta=s["grpo_kl_loss_coef"], loss_type="dapo",
                                           scale_rewards="group"), GRPOTrainer
    else:  # RLOO: the sequence's k1 KL in its reward; leave-one-out baseline; advantages not normalised
        config, trainer_class = RLOOConfig(**shared, beta=s["kl_coef"], normalize_advantages=False), RLOOTrainer
    dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in run["prompts"]])
    trainer = trainer_class(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                            processing_class=tokenizer, reward_processing_classes=reward_tokenizer)
    timed_generate(policy, counter, [tokenizer.eos_token_id])
    timed_training(trainer, counter)
    save_after(trainer, policy, tokenizer, out, run["save_after"], steps_per_iteration=s["epochs"])  # optimizer steps
    return trainer, policy, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algorithm", choices=("ppo", "grpo", "rloo"))
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = json.loads(args.settings.read_text())
    counter = {"generation_tokens": 0, "generation_seconds": 0.0, "training_tokens": 0, "training_seconds": 0.0}
    trainer, policy, tokenizer = (ppo(run, args.out, counter) if args.algorithm == "ppo" else
                                  grpo(run, args.out, counter, args.algorithm))
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    policy.save_pretrained(args.out / "policy")
    tokenizer.save_pretrained(args.out / "policy")
    import trl

    stats = {"trl": trl.__version__, "train_seconds": train_seconds, **counter,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    main()
