"""Locally built stand-ins for real instruct models: the shape and the tokenizer quirks of a Hub model, with
random weights and a tokenizer trained here, so that the real-model path runs offline (tests, benchmarks,
and a dry run of a recipe before the download).

Two tokenizer styles, each with the quirks of its family:

- ``chatml`` (SmolLM2, Qwen2.5): a ChatML template with system turns; EOS is ``<|im_end|>``, pad == EOS,
  and the generation config also stops on ``<|endoftext|>``; no BOS.
- ``llama3`` (Llama 3.x): ``<|start_header_id|>…`` turns ending in ``<|eot_id|>``; no pad token; BOS
  ``<|begin_of_text|>`` added by the tokenizer itself; generation stops on ``<|eot_id|>`` or ``<|end_of_text|>``.

The vocabulary is a byte-level BPE trained on the built-in task's text, filled up to the real size with
``<|reserved_special_token_N|>`` tokens (Llama 3 has 250 of those; here they make a 49k or 128k vocabulary
with the real embedding shape).  ``python -m rlhf_core.tooling.local_models SHAPE DIR`` writes one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    style: str  # "chatml" or "llama3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 2048
    tie_word_embeddings: bool = True


SHAPES = {
    # the published configs of the models they stand in for (config.json on the Hub)
    "smollm2-135m": ModelShape("chatml", 49152, 576, 30, 9, 3, 1536, 8192, True),
    "smollm2-360m": ModelShape("chatml", 49152, 960, 32, 15, 5, 2560, 8192, True),
    "qwen2.5-0.5b": ModelShape("chatml", 151936, 896, 24, 14, 2, 4864, 32768, True),
    "llama-3.2-1b": ModelShape("llama3", 128256, 2048, 16, 32, 8, 8192, 131072, True),
    # reduced shapes with the real vocabularies, for tests on a CPU
    "chatml-49k-tiny": ModelShape("chatml", 49152, 64, 2, 4, 2, 128, 512, True),
    "llama3-128k-tiny": ModelShape("llama3", 128256, 64, 2, 4, 2, 128, 512, False),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


def build_tokenizer(style: str, vocab_size: int, texts: list[str], bpe_size: int = 2000, reserved: bool = True):
    """A fast tokenizer of ``style`` with exactly ``vocab_size`` ids: BPE (``bpe_size`` at most) trained on
    ``texts``, the style's special tokens, then reserved special tokens up to ``vocab_size`` (``reserved``
    False: none, and the vocabulary is what BPE learned)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[style]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_size, vocab_size - 1), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if reserved:
        tokenizer.add_special_tokens([f"<|reserved_special_token_{i}|>"
                                      for i in range(vocab_size - tokenizer.get_vocab_size())])
    if style == "llama3":  # the tokenizer itself puts BOS first, as Llama's does
        bos_id = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)])
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                          eos_token="<|eot_id|>", clean_up_tokenization_spaces=False)
        wrapped.chat_template = LLAMA3_TEMPLATE
    else:  # pad == eos, as SmolLM2-Instruct ships it
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                          clean_up_tokenization_spaces=False)
        wrapped.chat_template = CHATML_TEMPLATE
    assert len(wrapped) == vocab_size or not reserved, (len(wrapped), vocab_size)
    return wrapped


def end_ids(style: str, tokenizer) -> list[int]:
    """The generation config's ``eos_token_id`` list of the style (the end of a turn, and of the text)."""
    names = ["<|im_end|>", "<|endoftext|>"] if style == "chatml" else ["<|end_of_text|>", "<|eot_id|>"]
    return [tokenizer.convert_tokens_to_ids(name) for name in names]


def build_model(shape: ModelShape, tokenizer, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM of ``shape`` whose generation config lists every
    end id (a list, as real instruct checkpoints have it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    stops = end_ids(shape.style, tokenizer)
    config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                         num_key_value_heads=shape.num_kv_heads, intermediate_size=shape.intermediate_size,
                         max_position_embeddings=shape.max_positions, tie_word_embeddings=shape.tie_word_embeddings,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = stops
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_local_model(directory: str | Path, shape: ModelShape | str, *, task: str = "sentiment", seed: int = 0,
                      **overrides) -> Path:
    """Write a model directory (safetensors, config, generation config, tokenizer with chat template) of
    ``shape`` (a ``ModelShape`` or a key of ``SHAPES``; ``overrides`` change its fields)."""
    from rlhf_core.model.loading import quiet_transformers
    from rlhf_core.phases.tasks import get_task

    quiet_transformers()
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    shape = replace(shape, **overrides)
    rows = get_task(task).demonstrations(600, seed)
    tokenizer = build_tokenizer(shape.style, shape.vocab_size, [r["prompt"] + r["response"] for r in rows])
    model = build_model(shape, tokenizer, seed)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_core.tooling.local_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("directory")
    parser.add_argument("--num-layers", type=int, help="fewer blocks than the real model (the same width)")
    args = parser.parse_args(argv)
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    path = write_local_model(args.directory, args.shape, **overrides)
    print(f"wrote {path} ({args.shape}{', ' + str(args.num_layers) + ' layers' if args.num_layers else ''})")


if __name__ == "__main__":
    main()
