"""Per-document attention by segments (CPU fast path) equals the dense-mask attention."""

from megatron_loopmdm.data.dataset import document_attention_mask
from megatron_loopmdm.models.specs import SEGMENTS_ATTRIBUTE, SDPAttention, attach_document_segments

import pytest
import torch


def _attention(query, key, value, mask):
    attention = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attention)
    attention.dropout_p, attention.softmax_scale = 0.0, None
    return attention.forward(query, key, value, mask)


@pytest.mark.parametrize("lengths", [
    [[5, 5, 5, 5], [5, 5, 5, 5]],  # equal documents tiling the rows (the reshape path)
    [[3, 9, 4, 4], [7, 1, 6, 2]],  # uneven, with padding (document id -1) at the end
])  # fmt: skip
def test_segments_match_the_dense_mask_in_values_and_gradients(lengths):
    s, heads, groups, hn = 20, 4, 2, 8
    document_ids = torch.full((2, s), -1)
    for row, parts in enumerate(lengths):
        start = 0
        for d, n in enumerate(parts[:-1] if row else parts):
            document_ids[row, start : start + n] = d
            start += n
    valid = document_ids >= 0
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(s, 2, heads, hn, generator=generator, requires_grad=True)
    k = torch.randn(s, 2, groups, hn, generator=generator, requires_grad=True)
    v = torch.randn(s, 2, groups, hn, generator=generator, requires_grad=True)
    dense_mask = document_attention_mask(document_ids) | ~valid[:, None, None]
    mask = attach_document_segments(dense_mask.clone(), document_ids, valid)
    assert getattr(mask, SEGMENTS_ATTRIBUTE) and not hasattr(dense_mask, SEGMENTS_ATTRIBUTE)
    outputs = []
    for m in (dense_mask, mask):
        out = _attention(q, k, v, m)  # [s, b, heads * hn]
        weight = valid.T[:, :, None].float()  # score real positions only
        grads = torch.autograd.grad((out * weight).pow(2).sum(), (q, k, v))
        outputs.append((out * weight, grads))
    (dense, dense_grads), (segmented, segmented_grads) = outputs
    torch.testing.assert_close(segmented, dense, rtol=1e-5, atol=1e-6)
    for got, want in zip(segmented_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (segmented[~valid.T] == 0).all(), "padding attends nothing"
