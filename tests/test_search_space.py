"""Search spaces: parsing, validation (every problem names its key), sampling with conditions,
derived values and constraints, and the shipped spaces."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fulu_nas.errors import FuluConfigError
from fulu_nas.search.expressions import ExpressionError, parse_expression
from fulu_nas.search.space import parse_space
from fulu_nas.tasks import build_task

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def load(name: str) -> dict:
    return yaml.safe_load((SPACES / f"{name}.yaml").read_text())


def problems_of(data) -> list[str]:
    with pytest.raises(FuluConfigError) as e:
        parse_space(data)
    return e.value.problems


# The upcycle space is for task=upcycle's models (tests/test_upcycle_search.py parses and builds it).
@pytest.mark.parametrize("name", sorted(p.stem for p in SPACES.glob("*.yaml") if p.stem != "upcycle"))
def test_shipped_spaces_parse_and_their_reference_builds(name):
    space = parse_space(load(name))
    assert space.name == name and space.reference is not None
    task = build_task("pimoe_mix")
    arch = space.arch(space.with_derived(space.reference), task)
    assert arch.vocab_size == task.vocab_size and arch.max_seq_len == task.seq_len


def test_default_space_covers_what_the_issue_lists():
    space = parse_space(load("default"))
    params = {p.name: p for p in space.params}
    # every router but expert choice, which is not causal (the default task is a language model)
    assert set(params["router"].choices) == {"topk", "hash", "hierarchical", "attention"}
    assert (params["num_experts"].low, params["num_experts"].high) == (4, 64)
    assert (params["hierarchy_depth"].low, params["hierarchy_depth"].high) == (1, 3)
    assert {"top_k", "top_p", "num_shared_experts", "expert_ffn_size", "balancing"} <= params.keys()


def test_scaling_space_keeps_active_width_fixed():
    space = parse_space(load("scaling"))
    for p in space.params:
        if p.name == "top_k":
            for k in p.choices:
                values = space.with_derived({"top_k": k, "num_experts": 256, "router": "topk"})
                assert values["top_k"] * values["expert_ffn_size"] == 256


def sample_many(space, n=60, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.0)
    return out


def test_conditional_parameters_are_sampled_only_when_their_condition_holds():
    space = parse_space(load("default"))
    samples = sample_many(space)
    for v in samples:
        assert ("hierarchy_depth" in v) == (v["router"] == "hierarchical")
        assert ("attention_context" in v) == (v["router"] == "attention")
        assert ("top_p" in v) == (v["router"] in ("topk", "hierarchical", "attention"))
        assert v["num_experts"] % 4 == 0 and 4 <= v["num_experts"] <= 64
    assert {v["router"] for v in samples} == {"topk", "hash", "hierarchical", "attention"}


@pytest.mark.parametrize("task_name", ["pimoe_mix", "textlm"])
def test_a_language_model_space_with_expert_choice_is_refused_naming_why(task_name):
    """Expert choice reads later tokens (tests/test_models.py): on a next-token task the space's
    expert_choice choice is named before a study starts; a token-classification task keeps it."""
    from fulu_nas.search.feasibility import check_feasible
    from fulu_nas.search.space import Infeasible

    space = parse_space(load("routers"))
    assert "expert_choice" in next(p for p in space.params if p.name == "router").choices
    with pytest.raises(FuluConfigError) as e:
        check_feasible(space, build_task(task_name), draws=20)
    assert e.value.problems == [
        "search_space.params.router.choices: 'expert_choice' gives no feasible architecture in any of the 24 "
        "combinations of the parameters' values "
        "(first: impossible architecture: router expert_choice is not causal: each expert picks its tokens from "
        "the whole batch, so a token's output depends on the tokens after it, which a next-token language model "
        "predicts (use it on a token-classification task))"]
    with pytest.raises(Infeasible, match="not causal"):
        space.feasible_arch(space.with_derived({**space.reference, "router": "expert_choice"}), build_task(task_name))
    check_feasible(space, build_task("clusters"), draws=20)


def test_constraints_flag_violations_and_skip_inactive_names():
    space = parse_space({"params": {"num_experts": {"type": "int", "low": 1, "high": 8},
                                    "router": {"type": "categorical", "choices": ["topk", "hierarchical"]},
                                    "hierarchy_depth": {"type": "int", "low": 1, "high": 3,
                                                        "when": {"router": "hierarchical"}},
                                    "top_k": {"type": "int", "low": 1, "high": 4}},
                         "constraints": ["top_k <= num_experts", "hierarchy_depth < 3 or num_experts >= 8"]})
    assert space.violations({"num_experts": 2, "top_k": 4, "router": "topk"}) == ["top_k <= num_experts"]
    assert space.violations({"num_experts": 4, "top_k": 1, "router": "topk"}) == []
    assert space.violations({"num_experts": 4, "top_k": 1, "router": "hierarchical", "hierarchy_depth": 3}) == [
        "hierarchy_depth < 3 or num_experts >= 8"]


def test_a_constraint_that_is_no_condition_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """`num_experts % top_k` (an int read as true or false) kept exactly the pairs `num_experts % top_k == 0`
    is written to keep, without a word; the pre-flight, which evaluates every combination, refuses it."""
    from fulu_nas.cli import main

    space = parse_space({"params": {"num_experts": {"type": "categorical", "choices": [6, 8]},
                                    "top_k": {"type": "categorical", "choices": [3, 4]}},
                         "constraints": ["num_experts % top_k"]})
    with pytest.raises(FuluConfigError, match=r"search_space.constraints\[0\]: 'num_experts % top_k' gives 2 for "
                                              r"\{'num_experts': 8, 'top_k': 3\}, not true or false"):
        space.violations({"num_experts": 8, "top_k": 3})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf" / "search_space").mkdir(parents=True)
    mine = load("tiny")
    mine["params"].update(num_experts={"type": "categorical", "choices": [6, 8]},
                          top_k={"type": "categorical", "choices": [3, 4]})
    mine["constraints"] = ["num_experts % top_k"]
    mine.pop("reference", None)
    (tmp_path / "conf" / "search_space" / "mine.yaml").write_text(yaml.safe_dump(mine))
    assert main(["search", "+experiment=tiny", "--config-dir", "conf", "search_space=mine", "study.n_trials=1"]) == 2
    err = capsys.readouterr().err
    assert "search_space.constraints[0]: 'num_experts % top_k' gives" in err and "not true or false" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


@pytest.mark.parametrize("text, constant", [("router != 'hsh' or num_experts <= 4", "'hsh'"),
                                            ("num_experts == 6 or top_k < 2", "6"),
                                            ("'topk' != router", None), ("2 < top_k != 5", "5"),
                                            ("top_k != -1", "-1"),
                                            # equal as the comparison reads them: no typo
                                            ("num_experts == 4.0 or top_k == 1", None),
                                            ("top_k != True", None)])
def test_a_categorical_compared_with_a_value_it_never_takes_is_refused(text, constant):
    """`router != 'hsh'` (a typo for 'hash') is true of every sample: the constraint kept the hash router
    with 8 experts, which it was written to refuse."""
    data = {"params": {"router": {"type": "categorical", "choices": ["topk", "hash"]},
                       "num_experts": {"type": "categorical", "choices": [4, 8]},
                       "top_k": {"type": "categorical", "choices": [1, 2, 4]}},
            "constraints": [text]}
    if constant is None:
        parse_space(data)  # a constant among the choices, on either side
        return
    [problem] = problems_of(data)
    assert problem.startswith(f"search_space.constraints[0]: {text!r} compares ") and f"with {constant}, which is " \
        "not one of its choices" in problem, problem


def test_sampled_values_become_the_architecture():
    space = parse_space(load("default"))
    task = build_task("clusters")
    arch = space.arch({"router": "hierarchical", "num_experts": 16, "hierarchy_depth": 2, "top_k": 2,
                       "top_p": None, "num_shared_experts": 1, "expert_ffn_size": 128, "balancing": "aux_loss"}, task)
    assert (arch.moe.router, arch.moe.num_experts, arch.moe.hierarchy_depth) == ("hierarchical", 16, 2)
    assert (arch.moe.num_shared_experts, arch.moe.expert_ffn_size, arch.moe.aux_loss_coef) == (1, 128, 0.01)
    assert (arch.hidden_size, arch.num_layers, arch.num_classes) == (64, 2, task.num_classes)



@pytest.mark.parametrize("router,same", [("hash", ["aux_free", "aux_loss", "aux_loss+z_loss", "none"]),
                                         ("expert_choice", ["aux_free", "aux_loss", "none"])])
def test_balancing_methods_a_router_cannot_use_are_one_architecture(router, same):
    """The hash router learns no routing, and expert choice's load is balanced by construction (its
    auxiliary loss is a constant, it has no selection bias): the methods named apart trained the same
    model under several names, so a search or a NAS table spent trainings on copies."""
    import torch

    from fulu_nas.moe import PiMoELayer

    space = parse_space(load("nasbench"))
    task = build_task("clusters")
    values = {"router": router, "num_experts": 8, "top_k": 2, "num_shared_experts": 0}
    archs = [space.arch({**values, "balancing": b}, task) for b in same]
    assert len({a.content_hash() for a in archs}) == 1, [a.moe for a in archs]
    # an independent check that they train alike: the layers, configured as the methods say, after a
    # few steps of SGD on the same batches
    from fulu_nas.moe import BALANCING_METHODS, MoEConfig

    def trained(method):
        torch.manual_seed(0)
        layer = PiMoELayer(MoEConfig(hidden_size=32, num_experts=8, expert_ffn_size=32, top_k=2, router=router,
                                     **BALANCING_METHODS[method]))
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for step in range(5):
            x = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
            out, stats = layer(x)
            (out.square().mean() + stats["balance_loss"]).backward()
            opt.step()
            opt.zero_grad()
            layer.update_expert_bias(stats["tokens_per_expert"])
        return [p.detach() for p in layer.parameters()]

    first = trained(same[0])
    for method in same[1:]:
        for a, b in zip(first, trained(method), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    kept = space.arch({**values, "router": "topk", "balancing": "aux_loss"}, task)
    assert kept.moe.aux_loss_coef == 0.01  # a router that uses it keeps it

def test_impossible_architecture_is_a_config_error():
    space = parse_space(load("default"))
    with pytest.raises(FuluConfigError, match="hierarchy"):
        space.arch({"router": "hierarchical", "num_experts": 4, "hierarchy_depth": 3, "top_k": 1,
                    "expert_ffn_size": 32, "balancing": "none"}, build_task("clusters"))


def test_grid_lists_discrete_values_and_refuses_continuous_floats():
    space = parse_space(load("tiny"))
    assert space.grid() == {"router": ["topk", "hash"], "num_experts": [2, 4], "top_k": [1, 2],
                            "expert_ffn_size": [16, 32]}
    cont = parse_space({"params": {"router_jitter": {"type": "float", "low": 0.0, "high": 0.1}}})
    with pytest.raises(FuluConfigError, match="params.router_jitter"):
        cont.grid()


# Each malformed space, and the key its message must name.
MALFORMED = [
    ({"params": {"num_experts": {"type": "integer", "low": 1, "high": 4}}}, "params.num_experts.type"),
    ({"params": {"num_experts": {"type": "int", "low": 8, "high": 4}}}, "params.num_experts"),
    ({"params": {"num_experts": {"type": "int", "low": 1}}}, "params.num_experts.high"),
    ({"params": {"router": {"type": "categorical", "choices": []}}}, "params.router.choices"),
    ({"params": {"expert_count": {"type": "int", "low": 1, "high": 4}}}, "params.expert_count"),
    ({"params": {"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "params.lr"),
    ({"params": {"hierarchy_depth": {"type": "int", "low": 1, "high": 3, "when": {"router": "hierarchical"}}}},
     "params.hierarchy_depth.when.router"),
    ({"params": {"router": {"type": "categorical", "choices": ["topk"]},
                 "hierarchy_depth": {"type": "int", "low": 1, "high": 3, "when": {"router": "hierarchical"}}}},
     "params.hierarchy_depth.when.router"),
    ({"params": {"top_k": {"type": "int", "low": 1, "high": 4}}, "constraints": ["top_k <= num_experts"]},
     "constraints[0]"),
    ({"constraints": ["__import__('os').system('true')"]}, "constraints[0]"),
    ({"derived": {"expert_ffn_size": "512 // top_k"}}, "derived.expert_ffn_size"),
    ({"params": {"balancing": {"type": "categorical", "choices": ["magic"]}}}, "params.balancing.choices"),
    ({"base": {"vocab_size": 10}}, "base.vocab_size"),
    ({"base": {"moe": {"num_expert": 8}}}, "base.moe.num_expert"),
    ({"paramz": {}}, "search_space.paramz"),
    ({"params": {"top_k": {"type": "int", "low": 1, "high": 4}}, "reference": {"top_k": 9}}, "reference.top_k"),
    ({"params": {"num_experts": {"type": "int", "low": 1, "high": 9, "step": 2}}, "reference": {"num_experts": 2}},
     "reference.num_experts"),
    ({"params": {"top_k": {"type": "int", "low": 1, "high": 10, "step": 4}}}, "params.top_k.step"),
    ({"base": {"hidden_size": 60, "num_heads": 4}, "params": {"top_k": {"type": "int", "low": 1, "high": 2}},
      "reference": {"top_k": 1}}, "reference"),
    # fixed values and choices of the wrong type for their field
    ({"base": {"norm_eps": float("nan")}}, "base.norm_eps"),
    ({"base": {"moe": {"top_k": 1.5}}}, "base.moe.top_k"),
    ({"base": {"moe": {"router": ["topk"]}}}, "base.moe.router"),
    ({"params": {"num_experts": {"type": "categorical", "choices": [4, 4.5]}}}, "params.num_experts.choices"),
    ({"params": {"attention_context": {"type": "categorical", "choices": [0, 1]}}}, "params.attention_context.choices"),
    # evaluating the reference meets a value too large to compute
    ({"params": {"top_k": {"type": "int", "low": 1, "high": 2}}, "derived": {"expert_ffn_size": "2 ** 100"},
      "reference": {"top_k": 1}}, "derived.expert_ffn_size"),
    # a step too small to count the values by, or a range beyond a float's: an OverflowError traceback
    ({"params": {"capacity_factor": {"type": "float", "low": 1, "high": 2, "step": 1e-320}}},
     "params.capacity_factor.step: 1e-320 makes more than"),
    ({"params": {"capacity_factor": {"type": "float", "low": -1.7e308, "high": 1.7e308}}},
     "params.capacity_factor: high - low"),
    # a step that divides the range only within rounding: Optuna lowered high, which was never drawn
    ({"params": {"capacity_factor": {"type": "float", "low": 1.0, "high": 2.0000000001, "step": 0.5}}},
     "params.capacity_factor.step: high - low"),
    # 1 and 1.0 are one choice to Optuna, which drew it twice as often and recorded 1.0 as 1
    ({"params": {"routed_scaling_factor": {"type": "categorical", "choices": [1, 1.0, 2]}}},
     "params.routed_scaling_factor.choices: contains duplicates"),
    ({"params": {"routed_scaling_factor": {"type": "categorical", "choices": [True, 1]}}},
     "params.routed_scaling_factor.choices: contains duplicates"),
    # int bounds beyond a float's range: an OverflowError in the range check
    ({"params": {"capacity_factor": {"type": "float", "low": 0, "high": 10**400}}}, "params.capacity_factor"),
    # a base of 0, [] or false is no mapping: it was taken as empty, and the defaults searched
    ({"base": 0, "params": {"top_k": {"type": "int", "low": 1, "high": 2}}}, "search_space.base: expected a mapping"),
    ({"base": {"moe": False}, "params": {"top_k": {"type": "int", "low": 1, "high": 2}}},
     "search_space.base.moe: expected a mapping"),
    # a name with a separator was refused as study.name, which the user never set
    ({"name": "a/b", "params": {"top_k": {"type": "int", "low": 1, "high": 2}}},
     "search_space.name: expected a plain folder name (not . or .., without / or \\), got 'a/b'"),
    ({"name": 123, "params": {"top_k": {"type": "int", "low": 1, "high": 2}}},
     "got 123 (YAML read it as int 123: quote it)"),
    # a float for a string field: the advice was "use type: int", which is refused as well
    ({"params": {"router": {"type": "float", "low": 0, "high": 1}}},
     "params.router.type: float samples numbers, and router takes no number"),
    # a reference of the wrong type was said to be outside the range
    ({"params": {"num_experts": {"type": "int", "low": 2, "high": 16}}, "reference": {"num_experts": 8.0}},
     "reference.num_experts: expected an integer, got 8.0"),
]


@pytest.mark.parametrize("data,key", MALFORMED, ids=[k for _, k in MALFORMED])
def test_malformed_spaces_name_the_key(data, key):
    problems = problems_of(data)
    assert any(key in p for p in problems), problems


def test_a_when_naming_a_refused_parameter_is_not_refused_again():
    """A parent whose own definition is refused made its children's when refused too, wrongly ("must name a
    categorical parameter defined earlier")."""
    problems = problems_of({"params": {"router": {"type": "categorical", "choices": []},
                                       "hierarchy_depth": {"type": "int", "low": 1, "high": 3,
                                                           "when": {"router": "hierarchical"}}}})
    assert problems == ["search_space.params.router.choices: expected a non-empty list"]


def test_a_float_grid_ends_at_high_and_its_values_are_optunas():
    """low + i * step gave 1.7000000000000002 for 1.1 + 3 x 0.2: a value above high, trained and recorded
    (the grid sampler), and drawn by the space check. The values are those Optuna's samplers give."""
    space = parse_space({**SMALL, "params": {"capacity_factor": {"type": "float", "low": 1.1, "high": 1.7,
                                                                 "step": 0.2}}})
    grid = space.grid()["capacity_factor"]
    assert len(grid) == 4 and grid[-1] == 1.7 and all(1.1 <= v <= 1.7 for v in grid)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for _ in range(60):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("capacity_factor", 1.1, 1.7, step=0.2))
    assert {t.params["capacity_factor"] for t in study.trials} == set(grid)
    from fulu_nas.search.feasibility import _RandomTrial

    trial = _RandomTrial(random.Random(0), {})
    assert {trial.suggest_float("capacity_factor", 1.1, 1.7, step=0.2) for _ in range(200)} == set(grid)


def test_every_problem_is_listed_at_once():
    problems = problems_of({"params": {"num_experts": {"type": "int", "low": 8, "high": 4},
                                       "router": {"type": "categorical", "choices": []}},
                            "constraints": ["top_k <="], "extra": 1})
    assert len(problems) == 4


def test_expressions_are_arithmetic_only():
    assert parse_expression("min(top_k, 4) * 2 <= num_experts")({"top_k": 8, "num_experts": 8})
    for bad in ("open('x')", "x.__class__", "[1, 2]", "lambda: 1", "", 3):
        with pytest.raises(ExpressionError):
            parse_expression(bad)


@pytest.mark.parametrize("text", ["2 ** 65", "(2 ** 40) * (2 ** 40)", "-(2 ** 64)", "'ab' * 600",
                                  "'ab' * 300 + 'ab' * 300", "9999999999999999999999"])
def test_expression_values_are_bounded(text):
    with pytest.raises(ExpressionError, match="too large"):
        parse_expression(text)({})
    assert parse_expression("2 ** 63 + (2 ** 63 - 1)")({}) == 2**64 - 1  # 64 bits: the largest integer
    assert parse_expression("'ab' * 250")({}) == "ab" * 250


def test_expressions_compute_rather_than_format_strings():
    with pytest.raises(TypeError):  # what '%09999999999d' % 1 would be: gigabytes of zeros
        parse_expression("'%05d' % top_k")({"top_k": 3})
    assert parse_expression("num_experts % 4")({"num_experts": 10}) == 2


def test_long_expressions_are_refused_before_they_are_walked():
    with pytest.raises(ExpressionError, match="characters"):
        parse_expression("+".join(["top_k"] * 200))


scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=6))
keys = st.sampled_from(["params", "base", "derived", "constraints", "reference", "router", "num_experts", "top_k",
                        "type", "choices", "low", "high", "log", "step", "when", "moe", "hierarchy_depth", "x"])
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(values, st.dictionaries(keys, values, max_size=6)))
def test_the_parser_raises_nothing_but_config_errors(data):
    try:
        parse_space(data)
    except FuluConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


SMALL = {"base": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "moe_every": 1, "dense_ffn_size": 64}}
TOP_K = {"top_k": {"type": "int", "low": 1, "high": 2}}


@pytest.mark.parametrize("key,section", [("constraints[0]", {"constraints": ["top_k <= max"]}),
                                         ("derived.expert_ffn_size", {"derived": {"expert_ffn_size": "abs"}}),
                                         ("derived.expert_ffn_size", {"derived": {"expert_ffn_size": "min + 1"}})])
def test_a_function_named_without_its_call_is_an_unknown_name(key, section):
    """It was left out of the expression's names, so evaluating it raised KeyError (a traceback, exit 1)."""
    [problem] = problems_of({**SMALL, "params": TOP_K, **section})
    assert problem.startswith(f"search_space.{key}: unknown name "), problem
    assert any(f"'{f}'" in problem for f in ("min", "max", "abs")), problem


@pytest.mark.parametrize("params,base,places", [
    # balancing sets aux_loss_coef: the sampled coefficient was dropped or kept by the order of the file
    ({"aux_loss_coef": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
      "balancing": {"type": "categorical", "choices": ["aux_loss", "aux_free"]}}, {},
     ["search_space.params.aux_loss_coef", "search_space.params.balancing"]),
    ({"balancing": {"type": "categorical", "choices": ["aux_free", "none"]}}, {"bias_update_rate": 0.01},
     ["search_space.base.moe.bias_update_rate", "search_space.params.balancing"]),
    ({**TOP_K}, {"top_k": 1}, ["search_space.base.moe.top_k", "search_space.params.top_k"]),
])
def test_a_field_set_in_two_places_is_refused_naming_both(params, base, places):
    [problem] = problems_of({"base": {**SMALL["base"], "moe": base}, "params": params})
    assert all(place in problem for place in places), problem


def test_a_derived_field_the_base_fixes_too_is_refused():
    [problem] = problems_of({"base": {**SMALL["base"], "moe": {"expert_ffn_size": 32}}, "params": TOP_K,
                             "derived": {"expert_ffn_size": "64 // top_k"}})
    assert "search_space.base.moe.expert_ffn_size" in problem and "search_space.derived.expert_ffn_size" in problem


@pytest.mark.parametrize("depth", [5, 1])
def test_a_reference_value_for_a_parameter_it_leaves_inactive_is_refused(depth):
    """It was dropped without a word, even out of range: the reference trained was not the one written."""
    params = {"router": {"type": "categorical", "choices": ["topk", "hierarchical"]},
              "num_experts": {"type": "categorical", "choices": [4, 8]},
              "hierarchy_depth": {"type": "int", "low": 1, "high": 2, "when": {"router": "hierarchical"}}}
    [problem] = problems_of({**SMALL, "params": params,
                             "reference": {"router": "topk", "num_experts": 8, "hierarchy_depth": depth}})
    assert problem.startswith("search_space.reference.hierarchy_depth: ") and "inactive" in problem, problem


def test_an_int_step_is_checked_exactly_on_large_ranges():
    """math.isclose took 500000000.5 steps for a whole number."""
    seed = {"type": "int", "low": 0, "high": 1_000_000_001, "step": 2}
    [problem] = problems_of({"base": {**SMALL["base"], "moe": {"router": "hash"}}, "params": {"hash_seed": seed}})
    assert problem.startswith("search_space.params.hash_seed.step: "), problem
    seed = {**seed, "high": 1_000_000_000}
    [problem] = problems_of({"base": {**SMALL["base"], "moe": {"router": "hash"}}, "params": {"hash_seed": seed},
                             "reference": {"hash_seed": 999_999_999}})
    assert problem.startswith("search_space.reference.hash_seed: 999999999 is outside"), problem


@pytest.mark.parametrize("where", ["derived", "base"])
def test_balancing_outside_params_is_refused_saying_where_it_goes(where):
    section = ({"derived": {"balancing": "'aux_free'"}} if where == "derived"
               else {"base": {**SMALL["base"], "balancing": "aux_free"}})
    [problem] = problems_of({**SMALL, "params": TOP_K, **section})
    assert problem.startswith(f"search_space.{where}.balancing: ") and "params" in problem, problem
    assert "not an architecture" not in problem, problem


def test_a_space_without_a_name_is_named_as_its_study_is():
    from fulu_nas.search.space import UNNAMED

    assert parse_space({**SMALL, "params": TOP_K}).name == UNNAMED == "custom"
