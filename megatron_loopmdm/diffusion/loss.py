"""The masked-diffusion NELBO (MDLM / LLaDA)."""

from torch import Tensor


def masked_diffusion_loss_per_sample(token_ce: Tensor, mask: Tensor, p_mask: Tensor) -> Tensor:
    """Each sample's sum over masked positions of CE / p_mask (its NELBO numerator).

    Dividing the sum over samples by the number of tokens gives the per-token NELBO; megatron's
    per-token loss normalisation does that over the whole global batch, across micro-batches and
    replicas. Computed in fp32 whatever the logits' dtype.

    Args:
        token_ce: [b, s] cross entropy of the clean token at every position.
        mask: [b, s] bool, True where the input was masked.
        p_mask: [b] masking probability of each sample.

    Returns:
        [b] float32.
    """
    return (token_ce.float() * mask.float()).sum(1) / p_mask.float()


def masked_diffusion_loss_sum(token_ce: Tensor, mask: Tensor, p_mask: Tensor) -> Tensor:
    """The micro-batch's NELBO numerator: `masked_diffusion_loss_per_sample` summed."""
    return masked_diffusion_loss_per_sample(token_ce, mask, p_mask).sum()
