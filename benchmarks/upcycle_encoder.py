"""The dense encoder of BENCHMARKS.md's upcycling section, made here since nothing is downloaded: a BERT
built from transformers' BertConfig, pretrained with masked-language modelling on the upcycle task's
default corpus (the running Python's standard library), and saved with save_pretrained, the starting
point of ``fulu-nas search task=upcycle model=OUT``.

    python3 benchmarks/upcycle_encoder.py OUT [--hidden 128] [--layers 2] [--steps 3000] [--seq-len 128]
        [--batch 32] [--lr 1e-3] [--max-bytes 2000000] [--seed 0]

It is byte-level: no tokenizer is saved, the vocabulary is the 256 byte values and the mask token 256,
which is the upcycle task's byte fallback (``tokenizer=auto`` picks it for a folder without a tokenizer).
The pretraining is the task's own training on its training split (the same split the search uses, so
its validation text is never seen here) with the project's trainer, from a random initialisation. It
prints the validation MLM loss before and after, as JSON.
"""

import argparse
import json
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from fulu_nas.interop.mlm_task import BYTE_MASK_ID, UpcycleTask
from fulu_nas.interop.upcycle import build_upcycled, upcycle_arch
from fulu_nas.training.evaluate import evaluate
from fulu_nas.training.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write (save_pretrained)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=BYTE_MASK_ID + 1, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 32), intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.seq_len, hidden_act="gelu")
    BertForMaskedLM(config).save_pretrained(args.out)  # the random initialisation, read back by the task
    task = UpcycleTask(model=args.out, tokenizer="bytes", seq_len=args.seq_len, max_bytes=args.max_bytes)
    model = build_upcycled(upcycle_arch(task.encoder, task.seq_len), task.encoder)  # the dense model
    before = evaluate(model, task)["loss"]
    start = time.perf_counter()
    result = train(model, task, TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                                            device="cpu", report_every=max(1, args.steps // 20)))
    seconds = time.perf_counter() - start
    after = evaluate(model, task)
    model.model.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "steps": result.steps, "train_seconds": round(seconds, 1),
                      "val_loss_before": before, "val_loss_after": after["loss"],
                      "val_masked_accuracy": after["masked_accuracy"],
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
