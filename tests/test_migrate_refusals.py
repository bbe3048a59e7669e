"""Encoders migrate_from_electra cannot upcycle exactly are refused, naming why: X-MOD (its language
adapters), and shared_fraction beside the shared expert's own settings."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertConfig, BertModel, XmodConfig, XmodForMaskedLM, XmodModel  # noqa: E402

from fulu_nas import migrate_from_electra  # noqa: E402
from fulu_nas.cli import main  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402

from .hf_models import save_tokenizer, write_corpus  # noqa: E402


def xmod_config():
    return XmodConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      languages=["en_XX"], default_language="en_XX")


@pytest.mark.parametrize("kw", [{}, {"verify": False}, {"routing_strategy": "expert_choice", "require_exact": False}])
def test_an_xmod_encoder_is_refused_naming_its_type(kw):
    model = XmodModel(xmod_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FuluConfigError, match=r"XmodModel \(model_type 'xmod'\) is not supported: "
                                              r"encoder.layer\[0\].output \(XmodOutput\) does more than .*"
                                              r"adapter_modules") as e:
        migrate_from_electra(model, num_experts=4, inplace=True, **kw)
    assert len(e.value.problems) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.encoder.layer[0].output).__name__ == "XmodOutput"


def test_a_search_on_an_xmod_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "xmod"
    XmodForMaskedLM(xmod_config()).save_pretrained(folder)
    save_tokenizer(folder)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["search", "+experiment=upcycle_tiny", f"model={folder}", f"task.path={write_corpus(tmp_path / 'c')}",
                 f"hydra.run.dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "(model_type 'xmod') is not supported" in err and "Traceback" not in err and not out.exists()


def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)).eval()


def test_a_gated_shared_expert_beside_shared_fraction_is_inexact_and_said_so():
    d = bert()
    ids = torch.randint(5, 64, (2, 10))
    with torch.no_grad():
        ref = d(input_ids=ids)[0]
    with pytest.raises(FuluConfigError, match="shared_expert_gate=True scales the shared expert cut out of the FFN"):
        migrate_from_electra(d, num_experts=4, shared_fraction=0.25, shared_expert_gate=True)
    for kw in ({"require_exact": False}, {"require_exact": False, "verify": False}):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = migrate_from_electra(d, num_experts=4, shared_fraction=0.25, shared_expert_gate=True, **kw).eval()
        info = m.fulu_migration
        assert not info.exact and "shared_expert_gate=True" in info.not_exact_because[0] and w
        with torch.no_grad():
            assert (m(input_ids=ids)[0] - ref).abs().max() > 1e-3  # it indeed differs


@pytest.mark.parametrize("kw", [{"shared_expert_ffn_size": 24}, {"shared_expert_ffn_size": 16},
                                {"shared_expert_ffn_size": None}, {"num_shared_experts": 0}])
def test_a_shared_count_or_width_beside_shared_fraction_is_refused(kw):
    name = next(iter(kw))
    with pytest.raises(FuluConfigError, match=f"{name}={kw[name]!r} cannot be set with it"):
        migrate_from_electra(bert(), num_experts=4, shared_fraction=0.25, **kw)


@pytest.mark.parametrize("reentrant", [True, False])
def test_the_balancing_losses_keep_their_gradient_or_say_why_not(reentrant):
    """Under Hugging Face's reentrant gradient checkpointing the forward runs without gradients: the
    balancing losses reached no router, without a word."""
    from fulu_nas.interop.migrate import balance_loss, pimoe_layers

    model = migrate_from_electra(bert(), num_experts=4).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids=torch.randint(5, 64, (2, 10)))
    if reentrant:
        with pytest.raises(FuluConfigError, match="use_reentrant': False"):
            balance_loss(model)
        return
    gates = [layer.router.gate.weight for layer in pimoe_layers(model)]
    grads = torch.autograd.grad(balance_loss(model), gates)
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # an evaluation needs no gradient
        model(input_ids=torch.randint(5, 64, (2, 10)))
        assert not balance_loss(model).requires_grad


def test_a_headless_encoder_saved_without_its_pooler_migrates(tmp_path):
    """BertModel(add_pooling_layer=False) saves no pooler; the check that the weights are the model's own
    took its absence for another model's weights."""
    torch.manual_seed(0)
    dense = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4), add_pooling_layer=False).eval()
    dense.save_pretrained(tmp_path / "no-pooler")
    migrated = migrate_from_electra(str(tmp_path / "no-pooler"), num_experts=4).eval()
    ids = torch.randint(5, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(migrated(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
