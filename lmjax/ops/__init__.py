"""Layer `ops`: kernels chosen by name: attention (`attention.py`), matmul with fp32 accumulation
(`matmul.py`), dropout masks (`dropout.py`), quantized weights (`quantized.py`), the CPU decode
kernels in C++ (`decode_kernels.py`) and reductions in forms XLA:CPU vectorises (`reductions.py`).
Backend choices (XLA:CPU layouts) live here.

May import: `lmjax.core` only. The model calls `attention.attention` and `matmul.matmul`; a new
kernel (cuDNN, Pallas, splash) is a new entry of ATTENTION_IMPLS / MATMUL_IMPLS.
"""
