"""Peak FLOP/s of the GPUs this project runs on: the denominator of model FLOPs utilisation (MFU).

MFU = pairs/s x FLOPs per pair / (peak dense bf16 FLOP/s x GPUs); the FLOPs per pair are counted in
eve_ds/objectives/flops.py. The peak is a property of the hardware, not of the model, so it lives with the
trainer that measures pairs/s rather than with the FLOP formulas.
"""

from __future__ import annotations

# Peak dense bf16 tensor-core TFLOP/s (no sparsity) by GPU name fragment; checked in order, so that
# "H100 PCIe" is matched before "H100".
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU named like `torch.cuda.get_device_name()`; None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None
