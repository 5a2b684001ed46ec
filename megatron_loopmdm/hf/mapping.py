"""Names and configs between a LoopMDM megatron checkpoint and its Hugging Face form.

Pure functions on plain dicts of tensors: no process group, no megatron import. The megatron
side is the TP=1/PP=1 `LoopMDMModel.state_dict()` (dist checkpointing reshards any saved layout
to it); the HF side is `LoopMDMForMaskedDiffusion.state_dict()`.

    megatron                                          Hugging Face
    embedding.word_embeddings.weight                  model.embed_tokens.weight
    embedding.position_embeddings.weight              model.embed_positions.weight
    decoder.layers.{i}.input_layernorm.*              model.layers.{i}.input_layernorm.*
    decoder.layers.{i}.self_attention.linear_qkv      model.layers.{i}.self_attn.{q,k,v}_proj
    decoder.layers.{i}.self_attention.linear_proj     model.layers.{i}.self_attn.o_proj
    decoder.layers.{i}.pre_mlp_layernorm.*            model.layers.{i}.post_attention_layernorm.*
    decoder.layers.{i}.mlp.linear_fc1                 model.layers.{i}.mlp.{gate,up}_proj
    decoder.layers.{i}.mlp.linear_fc2                 model.layers.{i}.mlp.down_proj
    decoder.input_injection.adapter.weight            model.input_injection.weight
    decoder.loop_embedding.weight                     model.loop_embedding.weight
    decoder.final_layernorm.*                         model.norm.*
    output_layer.weight (untied only)                 lm_head.weight

linear_qkv rows are grouped per query group g: the group's np/ng query heads, then its key
head, then its value head, hn rows each. linear_fc1 of a gated MLP holds [gate; up].
"""

from typing import Iterator

import torch
from torch import Tensor

from .configuration_loopmdm import LoopMDMConfig

LAYER_NORM_EPS = 1e-5  # megatron_loopmdm.models.builder.transformer_config's layernorm_epsilon


def _norm_params(config: LoopMDMConfig) -> tuple[str, ...]:
    return ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)


def name_pairs(config: LoopMDMConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(megatron name, HF names, kind) for every tensor; kind is `copy`, `qkv` or `glu`."""
    yield "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"
    if config.position_embedding_type == "learned_absolute":
        yield "embedding.position_embeddings.weight", ("model.embed_positions.weight",), "copy"
    norms = _norm_params(config)
    for i in range(config.num_hidden_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for p in norms:
            yield f"{m}input_layernorm.{p}", (f"{h}input_layernorm.{p}",), "copy"
        qkv = tuple(f"{h}self_attn.{x}_proj.weight" for x in "qkv")
        yield f"{m}self_attention.linear_qkv.weight", qkv, "qkv"
        if getattr(config, "attention_bias", False):
            qkv_bias = tuple(f"{h}self_attn.{x}_proj.bias" for x in "qkv")
            yield f"{m}self_attention.linear_qkv.bias", qkv_bias, "qkv"
        if getattr(config, "qk_layernorm", False):
            for x in "qk":
                names = (f"{h}self_attn.{x}_norm.weight",)
                yield f"{m}self_attention.{x}_layernorm.weight", names, "copy"
        yield f"{m}self_attention.linear_proj.weight", (f"{h}self_attn.o_proj.weight",), "copy"
        for p in norms:
            yield f"{m}pre_mlp_layernorm.{p}", (f"{h}post_attention_layernorm.{p}",), "copy"
        if config.gated_linear_unit:
            fc1 = (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight")
            yield f"{m}mlp.linear_fc1.weight", fc1, "glu"
        else:
            yield f"{m}mlp.linear_fc1.weight", (f"{h}mlp.up_proj.weight",), "copy"
        yield f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), "copy"
    if config.loop_input_injection == "concat":
        yield "decoder.input_injection.adapter.weight", ("model.input_injection.weight",), "copy"
    if config.loop_embedding:
        yield "decoder.loop_embedding.weight", ("model.loop_embedding.weight",), "copy"
    for p in norms:
        yield f"decoder.final_layernorm.{p}", (f"model.norm.{p}",), "copy"
    if not config.tie_word_embeddings:
        yield "output_layer.weight", ("lm_head.weight",), "copy"


def _split_qkv(weight: Tensor, config: LoopMDMConfig) -> tuple[Tensor, Tensor, Tensor]:
    ng, hn = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // ng
    # [ng * (np/ng + 2) * hn, h] -> [ng, np/ng + 2, hn, h]
    grouped = weight.view(ng, per_group + 2, hn, -1)
    q = grouped[:, :per_group].reshape(ng * per_group * hn, -1)
    k = grouped[:, per_group].reshape(ng * hn, -1)
    v = grouped[:, per_group + 1].reshape(ng * hn, -1)
    return q.clone(), k.clone(), v.clone()


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: LoopMDMConfig) -> Tensor:
    ng, hn = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // ng
    h = q.size(-1)
    # [ng, np/ng, hn, h] ++ [ng, 1, hn, h] ++ [ng, 1, hn, h] -> [ng * (np/ng + 2) * hn, h]
    grouped = torch.cat(
        [q.view(ng, per_group, hn, h), k.view(ng, 1, hn, h), v.view(ng, 1, hn, h)], dim=1
    )
    return grouped.reshape(-1, h)


def megatron_to_hf(state: dict, config: LoopMDMConfig) -> dict:
    """The HF state dict of a TP=1/PP=1 megatron state dict (`_extra_state` entries ignored)."""
    out = {}
    for megatron_name, hf_names, kind in name_pairs(config):
        weight = state[megatron_name]
        if kind == "qkv" and weight.dim() == 1:  # a bias: split as a one-column weight
            parts = tuple(x.squeeze(-1) for x in _split_qkv(weight[:, None], config))
        elif kind == "qkv":
            parts = _split_qkv(weight, config)
        elif kind == "glu":
            parts = tuple(x.clone() for x in weight.chunk(2, dim=0))
        else:
            parts = (weight.clone(),)
        out.update(zip(hf_names, parts))
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def hf_to_megatron(state: dict, config: LoopMDMConfig) -> dict:
    """The megatron TP=1/PP=1 tensors of an HF state dict (the inverse of `megatron_to_hf`)."""
    out = {}
    for megatron_name, hf_names, kind in name_pairs(config):
        parts = [state[name] for name in hf_names]
        if kind == "qkv" and parts[0].dim() == 1:
            out[megatron_name] = _fuse_qkv(*(x[:, None] for x in parts), config).squeeze(-1)
        elif kind == "qkv":
            out[megatron_name] = _fuse_qkv(*parts, config)
        elif kind == "glu":
            out[megatron_name] = torch.cat(parts, dim=0)
        else:
            out[megatron_name] = parts[0].clone()
    return out


def hf_config_from_extra(extra: dict) -> LoopMDMConfig:
    """The HF config of a checkpoint's `extra` state (model_size, loop_config, model_config)."""
    size, loop, model = extra["model_size"], extra["loop_config"], extra["model_config"]
    if model.get("rope_scaling"):
        raise ValueError(
            f"The Hugging Face LoopMDM has no RoPE scaling yet; this model uses "
            f"{model['rope_scaling']}, so it cannot be exported (it trains and evaluates in "
            "megatron)."
        )
    return LoopMDMConfig(
        vocab_size=model["vocab_size"],
        hidden_size=size["hidden_size"],
        intermediate_size=size["ffn_hidden_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_query_groups"] or size["num_attention_heads"],
        head_dim=size.get("kv_channels") or size["hidden_size"] // size["num_attention_heads"],
        normalization=size["normalization"],
        layer_norm_eps=size.get("layernorm_epsilon", LAYER_NORM_EPS),
        hidden_act="silu" if size["swiglu"] else "gelu",
        gated_linear_unit=size["swiglu"],
        position_embedding_type=model["position_embedding_type"],
        max_position_embeddings=model["max_sequence_length"],
        rope_theta=model["rotary_base"],
        mask_token_id=model["mask_token_id"],
        loop_layers=list(loop["loop_layers"]),
        max_loops=loop["max_loops"],
        loop_input_injection=loop["input_injection"],
        loop_embedding=loop["loop_embedding"],
        tie_word_embeddings=model["share_embeddings_and_output_weights"],
        attention_bias=size.get("add_qkv_bias", False),
        qk_layernorm=size.get("qk_layernorm", False),
        shift_logits=model.get("shift_logits", False),
    )


def extra_from_hf_config(config: LoopMDMConfig) -> dict:
    """`model_size`, `loop_config` and `model_config` dicts (the checkpoint's `extra` form).

    Raises:
        ValueError: a field the megatron model cannot express (SwiGLU pairs with silu and
            GELU with gelu; the RoPE base is an integer).
    """
    problems = []
    if config.gated_linear_unit != (config.hidden_act == "silu"):
        problems.append("gated_linear_unit needs hidden_act='silu', and GELU an ungated MLP")
    if int(config.rope_theta) != config.rope_theta:
        problems.append(f"rope_theta={config.rope_theta} must be an integer")
    if problems:
        raise ValueError("The megatron LoopMDM cannot hold this model: " + "; ".join(problems))
    loop_layers = tuple(config.loop_layers)
    kv_channels = config.head_dim
    if config.head_dim * config.num_attention_heads == config.hidden_size:
        kv_channels = None
    return {
        "model_size": {
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "ffn_hidden_size": config.intermediate_size,
            "loop_layers": loop_layers,
            "max_loops": config.max_loops,
            "num_query_groups": config.num_key_value_heads,
            "normalization": config.normalization,
            "swiglu": config.gated_linear_unit,
            "seq_length": config.max_position_embeddings,
            "kv_channels": kv_channels,
            "layernorm_epsilon": config.layer_norm_eps,
            "qk_layernorm": getattr(config, "qk_layernorm", False),
            "add_qkv_bias": getattr(config, "attention_bias", False),
        },
        "loop_config": {
            "loop_layers": loop_layers,
            "max_loops": config.max_loops,
            "loop_sampling": "uniform",
            "input_injection": config.loop_input_injection,
            "loop_embedding": config.loop_embedding,
            "backprop_depth": None,
            # Training-only options: an HF model carries none.
            "state_noise": 0.0,
            "intermediate_loss_weight": 0.0,
        },
        "model_config": {
            "vocab_size": config.vocab_size,
            "max_sequence_length": config.max_position_embeddings,
            "mask_token_id": config.mask_token_id,
            "position_embedding_type": config.position_embedding_type,
            "rotary_base": int(config.rope_theta),
            "share_embeddings_and_output_weights": config.tie_word_embeddings,
            "rope_scaling": None,
            "shift_logits": getattr(config, "shift_logits", False),
        },
    }
