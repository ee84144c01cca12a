"""The plan before a launch, from shapes alone: device memory (memory.py), FLOPs and cell plans against a
target (cost.py), the fit check before compiling (device_memory.py) and the CUDA lowering (export.py)."""
