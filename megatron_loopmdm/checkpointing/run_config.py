"""The run configuration a checkpoint stores: versioned JSON, readable without this package.

Each checkpoint's extra state holds `run_config`, a JSON string of the run's typed
configuration: the resolved model size, model, loop, parallel layout and diffusion objective,
and every other section of the run's `RunConfig` (optimization, backend, data, checkpoint,
logging, training). Tools read the parameter dtype and the tokenizer back from it.
`read_run_config` reads every version, and checkpoints written before it existed, whose extra
state held only the saved flags (`args`, a dict of the parsed command line) or the converters'
subset of them. Converters write a partial tree (`conversion_run_config_json`).
"""

import dataclasses
import json

RUN_CONFIG_VERSION = 2
"""Raised when the stored layout changes; readers refuse versions newer than theirs.

1: the model size, model, loop, parallel and diffusion configs; `training` held only
   `params_dtype` and `data` only `tokenizer_type` and `tokenizer_model`, beside the saved
   flags (`args`) in the extra state.
2: every section of the run's `training.config.RunConfig` (the model options, optimization,
   backend, data, checkpoint, logging and training sections in full); no saved flags. Version
   1's keys keep their meaning, so its readers read version 2.
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def run_config_json(configs: dict) -> str:
    """The JSON stored as `run_config`.

    Args:
        configs: name -> config dataclass (e.g. "model_size": ModelSize, "parallel": ...); must
            hold "training" (with `params_dtype`, one of `DTYPE_NAMES`) and "data" (with
            `tokenizer_type` and `tokenizer_model`, None when no --tokenizer-model was passed).
    """
    tree = {name: dataclasses.asdict(config) for name, config in configs.items()}
    assert tree["training"]["params_dtype"] in DTYPE_NAMES, tree["training"]
    assert {"tokenizer_type", "tokenizer_model"} <= tree["data"].keys(), tree["data"]
    tree["version"] = RUN_CONFIG_VERSION
    return json.dumps(tree, sort_keys=True)


def conversion_run_config_json(
    params_dtype: str, tokenizer_type, tokenizer_model, conversion: dict
) -> str:
    """The `run_config` of a checkpoint written by a converter (HF -> megatron, AR import): no
    run made it, so it holds only `training.params_dtype`, the tokenizer in `data` and
    `conversion` (where the weights came from and what the converter chose)."""
    assert params_dtype in DTYPE_NAMES, params_dtype
    tree = {
        "version": RUN_CONFIG_VERSION,
        "training": {"params_dtype": params_dtype},
        "data": {"tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model},
        "conversion": conversion,
    }
    return json.dumps(tree, sort_keys=True)


def read_run_config(extra: dict) -> dict:
    """A checkpoint's run configuration as a plain dict (at least `training.params_dtype`,
    `data.tokenizer_type` and `data.tokenizer_model`), of any version up to this reader's.

    Raises:
        ValueError: a `run_config` of a newer version than this reader.
    """
    if "run_config" in extra:
        tree = json.loads(extra["run_config"])
        if tree.get("version", 0) > RUN_CONFIG_VERSION:
            raise ValueError(
                f"The checkpoint's run configuration is version {tree['version']}, newer than "
                f"this package reads ({RUN_CONFIG_VERSION}); upgrade megatron-loopmdm."
            )
        return tree
    flags = extra.get("args") or {}  # older checkpoints: the saved command line
    dtype = "bfloat16" if flags.get("bf16") else "float16" if flags.get("fp16") else "float32"
    return {
        "version": 0,
        "training": {"params_dtype": dtype},
        "data": {
            "tokenizer_type": flags.get("tokenizer_type"),
            "tokenizer_model": flags.get("tokenizer_model"),
        },
    }
