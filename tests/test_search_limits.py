"""Limits of the search's input, each once silently ignored, refused too late (after work was done and
recorded) or not at all:

- a derived value that cannot be computed for a sample because of its values' types (``64 // router``)
  was skipped, its field keeping its default; it is refused as a division by zero is, in the pre-flight
  and in a trial (a derived value reading an inactive parameter is still left unset);
- sizes without a bound took the machine's memory while the configuration was checked: a task's sizes,
  an int parameter of a billion values read by an expression, the grid sampler's combinations, a
  confirmation's seeds;
- a confirmation's seeds past the largest seed were refused after its first run was trained and recorded
  (they now count on from 0);
- a reference architecture the study's task allows was refused on a stand-in language-model task;
- ``study.name=..`` wrote the study into the current folder;
- more workers than trials, and a ``trainer.divergence_factor`` of 1 (every trial failed at step 2).

Each refusal is one message naming its key, exit code 2, nothing written.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import optuna
import pytest

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search import app
from fulu_nas.search.app import compose_config
from fulu_nas.search.feasibility import check_feasible
from fulu_nas.search.settings import SEED_MAX, _check_expert_parallel, load_settings
from fulu_nas.search.space import parse_space
from fulu_nas.tasks import build_task

from .test_confirm import confirmation_runs
from .test_search_e2e import load_study, run_search
from .test_search_preflight import BLOCK, QUICK, problems_in, users_space

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState
ROUTER = {"type": "categorical", "choices": ["topk", "hash"]}
TWO_EXPERTS = {"type": "categorical", "choices": [2, 4]}


def refused(argv: list[str], folder: Path, capsys) -> str:
    """The one problem ``fulu-nas`` (run in ``folder``) refuses ``argv`` with, exit code 2, nothing written."""
    assert main(argv) == 2
    [problem] = problems_in(capsys.readouterr().err)
    assert list(folder.iterdir()) == []
    return problem


def peak_bytes(call) -> int:
    """The most memory Python held at once while ``call()`` ran, above what it held before."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- 1. a derived value of the wrong type -------------------------------------------------------------

@pytest.mark.parametrize("expression", ["64 // router", "min()", "abs('x')", "router + 1"])
def test_a_derived_value_of_the_wrong_type_is_refused_before_the_study(expression, tmp_path, monkeypatch, capsys):
    """Both trials completed with expert_ffn_size 2048, the field's default: the TypeError was skipped."""
    work, args = users_space(tmp_path, {"base": BLOCK, "params": {"router": ROUTER, "num_experts": TWO_EXPERTS},
                                        "derived": {"expert_ffn_size": expression}})
    monkeypatch.chdir(work)
    problem = refused(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=2",
                       f"hydra.run.dir={work / 'out'}"], work, capsys)
    assert problem.startswith(f"search_space.derived.expert_ffn_size: {expression!r} cannot be computed for {{"), \
        problem
    assert "(TypeError: " in problem, problem


def failed_trials_without_preflight(tmp_path, monkeypatch, expressions: dict) -> list:
    """The trials of a two-trial search of a space with ``expressions`` (derived values or constraints), its
    pre-flight skipped so that every sample reaches a trial; each must have failed."""
    work, args = users_space(tmp_path, {"base": BLOCK, "params": {"router": ROUTER, "num_experts": TWO_EXPERTS},
                                        **expressions})
    monkeypatch.chdir(work)
    monkeypatch.setattr("fulu_nas.search.settings.check_feasible", lambda space, task: None)
    out = work / "out"
    main(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=2", "trainer.steps=5",
          "study.pruner=none", f"hydra.run.dir={out}"])
    study = load_study(out, "mine-clusters")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    return study.trials


def test_a_derived_value_of_the_wrong_type_fails_its_trial_with_the_reason(tmp_path, monkeypatch):
    """A sample the pre-flight did not meet (here: no pre-flight) fails its trial, as a division by zero does."""
    for t in failed_trials_without_preflight(tmp_path, monkeypatch, {"derived": {"expert_ffn_size": "64 // router"}}):
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("search_space.derived.expert_ffn_size: '64 // router' cannot be computed for {"), \
            reason
        assert f"'router': {t.params['router']!r}" in reason and "(TypeError: " in reason, reason


@pytest.mark.parametrize("constraint,error", [("64 % (num_experts - 4) == 0", "ZeroDivisionError"),
                                               ("router > 2", "TypeError")])
def test_a_constraint_that_cannot_be_computed_is_refused_before_the_study(constraint, error, tmp_path, monkeypatch,
                                                                          capsys):
    """Such a sample counted as breaking the constraint: with num_experts 4 the space shrank to 2 experts
    without a word, and `router > 2` made every sample infeasible, the message naming no error."""
    work, args = users_space(tmp_path, {"base": BLOCK, "params": {"router": ROUTER, "num_experts": TWO_EXPERTS},
                                        "constraints": [constraint]})
    monkeypatch.chdir(work)
    problem = refused(["search", *args, "task=clusters", "trainer=tiny", "study.n_trials=2",
                       f"hydra.run.dir={work / 'out'}"], work, capsys)
    assert problem.startswith(f"search_space.constraints[0]: {constraint!r} cannot be computed for {{"), problem
    assert f"({error}: " in problem, problem


def test_a_constraint_that_cannot_be_computed_fails_its_trial_with_the_reason(tmp_path, monkeypatch):
    for t in failed_trials_without_preflight(tmp_path, monkeypatch, {"constraints": ["router > 2"]}):
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("search_space.constraints[0]: 'router > 2' cannot be computed for {"), reason
        assert "(TypeError: " in reason, reason


def test_a_derived_value_reading_an_inactive_parameter_keeps_the_fields_default():
    """What the skipped TypeError was thought to be for: a parameter absent from a sample (its ``when`` does not
    hold) leaves the derived values that read it unset, before any evaluation."""
    space = parse_space({"base": BLOCK, "params": {
        "router": {"type": "categorical", "choices": ["topk", "hierarchical"]},
        "hierarchy_depth": {"type": "int", "low": 1, "high": 2, "when": {"router": "hierarchical"}}},
        "derived": {"expert_ffn_size": "32 * hierarchy_depth"}})
    check_feasible(space, build_task("clusters"), draws=20)
    assert space.with_derived({"router": "topk"}) == {"router": "topk"}
    assert space.with_derived({"router": "hierarchical", "hierarchy_depth": 2})["expert_ffn_size"] == 64


def test_a_field_default_a_derived_value_cannot_use_is_no_cause_of_an_infeasible_space():
    """An infeasible space's causes are found by putting each setting back to its field's default: top_p's
    default None cannot be computed with (top_p * 2), which is no error of the space; the cause is still named."""
    space = parse_space({"base": {**BLOCK, "moe": {"num_experts": 2, "top_k": 4}},
                         "params": {"top_p": {"type": "categorical", "choices": [0.5, 0.8]}},
                         "derived": {"routed_scaling_factor": "top_p * 2"}})
    with pytest.raises(FuluConfigError) as e:
        check_feasible(space, build_task("clusters"), draws=20)
    assert e.value.problems[0].startswith("search_space.base.moe.num_experts (2), search_space.base.moe.top_k (4): "
                                          "no architecture of the space is feasible"), e.value.problems


def test_a_space_whose_feasible_values_are_rare_is_not_refused_by_the_seed_s_luck(monkeypatch):
    """num_experts == 4 of 1..64: 200 seeded draws missed it, so a space whose own reference is feasible was
    refused as having no feasible architecture, and six settings that change nothing were named its cause
    (the retries drew on from the same generator, and one of them drew 4)."""
    params = {"num_experts": {"type": "int", "low": 1, "high": 64}, "top_k": {"type": "int", "low": 1, "high": 2}}
    narrow = {"base": BLOCK, "params": params, "constraints": ["num_experts == 4"]}
    task = build_task("clusters")
    check_feasible(parse_space({**narrow, "reference": {"num_experts": 4, "top_k": 1}}), task)
    check_feasible(parse_space(narrow), task)  # its 128 combinations are all tried
    # A continuous parameter beside it: random draws, which 1 in 8 seeds had miss num_experts=4 for one of the
    # parameters; the reference is an architecture with each of them, whatever the seed.
    wide = {**params, "top_p": {"type": "float", "low": 0.1, "high": 0.9}}
    space = parse_space({**narrow, "params": wide, "reference": {"num_experts": 4, "top_k": 1, "top_p": 0.5}})
    import fulu_nas.search.feasibility as feasibility

    seeded = feasibility.random.Random
    for seed in range(16):
        monkeypatch.setattr(feasibility.random, "Random", lambda _, seed=seed: seeded(seed))
        check_feasible(space, task)
    monkeypatch.undo()
    # a space that is empty says so, with what makes it so where a field's default would not
    with pytest.raises(FuluConfigError) as e:
        check_feasible(parse_space({**narrow, "constraints": ["num_experts == 100"]}), task)
    assert e.value.problems == ["search_space: no feasible architecture in any of the 128 combinations of the "
                                "parameters' values (first: violates num_experts == 100)"], e.value.problems
    # every combination tried: the first is refused by the constraint, yet the router's name is what is wrong
    typo = {"base": {**BLOCK, "moe": {"router": "topkk"}}, "params": params, "constraints": ["num_experts > 4"]}
    with pytest.raises(FuluConfigError) as e:
        check_feasible(parse_space(typo), task)
    assert "first: impossible architecture: " in e.value.problems[0] and "topkk" in e.value.problems[0], \
        e.value.problems
    few = {"num_experts": {"type": "int", "low": 1, "high": 3}, "top_p": {"type": "float", "low": 0.1, "high": 0.9}}
    with pytest.raises(FuluConfigError) as e:
        check_feasible(parse_space({"base": {**BLOCK, "moe": {"top_k": 4}}, "params": few}), task)
    [problem] = e.value.problems
    assert problem.startswith("search_space.base.moe.top_k (4), search_space.params.num_experts (1..3): no "
                              "architecture of the space is feasible with these settings (200 random draws; first: "
                              "impossible architecture"), problem


# --- 2. sizes without a bound -------------------------------------------------------------------------

TASK = ["trainer=tiny", "study.n_trials=1", "search_space=tiny"]
TASK_SIZES = {
    "a billion domains": (["task=clusters", "task.num_domains=1000000000"],
                          "task.num_domains: must be an integer in [1, 4096]"),
    "a hundred million values": (["task=clusters", "+task.values=100000000"],
                                 "task.values: must be an integer in [2, 65536]"),
    "as many classes": (["task=clusters", "+task.classes=100000000"], "task.classes: must be an integer in [2, 65536]"),
    "a long sequence": (["task=clusters", "+task.seq_len=100000000"], "task.seq_len: must be an integer in [2, 65536]"),
    "a billion planted weights": (["task=clusters", "task.num_domains=4096", "+task.classes=2048", "+task.values=128"],
                                  "task.values: too large: num_domains x classes x values = 4096 x 2048 x 128 = "
                                  "1,073,741,824 planted weights, more than 134,217,728"),
    "a validation set of 10**10 counts": (["task=clusters", "+task.val_sequences=10000000", "+task.values=64"],
                                          "task.val_sequences: too large: val_sequences x (seq_len - 1) x values = "
                                          "10000000 x 15 x 64 = 9,600,000,000 value counts of the validation set"),
    "a long pimoe_mix sequence": (["task=pimoe_mix", "task.seq_len=100000000"],
                                  "task.seq_len: must be an integer in [10, 65536]"),
    "a billion pimoe_mix characters": (["task=pimoe_mix", "+task.val_sequences=100000000"],
                                       "task.val_sequences: too large: val_sequences x (seq_len + 1) = 100000000 x 65"),
    "a long textlm sequence": (["task=textlm", "task.seq_len=100000000"],
                               "task.seq_len: must be an integer in [1, 65536]"),
    # a MemoryError traceback: the corpus file was read into a buffer of max_bytes
    "a terabyte of textlm corpus": (["task=textlm", "+task.max_bytes=1000000000000"],
                                    "task.max_bytes: must be an integer in [2, 1073741824]"),
    # the batch was built for ever (a Python loop over 10**12 samples), or failed to allocate within the trial
    "a trillion sequences a step": (["task=clusters", "trainer.batch_size=1000000000000"],
                                    "trainer.batch_size: 1,000,000,000,000 sequences of the task's 16 tokens are "
                                    "16,000,000,000,000 tokens a step, more than 16,777,216: at most 1,048,576 "
                                    "sequences"),
}


@pytest.mark.parametrize("case", TASK_SIZES)
def test_task_sizes_beyond_what_the_task_can_use_are_refused(case, tmp_path, monkeypatch, capsys):
    """task.num_domains=1000000000 built a tuple of a billion domain names, +task.values=100000000 planted
    weights of 13 GB, while the configuration was checked: a traceback, or the machine's memory gone."""
    overrides, message = TASK_SIZES[case]
    monkeypatch.chdir(tmp_path)
    problem = refused(["search", *TASK, *overrides], tmp_path, capsys)
    assert problem.startswith(message), problem


def test_a_batch_past_the_bound_is_refused_by_the_trainer_too():
    """Training from Python (and `fulu-nas bench routers`) built the batch of a trillion sequences."""
    from fulu_nas.models import ArchConfig, PiMoETransformer
    from fulu_nas.moe import MoEConfig
    from fulu_nas.training.train import TrainConfig, train

    task = build_task("clusters")
    model = PiMoETransformer(ArchConfig(num_layers=1, hidden_size=32, num_heads=2, vocab_size=task.vocab_size,
                                        max_seq_len=task.seq_len, num_classes=task.num_classes,
                                        moe=MoEConfig(hidden_size=32, num_experts=2, expert_ffn_size=32, top_k=1)))
    with pytest.raises(FuluConfigError, match=r"^batch_size: 1,048,577 sequences of the task's 16 tokens"):
        train(model, task, TrainConfig(steps=1, batch_size=2**20 + 1, progress=False))


def test_the_upcycle_task_bounds_its_corpus_as_textlm_does():
    import fulu_nas.interop  # noqa: F401  (registers the upcycle task)

    with pytest.raises(FuluConfigError, match=r"max_bytes must be an integer in \[2, 1073741824\], got 10"):
        build_task("upcycle", max_bytes=10**12)


def test_task_sizes_up_to_their_bounds_are_taken():
    assert len(build_task("clusters", num_domains=4096).domain_names) == 4096
    assert build_task("clusters", num_domains=1, values=65_536, classes=2, val_sequences=2).vocab_size == 65_537
    assert build_task("pimoe_mix", seq_len=65_536, val_sequences=2).seq_len == 65_536


def wide_space(**extra) -> dict:
    """A space whose expert_ffn_size spans 4 million values, read by a constraint and a derived value."""
    return {"base": BLOCK, "params": {"expert_ffn_size": {"type": "int", "low": 64, "high": 2**22, "log": True},
                                      "router": ROUTER, "num_experts": TWO_EXPERTS},
            "derived": {"top_k": "1 + (expert_ffn_size > 100000)"},
            "constraints": ["expert_ffn_size <= 2**21"], **extra}


def test_an_int_parameter_of_millions_of_values_is_counted_not_listed():
    """Every combination of the values the expressions read is tried when they are at most 4,096: their lists
    were made first (a billion values for {type: int, low: 64, high: 1073741824} took the machine's memory).
    Here 4 million values: listing them takes over 100 MB."""
    space = parse_space(wide_space())
    assert peak_bytes(lambda: check_feasible(space, build_task("clusters"), draws=20)) < 20 * 2**20


def test_expert_parallel_counts_the_num_experts_it_may_divide():
    space = parse_space({"base": BLOCK, "params": {"num_experts": {"type": "int", "low": 3, "high": 2**22 + 1,
                                                                   "step": 2}}})
    problems: list[str] = []
    assert peak_bytes(lambda: _check_expert_parallel(space, 2, problems)) < 20 * 2**20
    assert problems == ["trainer.expert_parallel: 2 ranks need num_experts divisible by 2, but the search space's "
                        "num_experts takes only 3, 5, 7, 9, 11, 13, 15, 17 ..."]
    for P, divisible in ((3, True), (2**22 + 1, True), (2**22 + 3, False), (2**40, False)):
        problems = []
        _check_expert_parallel(space, P, problems)
        assert (problems == []) == divisible, (P, problems)


def test_a_grid_of_more_than_a_million_combinations_is_refused(tmp_path, monkeypatch, capsys):
    """Optuna's grid sampler makes a list of every combination, in every worker: a grid of millions was
    accepted, and its lists made in the pre-flight."""
    work, args = users_space(tmp_path, {"base": BLOCK, "params": {
        "expert_ffn_size": {"type": "int", "low": 64, "high": 2**22}, "router": ROUTER}})
    monkeypatch.chdir(work)
    problem = refused(["search", *args, *QUICK, "study.sampler=grid", f"hydra.run.dir={work / 'out'}"], work,
                      capsys)
    assert problem.startswith("study.sampler=grid: the space's parameters make 8,388,482 combinations, more than "
                              "1,048,576"), problem


# --- 2 and 3. a confirmation's seeds and architectures ----------------------------------------------------

@pytest.fixture(scope="module")
def last_seed_search(tmp_path_factory):
    """A tiny search of two trials with the largest trainer.seed: valid, and so is confirming it."""
    root = tmp_path_factory.mktemp("last_seed")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert run_search(root / "out", "study.n_trials=2", "study.pruner=none", "trainer.steps=10",
                          f"trainer.seed={SEED_MAX}") == 0
    return root / "out"


@pytest.mark.parametrize("options,message", [
    (["top_k=1", "seeds=1000000000"], "seeds: at most 1000, got 1000000000"),
    (["top_k=1001", "seeds=1"], "top_k: at most 1000, got 1001"),
])
def test_a_confirmation_past_its_bounds_is_refused_before_any_run(options, message, last_seed_search, capsys):
    """seeds=2 trained and recorded the run of the largest seed, then exited 2 with `seed: expected an integer in
    [0, 4294967295], got 4294967296`; seeds=1000000000 made a tuple of a billion seeds."""
    out = last_seed_search
    before = (len(confirmation_runs(out)[1]), load_study(out).user_attrs, sorted(out.iterdir()))
    assert main(["confirm", "study.name=tiny-clusters", f"hydra.run.dir={out}", "budget_factor=1", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot confirm:\n  - ") and err.count("\n  - ") == 1, err
    assert f"  - {message}" in err, err
    assert (len(confirmation_runs(out)[1]), load_study(out).user_attrs, sorted(out.iterdir())) == before


@pytest.mark.parametrize("factor", ["1e308", "1001", "1e17"])
def test_a_confirmation_budget_past_its_bound_is_refused_before_any_run(factor, last_seed_search, capsys):
    """budget_factor=1e308 overflowed the step count to infinity (an OverflowError traceback); 1e17 trained
    for ever."""
    out = last_seed_search
    before = (len(confirmation_runs(out)[1]), load_study(out).user_attrs, sorted(out.iterdir()))
    assert main(["confirm", "study.name=tiny-clusters", f"hydra.run.dir={out}", "top_k=1", "seeds=1",
                 f"budget_factor={factor}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot confirm:\n  - budget_factor: expected a finite number in [1, 1000], "
                          "got ") and err.count("\n") == 2, err
    assert (len(confirmation_runs(out)[1]), load_study(out).user_attrs, sorted(out.iterdir())) == before


def test_a_confirmation_of_the_largest_seed_counts_its_seeds_on_from_0(last_seed_search):
    """The seeds after the search's own: past the largest seed, 0, 1, ... (never the search's seed)."""
    out = last_seed_search
    assert main(["confirm", "study.name=tiny-clusters", f"hydra.run.dir={out}", "top_k=1", "budget_factor=1",
                 "seeds=2"]) == 0
    assert {r.data.tags["fulu.seed"] for r in confirmation_runs(out)[1]} == {"0", "1"}


def test_a_search_that_ends_with_a_confirmation_of_the_largest_seed_is_taken(tmp_path, monkeypatch):
    """study.confirm.enabled=true confirms at the end of the search, with seeds counted on from 0 past the
    largest: a confirmation of any number of seeds has seeds, so none is refused (it refused the seeds
    past the largest when they counted from trainer.seed itself)."""
    monkeypatch.chdir(tmp_path)
    settings = app.preflight([*QUICK, f"trainer.seed={SEED_MAX}", "study.confirm.enabled=true",
                              "study.confirm.seeds=3"])
    assert settings.study.confirm.seeds == 3
    assert list(tmp_path.iterdir()) == []


# --- 4. the reference on the study's task -----------------------------------------------------------------

def expert_choice_reference(tmp_path: Path) -> tuple[Path, list[str]]:
    return users_space(tmp_path, {"base": BLOCK, "params": {
        "router": {"type": "categorical", "choices": ["topk", "expert_choice"]}, "num_experts": TWO_EXPERTS},
        "reference": {"router": "expert_choice", "num_experts": 4}})


def test_a_reference_the_task_allows_is_taken(tmp_path, monkeypatch):
    """Expert choice on token classification (task=clusters) was refused as not causal: the space's reference
    was checked on a stand-in language-model task."""
    work, args = expert_choice_reference(tmp_path)
    monkeypatch.chdir(work)
    settings = app.preflight([*args, "task=clusters", "trainer=tiny", f"hydra.run.dir={work / 'out'}"])
    assert settings.space.reference == {"router": "expert_choice", "num_experts": 4}
    assert list(work.iterdir()) == []


def test_a_reference_a_next_token_task_cannot_train_is_still_refused(tmp_path, monkeypatch, capsys):
    work, args = expert_choice_reference(tmp_path)
    monkeypatch.chdir(work)
    problem = refused(["search", *args, "task=pimoe_mix", "trainer=tiny", f"hydra.run.dir={work / 'out'}"], work,
                      capsys)
    assert problem.startswith("search_space.reference: impossible architecture: router expert_choice is not "
                              "causal"), problem


# --- 5 and 6. the study's folder, workers, divergence -----------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("study.name=..", "study.name: expected a plain folder name (not . or .., without / or \\), got '..'"),
    ("study.name=.", "study.name: expected a plain folder name (not . or .., without / or \\), got '.'"),
    ("study.name='a\\\\b'", "study.name: expected a plain folder name (not . or .., without / or \\), got 'a\\"),
    ("study.n_workers=3", "study.n_workers: 3 workers for study.n_trials=1: at most one worker per trial (workers "
                          "on other hosts join the study with their own command)"),
    ("trainer.divergence_factor=1", "trainer.divergence_factor: expected a finite number > 1, got 1"),
])
def test_a_study_setting_that_cannot_work_is_refused(override, message, tmp_path, monkeypatch, capsys):
    """study.name=.. wrote optuna.db, mlflow.db, mlartifacts/ and .hydra/ into the current folder;
    study.n_workers=3 started three workers for one trial; trainer.divergence_factor=1 failed every trial at
    step 2, whose loss, on another batch, was a little above the first."""
    monkeypatch.chdir(tmp_path)
    assert refused(["search", *QUICK, override], tmp_path, capsys).startswith(message)


def test_study_settings_at_their_bounds_are_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = app.preflight([*QUICK, "study.name=a.b", "study.n_trials=2", "study.n_workers=2",
                              "trainer.divergence_factor=1.05"])
    assert (settings.study.name, settings.study.n_workers, settings.train.divergence_factor) == ("a.b", 2, 1.05)
    assert list(tmp_path.iterdir()) == []


def test_a_study_searched_before_the_training_checks_is_still_read():
    """Export and the dashboard read a finished study's settings (will_train=False): more workers than trials
    or confirmation seeds past the largest seed refuse a run that trains, not them."""
    for overrides, refused_keys in (
            (["study.n_workers=3", f"trainer.seed={SEED_MAX}", "study.confirm.enabled=true"],
             ["study.n_workers"]),):
        cfg, out = compose_config(["+experiment=tiny", "study.n_trials=2", *overrides])
        load_settings(cfg, out, will_train=False)
        with pytest.raises(FuluConfigError) as e:
            load_settings(cfg, out)
        assert [p.partition(":")[0] for p in e.value.problems] == refused_keys
