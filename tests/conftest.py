"""Shared test set-up: quiet megatron-core's optional-dependency warnings."""

import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
