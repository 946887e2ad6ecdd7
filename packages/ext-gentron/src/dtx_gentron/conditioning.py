"""The motion condition of GenTron-T2V: the per-sample motion-free mask as a guidable condition (motion-free
guidance, GenTron paper (Chen et al.)).

``motion_free`` [B] bool is the model keyword (True = TempSelfAttn attends each frame to itself only). Its *null*
condition is "motion-free", so the conditioning stage's dropout of this conditioner is GenTron's ``p_motion_free``
(pseudo-videos made of images carry ``motion_free = True`` from the data), and guidance over it is motion-free
guidance: ``dtx sample --motion-cfg 1.2 --cfg 7.5`` nests e(0, 0) -> e(0, c_M) -> e(c_T, c_M).
"""

from __future__ import annotations

from dtx.conditioning import FlagConditioner

FIELD = "motion_free"


class MotionConditioner(FlagConditioner):
    """``motion_free`` flag: null (dropped) = motion-free, default at sampling = motion on."""

    def __init__(self) -> None:
        super().__init__(field=FIELD, null=True, default=False)
