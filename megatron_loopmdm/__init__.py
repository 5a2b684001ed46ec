"""megatron-loopmdm: looped masked diffusion language models on megatron-core."""

from megatron_loopmdm._compat import prepare_megatron_import

__version__ = "0.1.0"

prepare_megatron_import()
