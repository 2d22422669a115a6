"""Layer-by-layer calibration passes each layer exactly what the whole model's forward does."""

from __future__ import annotations

import torch
from tiny_models import build_tiny_model

from grape.calibration.runner import run_layerwise
from grape.model_io import LazyCausalLM


def test_each_layer_sees_the_hidden_states_of_the_full_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    for arch in ("mixtral", "gpt_oss"):  # gpt_oss: sliding and full attention layers alternate
        model_dir = build_tiny_model(arch, tmp_path / arch)
        ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
        reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            expected = reference(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        seen = {}

        def visit(index, _layer, hidden, forward, seen=seen):
            seen[index] = torch.cat(hidden)
            forward()

        run_layerwise(LazyCausalLM.open(model_dir), ids, visit, batch_size=2, sequential=False)
        assert sorted(seen) == [0, 1]
        for index, hidden in seen.items():
            torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5, msg=f"{arch} layer {index}")
