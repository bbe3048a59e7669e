"""When a weight last changed in place, for the copies kept between calls (the router weight's bf16
split, the CPU experts' packed weights).

A tensor's version counter moves with every in-place write autograd sees, but torch's fused optimizers
(``fused=True``: Adam, AdamW, SGD, Adagrad; torch 2.11 and 2.13 measured) write the parameters in a
fused kernel that leaves it as it was: a copy keyed on it alone outlived the weights it was made from,
and the layer went on computing with them after the step. Every fused step is therefore counted too
(an optimizer step hook, registered on first use), and a copy is made again after one.
"""

from __future__ import annotations

from torch import Tensor

_fused_steps = 0
_hooked = False


def _count_fused_step(optimizer, args, kwargs) -> None:
    global _fused_steps
    if any(group.get("fused") for group in optimizer.param_groups):
        _fused_steps += 1


def version(w: Tensor) -> tuple[int, int | None, int]:
    """What changes when ``w`` is written in place: its storage, its version counter (an inference
    tensor, made under ``torch.inference_mode``, has none) and the fused optimizer steps so far."""
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_fused_step)
        _hooked = True
    return w.data_ptr(), None if w.is_inference() else w._version, _fused_steps
