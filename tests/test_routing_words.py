"""The model card's words on routing and batches (fulu_nas/deploy/routing_words.py): what it says a layer
does, and that it warns exactly where a sequence's output depends on the rest of its batch."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.deploy.routing_words import batch_dependence, batching_note, routing_words
from fulu_nas.moe import MoEConfig, PiMoELayer

CONFIGS = {
    "topk": dict(router="topk"),
    "top_p": dict(router="topk", top_k=3, top_p=0.5),
    "capacity": dict(router="topk", capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice"),
    "hash": dict(router="hash"),
    "hierarchical": dict(router="hierarchical", num_experts=8, hierarchy_depth=2, hierarchy_groups=(2,),
                         hierarchy_topk_groups=(1,)),
}


def config(name: str) -> MoEConfig:
    return MoEConfig(**{"hidden_size": 32, "num_experts": 4, "expert_ffn_size": 32, "top_k": 2, **CONFIGS[name]})


@pytest.mark.parametrize("name", CONFIGS)
def test_the_card_warns_exactly_where_a_sequence_depends_on_its_batch(name):
    torch.manual_seed(0)
    layer = PiMoELayer(config(name)).eval()
    x = torch.randn(3, 8, 32)
    ids = torch.randint(0, 100, (3, 8)) if name == "hash" else None
    with torch.no_grad():
        batched = layer(x, ids)[0][1]
        alone = layer(x[1:2], None if ids is None else ids[1:2])[0][0]
    depends = not torch.allclose(batched, alone, rtol=1e-5, atol=1e-6)
    assert depends == (batch_dependence(config(name).to_dict()) is not None)
    assert bool(batching_note(config(name).to_dict())) == depends


def test_the_card_names_the_routing_it_has():
    words = {name: routing_words(config(name).to_dict()) for name in CONFIGS}
    assert words["topk"] == "route each token to 2 of 4 experts"
    assert words["top_p"].startswith("route each token to up to 3 (the fewest whose probability reaches 0.5) of 4")
    assert "at most ceil(1 x T x 2 / 4) assignments" in words["capacity"]
    # expert choice: each expert takes ceil(capacity_factor * T / E) tokens, the factor defaulting to top_k
    assert words["expert_choice"] == ("let each of 4 experts choose its ceil(2 x T / 4) best tokens of a batch of T "
                                      "(a token gets 0 to 4 experts)")
    assert "route each token" not in words["expert_choice"]


def test_an_export_of_expert_choice_says_its_outputs_depend_on_the_batch(tmp_path):
    from fulu_nas.deploy.export import FORMAT_VERSION, write_export
    from fulu_nas.models import ArchConfig, PiMoETransformer

    cards = {}
    for name in ("topk", "expert_choice"):
        moe = MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, **CONFIGS[name])
        arch = ArchConfig(vocab_size=24, max_seq_len=8, num_layers=1, hidden_size=32, num_heads=4, moe=moe)
        folder = tmp_path / name
        write_export(folder, PiMoETransformer(arch).eval(), {"format": FORMAT_VERSION, "architecture": arch.to_dict()},
                     {"loss": 1.0}, "# card\n")
        cards[name] = (folder / "README.md").read_text()
    assert "split larger batches." in cards["topk"] and "its own batch" not in cards["topk"]
    assert "each part is then its own batch: a sequence's output depends on the rest of its batch (each expert " \
           "chooses among all the tokens of the batch)." in " ".join(cards["expert_choice"].split())
