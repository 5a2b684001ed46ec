"""The configuration of the masked-diffusion objective."""

from dataclasses import dataclass

from megatron_loopmdm.diffusion.noise import TIME_SAMPLINGS


@dataclass
class DiffusionConfig:
    """The masked-diffusion objective."""

    mask_token_id: int
    """The reserved [MASK] id."""

    time_eps: float = 1e-3
    """Smallest masking probability: p = (1 - eps) t + eps."""

    time_sampling: str = "uniform"
    """`uniform` t per sample, or `antithetic` (stratified over each global batch)."""

    global_batch_size: int = 1
    """The group over which antithetic times are stratified."""

    random_length_prob: float = 0.0
    """Share of samples cut to a random length (LLaDA uses 0.01)."""

    def __post_init__(self):
        if not 0 <= self.time_eps < 1:
            raise ValueError(f"time_eps={self.time_eps} must lie in [0, 1).")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}.")
        if not 0 <= self.random_length_prob <= 1:
            raise ValueError("random_length_prob must lie in [0, 1].")
