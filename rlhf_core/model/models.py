"""Tokenizers, policies, critics and the one forward pass that both rollout and training use.

Sequence layout (both for recording log-probs during rollout and for training):

    [pad … pad  prompt tokens  response tokens]        every row ends at the last column
     <------------------ W columns ------------>        W = the batch's longest prompt + response

Each row is its prompt followed by its response, left-padded, so a batch is exactly as wide as its
longest sequence (no padding between prompt and response).  Position ids are the cumulative sum of
the attention mask minus one, so a row's logits do not depend on how much padding its batch has.
The response of row i occupies its last r_i columns; the logits one column earlier predict each
response token.  They are gathered into [B, R] arrays aligned with ``response_ids`` (response token t
of every row in column t, R = the longest response) and divided by the sampling temperature before
the log-softmax, exactly as the sampler did.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf_core.errors import ConfigError, DataError, first_line
from rlhf_core.io import STATE_FILE, checkpoint_dir, read_state  # noqa: F401  (re-exported)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"
ADAPTER_CONFIG_FILE = "adapter_config.json"


# ---------------------------------------------------------------------------------------------------
# Runtime


def resolve_device(name: str, cpu_threads: int = 0) -> torch.device:
    """`auto` → CUDA if available, else MPS if available, else CPU; explicit names are checked.

    On CPU, ``cpu_threads`` > 0 fixes torch's intra-op threads (1: single-threaded kernels, whose float
    reductions cannot be reordered by thread scheduling).
    """
    device = pick_device(name)
    if device.type == "cpu" and cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}: CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for one process, and ask torch for deterministic kernels.

    On CPU this makes a stage's outputs a function of its inputs and params.  On CUDA, cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG (set here unless already set); ops without a deterministic kernel only
    warn, so GPU runs are repeatable on the same hardware and software stack, not across them.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------------------------------
# Tokenizers and models


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers.

    The pad token is distinct from EOS, and padding is on the left (for generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                      padding_side="left", clean_up_tokenization_spaces=False)
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


def safe_from_pretrained(auto_class, path: str, trust_remote_code: bool = False, *, param_dtype: str = "float32",
                         empty: bool = False, **kwargs):
    """``auto_class.from_pretrained`` that loads weights only from safetensors (never pickle) and runs
    no code from the checkpoint unless ``trust_remote_code`` is on, in ``param_dtype`` (compute.param_dtype:
    float32, bfloat16, or auto = as stored); ``kwargs`` go to from_pretrained.

    ``empty``: the same model built from its config on the meta device, reading no weights (an FSDP2 rank other than
    0, which gets its shards from rank 0: ``distributed.shard_fsdp2_from_rank0``); "auto" is float32 there, and
    rank 0's dtypes win."""
    quiet_transformers()
    source = hub_source(path, "model")
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
                                                    param_dtype=param_dtype, empty=empty))
        with meta_copies_quiet(empty):
            model = PeftModel.from_pretrained(base, path)
        if merge_adapters:
            model = model.merge_and_unload()
        return disable_dropout(model).to(device)
    model = safe_from_pretrained(AutoModelForCausalLM, path, trust_remote_code, param_dtype=param_dtype, empty=empty)
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


# ---------------------------------------------------------------------------------------------------
# LoRA (peft)


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


def lora_config(lora):
    """peft LoraConfig from the ``lora`` params (causal LM task, no bias training)."""
    from peft import LoraConfig

    targets = lora.target_modules.strip()
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def trainable_lora_policy(path: str, lora, device: torch.device, trust_remote_code: bool = False,
                          param_dtype: str = "float32"):
    """The policy of a LoRA round: the adapters of ``path`` (an adapter checkpoint: they keep training, on the
    same base) or new zero-initialised adapters on the full model at ``path``.  Only the adapters train."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    empty = device.type == "meta"  # the structure only (see safe_from_pretrained)
    if is_adapter_checkpoint(path):
        base_path = adapter_base(path)
        base = disable_dropout(safe_from_pretrained(AutoModelForCausalLM, base_path, trust_remote_code,
                                                    param_dtype=param_dtype, empty=empty))
        with meta_copies_quiet(empty):
            policy = PeftModel.from_pretrained(base, path, is_trainable=True)
    else:
        base_path = path
        base = disable_dropout(safe_from_pretrained(AutoModelForCausalLM, path, trust_remote_code,
                                                    param_dtype=param_dtype, empty=empty))
        policy = get_peft_model(base, lora_config(lora))
    # The checkpoint points at its base: a local directory as an absolute path, so plain peft loads the adapters
    # from any working directory (adapter_base still finds a moved repo's models/sft next to the checkpoint).
    local = Path(base_path).expanduser()
    policy.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.is_dir() else str(base_path)
    policy.eval()  # dropout off, as everywhere; only the adapters' own dropout (lora.dropout) acts in updates
    for name, module in policy.named_modules():
        if name.endswith("lora_dropout.default") and isinstance(module, nn.Dropout) and module.p > 0:
            module.train()
    return policy.to(device)


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


class ValueHead(nn.Module):
    """V(s) = w·h + b on the last hidden state; zero-initialised so the first values are 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T]
        return self.summary(hidden.float()).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Batches


@dataclass
class TokenBatch:
    """A collated batch (layout in the module docstring).

    input_ids/attention_mask/position_ids: [B, W]; response_ids/response_mask: [B, R], response token t
    of each row in column t; response_start: [B], the column of each row's first response token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    response_start: torch.Tensor

    @property
    def response_width(self) -> int:  # R
        return self.response_mask.shape[1]

    def gather_response(self, window: torch.Tensor) -> torch.Tensor:
        """[B, R+1, ...] values of the last R+1 columns -> [B, R, ...]: those of the columns that predict
        each response token (column response_start + t − 1); padding columns t ≥ r_i repeat a valid one."""
        batch, width_r = self.response_mask.shape
        first = self.input_ids.shape[1] - (width_r + 1)  # column of window[:, 0]
        offsets = torch.arange(width_r, device=window.device)
        index = (self.response_start.to(window.device).unsqueeze(1) - 1 - first + offsets).clamp(0, width_r - 1)
        index = index.view(batch, width_r, *([1] * (window.dim() - 2))).expand(-1, -1, *window.shape[2:])
        return window.gather(1, index)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                          self.response_ids.to(device), self.response_mask.to(device), self.response_start.to(device))


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (stable order within a length)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> TokenBatch:
    """Each row = prompt + response, left-padded to the batch's longest sequence (module docstring)."""
    if not prompt_ids or len(prompt_ids) != len(response_ids):
        raise ValueError("collate needs equally many (>0) prompts and responses")
    width_r = max(1, max(len(r) for r in response_ids))
    # At least R+1 columns, so that the R+1 logits of gather_response exist even when every response is empty.
    width = max(width_r + 1, max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids)))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response = torch.full((batch, width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width_r), dtype=torch.float32)
    response_start = torch.zeros(batch, dtype=torch.long)
    for row, (prompt_row, response_row) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt_row:
            raise DataError(f"row {row}: empty prompt (zero tokens)")
        start = width - len(prompt_row) - len(response_row)
        input_ids[row, start:] = torch.tensor(list(prompt_row) + list(response_row), dtype=torch.long)
        attention_mask[row, start:] = 1
        response_start[row] = width - len(response_row)
        if len(response_row):
            response[row, :len(response_row)] = torch.tensor(response_row, dtype=torch.long)
            response_mask[row, :len(response_row)] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, position_ids, response, response_mask, response_start)


# ---------------------------------------------------------------------------------------------------
# The shared forward pass


@dataclass
class ForwardOutput:
    logprobs: torch.Tensor  # [B, R] log π(a_t | s_t) at temperature T
    entropy: torch.Tensor | None  # [B, R]
    values: torch.Tensor | None  # [B, R] V(s_t)


def response_logits(model, batch: TokenBatch, *, output_hidden: bool = False):
    """Logits (and last hidden states) at the positions that predict the response tokens: [B, R, V].

    Models that take ``logits_to_keep`` (most transformers causal LMs) compute the LM head only on the
    last R+1 positions instead of all W: the prompt's logits are never needed, and with a large
    vocabulary they are most of the pass's memory."""
    window = batch.response_width + 1
    kwargs = {"logits_to_keep": window} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=output_hidden, use_cache=False, **kwargs)
    logits = batch.gather_response(out.logits[:, -window:, :])
    hidden = batch.gather_response(out.hidden_states[-1][:, -window:, :]) if output_hidden else None
    return logits, hidden


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (looked up through peft/DDP wrappers)."""
    import inspect

    inner = model
    for _ in range(4):  # DDP/FSDP .module, peft get_base_model()
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        else:
            break
    cached = _LOGITS_TO_KEEP.get(type(inner))
    if cached is None:
        cached = _LOGITS_TO_KEEP[type(inner)] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return cached


_LOGITS_TO_KEEP: dict[type, bool] = {}


# Elements of fp32 [rows, V] intermediates that ``token_logprobs`` builds at once (64 MB): beyond it, it goes in chunks.
LOGPROB_CHUNK_ELEMENTS = 1 << 24


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, *,
                   chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T) gathered at ``tokens``, and the per-token entropy.  [B,R,V],[B,R] -> [B,R],[B,R].

        log π(a_t) = z_t[a_t] − logsumexp(z_t),   H_t = −Σ_v π_t(v) log π_t(v),   z_t = logits_t / T  (float32)

    Computed whole, the float32 log-softmax, its exponent and their product are [B·R, V] each and autograd
    keeps them for backward: with a 128k vocabulary they dominate a pass's memory.  Beyond
    ``chunk_elements`` logits (None: ``LOGPROB_CHUNK_ELEMENTS``; 0: never), ``ChunkedTokenLogprobs`` goes
    through the B·R positions in chunks and keeps nothing of size V for backward but ``logits`` itself.  Its
    forward numbers are the same as the whole computation's (the same kernels, row by row)."""
    batch, width, vocab = logits.shape
    chunk_elements = LOGPROB_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if chunk_elements <= 0 or batch * width * vocab <= chunk_elements:
        return _logprobs_and_entropy(logits, tokens, temperature)
    chunk_rows = max(1, chunk_elements // vocab)
    picked, entropy = ChunkedTokenLogprobs.apply(logits.reshape(-1, vocab), tokens.reshape(-1), temperature,
                                                 chunk_rows)
    return picked.view(batch, width), entropy.view(batch, width)


def _logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """The whole computation of ``token_logprobs``: [..., V], [...] -> [...], [...]."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return picked, entropy


class ChunkedTokenLogprobs(torch.autograd.Function):
    """``token_logprobs`` over [N, V] logits in chunks of ``chunk_rows`` rows, saving only the logits.

    Backward recomputes each chunk's log π and uses, with π = softmax(z) and z = logits / T,

        ∂ log π(a) / ∂z_v = 1[v = a] − π(v),        ∂H / ∂z_v = −π(v) · (log π(v) + H),

    each divided by T for the logits, so no [N, V] float32 tensor ever exists (the gradient of the logits,
    in their dtype, is the one tensor of that size)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows):
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(picked)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            picked[rows], entropy[rows] = _logprobs_and_entropy(logits[rows], tokens[rows], temperature)
        ctx.save_for_backward(logits, tokens, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, grad_entropy):
        logits, tokens, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            log_probs = torch.log_softmax(logits[rows].float() / ctx.temperature, dim=-1)
            probs = log_probs.exp()
            grad = torch.zeros_like(log_probs)
            if grad_entropy is not None:
                grad -= grad_entropy[rows, None] * probs * (log_probs + entropy[rows, None])
            if grad_picked is not None:
                grad -= grad_picked[rows, None] * probs
                grad.scatter_add_(-1, tokens[rows, None], grad_picked[rows, None])
            grad_logits[rows] = (grad / ctx.temperature).to(logits.dtype)
        return grad_logits, None, None, None


class ActorCritic(nn.Module):
    """A causal-LM policy with a critic: a value head on the policy's backbone, or a separate backbone."""

    def __init__(self, policy, value_head: ValueHead, critic_backbone=None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic_backbone = critic_backbone

    def forward(self, batch: TokenBatch, temperature: float, *, with_values: bool = True) -> ForwardOutput:
        shared = with_values and self.critic_backbone is None
        logits, hidden = response_logits(self.policy, batch, output_hidden=shared)
        logprobs, entropy = token_logprobs(logits, batch.response_ids, temperature)
        values = None
        if with_values:
            if self.critic_backbone is not None:
                out = self.critic_backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           position_ids=batch.position_ids, use_cache=False)
                hidden = batch.gather_response(out.last_hidden_state[:, -(batch.response_width + 1):, :])
            values = self.value_head(hidden)
        return ForwardOutput(logprobs, entropy, values)


def policy_logprobs(policy, batch: TokenBatch, temperature: float) -> torch.Tensor:
    """log π(response | prompt) per token, [B, R]: the same computation ``ActorCritic`` does."""
    logits, _ = response_logits(policy, batch)
    return token_logprobs(logits, batch.response_ids, temperature)[0]


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def load_actor_critic(path: str, critic: str, device: torch.device, trust_remote_code: bool = False,
                      lora=None, param_dtype: str = "float32", critic_init: str | None = None) -> ActorCritic:
    """Policy and critic from a checkpoint directory (or any causal LM, whose critic starts at V=0).

    ``lora`` (the lora params, for training): enabled → the policy trains LoRA adapters only
    (``trainable_lora_policy``); disabled → an adapter checkpoint is merged into a full model that trains
    whole.  None (rollout, evaluation): the checkpoint as it is, adapters unmerged.
    ``param_dtype`` (compute.param_dtype): the policy's and the critic backbone's weights; the value head
    is always float32 (it reads the last hidden state cast to float32).
    ``critic_init`` (algorithm.critic_init, critic ``separate``): models/sft (the default: the SFT backbone, V=0),
    or a reward model's directory whose backbone and score head become the critic when the checkpoint has none
    yet (round 1, from sft), so that V(s) at the last token starts as the reward model's score (as TRL's PPO
    starts its value model).
    ``device`` meta: the same modules with no weights read (FSDP2 ranks other than 0; ``safe_from_pretrained``)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    if lora is not None and lora.enabled:
        policy = trainable_lora_policy(path, lora, device, trust_remote_code, param_dtype)
    else:
        policy = load_causal_lm(path, device, trust_remote_code, merge_adapters=lora is not None,
                                param_dtype=param_dtype)
    hidden_size = hidden_size_of(policy.config)
    value_head = ValueHead(hidden_size)
    critic_backbone = None
    if critic == "separate":
        critic_dir = Path(path) / CRITIC_DIR
        if not critic_dir.is_dir() and critic_init and Path(critic_init).resolve() != Path(checkpoint_dir("sft")).resolve():
            critic_backbone, head = critic_from_reward_model(critic_init, policy.config, trust_remote_code, param_dtype,
                                                             empty=device.type == "meta")
            if device.type != "meta":  # a meta score head has no values to copy
                value_head.load_state_dict(head)
            return ActorCritic(policy, value_head.to(device), disable_dropout(critic_backbone).to(device))
        source = str(critic_dir) if critic_dir.is_dir() else adapter_base(path) if is_adapter_checkpoint(path) else path
        critic_backbone = disable_dropout(safe_from_pretrained(AutoModel, source, trust_remote_code,
                                                               param_dtype=param_dtype,
                                                               empty=device.type == "meta")).to(device)
        head_file = critic_dir / VALUE_HEAD_FILE
    else:
        head_file = Path(path) / VALUE_HEAD_FILE
    if head_file.is_file():
        value_head.load_state_dict(load_file(str(head_file)))
    return ActorCritic(policy, value_head.to(device), critic_backbone)


def critic_from_reward_model(path: str, policy_config, trust_remote_code: bool = False, param_dtype: str = "float32",
                             empty: bool = False):
    """(backbone, value-head state) from a one-output decoder reward model at ``path`` (a ``*ForSequenceClassification``
    with a linear ``score`` head that reads the last token, as transformers' decoder classifiers do).  Its
    vocabulary must be the policy's: the critic reads the policy's token ids."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_core.errors import ConfigError

    model = safe_from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code, param_dtype=param_dtype,
                                 empty=empty)
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ConfigError(f"algorithm.critic_init: {path} is a {type(model).__name__}; a critic starts from a one-output "
                          "decoder reward model with a linear `score` head (e.g. LlamaForSequenceClassification)")
    if hidden_size_of(model.config) != hidden_size_of(policy_config):
        raise ConfigError(f"algorithm.critic_init: {path} has hidden size {hidden_size_of(model.config)}, the policy "
                          f"{hidden_size_of(policy_config)}: the value head must fit both (train the reward model with "
                          "base: sft)")
    if model.config.vocab_size != policy_config.vocab_size:
        raise ConfigError(f"algorithm.critic_init: {path} has a vocabulary of {model.config.vocab_size} tokens, the policy "
                          f"{policy_config.vocab_size}: a critic must read the policy's tokens (train the reward model "
                          "with base: sft)")
    head = {"summary.weight": score.weight.detach().float().clone(),
            "summary.bias": (score.bias.detach().float().clone() if score.bias is not None else torch.zeros(1))}
    return getattr(model, model.base_model_prefix), head


def _share_tied_tensors(module: nn.Module, state: dict) -> dict:
    """``state`` (a gathered copy of ``module``'s weights) with one tensor under every name of a tied parameter
    (the LM head and the input embeddings with ``tie_word_embeddings``), as ``module.state_dict()`` has it:
    save_pretrained then writes it once, as it does for the module's own weights."""
    first_name: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if name in state:
            if id(parameter) in first_name:
                state[name] = state[first_name[id(parameter)]]
            else:
                first_name[id(parameter)] = name
    return state


def save_checkpoint(directory: Path, model: ActorCritic, tokenizer, state: dict, state_dict: dict | None = None) -> None:
    """save_pretrained policy + tokenizer (plain transformers loads them), the critic, and the RL state.

    ``state_dict``: the ActorCritic's full state dict when the weights of ``model`` are sharded across
    processes (fsdp: gathered by ``Runtime.full_state_dict``); None saves ``model``'s own."""
    from safetensors.torch import save_file

    def part(prefix):
        if state_dict is None:
            return None
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        module = model.get_submodule(prefix.rstrip(".")) if prefix else model
        return _share_tied_tensors(module, state)

    quiet_transformers()
    model.policy.save_pretrained(directory, state_dict=part("policy."))
    if (directory / ADAPTER_CONFIG_FILE).is_file():  # LoRA: adapters only; drop the model card peft writes
        (directory / "README.md").unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    head_dir = directory
    if model.critic_backbone is not None:
        head_dir = directory / CRITIC_DIR
        model.critic_backbone.save_pretrained(head_dir, state_dict=part("critic_backbone."))
    head_state = part("value_head.") or model.value_head.state_dict()
    head_state = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
    save_file(head_state, str(head_dir / VALUE_HEAD_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
