"""Upcycling choices that would start or train a different model than they claim: a shared expert cut out
of the FFN (``shared_fraction``) with overrides of its own, and the upcycle space's top-k, checked against
the router's task gradient. Tiny random encoders saved with save_pretrained; nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from fulu_nas.cli import main  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.upcycle import UpcycleArch, build_upcycled, upcycle_arch  # noqa: E402
from fulu_nas.search.family import UPCYCLE  # noqa: E402
from fulu_nas.search.feasibility import check_feasible  # noqa: E402
from fulu_nas.search.space import Infeasible, parse_space  # noqa: E402
from fulu_nas.tasks import IGNORE, build_task  # noqa: E402

from .hf_models import save_encoder, write_corpus  # noqa: E402

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "upcycle.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"bert": save_encoder(root / "bert"), "corpus": write_corpus(root / "corpus")}


@pytest.fixture(scope="module")
def task(folders):
    return build_task("upcycle", model=str(folders["bert"]), path=str(folders["corpus"]), seq_len=32)


# -- shared_fraction and the shared expert's own settings -----------------------------------------

@pytest.mark.parametrize("extra, named", [
    ({"shared_expert_gate": True}, "shared_expert_gate=True"),
    ({"shared_expert_ffn_size": 24}, "shared_expert_ffn_size=24"),
    ({"shared_expert_ffn_size": 16}, "shared_expert_ffn_size=16"),  # even the width the fraction gives
    ({"shared_expert_ffn_size": None}, "shared_expert_ffn_size=None"),  # would replace the fraction's width
    ({"num_shared_experts": 0}, "num_shared_experts=0"),
    ({"shared_expert_gate": True, "shared_expert_ffn_size": 8}, "shared_expert_gate=True, shared_expert_ffn_size=8"),
])
def test_shared_fraction_refuses_the_shared_experts_own_settings(task, extra, named):
    """The cut-out shared expert is the FFN's first units, ungated: a gate would scale that part of the FFN
    by sigmoid(gate(x)), another width would not fit the weights cut out of it."""
    moe = {"router": "topk", "num_experts": 4, "shared_fraction": 0.25, **extra}
    with pytest.raises(FuluConfigError, match=f"shared_fraction=0.25 cuts the shared expert out of each FFN.*; "
                                              f"{named} cannot be set with it") as e:
        upcycle_arch(task.encoder, task.seq_len, layers="all", moe=moe)
    assert len(e.value.problems) == 1
    # the same for an architecture read back (a trial's record, an export's upcycling.yaml)
    good = upcycle_arch(task.encoder, task.seq_len, layers="all",
                        moe={"router": "topk", "num_experts": 4, "shared_fraction": 0.25})
    record = yaml.safe_load(good.to_yaml())
    record["migration"].update(extra)
    with pytest.raises(FuluConfigError, match=f"{named} cannot be set with it"):
        UpcycleArch.from_dict(record)


def test_shared_fraction_with_an_ungated_shared_expert_spelled_out_starts_exact(task):
    tokens = next(task.train_batches(4, seed=1)).tokens
    arch = upcycle_arch(task.encoder, task.seq_len, layers="all",
                        moe={"router": "topk", "num_experts": 4, "shared_fraction": 0.25, "shared_expert_gate": False})
    torch.manual_seed(0)
    model = build_upcycled(arch, task.encoder).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, task.encoder.model(input_ids=tokens).logits, rtol=0,
                                   atol=1e-5)
    assert arch.exact and model.moe_layers()[0].cfg.shared_expert_ffn_size == 16


def test_a_space_setting_them_beside_shared_fraction_is_refused_before_the_study(task, folders, tmp_path, capsys):
    space = parse_space({"base": {"moe": {"shared_expert_gate": True}},
                         "params": {"layers": {"type": "categorical", "choices": ["dense", "all"]},
                                    "shared_fraction": {"type": "categorical", "choices": [0.0, 0.25],
                                                        "when": {"layers": ["all"]}}},
                         "reference": {"layers": "dense"}}, family=UPCYCLE)
    with pytest.raises(FuluConfigError, match="shared_fraction.choices: 0.25 gives no feasible architecture.*"
                                              "shared_expert_gate=True cannot be set with it"):
        check_feasible(space, task)
    # the command: exit 2 with the message, nothing written
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["search", "+experiment=upcycle_tiny", f"model={folders['bert']}", f"task.path={folders['corpus']}",
                 f"hydra.run.dir={out}", "+search_space.base.moe.shared_expert_gate=true"]) == 2
    err = capsys.readouterr().err
    assert "shared_expert_gate=True cannot be set with it" in err and "Traceback" not in err
    assert not out.exists()


# -- top-k in the upcycle space: the router must get a gradient from the task ---------------------

class _Draws:
    """Answers the space's suggestions with random choices (what a sampler may draw)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def suggest_categorical(self, name, choices):
        return self.rng.choice(choices)

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.rng.randrange(low, high + 1, step)

    def suggest_float(self, name, low, high, step=None, log=False):
        return self.rng.uniform(low, high)


def mlm_router_gradient(model, batch) -> float:
    """The norm of the masked-LM loss's gradient (the task alone, no balancing loss) on the routers."""
    model.train()
    logits = model(batch.tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                                             ignore_index=IGNORE)
    params = [p for layer in model.moe_layers() for p in layer.router.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return sum(0.0 if g is None else g.norm().item() ** 2 for g in grads) ** 0.5


def test_every_top_k_the_upcycle_space_draws_lets_the_task_train_the_router(task):
    """A renormalised top-1 weight is p / p = 1 whatever the router's scores, so the task loss gives a
    top-1 score router no gradient: its routing would stay where the random start put it for the whole
    fine-tune. The space draws top-1 only for the routers where it trains (expert choice) or where there is
    no router to train (hash)."""
    space = parse_space(yaml.safe_load(SPACE.read_text()), family=UPCYCLE)
    drawn: dict[tuple[str, int], int] = {}
    for seed in range(400):
        try:
            arch = space.feasible_arch(space.sample(_Draws(seed)), task)
        except Infeasible:
            continue
        if arch.moe is not None:
            drawn[arch.moe.router, arch.moe.top_k] = drawn.get((arch.moe.router, arch.moe.top_k), 0) + 1
    routers = {router for router, _ in drawn}
    assert routers == {"topk", "hash", "hierarchical", "attention", "expert_choice"}
    assert {k for (router, k) in drawn if router in ("hash", "expert_choice")} == {1, 2}  # top_k is still searched
    assert {k for (router, k) in drawn if router in ("topk", "hierarchical", "attention")} == {2}

    batch = next(task.train_batches(8, seed=3))
    gradients = {}
    for router, k in sorted(drawn) + [("topk", 1), ("attention", 1)]:  # the last two: what the space leaves out
        if router == "hash":
            continue  # a fixed assignment: nothing to train
        arch = upcycle_arch(task.encoder, task.seq_len, layers="all",
                            moe={"router": router, "num_experts": 4, "top_k": k})
        torch.manual_seed(0)
        model = build_upcycled(arch, task.encoder)
        with torch.no_grad():  # experts that differ, as after some fine-tuning: routing then matters
            for layer in model.moe_layers():
                layer.experts.w13_EDF2.add_(0.05 * torch.randn_like(layer.experts.w13_EDF2))
        gradients[router, k] = mlm_router_gradient(model, batch)
    for key, g in gradients.items():
        if key in drawn:
            assert g > 1e-5, (key, g)
    # top-1 score routers: nothing (rounding), three orders of magnitude below any drawn router's gradient
    assert gradients["topk", 1] < 1e-8 and gradients["attention", 1] < 1e-8


@pytest.mark.parametrize("router,same", [("hash", ["aux_free", "aux_loss", "aux_loss+z_loss", "none"]),
                                         ("expert_choice", ["aux_free", "aux_loss", "none"])])
def test_an_upcycling_with_a_balancing_its_router_cannot_use_is_one_architecture(task, router, same):
    """As in the PiMoE family: the hash router and expert choice trained the same upcycled model under
    several balancing names, each a trial of its own."""
    space = parse_space(yaml.safe_load(SPACE.read_text()), family=UPCYCLE)
    values = {"layers": "all", "router": router, "num_experts": 4, "top_k": 2, "shared_fraction": 0.0, "lr": 1e-4}
    archs = [space.arch({**values, "balancing": b}, task) for b in same]
    assert len({a.content_hash() for a in archs}) == 1, [a.migration for a in archs]
    kept = space.arch({**values, "router": "topk", "balancing": "aux_loss"}, task)
    assert kept.moe.aux_loss_coef == 0.01
