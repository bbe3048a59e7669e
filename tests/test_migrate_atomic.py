"""``migrate_from_electra(model, inplace=True)`` changes the model all at once or not at all: a layer it
refuses, or an upcycled block that fails its verification, leaves the model exactly as it was (it was
left half-migrated, the hash router's hooks already on it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import BertConfig, BertModel  # noqa: E402

from fulu_nas import migrate_from_electra  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.migrate import PiMoEOutput  # noqa: E402


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32))


def snapshot(model: nn.Module) -> dict:
    """Everything a migration may change: the weights, the modules (their types, modes) and every hook."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modules": [(name, type(m), m.training) for name, m in model.named_modules()],
            "hooks": [(name, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items())
    assert not hasattr(model, "fulu_migration")


@pytest.mark.parametrize("router", ["topk", "hash"])
def test_a_layer_of_another_ffn_size_is_refused_before_any_layer_is_migrated(router):
    model = bert()
    model.encoder.layer[1].intermediate.dense = nn.Linear(32, 128)
    model.encoder.layer[1].output.dense = nn.Linear(128, 32)
    model.encoder.layer[2].output.train(False)  # modes that differ: kept too
    before = snapshot(model)
    with pytest.raises(FuluConfigError) as raised:
        migrate_from_electra(model, routing_strategy=router, top_k=1 if router == "hash" else 2, inplace=True)
    assert raised.value.problems == ["migrate_from_electra: encoder.layer[1]'s FFN is 32->128->32; every migrated "
                                     "layer needs 32->64->32"]
    assert_unchanged(model, before)
    assert not any(isinstance(m, PiMoEOutput) for m in model.modules())


def test_a_block_that_fails_its_verification_leaves_the_model_as_it_was():
    """Layer 1's FFN block also doubles what its intermediate computes: it is no longer dense -> GELU ->
    dense, which the verification finds after layer 0's block was built and verified."""
    model = bert().eval()
    intermediate = model.encoder.layer[1].intermediate
    forward = intermediate.forward
    intermediate.forward = lambda hidden_states: 2 * forward(hidden_states)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"encoder.layer\[1\]'s upcycled feed-forward differs from the dense"):
        migrate_from_electra(model, routing_strategy="hash", top_k=1, inplace=True)
    assert_unchanged(model, before)


def test_a_migration_that_succeeds_still_swaps_every_layer_and_hooks_the_hash_router():
    model = bert().eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).last_hidden_state
    migrated = migrate_from_electra(model, routing_strategy="hash", top_k=1, inplace=True)
    assert migrated is model and model.fulu_migration.layers == (0, 1, 2)
    assert all(isinstance(layer.output, PiMoEOutput) and isinstance(layer.intermediate, nn.Identity)
               for layer in model.encoder.layer)
    assert not any(m.training for m in model.modules())
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, dense, rtol=0, atol=1e-5)


def test_a_compiled_migrated_model_in_the_middle_of_training_deep_copies():
    """A compiled model's PiMoE outputs keep their last statistics as the compiled call returns them, a plain dict
    holding the step's graph: copy.deepcopy of the model (a checkpoint or EMA copy) failed with torch's "Only
    Tensors created explicitly by the user (graph leaves) support the deepcopy protocol"."""
    import copy

    from fulu_nas.interop.migrate import balance_loss

    model = migrate_from_electra(bert(), num_experts=4, top_k=2, aux_loss_coef=0.01)
    ids = torch.randint(0, 50, (2, 8))
    torch.compile(model)(input_ids=ids)
    outputs = [m for m in model.modules() if isinstance(m, PiMoEOutput)]
    assert balance_loss(model).requires_grad and all(type(m.last_stats) is dict for m in outputs)
    twin = copy.deepcopy(model)
    copies = [m for m in twin.modules() if isinstance(m, PiMoEOutput)]
    for original, copied in zip(outputs, copies, strict=True):
        assert copied.last_stats.keys() == original.last_stats.keys()
        assert not any(v.requires_grad for v in copied.last_stats.values())
    twin.eval(), model.eval()  # without dropout
    torch.testing.assert_close(twin(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
