"""ddk_kernels: the fused CE + top-k KL distillation loss (Triton kernel, chunked-torch twin, references).

Never imports ``ddk_offline``. The Triton module is imported lazily, on the first ``backend="triton"``
call, so that TRITON_INTERPRET (CPU testing) is read when it matters and CPU users never import triton.
``fused_linear_kd_loss`` is the same loss from hidden states and the output head, without the [N, V] logits.
"""

from ddk_kernels.linear_loss import fused_linear_kd_loss
from ddk_kernels.loss import fused_kd_loss, fused_kd_loss_per_row
from ddk_kernels.spec import KD_MODES, KDSpec

__all__ = ["KD_MODES", "KDSpec", "fused_kd_loss", "fused_kd_loss_per_row", "fused_linear_kd_loss"]
