"""Encoders migrate_from_electra cannot upcycle exactly are refused, naming why: X-MOD (its language
adapters), and shared_fraction beside the shared expert's own settings; save_pretrained folders whose files
disagree with what they claim to be (for migrate_from_electra and the upcycle task's DenseEncoder)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertConfig, BertModel, XmodConfig, XmodForMaskedLM, XmodModel  # noqa: E402

from fulu_nas import migrate_from_electra  # noqa: E402
from fulu_nas.cli import main  # noqa: E402
from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.encoder import DenseEncoder  # noqa: E402

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


# -- save_pretrained folders whose files disagree with what they claim to be ---------------------------


def saved_electra(folder, **config):
    """A tiny random ElectraForMaskedLM saved with save_pretrained (safetensors)."""
    from transformers import ElectraConfig, ElectraForMaskedLM

    torch.manual_seed(0)
    kw = dict(vocab_size=64, embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4)
    ElectraForMaskedLM(ElectraConfig(**{**kw, **config})).save_pretrained(folder)
    return folder


def edit_weights(folder, edit) -> None:
    """``edit(tensors)`` changes the folder's model.safetensors in place (a dict of name -> tensor)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder, **fields) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def refused(folder, words: str) -> FuluConfigError:
    """migrate_from_electra(folder) raises one FuluConfigError matching ``words``."""
    with pytest.raises(FuluConfigError, match=words) as e:
        migrate_from_electra(str(folder), num_experts=4)
    assert len(e.value.problems) == 1, e.value.problems
    return e.value


def refused_by_both(folder, words: str) -> None:
    """migrate_from_electra(folder) and DenseEncoder(folder) each raise one FuluConfigError matching ``words``."""
    refused(folder, words)
    with pytest.raises(FuluConfigError, match=words) as e:
        DenseEncoder(folder)
    assert len(e.value.problems) == 1, e.value.problems


@pytest.mark.parametrize("name,value", [("electra.encoder.layer.0.intermediate.dense.weight", float("nan")),
                                        ("electra.encoder.layer.0.attention.self.query.weight", float("inf"))])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path, name, value):
    """NaN in the FFN was blamed on the model's layout (a RuntimeError); elsewhere it migrated silently."""
    folder = saved_electra(tmp_path / "m")
    edit_weights(folder, lambda t: t[name].view(-1).__setitem__(0, value))
    refused(folder, rf"model.safetensors holds non-finite values \({name}\)")


def test_a_config_field_of_the_wrong_type_is_refused_naming_the_field(tmp_path):
    """transformers 5 validates config.json with huggingface_hub's strict dataclasses, whose error is neither
    a ValueError nor a TypeError: it escaped raw."""
    folder = saved_electra(tmp_path / "m")
    edit_config(folder, hidden_size="32")
    refused(folder, r"config.json cannot be read: Field 'hidden_size' expected int, got str \(value: '32'\)")


@pytest.mark.parametrize("extra", ["layer", "stray"])
def test_a_checkpoint_with_tensors_its_config_does_not_use_is_refused_naming_them(tmp_path, extra):
    """A third layer under a 2-layer config.json (or a stray key) was dropped silently: a truncated model."""
    folder = saved_electra(tmp_path / "m")

    def add(tensors):
        if extra == "stray":
            tensors["bogus.weight"] = torch.zeros(3)
        else:
            for key in [k for k in tensors if ".layer.1." in k]:
                tensors[key.replace(".layer.1.", ".layer.2.")] = tensors[key].clone()

    edit_weights(folder, add)
    first = "bogus.weight" if extra == "stray" else "electra.encoder.layer.2.attention.output.LayerNorm.bias"
    refused(folder, rf"its weights hold {1 if extra == 'stray' else 16} tensors? that its config.json does not use "
                    rf"\({first}[,)]")


@pytest.mark.parametrize("name", ["pipeline", "AutoTokenizer", "GPT2Model", "PreTrainedModel", "NoSuchClass"])
def test_architectures_must_name_a_model_class_of_the_config(tmp_path, name):
    """Any attribute of transformers was called with from_pretrained: a raw AttributeError for a function,
    a tokenizer's unrelated error, or another model type's class blamed on the weights."""
    folder = saved_electra(tmp_path / "m")
    edit_config(folder, architectures=[name])
    refused(folder, rf"config.json's architectures names {name!r}, which is not a transformers model class of "
                    r"model_type 'electra'")


def test_a_checkpoint_without_the_head_of_its_class_is_refused_naming_the_tensors(tmp_path):
    """migration.md promises the class a folder was saved from, head included: a head the files lack was
    drawn at random without a word."""
    folder = saved_electra(tmp_path / "m")
    edit_weights(folder, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("generator_")]])
    refused(folder, r"its weights lack the head of ElectraForMaskedLM \(generator_lm_head.bias, "
                    r"generator_predictions.LayerNorm.bias, generator_predictions.LayerNorm.weight and 2 more\)")
    # the head of another class than the weights' one is missing too (and theirs unused)
    folder = saved_electra(tmp_path / "other")
    edit_config(folder, architectures=["ElectraForPreTraining"])
    refused(folder, r"its weights lack the head of ElectraForPreTraining \(discriminator_predictions")


def test_a_whole_checkpoint_of_its_class_still_migrates(tmp_path):
    folder = saved_electra(tmp_path / "m")
    migrated = migrate_from_electra(str(folder), num_experts=4)
    assert type(migrated).__name__ == "ElectraForMaskedLM" and migrated.fulu_migration.exact


@pytest.mark.parametrize("name", ["intermediate.dense.weight", "output.dense.bias", "output.LayerNorm.weight"])
def test_a_model_with_non_finite_ffn_weights_is_refused_naming_them(name):
    """A model passed as an object (not a folder, whose files are checked when read): a NaN in an FFN was
    blamed on the FFN's layout by the verification, and the model was left as it was."""
    model = bert()
    with torch.no_grad():
        model.encoder.layer[1].get_parameter(name).view(-1)[0] = float("nan")
    with pytest.raises(FuluConfigError, match=rf"encoder\.layer\[1\]\.{name} holds non-finite values"):
        migrate_from_electra(model, num_experts=2, inplace=True)
    assert type(model.encoder.layer[1].output).__name__ == "BertOutput"  # nothing migrated


# -- config.json sizes, weight types and sharded folders: checked before anything is built -----------

@pytest.mark.parametrize("fields,words", [
    (dict(vocab_size=0), r"config.json: vocab_size must be a whole number >= 1, got 0"),
    (dict(vocab_size=-1), r"config.json: vocab_size must be a whole number >= 1, got -1"),
    (dict(hidden_size=0), r"config.json: hidden_size must be a whole number >= 1, got 0"),
    (dict(num_attention_heads=0), r"config.json: num_attention_heads must be a whole number >= 1, got 0"),
    (dict(num_attention_heads=-2), r"config.json: num_attention_heads must be a whole number >= 1, got -2"),
    (dict(intermediate_size=-64), r"config.json: intermediate_size must be a whole number >= 1, got -64"),
    (dict(num_attention_heads=3), r"config.json: hidden_size \(32\) must be a multiple of num_attention_heads \(3\)"),
    (dict(pad_token_id=999), r"config.json: pad_token_id must be None or an id below vocab_size \(64\), got 999"),
    (dict(layer_norm_eps=-1.0), r"config.json: layer_norm_eps must be a number > 0, got -1.0"),
])
def test_impossible_sizes_in_config_json_are_refused_naming_the_field(tmp_path, fields, words):
    """transformers raised ZeroDivisionError, IndexError or AssertionError for these (or migrated a model with
    -2 heads that failed at its first forward)."""
    folder = saved_electra(tmp_path / "m")
    edit_config(folder, **fields)
    refused_by_both(folder, words)


def no_loading(monkeypatch) -> None:
    """transformers' from_pretrained fails the test: it allocates the configured sizes before comparing them."""
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the sizes were compared")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(fail))


def test_a_config_json_asking_for_huge_sizes_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    """A 14-byte edit made from_pretrained allocate and initialise 12.8 GB before the mismatch was found."""
    folder = saved_electra(tmp_path / "m")
    edit_config(folder, vocab_size=100_000_000)
    no_loading(monkeypatch)
    words = (r"its weights do not fit its config.json: electra.embeddings.word_embeddings.weight: \(64, 16\) stored, "
             r"\(100000000, 16\) configured")
    refused_by_both(folder, words)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64])
def test_weights_of_a_non_floating_type_are_refused_naming_the_tensor(tmp_path, dtype):
    """transformers casts any stored type into the model: a bool FFN weight became 0/1 without a word."""
    folder = saved_electra(tmp_path / "m")
    name = "electra.encoder.layer.0.intermediate.dense.weight"
    edit_weights(folder, lambda t: t.update({name: (t[name] > 0).to(dtype)}))
    kind = str(dtype).removeprefix("torch.")
    words = rf"model.safetensors holds weights of a non-floating type \({name}: {kind}\)"
    refused_by_both(folder, words)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_floating_weights_of_another_width_still_load(tmp_path, dtype):
    folder = saved_electra(tmp_path / "m")
    edit_weights(folder, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    assert migrate_from_electra(str(folder), num_experts=4).fulu_migration.exact
    assert DenseEncoder(folder).model.electra.embeddings.word_embeddings.weight.dtype == torch.float32


def shard_into_subfolder(folder, name: str, edit=None) -> None:
    """The folder's weights as two shards, the one holding ``name`` in sub/, with the index transformers follows;
    ``edit(tensors)`` changes the second shard's tensors first."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    second = {name: tensors.pop(name)}
    if edit:
        edit(second)
    save_file(tensors, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    (folder / "sub").mkdir()
    save_file(second, folder / "sub" / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in tensors},
                  name: "sub/model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_shard_in_a_subfolder_is_checked_and_fingerprinted(tmp_path):
    """The checks and the fingerprint read the folder's top-level files only: NaN in a shard under sub/ was
    loaded, and changing its weights kept the encoder's SHA-256."""
    name = "electra.encoder.layer.0.attention.self.query.weight"
    folder = saved_electra(tmp_path / "m")
    shard_into_subfolder(folder, name, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    refused(folder, rf"sub/model-00002-of-00002.safetensors holds non-finite values \({name}\)")

    folder = saved_electra(tmp_path / "fine")
    shard_into_subfolder(folder, name)
    assert migrate_from_electra(str(folder), num_experts=4).fulu_migration.exact
    before = DenseEncoder(folder).sha256
    shard = folder / "sub" / "model-00002-of-00002.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    tensors[name].mul_(2)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert DenseEncoder(folder).sha256 != before
    # the index is part of what was read
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"metadata": {}', '"metadata": {"total_size": 1}'))
    assert DenseEncoder(folder).sha256 != before


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    import json

    folder = saved_electra(tmp_path / "m")
    name = "electra.encoder.layer.0.attention.self.query.weight"
    shard_into_subfolder(folder, name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, r"model.safetensors.index.json names '../outside.safetensors', which is not a file inside the "
                    r"folder")


def test_a_dense_block_whose_own_output_is_not_finite_is_named_as_such():
    """A negative layer_norm_eps makes the dense layer's own output NaN: the verification blamed the FFN's layout
    (a RuntimeError)."""
    torch.manual_seed(0)
    dense = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, layer_norm_eps=-1.0)).eval()
    with pytest.raises(FuluConfigError, match=r"encoder.layer\[0\]'s dense feed-forward block itself gives "
                                              r"non-finite outputs on random inputs .*layer_norm_eps \(-1.0\)"):
        migrate_from_electra(dense, num_experts=4)


def test_an_encoder_folder_under_the_home_directory_loads(tmp_path, monkeypatch):
    """'~/enc' was checked expanded but handed to transformers as written, which took it for a Hub repo id."""
    saved_electra(tmp_path / "enc")
    monkeypatch.setenv("HOME", str(tmp_path))
    encoder = DenseEncoder("~/enc")
    assert encoder.path == str((tmp_path / "enc").resolve()) and encoder.shape.num_layers == 2
