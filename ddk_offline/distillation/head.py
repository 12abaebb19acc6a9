"""``--loss-impl``: whether the student's loss may skip its logits (fused-linear) or must go through them.

The fused-linear loss (:func:`ddk_kernels.fused_linear_kd_loss`) takes the decoder's final hidden states and the output
head's weight (and bias), so the student's [N, V] logits and their gradient never exist. That is only the same loss
when the logits are exactly ``head(decoder(x))`` with ``head`` a plain linear layer. Checked here, once per run:
- the head is a plain ``torch.nn.Linear`` (a tied embedding is fine: it is still one weight), not a subclass or a
  sharded (tensor-parallel, DTensor) weight;
- no logit post-processing in the config (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
  Granite's ``logits_scaling``);
- and, whatever the architecture, one forward of a few tokens gives the same logits both ways.
``auto`` takes fused-linear when all hold and says why not otherwise; ``fused-linear`` refuses with the reason and
the fallback (``--loss-impl logits``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddk_offline.errors import UserError

#: Config fields that change the logits after the head; the value that leaves them unchanged.
_POST_HEAD = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
_PROBE_TOKENS = 8


def linear_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | str:
    """``(decoder, head)`` when the model's logits are ``head(decoder(input_ids).last_hidden_state)``, else the reason
    they are not (one sentence)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its output head is {type(head).__name__}, not a plain torch.nn.Linear"
    if type(head.weight.data) is not torch.Tensor:  # DTensor / sharded: the loss would see one shard of the vocabulary
        return f"its output head's weight is a {type(head.weight.data).__name__} (tensor-parallel or sharded)"
    config = getattr(model, "config", None)
    for name, neutral in _POST_HEAD.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None):
            return f"its config sets {name} = {value!r}: the logits are transformed after the head"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return "it has no get_decoder() to compute the final hidden states without the head"
    problem = _probe(model, decoder, head)
    return problem or (decoder, head)


def _probe(model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Linear) -> str | None:
    """One forward of a few tokens both ways (eval mode, no autocast); None when the logits agree."""
    was_training = model.training
    ids = torch.arange(_PROBE_TOKENS, device=head.weight.device)[None] % head.out_features
    try:
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = head(decoder(input_ids=ids).last_hidden_state).float()
    except Exception as e:  # noqa: BLE001 - any architecture quirk means "not this path"
        return f"computing its logits as head(decoder(x)) failed ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
        return "its logits differ from head(decoder(x)) (a transform between the decoder and the loss)"
    return None


def choose_loss_impl(
    impl: str, model: torch.nn.Module, *, cross: bool, say: Callable[[str], None]
) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """Resolve ``--loss-impl`` for ``model``: ``(decoder, head)`` for the fused-linear loss, None for the logits path.

    Raises:
        UserError: ``fused-linear`` was asked for and the model (or a cross-tokenizer run) does not allow it.
    """
    if impl == "logits":
        return None
    found = "a cross-tokenizer run scores the student's logits through its own mapping" if cross else None
    found = found or linear_head(model)
    if isinstance(found, tuple):
        say("loss: fused-linear (the student's logits are never materialised)")
        return found
    if impl == "fused-linear":
        raise UserError(f"--loss-impl fused-linear: the student cannot use it: {found}. Fix: --loss-impl logits")
    say(f"loss: logits path ({found})")
    return None
