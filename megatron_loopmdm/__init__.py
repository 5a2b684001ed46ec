"""megatron-loopmdm: looped masked diffusion language models on megatron-core."""

import warnings

from megatron_loopmdm._compat import prepare_megatron_import

__version__ = "0.1.0"

prepare_megatron_import()

# megatron-core warns at import about optional packages we do not need (apex and Transformer
# Engine are optional here) and about modules we do not use; silence exactly those messages.
for _message in (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*MimoModelConfig is experimental.*",
):
    warnings.filterwarnings("ignore", message=_message)
