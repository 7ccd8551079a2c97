"""Accelerator plugin layer: one interface over CUDA, Ascend, Kunlun, CPU and an emulated chip."""
