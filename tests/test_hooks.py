import pytest
import torch
from conftest import FAMILIES, make_model

from saesteer.errors import SaesteerError
from saesteer.hooks import decoder_layers, edit_residual, residual_at


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_early_exit_equals_hidden_states(family, ids):
    model = make_model(family)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    for layer in (0, 2):
        torch.testing.assert_close(residual_at(model, ids, layer), states[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(
            residual_at(model, ids, layer, point="resid_pre"), states[layer], rtol=0, atol=0
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_edit_changes_downstream_only_inside_block(family, ids):
    model = make_model(family)
    with torch.no_grad():
        clean = model(ids).logits
        with edit_residual(model, 1, lambda h: h.clone()):
            same = model(ids).logits
        with edit_residual(
            model,
            1,
            lambda h: h + 3.0 * torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0)),
            point="resid_pre",
        ):
            edited = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (edited - clean).abs().max() > 1e-3
    torch.testing.assert_close(after, clean, rtol=0, atol=0)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in decoder_layers(model))


def test_edit_only_chosen_positions(ids):
    model = make_model("llama")
    seen = []

    def add_at_last(h):
        seen.append(h.shape)
        h = h.clone()
        h[:, -1] += torch.linspace(-3, 3, h.shape[-1])
        return h

    with torch.no_grad():
        clean = residual_at(model, ids, 3)
        with edit_residual(model, 1, add_at_last):
            edited = residual_at(model, ids, 3)
    torch.testing.assert_close(edited[:, :-1], clean[:, :-1], rtol=0, atol=0)
    assert (edited[:, -1] - clean[:, -1]).abs().max() > 1e-3
    assert seen == [torch.Size([2, 12, 64])]


def test_bad_layer_and_point(ids):
    model = make_model("gpt2")
    with pytest.raises(SaesteerError, match="out of range"):
        residual_at(model, ids, 4)
    with pytest.raises(SaesteerError, match="cannot read activations at 'mlp_out'"):
        residual_at(model, ids, 1, point="mlp_out")
    with pytest.raises(SaesteerError, match="cannot read activations at 'input_ids'"):
        residual_at(model, ids, 1, point="input_ids")
    with (
        pytest.raises(SaesteerError, match="unknown hook point"),
        edit_residual(model, 1, lambda h: None, "mlp_out"),
    ):
        pass
    with (
        pytest.raises(SaesteerError, match="read-only"),
        edit_residual(model, 1, lambda ids: ids + 1, "input_ids"),
    ):
        model(input_ids=ids)
