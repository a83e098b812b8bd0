"""Triton kernels of the shard's hot path (GPU; tests run them in the Triton interpreter).

One module per kernel family, each with a module docstring giving its algorithm and its
memory/FLOP floor; every public function validates its arguments and allocates its output:
  attention   paged_attention (dispatches to attention_decode / attention_prefill)
  kv_cache    write_kv
  norm        rms_norm, fused_add_rms_norm
  rotary      apply_rotary, rotary_and_write_kv (rotary then the KV-cache write, one launch)
  activation  silu_and_mul
Their semantics match the torch versions in shardgen.shard.layers. This package imports
nothing itself, so that importing it does not require Triton; import the modules.

On Hopper the kernels of a decode step (norms, linear, rotary and KV write, decode
attention, SiLU-and-mul, fp8 quantize) launch with programmatic dependent launch
(checks.dependent_launch_args, checks.dependent_launch): each program waits for the kernel before it,
then lets the next one be scheduled, so launches overlap the kernel before them (3.5% of
a one-row decode step on an H100; SHARDGEN_PDL=0 turns it off).
"""
