"""mamba2_to_palimpsa: a transformers Mamba2 checkpoint becomes Meta-Mamba2, exactly Mamba2 until beta moves."""

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from amformers import PalimpsaForCausalLM
from amformers.convert import mamba2_to_palimpsa

TOLERANCE = 1e-4  # relative error of the logits, fp32, PyTorch paths on both sides


def tiny_mamba2(tie=False, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, expand=2,
        n_groups=2, chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
    )  # fmt: skip
    fields.update(overrides)
    model = Mamba2ForCausalLM(Mamba2Config(**fields)).eval()
    with torch.no_grad():  # move the SSM parameters away from their init, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "mixer.D", "norm.weight", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tokens(batch=2, length=29, seed=1):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
def test_not_metaplastic_conversion_equals_mamba2(tie):
    mamba2 = tiny_mamba2(tie=tie)
    model = mamba2_to_palimpsa(mamba2, metaplastic=False)
    assert type(model) is PalimpsaForCausalLM and model.config.mixer == "mamba2" and not model.config.metaplastic
    assert model.config.head_dim == 8 and model.config.value_dim == 16 and model.config.intermediate_size == 0
    x = tokens()
    with torch.no_grad():
        error = relative_error(model(x).logits, mamba2(x).logits)
    assert error <= TOLERANCE, error
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x[:, :6], **kwargs), mamba2.generate(x[:, :6], **kwargs))


def test_metaplastic_conversion_equals_mamba2_while_beta_is_zero():
    """The metaplastic path (chunked Palimpsa, not the shortcut) with beta forced to 0 is Mamba2."""
    mamba2 = tiny_mamba2()
    model = mamba2_to_palimpsa(mamba2, metaplastic=True)
    x = tokens()
    with torch.no_grad():
        reference = mamba2(x).logits
        moved = relative_error(model(x).logits, reference)
        for layer in model.model.layers:
            layer.mixer.b_scale.fill_(float("-inf"))  # softplus(-inf) = 0: beta = 0 exactly
        error = relative_error(model(x).logits, reference)
    assert error <= TOLERANCE, error
    assert moved > error  # with the fine-tuning init, beta > 0 and the outputs leave Mamba2's


def test_metaplastic_conversion_fine_tunes_the_importance(tmp_path):
    mamba2 = tiny_mamba2()
    mamba2.save_pretrained(tmp_path / "mamba2")
    model = mamba2_to_palimpsa(tmp_path / "mamba2").train()  # from a path, metaplastic by default
    assert model.config.metaplastic
    b_scale = model.model.layers[0].mixer.b_scale
    assert b_scale.min() >= 0.1 and b_scale.max() <= 1.0  # the official fine-tuning init
    x = tokens()
    model(x, labels=x).loss.backward()
    for name in ("b_rank_proj.weight", "b_proj.weight", "b_scale", "in_proj.weight"):
        grad = model.get_parameter(f"model.layers.1.mixer.{name}").grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.save_pretrained(tmp_path / "meta")
    reloaded = PalimpsaForCausalLM.from_pretrained(tmp_path / "meta").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model.eval()(x).logits, atol=0, rtol=0)


def test_conversion_refuses_what_it_cannot_carry():
    with pytest.raises(TypeError, match="Mamba2ForCausalLM"):
        mamba2_to_palimpsa(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="silu"):
        mamba2_to_palimpsa(tiny_mamba2(hidden_act="gelu"))
