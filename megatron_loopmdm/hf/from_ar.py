"""Start from a pretrained autoregressive model: a Hugging Face Llama, Qwen2, Qwen3 or Mistral
checkpoint becomes a megatron dist checkpoint of a LoopMDM (any TP/PP layout loads it).

The architecture is read from the HF config. Pretrained layers [start, end) become the loop
block; with `retrofit`, the (max_loops - 1) x (end - start) layers right after the loop block
are dropped, so that at S = max_loops the effective depth equals the pretrained depth.
A [MASK] token is the tokenizer's own, else a new token whose embedding row is the mean
embedding; the vocabulary is padded to a multiple of `divisible_by` (so TP sizes dividing it
work) and the tokenizer, with the mask token, is written next to the checkpoint.

Proof of the import: with `causal_attention_mask` and S = 1, the LoopMDM gives the HF model's
logits (tests/hf/test_from_ar.py).
"""

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from megatron_loopmdm.checkpointing.run_config import conversion_run_config_json
from megatron_loopmdm.hf.checkpoint import (
    TOKENIZER_FILES,
    ConversionError,
    save_weights_as_checkpoint,
)
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.sizes import ModelSize

import torch

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
NEW_MASK_TOKEN = "<|mask|>"
TOKENIZER_DIR = "tokenizer"
FLAGS_FILE = "pretrain_flags.txt"


def read_ar_config(hf_dir):
    """The transformers config of a supported AR model directory, with clear errors."""
    from transformers import AutoConfig

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"--from-ar {hf_dir}: no such directory.")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"--from-ar {hf_dir}: no config.json (not a Hugging Face model).")
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"--from-ar {hf_dir} holds a {model_type!r} model; supported: {', '.join(SUPPORTED)}."
        )
    return AutoConfig.from_pretrained(hf_dir)


def _rope(config) -> tuple[int, Optional[dict]]:
    """(rotary base, rope_scaling or None) from either transformers' v4 or v5 config fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {}, rope_theta=config.rope_theta)
    theta = params.pop("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if int(theta) != theta:
        raise ConversionError(f"rope_theta={theta} is not an integer; the megatron RoPE needs one.")
    if kind == "default":
        return int(theta), None
    if kind not in ("linear", "llama3"):
        raise ConversionError(
            f"RoPE scaling {kind!r} is not supported (linear and llama3 are); "
            "import a model without it."
        )
    return int(theta), dict(params, rope_type=kind)


def _check_supported(config, seq_length: int) -> None:
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (only silu/SwiGLU)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if config.model_type in ("llama", "qwen3") and getattr(config, "attention_bias", False):
        problems.append("attention_bias=True (an output-projection bias)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        problems.append(f"layer types {sorted(set(layer_types))} (only full attention)")
    window = getattr(config, "sliding_window", None)
    uses_window = config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if uses_window and window is not None and window < seq_length:
        problems.append(
            f"sliding_window={window} < sequence length {seq_length} (pass --seq-length {window})"
        )
    if problems:
        raise ConversionError("This model cannot be imported: " + "; ".join(problems) + ".")


def kept_layers(num_layers: int, loop_layers, max_loops: int, retrofit: bool) -> list[int]:
    """The pretrained layers the LoopMDM keeps, in order (all of them without `retrofit`)."""
    start, end = loop_layers
    if not 0 <= start < end <= num_layers:
        raise ConversionError(
            f"--loop-layers {start} {end} is out of range: the model has {num_layers} layers "
            f"(0-based, end exclusive, so 0 <= START < END <= {num_layers})."
        )
    if not retrofit:
        return list(range(num_layers))
    drop = (max_loops - 1) * (end - start)
    if end + drop > num_layers:
        raise ConversionError(
            f"--retrofit drops the {drop} layers after the loop block, but only "
            f"{num_layers - end} follow layer {end - 1}; loop fewer layers, lower --max-loops, "
            "or move the loop block earlier."
        )
    return list(range(end)) + list(range(end + drop, num_layers))


def _mask_token(hf_dir: Path, mask_token: Optional[str], rows: int):
    """(tokenizer or None, [MASK] id, whether the id is a new token)."""
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        if mask_token:
            raise ConversionError(f"--mask-token {mask_token!r} needs the model's tokenizer files.")
        return None, rows, True
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if len(tokenizer) > rows:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows: "
            "the vocabulary has no room; is this the model's own tokenizer?"
        )
    if mask_token:
        mask_id = tokenizer.convert_tokens_to_ids(mask_token)
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            raise ConversionError(f"--mask-token {mask_token!r} is not in the tokenizer.")
        tokenizer.mask_token = mask_token
        return tokenizer, mask_id, False
    if tokenizer.mask_token_id is not None:
        return tokenizer, tokenizer.mask_token_id, False
    tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
    # A new token: its row (spare or added) starts as the mean embedding.
    return tokenizer, tokenizer.mask_token_id, True


def ar_extra(
    config,
    loop_config: LoopConfig,
    layers: list,
    seq_length: int,
    vocab: int,
    mask_id: int,
    shift_logits: bool,
) -> dict:
    """The checkpoint's `extra` description (model_size, loop_config, model_config)."""
    theta, scaling = _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = ModelSize(
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        ffn_hidden_size=config.intermediate_size,
        loop_layers=loop_config.loop_layers,
        max_loops=loop_config.max_loops,
        num_query_groups=config.num_key_value_heads or heads,
        seq_length=seq_length,
        kv_channels=None if head_dim * heads == config.hidden_size else head_dim,
        layernorm_epsilon=config.rms_norm_eps,
        qk_layernorm=config.model_type == "qwen3",
        add_qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", 0)),
    )
    model_config = LoopMDMModelConfig(
        vocab_size=vocab,
        max_sequence_length=seq_length,
        mask_token_id=mask_id,
        rotary_base=theta,
        share_embeddings_and_output_weights=bool(config.tie_word_embeddings),
        rope_scaling=scaling,
        shift_logits=shift_logits,
    )
    return {
        "model_size": asdict(size),
        "loop_config": asdict(loop_config),
        "model_config": asdict(model_config),
    }


def _padded_rows(weight: torch.Tensor, vocab: int, mask_id: Optional[int]) -> torch.Tensor:
    """[rows, h] -> [vocab, h]: padding rows zero, a new [MASK] row the mean embedding."""
    out = weight.new_zeros(vocab, weight.size(1))
    out[: weight.size(0)] = weight
    if mask_id is not None:
        out[mask_id] = weight.float().mean(0).to(weight.dtype)
    return out


def megatron_tensors(hf_state: dict, config, layers: list, extra: dict, new_mask) -> dict:
    """The TP=1/PP=1 LoopMDMModel tensors of an HF CausalLM state dict.

    `new_mask`: the [MASK] id when it is a new token (its rows start as the mean), else None.
    """
    size, model = extra["model_size"], extra["model_config"]
    ng = size["num_query_groups"]
    hn = size["kv_channels"] or size["hidden_size"] // size["num_attention_heads"]
    per_group = size["num_attention_heads"] // ng
    vocab = model["vocab_size"]

    def fuse_qkv(q, k, v):
        # rows [np*hn], [ng*hn], [ng*hn] -> per group: its queries, its key, its value
        rest = q.shape[1:]
        parts = [q.view(ng, per_group * hn, *rest), k.view(ng, hn, *rest), v.view(ng, hn, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    out = {
        "embedding.word_embeddings.weight": _padded_rows(
            hf_state["model.embed_tokens.weight"], vocab, new_mask
        )
    }
    for new, old in enumerate(layers):
        h, m = f"model.layers.{old}.", f"decoder.layers.{new}."
        attn = f"{h}self_attn."
        out[f"{m}input_layernorm.weight"] = hf_state[f"{h}input_layernorm.weight"]
        out[f"{m}self_attention.linear_qkv.weight"] = fuse_qkv(
            *(hf_state[f"{attn}{x}_proj.weight"] for x in "qkv")
        )
        if size["add_qkv_bias"]:
            out[f"{m}self_attention.linear_qkv.bias"] = fuse_qkv(
                *(hf_state[f"{attn}{x}_proj.bias"] for x in "qkv")
            )
        if size["qk_layernorm"]:
            out[f"{m}self_attention.q_layernorm.weight"] = hf_state[f"{attn}q_norm.weight"]
            out[f"{m}self_attention.k_layernorm.weight"] = hf_state[f"{attn}k_norm.weight"]
        out[f"{m}self_attention.linear_proj.weight"] = hf_state[f"{attn}o_proj.weight"]
        out[f"{m}pre_mlp_layernorm.weight"] = hf_state[f"{h}post_attention_layernorm.weight"]
        out[f"{m}mlp.linear_fc1.weight"] = torch.cat(
            [hf_state[f"{h}mlp.gate_proj.weight"], hf_state[f"{h}mlp.up_proj.weight"]]
        )
        out[f"{m}mlp.linear_fc2.weight"] = hf_state[f"{h}mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf_state["model.norm.weight"]
    if not model["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = _padded_rows(hf_state["lm_head.weight"], vocab, new_mask)
    return out


def pretrain_flags(extra: dict, tokenizer_dir: Optional[Path]) -> list[str]:
    """The `pretrain_loopmdm.py` model flags that rebuild this architecture."""
    size, model, loop = extra["model_size"], extra["model_config"], extra["loop_config"]
    flags = [
        "--num-layers", size["num_layers"], "--hidden-size", size["hidden_size"],
        "--ffn-hidden-size", size["ffn_hidden_size"],
        "--num-attention-heads", size["num_attention_heads"],
        "--num-query-groups", size["num_query_groups"], "--seq-length", size["seq_length"],
        "--normalization", "RMSNorm", "--swiglu", "--rotary-base", model["rotary_base"],
        "--norm-epsilon", size["layernorm_epsilon"], "--padded-vocab-size", model["vocab_size"],
        "--loop-layers", *loop["loop_layers"], "--max-loops", loop["max_loops"],
        "--mask-token-id", model["mask_token_id"],
    ]  # fmt: skip
    if size["kv_channels"]:
        flags += ["--kv-channels", size["kv_channels"]]
    flags += ["--qk-layernorm"] if size["qk_layernorm"] else []
    flags += ["--add-qkv-bias"] if size["add_qkv_bias"] else []
    if not model["share_embeddings_and_output_weights"]:
        flags.append("--untie-embeddings-and-output-weights")
    if model["rope_scaling"]:
        flags += ["--rope-scaling", json.dumps(model["rope_scaling"])]
    flags += ["--shift-logits"] if model["shift_logits"] else []
    if tokenizer_dir is not None:
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
    return [str(f) for f in flags]


def import_ar_model(
    load,
    save,
    loop_layers,
    max_loops: int,
    retrofit: bool = False,
    shift_logits: bool = False,
    mask_token: Optional[str] = None,
    seq_length: Optional[int] = None,
    divisible_by: int = 128,
    iteration: int = 0,
) -> Path:
    """Writes the LoopMDM dist checkpoint of the HF AR model `load` under `save`.

    Also writes `save/tokenizer/` (with the [MASK] token) when the model has a tokenizer, and
    `save/pretrain_flags.txt`, the flags `pretrain_loopmdm.py --load save --finetune` needs.

    Returns:
        The checkpoint directory.
    """
    from transformers import AutoModelForCausalLM

    load, save = Path(load), Path(save)
    config = read_ar_config(load)
    seq_length = seq_length or config.max_position_embeddings
    _check_supported(config, seq_length)
    if divisible_by < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by {divisible_by} must be >= 1.")
    loop_config = LoopConfig(loop_layers=tuple(loop_layers), max_loops=max_loops)
    layers = kept_layers(config.num_hidden_layers, loop_layers, max_loops, retrofit)
    rows = config.vocab_size
    tokenizer, mask_id, is_new = _mask_token(load, mask_token, rows)
    needed = max(rows, mask_id + 1, len(tokenizer) if tokenizer is not None else 0)
    vocab = math.ceil(needed / divisible_by) * divisible_by
    extra = ar_extra(config, loop_config, layers, seq_length, vocab, mask_id, shift_logits)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(load, dtype=torch.float32)
    except OSError as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ConversionError(
            f"--from-ar {load}: the weights cannot be read (missing or broken files): "
            f"{first_line}"
        ) from e
    tensors = megatron_tensors(
        hf_model.state_dict(), config, layers, extra, mask_id if is_new else None
    )
    del hf_model
    tokenizer_dir = None
    if tokenizer is not None:
        tokenizer_dir = (save / TOKENIZER_DIR).resolve()
        tokenizer.save_pretrained(tokenizer_dir)
    extra["run_config"] = conversion_run_config_json(
        "float32",  # save_weights_as_checkpoint's default dtype
        "HuggingFaceTokenizer" if tokenizer_dir else None,
        str(tokenizer_dir) if tokenizer_dir else None,
        {"converted_from": str(load.resolve()), "mask_token_id": mask_id,
         "imported_layers": layers},
    )  # fmt: skip
    directory = save_weights_as_checkpoint(extra, tensors, save, iteration)
    (save / FLAGS_FILE).write_text(" ".join(pretrain_flags(extra, tokenizer_dir)) + "\n")
    return directory
