"""Tokenizers and causal LMs: the tiny default built from scratch, local directories and Hub ids loaded
with one-line errors, adapter checkpoints (policy = base + LoRA), and model-structure helpers.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhf_core.errors import DataError, first_line

PAD_TOKEN = "<|pad|>"


EOS_TOKEN = "<|endoftext|>"


ADAPTER_CONFIG_FILE = "adapter_config.json"


def train_tokenizer(texts: list[str], vocab_size: int, chat_template: str | None = None,
                    chat_special_tokens: tuple[str, ...] = (), end_of_turn: str | None = None,
                    added_tokens: tuple[str, ...] = (), split_digits: bool = False):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers.

    The pad token is distinct from EOS, and padding is on the left (for generation).  A chat model (a tool task):
    ``chat_special_tokens`` are added as special tokens, ``chat_template`` is its template, and ``end_of_turn``
    (one of them) is its EOS, so that generation stops at the end of a turn; ``added_tokens`` are whole tokens
    that are not special (Qwen2.5's ``<tool_call>``: decoding keeps them, so an environment can parse them).
    ``split_digits``: every digit is a token of its own (as in Qwen2.5's and Llama 2's tokenizers), so a number is
    copied digit by digit instead of as one of hundreds of merged number tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           tokenizer.pre_tokenizer])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN, *chat_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end_of_turn or EOS_TOKEN,
                                      pad_token=PAD_TOKEN, padding_side="left", clean_up_tokenization_spaces=False)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    if added_tokens:
        wrapped.add_tokens(list(added_tokens))
    return wrapped


def build_tiny_model(tiny, tokenizer):
    """A from-scratch causal LM of a standard transformers architecture (dropout off)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if tiny.architecture == "llama":
        config = LlamaConfig(hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
                             num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_heads,
                             intermediate_size=tiny.intermediate_size, max_position_embeddings=tiny.max_positions,
                             tie_word_embeddings=True, attention_dropout=0.0, **common)
        return LlamaForCausalLM(config)
    config = GPT2Config(n_embd=tiny.hidden_size, n_layer=tiny.num_layers, n_head=tiny.num_heads,
                        n_inner=tiny.intermediate_size, n_positions=tiny.max_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return GPT2LMHeadModel(config)


def quiet_transformers() -> None:
    """No per-load progress bars in stage logs (they are noise for tiny models and in CI)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def refuse_missing_local_path(path: str | Path, what: str) -> None:
    """Stop with one line when ``path`` is meant as a local directory and there is none, instead of letting
    transformers take it for a Hub id and retry the network (about 45 s, then "couldn't connect").

    A path is local when it exists, is absolute or starts with ``.`` or ``~``, has more than one ``/`` (a Hub id
    is ``name`` or ``owner/name``), or when its first part is a directory here (``models/r9`` next to
    ``models/``).  Anything else is left to be a Hub id."""
    text = str(path)
    candidate = Path(text).expanduser()
    if candidate.exists():
        return
    parts = Path(text).parts
    local = (text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
             or (len(parts) > 1 and Path(parts[0]).is_dir()))
    if local:
        raise DataError(f"{what} {text!r}: no such directory (a local path, so the Hub is not tried)")


_HUB_REACHABLE: dict[str, bool] = {}


def hub_source(path: str | Path, what: str) -> dict:
    """Extra ``from_pretrained`` arguments for ``path``, or one line instead of a minute of retries.

    A local path must exist (``refuse_missing_local_path``).  A Hub id is fetched as usual when the Hub answers
    one probe (5 s, no retries; ``HF_ENDPOINT`` respected); when it does not, the id is loaded from the local
    Hugging Face cache (``local_files_only``) if it is there, and otherwise stops with one line, where
    transformers would retry for about 45 s and print a line per retry.  ``HF_HUB_OFFLINE=1`` skips the probe."""
    import os

    refuse_missing_local_path(path, what)
    text = str(path)
    if Path(text).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_REACHABLE:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(endpoint, timeout=5).close()
            _HUB_REACHABLE[endpoint] = True
        except urllib.error.HTTPError:  # it answered, if only with an error status
            _HUB_REACHABLE[endpoint] = True
        except (OSError, ValueError):
            _HUB_REACHABLE[endpoint] = False
    if _HUB_REACHABLE[endpoint]:
        return {}
    cached = any(isinstance(try_to_load_from_cache(text, name), str) for name in ("config.json", "tokenizer_config.json"))
    if cached:  # transformers' adapter lookup takes its own local_files_only
        return {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
    raise DataError(f"{what} {text!r}: not a local directory, and the Hugging Face Hub ({endpoint}) cannot be reached "
                    "nor is it in the local cache; download it where there is a network "
                    f"(huggingface-cli download {text}) or give a local directory")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def auto_tokenizer(path: str, trust_remote_code: bool = False, what: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(path)``, or one line naming ``what`` and ``path``: a missing local path, a
    directory with no tokenizer files in it (transformers' own message there is a 10-line hint about
    sentencepiece), or the loader's first line."""
    from transformers import AutoTokenizer

    source = hub_source(path, what)
    directory = Path(str(path)).expanduser()
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{what} {str(path)!r}: the directory holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "is it a model directory?")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                             local_files_only=source.get("local_files_only", False))
    except (OSError, ValueError) as exc:
        raise DataError(f"{what} {str(path)!r}: cannot be loaded ({first_line(exc)})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, *, eos_values=(), vocab_rows: int | None = None,
                   log=None):
    """Load a tokenizer that pads on the left with a pad token distinct from every id that ends a response
    (``rlhf_core.model.chat.stop_token_ids``: its EOS and ``eos_values``, the model's config and generation-config
    ``eos_token_id``).

    A tokenizer with no pad, or pad == an end id (common: pad == eos), gets a spare special token of its own
    vocabulary as pad (``chat.spare_pad_token``, below ``vocab_rows`` rows of the embedding), so a real model
    keeps its shape; only when there is none is a new ``<pad>`` added (the caller grows the embeddings:
    ``match_vocab``), and ``log`` says so."""
    from rlhf_core.model.chat import spare_pad_token, stop_token_ids

    tokenizer = auto_tokenizer(path, trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {path!r}: has no EOS token; responses could never end")
    stop_ids = stop_token_ids(tokenizer, *eos_values)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stop_ids:
        had = "no pad" if tokenizer.pad_token_id is None else f"pad {tokenizer.pad_token_id}, an end id of {stop_ids}"
        spare = spare_pad_token(tokenizer, stop_ids, len(tokenizer) if vocab_rows is None else vocab_rows)
        if spare is not None:
            tokenizer.pad_token = spare
            if log is not None:
                log(f"tokenizer {path}: pad is the spare special token {spare} (it had {had})")
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            if log is not None:
                log(f"tokenizer {path}: no pad token distinct from the end ids {stop_ids} and no spare special "
                    f"token; added {PAD_TOKEN} (the embeddings grow by one row)")
    tokenizer.padding_side = "left"
    return tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere, so that a forward pass is a deterministic function of the weights."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.eval()
    return model


def stored_dtype(path: str | Path) -> str | None:
    """The dtype a local checkpoint's config.json records for its weights (``dtype``, or the older
    ``torch_dtype``), e.g. "bfloat16"; None when it records none or is not a local directory."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    values = json.loads(config.read_text())
    return values.get("dtype") or values.get("torch_dtype")


# compute.param_dtype -> the dtype argument of from_pretrained ("auto": the checkpoint's own dtype)
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}
# What bf16 weights cost on a CPU without native bf16 matmuls (docs/performance.md#bfloat16-on-a-cpu): a matmul
# 39–51× float32's time, a training step of a 135M model 11×, the default pipeline's sft 22× and optimize 48×.
SLOW_BF16_COST = "10–50× the time of float32 (docs/performance.md#bfloat16-on-a-cpu)"
_SAID: set[str] = set()


def _say_once(line: str) -> None:
    """``line`` on stderr, the first time this process says it (a stage loads the same checkpoint several times)."""
    import sys

    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}


def slow_cpu_bf16(environ=None, flags: set[str] | None = None) -> str | None:
    """None when this process's CPU matmuls run bf16 on native instructions; else why not, as a phrase.

    x86 needs AVX512-BF16 or AMX-BF16 (ARM: the bf16 feature) and no pin to an ISA without them: cpu_isa: avx2
    (the default, for bits that are the same on every x86) sets ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2
    in the stage's environment, and then oneDNN and ATen run bf16 through slow emulation."""
    import os

    environ = os.environ if environ is None else environ
    if environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" or environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        return "cpu_isa: avx2 pins the CPU kernels to AVX2, which has no bf16 instructions"
    if not {"avx512_bf16", "amx_bf16", "bf16"} & (cpu_flags() if flags is None else flags):
        return "this CPU has no bf16 instructions (AVX512-BF16, AMX or ARM bf16)"
    return None


def checkpoint_dtype(path: str | Path, trust_remote_code: bool = False) -> str | None:
    """The dtype a checkpoint stores its weights in: a local directory's config.json, else the Hub config's."""
    if Path(path).expanduser().is_dir():
        return stored_dtype(Path(path).expanduser())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **hub_source(path, "model"))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def cpu_param_dtype(param_dtype: str, path: str | Path, trust_remote_code: bool = False, *, environ=None,
                    flags: set[str] | None = None, say=None) -> str:
    """compute.param_dtype for weights that will run on a CPU.

    - ``auto``: the checkpoint's dtype where that is fast, so float32 for float32 and float16 checkpoints, and for
      bfloat16 ones unless the CPU runs bf16 natively (``slow_cpu_bf16``); most Hub checkpoints are bfloat16, and
      under the default cpu_isa: avx2 their bf16 weights would take 10–50× float32's time.  ``say`` (one line to
      stderr by default, once per process) tells when a 16-bit checkpoint loads as float32.
    - ``bfloat16`` set explicitly stays bfloat16, and ``say`` warns when it will be slow, with the cost.
    - ``float32``: float32."""
    say = say or _say_once
    why_slow = slow_cpu_bf16(environ, flags)
    if param_dtype == "bfloat16" and why_slow:
        say(f"compute.param_dtype = 'bfloat16' on a CPU: {why_slow}, so expect {SLOW_BF16_COST}; set "
            "param_dtype: auto or float32, or cpu_isa: native on a CPU with AVX512-BF16/AMX")
    if param_dtype != "auto":
        return param_dtype
    stored = checkpoint_dtype(path, trust_remote_code)
    if stored == "float16" or (stored == "bfloat16" and why_slow):
        say(f"compute.param_dtype = auto: {path} is stored in {stored}, loaded in float32 on this CPU ("
            f"{why_slow or 'float16 matmuls are slow on CPUs'}; 16-bit weights would take {SLOW_BF16_COST})")
        return "float32"
    return param_dtype


def safe_from_pretrained(auto_class, path: str, trust_remote_code: bool = False, *, param_dtype: str = "float32",
                         empty: bool = False, device: torch.device | None = None, **kwargs):
    """``auto_class.from_pretrained`` that loads weights only from safetensors (never pickle) and runs
    no code from the checkpoint unless ``trust_remote_code`` is on, in ``param_dtype`` (compute.param_dtype:
    float32, bfloat16, or auto = as stored); ``kwargs`` go to from_pretrained.

    ``empty``: the same model built from its config on the meta device, reading no weights (an FSDP2 rank other than
    0, which gets its shards from rank 0: ``distributed.shard_fsdp2_from_rank0``); "auto" is float32 there, and
    rank 0's dtypes win.  ``device``: where the weights will run; on a CPU, ``cpu_param_dtype`` decides what
    ``auto`` means (and warns about slow bf16)."""
    quiet_transformers()
    source = hub_source(path, "model")
    if device is not None and device.type == "cpu":
        param_dtype = cpu_param_dtype(param_dtype, path, trust_remote_code)
    try:
        if empty:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **source)
            dtype = PARAM_DTYPES[param_dtype]
            with torch.device("meta"):
                return auto_class.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype,
                                              trust_remote_code=trust_remote_code)
        return auto_class.from_pretrained(path, dtype=PARAM_DTYPES[param_dtype], use_safetensors=True,
                                          trust_remote_code=trust_remote_code, **source, **kwargs)
    except (OSError, ValueError) as exc:
        raise DataError(f"model {path!r}: cannot be loaded from safetensors weights ({first_line(exc)}); "
                        "pickle checkpoints (.bin/.pt) are refused: convert them with save_pretrained") from None


@contextlib.contextmanager
def meta_copies_quiet(empty: bool):
    """On the meta device (``empty``), loading adapter weights into the meta modules is a no-op that torch warns
    about once per tensor (hundreds of lines for a 7B model's adapters); the values come from rank 0 instead."""
    with warnings.catch_warnings():
        if empty:
            warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter in the checkpoint to a "
                                                      r"meta parameter")
        yield


def load_causal_lm(path: str, device: torch.device, trust_remote_code: bool = False, *, merge_adapters: bool = False,
                   param_dtype: str = "float32"):
    """A causal LM from a model directory, or from a LoRA checkpoint (adapters + their base, as a peft model
    whose ``disable_adapter()`` gives the base back; ``merge_adapters``: one plain merged model)."""
    from transformers import AutoModelForCausalLM

    empty = device.type == "meta"  # the structure only (see safe_from_pretrained)
    if is_adapter_checkpoint(path):
        from peft import PeftModel

        base = disable_dropout(safe_from_pretrained(AutoModelForCausalLM, adapter_base(path), trust_remote_code,
                                                    param_dtype=param_dtype, empty=empty, device=device))
        with meta_copies_quiet(empty):
            model = PeftModel.from_pretrained(base, path)
        if merge_adapters:
            model = model.merge_and_unload()
        return disable_dropout(model).to(device)
    model = safe_from_pretrained(AutoModelForCausalLM, path, trust_remote_code, param_dtype=param_dtype, empty=empty,
                                 device=device)
    return disable_dropout(model).to(device)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every transformer block's activations in the backward pass instead of keeping them
    (compute.gradient_checkpointing): the activation memory of one block instead of all, for about one more
    forward pass of compute.  The same gradients (tested).

    Each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant), whatever the module's
    train/eval mode: transformers' own switch acts only in train mode, which the pipeline never uses (it
    would turn dropout back on).  Call it before sharding (FSDP wraps the checkpointed blocks)."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in transformer_blocks(model):
        if getattr(block, "_rlhf_checkpointed", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._rlhf_checkpointed = True
    return model


def is_adapter_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory holds LoRA adapters (adapter_config.json) rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model directory an adapter checkpoint points at (base_model_name_or_path: the absolute path
    of models/sft; older checkpoints hold the relative ``models/sft``).

    The base is looked up as written (a relative one from the working directory, the repository root where
    stages run), then next to the checkpoint (models/r2 → models/sft: a repository moved or cloned elsewhere)."""
    config = json.loads((Path(path) / ADAPTER_CONFIG_FILE).read_text())
    base = config.get("base_model_name_or_path") or ""
    candidates = [Path(base), Path(path).parent / Path(base).name] if base else []
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    raise DataError(f"{path}: its LoRA adapters point at base model {base!r}, which is not found "
                    "(run from the repository root, where models/sft is)")


def checkpoint_stop_ids(path, tokenizer) -> list[int]:
    """``chat.stop_token_ids`` of a local checkpoint directory, from its config.json and generation_config.json
    (a LoRA checkpoint: those of its base)."""
    from rlhf_core.model.chat import stop_token_ids

    directory = Path(adapter_base(path) if is_adapter_checkpoint(path) else path)
    values = []
    for name in ("config.json", "generation_config.json"):
        if (directory / name).is_file():
            values.append(json.loads((directory / name).read_text()).get("eos_token_id"))
    return stop_token_ids(tokenizer, *values)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM or backbone, in order (through peft and DDP wrappers).

    The blocks are the modules whose class the model names in ``_no_split_modules`` (``LlamaDecoderLayer``,
    ``GPT2Block``, …), or else the longest ``nn.ModuleList`` (``model.layers`` in Llama/Qwen2, ``transformer.h``
    in GPT-2).  FSDP shards each block as one unit; ``policy_parameters`` trains the last N."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    block_lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not block_lists:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks found")
    return list(max(block_lists, key=len))


def match_vocab(model, tokenizer, stop_ids: list[int] | None = None) -> None:
    """Grow the embedding matrix when the tokenizer gained a pad token; record pad and every end id
    (``stop_ids``, default EOS) in the model's config and generation config, so the saved checkpoint
    stops on all of them wherever it is loaded."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.eos_token_id is None:
        model.config.eos_token_id = tokenizer.eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        generation.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]


def hidden_size_of(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise DataError(f"model config {type(config).__name__}: cannot tell its hidden size")
