"""Numbers in the unit a person reads them in (emulated chips run at GFLOP/s, real ones at TFLOP/s)."""


def flops_text(flops_per_s: float) -> str:
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.3g} {unit}"
    return f"{flops_per_s / 1e6:.3g} MFLOP/s"
