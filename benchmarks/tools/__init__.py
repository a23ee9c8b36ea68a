"""Diagnostics: one-off measurements that explain the suite's figures. Not part of the suite.

- `profile_decode`: counts whole-KV-cache copies per step of the compiled decode loop, and times
  it with and without XLA:CPU's copy-insertion option.
"""
