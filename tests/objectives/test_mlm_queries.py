"""MaskedLM runs the trunk's last block on the selected positions only (`Encoder.encode(queries=)`): the loss
and every gradient must equal those of the full encoder output indexed at the selected positions."""

from __future__ import annotations

import torch

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.ssl.mlm import MaskedLM


def test_step_with_queried_last_block_equals_the_full_encoder():
    torch.manual_seed(0)
    m = MaskedLM(tiny("text", vocab_size=512), mask_id=4, special_ids=[0, 1, 2, 3, 4], num_tokens=500).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 48), generator=g)
    lengths = torch.tensor([48, 20, 33, 41])
    ids[:, 0] = 0
    ids[torch.arange(48)[None] >= lengths[:, None]] = 1
    batch = Batch({"text": ids}, {"text": lengths})
    results = []
    for full in (True, False):
        m.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(5)
        if full:
            corrupted, selected = m.corrupt(ids, lengths, gen)
            h = m.encoder.encode(m.encoder.embed(corrupted, lengths)).last[selected]
            loss = torch.nn.functional.cross_entropy(m.logits(h), ids[selected], reduction="sum") / selected.sum()
            counts = selected.sum(1)
            assert int(counts.min()) < int(counts.max())  # rows select different counts: queries are padded
        else:
            m.generator = lambda device=None: gen
            loss = m.step(batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l_full, g_full), (l_step, g_step) = results
    torch.testing.assert_close(l_step, l_full, rtol=1e-5, atol=1e-6)
    assert g_step.keys() == g_full.keys() and len(g_full) > 10
    for name, g in g_full.items():
        torch.testing.assert_close(g_step[name], g, rtol=1e-4, atol=1e-6, msg=name)
