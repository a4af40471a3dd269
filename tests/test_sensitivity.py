"""Under DP-SGD, removing one training example moves the summed clipped gradient by at most the clip
norm, and by exactly the clip norm when that example's gradient is longer than it. In-batch negatives,
which this project forbids under DP, break the bound (NOTES.md section 4)."""

import torch
from opacus import GradSampleModule
from torch.nn import functional as F

from client.trainer import sample_candidates
from shared.model import TwoTower, history_features

C = 1.0
N_ITEMS, B = 50, 12


def make_model():
    torch.manual_seed(0)
    content = {"text": F.normalize(torch.randn(N_ITEMS, 16), dim=-1)}
    mask = torch.ones(N_ITEMS, 1)
    model = TwoTower(content, mask, N_ITEMS, dim=8)
    history = history_features(content, mask)[:10].sum(0, keepdim=True)  # the history sum, as released
    return model, history


def clipped_sum(model, history, logits_fn, keep_rows):
    gsm = GradSampleModule(model)
    gsm.zero_grad()
    loss = logits_fn(gsm, history, keep_rows)
    loss.backward()
    params = [p for p in gsm.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.reshape(len(keep_rows), -1) for p in params], dim=1)
    norms = per_sample.norm(dim=1)
    clipped = per_sample * (C / norms.clamp(min=1e-12)).clamp(max=1.0).unsqueeze(1)
    gsm._close()
    return clipped.sum(0), norms


def test_sampled_negatives_keep_the_sensitivity_at_the_clip_norm():
    model, history = make_model()
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, N_ITEMS, (B,), generator=g)
    candidates = sample_candidates(targets, N_ITEMS, 5, g)  # drawn per example, once

    def loss(m, h, rows):
        # as in training: each example's history leaves out its own target
        logits = m(h.expand(len(rows), -1), candidates[rows], leave_out=targets[rows])
        return F.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.long), reduction="sum")

    full, norms = clipped_sum(model, history, loss, torch.arange(B))
    assert (norms > C).sum() >= B // 2, "most gradients must be longer than C for the test to bite"
    for removed in range(B):
        rows = torch.tensor([i for i in range(B) if i != removed])
        without, _ = clipped_sum(model, history, loss, rows)
        moved = float((full - without).norm())
        assert moved <= C + 1e-5
        assert abs(moved - min(C, float(norms[removed]))) < 1e-4


def test_in_batch_negatives_break_the_bound():
    model, history = make_model()
    targets = torch.randint(0, N_ITEMS, (B,), generator=torch.Generator().manual_seed(2))

    def loss(m, h, rows):
        batch = targets[rows]
        logits = m(h.expand(len(rows), -1), batch.unsqueeze(0).expand(len(rows), -1))
        return F.cross_entropy(logits, torch.arange(len(rows)), reduction="sum")

    full, _ = clipped_sum(model, history, loss, torch.arange(B))
    worst = max(
        float((full - clipped_sum(model, history, loss, torch.tensor([i for i in range(B) if i != r]))[0]).norm())
        for r in range(B)
    )
    assert worst > 1.2 * C
