"""The upcycle task and model family: the dense encoder's folder, masked-language-model batches (the
model's tokenizer or bytes), the upcycling architectures of the search space and the models they build.
Tiny random encoders saved with save_pretrained; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from fulu_nas.errors import FuluConfigError  # noqa: E402
from fulu_nas.interop.encoder import DenseEncoder  # noqa: E402
from fulu_nas.interop.mlm_task import BYTE_MASK_ID, UpcycleTask  # noqa: E402
from fulu_nas.interop.upcycle import build_upcycled, choose_layers, upcycle_arch  # noqa: E402
from fulu_nas.search.family import UPCYCLE, family_for  # noqa: E402
from fulu_nas.search.feasibility import check_feasible  # noqa: E402
from fulu_nas.search.space import parse_space  # noqa: E402
from fulu_nas.tasks import IGNORE, TASKS, build_task  # noqa: E402

from .helpers import weights_trained_with_threads  # noqa: E402
from .hf_models import VOCAB, save_encoder, save_gpt2, write_corpus  # noqa: E402

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "upcycle.yaml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {"bert": save_encoder(root / "bert"),
            "electra": save_encoder(root / "electra", family="electra", tokenizer=False, vocab_size=300, seed=1),
            "small": save_encoder(root / "small", tokenizer=False),
            "corpus": write_corpus(root / "corpus")}


@pytest.fixture(scope="module")
def task(folders) -> UpcycleTask:
    return build_task("upcycle", model=str(folders["bert"]), path=str(folders["corpus"]), seq_len=32)


def test_the_task_uses_the_models_tokenizer_and_masks_like_bert(task, folders):
    assert TASKS["upcycle"] is UpcycleTask and isinstance(task, UpcycleTask)
    assert task.tokenizer_kind == "model" and task.vocab_size == len(VOCAB) and task.encoder.head == "pretrained"
    cls, sep, mask = (VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    batch = next(task.train_batches(64, seed=0))
    assert batch.tokens.shape == (64, 32) and (batch.tokens[:, 0] == cls).all() and (batch.tokens[:, -1] == sep).all()
    chosen = batch.targets != IGNORE
    assert not chosen[:, [0, -1]].any()  # the special tokens are never targets
    assert 0.10 < chosen[:, 1:-1].float().mean() < 0.20  # mask_rate 0.15
    masked = (batch.tokens[chosen] == mask).float().mean()
    assert 0.7 < masked < 0.9  # 80% of the chosen tokens become [MASK]
    unchanged = batch.tokens[chosen] == batch.targets[chosen]
    assert 0.03 < unchanged.float().mean() < 0.2  # 10% stay (and random draws sometimes hit the same id)
    # the text is the corpus, through the tokenizer (which drops whitespace)
    corpus = "".join(b"\n".join(p.read_bytes() for p in sorted(folders["corpus"].iterdir())).decode().split())
    decoded = "".join(task.decode(task.train_ids_N[:300]).split())
    assert len(decoded) > 200 and decoded in corpus
    # the same seed gives the same stream; the validation set is fixed across builds
    again = next(task.train_batches(64, seed=0))
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.targets, batch.targets)
    other = build_task("upcycle", model=str(folders["bert"]), path=str(folders["corpus"]), seq_len=32)
    for a, b in zip(task.val_batches(16), other.val_batches(16), strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert task.describe()["model_sha256"] == task.encoder.sha256


def test_a_batch_always_has_a_target(task):
    """A small batch could draw no token to mask: its loss, a mean over no target, was NaN, and the
    training failed as diverged (at 2 x 16 tokens about one batch in 300)."""
    ids = torch.tensor([[task.special_ids[0], 40, 41, 42]])
    for seed in range(50):
        tokens, targets = task.mask(ids, torch.Generator().manual_seed(seed))
        assert (targets != IGNORE).sum() >= 1 and targets[0, 0] == IGNORE

def test_without_a_tokenizer_the_text_is_bytes(folders):
    task = build_task("upcycle", model=str(folders["electra"]), path=str(folders["corpus"]), seq_len=24)
    assert task.tokenizer_kind == "bytes" and task.vocab_size == 300
    corpus = b"\n".join(p.read_bytes() for p in sorted(folders["corpus"].iterdir()))
    assert bytes(task.train_ids_N[:500].tolist()) in corpus and task.decode(task.train_ids_N[:20]).startswith("def")
    batch = next(task.train_batches(32, seed=3))
    chosen = batch.targets != IGNORE
    assert (batch.tokens[chosen] == BYTE_MASK_ID).any() and batch.tokens.max() <= BYTE_MASK_ID
    assert (batch.targets[chosen] < 256).all()


def test_a_folder_without_the_mlm_head_gets_the_same_new_head_every_time(tmp_path, folders):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "headless")
    a, b = DenseEncoder(tmp_path / "headless"), DenseEncoder(tmp_path / "headless")
    assert a.head == b.head == "new"
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("kwargs, words", [
    (dict(model=None), "model not set: pass model=PATH"),
    (dict(model="missing"), "model '.*missing' is not a folder"),
    (dict(model="corpus"), "model '.*corpus' has no config.json"),
    (dict(model="gpt2"), "is a gpt2 model \\(GPT2LMHeadModel\\), which has no masked-language-model head"),
    (dict(model="electra", tokenizer="model"), "tokenizer=model needs the folder's tokenizer: .*electra' has none"),
    (dict(model="small"), "has no tokenizer .* vocab_size \\(193\\) is too small for the byte-level fallback"),
    # the folder has a tokenizer: the message said it had none
    (dict(model="bert", tokenizer="bytes"), "tokenizer=bytes needs a vocab_size of at least 257 .*bert' has "
                                            "\\d+; its folder has a tokenizer: use task.tokenizer=model"),
    (dict(model="bert", seq_len=100), "seq_len=100 is too long for model .*runs on at most 64 tokens"),
    (dict(model="bert", tokenizer="words"), "tokenizer must be one of auto, model, bytes"),
    (dict(model="bin"), "has no safetensors weights \\(only pytorch_model.bin: pickles"),
])
def test_bad_models_and_missing_tokenizers_are_clear_errors(folders, tmp_path, kwargs, words):
    save_gpt2(tmp_path / "gpt2")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    places = {**{k: str(v) for k, v in folders.items()}, "gpt2": str(tmp_path / "gpt2"),
              "bin": str(tmp_path / "bin"), "missing": str(tmp_path / "missing")}
    kwargs = {**kwargs, "model": places.get(kwargs["model"], kwargs["model"])}
    with pytest.raises(FuluConfigError, match=words):
        build_task("upcycle", path=str(folders["corpus"]), **kwargs)



def test_a_roberta_encoders_longest_sequence_is_named(tmp_path):
    """RoBERTa's positions start after its padding index: with max_position_embeddings 64 it runs on
    62 tokens, and a seq_len of 63 was refused naming 64 as the limit."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from fulu_nas.interop.encoder import DenseEncoder

    RobertaForMaskedLM(RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "r")
    encoder = DenseEncoder(tmp_path / "r")
    encoder.check_length(62)
    with pytest.raises(FuluConfigError, match=r"seq_len=63 is too long .*: it runs on at most 62 tokens "
                                              r"\(max_position_embeddings 64\)"):
        encoder.check_length(63)


def test_an_encoder_whose_weights_do_not_fit_its_config_names_the_tensors(folders, tmp_path):
    """transformers' refusal pointed to a report its silenced logging never printed."""
    import json
    import shutil

    from fulu_nas.interop.encoder import DenseEncoder

    folder = tmp_path / "resized"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(FuluConfigError, match=r"its weights do not fit its config.json: .*intermediate.dense.weight: "
                                              r"\(64, 32\) stored, \(48, 32\) configured") as refused:
        DenseEncoder(folder)
    assert "above report" not in str(refused.value)

def test_an_upcycling_starts_from_the_dense_models_outputs(task):
    tokens = next(task.train_batches(4, seed=1)).tokens
    dense = build_upcycled(upcycle_arch(task.encoder, task.seq_len, lr=1e-4), task.encoder).eval()
    with torch.no_grad():
        reference = dense(tokens).logits
        torch.testing.assert_close(reference, task.encoder.model(input_ids=tokens).logits, rtol=0, atol=0)
    assert dense.moe_layers() == [] and dense.arch.moe is None and dense.arch.exact
    for router, extra in (("topk", {}), ("hash", {}), ("hierarchical", {}), ("attention", {})):
        arch = upcycle_arch(task.encoder, task.seq_len, lr=1e-4, layers="last_n", last_n=1,
                            moe={"router": router, "num_experts": 4, "top_k": 2, "shared_fraction": 0.25, **extra})
        torch.manual_seed(0)
        model = build_upcycled(arch, task.encoder).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).logits, reference, rtol=0, atol=1e-5)
        layer = model.moe_layers()[0]
        assert arch.layers == (1,) and arch.exact and layer.cfg.router == router
        assert (layer.cfg.expert_ffn_size, layer.cfg.shared_expert_ffn_size) == (48, 16)
        counts = model.parameter_counts()
        assert counts["active"] < counts["total"]
        assert model.flops_per_token() > dense.flops_per_token()  # two 48-wide experts + a 16-wide shared one
    inexact = upcycle_arch(task.encoder, task.seq_len, layers="all", moe={"router": "expert_choice", "num_experts": 4})
    assert not inexact.exact and inexact.migration["require_exact"] is False
    # the architecture round-trips through its dict (what a trial stores) and names its checkpoint
    for arch in (dense.arch, inexact):
        again = UPCYCLE.arch_from_dict(yaml.safe_load(arch.to_yaml()))
        assert again == arch and again.content_hash() == arch.content_hash() and len({again, arch}) == 1
    assert dense.arch.content_hash() != inexact.content_hash()


def test_layer_choices():
    assert choose_layers("dense", 4) == () and choose_layers("all", 4) == (0, 1, 2, 3)
    assert choose_layers("every_other", 4) == (1, 3) and choose_layers("last_n", 4, 3) == (1, 2, 3)
    with pytest.raises(FuluConfigError, match=r"last_n in \[1, 4\]"):
        choose_layers("last_n", 4, 5)
    with pytest.raises(FuluConfigError, match="every_other: the model has 1 layer"):
        choose_layers("every_other", 1)


def test_a_changed_checkpoint_is_not_the_searched_one(task, folders, tmp_path):
    other = DenseEncoder(save_encoder(tmp_path / "other", seed=7))
    arch = upcycle_arch(task.encoder, task.seq_len, layers="all", moe={"num_experts": 4})
    with pytest.raises(FuluConfigError, match="not the checkpoint this architecture was searched on"):
        build_upcycled(arch, other)


def test_the_upcycle_space_covers_every_router_and_is_feasible(task):
    assert family_for("upcycle") is UPCYCLE and family_for("textlm").name == "pimoe"
    space = parse_space(yaml.safe_load(SPACE.read_text()), family=UPCYCLE)
    params = {p.name: p for p in space.params}
    assert set(params["router"].choices) == {"topk", "hash", "hierarchical", "attention", "expert_choice"}
    assert set(params["layers"].choices) == {"dense", "all", "every_other", "last_n"}
    assert {"num_experts", "top_k", "shared_fraction", "balancing", "lr"} <= params.keys()
    assert space.reference["layers"] == "dense"
    check_feasible(space, task)  # every choice of every parameter gives an architecture
    reference = space.arch(space.with_derived(space.reference), task)
    assert reference.layers == () and reference.lr == space.reference["lr"]
    # the other families' fields are not this space's, and the reverse
    with pytest.raises(FuluConfigError, match="search_space.params.num_layers: not a searchable field"):
        parse_space({"params": {"num_layers": {"type": "int", "low": 1, "high": 2}}}, family=UPCYCLE)
    with pytest.raises(FuluConfigError, match="search_space.base.moe.expert_ffn_size: not an MoE layer field the"):
        parse_space({"base": {"moe": {"expert_ffn_size": 64}}}, family=UPCYCLE)
    with pytest.raises(FuluConfigError, match="search_space.params.layers: not a searchable field"):
        parse_space({"params": {"layers": {"type": "categorical", "choices": ["all"]}}})


def test_the_benchmark_encoder_script_pretrains_a_byte_level_bert(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "encoder"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "upcycle_encoder.py"), str(out), "--hidden", "32",
                           "--layers", "2", "--steps", "40", "--seq-len", "32", "--batch", "8", "--max-bytes",
                           "100000"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] == 40 and report["val_loss_after"] < report["val_loss_before"] - 0.3
    # the folder is a byte-level encoder that the upcycle task reads with its byte fallback
    task = build_task("upcycle", model=str(out), seq_len=32, max_bytes=100000)
    assert task.tokenizer_kind == "bytes" and task.vocab_size == BYTE_MASK_ID + 1
    assert task.encoder.head == "pretrained" and task.encoder.shape.num_layers == 2


def test_an_upcycled_encoder_trains_to_the_same_weights_with_any_thread_count(task):
    """The encoder's LayerNorms: torch's CPU backward adds their weight and bias gradients in
    per-thread sums, so one thread and two trained the same upcycled trial to other weights; the
    trainer sums them over the rows instead (fulu_nas.training.layer_norm)."""
    from fulu_nas.training.train import TrainConfig, train

    arch = upcycle_arch(task.encoder, task.seq_len, lr=1e-3, layers="all", moe={"router": "topk", "num_experts": 4})

    def train_once():
        model = build_upcycled(arch, task.encoder)
        train(model, task, TrainConfig(steps=4, batch_size=32, lr=1e-3, progress=False, report_every=2))
        assert all(type(m).forward is torch.nn.LayerNorm.forward and "forward" not in vars(m)
                   for m in model.modules() if isinstance(m, torch.nn.LayerNorm))  # restored after training
        return model

    weights = weights_trained_with_threads(train_once)
    assert any("LayerNorm" in name for name in weights[0])
    for other in weights[1:]:
        assert [k for k, v in weights[0].items() if not torch.equal(v, other[k])] == []
