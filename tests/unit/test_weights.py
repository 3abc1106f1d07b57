"""Loading published DiT checkpoints (.pt state dicts in the official layout) and orch's own .safetensors by exact
keys."""

import pytest
import torch
from safetensors.torch import save_file

from model.dit import DiT
from orchestrator.components.weights import WeightsMismatch, load_weights


def tiny_dit(**overrides) -> DiT:
    return DiT(
        **{
            "input_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 32,
            "depth": 2,
            "num_heads": 2,
            "num_classes": 10,
            "learn_sigma": True,
            **overrides,
        }
    )


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint"])
def test_a_published_pt_loads_with_every_key_and_the_same_outputs(tmp_path, layout):
    torch.manual_seed(0)
    published = tiny_dit()
    for p in published.parameters():  # zero-initialised layers would make any two models agree
        torch.nn.init.normal_(p, std=0.02)
    state = published.state_dict()
    # DiT-XL-2-256x256.pt is a bare state dict of EMA weights; DiT's own training checkpoints hold {"model", "ema",
    # "opt", "args"}.
    saved = (
        state
        if layout == "state_dict"
        else {"model": {k: v + 1 for k, v in state.items()}, "ema": state, "opt": {}, "args": None}
    )
    torch.save(saved, tmp_path / "DiT-XL-2-256x256.pt")

    torch.manual_seed(1)
    fresh = tiny_dit()
    load_weights(fresh, tmp_path / "DiT-XL-2-256x256.pt")
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])
    assert torch.equal(fresh.eval()(x, t, y), published.eval()(x, t, y))


def test_a_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    state = tiny_dit().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.1.attn.qkv.weight"]
    state["final_layer.linear.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsMismatch) as err:
        load_weights(tiny_dit(), tmp_path / "w.safetensors")
    message = str(err.value)
    assert "1 missing (blocks.1.attn.qkv.weight)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "1 of another shape (final_layer.linear.weight)" in message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsMismatch, match="does not exist"):
        load_weights(tiny_dit(), tmp_path / "nope.pt")
