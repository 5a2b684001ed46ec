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


def sft_loss_positions(valid: Tensor, response_mask: Tensor) -> Tensor:
    """The positions supervised fine-tuning masks and scores: valid response tokens.

    LLaDA's SFT objective: prompt tokens are never masked and never in the loss; each response
    token is masked with p = (1 - eps) t + eps, and the loss is the sum over masked response
    tokens of CE / p divided by the number of response tokens (here over the whole global
    batch, megatron's per-token normalisation, so that every parallel layout agrees).

    Args:
        valid: [b, s] bool, positions that take part (not padding).
        response_mask: [b, s], nonzero on response tokens.

    Returns:
        [b, s] bool.
    """
    return valid & response_mask.bool()
