"""Hugging Face interop: ELECTRA/BERT sparse upcycling (fulu_nas.interop.migrate) and MoE block import
(fulu_nas.interop.hf_import). Tiny random models built from config classes; nothing is downloaded."""

from __future__ import annotations

import copy
import threading
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DeepseekV3Config,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForTokenClassification,
    GPT2Config,
    GPT2Model,
    MixtralConfig,
    Qwen2MoeConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from fulu_nas import RoutingStrategy, migrate_from_electra  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.hf_import import from_deepseek_v3, from_hf, from_mixtral, from_qwen2_moe, hf_family, to_hf  # noqa: E402
from fulu_nas.interop.migrate import (  # noqa: E402
    PiMoEOutput,
    TaskModel,
    balance_loss,
    pimoe_layers,
    routing_stats,
    update_expert_biases,
)
from fulu_nas.moe import MoEConfig, PiMoELayer  # noqa: E402

EXACT_ROUTERS = ["topk", "hash", "hierarchical", "attention"]
ATOL = 1e-5


# -- tiny encoders -------------------------------------------------------------------------------

@torch.no_grad()
def random_weights(model, std=0.2):
    """Every weight and bias random (the Hugging Face init zeroes biases, which would hide bugs), so
    the feed-forward blocks contribute as much as attention."""
    for name, p in model.named_parameters():
        p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, std)
    return model.eval()


def electra(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=32)
    cfg.update(kw)
    return random_weights(ElectraForMaskedLM(ElectraConfig(**cfg)))


def bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=32)
    cfg.update(kw)
    return random_weights(BertModel(BertConfig(**cfg)))


MODELS = {"electra": electra, "bert": bert}


def inputs(seed=1, batch=3, seq=12, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -4:] = 0  # padding in one sequence
    return ids, mask


@torch.no_grad()
def outputs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# -- migration: equivalence ----------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("router", EXACT_ROUTERS)
def test_migrated_model_computes_the_original_outputs(family, router):
    original = MODELS[family]()
    ids, mask = inputs()
    before = outputs(original, ids, mask)
    moe = migrate_from_electra(original, num_experts=8, routing_strategy=router, top_k=2,
                               enable_ultimate_pimoe=True, enable_advanced_routing=True,
                               enable_performance_optimization=True).eval()
    torch.testing.assert_close(outputs(moe, ids, mask), before, rtol=0, atol=ATOL)
    assert len(pimoe_layers(moe)) == 2 and all(layer.cfg.router == router for layer in pimoe_layers(moe))
    assert moe.fulu_migration.exact and moe.fulu_migration.layers == (0, 1)
    # the original is left alone (migration works on a copy unless inplace=True)
    root = original.base_model
    assert isinstance(root.encoder.layer[0].intermediate.dense, nn.Linear)
    torch.testing.assert_close(outputs(original, ids, mask), before, rtol=0, atol=0)


@pytest.mark.parametrize("options", [
    dict(routing_strategy=RoutingStrategy.TOP_K, top_k=3, enable_performance_optimization=False),
    dict(routing_strategy=RoutingStrategy.HASH, top_k=3),
    dict(routing_strategy="hierarchical", num_experts=16, top_k=4, hierarchy_depth=3),
    dict(routing_strategy="attention", attention_context=True),
    dict(routing_strategy="topk", top_p=0.5, num_experts=4),
    dict(routing_strategy="topk", enable_advanced_routing=False, inplace=True),
])
def test_migration_is_exact_across_options(options):
    original = electra(seed=3)
    ids, mask = inputs(seed=4)
    before = outputs(original, ids, mask)
    moe = migrate_from_electra(original, **options).eval()
    torch.testing.assert_close(outputs(moe, ids, mask), before, rtol=0, atol=ATOL)
    assert (moe is original) == options.get("inplace", False)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("router", EXACT_ROUTERS)
def test_a_shared_expert_cut_out_of_the_ffn_keeps_the_outputs(family, router):
    original = MODELS[family](seed=5)
    ids, mask = inputs(seed=6)
    before = outputs(original, ids, mask)
    moe = migrate_from_electra(original, num_experts=4, routing_strategy=router, top_k=2, shared_fraction=0.25).eval()
    torch.testing.assert_close(outputs(moe, ids, mask), before, rtol=0, atol=ATOL)
    layer = pimoe_layers(moe)[0]
    cfg = layer.cfg
    assert (cfg.num_shared_experts, cfg.shared_expert_ffn_size, cfg.expert_ffn_size) == (1, 16, 48)
    assert moe.fulu_migration.exact
    dense = original.base_model.encoder.layer[0]
    # the shared expert is the FFN's first 16 units with the output bias; each routed expert the other 48
    torch.testing.assert_close(layer.shared.ffn.w13.weight, dense.intermediate.dense.weight[:16], rtol=0, atol=0)
    torch.testing.assert_close(layer.shared.ffn.w2.bias, dense.output.dense.bias, rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w2_EFD[3], dense.output.dense.weight[:, 16:].t(), rtol=0, atol=0)
    assert layer.experts.b2_ED.abs().max() == 0
    # a shared expert added beside the copies is not exact; a split leaving fewer than 8 units is refused
    with pytest.raises(FuluConfigError, match="shared experts add to the upcycled FFN's output"):
        migrate_from_electra(original, num_experts=4, num_shared_experts=1)
    with pytest.raises(FuluConfigError, match="shared_fraction=0.95 of an FFN of 64 units gives 64"):
        migrate_from_electra(original, shared_fraction=0.95)
    with pytest.raises(FuluConfigError, match="shared_fraction must be a number in"):
        migrate_from_electra(original, shared_fraction=1.5)


def test_migrating_a_model_in_eval_mode_gives_a_model_in_eval_mode():
    """The new modules take the mode of the layer they replace: a model in eval mode computes its
    original outputs right after migration, without another .eval()."""
    original = electra(seed=5, hidden_dropout_prob=0.3)  # built in eval mode
    ids, mask = inputs(seed=6)
    before = outputs(original, ids, mask)
    moe = migrate_from_electra(original, routing_strategy="topk")
    assert not any(m.training for m in moe.modules())
    torch.testing.assert_close(outputs(moe, ids, mask), before, rtol=0, atol=ATOL)


def test_training_mode_keeps_the_dropout_and_layer_norm_in_place():
    # With the same seed the dropout masks are drawn in the same order: the migrated model's
    # training-mode forward is the original's (the top-k router draws no random numbers).
    original = electra(seed=8, hidden_dropout_prob=0.3).train()
    moe = migrate_from_electra(original, routing_strategy="topk").train()
    ids, mask = inputs()
    torch.manual_seed(9)
    before = outputs(original, ids, mask)
    torch.manual_seed(9)
    torch.testing.assert_close(outputs(moe, ids, mask), before, rtol=0, atol=ATOL)
    layer = moe.electra.encoder.layer[0]
    assert isinstance(layer.intermediate, nn.Identity) and isinstance(layer.output, PiMoEOutput)
    assert {"output.LayerNorm.weight", "output.moe.experts.w13_EDF2"} <= set(layer.state_dict())


def test_migration_from_a_save_pretrained_directory(tmp_path):
    original = electra(seed=5)
    original.save_pretrained(tmp_path / "electra")
    ids, mask = inputs(seed=6)
    moe = migrate_from_electra(tmp_path / "electra", num_experts=4, routing_strategy="topk").eval()
    assert type(moe) is ElectraForMaskedLM  # loaded as the class it was saved from, head included
    torch.testing.assert_close(outputs(moe, ids, mask), outputs(original, ids, mask), rtol=0, atol=ATOL)

    bert_dir = tmp_path / "bert"
    bert(seed=7).save_pretrained(bert_dir)
    moe = migrate_from_electra(str(bert_dir), num_experts=4, routing_strategy="hash").eval()
    torch.testing.assert_close(outputs(moe, ids, mask), outputs(bert(seed=7), ids, mask), rtol=0, atol=ATOL)


def test_hash_router_hashes_the_input_ids():
    moe = migrate_from_electra(electra(), routing_strategy="hash", num_experts=4)
    seen = []
    layer = pimoe_layers(moe)[0]
    layer.router.register_forward_pre_hook(lambda m, a, k: seen.append(k["token_ids"]), with_kwargs=True)
    ids, mask = inputs()
    outputs(moe, ids, mask)
    assert seen[-1] is not None and torch.equal(seen[-1], ids)
    # the ids are forgotten after the forward, and a deep copy keeps its own hook and holder
    assert moe.electra.encoder.layer[0].output._token_ids.current() is None
    twin = copy.deepcopy(moe)
    seen_twin = []
    pimoe_layers(twin)[0].router.register_forward_pre_hook(lambda m, a, k: seen_twin.append(k["token_ids"]),
                                                           with_kwargs=True)
    outputs(twin, ids[:1], mask[:1])
    assert torch.equal(seen_twin[-1], ids[:1])
    # without ids (inputs_embeds) the router hashes the hidden states
    with torch.no_grad():
        moe(inputs_embeds=moe.electra.embeddings.word_embeddings(ids))
    assert seen[-1] is None


def test_hash_routing_on_token_ids_gives_each_call_its_own_ids_across_threads():
    """All layers of a model read the ids from one holder the model's hooks set and cleared: a call made while
    another thread's was in progress left that one's later layers hashing the hidden states."""
    moe = migrate_from_electra(electra(), routing_strategy="hash", num_experts=4, top_k=1).eval()
    with torch.no_grad():  # experts that differ, as after fine-tuning
        for layer in pimoe_layers(moe):
            layer.experts.w13_EDF2.add_(torch.randn_like(layer.experts.w13_EDF2))
    (ids_a, mask), (ids_b, _) = inputs(seed=1), inputs(seed=2)
    expected_a, expected_b = outputs(moe, ids_a, mask), outputs(moe, ids_b, mask)
    in_layer_1, go_on = threading.Event(), threading.Event()

    def pause(module, args):
        if threading.current_thread() is worker:
            in_layer_1.set()
            go_on.wait(30)

    moe.electra.encoder.layer[1].register_forward_pre_hook(pause)
    got = {}
    worker = threading.Thread(target=lambda: got.update(a=outputs(moe, ids_a, mask)))
    worker.start()
    assert in_layer_1.wait(30)
    got["b"] = outputs(moe, ids_b, mask)  # a whole call while the worker's is between its layers
    go_on.set()
    worker.join(30)
    torch.testing.assert_close(got["a"], expected_a, rtol=0, atol=0)
    torch.testing.assert_close(got["b"], expected_b, rtol=0, atol=0)


def test_a_nested_call_that_fails_in_a_pre_hook_leaves_the_outer_calls_ids():
    """The hook that forgets a call's ids runs even when the call fails (always_call), also when it fails in a
    forward pre-hook that ran before the hook that remembers them: it then forgot the ids of the call around
    it, whose later layers hashed the hidden states instead."""
    moe = migrate_from_electra(electra(), routing_strategy="hash", num_experts=4, top_k=1).eval()
    with torch.no_grad():
        for layer in pimoe_layers(moe):
            layer.experts.w13_EDF2.add_(torch.randn_like(layer.experts.w13_EDF2))
    (ids_a, mask), (ids_b, _) = inputs(seed=1), inputs(seed=2)
    expected = outputs(moe, ids_a, mask)
    failing = {"on": False}

    def refuse(module, args, kwargs):  # a user's check, run before the model's own pre-hooks
        if failing["on"]:
            raise ValueError("refused")

    moe.base_model.register_forward_pre_hook(refuse, with_kwargs=True, prepend=True)

    def nested(module, args):  # between the outer call's layers, a call that fails
        failing["on"] = True
        with pytest.raises(ValueError, match="refused"):
            outputs(moe, ids_b, mask)
        failing["on"] = False

    handle = moe.electra.encoder.layer[1].register_forward_pre_hook(nested)
    got = outputs(moe, ids_a, mask)
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert moe.electra.encoder.layer[0].output._token_ids.current() is None


def test_chunked_feed_forward_stays_exact():
    original = electra(chunk_size_feed_forward=4)
    ids, mask = inputs()
    for router in ("hash", "topk"):
        moe = migrate_from_electra(original, routing_strategy=router).eval()
        torch.testing.assert_close(outputs(moe, ids, mask), outputs(original, ids, mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("router, options", [("hash", {}), ("attention", {"attention_context": True})])
def test_a_chunked_feed_forward_routes_as_the_whole_sequence_does(router, options):
    """transformers' chunk_size_feed_forward feeds the FFN slices of the sequence: a hash-routed layer hashed
    the hidden states instead of the ids (which no longer lined up), and an attention router with context
    attended within each slice, so that once the experts differ (after fine-tuning) the outputs moved with
    the chunking (0.95 and 0.81 apart). The migrated layers do not chunk (a per-token FFN's chunking saves
    memory alone), and a hash-routed layer chunked afterwards hashes each slice's own ids."""
    moe = migrate_from_electra(electra(chunk_size_feed_forward=4), routing_strategy=router, num_experts=4,
                               **options).eval()
    assert {layer.chunk_size_feed_forward for layer in moe.electra.encoder.layer} == {0}
    with torch.no_grad():  # experts that differ, as after fine-tuning
        for layer in pimoe_layers(moe):
            layer.experts.w13_EDF2.add_(torch.randn_like(layer.experts.w13_EDF2))
    ids, mask = inputs()
    whole = outputs(moe, ids, mask)
    if router == "hash":
        for layer in moe.electra.encoder.layer:
            layer.chunk_size_feed_forward = 4
        torch.testing.assert_close(outputs(moe, ids, mask), whole, rtol=0, atol=1e-6)
        torch.testing.assert_close(outputs(moe, ids, mask), whole, rtol=0, atol=1e-6)  # a second call alike


def test_gradient_checkpointing_recomputes_a_hash_routed_layer_with_its_token_ids():
    """The recommended non-reentrant checkpointing recomputes each layer in the backward, once the model's
    call had returned and forgotten its input_ids: the recomputed layer hashed the hidden states, routed
    elsewhere, and torch's checkpoint failed (CheckpointError)."""
    from fulu_nas.interop.migrate import balance_loss

    ids, mask = inputs()
    grads = []
    for checkpointing in (False, True):
        moe = migrate_from_electra(bert(), routing_strategy="hash", num_experts=4).train()
        for module in moe.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            moe.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = moe(input_ids=ids, attention_mask=mask).last_hidden_state
        (out.square().mean() + balance_loss(moe)).backward()
        grads.append({name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


# -- migration: the spec's flags -----------------------------------------------------------------

def test_flags_map_to_real_options():
    model = electra(num_hidden_layers=4)
    every_other = migrate_from_electra(model, enable_ultimate_pimoe=False)
    assert every_other.fulu_migration.layers == (1, 3)
    assert [type(layer.output).__name__ for layer in every_other.electra.encoder.layer] == [
        "ElectraOutput", "PiMoEOutput", "ElectraOutput", "PiMoEOutput"]
    assert migrate_from_electra(model, layers=[0, 2]).fulu_migration.layers == (0, 2)

    advanced = migrate_from_electra(model, routing_strategy="hierarchical").fulu_migration.moe
    assert advanced.bias_update_rate == 1e-3 and advanced.z_loss_coef == 1e-3 and advanced.aux_loss_coef == 0.01
    plain = migrate_from_electra(model, enable_advanced_routing=False).fulu_migration.moe
    assert plain.bias_update_rate == 0 and plain.z_loss_coef == 0 and plain.aux_loss_coef == 0.01
    assert migrate_from_electra(model, routing_strategy="hash").fulu_migration.moe.bias_update_rate == 0

    assert plain.impl == "grouped"
    assert migrate_from_electra(model, enable_performance_optimization=False).fulu_migration.moe.impl == "loop"

    info = migrate_from_electra(model, routing_strategy=RoutingStrategy.ATTENTION_BASED, num_experts=4,
                                top_k=1).fulu_migration
    assert info.moe.router == "attention" and info.moe.attention_heads == 4
    arch = info.architecture()
    assert MoEConfig.from_dict(arch["moe"]) == info.moe and arch["layers"] == [0, 1, 2, 3]


def test_expert_choice_is_refused_unless_inexact_is_allowed():
    model = electra()
    with pytest.raises(FuluConfigError, match="expert_choice.*require_exact=False"):
        migrate_from_electra(model, routing_strategy="expert_choice")
    with pytest.warns(UserWarning, match="does not compute the original"):
        moe = migrate_from_electra(model, routing_strategy="expert_choice", capacity_factor=0.5, require_exact=False)
    moe.eval()
    assert not moe.fulu_migration.exact and "expert_choice" in moe.fulu_migration.not_exact_because[0]
    # with half the capacity some tokens get no expert (lose their FFN): the outputs change
    ids, mask = inputs()
    changed = (outputs(moe, ids, mask) - outputs(model, ids, mask)).abs().max()
    assert routing_stats(moe)[0]["dropped_share"] > 0.2 and changed > 1e-3


@pytest.mark.parametrize("override, words", [
    (dict(renormalize=False), "renormalize=False"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor"),
    (dict(capacity_factor=1.0), "capacity_factor"),
    (dict(num_shared_experts=1), "shared experts"),
])
def test_overrides_that_break_equivalence_are_refused(override, words):
    with pytest.raises(FuluConfigError, match=words):
        migrate_from_electra(electra(), **override)


# -- migration: training -------------------------------------------------------------------------

def test_short_fine_tune_lowers_the_loss_and_separates_the_experts():
    torch.manual_seed(0)
    moe = migrate_from_electra(bert(seed=2, vocab_size=32), num_experts=4, routing_strategy="topk").train()
    head = nn.Linear(32, 32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 12), generator=g)
    targets = (ids * 7 + 3) % 32  # a per-token map: learnable
    params = list(moe.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses, balances = [], []
    for _ in range(30):
        logits = head(moe(input_ids=ids).last_hidden_state)
        task = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        bal = balance_loss(moe)
        opt.zero_grad()
        (task + bal).backward()
        opt.step()
        update_expert_biases(moe)
        losses.append(task.item())
        balances.append(bal.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b > 0 for b in balances) and len(routing_stats(moe)) == 2
    layer = pimoe_layers(moe)[0]
    w = layer.experts.w13_EDF2
    assert (w - w[:1]).abs().amax() > 1e-4  # the upcycled copies have drifted apart
    assert layer.router.expert_bias.abs().sum() > 0  # the aux-loss-free bias moved


def test_fine_tune_on_a_fulu_nas_task_with_the_trainer():
    from fulu_nas.tasks import ClustersTask
    from fulu_nas.training.evaluate import evaluate
    from fulu_nas.training.train import TrainConfig, train

    task = ClustersTask(num_domains=4, values=8, seq_len=16, val_sequences=32)
    torch.manual_seed(0)
    hf = ElectraForTokenClassification(ElectraConfig(
        vocab_size=task.vocab_size, embedding_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=task.seq_len, num_labels=task.num_classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = TaskModel(migrate_from_electra(hf, num_experts=4, routing_strategy="topk"))
    # clusters' targets are linear classifiers over value counts: learning them takes a few hundred steps
    result = train(model, task, TrainConfig(steps=300, batch_size=32, lr=1e-2, progress=False, report_every=5,
                                            device="cpu"))
    assert result.final_loss < 0.8 * result.history[0].loss
    report = evaluate(model, task, batch_size=16)
    assert len(report["layers"]) == 2 and 0 <= report["layers"][0]["routing_accuracy"] <= 1


def test_state_dict_round_trip_through_a_fresh_migration():
    trained = migrate_from_electra(electra(), num_experts=4, routing_strategy="hierarchical")
    with torch.no_grad():
        for layer in pimoe_layers(trained):
            layer.experts.w13_EDF2.add_(0.05 * torch.randn_like(layer.experts.w13_EDF2))
            layer.router.expert_bias.uniform_(-0.1, 0.1)
    again = migrate_from_electra(electra(), num_experts=4, routing_strategy="hierarchical")
    again.load_state_dict(trained.state_dict())
    ids, mask = inputs()
    torch.testing.assert_close(outputs(again.eval(), ids, mask), outputs(trained.eval(), ids, mask), rtol=0, atol=0)


# -- migration: unsupported input ----------------------------------------------------------------

def test_unsupported_models_are_clear_errors(tmp_path):
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(FuluConfigError, match="ELECTRA/BERT-family encoder.*GPT2Model has no encoder.layer"):
        migrate_from_electra(gpt2)
    with pytest.raises(FuluConfigError, match="ELECTRA/BERT-family encoder.*got a dict"):
        migrate_from_electra({"not": "a model"})
    with pytest.raises(FuluConfigError, match="Linear has no encoder.layer"):
        migrate_from_electra(nn.Linear(4, 4))
    with pytest.raises(FuluConfigError, match="is not a directory"):
        migrate_from_electra(tmp_path / "missing")
    with pytest.raises(FuluConfigError, match="no config.json"):
        migrate_from_electra(tmp_path)
    with pytest.raises(FuluConfigError, match="hidden_act='gelu_new'.*exact erf GELU"):
        migrate_from_electra(bert(hidden_act="gelu_new"))
    with pytest.raises(FuluConfigError, match="already a PiMoE layer"):
        migrate_from_electra(migrate_from_electra(electra()))
    partial = electra()
    del partial.electra.encoder.layer[1].output.LayerNorm
    with pytest.raises(FuluConfigError, match=r"encoder.layer\[1\] \(ElectraLayer\) lacks output.LayerNorm"):
        migrate_from_electra(partial)


def test_bad_arguments_are_clear_errors():
    model = electra()
    with pytest.raises(FuluConfigError, match="routing_strategy must be one of TOP_K"):
        migrate_from_electra(model, routing_strategy="random")
    with pytest.raises(FuluConfigError, match="expert_ffn_size, hidden_size come from the model"):
        migrate_from_electra(model, hidden_size=64, expert_ffn_size=128)
    with pytest.raises(FuluConfigError, match="top_k"):
        migrate_from_electra(model, num_experts=2, top_k=3)
    with pytest.raises(FuluConfigError, match="unexpected keyword"):
        migrate_from_electra(model, nonsense=1)
    for layers in ([2], [0, 0], [0.7], [True]):  # [0, 0] and [0.7] used to migrate layer 0 quietly
        with pytest.raises(FuluConfigError, match=r"layers must be distinct indices in \[0, 2\)"):
            migrate_from_electra(model, layers=layers)
    # a number that is not an int, or not finite, is named (a comparison TypeError, or inf taken, before)
    with pytest.raises(FuluConfigError, match="num_experts must be an integer, got '8'"):
        migrate_from_electra(model, num_experts="8")
    with pytest.raises(FuluConfigError, match="aux_loss_coef must be a finite number, got inf"):
        migrate_from_electra(model, aux_loss_coef=float("inf"))
    with pytest.raises(FuluConfigError, match="hidden_size must be a positive multiple of 8"):
        migrate_from_electra(bert(hidden_size=36, num_attention_heads=2))
    with pytest.raises(FuluConfigError, match="no PiMoE layers"):
        TaskModel(electra())


def test_verification_catches_a_feed_forward_with_another_layout():
    model = electra()
    layer = model.electra.encoder.layer[1]
    layer.output.forward = types.MethodType(lambda self, h, x: self.LayerNorm(self.dense(h)), layer.output)
    with pytest.raises(RuntimeError, match=r"encoder.layer\[1\]'s upcycled feed-forward differs"):
        migrate_from_electra(model)
    assert migrate_from_electra(model, verify=False).fulu_migration.layers == (0, 1)


# -- Hugging Face MoE blocks ---------------------------------------------------------------------

@torch.no_grad()
def randomise(block, seed=0, std=0.3):
    """Every parameter and buffer random and nonzero; DeepSeek's selection bias partly negative, so
    some biased scores are negative."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.rand(t.shape, generator=g) * 1.1 - 0.8)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    if hasattr(block.experts, "config"):
        block.experts.config._experts_implementation = "eager"
    return block.eval()


def mixtral(seed=0, **kw):
    cfg = dict(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    cfg.update(kw)
    return randomise(MixtralSparseMoeBlock(MixtralConfig(**cfg)), seed)


def qwen2_moe(seed=0, **kw):
    cfg = dict(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=40, num_experts=8,
               num_experts_per_tok=3, norm_topk_prob=False)
    cfg.update(kw)
    return randomise(Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(**cfg)), seed)


def deepseek_v3(seed=0, **kw):
    cfg = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, n_group=4, topk_group=2,
               num_experts_per_tok=4, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    cfg.update(kw)
    return randomise(DeepseekV3MoE(DeepseekV3Config(**cfg)), seed)


BLOCKS = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen2_moe_norm": lambda seed=0: qwen2_moe(seed, norm_topk_prob=True),
    "deepseek_v3": deepseek_v3,
    "deepseek_v3_one_group": lambda seed=0: deepseek_v3(seed, n_group=1, topk_group=1),
}


def assert_block_equal(layer, block, seed=0, shape=(3, 11, 32)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = block(x.clone())
        for impl in ("grouped", "loop"):
            out, _ = layer(x, impl=impl)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    return ref


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_imported_block_gives_the_hf_outputs(name):
    block = BLOCKS[name](seed=1)
    layer = PiMoELayer.from_hf(block).eval()
    assert_block_equal(layer, block, seed=2)
    # the same experts and weights are selected, token by token
    x_TD = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hf_weight_TK, hf_expert_TK = block.gate(x_TD)
        r = layer.router(x_TD)
    ours, theirs = r.expert_TK.sort(-1), hf_expert_TK.sort(-1)
    assert torch.equal(ours.values, theirs.values)
    torch.testing.assert_close(r.weight_TK.gather(-1, ours.indices), hf_weight_TK.float().gather(-1, theirs.indices),
                               rtol=1e-6, atol=1e-6)


def test_importers_read_every_setting():
    ds = from_deepseek_v3(deepseek_v3())
    c = ds.cfg
    assert (c.router, c.score_func, c.renormalize, c.routed_scaling_factor) == ("hierarchical", "sigmoid", True, 2.5)
    assert (c.hierarchy_groups, c.hierarchy_topk_groups, c.top_k) == ((4,), (2,), 4)
    assert (c.num_shared_experts, c.shared_expert_ffn_size, c.shared_expert_gate) == (2, 16, False)
    assert c.group_mask_fill == "-inf" and ds.router.expert_bias.min() < 0
    q = from_qwen2_moe(qwen2_moe()).cfg
    assert (q.renormalize, q.shared_expert_gate, q.shared_expert_ffn_size, q.top_k) == (False, True, 40, 3)
    m = from_mixtral(mixtral(router_jitter_noise=0.1), impl="loop", aux_loss_coef=0.02).cfg
    assert (m.router_jitter, m.impl, m.aux_loss_coef, m.expert_ffn_size) == (0.1, "loop", 0.02, 48)
    assert [hf_family(BLOCKS[n]()) for n in ("mixtral", "qwen2_moe", "deepseek_v3")] == [
        "mixtral", "qwen2_moe", "deepseek_v3"]

    class MyMixtral(MixtralSparseMoeBlock):
        pass

    assert hf_family(MyMixtral(MixtralConfig(hidden_size=32, intermediate_size=48))) == "mixtral"


# -- DeepSeek-V3: dropped groups, -inf (published) vs 0.0 (older transformers) ---------------------

def published_gate_forward(self, hidden_states):
    """DeepSeek-V3's published inference code (inference/model.py, Gate.forward), sigmoid scoring."""
    x = hidden_states.view(-1, self.weight.shape[1]).float()
    scores = nn.functional.linear(x, self.weight.float()).sigmoid()
    original_scores = scores
    scores = scores + self.e_score_correction_bias
    n_groups, topk_groups = self.num_group, self.topk_group
    scores = scores.view(x.size(0), n_groups, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(topk_groups, dim=-1)[1]
    mask = scores.new_ones(x.size(0), n_groups, dtype=torch.bool).scatter_(1, indices, False)
    scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, self.top_k, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return None, weights * self.routed_scaling_factor, indices


def zero_fill_gate_forward(self, hidden_states):
    """transformers' DeepseekV3TopkRouter before huggingface/transformers#45441: dropped groups 0.0."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = nn.functional.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    group_scores = scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(
        2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(
        -1, self.num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), 0.0)
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, topk_weights * self.routed_scaling_factor, topk_indices


def test_deepseek_dropped_groups_follow_the_published_model_and_optionally_old_transformers():
    # 8 experts in 4 groups, 2 groups kept, top-4. Every biased score is negative, so a 0.0 fill
    # makes the 4 experts of the dropped groups win: exactly top_k of them, so no ties decide.
    block = deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=5)
    with torch.no_grad():
        block.gate.e_score_correction_bias.uniform_(-3.0, -2.0)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6))
    installed = block.gate.forward
    with torch.no_grad():
        hf_now = block(x.clone())
        block.gate.forward = types.MethodType(published_gate_forward, block.gate)
        published = block(x.clone())
        block.gate.forward = types.MethodType(zero_fill_gate_forward, block.gate)
        old_hf = block(x.clone())
    block.gate.forward = installed
    assert (published - old_hf).abs().max() > 1e-2  # the two behaviours differ on these inputs

    default = from_deepseek_v3(block).eval()
    zero = from_deepseek_v3(block, group_mask_fill="zero").eval()
    with torch.no_grad():
        torch.testing.assert_close(default(x)[0], published, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zero(x)[0], old_hf, rtol=1e-5, atol=1e-5)
    # The installed transformers is one of the two (>= the fix: -inf, as published).
    fixed = torch.allclose(hf_now, published, rtol=1e-5, atol=1e-5)
    assert fixed or torch.allclose(hf_now, old_hf, rtol=1e-5, atol=1e-5)
    matching = default if fixed else zero
    with torch.no_grad():
        torch.testing.assert_close(matching(x)[0], hf_now, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group_mask_fill must be one of"):
        from_deepseek_v3(block, group_mask_fill="nan")


# -- other expert layouts: transformers 4.x lists, transposed and interleaved fused storage ---------

class SiLUMLP(nn.Module):
    def __init__(self, names, gate, up, down):
        super().__init__()
        g, u, d = names
        for name, w in ((g, gate), (u, up), (d, down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            setattr(self, name, lin)
        self.act_fn = nn.SiLU()


def legacy_experts(fused, names):
    F = fused.down_proj.shape[2]
    return nn.ModuleList(SiLUMLP(names, gu[:F], gu[F:], d) for gu, d in zip(fused.gate_up_proj.detach(),
                                                                            fused.down_proj.detach(), strict=True))


def test_transformers_4_expert_lists_import_and_export():
    # Mixtral 4.x: a Linear gate on the block, experts with w1 (gate), w3 (up), w2 (down).
    new = mixtral(seed=7)
    old = nn.Module()
    old.gate = nn.Linear(32, 8, bias=False)
    old.gate.weight.data.copy_(new.gate.weight)
    old.top_k, old.jitter_noise = 2, 0.0
    old.experts = legacy_experts(new.experts, ("w1", "w3", "w2"))
    layer = from_mixtral(old).eval()
    assert_block_equal(layer, new, seed=8)
    # Qwen2-MoE 4.x: top_k / norm_topk_prob on the block, experts with gate_proj / up_proj / down_proj.
    newq = qwen2_moe(seed=9, norm_topk_prob=True)
    oldq = nn.Module()
    oldq.gate = nn.Linear(32, 8, bias=False)
    oldq.gate.weight.data.copy_(newq.gate.weight)
    oldq.top_k, oldq.norm_topk_prob = 3, True
    oldq.experts = legacy_experts(newq.experts, ("gate_proj", "up_proj", "down_proj"))
    oldq.shared_expert, oldq.shared_expert_gate = newq.shared_expert, newq.shared_expert_gate
    assert_block_equal(from_qwen2_moe(oldq).eval(), newq, seed=10)
    # export into the list layout, then import again: the same layer
    with torch.no_grad():
        layer.experts.w2_EFD.mul_(1.5)
    fresh = copy.deepcopy(old)
    to_hf(layer, fresh, family="mixtral")
    torch.testing.assert_close(from_mixtral(fresh).experts.w2_EFD, layer.experts.w2_EFD, rtol=0, atol=0)


@pytest.mark.parametrize("transposed, interleaved", [(True, False), (False, True), (True, True)])
def test_fused_layout_variants(transposed, interleaved):
    block = mixtral(seed=11)
    reference = from_mixtral(block)
    other = copy.deepcopy(block)
    with torch.no_grad():
        gate_up, down = other.experts.gate_up_proj.data, other.experts.down_proj.data  # (E, 2F, D), (E, D, F)
        if interleaved:
            gate, up = gate_up.chunk(2, dim=1)
            gate_up = torch.stack([gate, up], dim=2).flatten(1, 2)
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        other.experts.gate_up_proj = nn.Parameter(gate_up.contiguous())
        other.experts.down_proj = nn.Parameter(down.contiguous())
    other.experts.is_transposed, other.experts.is_concatenated = transposed, not interleaved
    layer = from_mixtral(other)
    torch.testing.assert_close(layer.experts.w13_EDF2, reference.experts.w13_EDF2, rtol=0, atol=0)
    torch.testing.assert_close(layer.experts.w2_EFD, reference.experts.w2_EFD, rtol=0, atol=0)
    with torch.no_grad():
        layer.experts.w13_EDF2.mul_(-1)
    to_hf(layer, other)
    torch.testing.assert_close(from_mixtral(other).experts.w13_EDF2, layer.experts.w13_EDF2, rtol=0, atol=0)


# -- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_export_to_hf_round_trip(name):
    layer = from_hf(BLOCKS[name](seed=12)).eval()
    with torch.no_grad():  # train-like drift: every weight changes (and DeepSeek's selection bias)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if name == "deepseek_v3":
            layer.router.expert_bias.add_(0.1 * torch.randn_like(layer.router.expert_bias))
    block = to_hf(layer, BLOCKS[name](seed=13))
    assert_block_equal(layer, block, seed=14)


def test_export_refuses_a_layer_that_routes_differently():
    layer = from_mixtral(mixtral())
    with pytest.raises(ValueError, match="does not match the Qwen2MoeSparseMoeBlock: .*top_k: layer 2, block 3"):
        to_hf(layer, qwen2_moe())
    capped = from_mixtral(mixtral(), capacity_factor=1.0)
    with torch.no_grad():
        capped.router.expert_bias.fill_(0.1)  # e.g. trained with bias_update_rate > 0
    with pytest.raises(ValueError, match="capacity_factor: layer 1.0, block has none; expert_bias: the layer"):
        to_hf(capped, mixtral())
    with pytest.raises(ValueError, match="family must be one of"):
        to_hf(layer, mixtral(), family="llama")


def test_export_refuses_a_deepseek_layer_that_fills_dropped_groups_unlike_the_block(monkeypatch):
    """A layer imported with the old transformers' 0.0 fill, written into a block that fills -inf (or the
    reverse), routed differently from the block without a word (up to 15.6 apart on negative biased
    scores)."""
    import transformers

    block = deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=5)
    zero, published = from_deepseek_v3(block, group_mask_fill="zero"), from_deepseek_v3(block)
    from packaging.version import Version

    assert Version(transformers.__version__) >= Version("5.24")  # the fill of dropped groups is -inf from 5.24 on
    with pytest.raises(ValueError, match="group_mask_fill: layer 'zero', block '-inf'"):
        to_hf(zero, deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=6))
    to_hf(published, deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=6))
    monkeypatch.setattr(transformers, "__version__", "5.10.0")  # a block of the releases that filled 0.0
    with pytest.raises(ValueError, match="group_mask_fill: layer '-inf', block 'zero'"):
        to_hf(published, deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=6))
    to_hf(zero, deepseek_v3(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, seed=6))
    # one group: nothing is dropped, so the fill never matters
    flat = from_deepseek_v3(deepseek_v3(n_routed_experts=8, n_group=1, topk_group=1, seed=7), group_mask_fill="zero")
    to_hf(flat, deepseek_v3(n_routed_experts=8, n_group=1, topk_group=1, seed=8))

@pytest.mark.parametrize("name, make", [
    ("deepseek_v3", lambda seed: deepseek_v3(seed, n_shared_experts=0)),
    ("qwen2_moe", lambda seed: qwen2_moe(seed, shared_expert_intermediate_size=0)),
])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_block_without_a_shared_expert_imports_without_one(name, make):
    """A width-0 shared expert adds 0 (Qwen2-MoE's gate multiplies an empty MLP's zero): the layer has none."""
    block = make(1)
    layer = from_hf(block).eval()
    assert layer.cfg.num_shared_experts == 0 and layer.shared is None and not layer.cfg.shared_expert_gate
    ref = assert_block_equal(layer, block, seed=2)
    assert ref.abs().max() > 1.0  # the routed experts are there
    with torch.no_grad():  # drift, then back into a block of the same kind
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert_block_equal(layer, to_hf(layer, make(3)), seed=4)
    # a layer with a shared expert does not fit a block without one
    with pytest.raises(ValueError, match=r"shared_width: layer (32|40), block 0"):
        to_hf(from_hf(BLOCKS[name](seed=5)), make(6))


def test_an_importer_refuses_a_block_of_another_family():
    """The explicit importers read the attributes they know; a block of another known family has them too and
    would import as a different layer (Qwen2-MoE's shared expert dropped, its weights renormalised)."""
    qwen, deepseek, mix = qwen2_moe(seed=1), deepseek_v3(seed=1), mixtral(seed=1)
    with pytest.raises(TypeError, match="from_mixtral: Qwen2MoeSparseMoeBlock is a qwen2_moe block, not a "
                                        "MixtralSparseMoeBlock; use from_qwen2_moe or from_hf"):
        from_mixtral(qwen)
    with pytest.raises(TypeError, match="from_mixtral: DeepseekV3MoE is a deepseek_v3 block.*from_deepseek_v3"):
        from_mixtral(deepseek)
    with pytest.raises(TypeError, match="from_qwen2_moe: DeepseekV3MoE is a deepseek_v3 block"):
        from_qwen2_moe(deepseek)
    with pytest.raises(TypeError, match="from_deepseek_v3: MixtralSparseMoeBlock is a mixtral block"):
        from_deepseek_v3(mix)
    # export: an explicit family must be the block's; nothing is written into the block
    layer = from_mixtral(mixtral(seed=2, intermediate_size=16, num_experts_per_tok=3))
    before = copy.deepcopy(qwen.state_dict())
    with pytest.raises(ValueError, match="to_hf: family='mixtral', but Qwen2MoeSparseMoeBlock is a qwen2_moe "
                                         "block; leave family out or pass 'qwen2_moe'"):
        to_hf(layer, qwen, family="mixtral")
    assert all(torch.equal(t, before[k]) for k, t in qwen.state_dict().items())
    # a block's own family still imports and exports, the family named or not
    assert_block_equal(from_qwen2_moe(qwen).eval(), qwen, seed=3)
    mixed = from_mixtral(mix).eval()
    assert_block_equal(mixed, to_hf(mixed, mixtral(seed=4), family="mixtral"), seed=5)


def test_an_importer_refuses_a_block_with_non_finite_weights_naming_them():
    """transformers 5 builds a block's fused expert weights with torch.empty: a block made from its config and
    never initialised imported as a layer that computed NaN, without a word (migrate_from_electra refuses
    such weights by name)."""
    for name, make in (("mixtral", mixtral), ("deepseek_v3", deepseek_v3)):
        block = make(seed=1)
        with torch.no_grad():
            block.experts.down_proj[1, 2, 3] = float("nan")
            block.gate.weight[0, 0] = float("inf")
        with pytest.raises(ValueError, match=rf"^from_{name}: the block's (gate.weight, experts.down_proj|"
                                             r"experts.down_proj, gate.weight) hold NaN or infinite values "
                                             r"\(weights never initialised, or damaged\)"):
            from_hf(block)
    block = deepseek_v3(seed=1)
    block.gate.e_score_correction_bias[2] = float("nan")  # a buffer
    with pytest.raises(ValueError, match="gate.e_score_correction_bias hold NaN"):
        from_deepseek_v3(block)


def test_the_finiteness_check_of_a_large_tensor_looks_at_it_in_slices_and_misses_nothing():
    """A whole fused expert tensor's isfinite made a boolean copy of it first (gigabytes for a DeepSeek-V3 block):
    a large tensor is looked at in slices along its first dimension, a transposed one too."""
    from fulu_nas.checks import nonfinite_tensors

    wide = torch.zeros(5, 1 << 23)  # 2^23 values a row: a slice a row
    tall = torch.zeros(1 << 13, 1 << 12).t()  # not contiguous
    assert nonfinite_tensors([("wide", wide), ("tall", tall)]) == []
    wide[4, 7] = float("nan")
    tall[100, 5] = float("-inf")
    assert nonfinite_tensors([("wide", wide), ("tall", tall), ("one", torch.tensor(float("inf")))]) == [
        "wide", "tall", "one"]


# -- importer errors -----------------------------------------------------------------------------

def test_importer_errors_name_what_was_expected():
    with pytest.raises(TypeError, match="unsupported Hugging Face MoE block Linear: expected one of "
                                        "MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, DeepseekV3MoE"):
        from_hf(nn.Linear(4, 4))
    # a block of no known class is read by its attributes: the missing ones are named
    duck = nn.Module()
    duck.gate, duck.experts = nn.Linear(32, 8, bias=False), mixtral().experts
    with pytest.raises(TypeError, match="has no gate.e_score_correction_bias.*DeepseekV3MoE"):
        from_deepseek_v3(duck)
    with pytest.raises(TypeError, match="has no shared_expert, shared_expert_gate.weight.*Qwen2MoeSparseMoeBlock"):
        from_qwen2_moe(duck)
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock is a mixtral block, not a Qwen2MoeSparseMoeBlock"):
        from_qwen2_moe(mixtral())
    gelu = mixtral()
    gelu.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="activation must be SiLU.*got GELU"):
        from_mixtral(gelu)
    with pytest.raises(ValueError, match="top_k is read from the block"):
        from_mixtral(mixtral(), top_k=1)
    odd = mixtral(intermediate_size=20)
    with pytest.raises(ValueError, match="expert_ffn_size must be a positive multiple of 8"):
        from_mixtral(odd)
    listless = nn.Module()
    listless.gate = nn.Linear(32, 8, bias=False)
    listless.top_k = 2
    listless.experts = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="experts must be fused 3-D parameters"):
        from_mixtral(listless)
    listless.experts = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="gate_proj/up_proj/down_proj or w1/w3/w2"):
        from_mixtral(listless)


def test_a_migrated_model_saves_whole():
    """Migration's check runs a forward, whose statistics the model keeps: ``torch.save(model)`` failed
    on them before any forward of the user's."""
    import io

    model = migrate_from_electra(electra())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # a whole module: a trusted file only
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens).logits, model.eval()(tokens).logits)
