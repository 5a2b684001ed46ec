"""The masked-diffusion NELBO (MDLM / LLaDA)."""

from torch import Tensor


def masked_diffusion_loss_sum(token_ce: Tensor, mask: Tensor, p_mask: Tensor) -> Tensor:
    """Sum over masked positions of CE / p_mask: the NELBO numerator of a micro-batch.

    Dividing by the number of tokens gives the per-token NELBO; megatron's per-token loss
    normalisation does that over the whole global batch, across micro-batches and replicas.

    Args:
        token_ce: [b, s] float32 cross entropy of the clean token at every position.
        mask: [b, s] bool, True where the input was masked.
        p_mask: [b] float32 masking probability of each sample.

    Returns:
        A scalar float32 tensor.
    """
    weights = mask.float() / p_mask.float()[:, None]
    return (token_ce.float() * weights).sum()
