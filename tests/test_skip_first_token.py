"""--skip-first-token: position 0 of each window (BOS / attention sink) is left out of the layer statistics."""

from __future__ import annotations

import numpy as np
import torch
from tiny import tiny_model

from simdiff.collect.hooks import collect_layer_statistics
from simdiff.data import batches


@torch.no_grad()
def test_statistics_leave_out_position_zero_but_the_model_still_sees_it() -> None:
    model = tiny_model("llama", 4)
    windows = torch.randint(4, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = collect_layer_statistics(model, batches(windows, 2, skip_first_token=True))
    full = collect_layer_statistics(model, batches(windows, 2))
    assert stats.tokens.tolist() == [3 * 9] * 4 and full.tokens.tolist() == [3 * 10] * 4
    states = model(windows, output_hidden_states=True).hidden_states  # [l] is layer l's input (last: normed)
    for layer in range(3):
        x, y = states[layer][:, 1:].reshape(-1, 32), states[layer + 1][:, 1:].reshape(-1, 32)
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean()
        np.testing.assert_allclose(stats.mean_cos[layer], float(cos), rtol=1e-5)
        mssd = float(((y - x).double() ** 2).mean())
        np.testing.assert_allclose(stats.mssd("absolute")[layer], mssd, rtol=1e-5)
    assert not np.allclose(stats.mssd("absolute"), full.mssd("absolute"))
