"""Diagnostics: one-off measurements that explain the suite's figures. Not part of the suite.

- `profile_decode`: counts whole-KV-cache copies per step of the compiled decode loop, and times
  it with and without XLA:CPU's copy-insertion option.
- `dot_library`, `decode_attention`: same-process A/Bs of the compiled loops (matrix-product
  library; decode attention, or the engine at another git revision); shared pieces in `ab`.
"""
