"""The ADM UNet: OpenAI's key names and shapes, attention layout, weight loading with a report."""

import json
import math
import os

import pytest
import torch

from realnet import adm
from realnet.cli import UserError

# Key -> shape of OpenAI's guided-diffusion 256x256 checkpoints (tests/data/, read from the files).
DATA = os.path.join(os.path.dirname(__file__), "data")


def manifest(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_paper_preset_equals_openai_class_conditional_state_dict():
    with torch.device("meta"):  # 554M parameters, no memory
        model = adm.build_unet("paper", num_classes=1000)
    expected = manifest("adm256_cond_state_dict.json")
    got = shapes(model)
    assert list(got) == list(expected)  # same names in the same order
    assert got == expected


def test_paper_preset_unconditional_equals_openai_unconditional_state_dict():
    with torch.device("meta"):
        model = adm.build_unet("paper", num_classes=None)
    assert shapes(model) == manifest("adm256_uncond_state_dict.json")


def test_paper_preset_parameter_count_with_15_classes():
    with torch.device("meta"):
        model = adm.build_unet("paper", num_classes=15)
    assert adm.count_parameters(model) == 552_829_446  # the authors' model: 552.8M


def legacy_attention(qkv, n_heads):
    """OpenAI's QKVAttentionLegacy, verbatim in einsum form."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def test_attention_block_matches_openai_legacy_layout():
    torch.manual_seed(0)
    block = adm.AttentionBlock(64, num_head_channels=16)
    torch.nn.init.normal_(block.proj_out.weight)  # zero-initialised otherwise: make it matter
    x = torch.randn(2, 64, 4, 4)
    flat = x.reshape(2, 64, -1)
    expected = flat + block.proj_out(legacy_attention(block.qkv(block.norm(flat)), 4))
    torch.testing.assert_close(block(x), expected.reshape_as(x), rtol=1e-5, atol=1e-5)


def test_tiny_forward_shapes_and_zero_initial_output():
    model = adm.build_unet("tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    out = model(x, torch.tensor([0, 999]), torch.tensor([0, 2]))
    assert out.shape == (2, 6, 64, 64)
    assert torch.count_nonzero(out) == 0  # the output conv is zero-initialised
    with pytest.raises(ValueError):
        model(x, torch.tensor([0, 1]))  # class-conditional: y is required


def test_class_and_timestep_change_the_output():
    torch.manual_seed(0)
    model = adm.build_unet("tiny", num_classes=3, model_channels=32)
    for p in model.parameters():  # undo zero init so every path contributes
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 3, 32, 32)
    base = model(x, torch.tensor([10]), torch.tensor([0]))
    assert not torch.allclose(base, model(x, torch.tensor([10]), torch.tensor([1])))
    assert not torch.allclose(base, model(x, torch.tensor([500]), torch.tensor([0])))


def test_groupnorm32_computes_in_float32():
    norm = adm.GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, torch.nn.functional.group_norm(x.float(), 32).to(torch.bfloat16)
    )


def test_timestep_embedding_is_cos_then_sin():
    emb = adm.timestep_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_load_pretrained_copies_matching_and_reports_the_label_embedding(tmp_path):
    torch.manual_seed(0)
    source = adm.build_unet("tiny", num_classes=5)
    for p in source.parameters():
        p.data.normal_()
    path = tmp_path / "openai_like.pt"
    torch.save(source.state_dict(), path)  # a raw state_dict, like 256x256_diffusion.pt
    target = adm.build_unet("tiny", num_classes=3)
    lines = []
    loaded, skipped, missing = adm.load_pretrained(target, str(path), log=lines.append)
    assert missing == ["label_emb.weight"]
    assert len(skipped) == 1 and skipped[0].startswith("label_emb.weight (5, 1")
    assert any("label_emb.weight" in line for line in lines)  # reported, not hidden
    for name, value in target.state_dict().items():
        if name != "label_emb.weight":
            torch.testing.assert_close(value, source.state_dict()[name])


def test_load_pretrained_accepts_wrapped_module_prefixed_state_dict(tmp_path):
    source = adm.build_unet("tiny", num_classes=3)
    for p in source.parameters():
        p.data.normal_()
    path = tmp_path / "authors_ckpt.pt"
    torch.save(
        {"epoch": 240, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
        path,
    )
    target = adm.build_unet("tiny", num_classes=3)
    loaded, skipped, missing = adm.load_pretrained(target, str(path), log=lambda s: None)
    assert not skipped and not missing
    torch.testing.assert_close(target.label_emb.weight, source.label_emb.weight)


def test_load_pretrained_errors_name_the_file(tmp_path):
    model = adm.build_unet("tiny", num_classes=3)
    with pytest.raises(UserError, match=r"256x256_diffusion.pt.*|missing\.pt.*download"):
        adm.load_pretrained(model, str(tmp_path / "missing.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="garbage.pt"):
        adm.load_pretrained(model, str(bad))
    other = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="nothing in"):
        adm.load_pretrained(model, str(other), log=lambda s: None)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="tiny"):
        adm.build_unet("huge", num_classes=3)


@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_no_groupnorm_is_instance_norm(preset):
    """Every GroupNorm has >= 4 channels per group. With one channel per group (instance norm)
    the net cannot carry an image's mean colour through, and samples get random colour casts."""
    with torch.device("meta"):
        model = adm.build_unet(preset, num_classes=2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 4 for m in norms)
    if preset == "paper":  # exactly OpenAI's normalisation
        assert {m.num_groups for m in norms} == {32}
