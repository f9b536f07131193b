"""Distributed glue: DeepSpeed ZeRO (data parallel) x megatron-core tensor parallel.

- ``parallel``: process groups and the TP x DP layout (``initialize_parallel``).
- ``tp_layers``: tensor-parallel Linear / Embedding / LM loss with the ``torch.nn`` call convention.
- ``mpu``: the adapter DeepSpeed uses to find megatron-core's groups.
- ``deepspeed_engine``: DeepSpeed config from ``DeepSpeedSettings`` and engine creation.
- ``megatron_cpu_compat``: the CPU-only workarounds for megatron-core (never applied on GPU).

Submodules are imported explicitly: megatron-core and DeepSpeed take seconds to import, and code
that only needs the model should not pay for them. See docs/distributed.md.
"""
