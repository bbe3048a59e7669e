"""What ``train`` refuses before it changes the model: a router that lets a next-token model read the
tokens it is trained to predict (expert choice), whoever built the model; and what it still trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fulu_nas.errors import FuluConfigError
from fulu_nas.models import ArchConfig, PiMoETransformer
from fulu_nas.moe import MoEConfig
from fulu_nas.tasks import build_task
from fulu_nas.training.model_task import NOT_CAUSAL
from fulu_nas.training.train import TrainConfig, train

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
TINY = TrainConfig(steps=2, batch_size=4, progress=False, report_every=1)


def tiny_model(task, router: str, seed: int = 0) -> PiMoETransformer:
    arch = ArchConfig(vocab_size=task.vocab_size, max_seq_len=task.seq_len, num_layers=2, hidden_size=32,
                      num_heads=4, num_classes=task.num_classes,
                      moe=MoEConfig(hidden_size=32, num_experts=8, expert_ffn_size=32, top_k=2, router=router))
    torch.manual_seed(seed)
    return PiMoETransformer(arch)


@pytest.mark.parametrize("task_name", ["pimoe_mix", "textlm"])
def test_a_next_token_model_with_expert_choice_is_refused_and_left_as_it_was(task_name):
    """It trained without a word, though changing only a sequence's last token changed the logits of its
    earlier positions: the predictions read what they predict."""
    task = build_task(task_name)
    assert task.num_classes == 0  # a next-token task
    model = tiny_model(task, "expert_choice").eval()
    tokens = next(task.train_batches(4, seed=0)).tokens
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % task.vocab_size
    with torch.no_grad():
        before, after = model(tokens).logits[:, :-1], model(changed).logits[:, :-1]
    assert not torch.equal(before, after)  # the leak the refusal is about

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FuluConfigError) as raised:
        train(model, task, TINY)
    assert raised.value.problems == [NOT_CAUSAL]  # one message, the search's
    assert not model.training  # nothing was changed: not even its mode
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_the_search_and_training_share_one_message_and_the_search_gives_it_once():
    from fulu_nas.search import family
    from fulu_nas.search.space import Infeasible, parse_space

    assert family.NOT_CAUSAL is NOT_CAUSAL
    space = parse_space(yaml.safe_load((SPACES / "routers.yaml").read_text()))  # expert choice among its routers
    with pytest.raises(Infeasible) as raised:
        space.feasible_arch(space.with_derived({**space.reference, "router": "expert_choice"}),
                            build_task("pimoe_mix"))
    assert str(raised.value).count("is not causal") == 1 and NOT_CAUSAL in str(raised.value)


def test_expert_choice_still_trains_token_classification_and_other_routers_next_token_tasks():
    clusters = build_task("clusters")
    assert clusters.num_classes > 0
    assert train(tiny_model(clusters, "expert_choice"), clusters, TINY).steps == 2
    mix = build_task("pimoe_mix")
    assert train(tiny_model(mix, "topk"), mix, TINY).steps == 2


def test_an_upcycled_encoders_masked_lm_keeps_expert_choice(tmp_path):
    """The upcycle task has no classes either, but it is masked language modelling of a bidirectional
    encoder: nothing it predicts comes later in the sequence, and its search draws expert choice."""
    pytest.importorskip("transformers")
    from fulu_nas.interop.upcycle import build_upcycled, upcycle_arch

    from .hf_models import save_encoder, write_corpus

    task = build_task("upcycle", model=str(save_encoder(tmp_path / "bert")), path=str(write_corpus(tmp_path / "c")),
                      seq_len=32)
    assert task.num_classes == 0
    arch = upcycle_arch(task.encoder, task.seq_len, lr=1e-3, layers="all",
                        moe={"router": "expert_choice", "num_experts": 4})
    assert train(build_upcycled(arch, task.encoder), task, TINY).steps == 2
