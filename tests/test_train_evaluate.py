"""Training, evaluation and cost measurement on the real tasks, end to end on CPU."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import pytest
import torch

from fulu_nas.deploy.cost import measure_cost, robust_spread
from fulu_nas.models import ArchConfig, PiMoETransformer
from fulu_nas.moe import ROUTERS, MoEConfig
from fulu_nas.tasks import IGNORE, ClustersTask, PiMoEMixTask
from fulu_nas.tasks._common import accuracy_counts
from fulu_nas.training.dynamic_experts import DynamicExperts, DynamicExpertsConfig, Probe
from fulu_nas.training.evaluate import evaluate, match_experts_to_domains, routing_accuracy
from fulu_nas.training.train import BudgetCapReached, TrainConfig, TrainingDiverged, lr_factor, train

from .helpers import ROUTER_EXTRAS, torch_threads, weights_trained_with_threads


def clusters_model(task, seed=0, **moe):
    kw = dict(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=2, aux_loss_coef=0.01)
    kw.update(moe)
    arch = ArchConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len,
                      num_layers=2, hidden_size=32, num_heads=2, moe_every=2, moe=MoEConfig(**kw))
    torch.manual_seed(seed)
    return PiMoETransformer(arch)


def small_clusters():
    return ClustersTask(num_domains=4, values=8, seq_len=16, val_sequences=64)


FAST = dict(batch_size=16, progress=False, report_every=5)


# -- routing accuracy by hand ----------------------------------------------------------------------

def test_routing_accuracy_one_to_one():
    # domains x experts; the best matching is 0->1, 1->0, 2->2
    C = torch.tensor([[1.0, 9, 0], [8, 2, 0], [1, 1, 7]])
    acc, per_domain, mapping = routing_accuracy(C)
    assert mapping == [1, 0, 2]
    assert acc == pytest.approx((9 + 8 + 7) / 29)
    assert per_domain == pytest.approx([9 / 10, 8 / 10, 7 / 9])


def test_routing_accuracy_more_experts_than_domains_maps_many_to_one():
    # 2 domains, 4 experts: experts 0, 1 serve domain 0; experts 2, 3 serve domain 1
    C = torch.tensor([[5.0, 4, 1, 0], [0, 1, 6, 3]])
    acc, _, mapping = routing_accuracy(C)
    assert mapping == [0, 0, 1, 1]
    assert acc == pytest.approx(18 / 20)
    # every domain keeps at least one expert even when one domain is best everywhere
    C2 = torch.tensor([[5.0, 5, 5], [1, 2, 0]])
    assert sorted(set(match_experts_to_domains(C2))) == [0, 1]
    assert routing_accuracy(C2)[0] == pytest.approx((5 + 5 + 2) / 18)


def test_routing_accuracy_fewer_experts_than_domains():
    C = torch.tensor([[4.0, 0], [0, 3], [2, 2]])
    acc, per_domain, mapping = routing_accuracy(C)
    assert mapping == [0, 1] and acc == pytest.approx(7 / 11) and per_domain[2] == 0


def best_matching_accuracy(C: torch.Tensor) -> float:
    """Routing accuracy by brute force over the domains with tokens: one-to-one (each expert its own
    domain) when the experts are at most that many, else every such domain gets an expert."""
    import itertools

    present = [k for k in range(C.shape[0]) if C[k].sum() > 0]
    E = C.shape[1]
    if E <= len(present):
        maps = itertools.permutations(present, E)
    else:
        maps = (m for m in itertools.product(present, repeat=E) if set(m) == set(present))
    return max(sum(float(C[k, e]) for e, k in enumerate(m)) for m in maps) / float(C.sum())


def test_routing_accuracy_leaves_out_a_domain_without_tokens():
    """A perfect router lost an expert to a domain absent from the validation set (0.833 for 1.0), and
    that domain was reported with an accuracy of 0."""
    C = torch.tensor([[10.0, 0, 5, 0], [0, 10, 0, 5], [0, 0, 0, 0]])
    acc, per_domain, mapping = routing_accuracy(C)
    assert acc == 1.0 and mapping == [0, 1, 0, 1]
    assert per_domain[:2] == [1.0, 1.0] and math.isnan(per_domain[2])
    assert routing_accuracy(C[:2])[0] == acc  # the same routing without the empty row
    # E <= K over all domains, E > K over those with tokens: many-to-one among the present ones
    C = torch.tensor([[6.0, 1, 4], [0, 0, 0], [1, 7, 0], [0, 0, 0]])
    acc, per_domain, mapping = routing_accuracy(C)
    assert mapping == [0, 2, 0] and acc == pytest.approx(17 / 19) == best_matching_accuracy(C)
    assert per_domain[0] == pytest.approx(10 / 11) and per_domain[2] == pytest.approx(7 / 8)
    assert math.isnan(per_domain[1]) and math.isnan(per_domain[3])
    g = torch.Generator().manual_seed(0)
    for K, E in ((5, 3), (4, 4), (3, 5), (2, 4)):
        for _ in range(5):
            C = torch.randint(0, 9, (K, E), generator=g).float()
            C[torch.randperm(K, generator=g)[: K // 2]] = 0  # some domains absent
            assert routing_accuracy(C)[0] == pytest.approx(best_matching_accuracy(C))


def test_evaluate_scores_routing_over_the_domains_in_the_validation_set():
    task = ClustersTask(num_domains=8, val_sequences=4)
    present = sorted({int(d) for b in task.val_batches(64) for d in b.domains.flatten() if d >= 0})
    assert len(present) < 8  # domains 3, 5 and 6
    result = evaluate(clusters_model(task, seed=1), task)
    (layer,) = result["layers"]
    assert set(layer["routing_accuracy_per_domain"]) == {task.domain_names[k] for k in present}
    C = torch.tensor(layer["confusion"])
    assert layer["routing_accuracy"] == pytest.approx(best_matching_accuracy(C))
    for k in present:
        hits = sum(C[k, e] for e, d in enumerate(layer["expert_domains"]) if d == k)
        assert layer["routing_accuracy_per_domain"][task.domain_names[k]] == pytest.approx(float(hits / C[k].sum()))



class ClustersWithDomainAccuracy(ClustersTask):
    """Clusters with a second metric: token accuracy on the tokens of domain 0 alone."""

    def metric_counts(self, logits, batch):
        in_domain_0 = batch.targets.masked_fill(batch.domains != 0, IGNORE)
        return {**super().metric_counts(logits, batch), "domain_0_accuracy": accuracy_counts(logits, in_domain_0)}


def test_a_metric_measured_on_no_position_is_nan_not_zero():
    """0 / 0 is no measurement: 0 read as the worst score (a study optimising it compared constants);
    NaN fails a trial that optimises it, with its reason."""
    task = ClustersWithDomainAccuracy(num_domains=8, val_sequences=4)
    assert not any((b.domains == 0).any() for b in task.val_batches(64))  # 3, 5 and 6 only
    result = evaluate(clusters_model(task, seed=1), task)
    assert math.isnan(result["domain_0_accuracy"])
    assert 0.0 <= result["accuracy"] <= 1.0

# -- training ---------------------------------------------------------------------------------------

def test_seeded_training_is_reproducible():
    task = small_clusters()
    runs = []
    for _ in range(2):
        model = clusters_model(task)
        result = train(model, task, TrainConfig(steps=15, seed=3, **FAST))
        runs.append(([r.loss for r in result.history], [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_short_clusters_run_improves_loss_routing_and_reports_progress():
    from fulu_nas.bench.tasks import clusters_arch

    task = small_clusters()
    torch.manual_seed(0)
    model = PiMoETransformer(clusters_arch(task, num_experts=4))  # the benchmark's layer, 4 experts
    before = evaluate(model, task)
    reports = []
    result = train(model, task, TrainConfig(steps=400, lr=3e-3, batch_size=32, progress=False, report_every=5),
                   callback=reports.append)
    after = evaluate(model, task)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.4
    assert after["routing_accuracy"] > before["routing_accuracy"] + 0.3  # measured 0.29 -> 0.97
    assert [r.step for r in reports] == list(range(5, 401, 5))
    assert len(reports[0].layers) == 1 and len(reports[0].layers[0]["tokens_per_expert"]) == 4
    assert 0 < reports[-1].load_balance <= 1
    assert result.stop_reason == "steps" and result.steps == 400
    layer = after["layers"][0]
    assert set(layer["routing_accuracy_per_domain"]) == set(task.domain_names)
    assert sum(map(sum, layer["confusion"])) == 64 * 15  # every labelled validation token counted once
    assert 0 < after["routing_accuracy"] <= 1


def nan_at_forward(model, at: int) -> dict:
    """Make the model's ``at``-th forward produce NaN; returns the call counter."""
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == at else output

    model.blocks[0].attn.register_forward_hook(poison)
    return calls


def test_planted_nan_stops_training_with_the_step():
    task = small_clusters()
    model = clusters_model(task)
    nan_at_forward(model, 4)
    with pytest.raises(TrainingDiverged) as e:
        train(model, task, TrainConfig(steps=10, **FAST))
    assert e.value.step == 4 and math.isnan(e.value.value)


def test_a_deferred_loss_check_still_names_the_step_that_diverged(monkeypatch):
    """On CUDA the losses are read every report (loss_check_interval): a NaN at step 4 is caught at the
    step-5 check, with step 4, and training does not run past that check."""
    import fulu_nas.training.train as train_module

    monkeypatch.setattr(train_module, "loss_check_interval", lambda cfg, device, dynamic: cfg.report_every)
    task = small_clusters()
    model = clusters_model(task)
    calls = nan_at_forward(model, 4)
    with pytest.raises(TrainingDiverged) as e:
        train(model, task, TrainConfig(steps=20, **FAST))
    assert e.value.step == 4 and math.isnan(e.value.value)
    assert calls["n"] == 5  # stopped at the check after step 5's forward



def test_a_divergence_before_the_safety_cap_is_the_reason_given(monkeypatch):
    """With the losses read every report (CUDA), a NaN at step 4 and the safety cap reached at step 7, before
    the next check, failed the training as "safety cap reached", the unread NaN never named."""
    import fulu_nas.training.train as train_module

    monkeypatch.setattr(train_module, "loss_check_interval", lambda cfg, device, dynamic: cfg.report_every)
    steps = iter(range(1, 100))
    monkeypatch.setattr(train_module._OneProcess, "elapsed_after_step",
                        lambda self, timed: 0.0 if next(steps) < 7 else 1e6)
    task = small_clusters()
    model = clusters_model(task)
    nan_at_forward(model, 4)
    with pytest.raises(TrainingDiverged) as e:
        train(model, task, TrainConfig(steps=20, seconds_cap=10.0, **{**FAST, "report_every": 10}))
    assert e.value.step == 4 and math.isnan(e.value.value)

def test_the_loss_is_checked_every_step_but_on_a_gpu():
    from fulu_nas.training.train import loss_check_interval

    cfg = TrainConfig(report_every=50)
    assert loss_check_interval(cfg, torch.device("cuda"), dynamic_experts=False) == 50
    assert loss_check_interval(cfg, torch.device("cuda"), dynamic_experts=True) == 1
    assert loss_check_interval(cfg, torch.device("cpu"), dynamic_experts=False) == 1


def test_the_step_is_replayed_from_a_cuda_graph_wherever_it_can_be_captured():
    from fulu_nas.training.dynamic_experts import DynamicExpertsConfig
    from fulu_nas.training.train import GRAPH_MIN_STEPS, GRAPH_WARMUP_STEPS, uses_cuda_graph

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_cuda_graph(TrainConfig(steps=400), cuda, distributed=False)
    assert uses_cuda_graph(TrainConfig(steps=400, compile="compiled"), cuda, distributed=False)
    assert not uses_cuda_graph(TrainConfig(steps=GRAPH_MIN_STEPS - 1), cuda, distributed=False)
    assert not uses_cuda_graph(TrainConfig(steps=400), cpu, distributed=False)
    assert not uses_cuda_graph(TrainConfig(steps=400), cuda, distributed=True)
    assert not uses_cuda_graph(TrainConfig(steps=400, gradient_checkpointing=True), cuda, distributed=False)
    assert not uses_cuda_graph(TrainConfig(steps=400, dynamic_experts=DynamicExpertsConfig()), cuda, distributed=False)
    assert not uses_cuda_graph(TrainConfig(steps=400), cuda, distributed=False, has_blocks=False)
    assert not uses_cuda_graph(TrainConfig(steps=400, cuda_graph=False), cuda, distributed=False)
    with pytest.raises(ValueError, match="impossible here: it needs a CUDA device"):
        uses_cuda_graph(TrainConfig(cuda_graph=True), cpu, distributed=False)
    # true below the budget auto needs was quietly eager: it replays wherever a step is left to replay
    assert uses_cuda_graph(TrainConfig(steps=GRAPH_WARMUP_STEPS + 1, cuda_graph=True), cuda, distributed=False)
    with pytest.raises(ValueError, match=f"impossible here: a budget of {GRAPH_WARMUP_STEPS} steps leaves none "
                                         f"after the {GRAPH_WARMUP_STEPS} eager warm-up steps a capture needs"):
        uses_cuda_graph(TrainConfig(steps=GRAPH_WARMUP_STEPS, cuda_graph=True), cuda, distributed=False)
    with pytest.raises(ValueError, match="auto, true or false"):
        uses_cuda_graph(TrainConfig(cuda_graph="yes"), cuda, distributed=False)
    # below Hopper torch's bf16 grouped GEMM loops over the groups, reading their sizes on the host
    assert not uses_cuda_graph(TrainConfig(steps=400), cuda, distributed=False, experts_capture=False)
    with pytest.raises(ValueError, match="impossible here: experts whose grouped GEMM reads its group sizes on the "
                                         "host"):
        uses_cuda_graph(TrainConfig(cuda_graph=True), cuda, distributed=False, experts_capture=False)


def test_a_graphed_step_refuses_a_batch_of_another_shape():
    """The graph's input buffers take the next batch by copy: a batch of another shape is an error, not
    a broadcast into the captured shape."""
    from fulu_nas.tasks import Batch
    from fulu_nas.training.train import _GraphedStep

    step = object.__new__(_GraphedStep)  # its buffers only: capturing needs a GPU
    step.batch = Batch(*(torch.zeros(4, 8, dtype=torch.long) for _ in range(3)))
    step.load(Batch(*(torch.full((4, 8), i) for i in range(3))))
    assert [int(t[0, 0]) for t in (step.batch.tokens, step.batch.targets, step.batch.domains)] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"shape \(4, 8\), got \(1, 8\).*cuda_graph=false"):
        step.load(Batch(*(torch.zeros(1, 8, dtype=torch.long) for _ in range(3))))


def test_exploding_loss_is_caught():
    task = small_clusters()
    model = clusters_model(task)
    with pytest.raises(TrainingDiverged, match="above"):
        train(model, task, TrainConfig(steps=50, lr=50.0, warmup_fraction=0.0, grad_clip=0.0,
                                       divergence_factor=3.0, **FAST))


def test_callback_can_stop_training_and_time_budget_stops_early():
    task = small_clusters()

    class Stop(Exception):
        pass

    def stop_at_10(report):
        if report.step >= 10:
            raise Stop

    with pytest.raises(Stop):
        train(clusters_model(task), task, TrainConfig(steps=100, **FAST), callback=stop_at_10)
    result = train(clusters_model(task), task, TrainConfig(steps=100_000, max_seconds=1.0, **FAST))
    assert result.stop_reason == "time" and 1 < result.steps < 100_000


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0.0, 0.1, 0.1) == pytest.approx(1e-3)
    assert lr_factor(0.05, 0.1, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.1) == pytest.approx(0.1)
    mids = [lr_factor(p, 0.1, 0.1) for p in (0.2, 0.5, 0.8)]
    assert mids == sorted(mids, reverse=True)


def test_aux_free_bias_is_updated_during_training():
    task = small_clusters()
    model = clusters_model(task, bias_update_rate=0.01, aux_loss_coef=0.0)
    train(model, task, TrainConfig(steps=5, **FAST))
    assert model.moe_layers()[0].router.expert_bias.abs().sum() > 0


def test_gradient_checkpointing_trains_the_same():
    task = small_clusters()
    losses = []
    for flag in (False, True):
        result = train(clusters_model(task), task, TrainConfig(steps=10, gradient_checkpointing=flag, **FAST))
        losses.append([r.loss for r in result.history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_compiled_training_step_trains_the_same_and_leaves_an_eager_model():
    task = small_clusters()
    results, models = {}, {}
    for kind in ("eager", "compiled"):
        models[kind] = clusters_model(task)
        results[kind] = train(models[kind], task, TrainConfig(steps=6, compile=kind, **FAST))
        assert results[kind].step_kind == kind
    losses = {k: [r.loss for r in r_.history] for k, r_ in results.items()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    for a, b in zip(models["eager"].parameters(), models["compiled"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # Adam magnifies rounding in its first steps
    # the blocks are plain modules again: evaluation, cost and export see the eager model
    assert all(block._compiled_call_impl is None for block in models["compiled"].blocks)
    assert set(models["compiled"].state_dict()) == set(models["eager"].state_dict())


def test_auto_step_is_eager_on_the_cpu_and_compiling_a_model_without_blocks_is_refused():
    from fulu_nas.training.train import COMPILE_MIN_STEPS, step_kind

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert step_kind(TrainConfig(steps=10_000), cpu, distributed=False) == "eager"
    assert step_kind(TrainConfig(steps=COMPILE_MIN_STEPS), cuda, distributed=False) == "compiled"
    assert step_kind(TrainConfig(steps=COMPILE_MIN_STEPS - 1), cuda, distributed=False) == "eager"
    assert step_kind(TrainConfig(steps=10_000, compile="compiled"), cuda, distributed=True) == "eager"
    # a model without transformer blocks to compile (an upcycled Hugging Face encoder) trains eagerly
    assert step_kind(TrainConfig(steps=10_000), cuda, distributed=False, has_blocks=False) == "eager"
    with pytest.raises(ValueError, match="has none"):
        step_kind(TrainConfig(compile="compiled"), cuda, distributed=False, has_blocks=False)


BAD_TRAIN_CONFIGS = [
    # a negative clip multiplied the gradients by a negative factor: training went uphill without a word
    ({"grad_clip": -1.0}, "grad_clip: expected a finite number >= 0"),
    ({"steps": 0}, "steps: expected an integer >= 1"),  # returned a loss of nan
    ({"steps": 2.5}, "steps: expected an integer >= 1"),
    ({"report_every": 0}, "report_every: expected an integer >= 1"),  # ZeroDivisionError
    ({"warmup_fraction": 2}, "warmup_fraction: expected a finite number in [0, 1]"),
    ({"min_lr_ratio": -1}, "min_lr_ratio: expected a finite number in [0, 1]"),  # a negative learning rate
    ({"max_seconds": 0}, "max_seconds: expected a finite number > 0"),  # ignored as if unset
    ({"seconds_cap": 0}, "seconds_cap: expected a finite number > 0"),
    ({"lr": math.inf}, "lr: expected a finite number > 0"),  # reported as a diverged training
    ({"weight_decay": math.nan}, "weight_decay: expected a finite number >= 0"),
    ({"divergence_factor": 0}, "divergence_factor: expected a finite number > 1"),
    ({"device": "tpu"}, "device: expected auto, cpu, cuda or cuda:N"),
    # malformed GPU indices: accepted when made, refused only when train() started
    ({"device": "cuda:x"}, "device: expected auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:-1"}, "device: expected auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:"}, "device: expected auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:1.5"}, "device: expected auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:01"}, "device: expected auto, cpu, cuda or cuda:N"),
    ({"compile": "yes"}, "compile: expected auto, compiled or eager"),
    ({"cuda_graph": "maybe"}, "cuda_graph: expected auto, true or false"),
    ({"cuda_graph": 1}, "cuda_graph: expected auto, true or false"),  # 1 == True: taken, then meant off
    ({"deterministic": "no"}, "deterministic: expected true or false"),
]


@pytest.mark.parametrize("values,message", BAD_TRAIN_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_TRAIN_CONFIGS])
def test_a_train_config_with_a_bad_value_is_refused_naming_it(values, message):
    from fulu_nas.errors import FuluConfigError

    with pytest.raises(FuluConfigError) as refused:
        TrainConfig(**values)
    assert refused.value.problems == [f"{message}, got {next(iter(values.values()))!r}"]


def test_a_train_config_takes_any_gpu_index_a_device_can_have():
    # whether this machine has that GPU is train()'s question: a config may be made for another machine
    assert [TrainConfig(device=d).device for d in ("cuda:0", "cuda:7", "cuda:12")] == ["cuda:0", "cuda:7", "cuda:12"]


def test_training_refuses_a_gpu_it_does_not_have_and_a_task_the_model_does_not_fit():
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    if not torch.cuda.is_available():  # torch's own AssertionError ("Torch not compiled with CUDA enabled") before
        with pytest.raises(FuluConfigError, match="device: 'cuda': torch .* sees no CUDA device here"):
            train(clusters_model(task), task, TrainConfig(steps=2, device="cuda", **FAST))
    small = clusters_model(ClustersTask(num_domains=2, values=4, seq_len=16))  # a smaller vocabulary
    assert small.arch.vocab_size < task.vocab_size
    with pytest.raises(FuluConfigError, match=rf"the task's vocabulary \({task.vocab_size} ids\) does not fit the "
                                              rf"model's vocab_size \({small.arch.vocab_size}\)"):
        train(small, task, TrainConfig(steps=2, device="cpu", **FAST))  # an IndexError from the embedding before



@pytest.mark.parametrize("classes,task_classes,words", [
    (0, 4, "the task labels each token with one of 4 classes, the model's head predicts the next token"),
    (3, 4, "the task labels each token with one of 4 classes, the model's head predicts one of 3 classes"),
    (64, 4, "the task labels each token with one of 4 classes, the model's head predicts one of 64 classes")])
def test_training_refuses_a_model_whose_head_does_not_predict_the_tasks_targets(classes, task_classes, words):
    """A language-model head on a classification task read the class ids as token ids and trained on
    another problem without a word; too few classes failed in torch ("Target 3 is out of bounds")."""
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    assert task.num_classes == task_classes
    model = clusters_model(task)
    model.arch = dataclasses.replace(model.arch, num_classes=classes)
    model.classifier = torch.nn.Linear(32, classes) if classes else None
    with pytest.raises(FuluConfigError, match=re.escape(words) + r": build the model with num_classes=4"):
        train(model, task, TrainConfig(steps=2, device="cpu", **FAST))
    lm_task = PiMoEMixTask(seq_len=16, val_sequences=16)
    lm = clusters_model(lm_task)
    lm.classifier = torch.nn.Linear(32, 4)
    with pytest.raises(FuluConfigError, match="the task predicts the next token, the model's head predicts one of "
                                              "4 classes: build the model with num_classes=0"):
        train(lm, lm_task, TrainConfig(steps=2, device="cpu", **FAST))


def test_evaluate_refuses_the_model_task_pairs_train_refuses_with_the_same_message():
    """An LM-head model evaluated on a classification task read the class ids as token ids and returned
    numbers (loss 3.2, accuracy 0.025)."""
    from fulu_nas.errors import FuluConfigError

    task = ClustersTask(num_domains=4, values=8, seq_len=16, val_sequences=8)
    lm_head = clusters_model(task)
    lm_head.arch = dataclasses.replace(lm_head.arch, num_classes=0)
    lm_head.classifier = None
    small_vocab = clusters_model(ClustersTask(num_domains=2, values=4, seq_len=16))
    for model, words in ((lm_head, "the task labels each token with one of 4 classes, the model's head predicts "
                                    "the next token: build the model with num_classes=4"),
                         (small_vocab, f"the task's vocabulary ({task.vocab_size} ids) does not fit the model's "
                                       f"vocab_size ({small_vocab.arch.vocab_size})")):
        with pytest.raises(FuluConfigError) as trained:
            train(model, task, TrainConfig(steps=2, device="cpu", **FAST))
        with pytest.raises(FuluConfigError) as evaluated:
            evaluate(model, task)
        assert trained.value.problems == evaluated.value.problems == [words]


def test_a_model_shorter_than_the_tasks_sequences_is_refused_before_training():
    """It failed in the first forward with the model's ValueError, after the setup, not as the other
    model/task mismatches are refused."""
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()  # sequences of 16 tokens
    model = clusters_model(ClustersTask(num_domains=4, values=8, seq_len=8))
    assert (model.arch.max_seq_len, model.arch.vocab_size) == (8, task.vocab_size)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    words = ("the task's sequences have 16 tokens, more than the model's max_seq_len (8): build the model with "
             "max_seq_len=16")
    with pytest.raises(FuluConfigError) as trained:
        train(model, task, TrainConfig(steps=2, device="cpu", **FAST))
    assert trained.value.problems == [words]
    assert not model.training and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(FuluConfigError) as evaluated:
        evaluate(model, task)
    assert evaluated.value.problems == [words]


def test_weight_decay_falls_on_weight_matrices_only():
    """Not on the experts' biases (a dense FFN's 1-D bias, once upcycled into experts, is a matrix of
    them), nor on routers and gates, norms, or positions (a Hugging Face encoder's too)."""
    from transformers import BertConfig, BertModel

    from fulu_nas.training.train import _optimizer

    task = small_clusters()
    model = clusters_model(task, expert_bias=True, num_shared_experts=1, shared_expert_gate=True)
    decayed, rest = (group["params"] for group in _optimizer(model, TrainConfig(**FAST)).param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = sorted(names[id(p)] for p in decayed)
    assert not [n for n in decayed_names if any(part in n for part in ("b13_EF2", "b2_ED", "router", "gate", "norm",
                                                                       "pos."))], decayed_names
    assert {"embed.weight", "blocks.1.ffn.experts.w13_EDF2", "blocks.1.ffn.experts.w2_EFD"} <= set(decayed_names)
    assert all(p.dim() >= 2 for p in decayed) and len(decayed) + len(rest) == len(names)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32))
    decayed = _optimizer(encoder, TrainConfig(**FAST)).param_groups[0]["params"]
    names = {id(p): n for n, p in encoder.named_parameters()}
    assert sorted(names[id(p)] for p in decayed) == sorted(
        n for n, p in encoder.named_parameters() if p.dim() >= 2 and "position_embeddings" not in n
        and "token_type_embeddings" not in n)


def test_the_model_names_tokens_it_cannot_read():
    task = small_clusters()
    model = clusters_model(task).eval()
    vocab = model.arch.vocab_size
    for tokens, message in ((torch.tensor([[vocab]]), rf"ids must be in \[0, {vocab}\) \(vocab_size\), got {vocab}"),
                            (torch.tensor([[-1, 0]]), "got -1"),
                            (torch.zeros(5, dtype=torch.long), r"a \(batch, sequence\) tensor of int64 or int32 ids"),
                            (torch.zeros(1, 5), "torch.float32"),
                            (torch.zeros(1, 5, dtype=torch.uint8), r"int64 or int32 ids .*torch.uint8")):
        with pytest.raises(ValueError, match=message):
            model(tokens)
    assert model(torch.zeros(1, 5, dtype=torch.int32)).logits.shape[0] == 1


# -- dynamic expert scaling ------------------------------------------------------------------------


@pytest.mark.parametrize("values,message", [
    ({"every": 0}, "dynamic_experts.every: expected an integer >= 1, got 0"),
    ({"remove_below": math.nan}, "dynamic_experts.remove_below: expected a finite number >= 0, got nan"),
    ({"freeze_after": 1.5}, "dynamic_experts.freeze_after: expected a finite number in [0, 1], got 1.5"),
    ({"split_min_tokens": 1}, "dynamic_experts.split_min_tokens: expected an integer >= 2, got 1"),
    ({"min_experts": 10, "max_experts": 2}, "dynamic_experts.max_experts: expected at least min_experts (10), got 2"),
    ({"add_above": 0}, "dynamic_experts.add_above: expected a finite number > 0, got 0")])
def test_a_dynamic_experts_config_with_a_bad_value_is_refused_naming_it(values, message):
    """every=0 divided by zero in training; remove_below=nan removed experts down to the floor."""
    from fulu_nas.errors import FuluConfigError

    with pytest.raises(FuluConfigError) as refused:
        DynamicExpertsConfig(**values)
    assert refused.value.problems == [message]
    with pytest.raises(FuluConfigError, match=r"dynamic_experts: expected None or a DynamicExpertsConfig, got \{"):
        TrainConfig(dynamic_experts={"every": 5})  # an AttributeError in training

@pytest.mark.parametrize(("experts", "low", "high"), [(8, 2, 4), (8, 12, 16)])
def test_a_model_outside_the_dynamic_range_is_refused_before_training(experts, low, high):
    """The range bounds the expert count at every step: a model that starts outside it (which training
    kept outside, or brought in one expert at a time) is refused, naming the layers' count and the range."""
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    model = clusters_model(task, num_experts=experts)
    before = [p.clone() for p in model.parameters()]
    dynamic = DynamicExpertsConfig(every=5, min_experts=low, max_experts=high)
    with pytest.raises(FuluConfigError, match=rf"dynamic_experts: the model's MoE layers have {experts} experts, "
                                              rf"outside min_experts={low} \.\. max_experts={high}"):
        train(model, task, TrainConfig(steps=20, dynamic_experts=dynamic, **FAST))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dynamic_experts_on_a_grouped_hierarchical_router_are_refused_before_training():
    """The groups fix the expert count: training ran until the first check changed the expert set,
    then stopped with a traceback and lost the steps trained."""
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    model = clusters_model(task, num_experts=8, router="hierarchical", hierarchy_depth=2)
    with pytest.raises(FuluConfigError, match=r"dynamic_experts: the hierarchical router of 2 levels fixes its "
                                              r"expert count \(its groups\); take another router"):
        train(model, task, TrainConfig(steps=20, dynamic_experts=DynamicExpertsConfig(every=5), **FAST))


def test_dynamic_experts_on_a_hash_router_are_refused_before_training():
    """A token's expert is its id's hash modulo the expert count: a clone or a removal sent almost every
    token to another expert, and the busy expert kept its tokens."""
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    model = clusters_model(task, num_experts=4, router="hash", top_k=1)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(FuluConfigError) as refused:
        train(model, task, TrainConfig(steps=20, dynamic_experts=DynamicExpertsConfig(every=5), **FAST))
    assert refused.value.problems == ["dynamic_experts: the hash router's assignment is fixed by num_experts (a "
                                      "token's expert is its id's hash modulo the count); take another router or "
                                      "no dynamic_experts"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dynamic_experts_on_an_upcycled_encoder_are_refused_before_anything_changes(tmp_path):
    """Its layers were remapped, then updating its architecture failed (AttributeError: UpcycleArch has no
    with_moe), leaving the model half-changed."""
    pytest.importorskip("transformers")
    from fulu_nas.errors import FuluConfigError
    from fulu_nas.interop.encoder import DenseEncoder
    from fulu_nas.interop.upcycle import build_upcycled, upcycle_arch
    from fulu_nas.training.dynamic_experts import check_dynamic_experts

    from .hf_models import save_encoder

    encoder = DenseEncoder(save_encoder(tmp_path / "bert"))
    arch = upcycle_arch(encoder, 32, layers="all", moe={"router": "topk", "num_experts": 4, "top_k": 2})
    with pytest.raises(FuluConfigError) as refused:
        check_dynamic_experts(build_upcycled(arch, encoder), DynamicExpertsConfig())
    assert refused.value.problems == ["dynamic_experts: UpcycledMLM's architecture cannot follow its layers' "
                                      "expert counts; dynamic experts are for PiMoETransformer models"]

def test_dynamic_plan_at_the_floor_keeps_the_busiest_of_the_underloaded():
    """Experts 0 (load 0) and 1 (load 5) are both under remove_below; the floor of 3 keeps one of them:
    the busier, 1 (the idle expert was kept)."""
    task = small_clusters()
    model = clusters_model(task, num_experts=4)
    dyn = DynamicExperts(model, torch.optim.AdamW(model.parameters()),
                         DynamicExpertsConfig(min_experts=3, max_experts=6, remove_below=0.5, add_above=2.0))
    assert dyn.plan(torch.tensor([0.0, 5.0, 100.0, 100.0]), top_k=2).source == [1, 2, 3]
    assert dyn.plan(torch.tensor([5.0, 0.0, 100.0, 100.0]), top_k=2).source == [0, 2, 3]


def test_dynamic_experts_with_expert_parallel_are_refused_by_the_config():
    """They were accepted here and refused only when the expert-parallel trial started, as a ValueError."""
    from fulu_nas.errors import FuluConfigError

    with pytest.raises(FuluConfigError) as refused:
        TrainConfig(expert_parallel=2, dynamic_experts=DynamicExpertsConfig())
    assert refused.value.problems == ["dynamic_experts: not supported with expert_parallel=2 (the expert count "
                                      "is fixed by the split over the ranks); take expert_parallel=1 or no "
                                      "dynamic_experts"]
    assert TrainConfig(expert_parallel=1, dynamic_experts=DynamicExpertsConfig()).dynamic_experts is not None


def test_dynamic_plan_removes_idle_and_splits_the_busiest():
    task = small_clusters()
    model = clusters_model(task, num_experts=4)
    dyn = DynamicExperts(model, torch.optim.AdamW(model.parameters()),
                         DynamicExpertsConfig(min_experts=2, max_experts=6, remove_below=0.1, add_above=1.5))
    assert dyn.plan(torch.tensor([100.0, 0.0, 50, 50]), top_k=2).source == [0, 2, 3, 0]
    assert dyn.plan(torch.tensor([25.0, 25, 25, 25]), top_k=2).source == [0, 1, 2, 3]
    assert dyn.plan(torch.tensor([100.0, 0, 0, 0]), top_k=2).source == [0, 1, 0]  # floor of 2 kept


def _probe(groups: list[int], spread: float, T: int = 400, seed: int = 0, mixed: dict[int, float] | None = None,
           D: int = 32) -> Probe:
    """Tokens of kind k go to the experts of group k; each token's probability is split between
    its group's experts (``spread`` of it on the group's other experts) and a little elsewhere.
    Router inputs: each expert's tokens are one blob around a centre of its own, except for the
    experts in ``mixed``: ``mixed[e]`` of expert e's tokens lie around a second, distant centre."""
    g = torch.Generator().manual_seed(seed)
    E = len(groups)
    top1 = torch.randint(0, E, (T,), generator=g)
    probs = torch.full((T, E), 0.01)
    for t in range(T):
        mates = [e for e in range(E) if groups[e] == groups[top1[t]] and e != top1[t]]
        probs[t, top1[t]] = 1.0
        for m in mates:
            probs[t, m] = spread
    probs = probs / probs.sum(1, keepdim=True)
    centres = 8 * torch.randn(2 * E, D, generator=g) / D**0.5  # |centre| ~ 8, like the RMS-normed states
    share_E = torch.zeros(E)
    for e, share in (mixed or {}).items():
        share_E[e] = share
    which = torch.where(torch.rand(T, generator=g) < share_E[top1], top1 + E, top1)
    x = centres[which] + 0.3 * torch.randn(T, D, generator=g)
    return Probe(x, probs, top1)


def test_the_model_describes_the_experts_dynamic_scaling_left_it(tmp_path):
    """model.arch kept the constructor's expert count after dynamic experts changed it: the architecture
    every export writes did not fit the weights (the folder was refused at load). Layers left with different
    counts, which one architecture cannot describe, are refused by the export, naming the counts."""
    from fulu_nas.deploy.export import write_export
    from fulu_nas.errors import FuluConfigError

    task = small_clusters()
    arch = clusters_model(task).arch
    model = PiMoETransformer(dataclasses.replace(arch, num_layers=4))  # MoE layers 1 and 3
    dyn = DynamicExperts(model, torch.optim.AdamW(model.parameters()),
                         DynamicExpertsConfig(every=1, min_experts=2, max_experts=6, remove_below=0.1, add_above=1.5))
    dyn.load = [torch.tensor([100.0, 0.0, 50, 50]), torch.tensor([100.0, 0.0, 50, 50])]
    assert dyn.maybe_rescale(step=1)
    assert [layer.cfg.num_experts for layer in model.moe_layers()] == [4, 4] and model.arch.moe.num_experts == 4
    dyn.load = [torch.tensor([100.0, 0.0, 0.0, 50]), torch.tensor([25.0, 25, 25, 25])]
    assert dyn.maybe_rescale(step=2)
    assert [layer.cfg.num_experts for layer in model.moe_layers()] == [3, 4]
    with pytest.raises(FuluConfigError, match=r"MoE layers have 3, 4 experts"):
        write_export(tmp_path / "out", model, {"architecture": model.arch.to_dict()}, {}, "")
    assert not (tmp_path / "out").exists()
    dyn.load = [torch.tensor([25.0, 25, 25]), torch.tensor([100.0, 0.0, 0.0, 50])]
    assert dyn.maybe_rescale(step=3)
    assert model.arch.moe.num_experts == 3
    again = PiMoETransformer(model.arch)
    again.load_state_dict(model.state_dict())
    x = next(task.train_batches(2, seed=0)).tokens
    torch.testing.assert_close(again.eval()(x).logits, model.eval()(x).logits)


def test_dynamic_merges_experts_that_serve_the_same_tokens():
    task = small_clusters()
    model = clusters_model(task, num_experts=4)
    dyn = DynamicExperts(model, torch.optim.AdamW(model.parameters()), DynamicExpertsConfig(min_experts=2))
    load = torch.tensor([30.0, 20, 25, 25])
    # experts 0 and 1 share one kind of token: the less loaded (1) goes; 2 and 3 are distinct
    assert dyn.redundant(_probe([0, 0, 1, 2], spread=0.8), load, [0, 1, 2, 3]) == [1]
    plan = dyn.plan(load, top_k=1, probe=_probe([0, 0, 1, 2], 0.8), ages=[5] * 4)
    assert plan.source == [0, 2, 3] and plan.merged
    # all distinct: nothing merges; routing not yet differentiated (every pair alike): nothing merges
    assert dyn.redundant(_probe([0, 1, 2, 3], spread=0.8), load, [0, 1, 2, 3]) == []
    assert dyn.redundant(_probe([0, 0, 0, 0], spread=1.0), load, [0, 1, 2, 3]) == []
    # a fresh clone (age below merge_after) is not merged back into its original
    assert dyn.plan(load, top_k=1, probe=_probe([0, 0, 1, 2], 0.8), ages=[5, 0, 5, 5]).source == [0, 1, 2, 3]


def test_dynamic_splits_an_expert_serving_two_kinds_of_token_and_parts_their_routing():
    task = small_clusters()
    model = clusters_model(task, num_experts=4, top_k=1)
    layer = model.moe_layers()[0]
    optimizer = torch.optim.AdamW(model.parameters())
    model(next(task.train_batches(4, 0)).tokens).logits.sum().backward()
    optimizer.step()  # Adam state to follow the experts
    cfg = DynamicExpertsConfig(min_experts=2, noise=0.05)
    dyn = DynamicExperts(model, optimizer, cfg)
    load = torch.tensor([25.0, 25, 25, 25])
    # expert 2's tokens are two blobs, expert 3's are two blobs but one holds only 5% of them, the
    # others one blob each: only expert 2 is split, and nothing merges (routing is distinct)
    probe = _probe([0, 1, 2, 3], spread=0.0, mixed={2: 0.5, 3: 0.05}, T=800)
    plan = dyn.plan(load, top_k=1, probe=probe, ages=[5] * 4)
    assert plan.source == [0, 1, 2, 3, 2] and list(plan.centres) == [2] and not plan.merged
    # a layer that merged grows no more (maybe_rescale passes grow=False), nor in the check that merges
    assert dyn.plan(load, top_k=1, probe=probe, ages=[5] * 4, grow=False).source == [0, 1, 2, 3]
    merging = _probe([0, 0, 1, 2], spread=0.8, mixed={2: 0.5}, T=800)
    assert dyn.plan(load, top_k=1, probe=merging, ages=[5] * 4).source == [0, 2, 3]
    assert dyn.plan(load, top_k=1, probe=_probe([0, 1, 2, 3], spread=0.0), ages=[5] * 4).source == [0, 1, 2, 3]

    old_w13 = layer.experts.w13_EDF2.detach().clone()
    old_moment = optimizer.state[layer.experts.w13_EDF2]["exp_avg"].clone()
    dyn._apply(layer, plan)
    assert layer.cfg.num_experts == 5
    assert torch.equal(layer.experts.w13_EDF2[4], old_w13[2])  # the clone copies the expert ...
    assert torch.equal(optimizer.state[layer.experts.w13_EDF2]["exp_avg"][4], old_moment[2])  # ... and its moments
    # the router now tells the two blobs apart: each goes to its own copy, by the margin at the centres
    x2 = probe.x_TD[probe.top1_T == 2]
    a, b = plan.centres[2]
    logits = x2 @ layer.router.gate.weight.detach().T
    first = (x2 - a).pow(2).sum(1) < (x2 - b).pow(2).sum(1)
    assert first.float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert (logits[first, 2] > logits[first, 4]).all() and (logits[~first, 4] > logits[~first, 2]).all()
    centre_logits = torch.stack([a, b]) @ layer.router.gate.weight.detach().T
    gap = centre_logits[:, 2] - centre_logits[:, 4]
    assert gap[0] == pytest.approx(cfg.split_margin, abs=0.2) and gap[1] == pytest.approx(-cfg.split_margin, abs=0.2)


def test_dynamic_experts_freeze_after_a_share_of_the_budget():
    task = small_clusters()
    model = clusters_model(task, num_experts=4)
    dyn = DynamicExperts(model, torch.optim.AdamW(model.parameters()),
                         DynamicExpertsConfig(every=10, min_experts=2, max_experts=6, freeze_after=0.5))
    idle = {"tokens_per_expert": torch.tensor([100.0, 0.0, 50, 50])}
    dyn.observe([idle])
    assert not dyn.maybe_rescale(10, progress=0.5)  # frozen: the expert set stays
    assert model.moe_layers()[0].cfg.num_experts == 4
    dyn.observe([idle])
    assert dyn.maybe_rescale(10, progress=0.4)  # before the freeze the idle expert goes
    assert model.moe_layers()[0].cfg.num_experts == 3


def test_dynamic_mode_grows_and_shrinks_during_training():
    from fulu_nas.bench.tasks import clusters_arch

    # two experts for four planted domains: once attention carries the domain into the hidden
    # states, each expert's tokens form two clusters of router inputs and the experts split
    # (600 steps: every one of seeds 0-4 had split by then; at 300 steps 3 of 5 had)
    task = small_clusters()
    torch.manual_seed(0)
    grow = PiMoETransformer(clusters_arch(task, num_experts=2))
    cfg = DynamicExpertsConfig(every=25, min_experts=1, max_experts=6, freeze_after=1.0)
    result = train(grow, task, TrainConfig(steps=600, dynamic_experts=cfg, **{**FAST, "batch_size": 32}))
    assert grow.moe_layers()[0].cfg.num_experts > 2
    assert result.expert_counts[0] == [2] and result.expert_counts[-1][0] == grow.moe_layers()[0].cfg.num_experts
    # an expert the router never picks (a large negative bias) is removed
    shrink = clusters_model(task, num_experts=6, top_k=1, bias_update_rate=1e-9)
    shrink.moe_layers()[0].router.expert_bias[5] = -100.0
    cfg = DynamicExpertsConfig(every=10, min_experts=2, max_experts=6, add_above=100.0, freeze_after=1.0)
    train(shrink, task, TrainConfig(steps=20, dynamic_experts=cfg, **FAST))
    assert shrink.moe_layers()[0].cfg.num_experts < 6
    assert torch.isfinite(shrink(next(task.train_batches(2, 0)).tokens).logits).all()


# -- evaluation and cost ---------------------------------------------------------------------------


def test_evaluate_counts_the_dropped_assignments_of_the_whole_validation_set():
    """Batches of 36 and 1 sequences: the share of all assignments dropped, not the mean of the two
    batches' shares (0.172 where 0.216 were dropped)."""
    task = ClustersTask(num_domains=3, seq_len=8, val_sequences=37)
    model = clusters_model(task, seed=1, num_experts=4, top_k=2, capacity_factor=1.0)
    result = evaluate(model, task, batch_size=36)
    for layer in result["layers"]:
        assignments = 37 * 8 * 2
        kept = sum(layer["tokens_per_expert"])
        assert 0 < kept < assignments
        assert layer["dropped_share"] == pytest.approx((assignments - kept) / assignments, rel=1e-6)

def test_evaluate_on_pimoe_mix_reports_domains_and_exact_match():
    task = PiMoEMixTask(seq_len=32, val_sequences=16)
    arch = ArchConfig(vocab_size=task.vocab_size, max_seq_len=32, num_layers=1, hidden_size=32, num_heads=2,
                      moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32))
    result = evaluate(PiMoETransformer(arch), task, batch_size=8)
    assert 0 <= result["exact_match"] <= 1 and result["loss"] > 0
    assert set(result["layers"][0]["routing_accuracy_per_domain"]) == {"text", "computation"}


def test_measure_cost_reports_real_figures():
    task = small_clusters()
    cost = measure_cost(clusters_model(task), [(1, 16), (8, 16)], warmup=1, iterations=5)
    assert len(cost["shapes"]) == 2
    for s in cost["shapes"]:
        assert 0 < s["latency_p50_ms"] <= s["latency_p95_ms"]
        assert s["throughput_tokens_per_s"] == pytest.approx(s["batch"] * s["seq"] / (s["latency_p50_ms"] / 1e3))
        assert s["peak_memory_mb"] > 0
    assert cost["shapes"][1]["peak_memory_mb"] > cost["shapes"][0]["peak_memory_mb"]
    assert 0 < cost["active_params"] < cost["total_params"] and cost["flops_per_token"] > 0


def test_cost_times_the_served_forward_in_rounds_beside_a_reference():
    task = small_clusters()
    model, reference = clusters_model(task), clusters_model(task, seed=1, num_experts=2)
    seen = []
    for m in (model, reference):
        m.register_forward_hook(lambda mod, args, out: seen.append((mod.training, torch.is_inference_mode_enabled())))
    model.train()
    cost = measure_cost(model, [(2, 16)], warmup=1, iterations=3, rounds=4, reference=reference)
    assert set(seen) == {(False, True)}  # eval mode, inference mode: what the export serves
    assert len(seen) == 2 * (1 + 4 * 3) + 1  # warm-up, 4 rounds of 3 calls each, one more for the memory peak
    assert model.training  # restored
    (shape,) = cost["shapes"]
    assert shape["latency_ratio"] > 0 and shape["reference_latency_ms"] > 0
    assert shape["latency_spread"] >= 0 and shape["latency_ratio_spread"] >= 0
    assert cost["rounds"] == 4 and cost["iterations"] == 3


@pytest.mark.parametrize("arguments,words", [
    ({"batch_shapes": []}, "batch_shapes: expected a non-empty list of (batch, seq) pairs, got []"),
    ({"batch_shapes": (2, 16)}, "batch_shapes: expected a non-empty list of (batch, seq) pairs, got (2, 16)"),
    ({"batch_shapes": [(0, 8)]}, "batch_shapes[0] batch: expected an integer >= 1, got 0"),
    ({"batch_shapes": [(1, 8), (2, 2.5)]}, "batch_shapes[1] seq: expected an integer in [1, 16], got 2.5"),
    ({"batch_shapes": [(1, 64)]}, "batch_shapes[0] seq: expected an integer in [1, 16], got 64"),
    ({"iterations": 0}, "iterations: expected an integer >= 1, got 0"),
    ({"rounds": 0}, "rounds: expected an integer >= 1, got 0"),
    ({"warmup": -1}, "warmup: expected an integer >= 0, got -1")],
    ids=["no_shapes", "not_pairs", "no_batch", "float_seq", "seq_too_long", "iterations", "rounds", "warmup"])
def test_measure_cost_refuses_bad_arguments_naming_them(arguments, words):
    """An empty list raised "max() arg is an empty sequence", no iterations or rounds "no median for
    empty data", and a batch of 0 sequences returned a measurement."""
    model = clusters_model(small_clusters())  # max_seq_len 16
    kw = {"batch_shapes": [(1, 8)], "warmup": 0, "iterations": 1, "rounds": 1} | arguments
    with pytest.raises(ValueError) as raised:
        measure_cost(model, **kw)
    assert str(raised.value) == words


def test_robust_spread_is_the_interquartile_range_over_the_median():
    assert robust_spread([1.0]) == 0.0
    assert robust_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)
    assert robust_spread([2.0, 2.0, 2.0, 100.0]) == pytest.approx(24.5 / 2)  # one outlier moves the top quartile


def test_seconds_cap_is_a_safety_stop_outside_the_schedule():
    """A step budget's result does not depend on the cap (the schedule never reads it); a training
    still running at the cap raises instead of returning a shorter result."""
    task = small_clusters()
    losses = []
    for cap in (None, 1e6):
        torch.manual_seed(0)
        result = train(clusters_model(task), task, TrainConfig(steps=30, seconds_cap=cap, **FAST))
        losses.append([(r.step, r.loss, r.lr) for r in result.history])
    assert losses[0] == losses[1]
    with pytest.raises(BudgetCapReached) as e:
        train(clusters_model(task), task, TrainConfig(steps=100_000, seconds_cap=0.5, **FAST))
    assert 1 <= e.value.step < 100_000 and e.value.seconds >= 0.5 and e.value.cap == 0.5


def test_a_time_budget_that_ends_past_the_cap_ends_as_a_time_budget():
    """The cap is a safety stop above the budget: a step that ends the time budget ends training
    normally even when it also passes a larger cap (a slow step or a slow report's callback)."""
    task = small_clusters()
    cfg = TrainConfig(steps=1000, max_seconds=0.2, seconds_cap=0.4, **{**FAST, "report_every": 1})
    result = train(clusters_model(task), task, cfg, callback=lambda report: time.sleep(0.5))
    assert result.stop_reason == "time" and result.steps <= 2  # the step after the first slow report at the latest


@pytest.mark.parametrize("router", ROUTERS)
def test_an_architecture_trained_twice_on_the_cpu_gets_the_same_weights_whatever_the_threads(router):
    """A trial's result depends on its architecture, seed and budget alone: on the CPU too, with two
    threads or one (a search's workers share the cores). Autograd's backward of indexing adds into
    its rows with atomics from several threads, in an order that varies from run to run (the
    token-choice dispatch and the expert-choice gather: top-k's weights differed after 6 steps), and
    torch's softmax backward over 24 experts rounds differently with one thread and two."""
    task = ClustersTask(num_domains=4, values=8, seq_len=64, val_sequences=64)
    moe = MoEConfig(hidden_size=64, num_experts=24, expert_ffn_size=64, top_k=4, router=router, **ROUTER_EXTRAS[router])
    arch = ArchConfig(vocab_size=task.vocab_size, num_classes=task.num_classes, max_seq_len=task.seq_len,
                      num_layers=2, hidden_size=64, num_heads=2, moe_every=2, moe=moe)

    def train_once() -> PiMoETransformer:
        model = PiMoETransformer(arch)
        result = train(model, task, TrainConfig(steps=6, batch_size=64, progress=False, report_every=5))
        assert result.deterministic
        return model

    weights = weights_trained_with_threads(train_once)
    for other in weights[1:]:
        for name, value in weights[0].items():
            assert torch.equal(value, other[name]), name


def test_deterministic_training_refuses_an_operation_without_a_deterministic_version_and_restores_torch():
    """The trainer turns on torch's deterministic algorithms for the loop: an operation that has no
    deterministic implementation stops training with torch's message and the setting that lifts it, and
    torch's global settings are what they were afterwards. ``put_`` without accumulation has none."""
    import torch.utils.deterministic

    from fulu_nas.training.train import deterministic_training

    with pytest.raises(RuntimeError, match=r"put_(.|\n)*trainer\.deterministic=false"):
        with deterministic_training(True) as on:
            assert on and torch.are_deterministic_algorithms_enabled()
            assert not torch.utils.deterministic.fill_uninitialized_memory  # nothing reads unwritten memory
            torch.zeros(3).put_(torch.tensor([0]), torch.ones(1))
    assert not torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
    with deterministic_training(False) as on:
        assert not on and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_training_benchmark_times_both_settings_and_counts_the_weights_they_end_with():
    """benchmarks/deterministic_training.py: a step time for each setting per architecture, and every
    round of the deterministic setting ends with the same weights and loss."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "deterministic_training.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "3", "--rounds", "2", "+experiment=tiny",
                           "--archs", "", "num_experts=2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| reference") or line.startswith("| num_experts=2")]
    assert [row[0] for row in rows] == ["reference", "num_experts=2"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
        assert row[4].endswith("/ 1")
        deterministic_losses = row[5].split(" / ")[1]
        assert deterministic_losses.count(",") == 0 and float(deterministic_losses.strip("[]")) > 0


@pytest.mark.parametrize("bias", [True, False])
def test_the_trainers_layer_norm_has_torchs_gradients_and_the_same_with_any_thread_count(bias):
    """``fulu_nas.training.layer_norm``: torch's output and input gradient to the bit, its weight and
    bias gradients to rounding (float64 by gradcheck), those the same with one thread and two (torch's
    are not); outside the trainer's ``with`` the module is torch's again."""
    from fulu_nas.training.layer_norm import _LayerNorm, layer_norm, thread_invariant_layer_norms

    norm = torch.nn.LayerNorm(96, bias=bias)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(16, 128, 96, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    params = [x, *norm.parameters()]
    ours = {}
    for n in (2, 1):
        with torch_threads(n):
            out = layer_norm(norm, x)
            ours[n] = torch.autograd.grad(out, params, upstream)
    torchs = torch.autograd.grad(norm(x), params, upstream)
    assert torch.equal(out, norm(x)) and torch.equal(ours[1][0], torchs[0])
    for a, b, t in zip(ours[2], ours[1], torchs, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-4)  # fp32 sums of 2,048 rows in another order
    small = torch.nn.LayerNorm(5, bias=bias).double()
    torch.nn.init.normal_(small.weight)
    torch.autograd.gradcheck(lambda t, *p: _LayerNorm.apply(t, (5,), *p, *([None] if not bias else []), 1e-5)[0],
                             (torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), *small.parameters()))
    model = torch.nn.Sequential(norm, torch.nn.LayerNorm(96, elementwise_affine=False))
    with thread_invariant_layer_norms(model):
        assert type(norm(x).grad_fn).__name__ == _LayerNorm.__name__ + "Backward"
        assert "forward" in vars(norm) and "forward" not in vars(model[1])  # nothing to learn: torch's own
        with torch.no_grad():
            assert torch.equal(norm(x), torch.nn.LayerNorm.forward(norm, x))
    assert "forward" not in vars(norm)


def test_thread_invariant_layer_norms_put_back_a_forward_set_on_the_instance():
    """A LayerNorm whose instance already had its own forward (a library's patch) lost it after the with."""
    from fulu_nas.training.layer_norm import thread_invariant_layer_norms

    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.LayerNorm(8))
    patched = model[0].forward = lambda x: x * 0
    with thread_invariant_layer_norms(model):
        assert model[0].forward is not patched
    assert model[0].forward is patched and "forward" not in model[1].__dict__
    assert torch.equal(model(torch.ones(2, 8)), torch.zeros(2, 8))


def test_an_evaluation_that_fails_midway_leaves_the_model_in_training_mode(monkeypatch):
    """It was left in eval mode: a caller that went on training (after an out-of-memory retry) trained
    without dropout or router jitter."""
    from fulu_nas.training.evaluate import evaluate

    task = small_clusters()
    model = clusters_model(task).train()

    def failing(batch_size):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(task, "val_batches", failing)
    with pytest.raises(RuntimeError):
        evaluate(model, task)
    assert model.training and all(m.training for m in model.modules())
