"""What the device in use can do at most: dense bf16/fp16 tensor-core peak FLOP/s of known GPUs.

Figures are the vendors' dense (no 2:4 sparsity) numbers. An unknown device gives None, and MFU is then
reported as unavailable rather than computed against a wrong constant; `peak_flops=...` in the config
supplies the figure for a device this table lacks.
"""
import torch

# substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s. More specific names first: the first key found in
# the name wins, so a key that contains another (GH200 contains H200) must come before it (tests/test_hardware.py).
GPU_PEAK_BF16_FLOPS = [
    ("GH200", 989.4e12),  # before "H200", which its name contains
    ("H200", 989.4e12),
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: no bf16 on Volta
    ("T4", 65e12),  # fp16
]


def gpu_peak_flops(device_name: str):
    for key, flops in GPU_PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def device_peak_flops(device) -> float | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))

